"""Sizes, cards and the analytic terms of a memory plan (pure functions).

What fake tensors cannot see is added here, each term stated:

- NF4 weights: bitsandbytes packs two 4-bit codes per byte and keeps one
  float32 absmax per block of 64 values; with double quantization (what
  ``load_model(load_in_4bit=True)`` asks for) the absmaxes are themselves
  quantized to one byte each in blocks of 256, with a float32 absmax per such
  block, a float32 offset and the 256-entry float32 code of that second
  quantization; the 16-entry NF4 code is one more float32 table per layer.
- The CUDA context and library workspaces, never counted by
  ``torch.cuda.max_memory_allocated`` but taken from the card's memory.
- Allocator slack: the caching allocator rounds blocks up and fragments, so
  ``max_memory_reserved`` runs above ``max_memory_allocated``.
"""

from __future__ import annotations

import math
import re

from pipeline.core.errors import ConfigError

GIB = 2**30
MIB = 2**20

CARDS: dict[str, tuple[int, str]] = {
    "rtx4080": (16 * GIB, "NVIDIA GeForce RTX 4080, 16 GB"),
    "rtx4090": (24 * GIB, "NVIDIA GeForce RTX 4090, 24 GB"),
    "a100-40": (40 * GIB, "NVIDIA A100 40 GB"),
    "a100-80": (80 * GIB, "NVIDIA A100 80 GB"),
    "h100": (80 * GIB, "NVIDIA H100 80 GB"),
    "h200": (141 * 10**9, "NVIDIA H200 141 GB"),
}
"""Card names accepted by --gpu-memory; the size is what the card's memory holds (marketing GB of the
consumer cards are GiB as the driver reports them, within a few MiB)."""

CUDA_CONTEXT_BYTES = 512 * MIB
"""CUDA context with lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's default): typically 300-600 MiB
after the first kernels of torch, cuBLAS and cuDNN load; the upper end is taken."""
WORKSPACE_BYTES = 64 * MIB
"""cuBLAS/cuBLASLt workspaces of the default and autograd streams (torch sizes one at 32 MiB on Hopper)."""
ALLOCATOR_SLACK = 0.05
"""Share of the tracked peak added for the caching allocator's rounding and fragmentation."""
HEADROOM = 0.05
"""Share of the card the fit advice leaves free: a plan fits when its total is at most the card less this, and the
largest settings are searched against that (the plan is uncalibrated on CUDA; its last MiB is no margin)."""

NF4_BLOCKSIZE = 64
"""Values per absmax block of bitsandbytes' 4-bit quantization (Params4bit's default)."""
NESTED_BLOCKSIZE = 256
"""Absmaxes per block of the second (double) quantization."""

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1} | {prefix + suffix: base ** (k + 1) for k, prefix in enumerate("kmgt")  # k, kb; ki, kib
                            for suffix, base in (("", 1000), ("b", 1000), ("i", 1024), ("ib", 1024))}


def parse_memory(text: str) -> tuple[int, str]:
    """``16GiB``, ``24GB``, ``80e9`` or a card name -> (bytes, description)."""
    key = str(text).strip().lower()
    if key in CARDS:
        return CARDS[key]
    match = _SIZE.match(key)
    if match is None:
        try:
            value = float(key)
        except ValueError:
            raise ConfigError(f"gpu_memory {text!r}: give a size such as 16GiB or 24GB, or a card name "
                              f"({', '.join(CARDS)})") from None
        unit = ""
    else:
        value, unit = float(match.group(1)), (match.group(2) or "").lower()
    size = int(value * _UNITS[unit])
    if size < 64 * MIB:
        raise ConfigError(f"gpu_memory {text!r} is under 64 MiB; sizes without a unit are bytes (use e.g. 16GiB)")
    return size, f"{size / GIB:.1f} GiB"


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / MIB:.1f} MiB"


def nf4_bytes(numel: int, *, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> int:
    """Device bytes of one weight of ``numel`` values quantized by bitsandbytes' ``quantize_4bit`` (NF4): the
    packed codes plus the quantization constants, double-quantized or not (the terms: this module's docstring)."""
    blocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2
    if double_quant:
        stats = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 + 256 * 4
    else:
        stats = 4 * blocks
    return packed + stats + 16 * 4


def context_bytes() -> int:
    """The allowance for the CUDA context and library workspaces."""
    return CUDA_CONTEXT_BYTES + WORKSPACE_BYTES


def headroom_bytes(card_bytes: int) -> int:
    """The stated headroom kept free on a card of ``card_bytes``."""
    return int(math.ceil(HEADROOM * card_bytes))
