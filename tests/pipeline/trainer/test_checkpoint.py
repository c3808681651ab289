"""pipeline.trainer.checkpoint: transformers' names (checkpoint-N, TrainerState's trainer_state.json, log_history), which
folders count as checkpoints, and the old layout's one-line refusal (hand-made folders, no model)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import UserError
from pipeline.core.paths import run_outputs_in
from pipeline.trainer.checkpoint import (
    RECORD,
    STATE,
    checkpoint_dir,
    history_entries,
    list_checkpoints,
    log_history,
    read_state,
    trainer_state,
)
from pipeline.trainer.resume import find_resume_checkpoint


class _Cfg:
    log_every, save_every, eval_every, batch_size = 5, 10, 20, 4


def test_checkpoint_dir_is_transformers_name_without_padding(tmp_path):
    assert checkpoint_dir(tmp_path, 40) == tmp_path / "checkpoint-40"


def test_a_metrics_row_becomes_a_training_and_an_eval_entry_as_transformers_logs_them():
    row = {"step": 4, "epoch": 0.5, "loss": 0.69, "learning_rate": 1e-5, "ref/gap_max": math.nan,
           "eval/loss": 0.6, "eval/rewards/accuracies": 0.75, "eval/rewards/margins": math.nan}
    assert history_entries(row) == [
        {"loss": 0.69, "learning_rate": 1e-5, "step": 4, "epoch": 0.5},  # NaN = not measured: left out
        {"eval_loss": 0.6, "eval_rewards/accuracies": 0.75, "step": 4, "epoch": 0.5},
    ]
    assert history_entries({"step": 1, "epoch": 0.1, "loss": 1.0}) == [{"loss": 1.0, "step": 1, "epoch": 0.1}]


def test_log_history_reads_the_run_folders_metrics_up_to_the_step(tmp_path):
    from pipeline.trainer.metrics import METRICS_SCHEMA

    rows = [{"step": s, "epoch": s / 4, "loss": 1.0 / s} for s in (1, 2, 3)]
    full = [{name: r.get(name, math.nan) for name in METRICS_SCHEMA.names} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=METRICS_SCHEMA), tmp_path / "metrics.parquet")
    assert [e["step"] for e in log_history(tmp_path, 2)] == [1, 2]
    assert log_history(tmp_path / "absent", 2) == []


def test_trainer_state_has_transformers_fields_and_loads_as_trainer_state(tmp_path):
    from transformers import TrainerState

    history = [{"loss": 0.5, "step": 2, "epoch": 0.5}]
    state = trainer_state(6, {"layout": {"total_steps": 10, "batch_size": 4}, "steps_per_epoch": 4, "epoch": 1.5,
                              "best_metric": 0.8, "best_model_checkpoint": str(tmp_path / "checkpoint-4"),
                              "num_tokens": 321}, _Cfg(), history)
    (tmp_path / STATE).write_text(json.dumps(state))
    loaded = TrainerState.load_from_json(str(tmp_path / STATE))
    assert (loaded.global_step, loaded.epoch, loaded.max_steps, loaded.num_train_epochs) == (6, 1.5, 10, 3)
    assert (loaded.logging_steps, loaded.save_steps, loaded.eval_steps, loaded.train_batch_size) == (5, 10, 20, 4)
    assert (loaded.best_metric, loaded.best_global_step, loaded.num_input_tokens_seen) == (0.8, 4, 321)
    assert loaded.best_model_checkpoint.endswith("checkpoint-4") and loaded.log_history == history


def _fake_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / RECORD).write_text(json.dumps({"step": step}))
    if complete:
        (path / STATE).write_text("{}")
    return path


def test_only_complete_checkpoint_folders_count_newest_by_step_not_by_name(tmp_path):
    for step in (9, 10, 2):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 11, complete=False)  # killed before trainer_state.json
    (tmp_path / "checkpoint-12").mkdir()  # somebody else's folder
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert find_resume_checkpoint(tmp_path, None).name == "checkpoint-10"  # --resume: the newest
    assert read_state(tmp_path / "checkpoint-10") == {"step": 10}
    assert run_outputs_in(tmp_path) == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-11",
                                        "checkpoint-12"]


def test_an_old_layout_checkpoint_is_a_one_line_error(tmp_path):
    old = tmp_path / "checkpoints" / "step-0000004"
    old.mkdir(parents=True)
    (old / STATE).write_text(json.dumps({"step": 4}))
    with pytest.raises(UserError, match=r"step-0000004: a checkpoint of the layout before transformers'") as err:
        read_state(old)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a checkpoint written by lldm-dpo"):
        read_state(tmp_path)
    assert "checkpoints" in run_outputs_in(tmp_path)  # still a run output: a fresh run refuses the folder
