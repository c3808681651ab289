"""The reference-score cache on disk: fingerprints, part files, reading back.

A cache is a folder of Parquet part files (``part-NNNNN.parquet``, SCORES_SCHEMA)
plus ``manifest.json``. While scoring runs, ``fingerprint.json`` records what
the parts belong to, so a resumed run can prove the parts on disk were made
with the same settings; the manifest is written once, last, and marks the
cache complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.schemas import SCORES_MANIFEST, SCORES_SCHEMA

IN_PROGRESS = "fingerprint.json"
PART_PATTERN = re.compile(r"^part-(\d{5})\.parquet$")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def fingerprint_digest(fields: dict[str, Any]) -> str:
    """A short hash of the canonical JSON of every field that changes a score."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Names of the fingerprint fields whose values differ (missing counts as different)."""
    keys = sorted(set(expected) | set(found))
    return [k for k in keys if json.dumps(expected.get(k), sort_keys=True, default=str)
            != json.dumps(found.get(k), sort_keys=True, default=str)]


def describe_difference(expected: dict[str, Any], found: dict[str, Any], field: str) -> str:
    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    return f"{field}: cache has {short(found.get(field))}, this run has {short(expected.get(field))}"


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_part(path: str | Path, columns: list[str] | None = None, expected_sha256: str | None = None) -> pa.Table:
    """One part file; a one-line error naming it when its checksum differs or it does not read."""
    path = Path(path)
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise UserError(f"{path}: part file differs from the checksum in the manifest (altered or cut short); "
                        "rerun score-ref with --overwrite to rebuild the cache")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: part file does not read as Parquet ({first}); rerun score-ref to rebuild "
                        "the cache") from None


def existing_parts(directory: Path) -> dict[int, Path]:
    """Finished part files by index (temporary leftovers never match the pattern)."""
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.iterdir():
        m = PART_PATTERN.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


@dataclass
class ScoresCache:
    """A finished cache, opened for reading."""

    directory: Path
    manifest: dict[str, Any]
    _verified: set = field(default_factory=set, repr=False)  # parts whose checksum matched, by (name, size, mtime)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def parts(self) -> list[Path]:
        """The part files the manifest lists (stray files in the folder are not part of the cache)."""
        listed = self.manifest.get("parts")
        if listed is None:
            return [p for _, p in sorted(existing_parts(self.directory).items())]
        missing = [name for name in listed if not (self.directory / name).is_file()]
        if missing:
            raise UserError(f"{self.directory}: part file {missing[0]} listed in the manifest is missing")
        return [self.directory / name for name in listed]

    def table(self, columns: list[str] | None = None) -> pa.Table:
        sums = self.manifest.get("part_sha256") or {}
        tables = []
        for p in self.parts:
            st = p.stat()
            key = (p.name, st.st_size, st.st_mtime_ns)
            tables.append(read_part(p, columns, None if key in self._verified else sums.get(p.name)))
            self._verified.add(key)
        if not tables:
            return SCORES_SCHEMA.empty_table() if columns is None else pa.table(
                {c: pa.array([], SCORES_SCHEMA.field(c).type) for c in columns})
        return pa.concat_tables(tables)

    def rows(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        """Rows in a stable order (by pair_id), optionally one split only."""
        table = self.table()
        if split is not None:
            table = table.filter(pa.compute.equal(table["split"], split))
        table = table.sort_by("pair_id")
        yield from table.to_pylist()


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
    return ScoresCache(directory, manifest)
