"""Progress for long stages: a live bar on a terminal (rich), plain periodic lines when not, quiet when not wanted.

Every stage draws its bar through here: ``progress_bar`` for counted items
(pairs, prompts), ``byte_progress`` for input read in bytes (ingest). On a
terminal the bar shows rate, throughput, elapsed time and ETA; when stderr is
not a terminal (a log file, CI, a pipe) the same figures go out as one plain
line every ``PLAIN_EVERY_SECONDS`` (env ``LLDM_DPO_PROGRESS_SECONDS``), plus a
closing line when any was written, so a long stage is never silent.

``stage(label, since)``: inside ``lldm-dpo run`` every bar and line carries the
stage the run is in (``round 1: eval``) and the run's time so far; ``stage_timer`` runs each of run's
stages under it, logging its start and its seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def _every_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("LLDM_DPO_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


PLAIN_EVERY_SECONDS = _every_seconds()
"""Seconds between plain progress lines when stderr is not a terminal."""

_STAGE: dict[str, object] = {"label": None, "since": None}
"""The stage `run` is in and when the run started (perf_counter), for every bar drawn meanwhile."""


@contextlib.contextmanager
def stage(label: str, since: float | None = None) -> Iterator[None]:
    """Within it, bars and progress lines are prefixed ``[label]`` and show the time since ``since``."""
    old = dict(_STAGE)
    _STAGE.update(label=label, since=time.perf_counter() if since is None else since)
    try:
        yield
    finally:
        _STAGE.update(old)


def fmt_duration(seconds: float) -> str:
    """``47s``, ``3m05s``, ``1h02m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def stage_timer(log, times: dict[str, float], r: int | None = None, since: float | None = None):
    """``timed(name, fn, stage_cfg)``: runs one stage, logging it (within round ``r``) and its seconds in ``times``;
    the progress drawn meanwhile names the stage and the time since ``since`` (the run's start)."""
    since = time.perf_counter() if since is None else since

    def timed(name, fn, stage_cfg):
        t0 = time.perf_counter()
        label = name if r is None else f"round {r}: {name}"
        log(f"[{label}] ... (run {fmt_duration(t0 - since)} so far)")
        with stage(label, since):
            result = fn(stage_cfg)
        times[name] = round(time.perf_counter() - t0, 2)
        log(f"[{label}] done in {fmt_duration(times[name])} (run {fmt_duration(time.perf_counter() - since)})")
        return result

    return timed


def stage_label(description: str) -> str:
    label = _STAGE["label"]
    if not label:
        return description
    return f"[{label}]" if str(label).endswith(description) else f"[{label}] {description}"


def _run_clock() -> str:
    since = _STAGE["since"]
    return "" if since is None else f"run {fmt_duration(time.perf_counter() - since)}"  # type: ignore[operator]


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal, as rich judges it."""
    return Console(file=stream or sys.stderr).is_terminal


class _Null:
    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


class PlainProgress:
    """Progress as plain lines on a stream that is not a terminal: ``description: done/total (pct), rate,
    elapsed, eta`` every ``every`` seconds, and a closing line when any was written."""

    def __init__(self, description: str, total: int, unit: str = "", stream=None, every: float | None = None):
        self.description, self.total, self.unit = stage_label(description), int(total), unit
        self.stream = stream or sys.stderr
        self.every = PLAIN_EVERY_SECONDS if every is None else every
        self.done, self.start = 0, time.perf_counter()
        self.last, self.lines = self.start, 0

    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.line(now)

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.description}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"]
        if rate:
            parts.append(f"{rate:.3g}{unit}/s")
        if final:
            parts.append(f"done in {fmt_duration(elapsed)}")
        else:
            parts.append(f"elapsed {fmt_duration(elapsed)}")
            if rate:
                parts.append(f"eta {fmt_duration((self.total - self.done) / rate)}")
        clock = _run_clock()
        text = ", ".join(parts) + (f" ({clock})" if clock else "")
        print(text, file=self.stream, flush=True)
        self.lines += 1
        return text

    def close(self) -> None:
        if self.lines:
            self.line(final=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, extra: str = "", unit: str = "") -> Iterator:
    """Yield an object with ``advance(n, **fields)``; draws on stderr only when enabled: a live bar on a terminal,
    plain periodic lines otherwise.

    ``extra`` is a rich format string over task fields (for example
    ``"{task.fields[tps]}"``) so a stage can show tokens/s beside pairs/s.
    """
    if not enabled or total <= 0:
        yield _Null()
        return
    console = Console(file=sys.stderr)
    if not console.is_terminal:
        plain = PlainProgress(description, total, unit)
        try:
            yield plain
        finally:
            plain.close()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
    ]
    if extra:
        columns.append(TextColumn(extra))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if _STAGE["since"] is not None:
        columns.append(TextColumn("{task.fields[clock]}", style="dim"))
    with Progress(*columns, console=console, transient=False) as progress:
        blank = {name: "" for name in re.findall(r"task\.fields\[(\w+)\]", extra)}
        task = progress.add_task(stage_label(description), total=total, rate="", clock=_run_clock(), **blank)

        class _Bar:
            def advance(self, n: int = 1, **fields) -> None:
                progress.advance(task, n)
                speed = progress.tasks[task].speed
                fields.setdefault("rate", f"{speed:.2f} {unit}/s".replace(" /", "/") if speed else "")
                progress.update(task, clock=_run_clock(), **fields)

        yield _Bar()


def byte_progress(description: str) -> Progress:
    """A transient bar over bytes read (size, transfer rate, ETA), on stderr; the caller starts and stops it."""
    return Progress(TextColumn(stage_label(description)), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
