"""DuckDB views over the pipeline's artefacts, named as DESIGN "What lldm-dpo query exposes" names them (a
contract): ``pairs`` and ``quarantine`` (ingest), ``scores`` (the reference cache), ``metrics`` and
``task_results`` (a training run), ``eval_results`` (eval.json records), ``samples`` (make-pairs) and ``rounds``
(``run --rounds``). Each file is checked before its view is made: a missing or unreadable one is a one-line
``UserError`` naming it."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.paths import EVAL_FILE, METRICS_FILE, ROUNDS_TABLE, TASK_RESULTS, quarantine_path_for
from pipeline.evaluation.evalrecord import RESULT_COLUMNS, result_rows

QUARANTINE_TYPES = {"source": "VARCHAR", "line": "BIGINT", "reason": "VARCHAR", "message": "VARCHAR", "raw": "VARCHAR"}


def sql_str(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def sql_list(paths) -> str:
    return "[" + ", ".join(sql_str(p) for p in paths) + "]"


def _read_jsonl(paths: list[Path], types: dict[str, str]) -> str:
    """DuckDB's read_json over JSON-lines files, each column read as its type in ``types``."""
    cols = ", ".join(f"{k}: '{v}'" for k, v in types.items())
    return (f"read_json({sql_list(paths)}, format='newline_delimited', columns={{{cols}}}, "
            "maximum_object_size=1073741824)")


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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

    from pipeline.core.schemas import QUARANTINE_FIELDS  # here, not at the top: `query --help` needs no pyarrow
    from pipeline.sampling.selfpairs import SAMPLE_COLUMNS

    con = duckdb.connect(":memory:")
    files = [] if files is None else files
    if pairs is not None:
        quarantine = _pairs_view(con, Path(pairs), quarantine)
    if quarantine is not None:
        quarantine = Path(quarantine)
        if not quarantine.is_file():
            raise UserError(f"{quarantine}: quarantine file not found")
        files.append(quarantine)
        con.execute(f"CREATE VIEW quarantine AS SELECT {', '.join(QUARANTINE_FIELDS)} "
                    f"FROM {_read_jsonl([quarantine], QUARANTINE_TYPES)}")
    if scores is not None:
        parts = _score_parts(Path(scores))
        files += parts
        _create_view(con, f"CREATE VIEW scores AS SELECT * FROM read_parquet({sql_list(parts)}, "
                     "union_by_name=true)", scores)
    if run is not None:
        _parquet_view(con, "metrics", Path(run) / METRICS_FILE, files,
                      f"metrics file not found (is {run} a training run folder?)")
        if (Path(run) / TASK_RESULTS).is_file():
            _parquet_view(con, "task_results", Path(run) / TASK_RESULTS, files)
        if evals is None and (Path(run) / EVAL_FILE).is_file():
            evals = Path(run) / EVAL_FILE
    if evals is not None:  # every eval.json there, one row per figure and model; `run` is the folder holding it
        _eval_results_view(con, Path(evals))
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


def _pairs_view(con, pairs: Path, quarantine):
    """View ``pairs`` over an ingest output file; the quarantine file to show (the one beside it unless one is
    given), or None with an empty ``quarantine`` view made when there is none."""
    import pyarrow as pa

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
            return beside
        cols = ", ".join(f"CAST(NULL AS {t}) AS {k}" for k, t in QUARANTINE_TYPES.items())
        con.execute(f"CREATE VIEW quarantine AS SELECT {cols} WHERE false")
    return quarantine


def _eval_results_view(con, evals: Path) -> None:
    """View ``eval_results`` over every eval.json at ``evals``, read here in Python and registered (no file for
    the sandbox)."""
    import pyarrow as pa

    from pipeline.report.visual import read_json_object

    found = _files_at(evals, EVAL_FILE, f"{EVAL_FILE} under this folder (written by `lldm-dpo eval`)",
                      "eval results not found")
    rows = [r for f in found for r in result_rows(read_json_object(f), str(f.parent))]
    types = {"VARCHAR": pa.string(), "DOUBLE": pa.float64(), "BIGINT": pa.int64()}
    schema = pa.schema([(k, types[v]) for k, v in RESULT_COLUMNS.items()])
    con.register("eval_results_table", pa.Table.from_pylist(rows, schema=schema))
    con.execute("CREATE VIEW eval_results AS SELECT * FROM eval_results_table")


def _parquet_view(con, name: str, path: Path, files: list[Path], missing: str | None = None) -> None:
    """View ``name`` over one Parquet file: checked first (absent: ``missing`` names it; a bad file named), and
    let through the sandbox."""
    if missing and not path.is_file():
        raise UserError(f"{path}: {missing}")
    _check_parquet(path)
    files.append(path)
    _create_view(con, f"CREATE VIEW {name} AS SELECT * FROM read_parquet({sql_str(path)})", path)


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
        raise UserError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None


def _create_view(con, sql: str, path) -> None:
    import duckdb

    try:
        con.execute(sql)
    except duckdb.Error as exc:
        raise UserError(f"{path}: cannot be read ({first_line(exc)})") from None


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
