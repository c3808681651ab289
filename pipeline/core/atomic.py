"""Output files: written under a temporary name and renamed, recorded, never someone else's removed.

- Atomic: ``atomic_path``/``atomic_dir`` write beside the target and rename, so a crash at any
  moment leaves the old file or folder under the final name, or the new one, never a half one.
- Umask: temporary files are made by ``mkstemp``/``mkdtemp`` (0600/0700, so no other process sees
  a file before it is whole); they get the mode the umask gives any other tool's output before the
  rename, so shared (group) folders work.
- Leftovers: a temporary name says whose it is: ``.<target>.<kind>.lldm-<host>-<pid>.<random>.tmp``.
  The first write of a process into a folder (and ``sweep_stale``) removes those of a process that
  is no longer running on this host; a live run's, another host's and any other file are left alone.
- Ownership: a folder lldm-dpo writes into and later cleans keeps a record, ``.lldm-dpo-written``
  (one JSON string per line: the names it wrote there, added before each rename). Removal
  (``remove_owned``, ``clear_owned``) deletes only recorded names; anything else in the folder is
  the user's and stays. A folder built by ``atomic_dir`` records its own content the same way, and
  replacing it carries the user's files in the old folder over to the new one.
- No overwrite: ``atomic_path`` never replaces a file lldm-dpo did not record writing
  (``check_replaceable``, the one rule every stage's outputs follow); every target it writes is recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.core.errors import UserError

LEDGER = ".lldm-dpo-written"
"""The record of what lldm-dpo wrote in a folder (hidden, one JSON string per line)."""

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>file|new|old)\.lldm-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]*\.tmp$")


def _temp_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}.lldm-{_HOST}-{os.getpid()}."


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (thread safe)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


# --- temporary names and leftovers --------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that lldm-dpo processes, now dead, left in ``folder``.

    Only names made by this module on this host, whose process is no longer running, are
    touched (``name``: only those of that target). A folder set aside while replacing a
    model folder first gives the user's files it still holds back to the target. Returns what
    was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in list(folder.iterdir()):
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        if m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old":
            if _finish_carry(entry / m["name"], folder / m["name"]):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


_swept: set[str] = set()


def _prepare_folder(folder: Path) -> None:
    """Create ``folder``; the first write of this process into it also runs ``sweep_stale`` (once, not per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.absolute())
    if key not in _swept:
        sweep_stale(folder)
        _swept.add(key)


def _finish_carry(old: Path, target: Path) -> bool:
    """Move the user's files of a set-aside folder into ``target``; True when none is left behind."""
    if not old.is_dir():
        return True
    foreign = foreign_entries(old)
    if foreign and not target.is_dir():
        return False
    ok = True
    for entry in foreign:
        if os.path.lexists(target / entry.name):
            ok = False
        else:
            os.replace(entry, target / entry.name)
    return ok


# --- the ownership record ---------------------------------------------------------------

_cache: dict[str, tuple[tuple, set[str]]] = {}


def _signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def recorded_names(folder: str | os.PathLike) -> set[str]:
    """Names lldm-dpo recorded as written in ``folder``."""
    ledger = Path(folder) / LEDGER
    try:
        text = ledger.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return set()
    names = set()
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, str):
                names.add(value)
    return names


def claim(path: str | os.PathLike) -> None:
    """Record ``path`` as written by lldm-dpo in its folder's record (before it is renamed there)."""
    path = Path(path)
    ledger = path.parent / LEDGER
    key = str(ledger.absolute())
    sig = _signature(ledger)
    cached = _cache.get(key)
    names = cached[1] if cached is not None and cached[0] == sig else (recorded_names(path.parent) if sig else set())
    if path.name in names:
        _cache[key] = (sig, names)
        return
    with open(ledger, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(path.name) + "\n")
    names.add(path.name)
    _cache[key] = (_signature(ledger), names)


def _write_record(folder: Path, names: Iterable[str]) -> None:
    names = sorted(set(names))
    ledger = folder / LEDGER
    _cache.pop(str(ledger.absolute()), None)
    if not names:
        ledger.unlink(missing_ok=True)
        return
    ledger.write_text("".join(json.dumps(n) + "\n" for n in names), encoding="utf-8")


def _seal_tree(root: Path) -> None:
    """Give a freshly built folder's content the umask's modes and record all of it as written by lldm-dpo."""
    for dirpath, dirnames, filenames in os.walk(root):
        follow_umask(dirpath, directory=True)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                follow_umask(path, directory=False)
        _write_record(Path(dirpath), [n for n in dirnames + filenames if n != LEDGER])


