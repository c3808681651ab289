"""Start-up time of ``lldm-dpo query --help`` (the cheapest command: no torch), against a baseline.

Times ``python -m stages.cli query --help`` in this checkout and, with
``--before DIR``, in another checkout (e.g. the main branch before a change),
interleaved in the same run; the baseline is the bare interpreter start
(``python -c pass``). Prints medians and ratios; ``--record`` appends them to
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


def timed(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """The machine's float32 matmul rate (numpy, best of ``repeats``), to set the timings beside."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(_seconds(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--before", type=Path, default=None, help="Another checkout to time the same command in.")
    p.add_argument("--record", action="store_true", help="Append the results to bench/RESULTS.md.")
    args = p.parse_args(argv)
    def command(checkout: Path) -> list[str]:  # the CLI moved from pipeline/cli.py to stages/cli.py
        module = "stages.cli" if (checkout / "stages" / "cli.py").is_file() else "pipeline.cli"
        return [sys.executable, "-m", module, "query", "--help"]

    targets = {"interpreter (python -c pass)": ([sys.executable, "-c", "pass"], ROOT)}
    if args.before is not None:
        targets[f"before ({args.before})"] = (command(args.before.resolve()), args.before.resolve())
    targets["this checkout"] = (command(ROOT), ROOT)
    times: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(args.runs):  # interleaved, so load on the machine falls on every target alike
        for name, (cmd, cwd) in targets.items():
            times[name].append(timed(cmd, cwd))
    base = statistics.median(times["interpreter (python -c pass)"])
    lines = [f"`lldm-dpo query --help`, median of {args.runs} interleaved runs; load average "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; fp32 matmul {matmul_gflops():.1f} GFLOP/s"]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(f"{name:40s} {med:6.3f} s  (x{med / base:.2f} the interpreter start)")
    if args.before is not None:
        before = statistics.median(times[f"before ({args.before})"])
        lines.append(f"this checkout / before: x{statistics.median(times['this checkout']) / before:.2f}")
    print("\n".join(lines))
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import record

        record("cli_startup.py", argv if argv is not None else sys.argv[1:], lines)


if __name__ == "__main__":
    main()
