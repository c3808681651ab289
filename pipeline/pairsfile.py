"""Reading the pairs file that ``ingest`` writes (Arrow IPC), with clear errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.errors import UserError

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
