"""bench/train.py's building blocks: cached and online references give the same step on the same masks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import train as train_bench  # noqa: E402

from pipeline.estimator.replay import PairBatch  # noqa: E402
from pipeline.models import build_preset, preset_tokenizer  # noqa: E402
from stages.train import TrainConfig  # noqa: E402

N = 2


def _rows(model, tok):
    gen = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(10, 400, (k,), generator=gen).tolist()  # noqa: E731 (no specials below 400)
    pairs = [(f"p{i}", ids(6), ids(5 + i), ids(7 - i)) for i in range(2)]
    fp = train_bench.fingerprint(N)
    rows = train_bench.cache_rows(pairs, N, seed=3)
    train_bench.fill_reference(model, rows, fp, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                               batch_tokens=64)
    return rows, fp


def _one_step(reference: str, lora_r: int):
    tok = preset_tokenizer("micro")
    model = build_preset("micro")
    rows, fp = _rows(model, tok)
    ref_model = None
    if reference == "online" and lora_r == 0:
        ref_model = build_preset("micro").requires_grad_(False)
    cfg = TrainConfig(reference=reference, lora_r=lora_r, batch_size=2, learning_rate=1e-3, tensorboard=False,
                      progress=False)
    ctx, optimizer, params = train_bench.make_trainer(cfg, model, tok, fp, ref_model)
    phases: dict = {}
    with train_bench.timed_step_phases(phases):
        stats = train_bench.train_step(ctx, optimizer, params, PairBatch(rows, 0), phases)
    return float(stats.loss), [p.detach().clone() for p in params], rows, phases


@pytest.mark.parametrize("lora_r", [0, 4])
def test_cached_and_online_reference_take_the_same_step(lora_r):
    loss_c, params_c, rows, phases_c = _one_step("cached", lora_r)
    loss_o, params_o, _, phases_o = _one_step("online", lora_r)
    # the step's phases: the cached step never runs a reference; both run a backward and the optimizer
    assert "reference" not in phases_c and phases_o["reference"] > 0
    assert all(phases[k] > 0 for phases in (phases_c, phases_o) for k in ("backward", "optimizer"))
    assert loss_c == pytest.approx(loss_o, abs=1e-6)
    assert loss_c == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    assert len(params_c) == len(params_o) > 0
    for a, b in zip(params_c, params_o):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The cache rows carry what replay_requests and reference_means read.
    row = rows[0]
    assert len(row["ref_chosen_terms"]) == 1 and len(row["ref_chosen_terms"][0]) == N
    assert row["chosen_mask_counts"][0] and row["chosen_len"] == len(row["chosen_ids"])


def test_step_phases_restore_the_step_functions():
    import pipeline.trainer.dpo_step as dpo_step

    originals = (dpo_step._backward, dpo_step._online_reference)
    with train_bench.timed_step_phases({}):
        assert (dpo_step._backward, dpo_step._online_reference) != originals
    assert (dpo_step._backward, dpo_step._online_reference) == originals


def test_prebuilt_loader_restores_load_model():
    import pipeline.models as models

    original = models.load_model
    with train_bench.prebuilt_loader("M", "T"):
        assert models.load_model("anything", dtype="x") == ("M", "T")
    assert models.load_model is original
