"""Confidence intervals for accuracy-like figures: pure functions, no torch.

- ``wilson_interval(k, n)``: the Wilson score interval for a proportion k/n
  (Wilson 1927). Unlike the Wald interval p +- z*sqrt(p(1-p)/n) it never leaves
  [0, 1] and does not collapse to a point at 0/n or n/n, which matters on the
  16 to 200 items an evaluation here has.
- ``paired_difference_interval(before, after)``: the difference after - before
  of two accuracies measured on the same items, with Newcombe's hybrid score
  interval for paired proportions (Newcombe 1998, Statistics in Medicine 17:
  2635-2650, method 10; the "square-and-add" interval of Fagerland, Lydersen
  and Laake, Statistical Analysis of Contingency Tables, ch. 8).
- ``accuracy_record(k, n)``: the dict every accuracy is written as (value, count,
  n, 95% Wilson low/high), so eval.json, summaries, the report and ``query``
  all read the same fields.
- ``print_intervals``: eval's intervals block as plain console lines.

Credits may be fractional (preference accuracy gives a tie half a credit): a
proportion is then sum(credit)/n, and the paired table is built from the
per-item products (an item with credits b, a adds b*a to "both right",
b*(1-a) to "lost", (1-b)*a to "gained" and (1-b)(1-a) to "both wrong"), which
is the usual table when every credit is 0 or 1 and keeps the margins exact
otherwise.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable, Sequence

PAIRED_METHOD = "newcombe-paired-score"
"""The name written next to every paired interval (Newcombe 1998, method 10)."""

WILSON_METHOD = "wilson"


def _z(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + float(confidence) / 2.0)


def wilson_interval(k: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) for k successes out of n.

    ``k`` may be fractional (half credits for ties) but must lie in [0, n]. With
    ``n == 0`` nothing is known and the interval is the whole (0.0, 1.0).
    Bounds are clipped to [0, 1] against float rounding (at k = 0 the low bound
    is exactly 0, at k = n the high bound exactly 1).
    """
    z = _z(confidence)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    k = float(k)
    if not (math.isfinite(k) and 0.0 <= k <= n):
        raise ValueError(f"k must be in [0, n={n}], got {k!r}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _credits(values: Iterable, name: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        x = float(v)
        if not (0.0 <= x <= 1.0):
            raise ValueError(f"{name}[{i}] must be a credit in [0, 1] (bool or 0/0.5/1), got {v!r}")
        out.append(x)
    return out


def paired_difference_interval(before_correct: Sequence, after_correct: Sequence,
                               confidence: float = 0.95) -> dict:
    """The difference after - before of two accuracies on the same items, with its interval.

    ``before_correct[i]`` and ``after_correct[i]`` are the credits (bool, or 0 /
    0.5 / 1) of item i before and after. Method: Newcombe's hybrid score
    interval for paired proportions (1998, method 10), chosen over a paired
    bootstrap because it is deterministic (no seed, the same figures on every
    machine), is defined with good coverage on the small samples an evaluation
    here has (a bootstrap on 16 items with 2 discordant ones is degenerate), and
    uses the pairing: the Wilson intervals of both accuracies are combined with
    the correlation phi of the 2x2 table (Newcombe's continuity-corrected form:
    phi is shrunk by n/2 toward 0 and set to 0 when the table has an empty
    margin). The interval always lies in [-1, 1] and contains the difference.

    Returns ``{"difference", "low", "high", "confidence", "method", "n",
    "before", "after", "gained", "lost", "both", "neither"}`` where ``before``
    and ``after`` are the two accuracies, ``gained`` the (credit-weighted)
    number of items wrong before and right after, ``lost`` the reverse.
    """
    _z(confidence)
    z_conf = float(confidence)
    b = _credits(before_correct, "before_correct")
    a = _credits(after_correct, "after_correct")
    if len(a) != len(b):
        raise ValueError(f"paired items differ in number: {len(b)} before, {len(a)} after")
    n = len(a)
    both = sum(x * y for x, y in zip(b, a))
    lost = sum(x * (1 - y) for x, y in zip(b, a))
    gained = sum((1 - x) * y for x, y in zip(b, a))
    neither = sum((1 - x) * (1 - y) for x, y in zip(b, a))
    out = {"difference": 0.0, "low": -1.0, "high": 1.0, "confidence": z_conf, "method": PAIRED_METHOD,
           "n": n, "before": 0.0, "after": 0.0, "gained": gained, "lost": lost, "both": both, "neither": neither}
    if n == 0:
        return out
    k_after, k_before = both + gained, both + lost
    p1, p2 = k_after / n, k_before / n
    l1, u1 = wilson_interval(min(k_after, n), n, confidence)
    l2, u2 = wilson_interval(min(k_before, n), n, confidence)
    diff = p1 - p2
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    cross = both * neither - gained * lost
    shrunk = cross - n / 2 if cross > n / 2 else 0.0 if cross >= 0 else cross  # the continuity correction
    phi = shrunk / math.sqrt(margins) if margins > 0 else 0.0
    d_low = (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
    d_high = (u1 - p1) ** 2 + (p2 - l2) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
    low = diff - math.sqrt(max(d_low, 0.0))
    high = diff + math.sqrt(max(d_high, 0.0))
    out.update(difference=diff, low=max(-1.0, min(low, diff)), high=min(1.0, max(high, diff)),
               before=p2, after=p1)
    return out


def accuracy_record(k: float, n: int, confidence: float = 0.95) -> dict:
    """One accuracy as written everywhere: ``{"value", "count", "n", "low", "high", "confidence", "method"}``.

    ``value`` is k/n (NaN-free: 0 items gives value None), ``count`` the number
    of credited items k (may be fractional with half credits), ``low``/``high``
    the Wilson interval.
    """
    low, high = wilson_interval(k, n, confidence)
    return {"value": (float(k) / n) if n else None, "count": float(k) if k != int(k) else int(k), "n": int(n),
            "low": low, "high": high, "confidence": float(confidence), "method": WILSON_METHOD}


def credits_record(credits: Sequence, confidence: float = 0.95) -> dict:
    """``accuracy_record`` of per-item credits (bool or 0 / 0.5 / 1)."""
    c = _credits(credits, "credits")
    return accuracy_record(sum(c), len(c), confidence)


FEW_PAIRS = 50
"""Below this many pairs an accuracy's 95% interval is wider than about +-0.14: said in a warning."""


def few_items_warning(figure: str, rec: dict, what: str) -> str | None:
    """The warning line for an accuracy resting on fewer than FEW_PAIRS items (None otherwise): how many, and
    how wide its interval is."""
    n = int(rec.get("n") or 0)
    if not n or n >= FEW_PAIRS:
        return None
    return (f"warning: {figure} rests on {n} {what} (fewer than {FEW_PAIRS}): its 95% interval "
            f"{rec['low']:.2f}-{rec['high']:.2f} is too wide to tell small changes apart")


def format_accuracy(rec: dict, digits: int = 3) -> str:
    """``0.250 (8/32, 95% CI 0.133-0.418)``: the one console form of an accuracy record."""
    if rec.get("value") is None:
        return "n/a (0 items)"
    count = rec["count"]
    count_s = f"{count:g}" if isinstance(count, float) else str(count)
    pct = round(100 * rec.get("confidence", 0.95))
    return (f"{rec['value']:.{digits}f} ({count_s}/{rec['n']}, {pct}% CI "
            f"{rec['low']:.{digits}f}-{rec['high']:.{digits}f})")


def format_difference(rec: dict, digits: int = 3) -> str:
    """``+0.125 (95% CI -0.040 to +0.281, paired, 5 gained / 1 lost of 32)``."""
    pct = round(100 * rec.get("confidence", 0.95))

    def num(x):
        return f"{x:g}" if isinstance(x, float) and x != int(x) else str(int(x))

    return (f"{rec['difference']:+.{digits}f} ({pct}% CI {rec['low']:+.{digits}f} to {rec['high']:+.{digits}f}, "
            f"{rec['method']}, {num(rec['gained'])} gained / {num(rec['lost'])} lost of {rec['n']})")


FIGURE_LABELS = {
    "preference_accuracy": "preference accuracy",
    "elbo_accuracy": "ELBO accuracy (B(chosen) > B(rejected))",
    "task_accuracy": "task accuracy (generation)",
    "working_accuracy": "task accuracy, answer and working right (the verifier's)",
    "choice_accuracy": "multiple-choice accuracy (option ELBO)",
}
"""Display names of eval's figures in the console; other figures show their own key."""


def print_intervals(intervals: dict, mc_spread: dict | None = None, title: str = "accuracy with 95% intervals") -> None:
    """The intervals block as plain lines (not wrapped): per figure before, after and after - before (paired)."""
    if not intervals:
        return
    print(f"{title}:")
    for name, rec in intervals.items():  # every accuracy with its count and interval, the paired difference
        print(f"  {FIGURE_LABELS.get(name, name)}")
        for label, key, show in (("before", "before", format_accuracy), ("after", "after", format_accuracy),
                                 ("after - before", "difference", format_difference)):
            if rec.get(key):
                print(f"    {label:15} {show(rec[key])}")
    for figure, by_label in (mc_spread or {}).items():
        for label, sp in by_label.items():
            print(f"  {figure} ({label}) over {len(sp['seeds'])} mask seeds: mean {sp['mean']:.3f}, "
                  f"sd {sp['sd']:.3f}, min {sp['min']:.3f}, max {sp['max']:.3f}")
