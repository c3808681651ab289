"""Per-step training metrics: console line, progress bar, TensorBoard, and RUN_DIR/metrics.parquet.

One row per logged step with the columns of ``schemas.METRIC_COLUMNS`` (TRL's
names). The Parquet file is rewritten whole and atomically at each flush, so a
crash leaves the previous complete file, never half of one; it is small (one
row per step), so rewriting is cheap. On resume the rows of steps after the
checkpoint are dropped (they will be logged again) and TensorBoard purges its
events past that step the same way.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path, claim, make_dir
from pipeline.core.errors import UserError
from pipeline.core.paths import METRICS_FILE, TENSORBOARD_DIR
from pipeline.core.schemas import LATER_METRIC_COLUMNS, METRIC_COLUMNS
from pipeline.trainer.trackers import hf_tag

METRICS_SCHEMA = pa.schema(
    [(name, pa.int64() if name == "step" else pa.float64()) for name in METRIC_COLUMNS]
)
"""Arrow schema of metrics.parquet: ``step`` int64, every other column float64 (NaN = not measured)."""

# What TensorBoard and the other trackers see: transformers' names (train/loss, train/rewards/accuracies,
# eval/...); metrics.parquet keeps the columns' names, which `lldm-dpo query` documents.
TB_TAGS = {name: hf_tag(name) for name in METRIC_COLUMNS if name != "step"}


def read_metrics(path: str | Path) -> pa.Table:
    """Read a metrics.parquet file, checking its columns; UserError naming the file otherwise."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: not a readable metrics Parquet file ({exc})") from None
    for name in LATER_METRIC_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.array([float("nan")] * table.num_rows, pa.float64()))
    missing = [c for c in METRIC_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: metrics file lacks column(s) {', '.join(missing)}")
    return table.select(list(METRIC_COLUMNS)).cast(METRICS_SCHEMA)


CONSOLE_FIELDS = (
    ("epoch", "epoch", "{:.2f}"), ("loss", "loss", "{:.4f}"), ("rewards/accuracies", "acc", "{:.3f}"),
    ("rewards/margins", "margin", "{:.4f}"), ("rewards/chosen", "r+", "{:.4f}"), ("rewards/rejected", "r-", "{:.4f}"),
    ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "gnorm", "{:.3f}"), ("tokens_per_second", "tok/s", "{:.0f}"),
    ("eval/loss", "eval_loss", "{:.4f}"), ("eval/rewards/accuracies", "eval_acc", "{:.3f}"),
    ("eval/rewards/margins", "eval_margin", "{:.4f}"), ("peak_memory_bytes", "mem", "{:.2f}GiB"),
)
"""(column, label, format) of the console line, in its order; peak memory is shown in GiB."""


def format_row(row: Mapping[str, Any]) -> str:
    """One compact console line for a metrics row (absent or NaN values are left out)."""
    parts = [f"step {int(row['step'])}"]
    for name, label, fmt in CONSOLE_FIELDS:
        v = row.get(name)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            v = float(v) / 2**30 if name == "peak_memory_bytes" else float(v)
            parts.append(f"{label} {fmt.format(v)}")
    return " | ".join(parts)