def is_owned(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.name in recorded_names(path.parent)


def check_replaceable(path: str | os.PathLike, flag: str = "output path") -> None:
    """The ownership rule for every output: an existing ``path`` must be one lldm-dpo recorded writing.

    A user's file (or one an old version wrote without a record) at an output path is a one-line
    error, never replaced; ``flag`` names the option that chose the path, for the advice.
    """
    path = Path(path)
    if os.path.lexists(path) and not is_owned(path):
        raise UserError(f"{path}: exists and was not written by lldm-dpo (not in {path.parent / LEDGER}); "
                        f"move it away or choose another {flag}")


def foreign_entries(folder: str | os.PathLike) -> list[Path]:
    """Entries of ``folder`` that lldm-dpo did not record (the user's), temporary names excepted."""
    folder = Path(folder)
    names = recorded_names(folder)
    return sorted(p for p in folder.iterdir() if p.name != LEDGER and p.name not in names and not _TEMP.match(p.name))


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p``; a folder this call creates is recorded in its parent as lldm-dpo's."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        claim(path)
        path.mkdir(exist_ok=True)
    return path


def remove_owned(path: str | os.PathLike) -> list[Path]:
    """Remove ``path`` if lldm-dpo recorded writing it; a folder loses only what it recorded.

    Returns the entries left in place (the user's files, or ``path`` itself when it is not
    lldm-dpo's); a folder that still holds any stays.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return []
    if not is_owned(path):
        return [path]
    return _remove(path)


def _remove(path: Path) -> list[Path]:
    if path.is_dir() and not path.is_symlink():
        left = clear_owned(path)
        if not left:
            with contextlib.suppress(OSError):
                path.rmdir()
        return left
    path.unlink(missing_ok=True)
    return []


def clear_owned(folder: str | os.PathLike) -> list[Path]:
    """Remove what lldm-dpo recorded writing inside ``folder`` (and its dead runs' temporary files).

    The folder itself and everything else in it stay; returns what was left.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    sweep_stale(folder)
    names = recorded_names(folder)
    left: list[Path] = []
    still_ours = set()
    for child in sorted(folder.iterdir()):
        if child.name == LEDGER:
            continue
        if child.name in names:
            rest = _remove(child)
            if rest:
                still_ours.add(child.name)
            left += rest
        else:
            left.append(child)
    _write_record(folder, still_ours)
    return left


# --- atomic writes ------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, record: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success.

    On an exception the temporary file is removed and ``target`` is untouched. An existing
    ``target`` that lldm-dpo did not record writing is refused (``check_replaceable``), before
    and again just before the rename; the target's name goes into its folder's ownership record
    (``record=False``: not recorded, for a file no later run replaces).
    """
    target = Path(target)
    check_replaceable(target)
    _prepare_folder(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name, "file"), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        follow_umask(tmp_path, directory=False)
        yield tmp_path
        follow_umask(tmp_path, directory=False)  # a writer that replaced the file (0600 temp of its own)
        _fsync(tmp_path)
        check_replaceable(target)  # a user's file that appeared while we wrote
        if record:
            claim(target)
        os.replace(tmp_path, target)
        _fsync(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, record: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole.

    The new folder records its content as lldm-dpo's. A previous ``target`` is renamed aside,
    the new one renamed in, then the old one's files that lldm-dpo did not write are moved
    into the new one (a name clash is refused before anything moves) and the rest is
    removed. With ``record`` the target is recorded in its parent folder.
    """
    target = Path(target)
    if os.path.lexists(target) and (not target.is_dir() or target.is_symlink()):
        check_replaceable(target)  # a user's file where the folder goes: refused before any work
        raise UserError(f"{target}: exists and is not a folder; move it away")
    _prepare_folder(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name, "new"), suffix=".tmp", dir=target.parent))
    try:
        follow_umask(tmp, directory=True)
        yield tmp
        _seal_tree(tmp)  # safetensors and others write their files 0600: the umask decides, as elsewhere
        carried: list[Path] = []
        if os.path.lexists(target):
            if not target.is_dir() or target.is_symlink():
                raise UserError(f"{target}: exists and is not a folder; move it away")
            carried = foreign_entries(target)
            clash = [p for p in carried if os.path.lexists(tmp / p.name)]
            if clash:
                raise UserError(f"{clash[0]}: was not written by lldm-dpo and is in the way of the new "
                                f"{target.name}; move it away")
        if record:
            claim(target)
        if not os.path.lexists(target):
            os.replace(tmp, target)
            _fsync(target.parent)
            return
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name, "old"), suffix=".tmp", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        _fsync(target.parent)
        for entry in carried:
            os.replace(old / target.name / entry.name, target / entry.name)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str, *, record: bool = True) -> None:
    with atomic_path(target, record=record) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | os.PathLike, obj, *, record: bool = True) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True) + "\n", record=record)


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in blocks: the one file hasher (cache parts, inputs, weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, what: str = "output", *, file: bool = False) -> None:
    """A one-line error now, before any slow work, when ``path`` cannot be created or written.

    Checks the nearest existing folder on the way to ``path``: it must be a folder this
    process may write into (and ``path``, when present, writable). With ``file``, ``path``
    names a file: a folder there is an error too. Nothing is created.
    """
    path = Path(path).expanduser()
    if file and path.is_dir():
        raise UserError(f"{path}: the {what} is a folder; give a file path")
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path or path.is_dir():
        if not probe.is_dir():
            raise UserError(f"{path}: cannot write the {what} here: {probe} is not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"{path}: cannot write the {what} here: folder {probe} is not writable")
    elif not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write the {what}: permission denied")


def _fsync(path: Path) -> None:
    # A folder's: makes the rename itself durable; not supported everywhere, so best effort.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
