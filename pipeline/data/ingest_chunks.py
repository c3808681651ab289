"""Validating one chunk of input records: accepted rows as an Arrow batch, rejected ones as quarantine lines.

A chunk is a run of records from one source (JSONL lines, or the records a reader
yields). ``process_lines`` is JSONL's fast path: Arrow parses and checks plain rows
in bulk, and every line it does not clear goes through ``process_records``, the
same per-record code every other input takes, so results do not depend on the
path. Duplicates are not resolved here (that needs every earlier chunk: see
``ingesting``). Both functions run in ingest's worker processes, so their
arguments are picklable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import UserError
from pipeline.data.arrow_build import bools_of, choose_strings, int64_array, ints_of, scalar
from pipeline.data.pairs import (
    FieldMap,
    Invalid,
    arrow_clean_mask,
    arrow_eval_mask,
    arrow_pair_id_array,
    declared_split,
    kept_value,
    split_of,
    validate_record,
)
from pipeline.data.readers import (
    TOO_DEEP,
    Record,
    SplitLines,
    arrow_segments,
    escape_lines,
    jsonl_chunk_records,
    may_hold_cr_or_escapes,
    parse_fields_with_arrow,
    parse_line,
    parse_whole,
    plain_line_count,
)


@dataclass(frozen=True)
class ChunkRules:
    """How to validate records: the field names, the limits, the split rule and the output schema (picklable)."""

    fields: FieldMap
    max_chars: int
    eval_fraction: float
    keep_fields: tuple[str, ...]
    schema: pa.Schema  # pairs schema + "_line"
    fast: bool = True  # Arrow fast path for JSONL (off when kept fields need Python values)
    split_field: str = ""  # the input field naming a record's own split ("" : none)


@dataclass
class Chunk:
    """A run of records from one source, validated; duplicates are not resolved yet."""

    source: str
    read: int
    batch: pa.RecordBatch  # accepted rows (ctx.schema, with _line)
    quarantine: list[tuple[int, str, str]]  # (line, reason, JSON text) in input order


def process_records(records: Iterable[Record], source: str, ctx: ChunkRules) -> Chunk:
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
            quarantine.append((rec.line, reason, quarantine_line(rec.source, rec.line, reason, message, rec.raw)))
            continue
        split = split_of(pair.prompt_key, eval_fraction)
        name = rec.split if rec.split is not None else (value.get(ctx.split_field) if ctx.split_field else None)
        if name is not None and declared_or_error(name, rec.source, rec.line) == "eval":
            split = "eval"
        rows.append((pair.pair_id, pair.prompt, pair.chosen, pair.rejected, pair.prompt_messages, pair.chosen_messages,
                     pair.rejected_messages, split, f"{rec.source}:{rec.line}", *kept, rec.line))
    if not rows:  # the common case on the JSONL fast path (and no Python-object conversion, which imports pandas)
        arrays = [pa.nulls(0, f.type) for f in ctx.schema]
    else:
        arrays = [pa.array(col, type=f.type) for col, f in zip(zip(*rows), ctx.schema)]
    return Chunk(source, read, pa.RecordBatch.from_arrays(arrays, schema=ctx.schema), quarantine)


def declared_or_error(name: Any, source: str, line: int) -> str:
    """``declared_split(name)``; a name that is no split is a one-line error naming the file and line."""
    try:
        return declared_split(name)
    except ValueError as exc:
        raise UserError(f"{source}:{line}: {exc}; rename the split, or ignore the field with --split-field ''") from None


@dataclass(frozen=True)
class Parsed:
    """``parse_plain``'s answer for a chunk: its plain line count (None: not plain) and, for a plain one, Arrow's
    first parse of it whole (None: not tried)."""

    count: int | None
    first_parse: tuple[pa.Table | None, int | None] | None = None
    odd: bool = False  # a CR or an escape to look at somewhere in the chunk


def parse_plain(data: bytes, ctx: ChunkRules, one_block: bool = False) -> Parsed:
    """The first part of ``process_lines``: whether the chunk is plain (every line an object's braces, no CR, no
    escape to look at) and, if it is, Arrow's parse of it whole. Mostly outside the GIL (numpy's newline scan,
    Arrow's UTF-8 check and parse): ingest runs it on a thread for the next chunk while this one is validated, with
    ``one_block`` (that thread is the parse's second core: Arrow's blocks would only add work)."""
    # A CR in a text (raw, or escaped as \\r or \\u000d) changes its normalization, and
    # \\u escapes may hide lone surrogates; with none in the chunk both scans are skipped.
    if may_hold_cr_or_escapes(data):
        return Parsed(None, odd=True)
    count = plain_line_count(data)
    if count is None:
        return Parsed(None)
    return Parsed(count, parse_whole(data, count, _parsed_names(ctx), one_block))


def _parsed_names(ctx: ChunkRules) -> tuple[str, ...]:
    # The split field is always asked of Arrow: absent from every line, it is a column of nulls (the same result
    # as not parsing it, without a scan of the chunk for its name).
    return ctx.fields.names + ((ctx.split_field,) if ctx.split_field else ())


def process_lines(data: bytes, first_line: int, source: str, ctx: ChunkRules, parsed: Parsed | None = None) -> Chunk:
    """A chunk of JSONL lines. Fast path: Arrow parses and checks plain rows in bulk; every
    other line (bad JSON, conversations, anything the vectorized check does not clear)
    goes through the same per-record code as other inputs, so results do not depend on the path.
    ``parsed``: ``parse_plain(data, ctx)``, when the caller has it."""
    if not ctx.fast:
        return process_records(jsonl_chunk_records(data, first_line, source), source, ctx)
    parsed = parse_plain(data, ctx) if parsed is None else parsed
    plain = parsed.count
    if plain is not None:  # the common chunk: its lines are needed only for the rows Arrow does not settle
        lines, numbers, blob = SplitLines(data, plain), np.arange(first_line, first_line + plain, dtype=np.int64), data
        escapes: list[int] = []
    else:
        lines, numbers, blob = _nonblank_lines(data, first_line)
        escapes = escape_lines(lines, blob) if parsed.odd else []
    segments = list(arrow_segments(lines, _parsed_names(ctx), escapes, blob, plain=plain is not None,
                                   first_parse=parsed.first_parse))
    slow = [i for rows, table in segments if table is None for i in rows]
    tables = [table for _, table in segments if table is not None]
    fast = None  # the rows Arrow's values settle
    if tables:
        fast_idx = np.concatenate([np.asarray(rows, dtype=np.int64) for rows, table in segments if table is not None])
        fast, unsettled = _settled_rows(tables, fast_idx, numbers, escapes, source, ctx)
        slow.extend(unsettled)
    slow.sort()
    exact = process_records((parse_line(lines[i], source, int(numbers[i])) for i in slow), source, ctx)
    batch = exact.batch if fast is None else fast  # with no exact row, Arrow's rows are all, in line order
    if fast is not None and exact.batch.num_rows:  # interleave the exact rows back in line order: one take (one copy)
        both = pa.concat_batches([fast, exact.batch])
        batch = both.take(int64_array(np.argsort(ints_of(both.column(len(ctx.schema) - 1)), kind="stable")))
    return Chunk(source, len(lines), batch, exact.quarantine)


def _nonblank_lines(data: bytes, first_line: int) -> tuple[list[bytes], np.ndarray, bytes]:
    """The chunk's non-blank lines (without newline or a final CR), their line numbers, and the lines joined by
    newlines (``data`` itself when no line was dropped or changed: no copy)."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the empty piece after the last newline
    changed = b"\r" in data
    if changed:
        lines = [line.rstrip(b"\r") if line.endswith(b"\r") else line for line in lines]
    numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)
    if not all(lines) or any(map(bytes.isspace, lines)):  # blank lines: what `not line.strip()` means
        kept = np.array([bool(line) and not line.isspace() for line in lines], dtype=bool)
        lines = [line for line, keep in zip(lines, kept) if keep]
        numbers, changed = numbers[kept], True
    return lines, numbers, b"\n".join(lines) if changed else data


