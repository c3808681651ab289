"""bench/vrpo.py's building blocks: nested sub-draws are stratified draws of the smaller budget, T x M masks have
the right counts and weights, and the variance table on hand-made terms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import vrpo  # noqa: E402

from pipeline.estimator.diffusion import sample_masks  # noqa: E402


def test_nested_sub_draws_have_the_counts_of_a_stratified_draw_of_that_budget():
    for seed in range(5):
        eight = sample_masks(24, 8, seed)
        for n in (1, 2, 4):
            sub = vrpo.nested(8, n)
            assert eight.counts[sub].tolist() == sample_masks(24, n, seed).counts.tolist()


def test_split_masks_t_counts_each_with_m_masks():
    masks, weights = vrpo.split_masks(10, 2, 3, seed=4)
    counts = masks.sum(1)
    assert masks.shape == (6, 10) and len(set(counts[:3].tolist())) == 1 and len(set(counts[3:].tolist())) == 1
    assert weights.tolist() == pytest.approx((10 / counts.double()).tolist())
    assert not torch.equal(masks[0], masks[1])  # independent masks of one count (24 of C(10, l) alike: unlikely)


def test_variance_table_on_hand_made_terms():
    # one pair, 3 replicates, n_max 2; the policy's terms are the reference's + 1 on the chosen side, so with
    # shared masks every d_k is 1 (variance 0); with independent masks (the reference's terms from replicate r + 1)
    # delta_r = 1 + mean c_r - mean c_(r+1) = -1, 5, -1: sample variance 12
    chosen = {0: [-3.0, -5.0], 1: [-2.0, -2.0], 2: [-6.0, -6.0]}
    ref, pi = {}, {}
    for r, v in chosen.items():
        for side, terms in (("chosen", v), ("rejected", [-1.0, -1.0])):
            ref[(0, side, r, (2, 1))] = torch.tensor(terms, dtype=torch.float64)
            pi[(0, side, r, (2, 1))] = torch.tensor(terms, dtype=torch.float64) + (1.0 if side == "chosen" else 0.0)
    shared, independent = vrpo.variance_table(pi, ref, 1, 3, 2, [("n=2 (2x1)", (2, 1), [0, 1])])
    assert (shared["masks"], independent["masks"]) == ("shared", "independent")
    assert shared["variance"] == pytest.approx(0.0) and shared["within"] == pytest.approx(0.0)
    assert independent["variance"] == pytest.approx(12.0)
