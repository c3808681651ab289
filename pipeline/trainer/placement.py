"""The policy as placed on the processes: the accelerator, the model, and what wraps it under data parallel or
FSDP; what a step calls (``scorer``) and the collectives every process makes alike.

A recipe is one (``session.Recipe`` derives from it: its accelerator and prepared model are these fields); a
step outside a recipe (the tests, the benches, plan's trace) builds one with ``Placement(acc, model)``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist


class Placement:
    acc: Any
    """accelerate's Accelerator (or plan's stand-in for it)."""
    model: Any
    """The policy itself (peft-wrapped under LoRA), never a data-parallel wrapper."""
    wrapped: Any = None
    """What accelerate prepared (DDP or FSDP around a MaskedRowScorer) when distributed, else None."""
    fsdp: bool = False
    """Sharded by FSDP. Decided once at setup: on CPU the FSDP mode is attached to accelerate's state by hand
    (fresh_accelerator), and any later AcceleratorState() copies the process state's MULTI_CPU back over it."""

    def __init__(self, acc, model, wrapped=None, fsdp: bool = False):
        self.acc, self.model, self.wrapped, self.fsdp = acc, model, wrapped, fsdp

    @property
    def scorer(self):
        """What the loss calls: the wrapped MaskedRowScorer when distributed, else the policy."""
        return self.model if self.wrapped is None else self.wrapped

    def most(self, count: int) -> int:
        """The largest ``count`` over processes (a collective: every process calls it at the same point)."""
        if self.wrapped is None:
            return count
        t = torch.tensor([count], dtype=torch.long, device=self.acc.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sync_context(self, last: bool):
        """Gradients are all-reduced only on the last backward of an optimizer step (DDP's no_sync before it)."""
        if self.wrapped is None or last or self.fsdp:
            # FSDP reduce-scatters every backward: without sync each process would keep
            # whole unsharded gradients, the memory FSDP exists to save.
            return contextlib.nullcontext()
        return self.acc.no_sync(self.wrapped)
