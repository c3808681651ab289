"""A query's rows as the terminal shows them (a table fitted to its width), as CSV and as JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any


def plain(value: Any) -> Any:
    """JSON-friendly value: lists/dicts kept, NaN/inf as null, everything else as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    try:  # Decimal and numpy scalars
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _json_cell(v: Any) -> str:
    return json.dumps(plain(v), ensure_ascii=False)


def to_csv(columns: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(["" if v is None else _json_cell(v) if isinstance(v, (list, dict, tuple)) else plain(v) for v in row]
                for row in rows)
    return buf.getvalue()


FLOAT_DIGITS = 6
"""Significant digits of a float in the table (--csv and --json keep every digit)."""

ID_SHOWN = 12
"""Characters kept of a long identifier (a pair_id's hex) when the table would not fit the terminal."""


def format_cell(value: Any) -> str:
    """A value as the table shows it: floats to FLOAT_DIGITS significant digits, lists and mappings as JSON."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.{FLOAT_DIGITS}g}"
    if isinstance(value, (list, dict, tuple)):
        return _json_cell(value)
    return str(value)


def _is_identifier(text: str) -> bool:
    """One long token (a hash, a pair_id): cut, not wrapped over lines, when the table is too wide."""
    return len(text) > ID_SHOWN + 4 and not any(ch.isspace() for ch in text) and not _is_number(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def table_cells(columns: list[str], rows: list[tuple], width: int, max_cell: int = 80) -> tuple[list[list[str]], bool]:
    """The table's cells for a terminal ``width`` columns wide, and whether identifiers were shortened (when
    the table, each column as wide as its widest cell, would not fit)."""
    cells = [[format_cell(v) for v in row] for row in rows]
    cells = [[c if len(c) <= max_cell else c[: max_cell - 1] + "…" for c in row] for row in cells]
    needed = 1 + sum(3 + max([len(name)] + [len(row[j]) for row in cells]) for j, name in enumerate(columns))
    if needed <= width or not any(_is_identifier(c) for row in cells for c in row):
        return cells, False
    return [[c[:ID_SHOWN] + "…" if _is_identifier(c) else c for c in row] for row in cells], True


def print_table(columns: list[str], rows: list[tuple], max_cell: int = 80) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    console = Console()
    cells, shortened = table_cells(columns, rows, console.width, max_cell)
    numeric = [bool(rows) and all(isinstance(r[j], (int, float)) and not isinstance(r[j], bool) or r[j] is None
                                  for r in rows) for j in range(len(columns))]
    cut = [shortened and any(row[j].endswith("…") and len(row[j]) == ID_SHOWN + 1 for row in cells)
           for j in range(len(columns))]  # a shortened identifier's column keeps it on one line
    table = Table(*(Column(c, overflow="fold", justify="right" if numeric[j] else "left", no_wrap=cut[j],
                           min_width=ID_SHOWN + 1 if cut[j] else None)
                    for j, c in enumerate(columns)), show_header=True, header_style="bold")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    note = f" (long identifiers cut to {ID_SHOWN} characters: --csv or --json print them whole)" if shortened else ""
    console.print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}{note}", style="dim")


def to_json(columns: list[str], rows: list[tuple]) -> str:
    """A JSON array of row objects (every digit kept; NaN and inf as null)."""
    return json.dumps([{c: plain(v) for c, v in zip(columns, row)} for row in rows], ensure_ascii=False, indent=2)
