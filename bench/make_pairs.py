"""make-pairs throughput (samples/s) against plain `generate` on the same questions, same model, same run.

The baseline is `lldm-dpo generate` over a prompts file holding each question
k times (the same samples to draw, the same sampler settings and batch size);
make-pairs draws k samples per question, grades them and writes pairs. Both
report sampling time only (the model load is outside), measured alternately,
best of ``--repeats``. A ratio near 1 means grading, pairing and the
crash-safe per-batch writes cost nothing measurable next to sampling.

    python bench/make_pairs.py [--model tiny] [--questions 16] [--k 4] [--record]
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.score import matmul_flops  # noqa: E402
from stages.generate import GenerateConfig  # noqa: E402
from stages.generate import run as generate  # noqa: E402
from stages.make_pairs import MakePairsConfig  # noqa: E402
from stages.make_pairs import run as make_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=str(ROOT / "data" / "benchmarks" / "arithmetic_heldout.jsonl"))
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--record", action="store_true", help="Append the output to bench/RESULTS.md.")
    args = ap.parse_args()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" \
        else args.device

    tmp = Path(tempfile.mkdtemp(prefix="bench-make-pairs-"))
    atexit.register(shutil.rmtree, tmp, True)  # our own scratch folder
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()][: args.questions]
    questions = tmp / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    repeated = tmp / "prompts.jsonl"  # the same questions, each k times: the same number of samples
    repeated.write_text("".join(json.dumps({"prompt": r["question"]}) + "\n" for r in rows for _ in range(args.k)))
    common = dict(model=args.model, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                  temperature=0.7, batch_size=args.batch_size, device=device, progress=False)
    best = {"generate": 0.0, "make-pairs": 0.0}
    cpu = {"generate": float("inf"), "make-pairs": float("inf")}  # CPU seconds of the whole call, load included
    last = None
    n = args.questions * args.k
    for rep in range(args.repeats):
        c0 = time.process_time()
        g = generate(GenerateConfig(prompts=str(repeated), out=str(tmp / f"gen{rep}.jsonl"), **common))
        cpu["generate"] = min(cpu["generate"], time.process_time() - c0)
        best["generate"] = max(best["generate"], g.tokens_per_second / args.gen_length)
        c0 = time.process_time()
        last = make_pairs(MakePairsConfig(questions=str(questions), out=str(tmp / f"pairs{rep}.jsonl"),
                                          num_generations=args.k, reference_solution_fallback=True, **common))
        cpu["make-pairs"] = min(cpu["make-pairs"], time.process_time() - c0)
        best["make-pairs"] = max(best["make-pairs"], last.samples_per_second)
    peak = matmul_flops(device, torch.float32)
    lines = [
        f"model {args.model} float32 on {device} ({torch.get_num_threads()} threads); {args.questions} questions x "
        f"k={args.k} = {args.questions * args.k} samples; gen {args.gen_length}, block {args.block_length}, "
        f"steps {args.steps}, temperature 0.7, batch {args.batch_size}; best of {args.repeats} alternating runs",
        f"generate:   {best['generate']:.2f} samples/s (each question {args.k} times in the prompts file)",
        f"make-pairs: {best['make-pairs']:.2f} samples/s (sampling, grading, per-batch fsync'd rows)",
        f"ratio make-pairs / generate: {best['make-pairs'] / best['generate']:.3f} (wall-clock samples/s of "
        f"sampling); matmul peak measured {peak / 1e9:.1f} GFLOP/s (float32)",
        f"CPU time per call (model load included): generate {cpu['generate']:.1f}s = {n / cpu['generate']:.3f} "
        f"samples/CPU-s, make-pairs {cpu['make-pairs']:.1f}s = {n / cpu['make-pairs']:.3f} samples/CPU-s, "
        f"ratio {cpu['generate'] / cpu['make-pairs']:.3f}",
        f"make-pairs outcome: pass@k {last.pass_at_k}, sample accuracy {last.sample_accuracy}, pairs {last.pairs} "
        f"({last.pairs_reference_chosen} with the reference solution chosen)",
    ]
    print("\n".join(lines))
    if args.record:
        from bench.results import record

        record("make_pairs.py", sys.argv[1:], lines)


if __name__ == "__main__":
    main()
