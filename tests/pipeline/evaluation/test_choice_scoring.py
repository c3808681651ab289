"""Multiple-choice accuracy by option ELBO."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.evaluation.choice_scoring import choice_credits
from pipeline.models import load_model
from stages.evaluate import EvalConfig


def test_normalize_length_scores_options_per_token(tmp_path, monkeypatch):
    import pipeline.estimator.diffusion as diffusion

    model, tok = load_model("micro")
    # Every token of every option scores -1 nat, plus -3 nats once: the short option has the higher ELBO,
    # the long one the higher ELBO per token.
    monkeypatch.setattr(diffusion, "elbo_terms", lambda m, requests, **kw: [
        torch.full((r.masks.shape[0],), -1.0 * len(r.response_ids) - 3.0) for r in requests])
    item = {"question": "Pick one:", "options": ["yes", "yes yes yes yes yes yes"], "answer": 1}
    for normalize, expected in (("none", 0.0), ("length", 1.0)):
        cfg = EvalConfig(scores=None, choices=tmp_path / "c.jsonl", samples=2, device="cpu", normalize=normalize)
        assert sum(choice_credits(model, tok, [item], cfg)) == expected
    with pytest.raises(ConfigError, match="normalize must be one of none, length"):
        EvalConfig(scores=None, choices=tmp_path / "c.jsonl", normalize="mean")


def test_choice_accuracy_picks_the_highest_elbo(tmp_path):
    model, tok = load_model("micro")
    cfg = EvalConfig(scores=None, choices=tmp_path / "c.jsonl", samples=2, device="cpu")
    items = [{"question": "2 + 2 =", "options": ["4", "5", "22"], "answer": j} for j in range(3)]
    acc = sum(choice_credits(model, tok, items, cfg)) / len(items)
    # The model picks one option for the (identical) question: exactly one of the three answers is right.
    assert acc == pytest.approx(1 / 3)
