"""Reading the pairs file that ``ingest`` writes (Arrow IPC), with clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from pipeline.core.errors import UserError

REQUIRED_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")


def read_pairs(path: str | Path) -> pa.Table:
    """The pairs table (memory-mapped); errors name the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: pairs file not found (write one with `lldm-dpo ingest`)")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not an Arrow IPC pairs file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: pairs file lacks column(s) {', '.join(missing)}")
    return table


DISPLAY_ONLY = ("source",)
"""Columns kept for display, out of the pairs' identity: ``source`` holds the input path as typed, so the same
data ingested from another folder is the same pairs."""


class _HashSink:
    """A write-only file object that only feeds a sha256 (for ``pa.PythonFile``)."""

    def __init__(self):
        self.hash, self.closed, self.pos = hashlib.sha256(), False, 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def pairs_sha256(table: pa.Table, rows_per_block: int = 65536) -> str:
    """The pairs' content identity: sha256 of their Arrow IPC stream without the display-only columns.

    Blocks of fixed size are made contiguous first, so the hash does not depend on how the file was chunked
    (ingest's worker count), the folder it was read from, or what the source column says.
    """
    table = table.drop_columns([c for c in DISPLAY_ONLY if c in table.column_names])
    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        for start in range(0, table.num_rows, rows_per_block):
            for batch in table.slice(start, rows_per_block).combine_chunks().to_batches():
                writer.write_batch(batch)
    return sink.hash.hexdigest()
