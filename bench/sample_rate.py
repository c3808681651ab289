"""Samples/s of make-pairs and eval at the embedded default's shape, and where the time goes.

Loads the `skill` preset and samples the tuning questions (rows 1500-1999 of
data/questions/skill_train.jsonl: never sampled by the default's make-pairs, never the held-out benchmark)
through ``pipeline.sampling.completion.complete`` (the path eval takes; make-pairs' sampler calls the same
``sample_batch``) at the embedded default's shape (stages/run.yaml: gen 24, block 4, steps 24, dual KV cache):

- ``eval``: greedy, one completion per question;
- ``make-pairs``: temperature 0.7, ``--k`` completions per question (each its own seeded noise).

Per configuration: samples/s, greedy accuracy on the tuning questions with its 95% interval (the check that a
faster setting keeps accuracy), the share of completions identical to the first configuration's, and the
machine's float32 matmul GFLOP/s measured in the same process at the same thread count. ``--profile`` adds
torch.profiler's table of the top operators (self CPU time) over one batch of each shape.

    OMP_NUM_THREADS=1 python bench/sample_rate.py [--limit 500] [--batch 64,256] [--threshold none,0.9]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / 1e9 / (time.perf_counter() - t0)


def main() -> None:
    from pipeline.evaluation.intervals import wilson_interval
    from pipeline.grading.answers import is_correct
    from pipeline.models import load
    from pipeline.models.numerics import Numerics
    from pipeline.sampling.completion import complete

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch", default="64", help="batch sizes, comma separated")
    ap.add_argument("--threshold", default="none", help="threshold settings, comma separated (none: fixed schedule)")
    ap.add_argument("--k", type=int, default=4, help="make-pairs: completions per question")
    ap.add_argument("--shapes", default="eval,make-pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(x) for x in (ROOT / "data/questions/skill_train.jsonl").read_text().splitlines()[1500:2000]]
    rows = rows[: args.limit]
    model, tok = load("skill", Numerics(), torch.device("cpu"))
    model.eval()
    shape = dict(gen_length=24, block_length=4, steps=24, kv_cache="dual")
    print(f"skill preset, {len(rows)} tuning questions, gen 24 block 4 steps 24 cache dual, "
          f"{args.threads} thread(s), matmul {matmul_gflops():.1f} GFLOP/s", flush=True)
    first: dict[str, list[str]] = {}
    for kind in args.shapes.split(","):
        k = 1 if kind == "eval" else args.k
        prompts = [r["question"] for r in rows for _ in range(k)]
        indices = [i * k + j for i in range(len(rows)) for j in range(k)]
        temperature = 0.0 if kind == "eval" else 0.7
        for batch in [int(b) for b in args.batch.split(",")]:
            for th in args.threshold.split(","):
                threshold = None if th == "none" else float(th)
                t0 = time.perf_counter()
                done = complete(model, tok, prompts, temperature=temperature, batch_size=batch, indices=indices,
                                threshold=threshold, **shape)
                wall = time.perf_counter() - t0
                texts = [d["completion"] for d in done]
                correct = sum(bool(is_correct(t, rows[i // k]["answer"])) for i, t in enumerate(texts))
                lo, hi = wilson_interval(correct, len(texts))
                same = first.setdefault(kind, texts)
                ident = sum(a == b for a, b in zip(same, texts)) / len(texts)
                print(json.dumps({"shape": kind, "batch": batch, "threshold": threshold, "samples": len(texts),
                                  "seconds": round(wall, 2), "samples_per_s": round(len(texts) / wall, 1),
                                  "accuracy": f"{correct}/{len(texts)} [{lo:.3f}, {hi:.3f}]",
                                  "same_as_first": round(ident, 3), "matmul_gflops": round(matmul_gflops(), 1)}),
                      flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            batch = int(args.batch.split(",")[0])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                complete(model, tok, prompts[:batch], temperature=temperature, batch_size=batch,
                         indices=indices[:batch], **shape)
            print(f"torch.profiler, {kind}, one batch of {batch}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
