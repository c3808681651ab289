"""Held-out preference metrics on the cache's masks (train --eval-every's measurement)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.core.schemas import EVAL_METRIC_COLUMNS
from pipeline.estimator.losses import METRICS, pair_statistics
from pipeline.estimator.replay import PairBatch, replay_requests
from pipeline.evaluation.preference import heldout_metrics
from pipeline.models import load_model
from pipeline.refcache.reader import open_cache
from tests.pipeline.estimator.reference import dpo_loss


def heldout_sums(model, tokenizer, rows, fingerprint, *, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, preference_weight: float = 1.0, sft_weight: float = 0.0,
                 batch_tokens=None, draw: int = 0, pairs_per_pass: int = 8) -> torch.Tensor:
    """The tests' reference computation of held-out sums (``heldout_metrics``'s input, ("pairs", *METRICS) in
    order): the policy's terms from one no-grad pass per ``pairs_per_pass`` pairs on ``draw``'s cached masks in
    train's batches, against the cached reference terms of the same draw, train's loss and tie rule."""
    from pipeline.estimator.diffusion import elbo_terms

    names = ("pairs", *METRICS.values())
    sums = torch.zeros(len(names), dtype=torch.float64)
    for start in range(0, len(rows), pairs_per_pass):
        chunk = list(rows[start:start + pairs_per_pass])
        with torch.no_grad():
            terms = elbo_terms(model, replay_requests(PairBatch(chunk, draw), fingerprint),
                               mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                               batch_tokens=batch_tokens)
        means = torch.stack([t.mean().double().cpu() for t in terms])
        ref = {side: torch.tensor([sum(r[f"ref_{side}_terms"][draw]) / len(r[f"ref_{side}_terms"][draw])
                                   for r in chunk], dtype=torch.float64) for side in ("chosen", "rejected")}
        stats = pair_statistics(means[0::2], means[1::2], ref["chosen"], ref["rejected"], beta=beta,
                                loss_type=loss_type, label_smoothing=label_smoothing,
                                chosen_len=torch.tensor([r["chosen_len"] for r in chunk]),
                                rejected_len=torch.tensor([r["rejected_len"] for r in chunk]),
                                preference_weight=preference_weight, sft_weight=sft_weight)
        values = {"pairs": float(len(chunk)), **stats.sums()}
        sums += torch.tensor([values[name] for name in names], dtype=torch.float64)
    return sums


def _eval_rows(cache_dir):
    rows = list(open_cache(cache_dir).rows(split="eval"))
    assert rows, "the fixture cache must hold held-out pairs"
    return rows


def test_the_reference_itself_scores_one_half_and_log_two(small_cache):
    model, tok = load_model("micro")
    rows = _eval_rows(small_cache)
    fp = open_cache(small_cache).fingerprint
    m = heldout_metrics(heldout_sums(model, tok, rows, fp, beta=0.1))
    assert sorted(m) == sorted(EVAL_METRIC_COLUMNS)
    assert m["eval/rewards/accuracies"] == 0.5  # every pair a tie, credited one half
    assert m["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(m["eval/rewards/margins"]) < 1e-5


def test_metrics_equal_the_per_pair_definition_and_shards_add_up(small_cache):
    model, tok = load_model("micro")
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy off the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = _eval_rows(small_cache)
    fp = open_cache(small_cache).fingerprint
    full = heldout_sums(model, tok, rows, fp, beta=0.5, pairs_per_pass=3)
    m = heldout_metrics(full)

    # Independent: policy means on draw 0's masks pair by pair, against the cached draw-0 terms.
    from pipeline.estimator.diffusion import elbo_terms

    margins, losses, correct = [], [], []
    for row in rows:
        with torch.no_grad():
            t = elbo_terms(model, replay_requests(PairBatch([row], 0), fp), mask_token_id=tok.mask_token_id,
                           pad_token_id=tok.pad_token_id)
        pc, pr = t[0].mean(), t[1].mean()
        rc = torch.tensor(sum(row["ref_chosen_terms"][0]) / fp["samples"], dtype=torch.float64)
        rr = torch.tensor(sum(row["ref_rejected_terms"][0]) / fp["samples"], dtype=torch.float64)
        loss, cr, rj = dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=0.5)
        margins.append(float(cr - rj))
        losses.append(float(loss))
        correct.append(float(cr - rj) > 0)
    assert m["eval/rewards/margins"] == pytest.approx(sum(margins) / len(rows), rel=1e-6)
    assert m["eval/loss"] == pytest.approx(sum(losses) / len(rows), rel=1e-6)
    assert m["eval/rewards/accuracies"] == pytest.approx(sum(correct) / len(rows))

    # Data parallel: each process sums its share; the all-reduced sum is the whole split's.
    shards = [heldout_sums(model, tok, rows[r::2], fp, beta=0.5) for r in range(2)]
    torch.testing.assert_close(shards[0] + shards[1], full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loss, weights", [("ipo,sft", [0.5, 0.3]), ("sigmoid", None)])
def test_heldout_loss_is_trains_loss_for_combined_and_per_token_losses(small_cache, loss, weights):
    """The eval/loss of --eval-every is the loss train optimises: IPO per token, sft added with its weights."""
    from pipeline.trainer.dpo_step import batch_loss
    from stages.train import TrainConfig

    model, tok = load_model("micro")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = _eval_rows(small_cache)
    fp = open_cache(small_cache).fingerprint
    cfg = TrainConfig(loss=loss, loss_weights=weights, beta=0.2, sft_weight=0.1)
    m = heldout_metrics(heldout_sums(model, tok, rows, fp, beta=cfg.beta, loss_type=cfg.preference_loss,
                                     preference_weight=cfg.preference_weight, sft_weight=cfg.sft_total_weight,
                                     pairs_per_pass=len(rows)))
    from pipeline.estimator.diffusion import elbo_terms

    with torch.no_grad():
        terms = elbo_terms(model, replay_requests(PairBatch(rows, 0), fp), mask_token_id=tok.mask_token_id,
                           pad_token_id=tok.pad_token_id)
    ref_c = torch.tensor([sum(r["ref_chosen_terms"][0]) / fp["samples"] for r in rows], dtype=torch.float64)
    ref_r = torch.tensor([sum(r["ref_rejected_terms"][0]) / fp["samples"] for r in rows], dtype=torch.float64)
    expected, st = batch_loss(cfg, terms, ref_c, ref_r, torch.tensor([r["chosen_len"] for r in rows]),
                              torch.tensor([r["rejected_len"] for r in rows]))
    assert m["eval/loss"] == pytest.approx(float(expected), rel=1e-6)
    assert m["eval/rewards/accuracies"] == pytest.approx(float(st.accuracies.mean()))
