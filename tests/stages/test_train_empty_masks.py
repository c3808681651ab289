"""Under the 1/t scheme a mask may mask nothing: train runs through such (pair, side, draw) terms, whole and in
sequence micro-batches."""

from __future__ import annotations

import pytest

from pipeline.refcache.reader import open_cache
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score
from stages.train import TrainConfig
from stages.train import run as train
from tests.conftest import ingest_pairs

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, device="cpu", progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def one_over_t_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ot")
    pairs = ingest_pairs(tmp, n=8, eval_fraction=0.0)
    out = tmp / "cache"
    # samples=1 and many draws: some (pair, side, draw) masks come out empty under 1/t.
    score(ScoreRefConfig(pairs=pairs, model="micro", out=out, samples=1, draws=40, scheme="one_over_t", eps=0.02,
                         device="cpu", progress=False))
    return out


def test_one_over_t_cache_has_empty_masks_and_trains_through_them(one_over_t_cache, tmp_path):
    rows = open_cache(one_over_t_cache).table().to_pylist()
    empty = sum(c == 0 for r in rows for side in ("chosen", "rejected") for d in r[f"{side}_mask_counts"] for c in d)
    assert empty > 0  # the situation under test exists
    for k in (0, 1):
        result = train(TrainConfig(scores=one_over_t_cache, out=tmp_path / f"k{k}", batch_size=1, epochs=40,
                                   sequence_microbatch=k, **FAST))
        assert result.steps == 8 * 40
