"""bench/score_flops.py counts what the model computes: LLaDA's per-pair procedure against the hand count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import score_flops  # noqa: E402


def test_llada_procedure_flops_match_the_hand_count():
    """n rows of S = prompt + response tokens through every block and the full-vocabulary head: per block
    2 x (linear weights) x tokens for the projections and MLP, 4 x S^2 x d_model x rows for the attention
    scores (QK^T and AV); the head 2 x d_model x vocab x tokens (plus the masked rows' cross-entropy, no matmul)."""
    model = score_flops.fake_model("micro", "float32", None)
    cfg = model.config
    prompt, response, n = 7, 9, 3
    requests = score_flops.pair_requests(prompt, (response, response), n, token=5)
    got = score_flops.breakdown(model, lambda: score_flops.llada(model, requests))
    s, rows = prompt + response, 2 * n  # both responses, n masked copies each
    block = model.model.transformer.blocks[0]
    linear = sum(m.weight.numel() for m in block.modules() if m.__class__.__name__ == "Linear")
    attention = 4 * s * s * cfg.d_model * rows
    assert got["per block"] == pytest.approx(2 * linear * s * rows + attention)
    assert got["attention scores"] == pytest.approx(attention)
    assert got["head and rest"] == pytest.approx(2 * cfg.d_model * cfg.padded_vocab_size * s * rows)


def test_ours_scores_the_head_on_masked_rows_only():
    """score-ref's pass: the same blocks on the same rows (one batch, equal lengths: no padding), the head on
    the masked tokens alone, so the ratio is the head's share saved."""
    model = score_flops.fake_model("micro", "float32", None)
    cfg = model.config
    requests = score_flops.pair_requests(7, (9, 9), 3, token=5)
    masked = sum(int(r.masks.sum()) for r in requests)
    ours = score_flops.breakdown(model, lambda: score_flops.ours(model, requests, batch_tokens=4096))
    llada = score_flops.breakdown(model, lambda: score_flops.llada(model, requests))
    assert ours["blocks"] == pytest.approx(llada["blocks"])
    assert ours["head and rest"] == pytest.approx(2 * cfg.d_model * cfg.padded_vocab_size * masked)
