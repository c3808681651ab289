"""Read preference records from any input a user brings, one record at a time.

Every reader yields ``Record``s in file order, each with the file it came from,
its location (1-based line for line-oriented files, 0-based row/element for
JSON arrays, Parquet and ``datasets`` folders) and its raw text, so that a
record that fails to parse is still accounted for: it carries a reason code
(``invalid_json`` / ``invalid_utf8``) instead of a value and ends up in the
quarantine, never silently dropped.

Supported inputs:
- JSON Lines: ``.jsonl``, ``.ndjson``, ``.jsonl.gz`` (gzip), also ``.json``
  and ``.json.gz`` files whose first non-blank character is not ``[``;
- a JSON array file (``[{...}, {...}]``, also gzipped as ``.json.gz``),
  decoded element by element so one broken element does not lose the
  elements before it;
- Parquet (``.parquet``), read in row batches;
- a folder written by ``datasets.Dataset.save_to_disk`` (or
  ``DatasetDict.save_to_disk``: every split, in the order of
  ``dataset_dict.json``, each record carrying its split name in
  ``Record.split``), read as Arrow streams without importing ``datasets``.

A record nested deeper than Python's JSON decoder can follow (it raises
``RecursionError``) is an ``invalid_json`` record naming the depth problem,
never a crash of the whole read.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import mmap
import os
import re
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from pipeline.core.errors import UserError

ProgressFn = Callable[[int], None]
"""Called with a number of input bytes consumed since the last call."""



@dataclass(slots=True)
class Record:
    """One input record: parsed ``value`` or a parse ``reason`` (never both)."""

    source: str
    """The input file (or ``folder[split]`` for a DatasetDict)."""
    line: int
    """1-based line (JSONL) or 0-based row (JSON array, Parquet, datasets)."""
    raw: str
    """The record as text: the line, the array element, or the row as JSON."""
    value: Any = None
    reason: str | None = None
    message: str | None = None
    split: str | None = None
    """The split the input itself puts this record in (a DatasetDict's split name), if any."""

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"


_SUFFIXES = (
    ((".jsonl.gz", ".ndjson.gz"), "jsonl.gz"),
    ((".json.gz",), "json.gz"),
    ((".jsonl", ".ndjson"), "jsonl"),
    ((".json",), "json"),
    ((".parquet", ".pq"), "parquet"),
)


def input_kind(path: Path) -> str:
    """``jsonl``, ``jsonl.gz``, ``json``/``json.gz`` (sniffed: array or lines), ``parquet`` or ``datasets``."""
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        raise UserError(f"{path}: a folder must be a datasets.save_to_disk folder (no state.json or dataset_dict.json)")
    name = path.name.lower()
    for suffixes, kind in _SUFFIXES:
        if name.endswith(suffixes):
            return kind
    raise UserError(f"{path}: unknown input type (expected .jsonl, .jsonl.gz, .json, .json.gz, .parquet or a "
                    "datasets folder)")


def input_size(path: Path) -> int:
    """Bytes the reader will report through its progress callback."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*.arrow"))
    return path.stat().st_size


def iter_records(path: str | os.PathLike, progress: ProgressFn | None = None) -> Iterator[Record]:
    """Yield every record of one input, in order; raise ``UserError`` if the input cannot be opened."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: input not found")
    kind = input_kind(path)
    if is_line_oriented(path) or (kind == "json" and not _holds_array(path)):  # many tools write JSONL as .json
        for data, first_line in iter_line_chunks(path, progress=progress):
            yield from jsonl_chunk_records(data, first_line, str(path))
    elif kind in ("json", "json.gz"):
        with _read_errors(path), _open(path) as fh:
            data = fh.read()
        if progress is not None:
            progress(path.stat().st_size)  # the progress bar counts bytes on disk
        # Decode with surrogateescape so invalid bytes stay visible per element
        # (as lone surrogates) instead of failing the whole file.
        yield from iter_json_array(data.decode("utf-8", "surrogateescape"), str(path))
    elif kind == "parquet":
        import pyarrow.parquet as pq  # only for Parquet inputs (a tenth of a second to import)

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: cannot read Parquet input: {exc}") from None
        yield from _batch_records(pf.iter_batches(batch_size=8192), pf.metadata.num_rows, path, str(path), 0, progress)
    else:
        yield from _iter_datasets_folder(path, progress)


# --- JSON Lines ----------------------------------------------------------------


