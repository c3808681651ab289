"""The pooled-over-seeds gain and its two-level bootstrap (pipeline.evaluation.seed_bootstrap), on hand-worked cases."""

import numpy as np
import pytest

from pipeline.evaluation.seed_bootstrap import (
    group_index,
    pooled_gain,
    problem_totals,
    replicate_statistic,
    within_problem_agreement,
)

# 2 seeds x 3 items; items 0 and 1 are one problem, item 2 another.
DELTA = [[1, 1, 0], [0, 0, -1]]
GROUPS = [0, 0, 1]


def test_group_index_numbers_problems_in_order_of_first_appearance():
    assert group_index(["b", "a", "b", "c"]) == [0, 1, 0, 2]


def test_problem_totals_by_hand():
    sums, counts = problem_totals(DELTA, GROUPS)
    assert sums.tolist() == [[2, 0], [0, -1]]
    assert counts.tolist() == [2, 1]


def test_replicate_statistic_by_hand():
    sums, counts = problem_totals(DELTA, GROUPS)
    # seeds (0, 1), each problem once: (2/3 + -1/3) / 2
    assert replicate_statistic(sums, counts, [0, 1], np.array([1, 1])) == pytest.approx(1 / 6)
    # seed 0 twice, problem 0 twice: its two items counted twice, 4 / 4
    assert replicate_statistic(sums, counts, [0, 0], np.array([2, 0])) == pytest.approx(1.0)
    # seed 1 twice, problem 1 twice: -2 / 2
    assert replicate_statistic(sums, counts, [1, 1], np.array([0, 2])) == pytest.approx(-1.0)


def test_pooled_gain_point_estimate_and_spread():
    out = pooled_gain(DELTA, GROUPS, reps=200)
    assert out["mean"] == pytest.approx(1 / 6)
    assert out["per_seed"] == pytest.approx([2 / 3, -1 / 3])
    assert out["sd_seeds"] == pytest.approx(np.std([2 / 3, -1 / 3], ddof=1))
    assert (out["seeds"], out["items"], out["problems"]) == (2, 3, 2)
    # every replicate is one of the values reachable from 2 seeds x 2 problems: within [-1, 1]
    assert -1 <= out["low"] <= out["mean"] <= out["high"] <= 1


def test_constant_delta_gives_a_point_interval():
    out = pooled_gain([[1, 1, 1, 1], [1, 1, 1, 1]], [0, 1, 1, 2], reps=50)
    assert out["mean"] == out["low"] == out["high"] == 1.0


def test_duplicated_items_of_one_problem_add_no_information():
    rng = np.random.default_rng(3)
    singles = rng.integers(-1, 2, size=(3, 40)).astype(float)
    doubled = np.repeat(singles, 2, axis=1)  # each problem asked twice, with the same outcome
    a = pooled_gain(singles, list(range(40)), reps=500, seed=7)
    b = pooled_gain(doubled, list(np.repeat(np.arange(40), 2)), reps=500, seed=7)
    assert (a["low"], a["high"], a["mean"]) == pytest.approx((b["low"], b["high"], b["mean"]))
    # treating the 80 near-copies as independent items narrows the interval
    c = pooled_gain(doubled, list(range(80)), reps=500, seed=7)
    assert c["high"] - c["low"] < b["high"] - b["low"]


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="groups has 2 entries for 3 items"):
        pooled_gain(DELTA, [0, 1])
    with pytest.raises(ValueError, match="confidence"):
        pooled_gain(DELTA, GROUPS, confidence=1.5)


def test_within_problem_agreement_by_hand():
    # problem 0: (T, T, F): pairs TT agree, TF, TF disagree -> 1 of 3; problem 1: one item, no pair
    assert within_problem_agreement([True, True, False, True], [0, 0, 0, 1]) == pytest.approx(1 / 3)
    assert within_problem_agreement([True, False], [0, 1]) is None
