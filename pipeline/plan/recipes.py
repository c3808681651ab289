"""When a train plan does not fit: the cheapest recipes that do, searched on an analytic estimate.

The recipe space: LoRA (rank 16, or the user's), 4-bit base weights, gradient
checkpointing, bf16 (bfloat16 weights and autocast), the micro-batch
(``--batch-size 1`` with ``--grad-accum`` raised to keep the pairs per step),
the sequence micro-batch (rows in flight) and the planned max length. A
real-tensor trace of an 8B model takes seconds (tens at small sequence
micro-batches), so the search does not trace each recipe: it estimates each
one analytically and calibrates the estimate by the plan's own trace of the
user's settings, then the cheapest recipe found is traced as ``plan`` traces
any setting (halving its sequence micro-batch until the trace fits), so the
first suggestion's total is the plan's own.

The estimate, per component (what ``estimate.components`` reports):

- weights, adapters, gradients, optimizer states: exact parameter accounting
  on the model built on ``meta`` (NF4 bytes for the 4-bit block projections,
  float32 adapters, AdamW's two states per trainable parameter, and every
  gradient counted: the peak may fall before some exist);
- activations: per token of every row in flight and per block, ``ACT_UNITS``
  hidden-size vectors (attention inputs and outputs, q/k/v, norms, SwiGLU)
  without checkpointing; with it, one residual-stream vector per block (the
  checkpoint) plus one block recomputed; scaled by the ratio of the trace's
  activations to this estimate at the user's settings (the calibration);
- the logits head chunk: the trace's, scaled by the masked positions a
  chunk holds (at most ``scoring``'s 4,096 rows) and by the bytes of a logit
  in the compute dtype plus its float32 copy;
- slack and the CUDA context as ``estimate.components`` adds them.

"Cheapest" is what the recipe gives up, in ``COSTS`` order: rows in flight and
the micro-batch (same result, more passes) before checkpointing (about a third
more compute) before bf16 (numerics) before LoRA (capacity) before 4-bit
(quantized base) before a shorter max length (truncated pairs).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.plan import memory

COSTS = {"sequence_microbatch": 1.0, "gradient_checkpointing": 1.5, "bf16": 3.0, "lora": 4.0,
         "load_in_4bit": 5.0, "max_length": 8.0}
"""What each change gives up (rows in flight and max length: per halving), for ranking recipes: cheapest first."""
ACT_UNITS = 22.0
"""Hidden-size vectors a LLaDA block keeps per token for its backward pass without checkpointing: the two norms'
inputs and outputs (4), q, k, v, the attention output and the output projection's input (5), the MLP's input (1)
and SwiGLU's gate, up, activated gate and product at mlp_hidden = 3 x hidden (12): the estimate's structure, its
scale set by the calibration (close to 1 on LLaDA-8B's shape in float32)."""
HEAD_CHUNK_ROWS = 4096
"""Masked positions per logits chunk (pipeline.models.scoring.score_tokens' chunk_size)."""
MASKED_SHARE = 0.5
"""Expected share of response positions masked (t ~ U(0, 1))."""


@dataclass
class Recipe:
    changes: dict[str, Any]
    """Train settings changed from the user's (field: value)."""
    max_length: int
    cost: float
    estimate: int
    """Planned total bytes (analytic, calibrated)."""
    total: int | None = None
    """The plan's own total (traced), for the recipe that was traced."""
    flags: list[str] = field(default_factory=list)

    def command(self, model: str, extra: list[str]) -> str:
        return " ".join(["lldm-dpo train", *(["--model", model] if model else []), *self.flags, *extra])


def _param_counts(cfg) -> dict[str, Any]:
    """Parameters of the whole model by kind, counted on a 1-block meta build (blocks are identical)."""
    from pipeline.models import LORA_TARGET_MODULES
    from pipeline.plan.trace import build_model, model_config

    config = model_config(str(cfg.model))
    model = build_model(str(cfg.model), "float32", fake=True, layers=1)
    pattern = re.compile(LORA_TARGET_MODULES)
    targets = [(m.in_features, m.out_features) for n, m in model.named_modules()
               if pattern.fullmatch(n) and hasattr(m, "in_features")]
    block = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n)
    other = sum(p.numel() for n, p in model.named_parameters() if ".blocks." not in n)
    n = config.n_layers
    return {"layers": n, "hidden": config.d_model, "targets": targets * n, "block": block,
            "block_linear": sum(i * o for i, o in targets) * n, "total": block * n + other}