def is_line_oriented(path: Path) -> bool:
    """Inputs read in byte chunks of whole lines (the ones ingest can parse in parallel).

    A ``.json.gz`` is JSON Lines unless it holds an array (sniffed from its first
    non-blank byte); a plain ``.json`` keeps its own reader (in ``iter_records``).
    """
    if path.is_dir():
        return False
    kind = input_kind(path)
    return kind in ("jsonl", "jsonl.gz") or (kind == "json.gz" and not _holds_array(path))


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, EOFError) as exc:  # not gzip, or truncated
        raise UserError(f"{path}: cannot read input: {exc}") from None


def _open(path: Path):
    return gzip.open(path, "rb") if input_kind(path) in ("jsonl.gz", "json.gz") else open(path, "rb")


def _holds_array(path: Path) -> bool:
    """Whether a .json(.gz) file's first non-blank byte is ``[`` (a JSON array, not JSON Lines)."""
    with _read_errors(path), _open(path) as fh:
        while block := fh.read(1 << 16):
            head = block.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace, and a UTF-8 byte-order mark
            if head:
                return head.startswith(b"[")
    return False


def iter_line_chunks(
    path: str | os.PathLike, chunk_bytes: int = 1 << 20, progress: ProgressFn | None = None
) -> Iterator[tuple[bytes, int]]:
    """``(data, first_line)`` chunks of whole lines of a JSONL(.gz) file, in order.

    Chunk boundaries depend only on the file and ``chunk_bytes``; a leading
    UTF-8 byte-order mark is dropped. ``jsonl_chunk_records`` turns a chunk
    into the same ``Record``s ``iter_records`` yields for those lines.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: input not found")
    with open(path, "rb") as raw_fh, _read_errors(path):
        compressed = input_kind(path) in ("jsonl.gz", "json.gz")
        fh = gzip.open(raw_fh, "rb") if compressed else raw_fh
        try:
            first_line, last_pos = 1, 0
            pieces = _whole_line_pieces(fh, chunk_bytes) if compressed else _mapped_pieces(raw_fh, chunk_bytes)
            for data in pieces:
                if first_line == 1 and data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]
                yield data, first_line
                first_line += int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 10))  # newlines
                if progress is not None:
                    pos = raw_fh.tell()
                    progress(pos - last_pos)
                    last_pos = pos
        finally:
            if fh is not raw_fh:
                fh.close()


def _whole_line_pieces(fh, chunk_bytes: int) -> Iterator[bytes]:
    """``chunk_bytes`` read from ``fh``, and the rest of the last line begun."""
    while data := fh.read(chunk_bytes):
        if not data.endswith(b"\n"):
            data += fh.readline()
        yield data


def _mapped_pieces(fh, chunk_bytes: int) -> Iterator[bytes]:
    """The pieces ``_whole_line_pieces`` reads, each copied once out of a memory map of the file (not read, then
    copied again to append the end of its last line); the file position follows, for the progress bar."""
    size = os.fstat(fh.fileno()).st_size
    try:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except (OSError, ValueError):  # not a regular file: read it
        yield from _whole_line_pieces(fh, chunk_bytes)
        return
    with mapped if mapped is not None else contextlib.nullcontext():
        start = 0
        while start < size:
            end = min(size, start + chunk_bytes)
            if mapped[end - 1] != 0x0A:  # "\n"
                newline = mapped.find(b"\n", end)
                end = size if newline < 0 else newline + 1
            fh.seek(end)
            yield mapped[start:end]
            start = end


def jsonl_chunk_records(data: bytes, first_line: int, source: str) -> Iterator[Record]:
    for i, line in enumerate(data.split(b"\n")):
        if line.endswith(b"\r"):
            line = line.rstrip(b"\r")
        if line and not line.isspace():  # what `not line.strip()` means
            yield parse_line(line, source, first_line + i)


def parse_line(line: bytes, source: str = "<input>", lineno: int = 1) -> Record:
    """One JSONL line (without its newline) as a ``Record``; used by tests and the parallel reader."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(source, lineno, line.decode("utf-8", "backslashreplace"), reason="invalid_utf8",
                      message=f"invalid UTF-8 byte at offset {exc.start}")
    try:
        value = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError
        return Record(source, lineno, text, reason="invalid_json", message=_json_error(exc))
    except RecursionError:
        return Record(source, lineno, text, reason="invalid_json", message=TOO_DEEP)
    return _decoded(source, lineno, text, value)


