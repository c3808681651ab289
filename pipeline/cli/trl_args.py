"""Every ``transformers.TrainingArguments`` field, and TRL's DPOConfig / SFTConfig / ModelConfig / ScriptArguments
own fields, in a train or sft YAML: applied, accepted as harmless, or refused with why.

A TRL user's config file loads as it is. The keys that take effect are our fields or TRL names of them
(pipeline/cli/trl_names.py). Of the rest, ``TrainingArguments``' fields are read from the class itself
(``dataclasses.fields``, when the first config is translated), so a field transformers adds is known too;
TRL's own are listed here (TRL is not a dependency). Such a key is accepted when its value is its default (it
then changes nothing), or when ``RULES`` says what the value means here; any other value is a one-line error
naming the key and why it cannot apply (``WHY``, or that lldm-dpo's trainer does not apply it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from pipeline.core.config import field_default, require
from pipeline.core.errors import ConfigError

ANY = "any value"

TRL_OWN: dict[str, Any] = {
    # DPOConfig (beta, loss_type, label_smoothing, rpo_alpha, loss_weights, max_length are our fields or aliases)
    "max_prompt_length": None, "max_completion_length": None, "truncation_mode": "keep_end", "padding_value": None,
    "precompute_ref_log_probs": ANY, "precompute_ref_batch_size": ANY, "reference_free": False,
    "sync_ref_model": False, "ref_model_mixup_alpha": ANY, "ref_model_sync_steps": ANY,
    "generate_during_eval": False, "use_weighting": False, "ld_alpha": None, "disable_dropout": ANY,
    "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 1.0, "padding_free": False, "use_liger_loss": False,
    "base_model_attribute_name": "model", "model_init_kwargs": None, "ref_model_init_kwargs": None,
    "model_adapter_name": None, "ref_adapter_name": None, "force_use_ref_model": False, "tools": None,
    "discopop_tau": 0.05, "use_logits_to_keep": False, "activation_offloading": False, "pad_token": None,
    "dataset_num_proc": ANY,
    # SFTConfig
    "dataset_text_field": "text", "packing": False, "packing_strategy": ANY, "eval_packing": None,
    "completion_only_loss": (None, True), "assistant_only_loss": False, "dataset_kwargs": None, "eos_token": None,
    "pad_to_multiple_of": None, "chat_template_path": None, "shuffle_dataset": ANY,
    # ModelConfig (model_name_or_path, torch_dtype/dtype, trust_remote_code, lora_* are ours or aliases)
    "model_revision": "main", "attn_implementation": None, "use_peft": ANY, "lora_modules_to_save": None,
    "lora_task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False, "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False,
    # ScriptArguments
    "dataset_name": None, "dataset_config": None, "dataset_train_split": "train", "dataset_test_split": "test",
    "gradient_checkpointing_use_reentrant": ANY, "ignore_bias_buffers": False,
    # TrainingArguments fields of transformers 4 that TRL configs still carry
    "tpu_num_cores": None, "tpu_metrics_debug": False, "no_cuda": False, "fp16_backend": "auto",
    "push_to_hub_model_id": None, "push_to_hub_organization": None, "push_to_hub_token": None,
}
"""TRL's own keys beyond TrainingArguments': the value accepted (its default or ``ANY``; a tuple: each)."""

WHY: dict[str, str] = {
    "deepspeed": "DeepSpeed is not supported here (lldm-dpo's trainer is not wired to DeepSpeed's engine, and "
                 "untested); shard with FSDP (accelerate launch --config_file configs/accelerate/fsdp.yaml)",
    "fsdp": "FSDP is chosen by the launcher: accelerate launch --config_file configs/accelerate/fsdp.yaml",
    "fsdp_config": "FSDP is configured by accelerate launch --config_file (configs/accelerate/fsdp.yaml)",
    "tpu_num_cores": "there is no TPU (torch_xla) support", "tpu_metrics_debug": "there is no TPU support",
    "reference_free": "the reference is always the cache's model (reference: cached or online)",
    "sync_ref_model": "the reference is fixed by the cache (TR-DPO's synced reference is not built)",
    "packing": "sequences are not packed (each example is one sequence)",
    "completion_only_loss": "the loss is always on the completion only (LLaDA's SFT never masks the prompt)",
    "per_device_eval_batch_size": "held-out passes use per_device_train_batch_size",
    "eval_accumulation_steps": "held-out sums are accumulated exactly already",
    "torch_compile": "torch.compile is not used",
    "discopop_tau": "the discopop loss is built with TRL's default tau 0.05 (pipeline/estimator/losses.py DISCOPOP_TAU)",
    "truncation_mode": "score-ref keeps the end of the prompt and the start of each response (keep_end)",
    "max_prompt_length": "sft truncates each example to max_length (max_prompt_length is score-ref's, for DPO)",
    "max_completion_length": "sft truncates each example to max_length (max_completion_length is score-ref's)",
    "load_in_8bit": "8-bit loading is not built; use load_in_4bit",
    "use_dora": "DoRA is not built; LoRA only", "use_rslora": "rsLoRA is not built; LoRA only",
    "dataset_name": "train reads a reference-score cache: ingest the data and score it with score-ref first",
    "logging_first_step": "steps are logged every logging_steps and at the end",
    "gradient_checkpointing_kwargs": "gradient checkpointing takes the model's own defaults",
    "ddp_timeout": "data parallel is set up by accelerate launch", "ddp_backend": "set by accelerate launch",
    "no_cuda": "choose the device with use_cpu: true or --device cpu",
    "hub_revision": "push_to_hub uploads to the repository's main branch",
}
"""Why a key's non-default value cannot apply here (default reason: lldm-dpo's trainer does not apply it)."""

ANY_VALUE: dict[str, str] = {
    "logging_dir": "TensorBoard writes under RUN/tensorboard, other trackers under RUN/trackers",
    "do_train": "train and sft always train", "do_eval": "train evaluates with eval_steps", "do_predict": "unused",
    "remove_unused_columns": "the cache and the data are read by their own columns",
    "dataloader_num_workers": "there is no DataLoader: the cache is read in slices",
    "dataloader_pin_memory": "there is no DataLoader", "dataloader_persistent_workers": "there is no DataLoader",
    "dataloader_prefetch_factor": "there is no DataLoader", "dataloader_drop_last": "there is no DataLoader",
    "local_rank": "set by the launcher", "hub_always_push": "the final model is pushed once, at the end",
    "ddp_find_unused_parameters": "the scorer uses every parameter",
    "save_safetensors": "weights are always safetensors", "logging_nan_inf_filter": "a non-finite loss stops the run",
    "include_num_input_tokens_seen": "tokens are counted in num_tokens / tokens_per_second",
    "data_seed": "the data order follows seed", "full_determinism": "runs are deterministic by construction",
    "label_names": "unused", "disable_tqdm": "mapped", "save_on_each_node": "one process saves",
    "past_index": "unused", "prediction_loss_only": "unused", "greater_is_better": "save_best: higher accuracy",
    "metric_for_best_model": "save_best keeps the best eval/rewards/accuracies",
}
"""Keys any value of which is harmless here, with why."""


@functools.lru_cache(maxsize=None)
def training_arguments() -> dict[str, Any]:
    """``TrainingArguments``' init fields and their defaults, read from the class."""
    from transformers import TrainingArguments

    return {f.name: field_default(f) for f in dataclasses.fields(TrainingArguments) if f.init}


