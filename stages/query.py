"""``lldm-dpo query SQL``: DuckDB (in memory) over the pipeline's files.

Views (DESIGN "What lldm-dpo query exposes"; the names are a contract):
- ``pairs`` (``--pairs FILE``): the ingest output, every column of the Arrow file;
- ``quarantine`` (beside the pairs file as ingest names it, or ``--quarantine FILE``):
  ``source``, ``line``, ``reason``, ``message``, ``raw``;
- ``scores`` (``--scores DIR``): ``DIR/part-*.parquet``;
- ``metrics`` (``--run RUN_DIR``): ``RUN_DIR/metrics.parquet``;
- ``samples`` (``--samples PATH``): make-pairs' per-sample rows (``question_id``, ``sample``,
  ``correct``, ``extracted_answer``, ``round``, ...), from one ``*.samples.jsonl`` file or every
  one under a folder (a ``run --rounds`` folder: all rounds);
- ``task_results`` (``--run RUN_DIR``, once ``lldm-dpo eval`` wrote it there): one row per
  benchmark item and model (``model``, ``index``, ``question``, ``reference``, ``completion``,
  ``predicted``, ``correct``);
- ``eval_results`` (``--evals PATH``: an eval.json or a folder holding several, e.g. many runs; or
  ``--run RUN_DIR`` once evaluated): one row per run, figure and model (``before``, ``after``,
  ``difference``) with ``value``, ``count``, ``n``, ``low``/``high`` (95% Wilson; Newcombe's paired
  interval for the difference), ``method``, and the record's ``device_name``, ``torch``, ``dtype``,
  ``mixed_precision``, ``seed`` (pipeline/evaluation/evalrecord.py);
- ``rounds`` (``--rounds-run OUT``: a ``run --rounds`` folder, also picked up from ``--samples OUT``):
  ``OUT/rounds.parquet``, one row per round (round 0 the original model; pipeline/core/schemas.py ROUNDS_SCHEMA).

Named queries live in ``stages/queries/NAME.sql`` (``--preset NAME``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.cli.commands import stage_command
from pipeline.core.errors import UserError
from pipeline.core.paths import EVAL_FILE, METRICS_FILE, ROUNDS_TABLE, TASK_RESULTS, quarantine_path_for
from pipeline.evaluation.evalrecord import RESULT_COLUMNS, result_rows

QUERIES_DIR = Path(__file__).resolve().parent / "queries"
_QUARANTINE_TYPES = {"source": "VARCHAR", "line": "BIGINT", "reason": "VARCHAR", "message": "VARCHAR", "raw": "VARCHAR"}


def _sql_str(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _sql_list(paths) -> str:
    return "[" + ", ".join(_sql_str(p) for p in paths) + "]"


def _read_jsonl(paths: list[Path], types: dict[str, str]) -> str:
    """DuckDB's read_json over JSON-lines files, each column read as its type in ``types``."""
    cols = ", ".join(f"{k}: '{v}'" for k, v in types.items())
    return (f"read_json({_sql_list(paths)}, format='newline_delimited', columns={{{cols}}}, "
            "maximum_object_size=1073741824)")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def presets() -> list[str]:
    return sorted(p.stem for p in QUERIES_DIR.glob("*.sql"))


def preset_sql(name: str) -> str:
    path = QUERIES_DIR / f"{name}.sql"
    if not path.is_file():
        raise UserError(f"unknown preset '{name}' (known: {', '.join(presets())})")
    return path.read_text(encoding="utf-8")


