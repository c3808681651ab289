"""Writing a reference-score cache: its folder claimed, parts planned and written atomically, a killed run
resumed, and the manifest written last.

The folder's own names (manifest, in-progress marker, parts) must be score-ref's: a user's file there is refused,
never replaced. ``check_existing`` decides between a finished cache (reused), an interrupted one (resumed at its
first missing part, after proving its parts hold what this run plans for them) and a fresh start; a cache made
with other settings is refused, or cleared of what score-ref wrote under ``overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import (
    atomic_path,
    check_replaceable,
    check_writable,
    clear_owned,
    file_sha256,
    remove_owned,
    sweep_stale,
    write_json_atomic,
)
from pipeline.core.errors import CacheMismatch, UserError
from pipeline.core.schemas import (
    DEFAULT_SPLIT,
    IDS_COLUMNS,
    LENGTH_COLUMNS,
    PAIR_ID_COLUMN,
    SCORES_MANIFEST,
    TRUNCATED_COLUMN,
)
from pipeline.refcache.fingerprint import describe_difference, fingerprint_differences
from pipeline.refcache.manifest import CacheManifest, build_manifest
from pipeline.refcache.reader import IN_PROGRESS, PART_PATTERN, existing_parts, part_name, read_part


def claim_folder(out: Path) -> None:
    """Before any slow work: ``out`` is writable, its cache names are score-ref's own (a user's file there is
    refused), and the temporary files a killed run left are swept (provably its own, its process gone)."""
    check_writable(out, "reference-score cache")
    for path in [out / SCORES_MANIFEST, out / IN_PROGRESS, *existing_parts(out).values()]:
        check_replaceable(path, "--out")
    sweep_stale(out)


def _drop_altered_parts(out: Path, manifest: dict[str, Any], fingerprint: dict[str, Any], is_main: bool) -> bool:
    """A finished cache whose parts no longer match the manifest's checksums is reopened: the altered or
    missing parts are removed (they are score-ref's own) and rescored, never reused. True when reopened."""
    sums = CacheManifest(manifest).part_sha256
    bad = [name for name in manifest.get("parts", []) if not (out / name).is_file()
           or (name in sums and file_sha256(out / name) != sums[name])]
    if not bad:
        return False
    if is_main:
        write_json_atomic(out / IN_PROGRESS, fingerprint)
        for name in bad:
            remove_owned(out / name)
        remove_owned(out / SCORES_MANIFEST)
    return True


def check_existing(out: Path, fingerprint: dict[str, Any], overwrite: bool,
                   is_main: bool) -> tuple[str, CacheManifest | None]:
    """('done', the manifest), ('resume', None) or ('fresh', None); refuse or clear a cache made differently."""
    marker = next((m for m in (SCORES_MANIFEST, IN_PROGRESS) if (out / m).exists()), None)
    if marker is None:
        parts = existing_parts(out)
        if not parts and out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UserError(f"{out}: folder exists and is not a reference-score cache; choose another --out")
        if is_main:  # parts without their manifest (or marker) say nothing of the settings that made them: not reused
            for path in parts.values():
                remove_owned(path)
        return "fresh", None
    found = manifest = json.loads((out / marker).read_text())
    if marker == SCORES_MANIFEST:
        found = manifest.get("fingerprint", manifest)
    diffs = fingerprint_differences(fingerprint, found)
    if not diffs:
        if marker == IN_PROGRESS or _drop_altered_parts(out, manifest, fingerprint, is_main):
            return "resume", None
        return "done", CacheManifest(manifest)
    if not overwrite:
        detail = (f"{out}: existing cache was made with different settings ("
                  + "; ".join(describe_difference(fingerprint, found, d) for d in diffs[:3]) + ")")
        raise CacheMismatch(detail + "; use --overwrite to replace it or choose another --out", detail)
    if is_main:
        left = clear_owned(out)  # only what score-ref wrote; the user's files in the folder stay
        stale = [p.name for p in left if PART_PATTERN.match(p.name) or p.name in (SCORES_MANIFEST, IN_PROGRESS)]
        if stale:  # never mix parts made with other settings into the new cache
            raise UserError(f"{out}: {stale[0]} was not recorded as written by score-ref (an older version's?); "
                            "remove the old cache yourself or choose another --out")
    return "fresh", None


def mark_in_progress(out: Path, fingerprint: dict[str, Any]) -> None:
    """The folder and its in-progress marker (the fingerprint the parts belong to), kept when resuming."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / IN_PROGRESS).exists():
        write_json_atomic(out / IN_PROGRESS, fingerprint, record=True)


def plan_parts(lengths: list[int], pair_ids: list[str], pairs_per_part: int,
               splits: list[str] | None = None) -> list[list[int]]:
    """Row indices of each part: one split per part (eval rescores a split's parts in their exact layout),
    longest pairs first within a split (errors of memory show at once), ties by pair_id."""
    splits = splits or [DEFAULT_SPLIT] * len(lengths)
    parts = []
    for split in sorted(set(splits)):
        rows = [i for i in range(len(lengths)) if splits[i] == split]
        order = sorted(rows, key=lambda i: (-lengths[i], pair_ids[i]))
        parts += [order[i:i + pairs_per_part] for i in range(0, len(order), pairs_per_part)]
    return parts


def check_done_parts(done: dict[int, Path], parts: list[list[int]], pair_ids: list[str]) -> None:
    """Parts on disk from an interrupted run must hold exactly the pairs this plan gives them."""
    for i, path in sorted(done.items()):
        found = sorted(read_part(path, columns=[PAIR_ID_COLUMN])[PAIR_ID_COLUMN].to_pylist())
        planned = sorted(pair_ids[j] for j in parts[i]) if i < len(parts) else []
        if found != planned:
            raise UserError(f"{path}: holds other pairs than this run assigns to part {i}; resume with the "
                            "--pairs-per-part of the interrupted run, or pass --overwrite to start over")


def write_part(out: Path, index: int, part: pa.Table) -> None:
    """Part ``index``, written to a temporary name and renamed when complete (recorded as score-ref's)."""
    with atomic_path(out / part_name(index), record=True) as tmp:
        pq.write_table(part, tmp)


def scored_tokens(rows: list[dict], samples: int, draws: int) -> int:
    """Tokens the forward passes read for these rows: the prompt and each response, under every mask."""
    prompt, chosen, rejected = LENGTH_COLUMNS
    return sum(samples * draws * (2 * r[prompt] + r[chosen] + r[rejected]) for r in rows)


def cache_totals(done: dict[int, Path], samples: int, draws: int) -> dict[str, int]:
    """The finished parts' pairs, tokens scored, pairs identical after truncation and pairs truncated."""
    totals = dict.fromkeys(("pairs", "tokens", "identical_after_truncation", "truncated"), 0)
    chosen, rejected = IDS_COLUMNS["chosen"], IDS_COLUMNS["rejected"]
    for i in sorted(done):  # one part in memory at a time
        rows = read_part(done[i], columns=[*LENGTH_COLUMNS, chosen, rejected, TRUNCATED_COLUMN]).to_pylist()
        totals["pairs"] += len(rows)
        totals["tokens"] += scored_tokens(rows, samples, draws)
        totals["identical_after_truncation"] += sum(r[chosen] == r[rejected] for r in rows)
        totals["truncated"] += sum(bool(r[TRUNCATED_COLUMN]) for r in rows)
    return totals


def write_manifest(out: Path, done: dict[int, Path], **fields) -> None:
    """The manifest (``build_manifest``'s ``fields``, each part's checksum added), written last: it marks the
    cache finished, and the in-progress marker goes."""
    sums = {part_name(i): file_sha256(done[i]) for i in sorted(done)}
    write_json_atomic(out / SCORES_MANIFEST, build_manifest(part_sha256=sums, **fields), record=True)
    (out / IN_PROGRESS).unlink(missing_ok=True)
