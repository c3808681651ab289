"""The preference score's estimator variance: the pure function against a direct computation on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.estimator.score_variance import per_sample_scores, score_variance


def test_against_a_direct_computation():
    # two pairs, n = 3 samples; terms written out by hand
    pc = torch.tensor([[-10.0, -12.0, -11.0], [-5.0, -6.0, -7.0]])
    rc = torch.tensor([[-10.5, -12.0, -11.5], [-5.0, -6.5, -7.0]])
    pr = torch.tensor([[-20.0, -18.0, -19.0], [-8.0, -8.0, -8.0]])
    rr = torch.tensor([[-19.0, -18.5, -19.0], [-8.0, -7.0, -9.0]])
    d = per_sample_scores(pc, pr, rc, rr)
    # pair 0: (0.5 - (-1.0), 0.0 - 0.5, 0.5 - 0.0) = (1.5, -0.5, 0.5); pair 1: (0 - 0, 0.5 - (-1), 0 - 1) = (0, 1.5, -1)
    assert d.tolist() == [[1.5, -0.5, 0.5], [0.0, 1.5, -1.0]]
    for row, got in zip(d.tolist(), score_variance(d).tolist()):
        mean = sum(row) / 3
        sample_var = sum((x - mean) ** 2 for x in row) / 2
        assert got == pytest.approx(sample_var / 3)
    assert score_variance(d).tolist() == pytest.approx([1.0 / 3, (19 / 12) / 3])
    # the mean of d is the score the loss sees: mean policy - mean reference, chosen minus rejected
    delta = (pc.double().mean(1) - rc.double().mean(1)) - (pr.double().mean(1) - rr.double().mean(1))
    assert d.mean(1).tolist() == pytest.approx(delta.tolist())


def test_per_token_scores_divide_each_side_by_its_length_and_one_sample_has_no_estimate():
    pc, rc = torch.tensor([[-4.0, -6.0]]), torch.tensor([[-5.0, -5.0]])
    pr, rr = torch.tensor([[-9.0, -9.0]]), torch.tensor([[-8.0, -10.0]])
    d = per_sample_scores(pc, pr, rc, rr, chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]))
    assert d.tolist() == [[0.5 + 0.25, -0.5 - 0.25]]
    assert math.isnan(float(score_variance(d[:, :1])[0]))
    with pytest.raises(ValueError, match=r"expected \[pairs, samples\]"):
        score_variance(torch.zeros(3))
