"""Names of the files and folders the stages write, in one place.

A run folder (``train --out``): ``checkpoints/step-N``, ``final``,
``metrics.parquet``, ``tensorboard/``, ``trackers/`` (--report-to), ``config.yaml``, and once evaluated and
reported ``eval.json``, ``task_results.parquet``, ``report.html``/``.png``.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.parquet"
TENSORBOARD_DIR = "tensorboard"
TRACKERS_DIR = "trackers"
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
TASK_RESULTS = "task_results.parquet"
REPORT_HTML = "report.html"
REPORT_PNG = "report.png"

RUN_OUTPUTS = (CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, TENSORBOARD_DIR, TRACKERS_DIR, EVAL_FILE, TASK_RESULTS,
               REPORT_HTML, REPORT_PNG)
"""What a run folder holds; a fresh run into a used folder is refused (or, with overwrite, clears these)."""

ROUNDS_TABLE = "rounds.parquet"
ROUNDS_PNG = "rounds.png"
"""In a ``run --rounds`` folder, beside rounds.json and rounds.md: the table across rounds and its plot."""

PAIRS_FILE = "pairs.arrow"
"""The pairs file inside a ``run`` folder (ingest's own default is data/out/pairs.arrow)."""


def quarantine_path_for(out: str | Path) -> Path:
    """Where the quarantine goes by default: beside the pairs file (``pairs.arrow`` -> ``pairs.quarantine.jsonl``)."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.quarantine.jsonl")
