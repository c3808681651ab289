"""One run of a stage at a time per output: a lock file beside (or in) what it writes.

Two ``score-ref`` runs into one folder would both score everything, two ``train`` runs would interleave
checkpoints. A stage takes ``output_lock(target)`` before it writes; a second run refuses at once, naming
the owner (host, pid, command, start time) and the lock file. A lock whose process is gone (same host, pid
no longer running) is stale and taken over; one of another host is never guessed at. Only the main process
of a multi-process launch (``RANK`` 0) locks: its other processes write into the same run by design.
A process may take a lock it already holds (a stage calling another into the same place).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from pipeline.core.atomic import _HOST, _alive, check_writable
from pipeline.core.errors import UserError

LOCK_SUFFIX = ".lldm-dpo.lock"
_held: dict[str, int] = {}


def lock_path(target: str | os.PathLike, folder: bool) -> Path:
    """``DIR/.lldm-dpo.lock`` for an output folder, ``.NAME.lldm-dpo.lock`` beside an output file."""
    target = Path(target)
    return target / LOCK_SUFFIX if folder else target.with_name(f".{target.name}{LOCK_SUFFIX}")


def _owner(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _zombie(pid: int) -> bool:
    """A killed process not yet reaped (its parent killed too) still answers kill(pid, 0): it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _is_stale(owner: dict) -> bool:
    pid = owner.get("pid")
    return owner.get("host") == _HOST and isinstance(pid, int) and (not _alive(pid) or _zombie(pid))


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, stage: str, *, folder: bool, what: str = "") -> Iterator[Path | None]:
    """Hold the lock of ``target`` (an output folder, or an output file) while the block runs; ``what`` names
    the output in the error when it cannot be written."""
    if os.environ.get("RANK", "0") not in ("", "0"):  # not the main process
        yield None
        return
    path = lock_path(target, folder)
    key = str(path.absolute())
    if key in _held:  # this process holds it already
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    check_writable(target, what or f"{stage} output")  # the stage's own one-line error, before a folder is made
    if folder and os.path.lexists(target) and not Path(target).is_dir():
        raise UserError(f"{target}: a file is there, and the {what or stage + ' output'} is a folder; choose "
                        "another --out (nothing was written)")
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed again when left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"host": _HOST, "pid": os.getpid(), "stage": stage,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            owner = _owner(path)
            if owner is None:
                continue  # released meanwhile: try again
            if _is_stale(owner):
                # Its process is gone: take it over (a rename, so two takers cannot both win on one name).
                aside = path.with_name(path.name + f".stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, aside)
                    moved = _owner(aside)
                    if moved and not _is_stale(moved):  # another taker's fresh lock, moved by mistake: put it back
                        with contextlib.suppress(FileExistsError):
                            os.link(aside, path)
                    os.unlink(aside)
                continue
            who = (f"{owner.get('stage', 'lldm-dpo')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
                   f"since {owner.get('started', '?')})") if owner else "another run (unreadable lock)"
            raise UserError(f"{target}: another lldm-dpo run is writing here: {who}; wait for it to finish, or "
                            f"remove {path} if that run is gone") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(record)
        break
    else:
        raise UserError(f"{target}: could not take the lock {path}; retry")
    _held[key] = 1
    try:
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            if (_owner(path) or {}).get("pid") == os.getpid():
                path.unlink()
        for folder in made:  # innermost first: a run that failed before writing leaves no empty folders
            try:
                folder.rmdir()
            except OSError:
                break
