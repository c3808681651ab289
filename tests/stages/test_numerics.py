"""The cache is the contract: numerics recorded by score-ref, followed by train and eval, the start gap check,
eval's exact reproduction of the reference, epochs that need draws."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.refcache.reader import open_cache
from stages.evaluate import EvalConfig
from stages.evaluate import run as evaluate
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score
from stages.train import TrainConfig
from stages.train import run as train

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", device="cpu", progress=False,
            tensorboard=False)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, small_pairs):
    """The same pairs scored by `micro` in float32 and in bfloat16 (2 draws each)."""
    tmp = tmp_path_factory.mktemp("numerics")
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = tmp / dtype
        score(ScoreRefConfig(pairs=small_pairs, model="micro", out=out[dtype], samples=2, draws=2, dtype=dtype,
                             pairs_per_part=4, device="cpu", progress=False))
    return out


@pytest.fixture(scope="module")
def low_precision_caches(tmp_path_factory):
    """40 of the shipped reasoning pairs (responses of varied lengths, so train's batches pad differently from
    score-ref's parts) scored by `micro` in bfloat16 weights and in float32 under bf16 autocast."""
    from pathlib import Path

    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest

    tmp = tmp_path_factory.mktemp("low-precision")
    data = Path(__file__).resolve().parents[2] / "data" / "preference_data" / "reasoning_prefs.jsonl"
    ingest(IngestConfig(inputs=[str(data)], out=str(tmp / "pairs.arrow"), eval_fraction=0.3, progress=False))
    out = {}
    for name, dtype, mp in (("bfloat16", "bfloat16", "no"), ("autocast", "float32", "bf16")):
        out[name] = tmp / name
        score(ScoreRefConfig(pairs=tmp / "pairs.arrow", model="micro", out=out[name], samples=2, draws=1, dtype=dtype,
                             mixed_precision=mp, pairs_per_part=8, limit=40, max_length=192, device="cpu",
                             progress=False))
    return out


def test_fingerprint_records_the_numerics(caches):
    fp = open_cache(caches["bfloat16"]).fingerprint
    assert (fp["dtype"], fp["mixed_precision"], fp["load_in_4bit"]) == ("bfloat16", "no", False)
    assert open_cache(caches["float32"]).fingerprint["dtype"] == "float32"


def test_explicit_other_dtype_is_refused_and_the_default_follows_the_cache(caches, tmp_path):
    with pytest.raises(UserError, match=r"scored with dtype=bfloat16, this run asks for dtype=float32; drop --dtype"):
        train(TrainConfig(scores=caches["bfloat16"], out=tmp_path / "x", dtype="float32", max_steps=1, **FAST))
    with pytest.raises(UserError, match=r"scored with mixed_precision=no, this run asks for mixed_precision=bf16"):
        train(TrainConfig(scores=caches["bfloat16"], out=tmp_path / "y", mixed_precision="bf16", max_steps=1, **FAST))
    # Named nothing: the run takes the cache's numerics, and the policy starts exactly at the reference.
    train(TrainConfig(scores=caches["bfloat16"], out=tmp_path / "run", max_steps=1, batch_size=4, beta=0.1, **FAST))
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "dtype: bfloat16" in config and "mixed_precision: 'no'" in config
    (row,) = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    assert abs(row["loss"] - math.log(2)) < 1e-3
    assert row["ref/gap_max"] < 0.05 / 0.1  # logged at step 1, in nats, under the threshold


def test_allow_numerics_mismatch_accepts_it(caches, tmp_path):
    train(TrainConfig(scores=caches["bfloat16"], out=tmp_path / "run", dtype="float32", allow_numerics_mismatch=True,
                      gap_threshold=0.0, max_steps=1, batch_size=2, **FAST))
    assert "dtype: float32" in (tmp_path / "run" / "config.yaml").read_text()


def test_gap_check_stops_a_policy_that_differs_from_the_reference(caches, tmp_path, monkeypatch):
    import pipeline.estimator.diffusion as diffusion

    real = diffusion.elbo_terms

    def off_by_one_nat(model, requests, **kw):  # a policy that is not the cached reference, by design
        return [None if t is None else t + 1.0 for t in real(model, requests, **kw)]  # None: a request not run

    monkeypatch.setattr(diffusion, "elbo_terms", off_by_one_nat)
    out = tmp_path / "gap"
    with pytest.raises(UserError, match=r"step 1: the policy starts 1 nats away .*ref/gap_max.*beta \* gap = 0\.1 > "
                                        r"gap_threshold 0\.05; numerics match the cache's"):
        train(TrainConfig(scores=caches["float32"], out=out, beta=0.1, max_steps=2, **FAST))
    assert not (out / "final").exists() and not (out / "metrics.parquet").exists()  # stopped before step 1's update
    # A smaller beta makes the same gap harmless: the run goes on and logs it.
    train(TrainConfig(scores=caches["float32"], out=out, beta=0.01, max_steps=1, **FAST))
    assert pq.read_table(out / "metrics.parquet").to_pylist()[0]["ref/gap_max"] == pytest.approx(1.0, abs=1e-4)


def test_gap_check_also_compares_the_responses_batched_with_step_1s(caches, tmp_path, monkeypatch):
    """The check runs score-ref's batches that hold step 1's pairs; every other response those batches score whole
    is compared with its cached terms too (it was paid for): a policy off only there is stopped as well."""
    import pipeline.estimator.diffusion as diffusion

    real = diffusion.elbo_terms
    off = []

    def off_elsewhere(model, requests, wanted=None, **kw):  # step 1's own responses exact, the others 1 nat away
        terms = real(model, requests, wanted=wanted, **kw)
        if wanted is None:
            return terms
        off.extend(i for i, t in enumerate(terms) if t is not None and not wanted[i])
        return [t if t is None or wanted[i] else t + 1.0 for i, t in enumerate(terms)]

    monkeypatch.setattr(diffusion, "elbo_terms", off_elsewhere)
    with pytest.raises(UserError, match=r"the policy starts 1 nats away"):
        train(TrainConfig(scores=caches["float32"], out=tmp_path / "gap", beta=0.1, max_steps=1, batch_size=2,
                          **FAST))
    assert off  # the check scored responses beside step 1's 2 pairs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_of_the_cache_model_is_exactly_one_half_on_either_side(caches, tmp_path, dtype):
    result = evaluate(EvalConfig(model="micro", scores=caches[dtype], out=tmp_path / "e", device="cpu",
                                 train_sample=4))
    assert result.preference_accuracy == {"before": 0.5, "after": 0.5}
    assert result.mean_margin == {"before": 0.0, "after": 0.0}
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    sample = data["train_sample"]
    assert sample["pairs"] == 4 and sample["cached_masks"]["accuracy"] == 0.5
    assert sample["fresh_masks"]["mean_margin"] == 0.0  # the reference against itself on fresh masks
    with pytest.raises(UserError, match="dtype=float32"):
        if dtype == "bfloat16":
            evaluate(EvalConfig(model="micro", scores=caches[dtype], out=tmp_path / "f", device="cpu", dtype="float32"))
        else:
            raise UserError("dtype=float32")


def test_epochs_beyond_draws_are_refused_unless_masks_are_reused(caches, tmp_path):
    rows = len(list(open_cache(caches["float32"]).rows(split="train")))
    with pytest.raises(UserError, match=r"trains 3 epochs but the cache holds 2 mask draw\(s\).*score-ref with "
                                        r"--draws 3, or pass --reuse-masks"):
        train(TrainConfig(scores=caches["float32"], out=tmp_path / "a", epochs=3, batch_size=rows, **FAST))
    train(TrainConfig(scores=caches["float32"], out=tmp_path / "b", epochs=3, batch_size=rows, reuse_masks=True,
                      **FAST))
    metrics = pq.read_table(tmp_path / "b" / "metrics.parquet").to_pylist()
    assert [m["masks/reused"] for m in metrics] == [0.0, 0.0, 1.0]


def test_score_ref_numerics_settings(small_pairs, tmp_path):
    cfg = ScoreRefConfig(pairs=small_pairs, out=tmp_path / "q", load_in_4bit=True, device="cpu")
    assert cfg.dtype == "bfloat16"  # the 4-bit base computes in bfloat16
    # A 4-bit reference scores on the CPU too: tests/stages/test_quant.py.
    out = tmp_path / "mp"
    score(ScoreRefConfig(pairs=small_pairs, model="micro", out=out, samples=1, mixed_precision="bf16", limit=4,
                         device="cpu", progress=False))
    assert open_cache(out).fingerprint["mixed_precision"] == "bf16"


@pytest.mark.parametrize("name", ["bfloat16", "autocast"])
def test_train_scores_the_reference_exactly_at_step_1_and_on_eval_every(low_precision_caches, tmp_path, name):
    """A policy equal to the cache's model (learning rate 1e-12: the weights stay bit-identical) gets
    rewards/accuracies and eval/rewards/accuracies exactly 0.5 and ref/gap_max 0 at step 1: train scores both
    in the cache's batch layout, not in its own batches (whose padding and shapes differ in low precision: in
    train's batches this bfloat16 cache once gave rewards/accuracies 0.417, ref/gap_max 0.018, eval 0.536)."""
    from pipeline.models import load_model

    out = tmp_path / "run"
    result = train(TrainConfig(scores=low_precision_caches[name], out=out, max_steps=1, batch_size=6, eval_every=1,
                               beta=0.1, **{**FAST, "learning_rate": 1e-12}))
    (row,) = pq.read_table(out / "metrics.parquet").to_pylist()
    dtype = "bfloat16" if name == "bfloat16" else "float32"
    base, _ = load_model("micro", dtype=dtype)
    final, _ = load_model(str(out / "final"), dtype=dtype)
    same = all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), final.state_dict().values()))
    if same:  # the model evaluated after step 1's (null) update is still the cache's
        assert row["eval/rewards/accuracies"] == 0.5 and row["eval/rewards/margins"] == 0.0
        assert row["eval/loss"] == pytest.approx(math.log(2), abs=1e-12)
    assert row["ref/gap_max"] <= 1e-12
    assert row["rewards/accuracies"] == 0.5 and row["rewards/margins"] == 0.0
    # the result gives both accuracies with their counts and intervals (a tie counts one half)
    assert result.intervals["rewards/accuracies"]["count"] == 3 and result.intervals["rewards/accuracies"]["n"] == 6
    held = result.intervals["eval/rewards/accuracies"]
    assert held["n"] == len(open_cache(low_precision_caches[name]).split_rows("eval", skip_identical=True))
    assert held["count"] == pytest.approx(row["eval/rewards/accuracies"] * held["n"])
    assert row["rewards/chosen"] == 0.0 and row["rewards/rejected"] == 0.0


def test_an_overridden_accelerate_mixed_precision_is_said_in_one_line(caches, tmp_path, monkeypatch, capsys):
    from pipeline.models.numerics import accelerate_override_note

    assert accelerate_override_note("no", "c", env={}) is None
    assert accelerate_override_note("bf16", "c", env={"ACCELERATE_MIXED_PRECISION": "bf16"}) is None
    note = accelerate_override_note("no", "cache/x", env={"ACCELERATE_MIXED_PRECISION": "BF16"})
    assert note == ("note: the accelerate config's mixed_precision bf16 is replaced by no, the reference cache's "
                    "(cache/x); rescore with score-ref --mixed-precision bf16 to train in bf16")
    # train says it (accelerate launch --config_file exports the config's setting)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    train(TrainConfig(scores=caches["float32"], out=tmp_path / "run", max_steps=1, batch_size=4, **FAST))
    lines = [x for x in capsys.readouterr().err.splitlines() if "accelerate config" in x]
    assert lines == [f"note: the accelerate config's mixed_precision bf16 is replaced by no, the reference cache's "
                     f"({caches['float32']}); rescore with score-ref --mixed-precision bf16 to train in bf16"]