def known(key: str) -> bool:
    return key in TRL_OWN or key in RULES or key in ANY_VALUE or key in WHY or key in training_arguments()


def _no(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``no`` as false: for a strategy it is ``"no"``."""
    return "no" if value is False else getattr(value, "value", value)


def _strategy(key: str, allowed: dict[str, dict[str, Any]], why: str) -> Callable[[Any, str, dict], dict]:
    def rule(value: Any, stage: str, data: dict) -> dict:
        text = _no(value)
        require(isinstance(text, str) and text in allowed,
                f"{key}: {text!r} cannot apply here: {why} ({key}: {' or '.join(allowed)})")
        return dict(allowed[text])

    return rule


def _eval_strategy(value: Any, stage: str, data: dict) -> dict:
    value = _no(value)
    if value in ("no", None):
        return {}
    require(stage == "TrainConfig",
            f"eval_strategy: {value!r} cannot apply here: sft measures no held-out split (eval_strategy: no)")
    if value == "epoch":
        return {"eval_each_epoch": True}
    require(value == "steps", f"eval_strategy: {value!r} cannot apply here: held-out metrics are measured every "
                              "eval_steps steps or each epoch (eval_strategy: steps or epoch)")
    require(bool(data.get("eval_steps") or data.get("eval_every")),
            "eval_strategy: steps needs eval_steps > 0 (transformers would default it to logging_steps; give it)")
    return {}


def _save_strategy(value: Any, stage: str, data: dict) -> dict:
    value = _no(value)
    if value == "steps":
        return {}
    if value == "no":
        return {"save_every": 0}
    if value == "epoch":
        return {"save_each_epoch": True}
    if value == "best" and stage == "TrainConfig":
        return {"save_best": True}
    raise ConfigError(f"save_strategy: {value!r} cannot apply here: checkpoints are written every save_steps steps "
                      f"or each epoch (save_strategy: steps, epoch{', best' if stage == 'TrainConfig' else ''} or no)")


def _use_peft(value: Any, stage: str, data: dict) -> dict:
    require(isinstance(value, bool), f"use_peft must be true or false, got {value!r}")
    require(not value or bool(data.get("lora_r")), "use_peft: true needs lora_r > 0 (the LoRA rank)")
    require(value or not data.get("lora_r"),
            f"use_peft: false contradicts lora_r: {data.get('lora_r')} (LoRA is on when lora_r > 0)")
    return {}


def _use_cpu(value: Any, stage: str, data: dict) -> dict:
    require(isinstance(value, bool), f"use_cpu must be true or false, got {value!r}")
    return {"device": "cpu"} if value else {}


def _dataset_name(value: Any, stage: str, data: dict) -> dict:
    require(value is None or stage == "SFTConfig", f"dataset_name: cannot apply here: {WHY['dataset_name']}")
    return {} if value is None else {"data": value}


RULES: dict[str, Callable[[Any, str, dict], dict]] = {
    "eval_strategy": _eval_strategy, "evaluation_strategy": _eval_strategy, "save_strategy": _save_strategy,
    "logging_strategy": _strategy("logging_strategy", {"steps": {}, "epoch": {"log_each_epoch": True}},
                                  "metrics are logged every logging_steps steps or each epoch"),
    "use_peft": _use_peft, "use_cpu": _use_cpu, "dataset_name": _dataset_name,
    "hub_strategy": _strategy("hub_strategy", {"end": {}, "every_save": {}},
                              "push_to_hub uploads the final model folder only, at the end of the run"),
}
"""Keys whose value means something here: value -> the fields it sets (or a one-line error)."""


def _accepted(key: str, value: Any) -> bool:
    default = TRL_OWN[key] if key in TRL_OWN else training_arguments().get(key)
    if key in ANY_VALUE or default == ANY:
        return True
    choices = default if isinstance(default, tuple) else (default,)
    value = getattr(value, "value", value)
    return any(value == getattr(c, "value", c) or (c in ([], {}, None) and value in ([], {}, None))
               for c in choices)


def apply_training_arguments(stage: str, key: str, value: Any, data: dict) -> dict[str, Any]:
    """Our fields that TrainingArguments/TRL key ``key`` sets (often none); ConfigError when it cannot apply."""
    if key in RULES:
        return RULES[key](value, stage, data)
    if _accepted(key, value):
        return {}
    why = WHY.get(key, "lldm-dpo's trainer does not apply it; remove the key or give its default "
                       f"({TRL_OWN.get(key, training_arguments().get(key))!r})")
    raise ConfigError(f"{key}: {value!r} cannot apply here: {why}")
