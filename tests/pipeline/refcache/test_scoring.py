"""pipeline.refcache.scoring: one part scored (score-ref's unit of work), its refusals."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.models import load_model
from pipeline.refcache.scoring import score_part
from stages.score_ref import ScoreRefConfig


def test_truncation_leaving_no_prompt_is_a_clear_error_for_shifted_models(small_pairs):
    from pipeline.data.pairsfile import read_pairs

    model, tok = load_model("micro")
    model.logits_shift = True
    rows = read_pairs(small_pairs).to_pylist()[:1]
    cfg = ScoreRefConfig(pairs=small_pairs, model="micro", samples=2, max_length=6, device="cpu")
    with pytest.raises(UserError, match=r"truncation to --max-length 6 left no prompt token"):
        score_part(model, tok, rows, cfg, {"tokens": 0, "padded_tokens": 0, "real_tokens": 0})
