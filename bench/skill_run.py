"""The embedded default (`lldm-dpo run`) and its ablations on the `skill` preset: task accuracy and cost.

Each variant is one round of the embedded default with one section changed:

- ``dpo_nll`` (the default): loss sigmoid,sft, no reference-solution fallback;
- ``dpo``: loss sigmoid only (DPO alone);
- ``rft``: loss sft only (rejection-sampling fine-tuning: SFT on the chosen, correct, samples);
- ``fallback``: the default with the reference-solution fallback on (questions with no correct sample
  pair the reference solution against wrong samples).

Printed per variant: held-out task accuracy before -> after with counts and the paired 95% interval of
the difference (eval's records), pairs made, pass@k, the wall time of each stage, and the machine's
float32 matmul rate measured in the same process with the same thread count, so the time can be scaled
to another machine (``scaled_to_80`` = wall x measured / 80 GFLOP/s).

    OMP_NUM_THREADS=1 python bench/skill_run.py [--variants dpo_nll,dpo,rft,fallback] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


VARIANTS = {
    "dpo_nll": {},
    "dpo": {"train": {"loss": "sigmoid", "loss_weights": None}},
    "rft": {"train": {"loss": "sft", "loss_weights": None}},
    "fallback": {"make_pairs": {"reference_solution_fallback": True, "solution_field": "solution"}},
}


def matmul_rates(n: int = 1024, reps: int = 5) -> tuple[float, float]:
    """float32 matmul GFLOP/s at this thread count: per wall second and per CPU second of this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        a @ b
    flops = 2 * n**3 * reps / 1e9
    return flops / (time.perf_counter() - t0), flops / max(time.process_time() - c0, 1e-9)


def run_variant(name: str, out: Path) -> dict:
    from pipeline.intervals import format_accuracy, format_difference
    from stages.run_all import merged_config, run

    flags = {"out": out, **VARIANTS[name]}
    cfg = merged_config(None, flags)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = result.rounds[-1]
    return {
        "variant": name, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "stage_seconds": r["stage_seconds"],
        "pairs": r["pairs"], "pass_at_k": r["pass_at_k"], "sample_accuracy": r["sample_accuracy"],
        "before": format_accuracy(r["initial_task_accuracy_interval"]) if r.get("initial_task_accuracy_interval")
        else None,
        "after": format_accuracy(r["task_accuracy_interval"]),
        "difference": format_difference(r["task_accuracy_difference"]) if r.get("task_accuracy_difference") else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="dpo_nll")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders under this folder")
    ap.add_argument("--record", action="store_true", help="append the output to bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-skill-run-"))
    lines = []
    try:
        for name in args.variants.split(","):
            gflops, cpu_gflops = matmul_rates()
            res = run_variant(name, (args.keep or tmp) / name)
            gflops_after, cpu_gflops_after = matmul_rates()
            res["matmul_gflops_wall"] = [round(gflops, 1), round(gflops_after, 1)]
            res["matmul_gflops_cpu"] = [round(cpu_gflops, 1), round(cpu_gflops_after, 1)]
            # The same work on a machine whose matmul runs at 80 GFLOP/s, from the rate this run got
            # (wall) and from the rate per CPU-second (what an unshared machine of this kind would give).
            res["scaled_to_80_from_wall"] = round(res["wall_seconds"] * (gflops + gflops_after) / 2 / 80, 1)
            res["scaled_to_80_from_cpu"] = round(res["cpu_seconds"] * (cpu_gflops + cpu_gflops_after) / 2 / 80, 1)
            line = json.dumps(res)
            print(line, flush=True)
            lines.append(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own scratch folder
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## bench/skill_run.py --variants {args.variants} --threads {args.threads}, "
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
