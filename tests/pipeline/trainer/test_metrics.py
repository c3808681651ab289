"""MetricsWriter: Parquet rows, console line, TensorBoard tags, atomic flushes, resume."""

from __future__ import annotations

import io
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import UserError
from pipeline.core.schemas import METRIC_COLUMNS
from pipeline.trainer import metrics as metrics_mod
from pipeline.trainer.metrics import METRICS_FILE, MetricsWriter, format_row, read_metrics


def _row(step, **extra):
    row = {
        "step": step,
        "epoch": step / 10,
        "loss": 0.7 - 0.01 * step,
        "rewards/chosen": 0.01 * step,
        "rewards/rejected": -0.02 * step,
        "rewards/accuracies": 0.5 + 0.01 * step,
        "rewards/margins": 0.03 * step,
        "logps/chosen": -50.0 + step,
        "logps/rejected": -60.0 - step,
        "learning_rate": 1e-4,
        "grad_norm": 1.5,
        "tokens_per_second": 1234.0,
        "peak_memory_bytes": 3 * 2**30,
    }
    row.update(extra)
    return row


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def test_rows_land_in_parquet_with_schema(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        w.log(_row(1))
        w.log({"step": 2, "loss": 0.5})  # other columns not measured this step
    table = pq.read_table(tmp_path / METRICS_FILE)
    assert tuple(table.column_names) == METRIC_COLUMNS
    assert table.schema.field("step").type == pa.int64()
    assert all(table.schema.field(c).type == pa.float64() for c in METRIC_COLUMNS[1:])
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rewards/margins"] == pytest.approx(0.03)
    assert rows[0]["peak_memory_bytes"] == 3 * 2**30
    assert rows[1]["loss"] == 0.5
    assert math.isnan(rows[1]["rewards/chosen"]) and math.isnan(rows[1]["learning_rate"])
    assert not (tmp_path / "tensorboard").exists()


def test_console_line_is_compact(tmp_path):
    buf = io.StringIO()
    with MetricsWriter(tmp_path, tensorboard=False, console=buf) as w:
        w.log(_row(3))
        w.log({"step": 4, "loss": 0.25})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 3 | epoch 0.30 | loss 0.6700 | acc 0.530 | margin 0.0900")
    assert "lr 1.00e-04" in lines[0] and "mem 3.00GiB" in lines[0] and "tok/s 1234" in lines[0]
    assert lines[1] == "step 4 | loss 0.2500"  # NaN columns are left out
    assert format_row({"step": 7}) == "step 7"


def test_flush_every_and_flush(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False, console=False, flush_every=3)
    w.log(_row(1))
    w.log(_row(2))
    assert not (tmp_path / METRICS_FILE).exists()
    w.log(_row(3))
    assert read_metrics(tmp_path / METRICS_FILE).num_rows == 3
    w.log(_row(4))
    assert read_metrics(tmp_path / METRICS_FILE).num_rows == 3
    w.flush()  # e.g. at a checkpoint
    assert read_metrics(tmp_path / METRICS_FILE).num_rows == 4
    w.close()


def test_bad_rows_are_refused(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False, console=False)
    with pytest.raises(ValueError, match="unknown metric"):
        w.log({"step": 1, "rewards/chosenn": 1.0})
    with pytest.raises(ValueError, match="needs a 'step'"):
        w.log({"loss": 1.0})
    w.log({"step": 5})
    with pytest.raises(ValueError, match="not after"):
        w.log({"step": 5})
    w.close()
    with pytest.raises(RuntimeError):
        w.log({"step": 6})


def test_crash_during_flush_keeps_previous_file(tmp_path, monkeypatch):
    w = MetricsWriter(tmp_path, tensorboard=False, console=False, flush_every=1)
    w.log(_row(1))
    w.log(_row(2))
    before = (tmp_path / METRICS_FILE).read_bytes()

    def half_write(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(metrics_mod.pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        w.log(_row(3))
    # The old complete file is still there, readable, and no temporary is left behind.
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    assert read_metrics(tmp_path / METRICS_FILE).column("step").to_pylist() == [1, 2]
    from pipeline.core.atomic import LEDGER

    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LEDGER) == [METRICS_FILE]


def test_resume_drops_later_rows(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        for s in range(1, 6):
            w.log(_row(s))
    # Killed after step 5, last checkpoint at step 3: steps 4-5 are redone.
    w = MetricsWriter(tmp_path, tensorboard=False, console=False, resume_step=3)
    with pytest.raises(ValueError, match="not after"):
        w.log(_row(3))
    w.log(_row(4, loss=9.0))
    w.close()
    rows = read_metrics(tmp_path / METRICS_FILE).to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["loss"] == 9.0
    assert rows[2]["loss"] == pytest.approx(0.67)


def test_resume_truncation_reaches_disk_without_new_rows(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        for s in range(1, 6):
            w.log(_row(s))
    MetricsWriter(tmp_path, tensorboard=False, console=False, resume_step=2).close()
    assert read_metrics(tmp_path / METRICS_FILE).column("step").to_pylist() == [1, 2]


def test_fresh_run_replaces_old_file(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        w.log(_row(1))
        w.log(_row(2))
    with MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        w.log(_row(1, loss=3.0))
    rows = read_metrics(tmp_path / METRICS_FILE).to_pylist()
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0)]


def test_corrupt_file_on_resume_is_a_user_error(tmp_path):
    (tmp_path / METRICS_FILE).write_bytes(b"not parquet")
    with pytest.raises(UserError, match="metrics.parquet"):
        MetricsWriter(tmp_path, tensorboard=False, console=False, resume_step=3)
    pq.write_table(pa.table({"step": [1]}), tmp_path / METRICS_FILE)
    with pytest.raises(UserError, match="lacks column"):
        MetricsWriter(tmp_path, tensorboard=False, console=False, resume_step=3)


def test_tensorboard_tags_and_values(tmp_path):
    with MetricsWriter(tmp_path, console=False) as w:
        w.log(_row(1))
        w.log({"step": 2, "loss": 0.5, "rewards/chosen": 0.25})
    acc = _scalars(tmp_path)
    tags = set(acc.Tags()["scalars"])
    expected = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "epoch",
                "tokens_per_second", "peak_memory_bytes"}
    assert tags == {f"train/{t}" for t in expected}  # as transformers' Trainer logs them
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/rewards/chosen")] == [(1, 0.01), (2, 0.25)]
    assert [e.step for e in acc.Scalars("train/learning_rate")] == [1]  # NaN at step 2 is not logged


def test_tensorboard_resume_purges_later_events(tmp_path):
    with MetricsWriter(tmp_path, console=False) as w:
        for s in range(1, 6):
            w.log(_row(s))
    with MetricsWriter(tmp_path, console=False, resume_step=3) as w:
        w.log(_row(4, loss=9.0))
    acc = _scalars(tmp_path)
    losses = [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")]
    assert losses == [(1, 0.69), (2, 0.68), (3, 0.67), (4, 9.0)]
