"""train --eval-every / --save-best / --report-to: held-out metrics in every sink, the best checkpoint kept."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import ConfigError, UserError
from pipeline.core.schemas import EVAL_METRIC_COLUMNS
from pipeline.evaluation.preference import heldout_metrics
from pipeline.models import load_model
from pipeline.refcache.reader import open_cache
from stages.train import TrainConfig, run
from tests.conftest import accelerate_launch
from tests.pipeline.evaluation.test_preference import heldout_sums

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", beta=0.5, device="cpu", progress=False,
            batch_size=4)


def _cfg(cache, out, **kw):
    return TrainConfig(scores=cache, out=out, **{**FAST, **kw})


def _isnan(v):
    return v is None or math.isnan(v)


def test_eval_every_logs_eval_metrics_at_its_steps_in_parquet_and_tensorboard(small_cache, tmp_path):
    out = tmp_path / "run"
    run(_cfg(small_cache, out, max_steps=5, eval_every=2, log_every=3, report_to="tensorboard"))
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    # Logged: every 3rd step, the last step, and every evaluated step.
    assert [r["step"] for r in rows] == [2, 3, 4, 5]
    for r in rows:
        evaluated = r["step"] in (2, 4)
        for name in EVAL_METRIC_COLUMNS:
            assert _isnan(r[name]) != evaluated, (r["step"], name)

    # The logged numbers are the policy's at that step: a run that stops at step 4 evaluates its final model.
    short = tmp_path / "short"
    run(_cfg(small_cache, short, max_steps=4, eval_every=2, report_to="none"))
    model, tok = load_model(str(short / "final"))
    cache = open_cache(small_cache)
    expect = heldout_metrics(heldout_sums(model.eval(), tok, list(cache.rows(split="eval")), cache.fingerprint,
                                          beta=0.5, batch_tokens=16384))
    logged = next(r for r in rows if r["step"] == 4)
    for name in EVAL_METRIC_COLUMNS:
        assert logged[name] == pytest.approx(expect[name], rel=1e-5, abs=1e-6), name
    assert logged["eval/loss"] != pytest.approx(math.log(2), abs=1e-4)  # it trained: not the reference's value

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("eval/rewards/accuracies")] == [2, 4]
    assert [e.step for e in ev.Scalars("train/loss")] == [2, 3, 4, 5]


def test_save_best_keeps_the_best_checkpoint_through_rotation(small_cache, tmp_path, monkeypatch):
    import pipeline.trainer.dpo_checks as train_mod

    scripted = iter([0.5, 0.9, 0.6, 0.7, 0.9])  # best at step 2; a later tie does not replace it

    def fake_eval(ctx, rows):
        acc = next(scripted)
        return {name: (acc if name == "eval/rewards/accuracies" else 0.0) for name in EVAL_METRIC_COLUMNS}

    monkeypatch.setattr(train_mod, "evaluate_heldout", fake_eval)
    out = tmp_path / "run"
    result = run(_cfg(small_cache, out, max_steps=5, eval_every=1, save_every=1, keep_checkpoints=1, save_best=True,
                      report_to="none"))
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-4"]  # the best, and the newest (step 5 is the final model)
    assert result.best_checkpoint == str(out / "checkpoint-2") and result.best_metric == 0.9
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == result.best_checkpoint and state["best_metric"] == 0.9
    assert not (out / "tensorboard").exists()  # --report-to none


def test_save_best_saves_a_checkpoint_for_a_best_between_saves(small_cache, tmp_path, monkeypatch):
    import pipeline.trainer.dpo_checks as train_mod

    scripted = iter([0.2, 0.8, 0.3])
    monkeypatch.setattr(train_mod, "evaluate_heldout", lambda ctx, rows: {
        name: (next(scripted) if name == "eval/rewards/accuracies" else 0.0) for name in EVAL_METRIC_COLUMNS})
    out = tmp_path / "run"
    result = run(_cfg(small_cache, out, max_steps=3, eval_every=1, save_best=True, report_to="none"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert result.best_checkpoint.endswith("checkpoint-2")


def test_eval_options_are_validated(small_cache, tmp_path, train_only_cache):
    with pytest.raises(ConfigError, match="save_best .* eval_every"):
        _cfg(small_cache, tmp_path / "a", save_best=True)
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        _cfg(small_cache, tmp_path / "a", eval_every=-1)
    with pytest.raises(UserError, match="--eval-every needs held-out pairs"):
        run(_cfg(train_only_cache, tmp_path / "b", max_steps=1, eval_every=1))


@pytest.fixture(scope="module")
def train_only_cache(tmp_path_factory):
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score
    from tests.conftest import ingest_pairs

    tmp = tmp_path_factory.mktemp("train_only")
    pairs = ingest_pairs(tmp, n=6, eval_fraction=0.0)
    score(ScoreRefConfig(pairs=pairs, model="micro", out=tmp / "cache", samples=2, device="cpu", progress=False))
    return tmp / "cache"


# --- trackers -------------------------------------------------------------------


def test_report_to_errors_name_the_tracker(small_cache, tmp_path):
    with pytest.raises(UserError, match=r"^--report-to wandb: the wandb package is not installed"):
        run(_cfg(small_cache, tmp_path / "a", max_steps=1, report_to="tensorboard,wandb"))
    with pytest.raises(UserError, match=r"^--report-to nosuchtracker: unknown tracker; choose from .*mlflow"):
        run(_cfg(small_cache, tmp_path / "b", max_steps=1, report_to="nosuchtracker"))
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        _cfg(small_cache, tmp_path / "c", report_to="none,tensorboard")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written


def test_cli_report_to_error_is_one_line(small_cache, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "stages.cli", "train", str(small_cache), "--out", str(tmp_path),
                           "--max-steps", "1", "--device", "cpu", "--report-to", "mlflow", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --report-to mlflow: the mlflow package is not installed (pip install mlflow), "
        "or drop it from --report-to"]


def test_a_tracker_through_accelerate_gets_every_row_with_trl_names(small_cache, tmp_path):
    accelerate_tracking = pytest.importorskip("accelerate.tracking")
    if not hasattr(accelerate_tracking, "register_tracker_class"):
        pytest.skip("this accelerate cannot register tracker classes")

    seen: list[tuple[int, dict]] = []
    configs: list[dict] = []
    finished: list[bool] = []

    class RecordingTracker(accelerate_tracking.GeneralTracker):
        name = "lldm_test_recorder"
        requires_logging_directory = False

        def __init__(self, run_name, **kwargs):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            configs.append(dict(values))

        def log(self, values, step=None, **kwargs):
            seen.append((step, dict(values)))

        def finish(self):
            finished.append(True)

    accelerate_tracking.register_tracker_class(RecordingTracker)
    try:
        out = tmp_path / "run"
        run(_cfg(small_cache, out, max_steps=3, eval_every=2, report_to="lldm_test_recorder"))
    finally:
        accelerate_tracking.LOGGER_TYPE_TO_CLASS.pop("lldm_test_recorder", None)
    assert [s for s, _ in seen] == [1, 2, 3]
    assert "eval/rewards/accuracies" in seen[1][1] and "eval/rewards/accuracies" not in seen[0][1]
    parquet = pq.read_table(out / "metrics.parquet").to_pylist()
    assert seen[1][1]["eval/rewards/margins"] == parquet[1]["eval/rewards/margins"]
    assert seen[0][1]["train/loss"] == parquet[0]["loss"]  # transformers' names for trackers
    assert seen[0][1]["train/rewards/accuracies"] == parquet[0]["rewards/accuracies"]
    assert "loss" not in seen[0][1] and "loss" in parquet[0]  # metrics.parquet keeps query's names
    assert configs and configs[0]["eval_every"] == 2 and configs[0]["out"] == str(out)
    assert not (out / "tensorboard").exists()  # only what --report-to names
    assert finished == [True]


@pytest.mark.slow
def test_two_processes_evaluate_their_shares_and_reduce(small_cache, tmp_path):
    """3 held-out pairs over 2 processes (2 + 1): the reduced eval/... equal one process's at equal global batch."""
    import os
    import subprocess

    one = tmp_path / "one"
    run(_cfg(small_cache, one, max_steps=2, eval_every=1, batch_size=4, report_to="none"))
    two = tmp_path / "two"
    cmd = [*accelerate_launch(), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stages.cli", "train", str(small_cache), "--out", str(two), "--max-steps", "2",
           "--batch-size", "2",
           "--learning-rate", "3e-3", "--warmup-ratio", "0", "--scheduler", "constant", "--beta", "0.5",
           "--eval-every", "1", "--report-to", "none", "--device", "auto", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = pq.read_table(one / "metrics.parquet").to_pylist()
    b = pq.read_table(two / "metrics.parquet").to_pylist()
    assert [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        for name in EVAL_METRIC_COLUMNS:
            assert y[name] == pytest.approx(x[name], rel=1e-4, abs=1e-5), (x["step"], name)


def test_resume_remembers_the_best(small_cache, tmp_path, monkeypatch):
    import pipeline.trainer.dpo_checks as train_mod

    scripted = iter([0.9, 0.5, 0.6, 0.7, 0.8])  # the last value is the resumed run's step 4
    monkeypatch.setattr(train_mod, "evaluate_heldout", lambda ctx, rows: {
        name: (next(scripted) if name == "eval/rewards/accuracies" else 0.0) for name in EVAL_METRIC_COLUMNS})
    out = tmp_path / "run"
    run(_cfg(small_cache, out, max_steps=4, eval_every=1, save_every=1, keep_checkpoints=1, save_best=True,
             report_to="none"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    resumed = run(_cfg(small_cache, out, max_steps=4, eval_every=1, save_every=1, keep_checkpoints=1,
                       save_best=True, report_to="none", resume=True))
    assert resumed.resumed_from == 3
    assert resumed.best_checkpoint == str(out / "checkpoint-1") and resumed.best_metric == 0.9
