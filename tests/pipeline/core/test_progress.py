"""Progress when stderr is not a terminal: plain periodic lines with the ETA, the stage and the run's time."""

from __future__ import annotations

import io
import time

from pipeline.core import progress
from pipeline.core.progress import PlainProgress, fmt_duration, progress_bar, stage, stage_timer


def test_plain_lines_carry_count_rate_eta_stage_and_run_time():
    buf = io.StringIO()
    with stage("round 1: eval", since=time.perf_counter() - 125):
        bar = PlainProgress("eval: task accuracy (before)", 4, "questions", stream=buf, every=0.0)
        bar.advance(1)
        bar.advance(3)  # the last item: no periodic line, the closing one follows
        bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, last = lines
    assert first.startswith("[round 1: eval] eval: task accuracy (before): 1/4 (25%), ")
    assert "questions/s" in first and "elapsed 0s" in first and "eta " in first and "(run 2m05s)" in first
    assert last.startswith("[round 1: eval] eval: task accuracy (before): 4/4 (100%), ") and "done in" in last


def test_plain_lines_are_periodic_and_quiet_for_short_passes(monkeypatch):
    buf = io.StringIO()
    bar = PlainProgress("score-ref", 100, "pairs", stream=buf, every=3600.0)
    for _ in range(100):
        bar.advance(1)
    bar.close()
    assert buf.getvalue() == ""  # finished before the first period: nothing printed


def test_progress_bar_off_a_terminal_writes_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 0.0)
    with progress_bar("make-pairs", 3, unit="questions") as bar:
        for _ in range(3):
            bar.advance(1)
    err = capsys.readouterr().err
    assert "make-pairs: 1/3 (33%)" in err and "make-pairs: 3/3 (100%)" in err and "\x1b[" not in err
    with progress_bar("make-pairs", 3, enabled=False) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_fmt_duration():
    assert [fmt_duration(s) for s in (0.4, 59, 61, 3599, 3725)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]


def test_stage_timer_names_the_stage_and_the_run_time(capsys):
    lines, times = [], {}
    timed = stage_timer(lines.append, times, 2, since=time.perf_counter() - 65)
    assert timed("eval", lambda cfg: cfg + 1, 41) == 42
    assert lines[0] == "[round 2: eval] ... (run 1m05s so far)"
    assert lines[1].startswith("[round 2: eval] done in 0s (run 1m05s)") and "eval" in times
