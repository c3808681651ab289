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

``--seeds N`` runs every variant N times, with ``make_pairs.seed``, ``score_ref.seed`` and ``train.seed`` all set
to 0, 1, ..., N-1 (everything stochastic: the sampled pairs, the mask draws, the data order); seed 0 is the
embedded default. Printed: each seed's before/after counts with its paired 95% interval (eval's per-item
records, Newcombe), the mean gain over seeds with its spread, and a pooled 95% interval from a two-level
bootstrap over seeds and held-out *problems* (pipeline.evaluation.seed_bootstrap: the 1,000 held-out questions are 573
problems, a problem being its worked solution, i.e. its operations and numbers, under different names and
items; resampling questions would count near-copies as independent). With both ``dpo_nll`` and ``rft`` in
``--variants``, also DPO+NLL against RFT on the same seed (the same sampled pairs; RFT trains the same steps on
their chosen side), pooled the same way. Variants of one seed share round 1's samples (make-pairs resumes from
the copied samples file: its settings and seeds are checked), so the comparison is on the same samples.
"""

from __future__ import annotations

import argparse
import json
import os
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
embedded default samples only the first ``make_pairs.limit`` rows (at most 1,500: checked), so these are never trained on; choosing
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


def configured_files(sets: dict | None) -> tuple[Path, Path]:
    """(make-pairs questions, eval benchmark) of the embedded default with ``--set`` applied (``questions=...``,
    ``eval.benchmark=...``: another family's files, e.g. ``scripts/make_skill_data.py --family skill-hard``)."""
    from stages.run_all import merged_config

    cfg = merged_config(None, {"out": Path(tempfile.gettempdir()), **(sets or {})})

    def resolve(path) -> Path:
        path = Path(path)
        return path if path.is_absolute() or path.is_file() else ROOT / path

    return resolve(cfg.questions), resolve(cfg.eval["benchmark"])


def tune_benchmark(folder: Path, sets: dict | None = None) -> Path:
    """The tuning questions (TUNE_QUESTIONS of the configured make-pairs questions) as a benchmark file."""
    rows = configured_files(sets)[0].read_text(encoding="utf-8").splitlines()[TUNE_QUESTIONS]
    path = folder / "skill_tune.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


SEED_KEYS = (("make_pairs", "seed"), ("score_ref", "seed"), ("train", "seed"))
"""Everything stochastic in a round: the sampled pairs, the reference's mask draws, train's data order."""

SAMPLE_KEYS = ("gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale", "seed", "chat_template",
               "dtype", "kv_cache", "threshold", "num_generations", "limit", "load_in_4bit")
"""make-pairs keys that decide the samples: variants equal on these share round 1's samples file."""


def variant_flags(name: str, out: Path, sets: dict | None, tune: Path | None, seed: int | None) -> dict:
    from stages.run_all import merged_config

    flags: dict = {"out": out}
    for section, values in [*VARIANTS[name].items(), *(sets or {}).items()]:
        flags[section] = {**flags.get(section, {}), **values} if isinstance(values, dict) else values
    if seed is not None:
        for section, key in SEED_KEYS:
            flags[section] = {**flags.get(section, {}), key: seed}
    cfg = merged_config(None, flags)  # the config `run` will get: the default's sections with these on top
    limit = cfg.make_pairs.get("limit")
    # rows sampled: offset .. offset + limit, or a limit more each round with fresh_questions
    rounds = (cfg.rounds or 1) if cfg.fresh_questions else 1
    last = int(cfg.make_pairs.get("offset") or 0) + rounds * int(limit or 0)
    if not limit or last > TUNE_QUESTIONS.start:
        # the tuning rows stay unseen whether or not this run tunes: a default sampling them would make
        # every later --tune run choose on trained-on questions
        raise SystemExit(f"make_pairs rows must end by {TUNE_QUESTIONS.start} (rows {TUNE_QUESTIONS.start}-"
                         f"{TUNE_QUESTIONS.stop - 1} are the tuning questions), got limit {limit}, up to row {last}")
    if tune is not None:
        flags["eval"] = {**flags.get("eval", {}), "benchmark": str(tune)}
    return flags


def share_samples(flags: dict, out: Path, earlier: dict[tuple, Path], samples_from: Path | None = None) -> None:
    """Copy round 1's samples file of an earlier variant with the same sampling settings into this run's round 1
    (make-pairs then resumes from it instead of sampling again: it checks the settings, seeds and model, and
    ignores rows of questions or sample indices beyond this run's). ``samples_from``: a folder of such files
    from earlier runs, ``seed{S}.jsonl`` (same sampler settings; a file of more questions serves fewer)."""
    from stages.run_all import merged_config

    mp = {**merged_config(None, {"out": out}).make_pairs, **flags.get("make_pairs", {})}
    key = tuple((k, json.dumps(mp.get(k), sort_keys=True)) for k in SAMPLE_KEYS) + (
        ("model", str(flags.get("model"))), ("questions", str(flags.get("questions"))))
    source = earlier.get(key)
    if source is None and samples_from is not None:
        source = samples_from / f"seed{mp.get('seed', 0)}.jsonl"
    target = out / "round-1" / "pairs.samples.jsonl"
    if source is not None and source.is_file() and not target.exists() and not out.exists():
        from pipeline.report.rounds import write_rounds_report

        out.mkdir(parents=True)
        write_rounds_report(merged_config(None, flags), [], None)  # claims the folder as this run's, as run does first
        from pipeline.core.atomic import atomic_path

        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, record=True) as tmp:  # recorded as lldm-dpo's: make-pairs may rewrite it
            shutil.copyfile(source, tmp)
    earlier.setdefault(key, target)


