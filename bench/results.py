"""What the benchmarks share: their output appended to bench/RESULTS.md with its command, the machine's float32
matmul rate printed beside their timings, and preference pairs from the shared GSM8K model solutions."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
"""Real GSM8K questions with model-written solutions, read where shared/ sits beside the repository."""
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def record(script: str, argv: list[str], lines: list[str]) -> None:
    """One dated section: ``## script, time`` then the command line and the printed lines."""
    command = f"python bench/{script} " + " ".join(shlex.quote(a) for a in argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the bench/*.py scripts; newest last.\n", encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {script}, {stamp}\n\n```\n$ {command.strip()}\n" + "\n".join(lines) + "\n```\n")


def publish(script: str, argv: list[str], lines: list[str], to_results: bool) -> None:
    """Print a benchmark's lines; with ``to_results`` (its --record) also append them to RESULTS.md."""
    print("\n".join(lines))
    if to_results:
        record(script, argv, lines)


def matmul_gflops(n: int = 1024, repeats: int = 5, library: str = "torch") -> float:
    """The machine's float32 matmul rate in GFLOP/s: the best of ``repeats`` n x n products, in torch (this
    process's threads) or numpy (for a benchmark that must not import torch)."""
    if library == "numpy":
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    else:
        import torch

        a = torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def gsm8k_pairs() -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {"prompt", "chosen", "rejected"}) for each GSM8K question that some model got wrong: the
    reference solution chosen, the first wrong model solution rejected. Exits with one line when the file is absent."""
    if not GSM8K.exists():
        sys.exit(f"error: {GSM8K} not found (the shared GSM8K data sits beside the repository)")
    with GSM8K.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            rec = json.loads(line)
            wrong = [rec[k]["solution"] for k in SOLVERS if not rec[k]["is_correct"]]
            if wrong:
                yield line_no, {"prompt": rec["question"], "chosen": rec["ground_truth"], "rejected": wrong[0]}
