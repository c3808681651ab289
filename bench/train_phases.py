"""Where a short train's seconds go: setup, the start check, the steps, save, for caches of several sizes.

Issue 34, item 3: the start check (the cache's model reproducing its cached terms before step 1) must cost in
proportion to what it checks, step 1's pairs, not the cache's size; a 2-step train on a 200-pair cache no slower
than its 2 steps plus that check. For each ``--pairs`` size the bench writes that many GSM8K pairs (the shared
data beside the repository: the reference solution chosen, a model's wrong solution rejected), ingests them and
scores them with ``lldm-dpo score-ref``, then runs ``lldm-dpo train CACHE --max-steps S --json`` as whole
processes, ``--repeats`` times, and reads the run's ``phase_seconds`` (setup, start_check, train, save).

Printed per cache: the process's wall time, each phase (best of the repeats), a step's seconds, the check in
steps (start_check / one step), and the forward calls, rows and tokens of the check and of the steps (counted in
one more run in the bench's own process). The check scores only the forward batches that hold step 1's pairs, so its
seconds should stay level as the cache grows; those are score-ref's batches, which hold other pairs' rows too.

CPU:  OMP_NUM_THREADS=2 python bench/train_phases.py --pairs 50 200 --repeats 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from results import gsm8k_pairs, matmul_gflops, publish  # noqa: E402


def write_pairs(path: Path, count: int) -> int:
    """The first ``count`` of ``results.gsm8k_pairs`` as a JSONL file; returns how many (fewer when the file has
    fewer)."""
    rows = [pair for _, pair in itertools.islice(gsm8k_pairs(), count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def cli(args: list[str], cwd: Path) -> tuple[dict, float]:
    """``lldm-dpo ARGS --json`` as a whole process: (its JSON summary, wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.cli", *args, "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: lldm-dpo {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), wall


def count_forwards(folder: Path, args) -> dict:
    """The start check's and the steps' forward calls, rows and tokens, from one more train run in this process
    with the scorer's forward counted (the check: score-ref's batches that hold step 1's pairs)."""
    import contextlib
    import io

    import pipeline.models.scoring as scoring
    import pipeline.trainer.dpo_checks as checks
    from stages.train import TrainConfig, run

    counts = {"check": [0, 0, 0], "steps": [0, 0, 0]}
    phase = ["steps"]
    forward, start_check = scoring.MaskedRowScorer.forward, checks.start_check

    def counted_forward(self, input_ids, *rest, **kwargs):
        c = counts[phase[0]]
        c[0], c[1], c[2] = c[0] + 1, c[1] + input_ids.shape[0], c[2] + input_ids.numel()
        return forward(self, input_ids, *rest, **kwargs)

    def counted_check(*a, **k):
        phase[0] = "check"
        try:
            return start_check(*a, **k)
        finally:
            phase[0] = "steps"

    scoring.MaskedRowScorer.forward, checks.start_check = counted_forward, counted_check
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            run(TrainConfig(scores=folder / "cache", out=folder / "counted", max_steps=args.steps,
                            batch_size=args.batch_size, progress=False, tensorboard=False))
    finally:
        scoring.MaskedRowScorer.forward, checks.start_check = forward, start_check
    return counts


def measure(args) -> list[dict]:
    """Per cache size: score-ref's wall time and each train repeat's phases and wall time."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        tmp = Path(tmp)
        for size in args.pairs:
            folder = tmp / f"pairs{size}"
            folder.mkdir()
            written = write_pairs(folder / "pairs.jsonl", size)
            cli(["ingest", "pairs.jsonl", "--out", "pairs.arrow", "--eval-fraction", "0", "--no-progress"], folder)
            _, score_wall = cli(["score-ref", "pairs.arrow", "--model", args.model, "--samples", str(args.samples),
                                 "--out", "cache", "--no-progress"], folder)
            runs = []
            for r in range(args.repeats):
                summary, wall = cli(["train", "cache", "--max-steps", str(args.steps), "--out", f"run{r}",
                                     "--batch-size", str(args.batch_size), "--no-progress"], folder)
                runs.append({"wall": wall, "seconds": summary["seconds"], **summary["phase_seconds"]})
            results.append({"pairs": written, "score_wall": score_wall, "runs": runs,
                            "forwards": count_forwards(folder, args)})
    return results


def report_lines(args, results: list[dict], gflops: float, load0, load1) -> list[str]:
    lines = [f"model {args.model}, score-ref --samples {args.samples}, train --max-steps {args.steps} "
             f"--batch-size {args.batch_size}; whole processes, best of {args.repeats}; "
             f"{os.environ.get('OMP_NUM_THREADS', 'all')} torch threads; fp32 matmul {gflops:.0f} GFLOP/s; "
             f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end",
             f"{'cache pairs':>11} {'score-ref':>10} {'train wall':>11} {'setup':>7} {'check':>7} "
             f"{'steps':>7} {'save':>7} {'a step':>7} {'check/step':>11}"]
    for res in results:
        best = {k: min(run[k] for run in res["runs"]) for k in res["runs"][0]}
        step = best["train"] / args.steps
        lines.append(f"{res['pairs']:>11} {res['score_wall']:>9.1f}s {best['wall']:>10.1f}s {best['setup']:>6.2f}s "
                     f"{best['start_check']:>6.2f}s {best['train']:>6.2f}s {best['save']:>6.2f}s {step:>6.2f}s "
                     f"{best['start_check'] / step:>10.2f}x")
    for res in results:
        (cn, cr, ct), (sn, sr, st) = res["forwards"]["check"], res["forwards"]["steps"]
        lines.append(f"{res['pairs']:>11} pairs: the check ran {cn} forward calls, {cr} rows, {ct:,} tokens (no "
                     f"gradient); the {args.steps} steps {sn} calls, {sr} rows, {st:,} tokens (with backward)")
    lines.append("check: start_check of phase_seconds (step 1's pairs through score-ref's forward batches, no "
                 "gradient); steps: the train phase (optimizer steps, logging); a step: steps / --max-steps; "
                 "calls counted in one more run in the bench's process")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[50, 200], help="cache sizes (GSM8K pairs)")
    p.add_argument("--model", default="micro", help="preset or model folder scored and trained")
    p.add_argument("--samples", type=int, default=4, help="score-ref's Monte Carlo samples per response")
    p.add_argument("--steps", type=int, default=2, help="train's --max-steps")
    p.add_argument("--batch-size", type=int, default=4, help="train's --batch-size (step 1's pairs: the check's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--record", action="store_true", help="append the output to bench/RESULTS.md")
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    gflops = matmul_gflops()
    results = measure(args)
    lines = report_lines(args, results, gflops, load0, os.getloadavg())
    publish("train_phases.py", sys.argv[1:] if argv is None else argv, lines, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
