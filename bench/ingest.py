"""Benchmark: ``lldm-dpo ingest`` against ``datasets.load_dataset("json")`` on the same file.

Builds a 200,000-pair JSONL from the real GSM8K model solutions in
../shared/data/gsm8k (prompt = question, chosen = a correct solution, rejected
= an incorrect one, replicated with a variant tag so every pair is distinct),
plus a copy with 1% bad lines (broken JSON, invalid UTF-8, missing field,
duplicates). Times, best of ``--repeats``, in this one process:

- baseline: ``datasets.load_dataset("json", data_files=clean, split="train")``
  into a fresh cache folder (parse + Arrow cache write, no validation);
- ``stages.ingest.run`` on the clean file and on the 1%-bad file.

Prints records/s and the ratios ingest / baseline (goal: <= 1.0 clean,
<= 1.5 with bad lines). Run from the repository root:

    python bench/ingest.py [--pairs 200000] [--repeats 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


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


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description="ingest throughput vs datasets.load_dataset('json')")
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="ingest --workers")
    args = ap.parse_args()
    if not GSM8K.is_file():
        sys.exit(f"needs {GSM8K}")

    import datasets

    from stages.ingest import IngestConfig, run

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        clean, bad = build_inputs(work, args.pairs)
        size_mb = clean.stat().st_size / 1e6

        def load_dataset_json():
            cache = work / "hf_cache"
            shutil.rmtree(cache, ignore_errors=True)
            return datasets.load_dataset("json", data_files=str(clean), split="train", cache_dir=str(cache)).num_rows

        def ingest(path):
            return lambda: run(IngestConfig(inputs=[str(path)], out=str(work / "pairs.arrow"), progress=False, workers=args.workers))

        # Interleaved, best of each: on a shared machine the load drifts, and every contender meets the drift.
        t_base = t_clean = t_bad = float("inf")
        for _ in range(args.repeats):
            t, rows = best_of(1, load_dataset_json)
            t_base = min(t_base, t)
            t, res_clean = best_of(1, ingest(clean))
            t_clean = min(t_clean, t)
            t, res_bad = best_of(1, ingest(bad))
            t_bad = min(t_bad, t)
        assert rows == res_clean.accepted == args.pairs
        import os

        print(f"input: {args.pairs} pairs, {size_mb:.0f} MB (GSM8K model solutions, replicated); best of {args.repeats} "
              f"interleaved; ingest workers {args.workers}; load average {os.getloadavg()[0]:.1f}")
        print(f"datasets.load_dataset json : {t_base:7.2f} s  {rows / t_base:10,.0f} records/s")
        print(f"ingest clean               : {t_clean:7.2f} s  {res_clean.read / t_clean:10,.0f} records/s  ratio {t_clean / t_base:.2f}")
        print(
            f"ingest 1% bad lines        : {t_bad:7.2f} s  {res_bad.read / t_bad:10,.0f} records/s  ratio {t_bad / t_base:.2f}"
            f"  (read {res_bad.read}, quarantined {res_bad.quarantined}: "
            + ", ".join(f"{k} {v}" for k, v in res_bad.by_reason.items() if v)
            + ")"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
