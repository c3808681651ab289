"""Ingest's run: inputs read in order (optionally parsed by a process pool), duplicates resolved, both outputs written.

Every record read ends in exactly one place: the pairs file (Arrow IPC, schema
``PAIRS_SCHEMA`` plus kept fields) or the quarantine (JSONL, one object per
rejected record with source, line/row, reason code, message and raw text).
``read == accepted + quarantined`` always.

Output is a pure function of the inputs and the rules: rows keep input order,
record batches hold a fixed number of rows, no timestamps or absolute paths are
added, so re-ingesting gives identical bytes whatever the chunking or the number
of workers. Both files are written under temporary names and renamed at the end.

With one worker and more than one thread in Arrow's pool (``OMP_NUM_THREADS``
unset or above 1 on a multi-core machine), the next chunk's plain check and
Arrow parse run on a thread while the current chunk is validated and hashed
(``_ParsedAhead``); with ``OMP_NUM_THREADS=1`` ingest uses one core.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.core.atomic import atomic_path, check_replaceable, check_writable
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.schemas import PAIRS_SCHEMA, REASON_CODES, SPLITS
from pipeline.data.arrow_build import bool_array, ints_of
from pipeline.data.ingest_chunks import (
    Chunk,
    ChunkRules,
    parse_plain,
    process_lines,
    process_records,
    quarantine_line,
)
from pipeline.data.pairs import FieldMap
from pipeline.data.readers import input_size, is_line_oriented, iter_line_chunks, iter_records

_BATCH_ROWS = 4096
_PROGRESS_MIN_BYTES = 16 << 20
_PARALLEL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves
_CHUNK_BYTES = 8 << 20  # large chunks amortize the per-chunk Arrow calls
_FAST_PATH = True  # tests switch it off to compare both paths
_FIELDS_SHOWN = 12


def chunk_rules(fields: FieldMap, max_chars: int, eval_fraction: float, keep_fields: tuple[str, ...],
                split_field: str) -> ChunkRules:
    """The rules every chunk is validated by; the schema is the pairs file's plus the kept fields and ``_line``."""
    schema = pa.schema(list(PAIRS_SCHEMA) + [pa.field(name, pa.string()) for name in keep_fields])
    return ChunkRules(fields, max_chars, eval_fraction, tuple(keep_fields), schema.append(pa.field("_line", pa.int64())),
                      fast=_FAST_PATH and not keep_fields, split_field=split_field)


