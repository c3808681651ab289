"""From traces to a plan: per-block extrapolation, components, FSDP sharding, the fit and the largest settings.

Traced at 1 and 2 blocks, a model of N identical blocks is extrapolated per
block (every tracked quantity is affine in the number of blocks: weights,
gradients and optimizer states per block, activations kept per block, and a
peak that falls at the same phase of the step); a model of 2 blocks or fewer
is traced whole. ``tests/pipeline/plan/test_plan.py`` checks the extrapolation
against a whole trace.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.core.errors import UserError
from pipeline.plan import memory
from pipeline.plan.trace import TRACERS, Shape, Trace, model_config

COMPONENTS = ("weights", "adapters", "gradients", "optimizer_states", "activations", "logits_head_chunk",
              "allocator_slack", "cuda_context_workspace")


def trace(stage: str, cfg: Any, shape: Shape, *, layers: int | None = None, fake: bool = True) -> Trace:
    """One traced step of ``stage`` (a train plan runs the DPO recipe's own step code)."""
    with warnings.catch_warnings():  # MemTracker's module hooks on peft's wrappers: noise, not news
        warnings.filterwarnings("ignore", message=r"Module is None\. Skipping")
        return TRACERS[stage](cfg, shape, fake=fake, layers=layers)


def _affine(a: Trace, b: Trace, steps: int) -> Trace:
    """b + steps * (b - a), field by field (a at k blocks, b at k + 1)."""
    def ext(x, y):
        return max(0, int(y + steps * (y - x)))

    return Trace(peak={k: ext(a.peak.get(k, 0), v) for k, v in b.peak.items()},
                 head_at_peak=ext(a.head_at_peak, b.head_at_peak),
                 trainable_bytes=ext(a.trainable_bytes, b.trainable_bytes),
                 frozen_bytes=ext(a.frozen_bytes, b.frozen_bytes), block_bytes=b.block_bytes,
                 head_bytes=b.head_bytes, notes=b.notes)


def full_trace(stage: str, cfg: Any, shape: Shape) -> tuple[Trace, str]:
    """The trace of the whole model (extrapolated per block past 3 blocks) and how it was obtained."""
    n_layers = _model_config(stage, cfg).n_layers
    if n_layers <= 2:
        return trace(stage, cfg, shape), f"traced whole ({n_layers} blocks)"
    whole = _affine(trace(stage, cfg, shape, layers=1), trace(stage, cfg, shape, layers=2), n_layers - 2)
    return whole, f"traced at 1 and 2 blocks, extrapolated per block to {n_layers}"


def _model_config(stage: str, cfg: Any):
    if not getattr(cfg, "model", None):
        raise UserError(f"plan {stage}: give --model (train's default, the cache's model, needs a cache)")
    return model_config(str(cfg.model))


def components(stage: str, cfg: Any, t: Trace, shape: Shape) -> tuple[dict[str, int], list[str]]:
    """Peak bytes per component on one card, FSDP sharding and the analytic terms included."""
    p, notes = t.peak, []
    lora = stage == "train" and getattr(cfg, "lora_r", 0) > 0
    params = p.get("param", 0) + p.get("buffer", 0)
    adapters = t.trainable_bytes if lora else 0
    comp = {
        "weights": params - adapters,
        "adapters": adapters,
        "gradients": p.get("grad", 0),
        "optimizer_states": p.get("opt", 0),
        "logits_head_chunk": t.head_at_peak,
        "activations": p.get("act", 0) + p.get("temp", 0) + p.get("oth", 0) - t.head_at_peak,
    }
    w = shape.world_size
    if w > 1:
        gathered = max(2 * t.block_bytes, t.block_bytes + t.head_bytes)
        for key in ("weights", "adapters", "gradients", "optimizer_states"):
            comp[key] = -(-comp[key] // w)
        comp["weights"] += gathered
        if stage == "train":
            comp["gradients"] += t.block_bytes
        notes.append(f"FSDP over {w} processes: weights, adapters, gradients and optimizer states are 1/{w} "
                     f"per card, plus {memory.fmt_bytes(gathered)} of unsharded parameters (two blocks, or a "
                     "block and the head, gathered at once) and, in training, one block's unsharded gradient "
                     "before its reduce-scatter; the peak is that of one card's share over the traced step, "
                     "activations per process as traced")
    tracked = sum(comp.values())
    comp["allocator_slack"] = int(memory.ALLOCATOR_SLACK * tracked)
    comp["cuda_context_workspace"] = memory.context_bytes()
    return {k: int(comp[k]) for k in COMPONENTS}, notes


@dataclass
class Plan:
    stage: str
    device: str
    device_bytes: int
    components: dict[str, int]
    tracked_peak: int
    """Bytes torch.cuda.max_memory_allocated should report (everything but slack and context)."""
    total: int
    fits: bool
    """total + reserve <= device_bytes: the plan fits with the stated headroom kept free."""
    headroom: int
    """device_bytes - total: what the plan leaves free."""
    settings: dict[str, Any]
    largest: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reserve: int = 0
    """The headroom the fit keeps free (memory.HEADROOM of the card)."""
    recipes: list[dict[str, Any]] = field(default_factory=list)
    """When the settings do not fit (train): the cheapest recipes that do, each a ready command with its planned
    total (pipeline.plan.recipes)."""
    recipe_method: str = ""


CUDA_NOTES = (
    "traced on CPU fake tensors: CUDA's flash/memory-efficient attention keeps no [S, S] scores, as the fused CPU "
    "kernel traced here; cuBLAS workspaces and the CUDA context are the stated allowance; the caching allocator's "
    "rounding and fragmentation the stated slack",
)


def make_plan(stage: str, cfg: Any, shape: Shape, device_bytes: int, device: str, reserve: int | None = None) -> Plan:
    """The plan of one setting on ``device_bytes``; it fits when ``reserve`` (default: the stated headroom of a
    card of ``device_bytes``) stays free."""
    t0 = time.perf_counter()
    reserve = memory.headroom_bytes(device_bytes) if reserve is None else int(reserve)
    t, method = full_trace(stage, cfg, shape)
    comp, notes = components(stage, cfg, t, shape)
    tracked = sum(v for k, v in comp.items() if k not in ("allocator_slack", "cuda_context_workspace"))
    total = sum(comp.values())
    if getattr(cfg, "load_in_4bit", False):
        notes.append("4-bit: block projections as NF4 (bitsandbytes packing: n/2 bytes of codes, double-quantized "
                     "absmax per 64 values), dequantized per call to a transient bf16 weight")
    return Plan(stage=stage, device=device, device_bytes=device_bytes, components=comp, tracked_peak=tracked,
                total=total, fits=total + reserve <= device_bytes, headroom=device_bytes - total,
                settings=_settings(stage, cfg, shape), method=method, notes=list(t.notes) + notes + list(CUDA_NOTES),
                seconds=time.perf_counter() - t0, reserve=reserve)


def _settings(stage: str, cfg: Any, shape: Shape) -> dict[str, Any]:
    keys = ("model", "dtype", "mixed_precision", "load_in_4bit", "lora_r", "gradient_checkpointing", "batch_size",
            "batch_tokens", "sequence_microbatch", "reference", "grad_accum", "gen_length", "block_length",
            "cfg_scale")
    out = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    out.update(samples=shape.samples, max_length=shape.max_length, prompt_length=shape.prompt_length,
               world_size=shape.world_size)
    return out


# --- the largest settings that fit --------------------------------------------------------


@dataclass
class Knob:
    name: str
    current: int
    lo: int
    hi: int
    step: int
    apply: Callable[[int], tuple[Any, Shape]]


def knobs(stage: str, cfg: Any, shape: Shape) -> list[Knob]:
    """What the plan searches, one at a time with everything else fixed."""
    def with_cfg(name):
        return lambda v: (dataclasses.replace(cfg, **{name: v}), shape)

    def with_length(v):
        prompt = min(shape.prompt_length, v // 2)
        new = dataclasses.replace(shape, max_length=v, prompt_length=prompt)
        if stage == "score-ref":
            return dataclasses.replace(cfg, max_length=v, batch_tokens=max(cfg.batch_tokens, v)), new
        return cfg, new

    limit = _model_config(stage, cfg).max_sequence_length
    out = []
    if stage in ("score-ref", "train"):
        out.append(Knob("batch_tokens", cfg.batch_tokens, shape.max_length, 1 << 20, 256, with_cfg("batch_tokens")))
        out.append(Knob("max_length", shape.max_length, 64, limit, 64, with_length))
    if stage == "train":
        rows = 2 * shape.samples * cfg.batch_size
        current = cfg.sequence_microbatch or rows
        out.insert(1, Knob("sequence_microbatch", current, 1, rows, 1,
                           lambda v: (dataclasses.replace(cfg, sequence_microbatch=0 if v >= rows else v), shape)))
    if stage == "generate":
        out.append(Knob("batch_size", cfg.batch_size, 1, 4096, 1, with_cfg("batch_size")))
    return out


def _need(stage, cfg, shape) -> int:
    t, _ = full_trace(stage, cfg, shape)
    return sum(components(stage, cfg, t, shape)[0].values())


def largest(stage: str, cfg: Any, shape: Shape, device_bytes: int, current_total: int,
            evaluations: int = 3, reserve: int | None = None
            ) -> dict[str, dict[str, Any]]:
    """Per knob, the largest value on its grid whose plan fits with ``reserve`` (default: the stated headroom)
    kept free, in a few traces: the plan is taken as affine in the knob through the two latest traced points,
    the value where it meets the usable memory is traced, and the bracket of largest-fitting and
    smallest-failing values narrows until the traces are spent."""
    reserve = memory.headroom_bytes(device_bytes) if reserve is None else int(reserve)
    device_bytes -= reserve  # what the advice may fill
    out: dict[str, dict[str, Any]] = {}
    for knob in knobs(stage, cfg, shape):
        points = [(knob.current, current_total)]
        x1 = knob.current * 2 if current_total <= device_bytes else knob.current // 2
        x1 = max(knob.lo, min(knob.hi, x1 // knob.step * knob.step))
        if x1 != knob.current:
            points.append((x1, _need(stage, *knob.apply(x1))))
        for _ in range(evaluations - 1):
            fit = [x for x, m in points if m <= device_bytes]
            fail = [x for x, m in points if m > device_bytes]
            lo_fit, hi_fail = max(fit, default=knob.lo - 1), min(fail, default=knob.hi + 1)
            (xa, ma), (xb, mb) = sorted(points[-2:]) if len(points) > 1 else (points[0], points[0])
            slope = (mb - ma) / (xb - xa) if xb != xa else 0.0
            guess = knob.hi if slope <= 0 else int(xa + (device_bytes - ma) / slope)
            guess = max(knob.lo, min(knob.hi, guess // knob.step * knob.step))
            if guess >= hi_fail:
                guess = (hi_fail - knob.step) // knob.step * knob.step
            if guess <= lo_fit or guess in dict(points):
                break
            points.append((guess, _need(stage, *knob.apply(guess))))
        fit = {x: m for x, m in points if m <= device_bytes}
        best = max(fit, default=None)
        out[knob.name] = {"value": best, "total": fit.get(best), "at_limit": best == knob.hi,
                          "traced": sorted(x for x, _ in points)}
    return out
