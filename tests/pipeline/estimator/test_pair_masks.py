"""score-ref's ``pair_masks``: one mask seed per pair and draw for both sides, and what that does to the margin."""

from __future__ import annotations

import statistics

import pytest
import torch

from pipeline.core.schemas import IDS_COLUMNS, SIDES
from pipeline.estimator.diffusion import elbo_terms, mask_seed, masked_request, side_seed
from pipeline.evaluation.metrics import fresh_requests
from tests.pipeline.estimator.test_diffusion import MASK_ID, PAD_ID, _make_model


def test_independent_is_the_per_side_seed_and_shared_is_one_seed_per_pair_and_draw():
    for draw in range(3):
        for side in SIDES:
            assert side_seed(7, "p1", side, draw) == mask_seed(7, "p1", side, draw)  # older caches' seeds
        shared = {side_seed(7, "p1", side, draw, "shared") for side in SIDES}
        assert len(shared) == 1
        assert shared.isdisjoint({mask_seed(7, "p1", side, draw) for side in SIDES})
    assert len({side_seed(7, "p1", "chosen", d, "shared") for d in range(4)}) == 4
    assert side_seed(7, "p1", "chosen", 0, "shared") != side_seed(7, "p2", "chosen", 0, "shared")
    assert side_seed(7, "p1", "chosen", 0, "shared") != side_seed(8, "p1", "chosen", 0, "shared")
    with pytest.raises(ValueError, match="pair_masks must be one of independent, shared"):
        side_seed(7, "p1", "chosen", 0, "paired")


@pytest.fixture(scope="module")
def model():
    return _make_model(seed=1)


PROMPT = [5, 6, 7]
CHOSEN = [8, 9, 10, 11, 12, 2, 2, 2]      # EOS-padded to one length, as score-ref's pad_to makes them
REJECTED = [8, 9, 10, 13, 12, 2, 2, 2]    # one token differs


def _margin(model, chosen, rejected, draw: int, pair_masks: str, samples: int = 2) -> torch.Tensor:
    """The policy's side of the DPO margin on one draw: mean_k T_k(chosen) - mean_k T_k(rejected)."""
    requests = [masked_request(PROMPT, ids, samples, side_seed(0, "pair", side, draw, pair_masks))[0]
                for side, ids in zip(SIDES, (chosen, rejected))]
    terms = elbo_terms(model, requests, mask_token_id=MASK_ID, pad_token_id=PAD_ID)
    return terms[0].mean() - terms[1].mean()


def test_shared_masks_make_identical_responses_cancel_in_the_margin_and_its_gradient(model):
    margin, grad = {}, {}
    for pair_masks in ("shared", "independent"):
        model.zero_grad()
        m = _margin(model, CHOSEN, CHOSEN, draw=0, pair_masks=pair_masks)
        m.backward()
        margin[pair_masks] = float(m.detach())
        grad[pair_masks] = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    # the two sides' rows are identical, so their terms and gradients cancel up to float32 summation order
    # (which can differ between two rows of one batch under several threads)
    assert abs(margin["shared"]) < 1e-4 and abs(margin["independent"]) > 0.1, margin
    assert grad["independent"] > 1.0 and grad["shared"] < 1e-3 * grad["independent"], grad


def test_shared_masks_cut_the_margins_variance_when_responses_differ_in_one_token(model):
    """Across 200 draws, the margin of two responses one token apart varies far less with shared masks: the
    seven shared tokens' terms nearly cancel instead of adding their own sampling noise twice."""
    with torch.no_grad():
        var = {pm: statistics.variance(float(_margin(model, CHOSEN, REJECTED, d, pm)) for d in range(200))
               for pm in ("independent", "shared")}
        means = {pm: statistics.fmean(float(_margin(model, CHOSEN, REJECTED, d, pm)) for d in range(200))
                 for pm in ("independent", "shared")}
    assert var["shared"] < 0.25 * var["independent"], var
    # the same estimand: each side's estimator is unchanged, only the two estimates' correlation is
    se = (var["shared"] / 200 + var["independent"] / 200) ** 0.5
    assert abs(means["shared"] - means["independent"]) < 4 * se, (means, se)


def test_eval_fresh_draws_follow_the_caches_pair_masks():
    row = {"pair_id": "p1", IDS_COLUMNS["prompt"]: PROMPT, IDS_COLUMNS["chosen"]: CHOSEN,
           IDS_COLUMNS["rejected"]: REJECTED}
    base = {"samples": 3, "scheme": "l_over_L", "seed": 0, "draws": 1}
    chosen, rejected = fresh_requests([row], {**base, "pair_masks": "shared"})
    assert torch.equal(chosen.masks, rejected.masks)
    chosen, rejected = fresh_requests([row], base)  # a cache without the field: independent, as it was drawn
    assert not torch.equal(chosen.masks, rejected.masks)