class PairsWriter:
    """Writes accepted rows in record batches of exactly ``_BATCH_ROWS`` rows.

    Batch boundaries depend only on the row count, never on how the input was
    chunked or how many workers parsed it, so the file's bytes are a function
    of its rows alone. Each written batch is copied into fresh zero-offset buffers
    (``concat_arrays``): the IPC writer does not write a slice's bytes as it writes
    a fresh array of the same rows (a sliced string column keeps padding of its
    parent's data buffer).
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        start, rows = 0, batch.num_rows
        while rows - start >= _BATCH_ROWS - self.pending_rows:
            take = _BATCH_ROWS - self.pending_rows
            self._write([*self.pending, batch.slice(start, take)])
            start, self.pending, self.pending_rows = start + take, [], 0
        if start < rows:
            self.pending.append(batch.slice(start))
            self.pending_rows += rows - start

    def _write(self, pieces: list[pa.RecordBatch]) -> None:
        """Write ``pieces`` as one batch, copied once into fresh buffers: identical bytes for identical rows."""
        arrays = [pa.concat_arrays([piece.column(i) for piece in pieces]) for i in range(len(self.schema))]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)
        self.writer.close()
        self.sink.close()


class FirstPairWins:
    """Resolves duplicate pairs in input order across chunks: the first record of a ``pair_id`` is kept."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def resolve(self, chunk: Chunk, raw_of: Callable[[int], str]) -> tuple[pa.RecordBatch, list[tuple[int, str, str]]]:
        """The chunk's rows without duplicates, and its quarantine entries with the duplicates merged in line order."""
        batch, seen = chunk.batch, self.seen
        pids = batch.column(0).to_pylist()
        fresh = set(pids)
        earlier = seen & fresh  # accepted from an earlier chunk: every row of these is a duplicate
        # Settled by set operations in C; only the rows of a repeated id are looked at one by one.
        repeated = earlier | ({pid for pid, n in collections.Counter(pids).items() if n > 1} if len(fresh) < len(pids)
                              else set())
        seen |= fresh
        if not repeated:
            return batch, chunk.quarantine
        lines = ints_of(batch.column(len(batch.schema) - 1))
        keep = np.ones(len(pids), dtype=bool)
        kept: set[str] = set()
        dups: list[tuple[int, str, str]] = []
        for i in np.flatnonzero(np.fromiter(map(repeated.__contains__, pids), dtype=bool, count=len(pids))).tolist():
            pid = pids[i]
            if pid in earlier or pid in kept:
                keep[i], line = False, int(lines[i])
                message = f"duplicate of an earlier pair (pair_id {pid})"
                dups.append((line, "duplicate_pair", quarantine_line(chunk.source, line, "duplicate_pair", message, raw_of(line))))
            else:
                kept.add(pid)  # the first row of an id repeated within this chunk
        return batch.filter(bool_array(keep)), list(heapq.merge(chunk.quarantine, dups, key=lambda e: e[0]))


def _raw_line_getter(data: bytes, first: int) -> Callable[[int], str]:
    """The raw text of a (valid UTF-8) line of one chunk, as its ``Record.raw``: the chunk split once, on first
    use."""
    lines = functools.cache(data.split)
    return lambda line: lines(b"\n")[line - first].rstrip(b"\r\n").decode("utf-8")


def _jobs(paths: list[Path], rules: ChunkRules, advance, pool) -> Iterator[tuple[Any, Callable[[int], str]]]:
    """(result, raw_of_line) per chunk, in input order; line inputs go to the pool when there is one."""
    for path in paths:
        if is_line_oriented(path):
            for data, first in iter_line_chunks(path, _CHUNK_BYTES, advance):
                raw_of = _raw_line_getter(data, first)
                if pool is None:
                    yield process_lines(data, first, str(path), rules), raw_of
                else:
                    yield pool.apply_async(process_lines, (data, first, str(path), rules)), raw_of
        else:  # runs of up to 4096 records sharing a source
            for source, group in itertools.groupby(iter_records(path, advance), key=lambda rec: rec.source):
                for records in iter(lambda g=group: list(itertools.islice(g, 4096)), []):
                    yield process_records(records, source, rules), {r.line: r.raw for r in records}.__getitem__


def _ordered_results(jobs, window: int) -> Iterator[tuple[Chunk, Callable[[int], str]]]:
    """Results in submission order with at most ``window`` chunks in flight (bounded memory)."""
    queue: collections.deque = collections.deque()
    for job in itertools.chain(jobs, [None]):  # None: the end, when every job left is resolved
        if job is not None:
            queue.append(job)
        while len(queue) > (window if job is not None else 0):
            result, raw_of = queue.popleft()
            yield (result.get() if hasattr(result, "get") else result), raw_of


class _ParsedAhead:
    """A chunk whose ``parse_plain`` (Arrow's parse of it whole, outside the GIL) is submitted to a thread the
    moment it is read; ``get()`` validates it with that parse on the calling thread, as a pool's ``AsyncResult``.
    With the results taken one chunk behind the reading, chunk i+1 is parsed on a second core while chunk i is
    hashed and checked; what is computed, and so every byte written, is the same."""

    def __init__(self, executor, data: bytes, first: int, source: str, rules: ChunkRules):
        self.args = (data, first, source, rules)
        self.parsed = executor.submit(parse_plain, data, rules, True) if rules.fast else None

    def get(self) -> Chunk:
        return process_lines(*self.args, parsed=self.parsed.result() if self.parsed is not None else None)


