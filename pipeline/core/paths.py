"""Names of the files and folders the stages write, in one place.

A run folder (``train --out``, ``sft --out``): ``checkpoint-N`` (N the global step, transformers' layout),
``final``, ``metrics.parquet``, ``tensorboard/``, ``trackers/`` (--report-to), ``config.yaml``, and once evaluated and
reported ``eval.json``, ``task_results.parquet``, ``report.html``/``.png``.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint"
"""A checkpoint is ``RUN/checkpoint-N``, N the global step (transformers' ``PREFIX_CHECKPOINT_DIR``)."""
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LEGACY_CHECKPOINTS_DIR = "checkpoints"
"""Where lldm-dpo before transformers' layout kept its checkpoints (``checkpoints/step-NNNNNNN``): still a run
output (a fresh run refuses it, --overwrite removes what it wrote), never resumed."""
FINAL_DIR = "final"
METRICS_FILE = "metrics.parquet"
TENSORBOARD_DIR = "tensorboard"
TRACKERS_DIR = "trackers"
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
TASK_RESULTS = "task_results.parquet"
REPORT_HTML = "report.html"
REPORT_PNG = "report.png"
LORA_ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter config: its presence makes a folder a LoRA adapter (the loader, merge)."""

RUN_OUTPUTS = (LEGACY_CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, TENSORBOARD_DIR, TRACKERS_DIR, EVAL_FILE, TASK_RESULTS,
               REPORT_HTML, REPORT_PNG)
"""What a run folder holds besides its ``checkpoint-N`` folders; a fresh run into a used folder is refused (or,
with overwrite, clears these)."""


def run_outputs_in(out: str | Path) -> list[str]:
    """The names of an earlier run's outputs present in ``out``: RUN_OUTPUTS and every ``checkpoint-N`` folder."""
    out = Path(out)
    names = [p for p in RUN_OUTPUTS if (out / p).exists()]
    if out.is_dir():
        names += sorted((p.name for p in out.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)),
                        key=lambda n: int(n.split("-")[1]))
    return names

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
