"""``lldm-dpo plan``: peak accelerator memory of a stage's settings, from the stage's own step code.

- ``memory``: sizes, card names and the analytic terms (NF4 packing, CUDA context, allocator slack);
- ``trace``: the stage's step on a model that allocates nothing, under torch's MemTracker;
- ``estimate``: per-block extrapolation, components, FSDP sharding, fit and the largest settings;
- ``check_start``: the small hook score-ref and train call before loading a model on CUDA.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pipeline.core.errors import UserError
from pipeline.core.lazy import deferred
from pipeline.plan.memory import CARDS, context_bytes, fmt_bytes, headroom_bytes, nf4_bytes, parse_memory

if TYPE_CHECKING:
    from pipeline.plan.estimate import Shape

torch = deferred("torch")  # plan's config reads parse_memory: a refused --gpu-memory skips torch

__all__ = ["CARDS", "Plan", "Shape", "check_start", "largest", "make_plan", "nf4_bytes",
           "parse_memory"]


def __getattr__(name: str):
    """The estimate's names (torch, the stages' step code), imported on first use."""
    if name in ("Plan", "Shape", "largest", "make_plan"):
        from pipeline.plan import estimate

        return getattr(estimate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_start(stage: str, cfg, shape: Shape, device) -> None:
    """On CUDA: plan the run and stop before loading anything when it exceeds the free memory less the stated
    headroom (5% of the card), naming the largest settings that fit. CPU runs (and ``--no-plan``) are not
    checked."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return
    from pipeline.plan.estimate import largest, make_plan

    free, card = torch.cuda.mem_get_info(torch.device(device))
    # The context already exists once mem_get_info has run: what remains must hold the rest, and the stated
    # headroom (memory.HEADROOM of the card) stays free.
    budget, reserve = free + context_bytes(), headroom_bytes(card)
    try:
        with torch.random.fork_rng(devices=[]):  # LoRA's initialisation in the trace must not move the run's RNG
            plan = make_plan(stage, cfg, shape, budget, f"{fmt_bytes(free)} free on {torch.device(device)}", reserve)
    except UserError as exc:  # a model the plan cannot build (not LLaDA): run unchecked, and say so
        print(f"warning: memory plan skipped ({exc})", file=sys.stderr)
        return
    if plan.fits:
        return
    with torch.random.fork_rng(devices=[]):
        found = largest(stage, cfg, shape, budget, plan.total, reserve=reserve)
    hints = ", ".join(f"--{k.replace('_', '-')} {v['value']}" for k, v in found.items() if v["value"] is not None)
    raise UserError(f"{stage} needs about {fmt_bytes(plan.total - context_bytes())} of accelerator memory and "
                    f"{fmt_bytes(free)} is free, of which {fmt_bytes(reserve)} is kept as headroom (lldm-dpo plan "
                    f"{stage} shows the parts); "
                    + (f"largest settings that fit, one at a time: {hints}" if hints else
                       "no single setting fits: use --load-in-4bit, LoRA, or more cards")
                    + "; --no-plan skips this check")