def run_variant(name: str, out: Path, sets: dict | None = None, tune: Path | None = None, seed: int | None = None,
                earlier_samples: dict | None = None, samples_from: Path | None = None) -> dict:
    from pipeline.evaluation.intervals import format_accuracy, format_difference
    from stages.run_all import merged_config, run

    flags = variant_flags(name, out, sets, tune, seed)
    if earlier_samples is not None:
        share_samples(flags, out, earlier_samples, samples_from)
    cfg = merged_config(None, flags)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = result.rounds[-1]
    return {
        "variant": name, "seed": seed, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "stage_seconds": r["stage_seconds"],
        "pairs": r["pairs"], "pass_at_k": r["pass_at_k"], "sample_accuracy": r["sample_accuracy"],
        "before": format_accuracy(r["initial_task_accuracy_interval"]) if r.get("initial_task_accuracy_interval")
        else None,
        "after": format_accuracy(r["task_accuracy_interval"]),
        "difference": format_difference(r["task_accuracy_difference"]) if r.get("task_accuracy_difference") else None,
        "rounds_after": [x.get("task_accuracy") for x in result.rounds],
        "final_train_loss": r.get("final_train_loss"),
    }


def item_records(out: Path, last_round: int | None = None) -> tuple[list[bool], list[bool]]:
    """(before, after) per-item correctness of a run folder: round 1's `before` rows, the `after` rows of the last
    round (or of round ``last_round``)."""
    import pyarrow.parquet as pq

    rounds = sorted((p for p in out.glob("round-*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    if last_round is not None:
        if last_round > len(rounds):
            raise SystemExit(f"{out}: --round {last_round}, but the run has {len(rounds)} round(s)")
        rounds = rounds[:last_round]

    def correct(path: Path, label: str) -> list[bool]:
        if not path.is_file():  # a run still going, or killed: its last round has no eval yet
            raise SystemExit(f"{path}: missing, {path.parents[1].name} of {out} is unfinished; pass --round K "
                             "for a round every run has finished")
        rows = [r for r in pq.read_table(path).to_pylist() if r["model"] == label]
        return [r["correct"] for r in sorted(rows, key=lambda r: r["index"])]

    return (correct(rounds[0] / "run" / "task_results.parquet", "before"),
            correct(rounds[-1] / "run" / "task_results.parquet", "after"))


def problem_keys(benchmark: Path) -> list[str]:
    """Each benchmark question's problem: its worked solution (the operations and numbers, names and items aside;
    scripts/make_skill_data.py writes one per question), else its answer and question."""
    keys = []
    for line in benchmark.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            keys.append(str(item.get("solution") or (item.get("answer"), item.get("question"))))
    return keys


def seeds_summary(records: dict[str, dict[int, tuple[list[bool], list[bool]]]], keys: list[str]) -> dict:
    """Per variant: each seed's counts and paired interval, the mean gain and the pooled two-level interval;
    and DPO+NLL against RFT seed by seed when both ran."""
    from pipeline.evaluation.intervals import paired_difference_interval
    from pipeline.evaluation.seed_bootstrap import group_index, pooled_gain, within_problem_agreement

    groups = group_index(keys)
    out: dict = {"problems": len(set(groups)), "items": len(groups), "variants": {}}
    for name, by_seed in records.items():
        seeds = sorted(by_seed)
        rows = []
        for s in seeds:
            before, after = by_seed[s]
            if len(before) != len(groups) or len(after) != len(groups):
                raise SystemExit(f"{name} seed {s}: {len(before)}/{len(after)} records for {len(groups)} questions")
            diff = paired_difference_interval(before, after)
            rows.append({"seed": s, "before": sum(before), "after": sum(after), "n": len(after),
                         "gain": diff["difference"], "low": diff["low"], "high": diff["high"],
                         "gained": sum(a and not b for a, b in zip(after, before)),
                         "lost": sum(b and not a for a, b in zip(after, before))})
        delta = [[int(a) - int(b) for b, a in zip(*by_seed[s])] for s in seeds]
        out["variants"][name] = {"seeds": rows, "pooled": pooled_gain(delta, groups)}
        out.setdefault("before_within_problem_agreement", within_problem_agreement(by_seed[seeds[0]][0], groups))
    if "dpo_nll" in records and "rft" in records:
        common = sorted(set(records["dpo_nll"]) & set(records["rft"]))
        delta = [[int(a) - int(b) for a, b in zip(records["dpo_nll"][s][1], records["rft"][s][1])] for s in common]
        rows = [{"seed": s, "dpo_nll": sum(records["dpo_nll"][s][1]), "rft": sum(records["rft"][s][1]),
                 **{k: v for k, v in paired_difference_interval(records["rft"][s][1], records["dpo_nll"][s][1]).items()
                    if k in ("difference", "low", "high")}} for s in common]
        out["dpo_nll_vs_rft"] = {"seeds": rows, "pooled": pooled_gain(delta, groups)}
    return out


def print_seeds_table(summary: dict) -> None:
    print(f"\n{summary['items']} questions, {summary['problems']} problems; two questions of one problem agree on "
          f"correctness (before) {summary.get('before_within_problem_agreement') or 0:.2f} of the time")
    for name, v in summary["variants"].items():
        print(f"\n{name}:\n| seed | before | after | gain | paired 95% CI | gained/lost |\n|---|---|---|---|---|---|")
        for r in v["seeds"]:
            print(f"| {r['seed']} | {r['before']} | {r['after']} | {r['gain']:+.3f} | {r['low']:+.3f}..{r['high']:+.3f}"
                  f" | {r['gained']}/{r['lost']} |")
        p = v["pooled"]
        print(f"mean gain {p['mean']:+.4f} (sd over seeds {p['sd_seeds']:.4f}); pooled 95% interval "
              f"{p['low']:+.4f}..{p['high']:+.4f} ({p['method']}, {p['reps']} replicates)")
    if "dpo_nll_vs_rft" in summary:
        v = summary["dpo_nll_vs_rft"]
        print("\nDPO+NLL - RFT, same seed:\n| seed | DPO+NLL | RFT | difference | paired 95% CI |\n|---|---|---|---|---|")
        for r in v["seeds"]:
            print(f"| {r['seed']} | {r['dpo_nll']} | {r['rft']} | {r['difference']:+.3f} | {r['low']:+.3f}..{r['high']:+.3f} |")
        p = v["pooled"]
        print(f"mean {p['mean']:+.4f} (sd {p['sd_seeds']:.4f}); pooled 95% interval {p['low']:+.4f}..{p['high']:+.4f}")


def summarize(args) -> None:
    """The seeds table of the run folders under ``--keep`` (``VARIANT-seedS``, each a finished run)."""
    if args.keep is None:
        raise SystemExit("--summarize needs --keep DIR (the folder the runs kept their folders in)")
    records: dict[str, dict[int, tuple[list[bool], list[bool]]]] = {}
    for name in args.variants.split(","):
        for folder in sorted(args.keep.glob(f"{name}-seed*")):
            if (folder / f"round-{args.round or 1}" / "run" / "task_results.parquet").is_file():
                records.setdefault(name, {})[int(folder.name.rsplit("seed", 1)[1])] = item_records(folder, args.round)
    if not records:
        raise SystemExit(f"{args.keep}: no finished VARIANT-seedS folders of {args.variants}")
    sets = parse_sets(args.set)
    if args.tune:
        with tempfile.TemporaryDirectory() as tmp:
            summary = seeds_summary(records, problem_keys(tune_benchmark(Path(tmp), sets)))
    else:
        summary = seeds_summary(records, problem_keys(configured_files(sets)[1]))
    print_seeds_table(summary)
    print(json.dumps({"seeds_summary": summary}), flush=True)


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
    ap.add_argument("--seeds", type=int, default=0,
                    help="run every variant with make_pairs/score_ref/train seeds 0..N-1 and pool them "
                         "(0: the default's seeds, one run per variant)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="with --seeds N: seeds FIRST..FIRST+N-1 (split one table's seeds over processes)")
    ap.add_argument("--samples-from", type=Path, default=None,
                    help="a folder of round-1 samples files seed{S}.jsonl made with the same sampler settings: "
                         "make-pairs resumes from them (a bench shortcut; the counts are the same)")
    ap.add_argument("--round", type=int, default=None,
                    help="with --summarize: the after rows of this round of each run (default: its last round)")
    ap.add_argument("--summarize", action="store_true",
                    help="run nothing: pool the VARIANT-seedS folders already under --keep (from one or more runs)")
    args = ap.parse_args()
    if args.summarize:
        summarize(args)
        return
    sets = parse_sets(args.set)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-skill-run-"))
    lines = []
    records: dict[str, dict[int, tuple[list[bool], list[bool]]]] = {}
    earlier: dict = {}
    try:
        tune = tune_benchmark(tmp, sets) if args.tune else None
        seeds = list(range(args.first_seed, args.first_seed + args.seeds)) if args.seeds else [None]
        for seed in seeds:
            for name in args.variants.split(","):
                gflops, cpu_gflops = matmul_rates()
                folder = (args.keep or tmp) / (name if seed is None else f"{name}-seed{seed}")
                res = run_variant(name, folder, sets, tune, seed, earlier, args.samples_from)
                res["set"], res["tune"] = args.set, args.tune
                gflops_after, cpu_gflops_after = matmul_rates()
                res["matmul_gflops_wall"] = [round(gflops, 1), round(gflops_after, 1)]
                res["matmul_gflops_cpu"] = [round(cpu_gflops, 1), round(cpu_gflops_after, 1)]
                res["load_average"] = [round(x, 1) for x in os.getloadavg()]
                # The same work on a machine whose matmul runs at 80 GFLOP/s, from the rate this run got
                # (wall) and from the rate per CPU-second (what an unshared machine of this kind would give).
                res["scaled_to_80_from_wall"] = round(res["wall_seconds"] * (gflops + gflops_after) / 2 / 80, 1)
                res["scaled_to_80_from_cpu"] = round(res["cpu_seconds"] * (cpu_gflops + cpu_gflops_after) / 2 / 80, 1)
                line = json.dumps(res)
                print(line, flush=True)
                lines.append(line)
                records.setdefault(name, {})[0 if seed is None else seed] = item_records(folder)
        if args.seeds:
            summary = seeds_summary(records, problem_keys(tune or configured_files(sets)[1]))
            print_seeds_table(summary)
            line = json.dumps({"seeds_summary": summary})
            print(line, flush=True)
            lines.append(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own scratch folder
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            extra = "".join(f" --set {x}" for x in args.set) + (" --tune" if args.tune else "")
            extra += f" --seeds {args.seeds}" if args.seeds else ""
            fh.write(f"\n## bench/skill_run.py --variants {args.variants} --threads {args.threads}{extra}, "
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
