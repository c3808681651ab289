"""Exact sampler vs Fast-dLLM's settings (KV cache, threshold decoding): tokens/s and greedy task accuracy.

Shared by ``bench/sampler.py --mode fast`` (a model on real questions) and
``bench/gpu.py``'s ``sampler`` section (LLaDA-8B's shape). Every setting
samples the same prompts with the same model in the same process; speed-ups
are against the exact sampler measured in the same run.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch

SETTINGS: list[tuple[str, str, float | None]] = [
    ("exact", "none", None),
    ("prefix", "prefix", None),
    ("dual", "dual", None),
    ("threshold 0.9", "none", 0.9),
    ("prefix + 0.9", "prefix", 0.9),
    ("dual + 0.9", "dual", 0.9),
]
"""(label, cache, threshold): exact is the reference and comes first."""


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion k/n (n = 0: the whole [0, 1])."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def count_passes(model) -> Callable[[], int]:
    """Wrap the model's sampler entry points to count forward passes; returns a reader of the count."""
    counter = {"n": 0}
    for name in ("final_hidden", "hidden_with_kv"):
        original = getattr(model, name, None)
        if callable(original):
            def wrapped(*args, _f=original, **kwargs):
                counter["n"] += 1
                return _f(*args, **kwargs)
            setattr(model, name, wrapped)
    return lambda: counter["n"]


def compare(sample: Callable[[str, float | None], list], gen_length: int, n_prompts: int,
            grade: Callable[[list], list[bool]] | None = None, passes: Callable[[], int] | None = None,
            sync: Callable[[], None] = lambda: None, settings: Sequence[tuple[str, str, float | None]] = SETTINGS,
            repeats: int = 1) -> list[dict[str, Any]]:
    """Run ``sample(cache, threshold)`` (-> one output per prompt) for every setting; one row each.

    ``repeats`` rounds over all settings in turn (interleaved, so a load change hits every setting alike);
    each keeps its fastest round. Rows: label, cache, threshold, seconds, tokens_per_second, speedup (vs
    exact), passes (per round), same_as_exact (share of prompts whose output equals the exact sampler's),
    and with ``grade`` correct, n, accuracy and its Wilson interval.
    """
    outputs: dict[str, list] = {}
    seconds: dict[str, float] = {}
    counted: dict[str, int] = {}
    for _ in range(max(1, repeats)):
        for label, cache, threshold in settings:
            before = passes() if passes else 0
            sync()
            t0 = time.perf_counter()
            out = sample(cache, threshold)
            sync()
            seconds[label] = min(seconds.get(label, float("inf")), time.perf_counter() - t0)
            outputs.setdefault(label, out)
            counted[label] = (passes() if passes else 0) - before
    exact = outputs[settings[0][0]]
    rows: list[dict[str, Any]] = []
    for label, cache, threshold in settings:
        out = outputs[label]
        row: dict[str, Any] = {"label": label, "cache": cache, "threshold": threshold,
                               "seconds": round(seconds[label], 3),
                               "tokens_per_second": round(n_prompts * gen_length / seconds[label], 2),
                               "repeats": max(1, repeats)}
        if passes:
            row["passes"] = counted[label]
        row["same_as_exact"] = round(sum(a == b for a, b in zip(out, exact)) / max(1, len(out)), 4)
        if grade is not None:
            verdicts = grade(out)
            k, n = sum(verdicts), len(verdicts)
            lo, hi = wilson(k, n)
            row.update(correct=k, n=n, accuracy=round(k / n, 4) if n else 0.0, interval=[round(lo, 4), round(hi, 4)])
        rows.append(row)
    base = rows[0]["tokens_per_second"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_second"] / base, 2)
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest setting whose accuracy lies inside the exact sampler's 95% interval (or, ungraded, any)."""
    lo, hi = rows[0].get("interval", [0.0, 1.0])
    inside = [r for r in rows[1:] if "accuracy" not in r or lo <= r["accuracy"] <= hi]
    return max(inside, key=lambda r: r["tokens_per_second"]) if inside else None


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        acc = ""
        if "accuracy" in r:
            acc = f"  accuracy {r['correct']}/{r['n']} = {r['accuracy']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
        passes = f"  passes {r['passes']:4d}" if "passes" in r else ""
        lines.append(f"{r['label']:14} {r['tokens_per_second']:9.1f} tokens/s  x{r['speedup']:5.2f}{passes}"
                     f"  same as exact {r['same_as_exact']:.3f}{acc}")
    return lines


@torch.no_grad()
def token_lists(out: torch.Tensor) -> list[list[int]]:
    return [row.tolist() for row in out.cpu()]
