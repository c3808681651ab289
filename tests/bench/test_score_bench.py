"""bench/score.py --end-to-end runs against the current code: each phase it times is still where it looks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"


@pytest.mark.skipif(not DATA.exists(), reason="the shared GSM8K data is not beside the repository")
def test_end_to_end_times_every_phase_of_score_ref():
    """One pair, one sample, the micro preset: both processes run and score-ref's phases are found (a renamed
    function would crash the wrapping or leave its phase at zero)."""
    done = subprocess.run([sys.executable, "bench/score.py", "--end-to-end", "--preset", "micro", "--vocab-size", "0",
                           "--pairs", "1", "--samples", "1", "--repeats", "1", "--min-len", "1", "--no-record"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = next(line for line in done.stdout.splitlines() if line.startswith("lldm-dpo score-ref"))
    seconds = [float(v) for v in re.findall(r"([\d.]+)s", ours)]
    wall, phases = seconds[0], dict(zip(("load", "tokenize", "masks", "forward", "head", "write"), seconds[1:7]))
    assert phases["load"] > 0 and phases["forward"] + phases["head"] > 0, ours  # (printed to 0.01 s)
    assert sum(phases.values()) < wall, ours
    assert re.search(r"speed ratio .*: x\d+\.\d+", done.stdout), done.stdout[-2000:]
