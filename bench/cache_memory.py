"""Host memory of ``lldm-dpo train`` against the number of pairs in the cache.

Builds two caches that differ only in size (500 and 12,000 pairs by default; prompt 64 and responses
of 512 tokens, n = 2, the ``micro`` preset), runs the same short ``train`` on each in a fresh process
and prints each run's peak resident size (the child's ru_maxrss from wait4) and median step time,
then the differences. ``--repo`` runs another checkout's code on the same caches (the "before").

The caches carry a real score-ref manifest (fingerprint, model and tokenizer identity of ``micro``,
made on 4 pairs) and rows built as score-ref records them (mask seeds and counts of the replayed
masks); the reference terms are synthetic numbers: they change no memory or time figure.

    python bench/cache_memory.py                      # this checkout
    python bench/cache_memory.py --repo /work/main    # the same caches, another checkout's train
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(BENCH), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=500, help="pairs in the small cache")
    p.add_argument("--large", type=int, default=12000, help="pairs in the large cache")
    p.add_argument("--response", type=int, default=512, help="tokens per response")
    p.add_argument("--prompt", type=int, default=64, help="tokens per prompt")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per train run")
    p.add_argument("--work", type=Path, default=None, help="where the caches go (kept for reuse)")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose `train` runs")
    p.add_argument("--record", action="store_true", help="append the output to bench/RESULTS.md")
    return p.parse_args(argv)


def real_manifest(work: Path, model: str = "micro") -> dict:
    """score-ref's manifest for a preset, n = 2, one draw (on 4 tiny pairs)."""
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score

    src = work / "seed.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                           for i in range(4)))
    ingest(IngestConfig(inputs=[str(src)], out=str(work / "seed.arrow"), eval_fraction=0.0, progress=False))
    score(ScoreRefConfig(pairs=work / "seed.arrow", model=model, out=work / "seed-cache", samples=2, draws=1,
                         device="cpu", progress=False))
    return json.loads((work / "seed-cache" / "manifest.json").read_text())