def _decoded(source: str, line: int, text: str, value: Any) -> Record:
    """The record of a decoded JSON text, unless an escape in it encodes a lone surrogate."""
    try:
        if "\\u" in text and _has_lone_surrogate(text, value):
            return Record(source, line, text, reason="invalid_utf8", message=_SURROGATE_MESSAGE)
    except RecursionError:  # decoded, but too deep to encode again for the check
        return Record(source, line, text, reason="invalid_json", message=TOO_DEEP)
    return Record(source, line, text, value)


TOO_DEEP = "invalid JSON: nested deeper than the JSON decoder can follow (Python's recursion limit)"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_MESSAGE = "a \\u escape encodes a lone UTF-16 surrogate, which is not valid Unicode text"


def _string_fields(names: tuple[str, ...]) -> pa_json.ParseOptions:
    """Arrow JSON options reading the fields ``names`` as strings, ignoring any other field."""
    return pa_json.ParseOptions(explicit_schema=pa.schema([(n, pa.string()) for n in names]),
                                unexpected_field_behavior="ignore")


def parse_fields_with_arrow(raw: str, names: tuple[str, ...]) -> dict | None:
    """The string fields ``names`` of one JSON object text, parsed by Arrow (C++, no
    recursion limit): for records too deep for Python's decoder. Absent fields are
    left out; ``None`` if Arrow cannot read them all as strings."""
    opts = _string_fields(names)
    try:
        table = pa_json.read_json(pa.BufferReader(raw.encode("utf-8", "surrogatepass")), parse_options=opts)
    except (pa.ArrowInvalid, UnicodeError):
        return None
    if table.num_rows != 1:
        return None
    return {k: v for k, v in table.to_pylist()[0].items() if v is not None}


def _has_lone_surrogate(text: str, value: Any) -> bool:
    """JSON may escape half a surrogate pair ("\\ud800"); such text cannot be stored as UTF-8."""
    if not _SURROGATE_ESCAPE.search(text):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_error(exc: ValueError) -> str:
    msg = getattr(exc, "msg", None)
    if msg is not None:
        return f"invalid JSON: {msg} at column {exc.colno}"  # type: ignore[attr-defined]
    return f"invalid JSON: {str(exc).splitlines()[0]}"


# --- JSON array -----------------------------------------------------------------


_WS = " \t\n\r"
_WS_RUN = re.compile(r"[ \t\n\r]*")


def iter_json_array(text: str, source: str) -> Iterator[Record]:
    """Elements of a JSON array text, one ``Record`` each (row = 0-based element index).

    A syntax error inside the array cannot be resynchronised reliably, so
    everything from the broken element to the end becomes one ``invalid_json``
    record: the elements before it are kept, and nothing is lost.
    """
    decoder = json.JSONDecoder()
    pos, row, expect_value = text.index("[") + 1, 0, True
    while True:
        pos = _WS_RUN.match(text, pos).end()
        if pos >= len(text):
            yield Record(source, row, "", reason="invalid_json", message="invalid JSON: unterminated array")
            return
        ch = text[pos]
        if ch == "]" and (row == 0 or not expect_value):
            rest = text[pos + 1 :].strip(_WS)
            if rest:
                yield Record(source, row, rest, reason="invalid_json", message="invalid JSON: extra data after the array")
            return
        if not expect_value:
            if ch != ",":
                yield _broken_tail(text, pos, source, row, "expected ',' or ']' between elements")
                return
            pos, expect_value = pos + 1, True
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError as exc:
            yield _broken_tail(text, pos, source, row, _json_error(exc).removeprefix("invalid JSON: "))
            return
        except RecursionError:
            end = _skip_value(text, pos)
            if end is None:
                yield _broken_tail(text, pos, source, row, "nested too deeply, and unterminated")
                return
            yield Record(source, row, _readable(text[pos:end]), reason="invalid_json", message=TOO_DEEP)
        else:
            raw = text[pos:end]
            if _has_surrogates(raw):
                yield Record(source, row, _readable(raw), reason="invalid_utf8", message="invalid UTF-8 bytes in this element")
            else:
                yield _decoded(source, row, raw, value)
        row, pos, expect_value = row + 1, end, False