def open_connection(pairs=None, quarantine=None, scores=None, run=None, samples=None, evals=None, files=None,
                    rounds_run=None):
    """An in-memory DuckDB connection with the views for whatever files are given.

    ``pairs``: an ingest output file (its quarantine beside it is added when
    present, as an empty view when absent); ``quarantine``: an explicit
    quarantine file (must exist); ``scores``: a score-ref folder; ``run``: a
    training run folder; ``samples``: a make-pairs samples file or a folder holding
    some; ``rounds_run``: a ``run --rounds`` folder (a samples folder holding rounds.parquet adds it too).
    Missing files are a ``UserError`` naming them. ``files``: a list that receives the
    files behind the views (what ``sandbox`` lets a query read).
    """
    import duckdb
    import pyarrow as pa

    from pipeline.core.schemas import QUARANTINE_FIELDS  # here, not at the top: `query --help` needs no pyarrow
    from pipeline.report.visual import read_json_object
    from pipeline.sampling.selfpairs import SAMPLE_COLUMNS

    con = duckdb.connect(":memory:")
    files = [] if files is None else files
    if pairs is not None:
        pairs = Path(pairs)
        if not pairs.is_file():
            raise UserError(f"{pairs}: pairs file not found")
        try:
            table = pa.ipc.open_file(pa.memory_map(str(pairs))).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{pairs}: not an Arrow IPC pairs file: {exc}") from None
        con.register("pairs", table)
        if quarantine is None:
            beside = quarantine_path_for(pairs)
            if beside.is_file():
                quarantine = beside
            else:
                cols = ", ".join(f"CAST(NULL AS {t}) AS {k}" for k, t in _QUARANTINE_TYPES.items())
                con.execute(f"CREATE VIEW quarantine AS SELECT {cols} WHERE false")
    if quarantine is not None:
        quarantine = Path(quarantine)
        if not quarantine.is_file():
            raise UserError(f"{quarantine}: quarantine file not found")
        files.append(quarantine)
        con.execute(f"CREATE VIEW quarantine AS SELECT {', '.join(QUARANTINE_FIELDS)} "
                    f"FROM {_read_jsonl([quarantine], _QUARANTINE_TYPES)}")
    if scores is not None:
        parts = _score_parts(Path(scores))
        files += parts
        _create_view(con, f"CREATE VIEW scores AS SELECT * FROM read_parquet({_sql_list(parts)}, "
                     "union_by_name=true)", scores)
    if run is not None:
        _parquet_view(con, "metrics", Path(run) / METRICS_FILE, files,
                      f"metrics file not found (is {run} a training run folder?)")
        if (Path(run) / TASK_RESULTS).is_file():
            _parquet_view(con, "task_results", Path(run) / TASK_RESULTS, files)
        if evals is None and (Path(run) / EVAL_FILE).is_file():
            evals = Path(run) / EVAL_FILE
    if evals is not None:  # every eval.json there, one row per figure and model; `run` is the folder holding it
        evals = _files_at(Path(evals), EVAL_FILE, f"{EVAL_FILE} under this folder (written by `lldm-dpo eval`)",
                          "eval results not found")
        rows = [r for f in evals for r in result_rows(read_json_object(f), str(f.parent))]
        types = {"VARCHAR": pa.string(), "DOUBLE": pa.float64(), "BIGINT": pa.int64()}
        schema = pa.schema([(k, types[v]) for k, v in RESULT_COLUMNS.items()])
        # read here in Python and registered: no file for the sandbox
        con.register("eval_results_table", pa.Table.from_pylist(rows, schema=schema))
        con.execute("CREATE VIEW eval_results AS SELECT * FROM eval_results_table")
    if samples is not None:
        found = _files_at(Path(samples), "*.samples.jsonl",
                          "*.samples.jsonl files under this folder (written by `lldm-dpo make-pairs`)",
                          "samples file not found")
        files += found
        con.execute(f"CREATE VIEW samples AS SELECT * FROM {_read_jsonl(found, SAMPLE_COLUMNS)}")
        if rounds_run is None and (Path(samples) / ROUNDS_TABLE).is_file():
            rounds_run = samples
    if rounds_run is not None:
        _parquet_view(con, "rounds", Path(rounds_run) / ROUNDS_TABLE, files,
                      f"rounds table not found (is {rounds_run} a `lldm-dpo run --rounds` folder?)")
    return con


def _parquet_view(con, name: str, path: Path, files: list[Path], missing: str | None = None) -> None:
    """View ``name`` over one Parquet file: checked first (absent: ``missing`` names it; a bad file named), and
    let through the sandbox."""
    if missing and not path.is_file():
        raise UserError(f"{path}: {missing}")
    _check_parquet(path)
    files.append(path)
    _create_view(con, f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_str(path)})", path)


def _score_parts(scores: Path) -> list[Path]:
    """The parts of a finished cache, as its manifest lists them, each checked against its recorded sha256 (an
    altered, cut or missing part is named, never shown as if it were the cache)."""
    from pipeline.refcache.reader import open_cache

    if not scores.is_dir():
        raise UserError(f"{scores}: no part-*.parquet score files (folder not found)")
    if not (scores / "manifest.json").is_file():
        if any(scores.glob("part-*.parquet")):
            raise UserError(f"{scores}: no manifest.json: an unfinished (or damaged) cache is not queried; rerun "
                            "score-ref to finish it")
        raise UserError(f"{scores}: no part-*.parquet score files in this folder")
    cache = open_cache(scores)
    parts = cache.parts
    for part in parts:
        cache.verify_part(part)
        _check_parquet(part)
    if not parts:
        raise UserError(f"{scores}: the manifest lists no part files")
    return parts