class _ParseAhead:
    """``_jobs``' pool when chunks are parsed ahead on a thread (see ``_ParsedAhead``)."""

    def __init__(self, executor):
        self.executor = executor  # a concurrent.futures executor of one thread

    def apply_async(self, fn: Callable, args: tuple) -> _ParsedAhead:
        assert fn is process_lines
        return _ParsedAhead(self.executor, *args)


def overlap_default() -> bool:
    """Whether the next chunk is parsed on a thread by default: when Arrow's thread pool has more than one thread
    (the machine's cores, or OMP_NUM_THREADS: one job per core keeps to one)."""
    return pa.cpu_count() > 1


def _make_pool(workers: int):
    import multiprocessing
    # Not fork: the parent may hold DuckDB/Arrow/torch thread pools, whose locks a
    # forked child inherits mid-state (it hangs). A forkserver forks from a clean,
    # single-threaded process that has imported this module once.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload([__name__])
    return ctx.Pool(workers)


def check_inputs(inputs: list[str], example: str) -> list[Path]:
    """The input paths; no input, or one that does not exist, is a one-line error (``example``: the default input,
    the shipped example, which exists only in the repository's folder)."""
    if not inputs:
        raise UserError("ingest: no input given (pass one or more INPUT files)")
    if list(inputs) == [example] and not Path(example).exists():
        raise UserError(f"ingest: no input given (pass one or more INPUT files; the default, the shipped example "
                        f"{example}, is only there in the repository's folder)")
    for path in map(Path, inputs):
        if not path.exists():
            raise UserError(f"{path}: input not found")
    return [Path(p) for p in inputs]


def check_outputs(paths: list[Path], out: Path, qpath: Path) -> None:
    """Before any input is read: outputs that clash with each other or an input, or that cannot be written, or that
    would replace a user's file, are a one-line error now."""
    if out.resolve() == qpath.resolve():
        raise ConfigError(f"out and quarantine are the same file: {out}")
    for p in paths:
        if p.resolve() in (out.resolve(), qpath.resolve()):
            raise UserError(f"{p}: input is also an output of this run")
    check_writable(out, "pairs file (--out)", file=True)
    check_writable(qpath, "quarantine (--quarantine)", file=True)
    check_replaceable(out, "--out")  # a user's file is never replaced (nor emptied)
    check_replaceable(qpath, "--quarantine")


@dataclass
class IngestResult:
    """What one ingest read, accepted (by split) and quarantined (by reason), and where it wrote them."""

    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASON_CODES, 0))
    out: str = ""
    quarantine: str = ""
    splits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NothingAccepted(UserError):
    """Every record was quarantined: an error (nothing to score), after both files are written."""

    def __init__(self, message: str, result: IngestResult):
        super().__init__(message)
        self.result = result


