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

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.cli.commands import stage_command
from pipeline.core.errors import UserError
from pipeline.query.output import print_table, to_csv, to_json
from pipeline.query.sql import execute, sandbox
from pipeline.query.views import open_connection

QUERIES_DIR = Path(__file__).resolve().parent / "queries"


def presets() -> list[str]:
    return sorted(p.stem for p in QUERIES_DIR.glob("*.sql"))


def preset_sql(name: str) -> str:
    path = QUERIES_DIR / f"{name}.sql"
    if not path.is_file():
        raise UserError(f"unknown preset '{name}' (known: {', '.join(presets())})")
    return path.read_text(encoding="utf-8")


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
        sys.stdout.write(to_json(columns, rows) + "\n")
    elif cfg.csv:
        sys.stdout.write(to_csv(columns, rows))
    else:
        print_table(columns, rows)


command = stage_command(QueryConfig, _query_action, positional={"sql": False},
                        doc="Query pairs, quarantine, reference scores and training metrics with SQL (DuckDB).")
