"""TRL's (and Hugging Face TrainingArguments') option names, mapped to ours.

A TRL user's YAML keys and flags are understood as they are: each stage's
config class has a table here from TRL's name to our field, optionally with a
function turning TRL's value into ours (``bf16: true`` is
``mixed_precision: bf16``). The README's option table lists the same pairs,
and a test checks the two agree. Keyed by the config class's name so this
module imports no stage.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from pipeline.errors import ConfigError


class Alias(NamedTuple):
    field: str
    """Our field the TRL name sets."""
    convert: Callable[[Any], Any] | None = None
    """TRL's value -> ours; None when the value means the same. Returning ``SKIP`` sets nothing."""


SKIP = object()
"""What a conversion returns when the TRL value leaves our field as it is (``bf16: false``)."""


def _precision(name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return name if value else SKIP

    convert.flag_type = bool  # type: ignore[attr-defined]
    return convert


def _joined(value: Any) -> Any:
    """TRL takes a list (``loss_type: [sigmoid, sft]``); our field holds it comma-separated."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def _not(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}")
    return not value


_not.flag_type = bool  # type: ignore[attr-defined]


_MODEL = {"model_name_or_path": Alias("model")}

TRL_NAMES: dict[str, dict[str, Alias]] = {
    "TrainConfig": {
        **_MODEL,
        "torch_dtype": Alias("dtype"),
        "output_dir": Alias("out"),
        "per_device_train_batch_size": Alias("batch_size"),
        "gradient_accumulation_steps": Alias("grad_accum"),
        "num_train_epochs": Alias("epochs"),
        "loss_type": Alias("loss", _joined),
        "rpo_alpha": Alias("sft_weight"),
        "lr_scheduler_type": Alias("scheduler"),
        "save_steps": Alias("save_every"),
        "save_total_limit": Alias("keep_checkpoints"),
        "logging_steps": Alias("log_every"),
        "eval_steps": Alias("eval_every"),
        "load_best_model_at_end": Alias("save_best"),
        "bf16": Alias("mixed_precision", _precision("bf16")),
        "fp16": Alias("mixed_precision", _precision("fp16")),
        "lora_target_modules": Alias("lora_targets", _joined),
        "overwrite_output_dir": Alias("overwrite"),
        "disable_tqdm": Alias("progress", _not),
    },
    "SFTConfig": {
        **_MODEL,
        "torch_dtype": Alias("dtype"),
        "output_dir": Alias("out"),
        "per_device_train_batch_size": Alias("batch_size"),
        "gradient_accumulation_steps": Alias("grad_accum"),
        "num_train_epochs": Alias("epochs"),
        "lr_scheduler_type": Alias("scheduler"),
        "save_steps": Alias("save_every"),
        "save_total_limit": Alias("keep_checkpoints"),
        "logging_steps": Alias("log_every"),
        "bf16": Alias("mixed_precision", _precision("bf16")),
        "fp16": Alias("mixed_precision", _precision("fp16")),
        "lora_target_modules": Alias("lora_targets", _joined),
        "overwrite_output_dir": Alias("overwrite"),
        "disable_tqdm": Alias("progress", _not),
    },
    "ScoreRefConfig": {
        **_MODEL,
        "torch_dtype": Alias("dtype"),
        "output_dir": Alias("out"),
        "disable_tqdm": Alias("progress", _not),
    },
    "EvalConfig": {
        **_MODEL,
        "torch_dtype": Alias("dtype"),
        "output_dir": Alias("out"),
        "per_device_eval_batch_size": Alias("batch_size"),
        "max_new_tokens": Alias("gen_length"),
    },
    "GenerateConfig": {
        **_MODEL,
        "torch_dtype": Alias("dtype"),
        "per_device_eval_batch_size": Alias("batch_size"),
        "max_new_tokens": Alias("gen_length"),
        "disable_tqdm": Alias("progress", _not),
    },
}
"""TRL name -> our field, per config class. Names equal on both sides (learning_rate, beta, seed,
max_steps, warmup_ratio, weight_decay, max_grad_norm, label_smoothing, gradient_checkpointing,
max_length, loss_weights, lora_r, lora_alpha, lora_dropout, load_in_4bit, trust_remote_code, report_to) need
no entry."""


def aliases_for(cls: type) -> dict[str, Alias]:
    return TRL_NAMES.get(cls.__name__, {})


def translate(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Our names for ``data``'s keys; a key given under both names with different values is an error."""
    table = aliases_for(cls)
    if not table:
        return dict(data)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in data.items():
        alias = table.get(key)
        if alias is None or key == alias.field:
            target, new = key, value
        else:
            target = alias.field
            try:
                new = alias.convert(value) if alias.convert else value
            except ConfigError as exc:
                raise ConfigError(f"{where}: {key}: {exc}") from None
            if new is SKIP:
                continue
        if target in out and out[target] != new:
            raise ConfigError(f"{where}: '{key}' and '{origin[target]}' both set {target} "
                              f"({new!r} and {out[target]!r}); give one")
        out[target], origin[target] = new, key
    return out
