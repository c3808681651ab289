"""Running a query's SQL safely: read-only unless asked (DuckDB tells each statement's kind), and reading only
the views' own files (DuckDB's allowed paths, then external access off)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.query.views import first_line, sql_list


def sandbox(con, files: list[Path], allow_read: list[Path] = ()) -> None:
    """Limit what SQL can read to the views' files (and ``allow_read``): DuckDB's allowed paths and directories,
    then external access off (which DuckDB lets no later statement turn back on)."""
    paths = sorted({str(Path(p).resolve()) for p in files} | {str(Path(p)) for p in files})
    dirs: list[str] = []
    for extra in allow_read:
        extra = Path(extra).expanduser()
        if not extra.exists():
            raise UserError(f"{extra}: --allow-read path not found")
        if extra.is_dir():
            dirs += sorted({str(extra.resolve()) + "/", str(extra).rstrip("/") + "/"})
        else:
            paths += sorted({str(extra.resolve()), str(extra)})
    con.execute("SET allowed_paths = " + sql_list(paths))
    if dirs:
        con.execute("SET allowed_directories = " + sql_list(dirs))
    con.execute("SET enable_external_access = false")


def check_read_only(con, sql: str) -> None:
    """Refuse statements that write files or change the database (COPY ... TO, EXPORT, ATTACH,
    INSTALL/LOAD, SET/PRAGMA, CREATE ...): only SELECT-like queries (and EXPLAIN of one) run.

    DuckDB tells the statement kinds (``extract_statements``), so no SQL is parsed here.
    """
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UserError(f"query failed: {first_line(exc)}") from None
    for st in statements:
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:
            # EXPLAIN ANALYZE runs its statement: what it explains must be a query too.
            inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", st.query, flags=re.IGNORECASE)
            check_read_only(con, inner)
            continue
        if kind != duckdb.StatementType.SELECT:
            raise UserError(f"query refused: a {getattr(kind, 'name', kind)} statement may write files or change "
                            f"settings ({st.query.strip()[:60]!r}); query is read-only unless you pass --allow-write")


def execute(con, sql: str, allow_write: bool = False) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` (read-only unless ``allow_write``); a DuckDB error becomes a one-line ``UserError``."""
    import duckdb

    if not allow_write:
        check_read_only(con, sql)
    try:
        cur = con.execute(sql)
        return ([d[0] for d in cur.description], cur.fetchall()) if cur.description is not None else ([], [])
    except duckdb.Error as exc:
        raise UserError(f"query failed: {first_line(exc)}") from None
