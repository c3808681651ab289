"""pipeline.evaluation.intervals against published and hand-worked values."""

import math

import pytest

from pipeline.evaluation.intervals import (
    PAIRED_METHOD,
    accuracy_record,
    credits_record,
    format_accuracy,
    format_difference,
    paired_difference_interval,
    wilson_interval,
)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857, Table II,
# method 3 (Wilson score, no continuity correction).
@pytest.mark.parametrize("k,n,low,high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_published(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_hand_worked():
    # k = 0: low 0, high z^2 / (n + z^2); k = n mirrors it; k = n/2 is symmetric about 1/2.
    z = 1.959963984540054
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z * z / (10 + z * z)))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z * z)), 1.0)
    lo, hi = wilson_interval(8, 16)
    assert lo + hi == pytest.approx(1.0)
    # 2/4 by hand: centre 0.5, half = z*sqrt(1/16 + z^2/64) / (1 + z^2/4)
    half = z * math.sqrt(1 / 16 + z * z / 64) / (1 + z * z / 4)
    assert wilson_interval(2, 4) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    # a 99% interval is wider than a 95% one; half credits are accepted
    lo99, hi99 = wilson_interval(8, 16, confidence=0.99)
    assert lo99 < lo and hi99 > hi
    assert wilson_interval(0.5, 1)[0] > 0.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k,n,conf", [(5, 4, 0.95), (-1, 4, 0.95), (1, 4, 1.0), (1, 4, 0.0), (1, -1, 0.95),
                                      (float("nan"), 4, 0.95), (1, 2.5, 0.95)])
def test_wilson_rejects(k, n, conf):
    with pytest.raises(ValueError):
        wilson_interval(k, n, conf)


def _table(both, gained, lost, neither):
    before = [1] * both + [0] * gained + [1] * lost + [0] * neither
    after = [1] * both + [1] * gained + [0] * lost + [0] * neither
    return before, after


def test_paired_published_cavo():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables, ch. 8 (Cavo et al. 2012):
    # table [[59, 6], [16, 80]], Newcombe square-and-add: -0.0621 (95% CI -0.1186 to -0.0046).
    # Rows are the first measurement (here "after"), columns the second ("before").
    before, after = _table(both=59, gained=6, lost=16, neither=80)
    r = paired_difference_interval(before, after)
    assert r["difference"] == pytest.approx(-0.0621, abs=5e-5)
    assert r["low"] == pytest.approx(-0.1186, abs=5e-5) and r["high"] == pytest.approx(-0.0046, abs=5e-5)
    assert r["method"] == PAIRED_METHOD and r["n"] == 161
    assert (r["gained"], r["lost"], r["both"], r["neither"]) == (6, 16, 59, 80)
    assert r["before"] == pytest.approx(75 / 161) and r["after"] == pytest.approx(65 / 161)
    # swapping before and after mirrors the interval
    m = paired_difference_interval(after, before)
    assert (m["difference"], m["low"], m["high"]) == pytest.approx((-r["difference"], -r["high"], -r["low"]))


def test_paired_hand_worked_no_correlation():
    # A table whose margins are zero-correlation-corrected (ad - bc <= n/2 -> phi = 0): the interval is
    # the square-and-add of the two Wilson half-widths. 4 items: both=1, gained=1, lost=0, neither=2.
    before, after = _table(1, 1, 0, 2)
    r = paired_difference_interval(before, after)
    l1, u1 = wilson_interval(2, 4)
    l2, u2 = wilson_interval(1, 4)
    # cross = 1*2 - 1*0 = 2 = n/2 -> phi = 0
    assert r["difference"] == pytest.approx(0.25)
    assert r["low"] == pytest.approx(0.25 - math.hypot(0.5 - l1, u2 - 0.25))
    assert r["high"] == pytest.approx(0.25 + math.hypot(u1 - 0.5, 0.25 - l2))


def test_paired_pairing_matters():
    # The same two accuracies (16/32 -> 20/32), once with the gain from 4 items that flipped and nothing
    # else moving (strongly paired), once with 10 gained and 6 lost: the first interval is narrower.
    tight = paired_difference_interval(*_table(16, 4, 0, 12))
    loose = paired_difference_interval(*_table(10, 10, 6, 6))
    assert tight["difference"] == loose["difference"] == pytest.approx(0.125)
    assert tight["high"] - tight["low"] < loose["high"] - loose["low"]
    assert loose["low"] < tight["low"] and loose["low"] < 0


def test_paired_edges():
    same = paired_difference_interval([1, 0, 1, 0], [1, 0, 1, 0])
    assert same["difference"] == 0 and same["low"] < 0 < same["high"]
    allright = paired_difference_interval([1] * 5, [1] * 5)
    assert allright["difference"] == 0 and -1 <= allright["low"] <= 0 <= allright["high"] <= 1
    empty = paired_difference_interval([], [])
    assert empty["n"] == 0 and (empty["low"], empty["high"]) == (-1.0, 1.0)
    half = paired_difference_interval([0.5, 1, 0], [1, 1, 0.5])
    assert half["difference"] == pytest.approx(1 / 3) and half["gained"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference_interval([1, 0], [1])
    with pytest.raises(ValueError, match=r"after_correct\[1\]"):
        paired_difference_interval([1, 0], [1, 2])


def test_records_and_formats():
    rec = accuracy_record(8, 32)
    assert rec["value"] == 0.25 and rec["count"] == 8 and rec["n"] == 32
    assert (rec["low"], rec["high"]) == wilson_interval(8, 32)
    assert credits_record([True, False, 0.5, 1]) == accuracy_record(2.5, 4)
    assert accuracy_record(0, 0)["value"] is None
    assert format_accuracy(rec) == "0.250 (8/32, 95% CI 0.133-0.421)"
    d = paired_difference_interval(*_table(16, 4, 0, 12))
    assert format_difference(d).startswith("+0.125 (95% CI -0.003 to +0.244, newcombe-paired-score")
    assert "4 gained / 0 lost of 32" in format_difference(d)
