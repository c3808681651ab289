"""`lldm-dpo plan`'s answer when train's settings do not fit: the recipe search against the one-knob search.

    OMP_NUM_THREADS=1 python bench/plan_search.py [--model llada-8b-shape] [--gpu-memory 16GiB] [--verify]

Times, in one process and on the same plan: the plan's own trace of train's defaults (the calibration),
the one-knob search (``estimate.largest``: the largest --batch-tokens, --sequence-microbatch and --max-length
with everything else fixed, each by traces), and the recipe search (``recipes.search``: analytic, calibrated
by the trace); with --verify also the trace of the first recipe. Prints wall and CPU seconds of each, their
ratio, what each answered, the machine's float32 matmul GFLOP/s (one thread) and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llada-8b-shape")
    parser.add_argument("--gpu-memory", default="16GiB")
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch

    from bench.skill_run import matmul_rates
    from pipeline.plan import largest, make_plan, parse_memory, recipes
    from pipeline.plan.memory import fmt_bytes
    from pipeline.plan.trace import default_numerics
    from stages.plan import PlanConfig

    gflops = matmul_rates()[1]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"float32 matmul {gflops:.0f} GFLOP/s per CPU second, load average {os.getloadavg()[0]:.1f}")
    device_bytes, device = parse_memory(args.gpu_memory)
    cfg = PlanConfig(stage="train", gpu_memory=args.gpu_memory, options={"model": args.model})
    stage_cfg, shape = default_numerics(cfg.stage_config), cfg.shape()
    plan, wall, cpu = timed(lambda: make_plan("train", stage_cfg, shape, device_bytes, device))
    print(f"plan of train's defaults: {fmt_bytes(plan.total)}, fits {plan.fits}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    knobs, k_wall, k_cpu = timed(lambda: largest("train", stage_cfg, shape, device_bytes, plan.total))
    answer = ", ".join(f"--{k.replace('_', '-')} {v['value']}" for k, v in knobs.items())
    print(f"one-knob search (largest): {answer}: {k_wall:.1f} s wall, {k_cpu:.1f} s CPU")
    (found, method), r_wall, r_cpu = timed(lambda: recipes.search(stage_cfg, shape, plan, device_bytes, plan.reserve))
    first = found[0] if found else None
    print(f"recipe search: {len(found)} shown, first {' '.join(first.flags) if first else 'none'} "
          f"(estimate {fmt_bytes(first.estimate) if first else '-'}): {r_wall:.2f} s wall, {r_cpu:.2f} s CPU")
    print(f"  {method}")
    print(f"plan + recipe search vs plan + one-knob search, CPU: {(cpu + r_cpu):.1f} s vs {(cpu + k_cpu):.1f} s, "
          f"x{(cpu + k_cpu) / max(cpu + r_cpu, 1e-9):.1f} faster")
    if args.verify and first is not None:
        (_, checked), v_wall, v_cpu = timed(lambda: recipes.verify(stage_cfg, shape, first, device_bytes, device,
                                                                   plan.reserve))
        print(f"the first recipe traced: {fmt_bytes(checked.total)}, fits {checked.fits} "
              f"({' '.join(first.flags)}): {v_wall:.1f} s wall, {v_cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
