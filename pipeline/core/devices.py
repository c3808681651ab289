"""Devices and dtypes: the one place that names them.

``resolve_device("auto")`` means accelerate's device for this process
(``cuda:LOCAL_RANK`` under ``accelerate launch``, the GPU when there is one,
else the CPU), in every stage and in make-pairs' sampler: one resolver, one meaning. torch is imported lazily so config classes can
validate dtype names without it.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""dtype names a config accepts (``--dtype``)."""
PRECISION_NAMES = ("no", "bf16", "fp16")
"""Mixed-precision names a config accepts (``--mixed-precision``, accelerate's names)."""

_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def torch_dtype(dtype: Any):
    """``torch.dtype`` of a name (float32, bfloat16, float16 and their short forms) or of a dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}: use {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def process_state(device: str = "auto"):
    """accelerate's process state; on a machine without CUDA, processes started by
    ``accelerate launch``/``torchrun`` join as CPU workers (gloo) instead of each
    believing it is alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def resolve_device(device: str):
    """The ``torch.device`` for a ``--device`` value: auto, cpu, cuda, cuda:N (or another torch device)."""
    import torch

    if device == "auto":
        return process_state(device).device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