def _check_parquet(path: Path) -> None:
    """A one-line error naming a file that does not read as Parquet (junk, or cut short)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def _create_view(con, sql: str, path) -> None:
    import duckdb

    try:
        con.execute(sql)
    except duckdb.Error as exc:
        raise UserError(f"{path}: cannot be read ({_first_line(exc)})") from None


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
    con.execute("SET allowed_paths = " + _sql_list(paths))
    if dirs:
        con.execute("SET allowed_directories = " + _sql_list(dirs))
    con.execute("SET enable_external_access = false")


def _files_at(path: Path, pattern: str, none_under: str, not_found: str) -> list[Path]:
    """``path`` itself, or every file named ``pattern`` under it when a folder; UserError naming it otherwise."""
    if path.is_dir():
        found = sorted(path.rglob(pattern))
        if not found:
            raise UserError(f"{path}: no {none_under}")
        return found
    if path.is_file():
        return [path]
    raise UserError(f"{path}: {not_found}")


def check_read_only(con, sql: str) -> None:
    """Refuse statements that write files or change the database (COPY ... TO, EXPORT, ATTACH,
    INSTALL/LOAD, SET/PRAGMA, CREATE ...): only SELECT-like queries (and EXPLAIN of one) run.

    DuckDB tells the statement kinds (``extract_statements``), so no SQL is parsed here.
    """
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UserError(f"query failed: {_first_line(exc)}") from None
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
        raise UserError(f"query failed: {_first_line(exc)}") from None


def _plain(value: Any) -> Any:
    """JSON-friendly value: lists/dicts kept, NaN/inf as null, everything else as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    try:  # Decimal and numpy scalars
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _json_cell(v: Any) -> str:
    return json.dumps(_plain(v), ensure_ascii=False)


def to_csv(columns: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(["" if v is None else _json_cell(v) if isinstance(v, (list, dict, tuple)) else _plain(v) for v in row]
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


def _print_table(columns: list[str], rows: list[tuple], max_cell: int = 80) -> None:
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


@dataclass
class QueryConfig:
    sql: str = ""
    """SQL over the views pairs, quarantine, scores, metrics (and task_results)."""
    pairs: Optional[Path] = None
    """Ingest output (Arrow): views 'pairs' and 'quarantine'."""
    quarantine: Optional[Path] = None
    """Quarantine JSONL (default: beside pairs)."""
    scores: Optional[Path] = None
    """score-ref output folder: view 'scores'."""
    run: Optional[Path] = None
    """Training run folder: view 'metrics' (and 'task_results' once evaluated)."""
    samples: Optional[Path] = None
    """make-pairs samples file, or a folder of them: view 'samples'."""
    evals: Optional[Path] = None
    """An eval.json, or a folder searched for them (several runs side by side): view 'eval_results'."""
    rounds_run: Optional[Path] = None
    """A `run --rounds` output folder: view 'rounds' (its rounds.parquet, one row per round)."""
    preset: Optional[str] = None
    """Run a named query from stages/queries/ instead of SQL."""
    csv: bool = False
    """Print CSV (--json prints a JSON array of row objects)."""
    allow_write: bool = False
    """Allow statements that write files or change settings (COPY ... TO, ...); also lifts the read limit."""
    allow_read: list[str] = field(default_factory=list)
    """Files or folders SQL may read besides the views' own (read_csv, read_parquet, glob, ...); without it a
    query reads only the files behind the views."""


def run(cfg: QueryConfig) -> tuple[list[str], list[tuple]]:
    """The query's columns and rows."""
    if cfg.preset is not None and cfg.sql:
        raise UserError("give either SQL or --preset, not both")
    sql = preset_sql(cfg.preset) if cfg.preset is not None else cfg.sql
    if not sql:
        raise UserError(f"no SQL given (pass a query, or --preset NAME: {', '.join(presets())})")
    files: list[Path] = []
    con = open_connection(pairs=cfg.pairs, quarantine=cfg.quarantine, scores=cfg.scores, run=cfg.run,
                          samples=cfg.samples, evals=cfg.evals, files=files,
                          rounds_run=cfg.rounds_run)
    if not cfg.allow_write:
        # No extension is downloaded or loaded behind a query's back (that writes under ~/.duckdb).
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        sandbox(con, files, cfg.allow_read)
    return execute(con, sql, allow_write=cfg.allow_write)


def _query_action(cfg: QueryConfig, as_json: bool) -> None:
    if as_json and cfg.csv:
        raise UserError("choose one of --json and --csv")
    columns, rows = run(cfg)
    if as_json:
        as_dicts = [{c: _plain(v) for c, v in zip(columns, row)} for row in rows]
        sys.stdout.write(json.dumps(as_dicts, ensure_ascii=False, indent=2) + "\n")
    elif cfg.csv:
        sys.stdout.write(to_csv(columns, rows))
    else:
        _print_table(columns, rows)


command = stage_command(QueryConfig, _query_action, positional={"sql": False},
                        doc="Query pairs, quarantine, reference scores and training metrics with SQL (DuckDB).")
