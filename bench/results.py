"""Appending a benchmark's output, with the command that produced it, to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import shlex
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(script: str, argv: list[str], lines: list[str]) -> None:
    """One dated section: ``## script, time`` then the command line and the printed lines."""
    command = f"python bench/{script} " + " ".join(shlex.quote(a) for a in argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the bench/*.py scripts; newest last.\n", encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {script}, {stamp}\n\n```\n$ {command.strip()}\n" + "\n".join(lines) + "\n```\n")