def build_cache(out: Path, n: int, manifest: dict, args) -> Path:
    """n synthetic pairs written as score-ref writes parts (64 pairs per part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import train as train_bench

    from pipeline.core.schemas import (
        DEFAULT_SPLIT,
        LEN_COLUMNS,
        MASK_COUNT_COLUMNS,
        REF_ELBO_COLUMNS,
        REF_MARGIN_COLUMN,
        REF_TERM_COLUMNS,
        SCORES_SCHEMA,
        SIDES,
        SPLIT_COLUMN,
        TIMESTEP_COLUMNS,
        TRUNCATED_COLUMN,
    )
    from pipeline.models import preset_tokenizer
    from pipeline.refcache.manifest import CacheManifest
    from pipeline.refcache.reader import part_name

    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = preset_tokenizer(CacheManifest(manifest).reference_model)
    specials = set(tok.all_special_ids) | {tok.mask_token_id, tok.pad_token_id}
    allowed = [i for i in range(len(tok)) if i not in specials]
    rng = random.Random(n)
    fp = manifest["fingerprint"]
    names = []
    for start in range(0, n, 64):
        pairs = [(f"synthetic-{i:06d}", rng.choices(allowed, k=args.prompt), rng.choices(allowed, k=args.response),
                  rng.choices(allowed, k=args.response)) for i in range(start, min(n, start + 64))]
        rows = train_bench.cache_rows(pairs, fp["samples"], seed=fp["seed"], draws=fp["draws"])
        for row in rows:
            row.update({SPLIT_COLUMN: DEFAULT_SPLIT, TRUNCATED_COLUMN: False})
            for side in SIDES:
                counts = row[MASK_COUNT_COLUMNS[side]]
                row[TIMESTEP_COLUMNS[side]] = [[c / row[LEN_COLUMNS[side]] for c in d] for d in counts]
            for side in SIDES:  # the chosen side's terms drawn first, as before
                row[REF_TERM_COLUMNS[side]] = [[-rng.uniform(500, 900) for _ in d] for d in row[MASK_COUNT_COLUMNS[side]]]
            for side in SIDES:
                row[REF_ELBO_COLUMNS[side]] = statistics.fmean(row[REF_TERM_COLUMNS[side]][0])
            row[REF_MARGIN_COLUMN] = row[REF_ELBO_COLUMNS["chosen"]] - row[REF_ELBO_COLUMNS["rejected"]]
        names.append(part_name(len(names)))
        pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), out / names[-1])
    from pipeline.core.atomic import file_sha256

    sums = {name: file_sha256(out / name) for name in names}  # the template's checksums are of other parts
    (out / "manifest.json").write_text(json.dumps({**manifest, "parts": names, "pairs": n, "part_sha256": sums}))
    return out


def train_help(repo: str, env: dict) -> str:
    """``lldm-dpo train --help`` of the checkout at ``repo``, wide enough that no flag is cut."""
    done = subprocess.run([sys.executable, "-m", "stages.cli", "train", "--help"], cwd=repo,
                          env={**env, "COLUMNS": "200"}, capture_output=True, text=True)
    return done.stdout


def train_once(cache: Path, run_dir: Path, args) -> dict:
    """One `train` in a fresh process: its peak RSS and best step time (steps 2..N; the least disturbed
    by other jobs on a shared machine)."""
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "stages.cli", "train", str(cache), "--out", str(run_dir), "--max-steps",
           str(args.steps), "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-tensorboard",
           "--batch-tokens", "65536"]
    env = {**os.environ, "PYTHONPATH": str(args.repo)}
    if "--gap-threshold" in train_help(args.repo, env):
        # Synthetic reference terms: the start check (issue 10) would rightly refuse them; a "before"
        # checkout predates the flag. (Asked of the command itself: the option's declaration has moved.)
        cmd += ["--gap-threshold", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"train failed on {cache}:\n{err[-2000:]}")
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    tokens = 4 * 2 * 2 * (args.prompt + args.response)  # pairs x sides x n x row length
    step_s = min(tokens / m["tokens_per_second"] for m in metrics[1:])
    return {"peak_rss": usage.ru_maxrss * 1024, "step_s": step_s, "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work
    if work is None:  # a scratch folder of ours, gone at exit (--work keeps the caches for another run)
        work = Path(tempfile.mkdtemp(prefix="cache-memory-"))
        atexit.register(shutil.rmtree, work, True)
    work.mkdir(parents=True, exist_ok=True)
    manifest = real_manifest(work) if not (work / "seed-cache" / "manifest.json").exists() else json.loads(
        (work / "seed-cache" / "manifest.json").read_text())
    tag = f"p{args.prompt}-r{args.response}"
    small = build_cache(work / f"cache-{args.small}-{tag}", args.small, manifest, args)
    large = build_cache(work / f"cache-{args.large}-{tag}", args.large, manifest, args)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    a = train_once(small, runs / "small", args)
    b = train_once(large, runs / "large", args)
    import score as score_bench
    import torch

    gflops = score_bench.matmul_flops("cpu", torch.float32) / 1e9
    lines = [
        f"machine: fp32 matmul {gflops:.1f} GFLOP/s, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        f"code: {args.repo}; micro preset, float32 on cpu; prompt {args.prompt}, responses {args.response} tokens, "
        f"n = 2, batch 4, {args.steps} steps; step time: best of steps 2..{args.steps}",
        f"{args.small:>6} pairs: peak RSS {a['peak_rss'] / MIB:8.1f} MiB   step {a['step_s'] * 1e3:7.1f} ms",
        f"{args.large:>6} pairs: peak RSS {b['peak_rss'] / MIB:8.1f} MiB   step {b['step_s'] * 1e3:7.1f} ms",
        f"difference: {(b['peak_rss'] - a['peak_rss']) / MIB:+.1f} MiB peak RSS; step time ratio "
        f"{b['step_s'] / a['step_s']:.2f}",
    ]
    print("\n".join(lines))
    if args.record:
        from results import record

        record("cache_memory.py", sys.argv[1:] if argv is None else argv, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