class MetricsWriter:
    """Log one row per step to the console, TensorBoard and ``run_dir/metrics.parquet``.

    ``resume_step``: None starts a fresh log (an existing metrics file is
    replaced at the first flush); an int keeps the existing rows with
    ``step <= resume_step`` and continues after them.
    ``flush_every``: rewrite the Parquet file every this many rows; call
    ``flush()`` at each checkpoint so the file matches what was saved.
    ``console``: False for silence, True for stderr (stdout stays clean for
    ``--json``), or a text stream.
    ``sinks``: more destinations (e.g. accelerate's trackers): each is called
    as ``sink(row, step)`` with the row's measured values under TRL's names.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        *,
        resume_step: int | None = None,
        flush_every: int = 10,
        console: bool | TextIO = True,
        sinks: tuple = (),
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.flush_every = flush_every
        self._stream: TextIO | None = sys.stderr if console is True else (console or None)
        self._rows: list[dict[str, Any]] = []
        self._unflushed = 0
        self._closed = False
        if resume_step is not None and self.path.exists():
            table = read_metrics(self.path)
            self._rows = [r for r in table.to_pylist() if r["step"] <= resume_step]
            if len(self._rows) != table.num_rows:
                self._unflushed = 1  # the dropped rows must leave the file at the next flush
        elif self.path.exists():
            self._unflushed = 1  # a fresh run replaces an old file even if it logs nothing
        self._sinks = list(sinks)
        self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, resume_step) if tensorboard else None

    def log(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Record one step. ``row`` needs ``step``; other METRIC_COLUMNS may be absent (stored as NaN).

        Steps must increase strictly; unknown keys are a programming error (ValueError).
        """
        if self._closed:
            raise RuntimeError("MetricsWriter is closed")
        unknown = sorted(set(row) - set(METRIC_COLUMNS))
        if unknown:
            raise ValueError(f"unknown metric column(s): {', '.join(unknown)}; expected {METRIC_COLUMNS}")
        if "step" not in row:
            raise ValueError("metrics row needs a 'step'")
        step = int(row["step"])
        if self._rows and step <= self._rows[-1]["step"]:
            raise ValueError(f"metrics step {step} is not after the last logged step {self._rows[-1]['step']}")
        clean: dict[str, Any] = {"step": step}
        for name in METRIC_COLUMNS[1:]:
            v = row.get(name)
            clean[name] = float("nan") if v is None else float(v)  # float() also unwraps 0-d tensors
        self._rows.append(clean)
        self._unflushed += 1
        if self._stream is not None:
            print(format_row(clean), file=self._stream, flush=True)
        measured = {TB_TAGS[k]: v for k, v in clean.items() if k != "step" and not math.isnan(v)}
        if self._tb is not None:
            for tag, v in measured.items():
                self._tb.add_scalar(tag, v, global_step=step)
        for sink in self._sinks:
            sink(measured, step)
        if self._unflushed >= self.flush_every:
            self.flush()
        return clean

    def flush(self) -> None:
        """Rewrite metrics.parquet atomically with every row so far; flush TensorBoard."""
        if self._unflushed or not self.path.exists():
            # Whole-file rewrite through a temporary name: readers (and a
            # crash) only ever see the previous complete file or this one.
            with atomic_path(self.path, record=True) as tmp:
                pq.write_table(pa.Table.from_pylist(self._rows, schema=METRICS_SCHEMA), tmp)
            self._unflushed = 0
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
        self._closed = True

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tensorboard(log_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # the tensorboard package is optional at run time
        warnings.warn(f"TensorBoard logging disabled: {exc}", stacklevel=3)
        return None
    # purge_step discards events at or after it left by a killed run, so the
    # resumed curve is not drawn twice.
    purge = None if resume_step is None else resume_step + 1
    make_dir(log_dir)
    before = set(os.listdir(log_dir))
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
    writer.flush()
    for name in sorted(set(os.listdir(log_dir)) - before):  # the event file this writer opened
        claim(log_dir / name)
    return writer


class StepBar:
    """A progress bar with ETA over the optimizer steps (tqdm's, as transformers' Trainer shows), on stderr when
    it is a terminal and progress is on (main process only). ``stream`` is where metric lines go meanwhile:
    through the bar, so it stays whole; without a bar it is None and lines go to stderr as before."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        from tqdm import tqdm  # here: report reads this module's metrics and draws no bar

        from pipeline.core.progress import PlainProgress, stage_label

        self.bar = self.plain = None
        out = sys.stderr
        if enabled and hasattr(out, "isatty") and out.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=stage_label(desc), unit="step", file=out,
                            dynamic_ncols=True)
        elif enabled and total > initial:  # a log file: plain periodic lines with the ETA (pipeline.core.progress)
            self.plain = PlainProgress(desc, total - initial, "steps")
        self.stream = _BarStream(self.bar) if self.bar is not None else None

    def step(self, loss: float | None = None) -> None:
        if self.plain is not None:
            self.plain.advance(1)
        if self.bar is not None:
            if loss is not None and loss == loss:
                self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()
        if self.bar is not None:
            self.bar.close()


class _BarStream:
    """A text stream whose whole lines are printed above the bar (tqdm.write)."""

    def __init__(self, bar):
        self.bar, self.buffer = bar, ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.bar.write(line, file=self.bar.fp)
        return len(text)

    def flush(self) -> None:
        pass
