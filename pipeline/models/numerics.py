"""The numerics a model is scored in: weights dtype, autocast, 4-bit base. Part of the cache's contract.

score-ref records them in the fingerprint (``dtype``, ``mixed_precision``,
``load_in_4bit``); train and eval follow them by default, so the policy that
starts from the cache's model reproduces the cached terms. An explicit setting
that differs is refused with both values named unless the user allows it
(``--allow-numerics-mismatch``): a bfloat16 policy against a float32 cache
starts every DPO number off centre by about a nat on 200-token responses
(bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.core.devices import PRECISION_NAMES
from pipeline.core.errors import UserError
from pipeline.core.lazy import deferred

torch = deferred("torch")  # eval's, generate's and make-pairs' configs read this module: their --help skips torch

_AUTOCAST_DTYPES = dict(zip(PRECISION_NAMES, (None, "bfloat16", "float16")))
"""The autocast dtype of each mixed-precision name (no: none), as torch's attribute name."""
FIELDS = ("dtype", "mixed_precision", "load_in_4bit")
FLAGS = {"dtype": "--dtype", "mixed_precision": "--mixed-precision", "load_in_4bit": "--load-in-4bit"}


@dataclass(frozen=True)
class Numerics:
    dtype: str = "float32"
    """Weights dtype (the 4-bit base computes in bfloat16)."""
    mixed_precision: str = "no"
    """Autocast of the forward pass: no, bf16 or fp16 (accelerate's names)."""
    load_in_4bit: bool = False
    """Frozen base quantized to NF4 with bitsandbytes (CUDA or CPU kernels)."""

    def describe(self) -> str:
        parts = [self.dtype + " weights"]
        if self.mixed_precision != "no":
            parts.append(f"{self.mixed_precision} autocast")
        if self.load_in_4bit:
            parts.append("4-bit NF4 base")
        return ", ".join(parts)


def config_numerics(cfg) -> Numerics:
    """The numerics a stage config (``dtype``, ``mixed_precision``, ``load_in_4bit``) names, its unset ones at
    their defaults (float32 weights, no autocast, no 4-bit): what a run without a cache to follow uses."""
    return Numerics(dtype=cfg.dtype or "float32", mixed_precision=cfg.mixed_precision or "no",
                    load_in_4bit=bool(cfg.load_in_4bit))


def of_fingerprint(fingerprint: dict[str, Any]) -> Numerics:
    """The numerics a cache was scored in (caches from before this field: float32-era defaults)."""
    return Numerics(dtype=fingerprint.get("dtype") or "float32",
                    mixed_precision=fingerprint.get("mixed_precision") or "no",
                    load_in_4bit=bool(fingerprint.get("load_in_4bit") or False))


def follow(cache: Numerics, *, dtype: Optional[str] = None, mixed_precision: Optional[str] = None,
           load_in_4bit: Optional[bool] = None, allow_mismatch: bool = False, where: str = "cache",
           names: Optional[dict[str, str]] = None) -> Numerics:
    """This run's numerics: each setting left unset (None) takes the cache's; one set to another value
    is refused with both values named, unless ``allow_mismatch``. ``names``: a setting -> the name the user
    gave it by (TRL's ``bf16``), used in that message instead of our flag."""
    asked = {"dtype": dtype, "mixed_precision": mixed_precision, "load_in_4bit": load_in_4bit}
    chosen = {}
    for name in FIELDS:
        value, cached = asked[name], getattr(cache, name)
        if value is not None and value != cached and not allow_mismatch:
            given = (names or {}).get(name, FLAGS[name])
            by = f" (your {given})" if given != FLAGS[name] else ""
            raise UserError(f"{where}: the reference was scored with {name}={cached}, this run asks for "
                            f"{name}={value}{by}; drop {given} to follow the cache, rescore with score-ref "
                            f"{FLAGS[name]} {value}{' (or the same ' + given + ')' if by else ''}, or pass "
                            "--allow-numerics-mismatch")
        chosen[name] = cached if value is None else value
    if chosen["load_in_4bit"] and chosen["dtype"] != "bfloat16":
        chosen["dtype"] = "bfloat16"  # bitsandbytes' 4-bit base computes in bfloat16 here
    return Numerics(**chosen)


def accelerate_override_note(mixed_precision: str, where: str, env=None) -> str | None:
    """The one line saying an accelerate config's mixed_precision (``accelerate launch`` exports it as
    ACCELERATE_MIXED_PRECISION) is replaced by this run's, which follows the cache; None when they agree."""
    env = os.environ if env is None else env
    asked = (env.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower()
    if not asked or asked == mixed_precision:
        return None
    return (f"note: the accelerate config's mixed_precision {asked} is replaced by {mixed_precision}, the "
            f"reference cache's ({where}); rescore with score-ref --mixed-precision {asked} to train in {asked}")


def autocast(device: torch.device | str, mixed_precision: str):
    """The forward pass's autocast, as accelerate's ``Accelerator(mixed_precision=...).autocast()`` gives it."""
    dtype = _AUTOCAST_DTYPES[mixed_precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def prepare_4bit(model, gradient_checkpointing: bool = False):
    """A 4-bit base as train computes with it: peft's k-bit preparation (non-quantized weights in float32),
    except the frozen embedding and head, kept in bfloat16 (about 2 GB at LLaDA-8B's vocabulary)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.to(torch.bfloat16)
    # The final norm now computes in float32: the head takes its rows in its own dtype, wherever it is called.
    model.get_output_embeddings().register_forward_pre_hook(_to_head_dtype)
    return model


def _to_head_dtype(head, args):
    return (args[0].to(head.weight.dtype), *args[1:])

