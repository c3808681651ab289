"""pipeline.core.lock: one run per output at a time; the second refuses naming the first; stale locks taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.core.atomic import _HOST
from pipeline.core.errors import UserError
from pipeline.core.lock import lock_path, output_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_refuses_naming_the_owner(tmp_path):
    out = tmp_path / "cache"
    lock = lock_path(out, folder=True)
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": _HOST, "pid": os.getppid(), "stage": "score-ref", "started": "then"}))
    with pytest.raises(UserError, match=rf"another lldm-dpo run is writing here: score-ref \(pid {os.getppid()} "
                                        rf"on {_HOST}, since then\); wait for it to finish, or remove {lock}"):
        with output_lock(out, "score-ref", folder=True):
            pass
    assert lock.exists()  # a live owner's lock is never touched


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    out = tmp_path / "pairs.arrow"
    lock = lock_path(out, folder=False)
    assert lock.name == ".pairs.arrow.lldm-dpo.lock"
    lock.write_text(json.dumps({"host": _HOST, "pid": _dead_pid(), "stage": "ingest"}))
    with output_lock(out, "ingest", folder=False):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with output_lock(out, "ingest", folder=False):  # the holder may take it again
            pass
        assert lock.exists()
    assert not lock.exists()


def test_another_hosts_lock_is_not_guessed_at_and_empty_folders_go(tmp_path):
    out = tmp_path / "new" / "run"
    with output_lock(out, "train", folder=True):
        assert lock_path(out, folder=True).exists()
    assert not (tmp_path / "new").exists()  # made for the lock only, left empty: removed
    out.mkdir(parents=True)
    lock_path(out, folder=True).write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid()}))
    with pytest.raises(UserError, match="pid .* on elsewhere"):
        with output_lock(out, "train", folder=True):
            pass


def test_score_ref_into_a_folder_another_run_is_writing_refuses_before_scoring(small_pairs, tmp_path):
    """Two score-ref runs into one folder used to both score everything; the second now refuses at once."""
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref

    out = tmp_path / "c"
    out.mkdir()
    lock = lock_path(out, folder=True)
    lock.write_text(json.dumps({"host": _HOST, "pid": os.getppid(), "stage": "score-ref", "started": "now"}))
    with pytest.raises(UserError, match="another lldm-dpo run is writing here: score-ref"):
        score_ref(ScoreRefConfig(pairs=small_pairs, model="micro", out=out, samples=1, device="cpu", progress=False))
    assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing scored, nothing written
