"""The sampler's settings, declared once: ``SamplingArgs``, which generate's, make-pairs' and eval's configs extend.

Shaped like ``pipeline.trainer.args.TrainingArgs``: each field with its docstring (the flag's help and the stage
YAML's comment) and its interval in ``SAMPLING_RANGES``, checked once in ``__post_init__``. A stage redeclares a
field whose default or help is its own (make-pairs samples at temperature 0.7; eval generates 64 tokens). The
sampler (``pipeline.sampling.sampler.generate``) and the completion loop (``pipeline.sampling.completion``) take
one ``SamplingArgs`` (or a stage config extending it) rather than its fields one by one.

The KV-cache setting is ``kv_cache``; ``cache`` is its old name, still read from YAML and ``--cache`` (with a
note, pipeline/cli/trl_names.py) and from an earlier run's output rows, so that "cache" means the reference-score
cache alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from pipeline.core.config import check_ranges, require_choice
from pipeline.core.errors import ConfigError

SAMPLING_RANGES = {"gen_length": "[1, inf)", "block_length": "[1, inf)", "steps": "[1, inf)",
                   "temperature": "[0, inf)", "cfg_scale": "[0, inf)", "threshold": "(0, inf)",
                   "batch_size": "[1, inf)", "seed": "[0, inf)"}
"""The valid interval of every numeric sampling field; a stage's RANGES adds its own fields'."""

REMASKING = ("low_confidence", "random")
"""How the sampler picks the masked positions to commit: the most confident ones, or at random."""
KV_CACHE_MODES = ("none", "prefix", "dual")
"""The sampler's KV-cache modes: none (the exact sampler), Fast-dLLM's prefix and dual caches."""

OLD_NAMES = {"cache": "kv_cache"}
"""Former names of sampling fields -> the field: read from YAML, flags and earlier output rows."""


@dataclass
class SamplingArgs:
    gen_length: int = 128
    """Tokens generated per prompt."""
    block_length: int = 32
    """Semi-autoregressive block size; gen_length must be a multiple of it."""
    steps: int = 128
    """Sampling steps in all (one forward pass each), a multiple of gen_length / block_length."""
    temperature: float = 0.0
    """Gumbel-noise temperature; 0 is greedy and deterministic."""
    remasking: str = "low_confidence"
    """Which masked tokens to commit each step: low_confidence (most confident first) or random."""
    cfg_scale: float = 0.0
    """Classifier-free guidance scale; > 0 adds a pass with the prompt masked."""
    kv_cache: str = "none"
    """Sampler KV cache (Fast-dLLM's approximate one): none (exact), prefix or dual; native LLaDA models only,
    others take the exact path with a warning. Formerly `cache` (still accepted)."""
    threshold: Optional[float] = None
    """Parallel decoding: each step commits every masked position of the block whose confidence exceeds this,
    and at least its share of the steps; unset: the fixed schedule (the exact sampler)."""
    batch_size: int = 8
    """Prompts per forward pass (results do not depend on it)."""
    seed: int = 0
    """Seed of the per-prompt noise generators (used when temperature > 0 or remasking is random)."""

    def __post_init__(self, ranges: Mapping[str, str] = SAMPLING_RANGES) -> None:
        check_ranges(self, ranges)  # every numeric field's interval, from its one declaration
        config_error(check_schedule, self.gen_length, self.block_length, self.steps)
        require_choice("remasking", self.remasking, REMASKING)
        config_error(check_fast_settings, self.kv_cache, self.threshold, self.remasking)

    @classmethod
    def of(cls, source: Any, **changes: Any) -> "SamplingArgs":
        """The sampling fields of ``source`` (a stage config extending this class, or any object holding them)
        as a plain ``SamplingArgs``, with ``changes``."""
        return cls(**{**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.init}, **changes})


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingArgs))
"""The names of ``SamplingArgs``' fields."""


def sampling_args(args: SamplingArgs | None, settings: Mapping[str, Any]) -> SamplingArgs:
    """``args`` (default: ``SamplingArgs()``) with ``settings`` given as keywords (their old names too), for
    callers that set a few fields by name; a bad value is a ``ValueError`` (the sampler's own checks' kind)."""
    if not settings and args is not None:
        return args
    renamed = {OLD_NAMES.get(k, k): v for k, v in settings.items()}
    unknown = sorted(set(renamed) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampler setting(s) {', '.join(unknown)} (known: {', '.join(SAMPLING_FIELDS)})")
    try:
        return SamplingArgs.of(args if args is not None else SamplingArgs(), **renamed)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


# --- the sampler's checks (pure; ``ValueError`` with the numbers) ---------------------------------------


def check_schedule(gen_length: int, block_length: int, steps: int) -> None:
    """The published sampler's constraints, as ``ValueError`` with the numbers."""
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(
            f"gen_length, block_length and steps must be positive (got {gen_length}, {block_length}, {steps})"
        )
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {blocks} (gen_length / block_length)")


def check_fast_settings(kv_cache: str, threshold: float | None, remasking: str) -> None:
    """``ValueError`` for a KV-cache mode or threshold the sampler does not take."""
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_MODES)}, got {kv_cache!r}")
    if threshold is not None:
        if not 0 < threshold < float("inf"):
            raise ValueError(f"threshold must be a number > 0 (or unset for the fixed schedule), got {threshold}")
        if remasking != "low_confidence":
            raise ValueError("threshold decoding compares softmax confidences: it needs remasking low_confidence")


def config_error(check: Callable[..., None], *args: Any) -> None:
    """``check(*args)`` with its ``ValueError`` as a ``ConfigError`` (the sampler's checks as config errors)."""
    try:
        check(*args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
