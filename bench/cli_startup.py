"""Start-up time of the CLI's help and refusals, against the bare interpreter.

Times ``python -m stages.cli ARGS`` for each invocation of ``--calls`` (default ``CALLS``: every command's
``--help`` and refusals of a bad value) in this checkout and, with ``--before DIR``, in another checkout (e.g. the
main branch before a change), interleaved in the same run; the baseline is the bare interpreter start
(``python -c pass``). Prints medians, the seconds above the interpreter, and ratios; ``--record`` appends them to
bench/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from results import matmul_gflops  # noqa: E402

CALLS = ["query --help", "ingest --help", "score-ref --help", "train --help", "train cache --learning-rate -1",
         "score-ref pairs.arrow --samples 0", "sft --help", "eval --help", "eval --limit-task -3", "generate --help",
         "generate --prompts p.jsonl --remasking entropy", "make-pairs --help",
         "make-pairs q.jsonl --pairs-per-question 0", "merge --help", "merge adapter --dtype int3",
         "init-model --help", "report --help", "run --help", "run --rounds -1", "plan --help",
         "plan train --gpu-memory -3GiB"]
"""Help of the pipeline's commands, and refusals of an out-of-range value (exit code 1 before any file is read)."""


def timed(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if done.returncode not in (0, 1):  # help: 0; a refused value: 1
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--before", type=Path, default=None, help="Another checkout to time the same command in.")
    p.add_argument("--record", action="store_true", help="Append the results to bench/RESULTS.md.")
    p.add_argument("--calls", nargs="+", default=CALLS, help="Invocations to time, each one quoted string.")
    args = p.parse_args(argv)

    def command(checkout: Path, call: str) -> list[str]:  # older checkouts: `python -m pipeline.cli`
        module = "stages.cli" if (checkout / "stages" / "cli.py").is_file() else "pipeline.cli"
        return [sys.executable, "-m", module, *call.split()]

    checkouts = {"this checkout": ROOT}
    if args.before is not None:
        checkouts = {"before": args.before.resolve(), **checkouts}
    targets = {"interpreter": ([sys.executable, "-c", "pass"], ROOT)}
    for call in args.calls:
        for name, path in checkouts.items():
            targets[f"{name}: {call}"] = (command(path, call), path)
    times: dict[str, list[float]] = {name: [] for name in targets}
    load0 = os.getloadavg()[0]
    for _ in range(args.runs):  # interleaved, so load on the machine falls on every target alike
        for name, (cmd, cwd) in targets.items():
            times[name].append(timed(cmd, cwd))
    base = statistics.median(times["interpreter"])
    med = {name: statistics.median(values) for name, values in times.items()}
    lines = [f"median of {args.runs} interleaved runs; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} "
             f"at end, on {os.cpu_count()} cores; fp32 matmul {matmul_gflops(library='numpy'):.1f} GFLOP/s"
             + (f"; before = {args.before}" if args.before is not None else ""),
             f"{'interpreter (python -c pass)':58s} {base:6.3f} s"]
    for call in args.calls:
        for name in checkouts:
            m = med[f"{name}: {call}"]
            lines.append(f"{name + ': ' + call:58s} {m:6.3f} s  ({m - base:+.3f} s above the interpreter)")
        if args.before is not None:
            lines.append(f"{'':58s} this checkout / before: x{med[f'this checkout: {call}'] / med[f'before: {call}']:.2f}")
    print("\n".join(lines))
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import record

        record("cli_startup.py", argv if argv is not None else sys.argv[1:], lines)


if __name__ == "__main__":
    main()
