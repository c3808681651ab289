"""train logs score_variance: the batch mean of each pair's estimated preference-score variance, from the policy's
and the cached reference's per-sample terms on the replayed masks (checked against a direct computation)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.estimator.diffusion import elbo_terms
from pipeline.estimator.replay import PairBatch, replay_requests
from pipeline.models import load_model
from pipeline.refcache.reader import open_cache
from stages.train import TrainConfig
from stages.train import run as train


def test_step_one_logs_the_mean_estimated_variance_of_the_preference_score(small_cache, tmp_path):
    model, tok = load_model("micro")
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that is not the reference, so the per-sample differences are not all 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cache = open_cache(small_cache)
    rows = list(cache.split_rows("train", skip_identical=True))
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, model=str(folder), allow_different_init=True, max_steps=1,
                      batch_size=len(rows), learning_rate=1e-3, device="cpu", progress=False, tensorboard=False))
    logged = pq.read_table(out / "metrics.parquet").to_pylist()[0]["score_variance"]

    model.eval()
    requests = replay_requests(PairBatch(rows, draw=0), cache.fingerprint)
    with torch.no_grad():
        terms = elbo_terms(model, requests, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id)
    variances = []
    for i, row in enumerate(rows):
        n = len(row["ref_chosen_terms"][0])
        d = [(terms[2 * i][k].item() - row["ref_chosen_terms"][0][k])
             - (terms[2 * i + 1][k].item() - row["ref_rejected_terms"][0][k]) for k in range(n)]
        mean = sum(d) / n
        variances.append(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    assert logged > 0 and logged == pytest.approx(sum(variances) / len(variances), rel=1e-4)