def _skip_value(text: str, pos: int) -> int | None:
    """End of the bracketed JSON value starting at ``pos`` (depth counting, strings
    skipped), or ``None`` if it never closes. Only for values too deep to decode."""
    depth, n, i = 0, len(text), pos
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _readable(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(s) else s


def _broken_tail(text: str, pos: int, source: str, row: int, why: str) -> Record:
    tail = text[pos:].rstrip(_WS)
    if tail.endswith("]"):
        tail = tail[:-1].rstrip(_WS)
    return Record(source, row, _readable(tail), reason="invalid_json",
                  message=f"invalid JSON: {why} (rest of the array from element {row})")


def _has_surrogates(s: str) -> bool:
    return not s.isascii() and any("\udc80" <= c <= "\udcff" for c in s)


# --- datasets folders (and the rows of Parquet and Arrow batches) ----------------


def _iter_datasets_folder(path: Path, progress: ProgressFn | None) -> Iterator[Record]:
    dict_file = path / "dataset_dict.json"
    splits: list = [None]  # a Dataset folder; a DatasetDict folder holds one per split
    if dict_file.is_file():
        try:
            splits = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(f"{dict_file}: not a datasets DatasetDict index: {exc}") from None
    for split in splits:
        folder, source = (path, str(path)) if split is None else (path / split, f"{path}[{split}]")
        state_file = folder / "state.json"
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            files = [folder / f["filename"] for f in state["_data_files"]]
        except (ValueError, KeyError, OSError, TypeError) as exc:
            raise UserError(f"{state_file}: not a datasets save_to_disk state file: {exc}") from None
        row = 0
        for file in files:
            try:
                batches = list(pa.ipc.open_stream(pa.memory_map(str(file))))
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"{file}: cannot read datasets Arrow file: {exc}") from None
            num_rows = sum(b.num_rows for b in batches)
            row = yield from _batch_records(batches, num_rows, file, source, row, progress, split)


def _batch_records(batches, num_rows: int, file: Path, source: str, row: int, progress: ProgressFn | None,
                   split: str | None = None):
    """The rows of ``batches`` (``num_rows`` in all, read from ``file``) as ``Record``s numbered from ``row``,
    reporting ``file``'s bytes pro rata; returns the next row number."""
    size = file.stat().st_size
    for batch in batches:
        for i, value in enumerate(batch.to_pylist()):
            yield Record(source, row + i, json.dumps(value, ensure_ascii=False, default=_jsonable), value, split=split)
        if progress is not None:
            progress(size * batch.num_rows // max(num_rows, 1))
        row += batch.num_rows
    return row


def _jsonable(obj: Any) -> Any:
    # Parquet rows can hold bytes, dates, decimals: raw text only needs to be readable.
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    return str(obj)


# --- Arrow fast path for JSON Lines ------------------------------------------------

_ROW_IN_ERROR = re.compile(r"in row (\d+)")


_ESCAPE_R_OR_U = re.compile(rb"\\[ru]")


def may_hold_cr_or_escapes(data: bytes) -> bool:
    """False when ``data`` has no CR byte and no ``\\r`` or ``\\u`` escape: then no parsed
    text holds a CR and no surrogate escape needs a look (one regex pass, far quicker
    than a substring test per pattern)."""
    return b"\r" in data or _ESCAPE_R_OR_U.search(data) is not None


def escape_lines(lines: list[bytes], blob: bytes | None = None) -> list[int]:
    """Indices of the lines holding a CR byte or a ``\\r``/``\\u`` escape (see
    ``may_hold_cr_or_escapes``); ``blob``: ``b"\\n".join(lines)`` if the caller has it."""
    if blob is None:
        blob = b"\n".join(lines)
    hits = [m.start() for m in _ESCAPE_R_OR_U.finditer(blob)]
    if b"\r" in blob:
        hits += [m.start() for m in re.finditer(b"\r", blob)]
    if not hits:
        return []
    # Line i starts at starts[i] in the blob (each line plus its newline).
    starts = np.cumsum(np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) + 1) - 1
    return np.unique(np.searchsorted(starts, np.array(hits, dtype=np.int64), side="left")).tolist()


def plain_line_count(data: bytes) -> int | None:
    """The number of lines of ``data`` when every one opens with ``{`` and closes with ``}`` and none holds a CR,
    else None: what splitting the chunk and looking at each line would find (no blank line, no line Arrow must not
    see), found from the newline positions in one vectorized pass, without a ``bytes`` object per line."""
    if not data or b"\r" in data:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)  # each line's end (its newline), and the last line's without one
    if buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    if (ends == starts).any() or not ((buf[starts] == 0x7B).all() and (buf[ends - 1] == 0x7D).all()):
        return None
    return len(ends)


