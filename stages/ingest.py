"""``lldm-dpo ingest``: preference records from any input into one validated pairs file.

Every record read ends in exactly one place: the pairs file (Arrow IPC, schema
``PAIRS_SCHEMA`` plus kept fields) or the quarantine (JSONL, one object per
rejected record with source, line/row, reason code, message and raw text).
The report counts both; ``read == accepted + quarantined`` always.

Output is a pure function of the inputs and the config: rows keep input order,
no timestamps or absolute paths are added, so re-ingesting gives identical
bytes. Both files are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from pipeline.cli.commands import emit_json, stage_command
from pipeline.core.atomic import atomic_path, check_replaceable, check_writable
from pipeline.core.config import check_ranges, require
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.lock import output_lock
from pipeline.core.paths import quarantine_path_for
from pipeline.core.schemas import PAIRS_SCHEMA, REASON_CODES, SPLITS
from pipeline.data.pairs import (
    FieldMap,
    Invalid,
    arrow_clean_mask,
    arrow_pair_ids,
    arrow_splits,
    declared_split,
    kept_value,
    split_of,
    validate_record,
)
from pipeline.data.readers import (
    TOO_DEEP,
    Record,
    arrow_segments,
    escape_lines,
    input_size,
    is_line_oriented,
    iter_line_chunks,
    iter_records,
    jsonl_chunk_records,
    may_hold_cr_or_escapes,
    parse_fields_with_arrow,
    parse_line,
)

DEFAULT_OUT = "data/out/pairs.arrow"
_BATCH_ROWS = 4096
_PROGRESS_MIN_BYTES = 16 << 20
_PARALLEL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves
_CHUNK_BYTES = 8 << 20  # large chunks amortize the per-chunk Arrow calls
_FAST_PATH = True  # tests switch it off to compare both paths


RANGES = {"max_chars": "[0, inf)", "eval_fraction": "[0, 1)", "workers": "[1, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/preference_data/reasoning_prefs.jsonl"])
    """Input files: .jsonl, .jsonl.gz, .json or .json.gz (array or lines), .parquet, or datasets.save_to_disk folders (a DatasetDict keeps its splits)."""
    out: str = DEFAULT_OUT
    """The pairs file to write (Arrow IPC)."""
    quarantine: str | None = None
    """The quarantine JSONL; default: beside `out`, named <out stem>.quarantine.jsonl."""
    prompt_field: str = "prompt"
    """Input field holding the prompt (string or message list); absent for an implicit conversational prompt."""
    chosen_field: str = "chosen"
    """Input field holding the preferred response (string or message list)."""
    rejected_field: str = "rejected"
    """Input field holding the dispreferred response (string or message list)."""
    keep_fields: list[str] = field(default_factory=list)
    """Extra input fields kept as string columns (strings as they are, other values as JSON; null when absent)."""
    max_chars: int = 0
    """Quarantine a record whose prompt, chosen or rejected text is longer than this (0: no limit)."""
    eval_fraction: float = 0.0
    """Fraction of prompts held out as split 'eval', chosen by a hash of the prompt (all pairs of a prompt on one side). Records the input already puts in an eval split stay there; this draws from the rest."""
    split_field: str = "split"
    """Input field naming a record's own split, used like a DatasetDict's split names: train... is 'train', test.../validation.../valid.../eval.../dev... is 'eval' (other names are an error); '' ignores the field."""
    strict: bool = False
    """Any quarantined record is an error (exit 1); both files and the report are still written."""
    progress: bool = True
    """Show a progress bar on large inputs."""
    workers: int = 1
    """Processes parsing JSONL inputs; more than 1 starts a process pool (worth it for inputs of hundreds of MB on idle cores). The output does not depend on it."""

    def __post_init__(self) -> None:
        self.inputs = [str(p) for p in ([self.inputs] if isinstance(self.inputs, str) else self.inputs)]
        self.keep_fields = [self.keep_fields] if isinstance(self.keep_fields, str) else list(self.keep_fields)
        check_ranges(self, RANGES)
        for name in ("prompt_field", "chosen_field", "rejected_field"):
            require(isinstance(getattr(self, name), str) and getattr(self, name), f"{name} must be a non-empty string")
        mapped = (self.prompt_field, self.chosen_field, self.rejected_field)
        require(len(set(mapped)) == 3, f"prompt_field, chosen_field and rejected_field must differ, got {mapped}")
        require(isinstance(self.split_field, str), f"split_field must be a string ('' to ignore), got {self.split_field!r}")
        require(self.split_field not in mapped, f"split_field '{self.split_field}' is also the prompt, chosen or rejected field")
        taken = set(PAIRS_SCHEMA.names)
        for name in self.keep_fields:
            require(name not in taken, f"keep_fields: '{name}' clashes with a pairs column ({', '.join(PAIRS_SCHEMA.names)})")
        require(len(set(self.keep_fields)) == len(self.keep_fields), "keep_fields lists a field twice")
        require(bool(self.out), "out must be a path")

    @property
    def quarantine_path(self) -> Path:
        return Path(self.quarantine) if self.quarantine else quarantine_path_for(self.out)


@dataclass
class IngestResult:
    read: int
    accepted: int
    quarantined: int
    by_reason: dict[str, int]
    out: str
    quarantine: str
    splits: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _PairsWriter:
    """Writes accepted rows in record batches of exactly ``_BATCH_ROWS`` rows.

    Batch boundaries depend only on the row count, never on how the input was
    chunked or how many workers parsed it, so the file's bytes are a function
    of its rows alone.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.pending = schema.empty_table()

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.pending = pa.concat_tables([self.pending, pa.Table.from_batches([batch], schema=self.schema)])
        while self.pending.num_rows >= _BATCH_ROWS:
            self._write(_BATCH_ROWS)

    def _write(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as one batch."""
        # concat_arrays copies into fresh zero-offset buffers: identical bytes for identical rows.
        arrays = [pa.concat_arrays(col.chunks) for col in self.pending.slice(0, rows).columns]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.pending = self.pending.slice(rows)

    def close(self) -> None:
        if self.pending.num_rows:
            self._write(self.pending.num_rows)
        self.writer.close()
        self.sink.close()


def _check_inputs(inputs: list[str]) -> list[Path]:
    if not inputs:
        raise UserError("ingest: no input given (pass one or more INPUT files)")
    default = IngestConfig.__dataclass_fields__["inputs"].default_factory()
    if list(inputs) == default and not Path(default[0]).exists():
        raise UserError(f"ingest: no input given (pass one or more INPUT files; the default, the shipped example "
                        f"{default[0]}, is only there in the repository's folder)")
    for path in map(Path, inputs):
        if not path.exists():
            raise UserError(f"{path}: input not found")
    return [Path(p) for p in inputs]


@dataclass(frozen=True)
class _Ctx:
    """What a worker needs to validate records (picklable)."""

    fields: FieldMap
    max_chars: int
    eval_fraction: float
    keep_fields: tuple[str, ...]
    schema: pa.Schema  # pairs schema + "_line"
    fast: bool = True  # Arrow fast path for JSONL (off when kept fields need Python values)
    split_field: str = ""  # the input field naming a record's own split ("" : none)


@dataclass
class _Chunk:
    """A run of records from one source, validated; duplicates are not resolved yet."""

    source: str
    read: int
    batch: pa.RecordBatch  # accepted rows (ctx.schema, with _line)
    quarantine: list[tuple[int, str, str]]  # (line, reason, JSON text) in input order


def _process(records: Iterable[Record], source: str, ctx: _Ctx) -> _Chunk:
    """Validate records into accepted columns and quarantine entries (runs in workers)."""
    rows: list[tuple] = []  # in ctx.schema's column order: PAIRS_SCHEMA, the kept fields, _line
    quarantine: list[tuple[int, str, str]] = []
    read = 0
    fields, max_chars, eval_fraction, keep = ctx.fields, ctx.max_chars, ctx.eval_fraction, ctx.keep_fields
    for rec in records:
        read += 1
        reason, message, value = rec.reason, rec.message, rec.value
        if reason == "invalid_json" and message == TOO_DEEP:
            # Arrow's parser has no depth limit: a record whose deep part is outside the
            # three fields is judged on those fields, as the fast path judges it.
            names = fields.names + ((ctx.split_field,) if ctx.split_field else ())
            value = parse_fields_with_arrow(rec.raw, names)
            if value is not None:
                reason = message = None
        if reason is None:
            try:
                pair = validate_record(value, fields, max_chars)
                kept = [kept_value(value.get(name)) for name in keep]
            except Invalid as bad:
                reason, message = bad.reason, bad.message
            except RecursionError:  # a value deep enough to overflow the stack once decoded
                reason, message = "invalid_json", TOO_DEEP
        if reason is not None:
            quarantine.append((rec.line, reason, _quarantine_line(rec.source, rec.line, reason, message, rec.raw)))
            continue
        split = split_of(pair.prompt_key, eval_fraction)
        name = rec.split if rec.split is not None else (value.get(ctx.split_field) if ctx.split_field else None)
        if name is not None and _declared(name, rec.source, rec.line) == "eval":
            split = "eval"
        rows.append((pair.pair_id, pair.prompt, pair.chosen, pair.rejected, pair.prompt_messages, pair.chosen_messages,
                     pair.rejected_messages, split, f"{rec.source}:{rec.line}", *kept, rec.line))
    columns = list(zip(*rows)) or [()] * len(ctx.schema)
    arrays = [pa.array(col, type=f.type) for col, f in zip(columns, ctx.schema)]
    return _Chunk(source, read, pa.RecordBatch.from_arrays(arrays, schema=ctx.schema), quarantine)


def _declared(name: Any, source: str, line: int) -> str:
    try:
        return declared_split(name)
    except ValueError as exc:
        raise UserError(f"{source}:{line}: {exc}; rename the split, or ignore the field with --split-field ''") from None


def _process_lines(data: bytes, first_line: int, source: str, ctx: _Ctx) -> _Chunk:
    """A chunk of JSONL lines. Fast path: Arrow parses and checks plain rows in bulk; every
    other line (bad JSON, conversations, anything the vectorized check does not clear)
    goes through the same per-record code as other inputs, so results do not depend on the path."""
    if not ctx.fast:
        return _process(jsonl_chunk_records(data, first_line, source), source, ctx)
    lines = data.split(b"\n")
    if b"\r" in data:
        lines = [line.rstrip(b"\r") if line.endswith(b"\r") else line for line in lines]
    if data.endswith(b"\n"):
        lines.pop()  # the empty piece after the last newline
    numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)
    if not all(lines) or any(map(bytes.isspace, lines)):  # blank lines: what `not line.strip()` means
        kept = np.array([bool(line) and not line.isspace() for line in lines], dtype=bool)
        lines = [line for line, keep in zip(lines, kept) if keep]
        numbers = numbers[kept]
    # A CR in a text (raw, or escaped as \\r or \\u000d) changes its normalization, and
    # \\u escapes may hide lone surrogates; with none in the chunk both scans are skipped.
    blob = b"\n".join(lines)
    escapes = escape_lines(lines, blob) if may_hold_cr_or_escapes(data) else []
    names = ctx.fields.names
    # The split field is parsed only where its key can occur (as a key it is a quoted name).
    if ctx.split_field and json.dumps(ctx.split_field, ensure_ascii=False).encode() in data:
        names += (ctx.split_field,)
    segments = list(arrow_segments(lines, names, escapes, blob))
    slow = [i for rows, table in segments if table is None for i in rows]
    tables = [table for _, table in segments if table is not None]
    fast_runs = [np.asarray(rows, dtype=np.int64) for rows, table in segments if table is not None]
    fast = None  # the rows Arrow's values settle
    if tables:
        t = pa.concat_tables(tables)
        fast_idx = np.concatenate(fast_runs)
        p, c, r = (t.column(i).combine_chunks() for i in range(3))
        cr_rows = np.flatnonzero(np.isin(fast_idx, escapes)) if escapes else False
        mask, normalized = arrow_clean_mask(p, c, r, ctx.max_chars, cr_rows)
        ok_np = mask.to_numpy(zero_copy_only=False)
        ok_rows = fast_idx[ok_np]
        slow.extend(fast_idx[~ok_np].tolist())
        if len(ok_rows):
            n = len(ok_rows)
            every = len(ok_rows) == len(fast_idx)  # then filtering would only copy
            pick = (lambda col: col) if every else (lambda col: pc.filter(col, mask))  # noqa: E731
            pn, cn, rn = (pick(col) for col in normalized)
            hashed = arrow_splits(pn, ctx.eval_fraction)
            lines_ok = pa.array(numbers[ok_rows], pa.int64())
            if len(names) == 4:
                declared = pick(t.column(3).combine_chunks())
                if declared.null_count < len(declared):
                    hashed = ["eval" if d is not None and _declared(d, source, ln) == "eval" else h
                              for d, h, ln in zip(declared.to_pylist(), hashed, lines_ok.to_pylist())]
            arrays = {
                "pair_id": pa.array(arrow_pair_ids(pn, cn, rn), pa.string()),
                "prompt": pick(p),
                "chosen": pick(c),
                "rejected": pick(r),
                "split": pa.array(hashed, pa.string()),
                "source": pc.binary_join_element_wise(f"{source}:", pc.cast(lines_ok, pa.string()), ""),
                "_line": lines_ok,
            }
            cols = [arrays[fld.name] if fld.name in arrays else pa.nulls(n, fld.type) for fld in ctx.schema]
            fast = pa.RecordBatch.from_arrays(cols, schema=ctx.schema)
    slow.sort()
    exact = _process((parse_line(lines[i], source, int(numbers[i])) for i in slow), source, ctx)
    batch = exact.batch if fast is None else fast  # with no slow line, Arrow's rows are all, in line order
    if fast is not None and slow:  # interleave the exact rows back in line order: one take over both (one copy)
        both = pa.concat_batches([fast, exact.batch])
        batch = both.take(pa.array(np.argsort(both.column(len(ctx.schema) - 1).to_numpy(), kind="stable")))
    return _Chunk(source, len(lines), batch, exact.quarantine)


def _quarantine_line(source: str, line: int, reason: str, message: str | None, raw: str) -> str:
    record = {"source": source, "line": line, "reason": reason, "message": message, "raw": raw}
    return json.dumps(record, ensure_ascii=False) + "\n"


def _raw_line_getter(data: bytes, first: int) -> Callable[[int], str]:
    """The raw text of a (valid UTF-8) line of one chunk, as its ``Record.raw``: the chunk split once, on first
    use."""
    lines = functools.cache(data.split)
    return lambda line: lines(b"\n")[line - first].rstrip(b"\r\n").decode("utf-8")


def _jobs(paths: list[Path], ctx: _Ctx, advance, pool) -> Iterator[tuple[Any, Callable[[int], str]]]:
    """(result, raw_of_line) per chunk, in input order; line inputs go to the pool when there is one."""
    for path in paths:
        if is_line_oriented(path):
            for data, first in iter_line_chunks(path, _CHUNK_BYTES, advance):
                raw_of = _raw_line_getter(data, first)
                if pool is None:
                    yield _process_lines(data, first, str(path), ctx), raw_of
                else:
                    yield pool.apply_async(_process_lines, (data, first, str(path), ctx)), raw_of
        else:  # runs of up to 4096 records sharing a source
            for source, group in itertools.groupby(iter_records(path, advance), key=lambda rec: rec.source):
                for records in iter(lambda g=group: list(itertools.islice(g, 4096)), []):
                    yield _process(records, source, ctx), {r.line: r.raw for r in records}.__getitem__


def _ordered_results(jobs, window: int) -> Iterator[tuple[_Chunk, Callable[[int], str]]]:
    """Results in submission order with at most ``window`` chunks in flight (bounded memory)."""
    queue: collections.deque = collections.deque()
    for job in itertools.chain(jobs, [None]):  # None: the end, when every job left is resolved
        if job is not None:
            queue.append(job)
        while len(queue) > (window if job is not None else 0):
            result, raw_of = queue.popleft()
            yield (result.get() if hasattr(result, "get") else result), raw_of


def _make_pool(workers: int):
    if workers <= 1:
        return None
    # Not fork: the parent may hold DuckDB/Arrow/torch thread pools, whose locks a
    # forked child inherits mid-state (it hangs). A forkserver forks from a clean,
    # single-threaded process that has imported this module once.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload(["stages.ingest"])
    return ctx.Pool(workers)


def run(cfg: IngestConfig) -> IngestResult:
    """Ingest ``cfg.inputs`` into ``cfg.out`` and the quarantine; return the counts. The stage holds its output's lock
    (a second run into the same place refuses, naming the first)."""
    with output_lock(cfg.out, "ingest", folder=False, what="pairs file (--out)"):
        paths = _check_inputs(cfg.inputs)
        out, qpath = Path(cfg.out), cfg.quarantine_path
        if out.resolve() == qpath.resolve():
            raise ConfigError(f"out and quarantine are the same file: {out}")
        for p in paths:
            if p.resolve() in (out.resolve(), qpath.resolve()):
                raise UserError(f"{p}: input is also an output of this run")
        # Before any input is read: an output that cannot be written is a one-line error now.
        check_writable(out, "pairs file (--out)", file=True)
        check_writable(qpath, "quarantine (--quarantine)", file=True)
        check_replaceable(out, "--out")  # a user's file is never replaced (nor emptied)
        check_replaceable(qpath, "--quarantine")
        schema = pa.schema(list(PAIRS_SCHEMA) + [pa.field(name, pa.string()) for name in cfg.keep_fields])
        ctx = _Ctx(FieldMap(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field), cfg.max_chars, cfg.eval_fraction,
                   tuple(cfg.keep_fields), schema.append(pa.field("_line", pa.int64())),
                   fast=_FAST_PATH and not cfg.keep_fields, split_field=cfg.split_field)
        by_reason, splits = dict.fromkeys(REASON_CODES, 0), dict.fromkeys(SPLITS, 0)
        seen: set[str] = set()
        read = 0
        total = sum(input_size(p) for p in paths)
        # A pool only pays for itself on large line inputs (start-up re-imports the caller's main module).
        workers = cfg.workers if total >= _PARALLEL_MIN_BYTES and any(is_line_oriented(p) for p in paths) else 1
        progress = None
        if cfg.progress and total >= _PROGRESS_MIN_BYTES:  # smaller inputs finish before a bar is worth drawing
            from pipeline.core.progress import byte_progress

            progress = byte_progress("ingest")

        with contextlib.ExitStack() as stack:
            try:
                out_tmp = stack.enter_context(atomic_path(out))
                q_tmp = stack.enter_context(atomic_path(qpath))
                writer = _PairsWriter(out_tmp, schema)
            except OSError as exc:  # e.g. a read-only file system, which access() does not see
                raise UserError(f"{exc.filename or out}: cannot write output: {exc.strerror or exc}") from None
            stack.callback(writer.close)  # the callbacks run last first: progress bar, pool, then the writer
            pool = _make_pool(workers)
            if pool is not None:
                stack.callback(pool.join)
                stack.callback(pool.terminate)
            advance = None
            if progress is not None:
                progress.start()
                stack.callback(progress.stop)
                task = progress.add_task("ingest", total=total)
                advance = lambda n: progress.update(task, advance=n)  # noqa: E731
            qfh = stack.enter_context(open(q_tmp, "w", encoding="utf-8", newline="\n"))
            for chunk, raw_of in _ordered_results(_jobs(paths, ctx, advance, pool), window=2 * workers):
                read += chunk.read
                batch = chunk.batch
                # Duplicates are resolved here, in input order, so "the first one wins" holds across chunks.
                dups: list[tuple[int, str, str]] = []
                keep_mask = []
                pids = batch.column(0).to_pylist()
                fresh = set(pids)
                if len(fresh) == len(pids) and seen.isdisjoint(fresh):
                    seen |= fresh  # the common case, settled by set operations in C
                    pids = []
                for pid, line in zip(pids, batch.column(len(schema)).to_pylist() if pids else ()):
                    if pid in seen:
                        keep_mask.append(False)
                        message = f"duplicate of an earlier pair (pair_id {pid})"
                        dups.append((line, "duplicate_pair", _quarantine_line(chunk.source, line, "duplicate_pair", message, raw_of(line))))
                    else:
                        seen.add(pid)
                        keep_mask.append(True)
                if dups:
                    batch = batch.filter(pa.array(keep_mask))
                entries = heapq.merge(chunk.quarantine, dups, key=lambda e: e[0]) if dups else chunk.quarantine
                for _, reason, text in entries:
                    by_reason[reason] += 1
                    qfh.write(text)
                counts = batch.column("split").value_counts()
                for value, n in zip(counts.field(0).to_pylist(), counts.field(1).to_pylist()):
                    splits[value] += n
                writer.add(batch.drop_columns(["_line"]))

        accepted = len(seen)
        quarantined = sum(by_reason.values())
        assert read == accepted + quarantined  # the accounting identity the report promises
        assert sum(splits.values()) == accepted
        result = IngestResult(read, accepted, quarantined, by_reason, str(out), str(qpath), splits)
        if not accepted:  # README: no record accepted exits 1 (an empty input too)
            raise NothingAccepted(_nothing_accepted(cfg, read, by_reason, qpath), result)
        return result


class NothingAccepted(UserError):
    """Every record was quarantined: an error (nothing to score), after both files are written."""

    def __init__(self, message: str, result: IngestResult):
        super().__init__(message)
        self.result = result


_FIELDS_SHOWN = 12


def _nothing_accepted(cfg: IngestConfig, read: int, by_reason: dict[str, int], qpath: Path) -> str:
    """The one-line error when every record was quarantined: the reason(s), the first
    message, and for field problems the fields the records do have and the flags."""
    reasons = [(r, n) for r, n in by_reason.items() if n]
    if not read:
        return f"ingest: no records in {', '.join(cfg.inputs)} (empty input); nothing to accept"
    what = f"all {read} records were quarantined " + (
        f"as {reasons[0][0]}" if len(reasons) == 1 else "(" + ", ".join(f"{r} {n}" for r, n in reasons) + ")")
    first_message, keys = _quarantine_sample(qpath)
    msg = f"ingest: {what}" + (f", e.g. {first_message}" if first_message else "")
    if by_reason.get("missing_field"):  # the names are wrong (a wrong type or empty text is not a mapping matter)
        have = ", ".join(keys[:_FIELDS_SHOWN]) + (", ..." if len(keys) > _FIELDS_SHOWN else "")
        msg += (
            f"; the records have fields: {have or '(none: not JSON objects)'}; map them with "
            f"--prompt-field, --chosen-field, --rejected-field (now '{cfg.prompt_field}', '{cfg.chosen_field}', "
            f"'{cfg.rejected_field}')"
        )
    if by_reason.get("too_long"):
        msg += f"; --max-chars {cfg.max_chars} is the limit (0: none)"
    return msg + f"; see {qpath}"


def _quarantine_sample(qpath: Path, limit: int = 200) -> tuple[str | None, list[str]]:
    """The first quarantine message, and the top-level fields of the first ``limit``
    quarantined records (most common first)."""
    first, counts = None, collections.Counter()
    with open(qpath, encoding="utf-8") as fh:
        for line in itertools.islice(fh, limit):
            entry = json.loads(line)
            first = first or entry.get("message")
            try:
                value = json.loads(entry["raw"])
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                counts.update(value.keys())
    return first, [k for k, _ in counts.most_common()]


def print_report(result: IngestResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ingest", show_header=True)
    table.add_column("")
    table.add_column("records", justify="right")
    splits = [(f"  split {split}", n) for split, n in result.splits.items() if n]
    reasons = [(f"  {reason}", n) for reason, n in result.by_reason.items() if n]
    for label, n in [("read", result.read), ("accepted", result.accepted), *splits, ("quarantined", result.quarantined),
                     *reasons]:
        table.add_row(label, str(n))
    console = Console()
    console.print(table)
    console.print(f"pairs: {result.out}\nquarantine: {result.quarantine}")



def _ingest_action(cfg: IngestConfig, as_json: bool) -> None:
    try:
        result, failure = run(cfg), None
    except NothingAccepted as exc:  # the report still shows what happened, then the one-line error
        result, failure = exc.result, exc
    if failure is None and cfg.strict and result.quarantined:
        failure = UserError(f"--strict: {result.quarantined} of {result.read} records quarantined "
                            f"(see {result.quarantine})")
    if failure is None and result.quarantined * 2 > result.read:  # most of the data is not in the pairs file
        reasons = ", ".join(f"{reason} {n}" for reason, n in result.by_reason.items() if n)
        typer.echo(f"warning: {result.quarantined} of {result.read} records ({result.quarantined / result.read:.0%}) "
                   f"were quarantined ({reasons}); see {result.quarantine}", err=True)
    if as_json:  # one JSON document: the report, with the error when there is one
        emit_json({**result.to_dict(), **({"error": str(failure), "exit_code": 1} if failure else {})})
        if failure is not None:
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(1)
        return
    print_report(result)
    if failure is not None:
        raise failure


command = stage_command(IngestConfig, _ingest_action, positional={"inputs": False},
                        extra_names={"out": ("-o",), "keep_fields": ("--keep-field",)},
                        doc="Validate preference pairs from JSONL/JSON/Parquet/datasets inputs into an Arrow pairs file.")
