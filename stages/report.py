"""``lldm-dpo report RUN_DIR``: a run's training curves (PNG) and a self-contained HTML page."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.cli.commands import emit_json, stage_command


@dataclass
class ReportConfig:
    run_dir: Path = Path("runs/dpo")
    """Run folder (with metrics.parquet; eval.json and config.yaml optional)."""
    out_html: Optional[Path] = None
    """HTML path (default RUN_DIR/report.html)."""
    out_png: Optional[Path] = None
    """PNG path (default RUN_DIR/report.png)."""


def run(cfg: ReportConfig):
    from pipeline.report.visual import write_report

    return write_report(cfg.run_dir, cfg.out_html, cfg.out_png)


def _action(cfg: ReportConfig, as_json: bool) -> None:
    paths = run(cfg)
    if as_json:
        emit_json({"html": str(paths.html), "png": str(paths.png)})
    else:
        print(f"report: {paths.html}\nchart:  {paths.png}")


command = stage_command(ReportConfig, _action, positional={"run_dir": True},
                        doc="Write a run's report: training curves (PNG) and a self-contained HTML page.")