class SplitLines:
    """The lines of a chunk that ``plain_line_count`` cleared, as the list ``_nonblank_lines`` would give, split only
    when a line is first asked for (a clean chunk never needs them: Arrow parses the chunk whole)."""

    def __init__(self, data: bytes, count: int):
        self.data, self.count, self._lines = data, count, None

    def __len__(self) -> int:
        return self.count

    def _split(self) -> list[bytes]:
        if self._lines is None:
            self._lines = self.data.split(b"\n")[: self.count]  # (the piece after a last newline is empty)
        return self._lines

    def __getitem__(self, i):
        return self._split()[i]

    def __iter__(self):
        return iter(self._split())


def _flags(fn, lines: list[bytes], *arg) -> np.ndarray:
    """``fn(line, *arg)`` for every line as a bool array (a C loop, no Python frame per line)."""
    return np.fromiter(map(fn, lines, *(repeat(a) for a in arg)), dtype=bool, count=len(lines))


def arrow_segments(
    lines: list[bytes], names: tuple[str, ...], escapes: bool | list[int] = True, blob: bytes | None = None,
    plain: bool = False, first_parse: tuple[pa.Table | None, int | None] | None = None,
) -> Iterator[tuple[Any, pa.Table | None]]:
    """Cover ``lines`` (non-blank, without newlines) with ``(rows, table)`` pairs.

    ``rows`` are indices into ``lines`` (ascending within a pair; pairs in no
    particular order). ``table`` holds the string columns ``names`` parsed by
    Arrow's JSON reader (C++, no Python object per value) for those lines;
    ``None`` marks lines Arrow could not take as such (bad JSON or UTF-8, a
    field that is not a string, a non-object line), which the caller sends
    through the exact per-line path. Arrow's error names the failing row, so a
    bad line costs a re-parse of the good lines before it, not a slow path for
    the whole chunk. ``escapes``: the lines that may hold a ``\\u`` escape
    (``escape_lines``), when the caller knows them: only those are scanned for
    surrogate escapes (``False``: none). ``blob``: ``b"\\n".join(lines)``, if the
    caller has it. ``plain``: ``plain_line_count`` cleared the lines (every one an object's braces).
    ``first_parse``: ``parse_whole``'s answer for these lines, when the caller has it (not parsed again).
    """
    opts = _string_fields(names)
    # Only lines that look like one whole object reach Arrow: a bare top-level ``null``
    # crashes pyarrow's reader (seen with pyarrow 26), other scalars fail anyway, and a
    # line cut short (no closing brace) would make Arrow fail and re-parse a whole run.
    if blob is None:
        blob = b"\n".join(lines)
    if plain or (all(map(bytes.startswith, lines, repeat(b"{"))) and all(map(bytes.endswith, lines, repeat(b"}")))):
        exact = []  # the common case, checked in C loops
    else:
        odd = np.flatnonzero(~(_flags(bytes.startswith, lines, b"{") & _flags(bytes.endswith, lines, b"}"))).tolist()
        exact = [i for i in odd if not ((s := lines[i].strip()).startswith(b"{") and s.endswith(b"}"))]
    # Invalid UTF-8 is found here (Arrow would pass it through), and so are escaped
    # UTF-16 surrogates, which only the exact path judges (lone ones are invalid).
    # ASCII lines need no UTF-8 check; decoding only the others avoids building a
    # wide str of the whole chunk.
    if not blob.isascii() and not _valid_utf8(blob):
        exact += [i for i in np.flatnonzero(~_flags(bytes.isascii, lines)).tolist() if not _is_utf8(lines[i])]
    if escapes is True:
        escapes = range(len(lines)) if _SURROGATE_ESCAPE_B.search(blob) else []
    exact += [i for i in (escapes or ()) if _SURROGATE_ESCAPE_B.search(lines[i])]
    exact = sorted(set(exact))
    if not exact:
        yield from _arrow_runs(lines, opts, blob, range(len(lines)), first_parse)
        return
    yield exact, None
    # The other lines go to Arrow together (not in runs cut at every bad line: each
    # parse has a fixed cost), keeping their line indices.
    skip = set(exact)
    keep = [i for i in range(len(lines)) if i not in skip]
    yield from _arrow_runs([lines[i] for i in keep], opts, None, keep)


_SURROGATE_ESCAPE_B = re.compile(rb"\\u[dD][89a-fA-F]")


def _valid_utf8(blob: bytes) -> bool:
    """Whether ``blob`` is valid UTF-8, checked by Arrow's vectorized validator (no decoded copy): when it is, no
    line needs a look of its own."""
    offsets = pa.py_buffer(np.array([0, len(blob)], dtype=np.int32))
    try:
        pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(blob)]).cast(pa.string())
    except pa.ArrowInvalid:
        return False
    return True


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Lines per Arrow parse: large runs amortize the per-call cost; after a failure the run
# shrinks (a failed parse costs up to one run, so bad lines stay cheap), then grows back.
_RUN_LINES = 256
_RUN_LINES_MAX = 1 << 16


