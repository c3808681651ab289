"""Reading a finished reference-score cache: its part files, its rows in a stable order, one split read on demand.

A cache is a folder of Parquet part files (``part-NNNNN.parquet``, SCORES_SCHEMA)
plus ``manifest.json``. While scoring runs, ``fingerprint.json`` records what
the parts belong to, so a resumed run can prove the parts on disk were made
with the same settings; the manifest is written once, last, and marks the
cache complete (pipeline.refcache.writer writes them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.atomic import file_sha256
from pipeline.core.errors import UserError
from pipeline.core.schemas import (
    IDS_COLUMNS,
    LEN_COLUMNS,
    PAIR_ID_COLUMN,
    SCORES_MANIFEST,
    SCORES_SCHEMA,
    SPLIT_COLUMN,
    split_of,
)
from pipeline.refcache.manifest import CacheManifest

IN_PROGRESS = "fingerprint.json"
PART_PATTERN = re.compile(r"^part-(\d{5})\.parquet$")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def check_part_checksum(path: Path, expected_sha256: str | None) -> None:
    """A one-line error naming the part when its sha256 is not the manifest's (nothing to check without one)."""
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise UserError(f"{path}: part file differs from the checksum in the manifest (altered or cut short); "
                        "rerun score-ref with --overwrite to rebuild the cache")


def read_part(path: str | Path, columns: list[str] | None = None, expected_sha256: str | None = None) -> pa.Table:
    """One part file; a one-line error naming it when its checksum differs or it does not read."""
    path = Path(path)
    check_part_checksum(path, expected_sha256)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{path}: part file does not read as Parquet ({first}); rerun score-ref to rebuild the cache")


def existing_parts(directory: Path) -> dict[int, Path]:
    """Finished part files by index (temporary leftovers never match the pattern)."""
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): p for p in directory.iterdir() if (m := PART_PATTERN.match(p.name))}