def static_bytes(counts, lora_r: int, four_bit: bool, bf16: bool) -> dict[str, int]:
    wbytes = 2 if bf16 or four_bit else 4
    if four_bit:
        weights = sum(memory.nf4_bytes(i * o) for i, o in counts["targets"])
        weights += 2 * (counts["total"] - counts["block_linear"])
    else:
        weights = wbytes * counts["total"]
    if lora_r > 0:
        trainable = 4 * lora_r * sum(i + o for i, o in counts["targets"])
        adapters = trainable
    else:
        trainable, adapters = wbytes * counts["total"], 0
    return {"weights": weights, "adapters": adapters, "gradients": trainable, "optimizer_states": 2 * trainable}


def body_units(counts, *, gc: bool, residual: int, act: int) -> float:
    """Activation bytes per token of one row in flight, over the whole body (before calibration)."""
    n, d = counts["layers"], counts["hidden"]
    return d * ((n * residual + ACT_UNITS * act) if gc else n * ACT_UNITS * act)


def _numbers(cfg) -> tuple[bool, int, int]:
    """(bf16, residual-stream bytes, activation bytes) of a train config."""
    bf16 = cfg.dtype == "bfloat16" or cfg.load_in_4bit
    autocast = cfg.mixed_precision in ("bf16", "fp16") or bf16
    residual = 4 if cfg.load_in_4bit or cfg.dtype != "bfloat16" else 2  # k-bit prep keeps the norms in float32
    return bf16, residual, 2 if autocast else 4


def _head_positions(rows: int, response: int) -> float:
    return min(HEAD_CHUNK_ROWS, rows * response * MASKED_SHARE)


