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

    OMP_NUM_THREADS=1 python bench/skill_run.py [--variants dpo_nll,dpo,rft,fallback,online] [--threads 1]
        [--set train.beta=0.2 ...] [--tune] [--record]

``--tune`` evaluates on unseen train questions instead of the held-out benchmark: settings are chosen there.
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
    "online": {"train": {"reference": "online"}},
}
"""``online``: the default with a live reference model scored on the same masks in train (the baseline the
cache replaces): its accuracy should fall within the cached run's interval, its train stage cost more."""

TUNE_QUESTIONS = slice(1500, 2000)
"""``--tune``: eval on these rows of the make-pairs questions file instead of the held-out benchmark. The
embedded default samples only the first ``make_pairs.limit`` (256) rows, so these are never trained on; choosing
settings on them leaves the held-out questions untouched (they are fixed before any tuning and never tuned on)."""


def matmul_rates(n: int = 1024, reps: int = 5) -> tuple[float, float]:
    """float32 matmul GFLOP/s at this thread count: per wall second and per CPU second of this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        a @ b
    flops = 2 * n**3 * reps / 1e9
    return flops / (time.perf_counter() - t0), flops / max(time.process_time() - c0, 1e-9)


def parse_sets(pairs: list[str]) -> dict:
    """``section.key=value`` or top-level ``key=value`` (values parsed as YAML): ``train.beta=0.2``, ``rounds=3``."""
    import yaml

    out: dict = {}
    for item in pairs:
        path, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set {item!r}: expected section.key=value or key=value")
        section, dot, key = path.partition(".")
        if dot:
            out.setdefault(section, {})[key] = yaml.safe_load(value)
        else:
            out[path] = yaml.safe_load(value)
    return out


def tune_benchmark(folder: Path) -> Path:
    """The tuning questions (TUNE_QUESTIONS of the shipped make-pairs questions) as a benchmark file."""
    rows = (ROOT / "data" / "questions" / "skill_train.jsonl").read_text(encoding="utf-8").splitlines()[TUNE_QUESTIONS]
    path = folder / "skill_tune.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_variant(name: str, out: Path, sets: dict | None = None, tune: Path | None = None) -> dict:
    from pipeline.intervals import format_accuracy, format_difference
    from stages.run_all import merged_config, run

    flags = {"out": out}
    for section, values in [*VARIANTS[name].items(), *(sets or {}).items()]:
        flags[section] = {**flags.get(section, {}), **values} if isinstance(values, dict) else values
    if tune is not None:
        flags["eval"] = {**flags.get("eval", {}), "benchmark": str(tune)}
        limit = {**merged_config(None, {"out": out}).make_pairs, **flags.get("make_pairs", {})}.get("limit")
        if not limit or limit > TUNE_QUESTIONS.start:
            raise SystemExit(f"--tune needs make_pairs.limit <= {TUNE_QUESTIONS.start} (the tuning rows are unseen)")
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
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of the embedded default for every variant (repeatable)")
    ap.add_argument("--tune", action="store_true",
                    help="evaluate on unseen train questions (TUNE_QUESTIONS), never on the held-out benchmark")
    args = ap.parse_args()
    sets = parse_sets(args.set)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-skill-run-"))
    lines = []
    try:
        tune = tune_benchmark(tmp) if args.tune else None
        for name in args.variants.split(","):
            gflops, cpu_gflops = matmul_rates()
            res = run_variant(name, (args.keep or tmp) / name, sets, tune)
            res["set"], res["tune"] = args.set, args.tune
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
            extra = "".join(f" --set {x}" for x in args.set) + (" --tune" if args.tune else "")
            fh.write(f"\n## bench/skill_run.py --variants {args.variants} --threads {args.threads}{extra}, "
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