def _arrow_runs(lines: list[bytes], opts, whole: bytes | None, index,
                first_parse: tuple[pa.Table | None, int | None] | None = None) -> Iterator[tuple[Any, pa.Table | None]]:
    """``(index[start:end], table or None)`` covering ``lines``; ``whole``: the lines
    already joined (saves a copy when a run is all of them); ``first_parse``: ``_arrow_parse``'s answer for
    ``whole``, already known."""
    start, hi, run = 0, len(lines), _RUN_LINES_MAX
    end = min(hi, start + run)
    while start < hi:
        is_whole = whole is not None and (start, end) == (0, hi)
        blob = whole if is_whole else b"\n".join(lines[start:end])
        if is_whole and first_parse is not None:
            (table, bad), first_parse = first_parse, None
        else:
            table, bad = _arrow_parse(blob, end - start, opts)
        if table is not None:
            yield index[start:end], table
            start = end
            run = min(_RUN_LINES_MAX, run * 2)
        else:
            run = max(_RUN_LINES, run // 8)
            if bad is None:
                if end - start > _RUN_LINES:
                    end = start + _RUN_LINES  # unknown row: narrow down before giving up on lines
                    continue
                yield index[start:end], None
                start = end
            elif bad > 0:
                end = start + bad  # parse the good prefix, then meet the bad line at row 0
                continue
            else:
                yield index[start : start + 1], None
                start += 1
        end = min(hi, start + run)


def parse_whole(blob: bytes, count: int, names: tuple[str, ...],
                one_block: bool = False) -> tuple[pa.Table | None, int | None] | None:
    """For ``count`` plain lines (``plain_line_count``) without CR or escapes: what ``arrow_segments`` parses
    first, Arrow's parse of them all as one run (``_arrow_parse``'s answer: the table, or the failing row), or
    None when it would not parse them whole (invalid UTF-8 to find line by line, or more lines than a run). Most of
    it runs outside the GIL (Arrow's UTF-8 check and parse). ``one_block``: see ``_arrow_parse``."""
    if count > _RUN_LINES_MAX or (not blob.isascii() and not _valid_utf8(blob)):
        return None
    return _arrow_parse(blob, count, _string_fields(names), one_block)


_PARALLEL_PARSE_BYTES = 2 << 20  # above this a run is parsed as several blocks on Arrow's threads
_PARALLEL_BLOCKS = 4


def _arrow_parse(blob: bytes, expected_rows: int, opts, one_block: bool = False) -> tuple[pa.Table | None, int | None]:
    """(table, None) on success; (None, failing row) or (None, None) when the row is unknown.

    A large blob is first parsed in several blocks on Arrow's thread pool, when it has
    more than one thread (with one, the blocks only add work: about half again, with
    the copy that joins them) and the caller does not ask for ``one_block`` (its parse
    already runs beside other work). Arrow counts the row of an error from the start of its
    block, so a failure is parsed again as one block to learn the failing row.
    """
    def read(blocks: int) -> pa.Table:
        read_options = pa_json.ReadOptions(use_threads=blocks > 1, block_size=len(blob) // blocks + 64)
        return pa_json.read_json(pa.BufferReader(blob), read_options=read_options, parse_options=opts)

    if len(blob) > _PARALLEL_PARSE_BYTES and pa.cpu_count() > 1 and not one_block:
        with contextlib.suppress(pa.ArrowInvalid):
            table = read(_PARALLEL_BLOCKS)
            if table.num_rows == expected_rows:
                return table, None
    try:
        table = read(1)
    except pa.ArrowInvalid as exc:
        m = _ROW_IN_ERROR.search(str(exc))
        row = int(m.group(1)) if m else None
        return None, row if row is not None and row < expected_rows else None
    if table.num_rows != expected_rows:  # e.g. two objects on one line: let the exact path judge
        return None, None
    return table, None


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each non-blank line of a JSONL file of objects, ``where`` being ``path:line``.

    Strict, for the inputs of generate, eval and make-pairs (prompts, benchmarks,
    questions), where a bad line is the user's to fix rather than to quarantine:
    the first undecodable, non-JSON or non-object line is a one-line UserError
    naming the file and line.
    """
    path = Path(path)
    if not str(path) or not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: invalid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row
