"""bench/cache_memory.py finds train's --gap-threshold (its caches hold synthetic reference terms that the
start check would rightly refuse without it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import cache_memory  # noqa: E402


def test_the_bench_sees_the_start_checks_flag_in_trains_help():
    help_text = cache_memory.train_help(str(REPO), {**os.environ, "PYTHONPATH": str(REPO)})
    assert "--gap-threshold" in help_text and "--max-steps" in help_text