def ingest_files(paths: list[Path], out: Path, qpath: Path, rules: ChunkRules, workers: int = 1,
                 progress: bool = True, overlap: bool | None = None) -> IngestResult:
    """Read ``paths`` in order into the pairs file ``out`` and the quarantine ``qpath`` (both written under
    temporary names, renamed when every input is read); return the counts. ``overlap``: parse the next line chunk
    on a thread while this one is validated (default ``overlap_default()``; with one worker process only); the
    bytes written do not depend on it."""
    total = sum(input_size(p) for p in paths)
    # A pool only pays for itself on large line inputs (start-up re-imports the caller's main module).
    workers = workers if total >= _PARALLEL_MIN_BYTES and any(is_line_oriented(p) for p in paths) else 1
    overlap = (overlap_default() if overlap is None else overlap) and workers == 1
    counts, dedup = IngestResult(out=str(out), quarantine=str(qpath)), FirstPairWins()
    with contextlib.ExitStack() as stack:
        try:
            out_tmp = stack.enter_context(atomic_path(out))
            q_tmp = stack.enter_context(atomic_path(qpath))
            writer = PairsWriter(out_tmp, pa.schema(list(rules.schema)[:-1]))
        except OSError as exc:  # e.g. a read-only file system, which access() does not see
            raise UserError(f"{exc.filename or out}: cannot write output: {exc.strerror or exc}") from None
        stack.callback(writer.close)  # the callbacks run last first: progress bar, pool, then the writer
        if workers > 1:
            pool = _make_pool(workers)
            stack.callback(pool.join)
            stack.callback(pool.terminate)
        elif overlap:
            from concurrent.futures import ThreadPoolExecutor

            pool = _ParseAhead(stack.enter_context(ThreadPoolExecutor(max_workers=1)))
        else:
            pool = None
        # Smaller inputs finish before a bar is worth drawing.
        advance = _progress_bar(stack, total) if progress and total >= _PROGRESS_MIN_BYTES else None
        qfh = stack.enter_context(open(q_tmp, "w", encoding="utf-8", newline="\n"))
        for chunk, raw_of in _ordered_results(_jobs(paths, rules, advance, pool), window=2 * workers if workers > 1 else 1):
            batch, entries = dedup.resolve(chunk, raw_of)
            counts.read += chunk.read
            for _, reason, text in entries:
                counts.by_reason[reason] += 1
                qfh.write(text)
            split_counts = batch.column("split").value_counts()
            for value, n in zip(split_counts.field(0).to_pylist(), split_counts.field(1).to_pylist()):
                counts.splits[value] += n
            writer.add(batch.drop_columns(["_line"]))
    counts.accepted, counts.quarantined = len(dedup.seen), sum(counts.by_reason.values())
    assert counts.read == counts.accepted + counts.quarantined  # the accounting identity the report promises
    assert sum(counts.splits.values()) == counts.accepted
    return counts


def _progress_bar(stack: contextlib.ExitStack, total: int) -> Callable[[int], None]:
    """A byte progress bar over ``total`` bytes, stopped when ``stack`` closes; returns its advance function."""
    from pipeline.core.progress import byte_progress

    progress = byte_progress("ingest")
    progress.start()
    stack.callback(progress.stop)
    task = progress.add_task("ingest", total=total)
    return lambda n: progress.update(task, advance=n)


def nothing_accepted_message(inputs: list[str], fields: FieldMap, max_chars: int, counts: IngestResult) -> str:
    """The one-line error when every record was quarantined: the reason(s), the first
    message, and for field problems the fields the records do have and the flags."""
    read, by_reason = counts.read, counts.by_reason
    reasons = [(r, n) for r, n in by_reason.items() if n]
    if not read:
        return f"ingest: no records in {', '.join(inputs)} (empty input); nothing to accept"
    what = f"all {read} records were quarantined " + (
        f"as {reasons[0][0]}" if len(reasons) == 1 else "(" + ", ".join(f"{r} {n}" for r, n in reasons) + ")")
    qpath = counts.quarantine
    first_message, keys = _quarantine_sample(Path(qpath))
    msg = f"ingest: {what}" + (f", e.g. {first_message}" if first_message else "")
    if by_reason.get("missing_field"):  # the names are wrong (a wrong type or empty text is not a mapping matter)
        have = ", ".join(keys[:_FIELDS_SHOWN]) + (", ..." if len(keys) > _FIELDS_SHOWN else "")
        msg += (
            f"; the records have fields: {have or '(none: not JSON objects)'}; map them with "
            f"--prompt-field, --chosen-field, --rejected-field (now '{fields.prompt}', '{fields.chosen}', "
            f"'{fields.rejected}')"
        )
    if by_reason.get("too_long"):
        msg += f"; --max-chars {max_chars} is the limit (0: none)"
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