def search(cfg, shape, plan, device_bytes: int, reserve: int, top: int = 3) -> tuple[list[Recipe], str]:
    """The ``top`` cheapest recipes whose estimate fits ``device_bytes`` less ``reserve`` (and how it was
    estimated); ``plan`` is the traced plan of ``cfg`` (the calibration)."""
    counts = _param_counts(cfg)
    usable = device_bytes - reserve
    rows0 = 2 * shape.samples * cfg.batch_size
    k0 = cfg.sequence_microbatch or rows0
    bf16_0, res0, act0 = _numbers(cfg)
    body0 = body_units(counts, gc=cfg.gradient_checkpointing, residual=res0, act=act0) * k0 * shape.max_length
    traced = plan.components
    scale = traced["activations"] / body0 if body0 else 1.0
    head0 = traced["logits_head_chunk"] / max(_head_positions(k0, shape.response_length), 1.0)
    loras = [cfg.lora_r] if cfg.lora_r > 0 else [0, 16]
    lengths = [shape.max_length] + [x for x in (shape.max_length // 2, shape.max_length // 4)
                                    if x >= 64 and x > shape.prompt_length // 2]
    found: list[Recipe] = []
    for lora_r, four, bf16, gc, length in itertools.product(
            loras, (False, True), (bf16_0, True), (cfg.gradient_checkpointing, True), lengths):
        if four and (lora_r == 0 or not bf16):
            continue
        four = four or bool(cfg.load_in_4bit)
        changes: dict[str, Any] = {}
        cost = 0.0
        if lora_r != cfg.lora_r:
            changes["lora_r"], cost = lora_r, cost + COSTS["lora"]
        if four != bool(cfg.load_in_4bit):
            changes["load_in_4bit"], cost = True, cost + COSTS["load_in_4bit"]
        if bf16 != bf16_0:
            changes.update(dtype="bfloat16", mixed_precision="bf16")
            cost += COSTS["bf16"]
        if gc != cfg.gradient_checkpointing:
            changes["gradient_checkpointing"], cost = True, cost + COSTS["gradient_checkpointing"]
        cost += COSTS["max_length"] * (0 if length == shape.max_length else 1 if length == shape.max_length // 2
                                       else 2)
        trial = dataclasses.replace(cfg, lora_r=lora_r, load_in_4bit=four, gradient_checkpointing=gc,
                                    **({"dtype": "bfloat16", "mixed_precision": "bf16"} if bf16 and not bf16_0
                                       else {}))
        static = sum(static_bytes(counts, lora_r, four, bf16).values())
        if shape.world_size > 1:  # FSDP as estimate.components shards: 1/w, plus two gathered blocks and a gradient
            block = counts["block"] * (2 if bf16 or four else 4)
            static = static / shape.world_size + 3 * block
        _, res, act = _numbers(trial)
        response = length - min(shape.prompt_length, length // 2)
        for k, micro in in_flight(cfg, shape.samples, k0):
            dynamic = scale * body_units(counts, gc=gc, residual=res, act=act) * k * length
            dynamic += head0 * _head_positions(k, response) * (act + 4) / (act0 + 4)
            total = int((static + dynamic) * (1 + memory.ALLOCATOR_SLACK)) + memory.context_bytes()
            if total <= usable:
                extra = {**changes, **micro}
                halvings = (k0 // k).bit_length() - 1
                recipe = Recipe(extra, length, cost + COSTS["sequence_microbatch"] * halvings, total)
                recipe.flags = flags(extra, length if length != shape.max_length else None)
                found.append(recipe)
                break
    found.sort(key=lambda r: (r.cost, r.estimate))
    method = ("analytic estimate calibrated by this plan's trace (activations x "
              f"{scale:.2f} of the structural estimate), {len(found)} of the searched recipes fit")
    return found[:top], method


def in_flight(cfg, samples: int, k0: int):
    """(rows in flight, the settings that give it), largest first, halving from the user's ``k0``: whole pairs
    as a smaller micro-batch (``--batch-size`` down, ``--grad-accum`` up: the same pairs per step) while a
    micro-batch holds whole pairs, then ``--sequence-microbatch`` within one pair's 2n rows."""
    per_pair = 2 * samples
    k = k0
    while k >= 1:
        if k >= per_pair and k % per_pair == 0 and cfg.batch_size % (k // per_pair) == 0:
            batch = k // per_pair
            micro = {} if batch == cfg.batch_size and not cfg.sequence_microbatch else {
                "batch_size": batch, "grad_accum": cfg.grad_accum * cfg.batch_size // batch, "sequence_microbatch": 0}
        elif k < per_pair:
            micro = {"batch_size": 1, "grad_accum": cfg.grad_accum * cfg.batch_size, "sequence_microbatch": k}
        else:  # more rows than a pair holds, not in whole pairs of the micro-batch: not offered
            k //= 2
            continue
        yield k, {key: v for key, v in micro.items() if getattr(cfg, key) != v}
        k //= 2


def flags(changes: dict[str, Any], max_length: int | None) -> list[str]:
    """The train (and plan) flags of a recipe's changes."""
    out = []
    for key in ("lora_r", "load_in_4bit", "gradient_checkpointing", "dtype", "mixed_precision", "batch_size",
                "grad_accum", "sequence_microbatch"):
        if key not in changes:
            continue
        value, flag = changes[key], "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    if max_length is not None:
        out += ["--max-length", str(max_length)]
    return out


def verify(cfg, shape, recipe: Recipe, device_bytes: int, device: str, reserve: int, tries: int = 3):
    """Trace the recipe as ``plan`` would; while it does not fit, halve its rows in flight (``in_flight``).
    Returns the recipe (its ``total`` the traced one) and the traced plan."""
    from pipeline.plan.estimate import make_plan

    length = recipe.max_length
    trial_shape = dataclasses.replace(shape, max_length=length, prompt_length=min(shape.prompt_length, length // 2))
    k0 = cfg.sequence_microbatch or 2 * shape.samples * cfg.batch_size
    for _ in range(tries):
        trial = dataclasses.replace(cfg, **recipe.changes)
        plan = make_plan("train", trial, trial_shape, device_bytes, device, reserve)
        recipe.total = plan.total
        k = trial.sequence_microbatch or 2 * shape.samples * trial.batch_size
        smaller = next(((kk, micro) for kk, micro in in_flight(cfg, shape.samples, k0) if kk < k), None)
        if plan.fits or smaller is None:
            return recipe, plan
        base = {key: v for key, v in recipe.changes.items()
                if key not in ("batch_size", "grad_accum", "sequence_microbatch")}
        recipe.changes = {**base, **smaller[1]}
        recipe.cost += COSTS["sequence_microbatch"] * ((k // smaller[0]).bit_length() - 1)
        recipe.flags = flags(recipe.changes, length if length != shape.max_length else None)
    return recipe, plan
