"""eval's figures on the reference cache: preference accuracy rescored as score-ref scored, fresh masks."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.evaluation.metrics import fresh_requests, preference_scores
from pipeline.models import load_model
from stages.evaluate import EvalConfig


def test_reference_against_itself_is_chance_and_a_better_policy_wins(small_cache, monkeypatch):
    from pipeline.models.numerics import Numerics
    from pipeline.refcache.reader import open_cache

    cache = open_cache(small_cache)
    rows = list(cache.rows(split="eval"))
    model, tok = load_model("micro")
    same = preference_scores(model, tok, cache, "eval", 0.1, Numerics())
    assert same["accuracy"] == 0.5 and same["mean_margin"] == 0.0  # every pair an exact tie
    assert same["pairs"] == len(rows)
    # ELBO accuracy of the reference equals the share of pairs its cached margin favours.
    assert same["elbo_accuracy"] == pytest.approx(sum(r["ref_margin"] > 0 for r in rows) / len(rows))

    # A policy whose rejected answers score 5 nats lower than the reference's: it wins every pair.
    import pipeline.estimator.diffusion as diffusion

    rejected = {tuple(r["rejected_ids"]) for r in rows}
    real = diffusion.elbo_terms

    def tilted_terms(m, requests, **kw):
        out = real(m, requests, **kw)
        return [t - 5.0 if tuple(req.response_ids) in rejected else t for t, req in zip(out, requests)]

    monkeypatch.setattr(diffusion, "elbo_terms", tilted_terms)
    better = preference_scores(model, tok, cache, "eval", 0.1, Numerics())
    assert better["accuracy"] == 1.0 and better["mean_margin"] == pytest.approx(0.5, rel=1e-6)
    # Accuracy is the sign of the margin, whatever beta scales it by (beta 0 once gave 0.5: every pair a "tie").
    for beta in (0.0, 1e-300, 10.0):
        assert preference_scores(model, tok, cache, "eval", beta, Numerics())["accuracy"] == 1.0
    with pytest.raises(ConfigError, match="beta must be > 0, got 0"):
        EvalConfig(beta=0)


def test_fresh_masks_are_the_draws_past_the_cache_and_replay_is_the_cached_draw(small_cache):
    """eval's fresh masks: draw index draws + extra of each (pair, side) under the cache's settings, never one
    training saw; the replay of a cached draw gives the cached counts (one request builder for both)."""
    from pipeline.estimator.diffusion import mask_seed, sample_masks
    from pipeline.estimator.replay import cached_request
    from pipeline.refcache.reader import open_cache

    cache = open_cache(small_cache)
    fp, row = cache.fingerprint, cache.table().to_pylist()[0]
    chosen, rejected = fresh_requests([row], fp, extra=1)
    expected = sample_masks(row["chosen_len"], fp["samples"], mask_seed(fp["seed"], row["pair_id"], "chosen",
                                                                          fp["draws"] + 1), scheme=fp["scheme"])
    assert torch.equal(chosen.masks, expected.masks) and list(rejected.response_ids) == row["rejected_ids"]
    replayed = cached_request(row, "chosen", 0, fp)
    assert replayed.masks.sum(dim=1).tolist() == list(row["chosen_mask_counts"][0])
    assert not torch.equal(replayed.masks, chosen.masks)
