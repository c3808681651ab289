"""A gain pooled over training seeds, with an interval that covers seed and question randomness.

Pure functions, no I/O. The data: for each seed s (one run of everything stochastic: pairs sampling, mask
draws, data order) and each held-out item i, ``delta[s][i]`` = after - before (each 1 or 0, so -1, 0 or
+1), or any paired per-item difference (DPO+NLL's correct minus RFT's on the same seed). Items are grouped
into *problems* (``groups[i]``): held-out questions that are one problem under different names (the `skill`
benchmark's 1,000 questions are 573 problems; two questions of one problem agree on correctness far more
often than two others), so resampling items would treat near-copies as independent and make the interval
too narrow.

The interval is a two-level percentile bootstrap: each replicate draws S seeds with replacement from the S
seeds and P problems with replacement from the P problems; its statistic is the mean over the drawn seeds of
that seed's mean delta over the items of the drawn problems (a problem drawn twice counts its items twice).
Seeds and problems are *crossed* (every seed is evaluated on the same problems), so one replicate's problem
draw is shared by all its seeds: the problem-to-problem variation does not average away over seeds, as it
would not in a new run on new questions. With few seeds (3) the seed level of the bootstrap is coarse (a
bootstrap over S values understates their variance by (S - 1) / S); the per-seed figures are reported
beside it.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np


def group_index(keys: Sequence[Hashable]) -> list[int]:
    """Each item's problem as 0..P-1, in order of first appearance."""
    seen: dict[Hashable, int] = {}
    return [seen.setdefault(k, len(seen)) for k in keys]


def problem_totals(delta: Sequence[Sequence[float]], groups: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(sums Float[S, P]: per seed the sum of delta over each problem's items, counts Float[P]: items per problem)."""
    d = np.asarray(delta, dtype=float)
    if d.ndim != 2 or d.shape[0] < 1:
        raise ValueError(f"delta must be seeds x items, got shape {d.shape}")
    g = np.asarray(groups, dtype=int)
    if g.shape != (d.shape[1],):
        raise ValueError(f"groups has {g.size} entries for {d.shape[1]} items")
    if g.size == 0 or g.min() < 0:
        raise ValueError("groups must be non-negative problem indices, one per item")
    n_problems = int(g.max()) + 1
    sums = np.zeros((d.shape[0], n_problems))
    for s in range(d.shape[0]):
        sums[s] = np.bincount(g, weights=d[s], minlength=n_problems)
    counts = np.bincount(g, minlength=n_problems).astype(float)
    return sums, counts


def replicate_statistic(sums: np.ndarray, counts: np.ndarray, seed_draw: Sequence[int],
                        problem_weights: np.ndarray) -> float:
    """One replicate: the mean over ``seed_draw`` of sum_p w_p sums[s, p] / sum_p w_p counts[p], where
    ``problem_weights`` w_p is how many times problem p was drawn."""
    w = np.asarray(problem_weights, dtype=float)
    per_seed = sums[list(seed_draw)] @ w / (counts @ w)
    return float(per_seed.mean())


def pooled_gain(delta: Sequence[Sequence[float]], groups: Sequence[int], *, reps: int = 4000, seed: int = 0,
                confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``delta`` over seeds and items, its seeds' spread, and the two-level bootstrap interval.

    Returns ``mean`` (the mean over seeds of each seed's mean delta), ``per_seed`` (those means), ``sd_seeds``
    (their sample standard deviation, 0 with one seed), ``low``/``high`` (the percentile interval at
    ``confidence``), ``seeds``, ``items``, ``problems``, ``reps`` and ``method``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    sums, counts = problem_totals(delta, groups)
    n_seeds, n_problems = sums.shape
    per_seed = sums.sum(1) / counts.sum()
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(reps, n_seeds))
    problem_draws = rng.integers(0, n_problems, size=(reps, n_problems))
    weights = np.stack([np.bincount(row, minlength=n_problems) for row in problem_draws]).astype(float)
    # per replicate and seed: the drawn problems' delta over their items
    ratio = (sums @ weights.T) / (weights @ counts)[None, :]  # [S, reps]
    stats = ratio[seed_draws.T, np.arange(reps)[None, :]].mean(0)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return {"mean": float(per_seed.mean()), "per_seed": [float(x) for x in per_seed],
            "sd_seeds": float(per_seed.std(ddof=1)) if n_seeds > 1 else 0.0,
            "low": float(low), "high": float(high), "seeds": n_seeds, "items": int(counts.sum()),
            "problems": n_problems, "reps": reps, "confidence": confidence,
            "method": "bootstrap over seeds and problems (crossed: one problem draw per replicate)"}


def within_problem_agreement(correct: Sequence[bool], groups: Sequence[int]) -> float | None:
    """The share of pairs of items of one problem that agree (both right or both wrong); None with no such pair."""
    by_problem: dict[int, list[bool]] = {}
    for c, g in zip(correct, groups):
        by_problem.setdefault(int(g), []).append(bool(c))
    agree = pairs = 0
    for values in by_problem.values():
        k, n = sum(values), len(values)
        agree += k * (k - 1) // 2 + (n - k) * (n - k - 1) // 2
        pairs += n * (n - 1) // 2
    return agree / pairs if pairs else None
