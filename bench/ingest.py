"""Benchmark: ``lldm-dpo ingest`` against ``datasets.load_dataset("json")`` on the same file, whole processes.

Builds a 200,000-pair JSONL from the real GSM8K model solutions in
../shared/data/gsm8k (prompt = question, chosen = a correct solution, rejected
= an incorrect one, replicated with a variant tag so every pair is distinct),
plus a copy with 1% bad lines (broken JSON, invalid UTF-8, missing field,
duplicates). Each contender runs as its own fresh process (interpreter start,
imports, work, exit), interleaved, best of ``--repeats``:

- baseline: ``python -c "import datasets; datasets.load_dataset('json',
  data_files=clean, split='train')"`` into a fresh cache folder (parse + Arrow
  cache write, no validation);
- ``lldm-dpo ingest`` (``python -m stages.cli ingest ... --json``) on the
  clean file and on the 1%-bad file; with ``--before DIR``, also the ingest of
  another checkout (e.g. ``git archive main | tar -x -C DIR``), in the same run;
  where Arrow's thread pool has more than one thread (``OMP_NUM_THREADS`` unset
  or above 1 on a multi-core machine), also the clean ingest without parsing the
  next chunk on a thread ("no overlap").

Every process runs under the same environment, so ``OMP_NUM_THREADS`` sets
Arrow's thread pool alike for load_dataset's parse and for ingest: with 1 both
use one core; unset, load_dataset parses on all cores and ingest parses ahead on
a second thread.

Prints wall and CPU seconds (user + system of the process; on a shared machine
the steadier figure), records/s, the ratios ingest / baseline (goal: <= 1.0
clean, <= 1.5 with bad lines), the load average and the machine's float32
matmul rate. Run
from the repository root:

    python bench/ingest.py [--pairs 200000] [--repeats 3] [--workers 1] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results import matmul_gflops  # noqa: E402

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
LOAD_DATASET = """import sys, datasets
datasets.disable_progress_bars()
print(datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[2]).num_rows)
"""


NO_OVERLAP = """import sys
from pipeline.data import ingesting
ingesting.overlap_default = lambda: False
sys.argv[0] = "lldm-dpo"
from stages.cli import main
main()
"""


def arrow_threads() -> int:
    """Arrow's thread pool size in a fresh process with this environment (OMP_NUM_THREADS sets it): what
    load_dataset's parse may use, and whether ingest parses ahead on a thread (more than 1)."""
    code = "import pyarrow; print(pyarrow.cpu_count())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def base_pairs() -> list[dict]:
    """Distinct valid pairs (two models sometimes wrote the same wrong solution)."""
    from pipeline.data.pairs import Invalid, validate_record

    pairs, seen = [], set()
    for line in GSM8K.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        correct = [rec["ground_truth"]] + [rec[m]["solution"] for m in MODELS if rec[m]["is_correct"]]
        wrong = [rec[m]["solution"] for m in MODELS if not rec[m]["is_correct"]]
        for c in correct:
            for w in wrong:
                pair = {"prompt": rec["question"], "chosen": c, "rejected": w}
                try:
                    pid = validate_record(pair).pair_id
                except Invalid:
                    continue
                if pid not in seen:
                    seen.add(pid)
                    pairs.append(pair)
    return pairs


