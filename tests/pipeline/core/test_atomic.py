"""Atomic writes: the final name holds the old content or the new, never a half file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.core.atomic import LEDGER, atomic_path, write_json_atomic, write_text_atomic
from pipeline.core.errors import UserError


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "out.txt"]


def test_a_file_lldm_dpo_did_not_write_is_never_replaced(tmp_path):
    """The ownership rule every output follows (check_replaceable): refused at the start, nothing changed."""
    from pipeline.core.atomic import check_replaceable, is_owned

    target = tmp_path / "victim.jsonl"
    target.write_text("the user's")
    with pytest.raises(UserError, match="victim.jsonl: exists and was not written by lldm-dpo"):
        with atomic_path(target) as tmp:
            tmp.write_text("ours")
    assert target.read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == ["victim.jsonl"]
    with pytest.raises(UserError, match="choose another --out"):
        check_replaceable(target, "--out")
    check_replaceable(tmp_path / "absent")  # nothing there: nothing to refuse
    write_text_atomic(tmp_path / "ours.txt", "1")
    assert is_owned(tmp_path / "ours.txt")
    write_text_atomic(tmp_path / "ours.txt", "2")  # what it wrote, it replaces
    assert (tmp_path / "ours.txt").read_text() == "2"


def test_success_replaces(tmp_path):
    target = tmp_path / "sub" / "x.json"
    write_json_atomic(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_atomic_dir_replaces_whole_folder_or_leaves_the_old_one(tmp_path):
    from pipeline.core.atomic import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("crash while saving")
    assert sorted(p.name for p in target.iterdir() if p.name != LEDGER) == ["a.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir() if p.name != LEDGER) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "model"]  # no temporary leftovers


# --- umask, leftovers of killed runs, ownership ---------------------------------------------


def _mode(path):
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    from pipeline.core.atomic import atomic_dir

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask  # mkstemp alone gives 0600
    assert _mode(tmp_path / "model") == 0o777 & ~umask  # mkdtemp alone gives 0700


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_dead_run_are_removed_by_the_next_write_and_nothing_else(tmp_path):
    from pipeline.core.atomic import _HOST, atomic_dir, sweep_stale

    dead, live = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".pairs.arrow.file.lldm-{_HOST}-{dead}.abc123.tmp"
    stale_dir = tmp_path / f".final.new.lldm-{_HOST}-{dead}.abc123.tmp"
    running = tmp_path / f".pairs.arrow.file.lldm-{_HOST}-{live}.zzz999.tmp"  # a live process's: kept
    other_host = tmp_path / f".pairs.arrow.file.lldm-elsewhere-{dead}.abc123.tmp"  # cannot tell: kept
    users = tmp_path / ".pairs.arrow.mine.tmp"  # not a name lldm-dpo makes: kept
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    for p in (running, other_host, users):
        p.write_text("keep")
    write_json_atomic(tmp_path / "pairs.arrow", {})  # the first write into the folder sweeps it
    assert not stale_file.exists() and not stale_dir.exists()
    assert running.exists() and other_host.exists() and users.exists()
    stale_file.write_bytes(b"x")
    sweep_stale(tmp_path)  # what a stage calls on its output folder when it starts
    assert not stale_file.exists() and running.exists() and other_host.exists() and users.exists()
    with atomic_dir(tmp_path / "final") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir() if "lldm" in p.name and p.name != LEDGER) == sorted(
        [running.name, other_host.name])


def test_remove_owned_leaves_the_users_files(tmp_path):
    from pipeline.core.atomic import atomic_dir, clear_owned, make_dir, remove_owned

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    write_json_atomic(run / "eval.json", {}, record=True)
    ckpts = make_dir(run / "checkpoints")
    with atomic_dir(ckpts / "step-1", record=True) as tmp:
        (tmp / "w.safetensors").write_text("w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    with atomic_dir(ckpts / "step-2", record=True) as tmp:
        (tmp / "w.safetensors").write_text("w")
    (ckpts / "step-2" / "readme.md").write_text("mine")
    (ckpts / "mine.txt").write_text("mine")

    assert remove_owned(ckpts / "step-1") == [] and not (ckpts / "step-1").exists()
    assert remove_owned(run / "notes.txt") == [run / "notes.txt"]  # not ours: untouched
    left = clear_owned(run)
    assert sorted(p.relative_to(run).as_posix() for p in left) == [
        "checkpoints/mine.txt", "checkpoints/step-2/readme.md", "notes.txt"]
    assert (run / "notes.txt").read_text() == "mine" and not (run / "eval.json").exists()
    assert not (ckpts / "step-2" / "w.safetensors").exists()


def test_replacing_a_folder_carries_the_users_files_over(tmp_path):
    from pipeline.core.atomic import atomic_dir

    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("old")
    (target / "NOTES.md").write_text("mine")
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "new" and (target / "NOTES.md").read_text() == "mine"
    (target / "tokenizer.json").write_text("the user's own")  # a name the next build also writes
    with pytest.raises(UserError, match="tokenizer.json: was not written by lldm-dpo"):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("newer")
            (tmp / "tokenizer.json").write_text("{}")
    assert (target / "tokenizer.json").read_text() == "the user's own"
    assert (target / "model.safetensors").read_text() == "new"


def test_check_writable_is_one_line_before_any_work(tmp_path):
    from pipeline.core.atomic import check_writable

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"file.txt is not a folder"):
        check_writable(blocker / "sub" / "out.arrow")
    check_writable(tmp_path / "new" / "deeper" / "out.arrow")  # creatable: fine
    assert not (tmp_path / "new").exists()


def test_check_writable_of_a_file_path_refuses_a_folder_and_names_an_unwritable_one(tmp_path):
    import os

    from pipeline.core.atomic import check_writable

    with pytest.raises(UserError, match=r"the pairs file is a folder; give a file path"):
        check_writable(tmp_path, "pairs file", file=True)
    check_writable(tmp_path, "output folder")  # a folder is what a folder output wants
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UserError, match=r"folder .*ro is not writable"):
            check_writable(ro / "p.arrow", "pairs file", file=True)


def test_file_sha256_is_the_sha256_of_the_bytes_in_any_block_size(tmp_path):
    import hashlib

    from pipeline.core.atomic import file_sha256

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 50)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == file_sha256(path, block=7) == expected