def _settled_rows(tables: list[pa.Table], fast_idx: np.ndarray, numbers: np.ndarray, escapes: list[int], source: str,
                  ctx: ChunkRules) -> tuple[pa.RecordBatch | None, list[int]]:
    """The rows Arrow parsed (``tables``, lines ``fast_idx``) that the vectorized check accepts, as a batch in
    ``ctx.schema``, and the lines it leaves to the exact path."""
    t = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    p, c, r = (_one_chunk(t.column(i)) for i in range(3))
    cr_rows = np.flatnonzero(np.isin(fast_idx, escapes)) if escapes else False
    mask, normalized = arrow_clean_mask(p, c, r, ctx.max_chars, cr_rows)
    ok_np = bools_of(mask)
    ok_rows, unsettled = fast_idx[ok_np], fast_idx[~ok_np].tolist()
    n = len(ok_rows)
    if not n:
        return None, unsettled
    every = n == len(fast_idx)  # then filtering would only copy
    pick = (lambda col: col) if every else (lambda col: pc.filter(col, mask))  # noqa: E731
    pn, cn, rn = (pick(col) for col in normalized)
    is_eval = arrow_eval_mask(pn, ctx.eval_fraction)
    lines_ok = numbers[ok_rows]
    if t.num_columns == 4:  # the split field
        declared = pick(_one_chunk(t.column(3)))
        if declared.null_count < len(declared):
            for i, (name, line) in enumerate(zip(declared.to_pylist(), lines_ok.tolist())):
                if name is not None and declared_or_error(name, source, line) == "eval":
                    is_eval[i] = True
    line_array = int64_array(lines_ok)
    arrays = {
        "pair_id": arrow_pair_id_array(pn, cn, rn),
        "prompt": pick(p),
        "chosen": pick(c),
        "rejected": pick(r),
        "split": choose_strings(is_eval, "eval", "train"),
        "source": pc.binary_join_element_wise(scalar(f"{source}:"), pc.cast(line_array, pa.string()),
                                              scalar("")),
        "_line": line_array,
    }
    cols = [arrays[fld.name] if fld.name in arrays else pa.nulls(n, fld.type) for fld in ctx.schema]
    return pa.RecordBatch.from_arrays(cols, schema=ctx.schema), unsettled


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array (no copy when it is one chunk already)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def quarantine_line(source: str, line: int, reason: str, message: str | None, raw: str) -> str:
    record = {"source": source, "line": line, "reason": reason, "message": message, "raw": raw}
    return json.dumps(record, ensure_ascii=False) + "\n"