def build_inputs(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    base = base_pairs()
    clean, bad = folder / "clean.jsonl", folder / "bad.jsonl"
    rng = random.Random(seed)
    with open(clean, "w", encoding="utf-8") as fc, open(bad, "wb") as fb:
        for i in range(n):
            p = base[i % len(base)]
            row = {"prompt": f"{p['prompt']} (variant {i // len(base)})", "chosen": p["chosen"], "rejected": p["rejected"]}
            line = json.dumps(row, ensure_ascii=False)
            fc.write(line + "\n")
            data = line.encode("utf-8")
            if rng.random() < 0.01:
                kind = rng.randrange(4)
                if kind == 0:
                    data = data[: len(data) // 2]  # truncated JSON
                elif kind == 1:
                    data = data[:20] + b"\xff\xfe" + data[20:]  # invalid UTF-8
                elif kind == 2:
                    data = json.dumps({"prompt": row["prompt"], "chosen": row["chosen"]}).encode()  # missing field
                else:
                    fb.write(data + b"\n")  # duplicate pair
            fb.write(data + b"\n")
    return clean, bad


def timed_process(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds and CPU seconds (user + system, all its threads) of one whole process, and its stdout (a failure
    ends the bench, naming the command). On a shared machine the CPU time is the steadier of the two."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, done.stdout


def contenders(work: Path, clean: Path, bad: Path, workers: int, before: Path | None) -> dict[str, tuple[list[str], Path]]:
    """name -> (argv, checkout to run it in)."""
    def ingest(path: Path, out: str) -> list[str]:
        return [sys.executable, "-m", "stages.cli", "ingest", str(path), "--out", str(work / out / "pairs.arrow"),
                "--workers", str(workers), "--no-progress", "--json"]

    runs = {BASELINE: ([sys.executable, "-c", LOAD_DATASET, str(clean), str(work / "hf_cache")], REPO),
            "ingest clean": (ingest(clean, "clean"), REPO), "ingest 1% bad lines": (ingest(bad, "bad"), REPO)}
    if arrow_threads() > 1:  # ingest parses the next chunk on a thread: the same command without, for comparison
        runs["ingest clean, no overlap"] = ([sys.executable, "-c", NO_OVERLAP, *ingest(clean, "clean_seq")[3:]], REPO)
    if before is not None:
        runs["ingest clean, --before"] = (ingest(clean, "before_clean"), before)
        runs["ingest 1% bad, --before"] = (ingest(bad, "before_bad"), before)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description="ingest vs datasets.load_dataset('json'), whole processes")
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="ingest --workers")
    ap.add_argument("--before", type=Path, default=None, help="another checkout whose ingest is timed in the same run")
    args = ap.parse_args()
    if not GSM8K.is_file():
        sys.exit(f"needs {GSM8K}")
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        clean, bad = build_inputs(work, args.pairs)
        size_mb = clean.stat().st_size / 1e6
        runs = contenders(work, clean, bad, args.workers, args.before)
        wall, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
        reports: dict[str, str] = {}
        load_start = os.getloadavg()[0]
        # Interleaved, best of each: on a shared machine the load drifts, and every contender meets the drift.
        for _ in range(args.repeats):
            for name, (argv, cwd) in runs.items():
                shutil.rmtree(work / "hf_cache", ignore_errors=True)
                seconds, cpu_seconds, reports[name] = timed_process(argv, cwd)
                wall[name], cpu[name] = min(wall[name], seconds), min(cpu[name], cpu_seconds)
        print(f"input: {args.pairs} pairs, {size_mb:.0f} MB (GSM8K model solutions, replicated); whole processes, best of "
              f"{args.repeats} interleaved; ingest workers {args.workers}; OMP_NUM_THREADS "
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}: Arrow's thread pool {arrow_threads()} in every process "
              f"(load_dataset's parse; ingest parses ahead on a thread when > 1); load average {load_start:.1f} at start, "
              f"{os.getloadavg()[0]:.1f} at end; float32 matmul {matmul_gflops(library='numpy'):.0f} GFLOP/s (numpy, 1024^2)")
        for line in report_lines(args, wall, cpu, reports):
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)


BASELINE = "datasets.load_dataset json"


def report_lines(args, wall: dict[str, float], cpu: dict[str, float], reports: dict[str, str]) -> list[str]:
    """One line per contender: best wall and CPU seconds, records/s, the ratios to the baseline, what was quarantined."""
    rows = int(reports[BASELINE].split()[-1])
    lines = []
    for name in wall:
        line = f"{name:27s}: wall {wall[name]:6.2f} s  cpu {cpu[name]:6.2f} s"
        if name == BASELINE:
            lines.append(line + f"  {rows / wall[name]:10,.0f} records/s")
            continue
        report = json.loads(reports[name])
        assert report["read"] == report["accepted"] + report["quarantined"]
        if "clean" in name:
            assert report["accepted"] == rows == args.pairs
        line += (f"  {report['read'] / wall[name]:10,.0f} records/s  ratio wall {wall[name] / wall[BASELINE]:.2f}"
                 f"  cpu {cpu[name] / cpu[BASELINE]:.2f}")
        if report["quarantined"]:
            line += f"  (read {report['read']}, quarantined {report['quarantined']}: " + ", ".join(
                f"{k} {v}" for k, v in report["by_reason"].items() if v) + ")"
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
