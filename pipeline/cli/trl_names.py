"""TRL's (and Hugging Face TrainingArguments') option names, mapped to ours.

A TRL user's YAML keys and flags are understood as they are: each stage's
config class has a table here from TRL's name to our field, optionally with a
function turning TRL's value into ours (``bf16: true`` is
``mixed_precision: bf16``). The README's option table lists the same pairs,
and a test checks the two agree. Keyed by the config class's name so this
module imports no stage.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable, NamedTuple

from pipeline.cli.trl_args import apply_training_arguments, known, training_arguments
from pipeline.core.config import require
from pipeline.core.errors import ConfigError
from pipeline.sampling.args import OLD_NAMES


class Alias(NamedTuple):
    field: str
    """Our field the TRL name sets."""
    convert: Callable[[Any], Any] | None = None
    """TRL's value -> ours; None when the value means the same. Returning ``SKIP`` sets nothing."""


SKIP = object()
"""What a conversion returns when the TRL value leaves our field as it is (``bf16: false``)."""


def _precision(name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return name if value else SKIP

    convert.flag_type = bool  # type: ignore[attr-defined]
    return convert


def _joined(value: Any) -> Any:
    """TRL takes a list (``loss_type: [sigmoid, sft]``); our field holds it comma-separated."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def _not(value: Any) -> Any:
    require(isinstance(value, bool), f"expected true or false, got {value!r}")
    return not value


_not.flag_type = bool  # type: ignore[attr-defined]


def _keep_all(value: Any) -> Any:
    """TrainingArguments' save_total_limit null (``--save-total-limit none``) keeps every checkpoint: our 0."""
    return 0 if value is None or str(value).strip().lower() in ("none", "null") else value


def _max_steps(value: Any) -> Any:
    """TrainingArguments' max_steps -1 (its default) means "from the epochs": our 0; another negative is an
    error (not silently -1)."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
    if number is not None and number < 0:
        require(number == -1, f"max_steps must be >= 0 (or -1: from the epochs, as TrainingArguments), got {value}")
        return 0
    return value


_MODEL = {"model_name_or_path": Alias("model"), "torch_dtype": Alias("dtype")}
_EVAL = {"per_device_eval_batch_size": Alias("batch_size"), "max_new_tokens": Alias("gen_length")}
_OUT, _TQDM = {"output_dir": Alias("out")}, {"disable_tqdm": Alias("progress", _not)}

_TRAINING = {
    **_MODEL, **_OUT, **_TQDM,
    "per_device_train_batch_size": Alias("batch_size"), "gradient_accumulation_steps": Alias("grad_accum"),
    "num_train_epochs": Alias("epochs"), "lr_scheduler_type": Alias("scheduler"), "save_steps": Alias("save_every"),
    "save_total_limit": Alias("keep_checkpoints", _keep_all), "logging_steps": Alias("log_every"),
    "bf16": Alias("mixed_precision", _precision("bf16")), "fp16": Alias("mixed_precision", _precision("fp16")),
    "lora_target_modules": Alias("lora_targets", _joined), "overwrite_output_dir": Alias("overwrite"),
    "report_to": Alias("report_to", _joined), "max_steps": Alias("max_steps", _max_steps),
}
"""TrainingArguments' names that train and sft share."""

TRL_NAMES: dict[str, dict[str, Alias]] = {
    "TrainConfig": {**_TRAINING, "loss_type": Alias("loss", _joined), "rpo_alpha": Alias("sft_weight"),
                    "eval_steps": Alias("eval_every"), "load_best_model_at_end": Alias("save_best")},
    "SFTConfig": _TRAINING,
    # output_dir is train's run folder: a DPOConfig given to score-ref leaves it (the cache is score-ref's --out)
    "ScoreRefConfig": {**_MODEL, **_TQDM, "bf16": _TRAINING["bf16"], "fp16": _TRAINING["fp16"]},
    "EvalConfig": {**_MODEL, **_OUT, **_EVAL},
    "GenerateConfig": {**_MODEL, **_EVAL, **_TQDM},
}
"""TRL name -> our field, per config class. Names equal on both sides (learning_rate, beta, seed,
max_steps, warmup_ratio, weight_decay, max_grad_norm, label_smoothing, gradient_checkpointing,
max_length, loss_weights, lora_r, lora_alpha, lora_dropout, load_in_4bit, trust_remote_code, report_to) need
no entry."""


def aliases_for(cls: type) -> dict[str, Alias]:
    """TRL's names for ``cls``'s fields, and the former names of its fields (``cache`` for ``kv_cache``)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    renamed = {old: Alias(new, _old_name(old, new)) for old, new in OLD_NAMES.items()
               if new in fields and old not in fields}
    return {**TRL_NAMES.get(cls.__name__, {}), **renamed}


def overlay(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """A config section over an earlier one (the embedded default's): ``later``'s keys win, also over a key that
    names the same field by its former name (a user's ``cache`` over the default's ``kv_cache``, and back)."""
    fields = {OLD_NAMES.get(key, key) for key in later}
    return {**{k: v for k, v in earlier.items() if OLD_NAMES.get(k, k) not in fields}, **later}


NOTED: set[str] = set()
"""The old names this process has already said a note about (one line each, however many layers use them)."""


def _old_name(old: str, new: str) -> Callable[[Any], Any]:
    """A former field name, still accepted: the value as it is, and a one-line note on stderr (once)."""

    def convert(value: Any) -> Any:
        if old not in NOTED:
            NOTED.add(old)
            print(f"note: '{old}' is the old name of '{new}' (the sampler's KV cache); use '{new}': 'cache' now "
                  "means the reference-score cache alone", file=sys.stderr)
        return value

    return convert


TRAINING_STAGES = ("TrainConfig", "SFTConfig")
"""Config classes that take every TrainingArguments / TRL key (pipeline/cli/trl_args.py)."""


def translate(cls: type, data: dict[str, Any], where: str, *, problems: list[str] | None = None,
              given_as: dict[str, str] | None = None, whole_file: bool = False) -> dict[str, Any]:
    """Our names for ``data``'s keys; a key given under both names with different values is an error.

    For train and sft, a TrainingArguments or TRL key that is no field of ours is applied, accepted as
    harmless or refused with why (pipeline/cli/trl_args.py). With ``problems``, every key that cannot apply is
    appended there (by the user's own name, with why) instead of raising at the first; ``given_as`` gathers our
    field -> the name the user set it by. ``whole_file``: ``data`` is a config file given to this one stage, so
    a TRL key that belongs to another stage (a DPOConfig's ``learning_rate`` given to score-ref) is left to it,
    said in one line on stderr."""
    table = aliases_for(cls)
    raise_now = problems is None
    problems = [] if problems is None else problems
    ours = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    training = cls.__name__ in TRAINING_STAGES
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    left: list[str] = []

    def put(key: str, target: str, new: Any) -> None:
        if target in out and out[target] != new:
            raise ConfigError(f"'{key}' and '{origin[target]}' both set {target} ({new!r} and {out[target]!r}); "
                              "give one")
        out[target], origin[target] = new, key
        if given_as is not None and key != target:
            given_as[target] = key

    for key, value in data.items():
        alias = table.get(key)
        try:
            # TrainingArguments' null "not set" (eval_steps, disable_tqdm, ...) leaves ours; save_total_limit null:
            # keep all
            if training and value is None and key != "save_total_limit" and key in training_arguments() \
                    and training_arguments()[key] is None:
                continue
            if training and alias is None and key not in ours and known(key):
                for target, new in apply_training_arguments(cls.__name__, key, value, data).items():
                    put(key, target, new)
                continue
            if not training and whole_file and alias is None and key not in ours and belongs_to_training(key):
                left.append(key)
                continue
            if alias is None:
                target, new = key, value
            else:
                target = alias.field
                try:
                    new = alias.convert(value) if alias.convert else value
                except ConfigError as exc:
                    raise ConfigError(str(exc) if str(exc).startswith(key) else f"{key}: {exc}") from None
                if new is SKIP:
                    continue
            put(key, target, new)
        except ConfigError as exc:
            if raise_now:
                raise ConfigError(f"{where}: {exc}") from None
            problems.append(str(exc))
    if left and not problems:
        applied = [k for k in data if k not in left]
        print(f"note: {where}: {STAGE_NAMES.get(cls.__name__, cls.__name__)} applies "
              f"{', '.join(applied) if applied else 'none of its keys'}; leaves {', '.join(left)} to train",
              file=sys.stderr)
    return out


STAGE_NAMES = {"IngestConfig": "ingest", "ScoreRefConfig": "score-ref", "EvalConfig": "eval",
               "GenerateConfig": "generate", "MakePairsConfig": "make-pairs"}
"""Config class -> its command, for the line that says which keys a stage leaves to the others."""


def belongs_to_training(key: str) -> bool:
    """A key of a TRL DPOConfig/SFTConfig or of TrainingArguments: train's (or sft's), to be left by the stages
    that share the user's one config file."""
    return known(key) or any(key in names for names in (TRL_NAMES["TrainConfig"], TRL_NAMES["SFTConfig"])) \
        or key in _train_fields()


@functools.lru_cache(maxsize=None)
def _train_fields() -> frozenset[str]:
    """TrainConfig's and SFTConfig's own fields (beta, loss, sft_weight, ...)."""
    from pipeline.trainer.dpo_config import TrainConfig
    from pipeline.trainer.sft_config import SFTConfig

    return frozenset(f.name for cls in (TrainConfig, SFTConfig) for f in dataclasses.fields(cls))


SEED_PROJECT_KEYS: dict[str, tuple[str | None, str]] = {
    "model_name_or_path": (None, "model"),
    "output_dir": (None, "out"),
    "preference_data_path": ("ingest", "inputs"),
    "learning_rate": ("train", "learning_rate"),
    "per_device_train_batch_size": ("train", "batch_size"),
    "gradient_accumulation_steps": ("train", "grad_accum"),
    "num_train_epochs": ("train", "epochs"),
    "beta": ("train", "beta"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"),
    "diffusion_steps": ("eval", "steps"),
    "use_mixed_precision": ("score_ref", "mixed_precision"),
}
"""The seed project's ``config/config.yaml`` keys (top level) -> (section of ``lldm-dpo run``'s config, key).
``diffusion_steps`` is the sampler's denoising steps in eval (generation); ``use_mixed_precision: true`` is
bf16 where the reference is scored (score_ref), which train then follows; ``num_train_epochs`` also clears
the embedded default's max_steps, so the epochs count."""


def _seed_precision(value: Any, where: str) -> str:
    """The seed's ``use_mixed_precision``: true (bf16) or false, or accelerate's names as its README gives them
    (``fp16``, ``bf16``, ``no``; YAML reads an unquoted ``no`` as false)."""
    if isinstance(value, bool):
        return "bf16" if value else "no"
    text = str(value).strip().lower() if isinstance(value, str) else None
    require(text in ("fp16", "bf16", "no"),
            f"{where}: use_mixed_precision must be fp16, bf16, no, true or false, got {value!r}")
    return text


RUN_LEVEL = ("model", "out", "device")
"""Run config keys that train also has: at the top of a run config they are the run's, not train's."""

SCORE_REF_TOO = ("max_length", "max_prompt_length", "max_completion_length", "bf16", "fp16")
"""TRL keys of a run config's top level that score-ref applies as well as train (the cache is truncated and
scored as train will read it)."""


def _trl_top_level(data: dict[str, Any], sections: tuple[str, ...], where: str) -> dict[str, Any]:
    """A TRL DPOConfig's keys at the top of a run config moved into the sections that apply them, in our names
    (train; the truncation and precision keys score_ref too), said in one line; a key also in that section with
    another value is an error."""
    from pipeline.trainer.dpo_config import TrainConfig

    keys = [k for k in data if k not in sections and k not in RUN_LEVEL and k not in SEED_PROJECT_KEYS
            and belongs_to_training(k)]
    if not keys:
        return data
    out = {k: v for k, v in data.items() if k not in keys}
    given = {k: data[k] for k in keys}
    score_ref: dict[str, Any] = {}
    for key in (k for k in keys if k in SCORE_REF_TOO):
        alias = TRL_NAMES["ScoreRefConfig"].get(key)
        value = alias.convert(given[key]) if alias and alias.convert else given[key]
        if value is not SKIP:
            score_ref[alias.field if alias else key] = value
    train = translate(TrainConfig, given, where)
    if "loss" in train and "loss_weights" not in train and "loss_weights" not in out.get("train", {}):
        train["loss_weights"] = None  # the user's loss_type replaces the embedded default's losses and weights
    for section, values in (("train", train), ("score_ref", score_ref)):
        target = out.get(section, {})
        require(isinstance(target, dict), f"{where}: section '{section}' must be a mapping of that stage's keys")
        for key, value in values.items():
            if key in target and target[key] != value:
                raise ConfigError(f"{where}: a top-level TRL key and '{section}.{key}' give different values "
                                  f"({value!r} and {target[key]!r}); give one")
        if values:
            out[section] = {**target, **values}
    print(f"note: {where}: run gives {', '.join(keys)} to train"
          + (f" ({', '.join(k for k in keys if k in SCORE_REF_TOO)} to score_ref too)" if score_ref else ""),
          file=sys.stderr)
    return out


def seed_project_config(data: dict[str, Any], where: str, sections: tuple[str, ...] = (
        "ingest", "score_ref", "train", "eval", "make_pairs")) -> dict[str, Any]:
    """A run config with the seed project's top-level keys, and a TRL DPOConfig's, moved to the sections they
    mean here; a key given both ways with different values is a one-line error."""
    data = _trl_top_level(data, sections, where)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in SEED_PROJECT_KEYS}
    for key, (section, field) in SEED_PROJECT_KEYS.items():
        if key not in data:
            continue
        value = data[key]
        if key == "preference_data_path":
            value = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif key == "use_mixed_precision":
            value = _seed_precision(value, where)
        target = out if section is None else out.setdefault(section, {})
        require(isinstance(target, dict), f"{where}: section '{section}' must be a mapping of that stage's keys")
        require(field not in target or target[field] == value,
                f"{where}: '{key}' and '{(section + '.') if section else ''}{field}' give different values "
                f"({value!r} and {target.get(field)!r}); give one")
        target[field] = value
        if key == "num_train_epochs":
            target.setdefault("max_steps", 0)
    return out