@dataclass
class ScoresCache:
    """A finished cache, opened for reading."""

    directory: Path
    manifest: CacheManifest
    _verified: set = field(default_factory=set, repr=False)  # parts whose checksum matched, by (name, size, mtime)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest.fingerprint

    @property
    def parts(self) -> list[Path]:
        """The part files the manifest lists (stray files in the folder are not part of the cache)."""
        listed = self.manifest.parts
        if listed is None:
            return [p for _, p in sorted(existing_parts(self.directory).items())]
        missing = [name for name in listed if not (self.directory / name).is_file()]
        if missing:
            raise UserError(f"{self.directory}: part file {missing[0]} listed in the manifest is missing")
        return [self.directory / name for name in listed]

    def verify_part(self, path: Path) -> None:
        """Check one part against the manifest's checksum, once per (name, size, mtime)."""
        st = path.stat()
        key = (path.name, st.st_size, st.st_mtime_ns)
        if key in self._verified:
            return
        check_part_checksum(path, self.manifest.part_sha256.get(path.name))
        self._verified.add(key)

    def read(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        """One of its parts, checked against the manifest's checksum on this read."""
        return read_part(path, columns, self.manifest.part_sha256.get(path.name))

    def table(self, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for p in self.parts:
            self.verify_part(p)
            tables.append(read_part(p, columns))
        if not tables:
            return SCORES_SCHEMA.empty_table() if columns is None else SCORES_SCHEMA.empty_table().select(columns)
        return pa.concat_tables(tables)

    def split_rows(self, split: str | None = None, *, skip_identical: bool = False,
                   columns: list[str] | None = None) -> "SplitRows":
        """The split's rows in ``rows()``'s order, read on demand (see ``SplitRows``)."""
        return SplitRows(self, split, skip_identical=skip_identical, columns=columns)

    def rows(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        """Rows in a stable order (by pair_id), optionally one split only (all in memory: see split_rows)."""
        table = self.table()
        if split is not None:
            table = table.filter(pc.equal(table[SPLIT_COLUMN], split))
        yield from table.sort_by(PAIR_ID_COLUMN).to_pylist()


def open_cache(directory: str | Path) -> ScoresCache:
    """Open a finished cache; a clear error when it is missing or unfinished."""
    directory = Path(directory)
    manifest_path = directory / SCORES_MANIFEST
    if not manifest_path.exists():
        if (directory / IN_PROGRESS).exists():
            raise UserError(f"{directory}: reference-score cache is unfinished (no {SCORES_MANIFEST}); "
                            "rerun the same score-ref command to resume it")
        raise UserError(f"{directory}: not a reference-score cache (no {SCORES_MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{manifest_path}: invalid JSON: {exc}") from None
    if "fingerprint" not in manifest:
        raise UserError(f"{manifest_path}: missing field 'fingerprint'")
    return ScoresCache(directory, CacheManifest(manifest))


_RESPONSE_IDS = (IDS_COLUMNS["chosen"], IDS_COLUMNS["rejected"])
_RESPONSE_LENS = (LEN_COLUMNS["chosen"], LEN_COLUMNS["rejected"])


def _identical_rows(ids: pa.Table, candidates: pa.ChunkedArray) -> set[int]:
    """Rows (among the candidates, whose two responses have equal lengths) with equal response ids.

    Vectorised: with equal row lengths the flattened values line up, so one
    element-wise comparison and a per-row AND over the list offsets decide.
    """
    rows = pc.indices_nonzero(candidates).to_numpy()
    chosen = ids[IDS_COLUMNS["chosen"]].combine_chunks().take(pa.array(rows))
    rejected = ids[IDS_COLUMNS["rejected"]].combine_chunks().take(pa.array(rows))
    equal = (chosen.flatten().to_numpy(zero_copy_only=False) == rejected.flatten().to_numpy(zero_copy_only=False))
    offsets = chosen.offsets.to_numpy()
    return {row for k, row in enumerate(rows.tolist()) if bool(equal[offsets[k]:offsets[k + 1]].all())}


class SplitRows:
    """One split of a cache as a sequence of row dicts, read from the Parquet parts on demand.

    Only an index is held in memory: per row its pair_id, part and row group
    (sorted by pair_id, the order ``ScoresCache.rows`` gives). ``rows[i]`` and
    ``rows.take(indices)`` decode just the row groups that hold the asked rows,
    so a process that trains on its own micro-batches never holds the split's
    token ids, and host memory does not grow with the number of pairs. A few
    recently decoded row groups are kept (``keep_groups``) for neighbouring reads.
    ``skip_identical`` leaves out pairs whose two responses are the same ids
    (checked one row group at a time, only where the lengths agree).
    """

    def __init__(self, cache: ScoresCache, split: str | None, *, skip_identical: bool = False,
                 columns: list[str] | None = None, keep_groups: int = 8):
        self.columns = columns
        self.keep_groups = keep_groups
        self._paths: list[Path] = list(cache.parts)
        for p in self._paths:  # a cut or altered part fails here, by name, before any row is used
            cache.verify_part(p)
        self._open: dict[int, pq.ParquetFile] = {}
        self._groups: dict[tuple[int, int], pa.Table] = {}
        index: list[tuple[str, int, int, int]] = []  # (pair_id, part, row group, row in group)
        self.identical: list[str] = []
        for part_i in range(len(self._paths)):
            pf = self._file(part_i)
            for g in range(pf.metadata.num_row_groups):
                meta = pf.read_row_group(g, columns=[PAIR_ID_COLUMN, SPLIT_COLUMN, *_RESPONSE_LENS])
                keep = pc.equal(meta[SPLIT_COLUMN], split) if split is not None else pa.array([True] * meta.num_rows)
                same_len = pc.and_(pc.equal(*(meta[c] for c in _RESPONSE_LENS)), keep)
                same_rows = set()
                if skip_identical and pc.any(same_len).as_py():
                    same_rows = _identical_rows(pf.read_row_group(g, columns=[*_RESPONSE_IDS]),
                                                same_len)
                for r, (pid, kept) in enumerate(zip(meta[PAIR_ID_COLUMN].to_pylist(), keep.to_pylist())):
                    if kept and r in same_rows:
                        self.identical.append(pid)
                    elif kept:
                        index.append((pid, part_i, g, r))
        index.sort(key=lambda t: t[0])
        self.pair_ids = [t[0] for t in index]
        self._where = [(t[1], t[2], t[3]) for t in index]

    def __len__(self) -> int:
        return len(self._where)

    def _file(self, part: int) -> pq.ParquetFile:
        """A few parts stay open; no memory map, whose touched pages would count in the resident size."""
        pf = self._open.pop(part, None)
        if pf is None:
            try:
                pf = pq.ParquetFile(self._paths[part], memory_map=False)
            except (pa.ArrowException, OSError) as exc:
                raise _unreadable(self._paths[part], exc) from None
        self._open[part] = pf
        while len(self._open) > self.keep_groups:
            self._open.pop(next(iter(self._open))).close()
        return pf

    def _group(self, part: int, group: int) -> pa.Table:
        key = (part, group)
        table = self._groups.pop(key, None)
        if table is None:
            table = self._file(part).read_row_group(group, columns=self.columns)
        self._groups[key] = table  # most recent last; kept as Arrow, converted one row at a time
        while len(self._groups) > self.keep_groups:
            self._groups.pop(next(iter(self._groups)))
        return table

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        part, group, row = self._where[i]
        return self._group(part, group).slice(row, 1).to_pylist()[0]

    def limit(self, n: int) -> "SplitRows":
        """The first ``n`` rows (all when n <= 0), still read on demand."""
        if n > 0:
            self.pair_ids, self._where = self.pair_ids[:n], self._where[:n]
        return self

    def column(self, name: str) -> list[Any]:
        """One column for every row, in order, reading only that column of each row group."""
        values: dict[tuple[int, int], list[Any]] = {}
        out = []
        for part, group, row in self._where:
            if (part, group) not in values:
                values[(part, group)] = self._file(part).read_row_group(group, columns=[name])[name].to_pylist()
            out.append(values[(part, group)][row])
        return out

    def take(self, indices) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def cache_part_paths(cache: ScoresCache, *, split: str | None = None, pair_ids=None) -> list[Path]:
    """The parts of ``cache`` that hold a row of ``split`` or one of ``pair_ids`` (only their pair_id and
    split columns are read here; ``read_whole_part`` reads one when it is scored)."""
    wanted = set(pair_ids) if pair_ids is not None else None
    out = []
    for path in cache.parts:
        meta = cache.read(path, [PAIR_ID_COLUMN, SPLIT_COLUMN]).to_pylist()
        if any((split is None or split_of(m.get(SPLIT_COLUMN)) == split)
               and (wanted is None or m[PAIR_ID_COLUMN] in wanted) for m in meta):
            out.append(path)
    return out


def read_whole_part(cache: ScoresCache, path: Path) -> list[dict]:
    """One part's rows in the part's order, as score-ref scored them (its checksum checked)."""
    return cache.read(path).to_pylist()
