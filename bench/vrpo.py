"""VRPO's ablation in miniature (LLaDA 1.5, Table 2): the variance of the preference-score estimator across
independent mask draws, by budget n, by timesteps x masks split, and with masks shared against independent
between policy and reference.

On the `skill` model's own pairs (a finished `lldm-dpo run`: round 1's make-pairs output on the shipped train
questions, scored as that run scored them: its ``pad_to``, chat template, scheme), the policy that round trained
(``--policy``, default ROUND/run/final) and its reference (the cache's model). For each pair, ``--replicates``
independent draws; in each, the score ``delta = mean_k (T_pi,k(c) - T_ref,k(c)) - mean_k (T_pi,k(r) - T_ref,k(r))``
for every configuration:

- ``n x 1`` (the pipeline's estimator, ``pipeline.estimator.diffusion.sample_masks``: n stratified timesteps, one mask
  each), n in 1, 2, 4, 8. The n = 1, 2, 4 draws are the nested sub-draws of the n = 8 draw (every 8/n-th of its
  stratified points: again a stratified draw with a uniform offset), so one scoring pass gives all four;
- ``T x M`` splits of n = 4 and n = 8: T stratified timesteps (mask counts), M independent masks of each count
  (the pipeline supports one mask per timestep; the bench builds these masks itself, same seeded generator rule);
- independent masks: the policy's terms from draw r, the reference's from draw r + 1 (independent masks), at
  every n.

The variance of delta across the replicates is averaged over pairs; the table gives it and its ratio to n = 8
shared. Train's ``score_variance`` metric (the within-draw estimate, ``pipeline.estimator.score_variance``) is printed
beside the n x 1 rows for comparison.

    OMP_NUM_THREADS=1 python bench/vrpo.py --run runs/default      # after `lldm-dpo run --out runs/default`

``--accuracy SEEDS``: the task accuracy of one round trained at each budget n, over SEEDS seeds: round 1's
pairs (as they are: one make-pairs seed) rescored by score-ref with ``samples`` n and ``seed`` s, trained with
``seed`` s (data order), every other setting the embedded default's, evaluated greedily on the held-out questions
against round 1's "before" rows (the same original model and sampler), with the paired interval per cell.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipeline.core.schemas import IDS_COLUMNS, PAIR_ID_COLUMN, SIDES  # noqa: E402
from pipeline.estimator.diffusion import BATCH_TOKENS, ScoreRequest, elbo_terms, mask_seed  # noqa: E402
from pipeline.estimator.score_variance import per_sample_scores, score_variance  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.refcache.reader import open_cache  # noqa: E402

BUDGETS = (1, 2, 4, 8)
SPLITS = ((2, 2), (1, 4), (4, 2), (2, 4), (1, 8))
"""(timesteps T, masks per timestep M) beyond the n x 1 of the pipeline's estimator."""


def split_masks(length: int, timesteps: int, per_step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bool[T*M, L] masks, Float64[T*M] weights L/l) of a T x M draw under the l_over_L scheme: T stratified
    counts (one uniform offset, evenly spaced, as ``sample_masks``), M independent uniformly random masks of each
    count (the count-smallest of fresh uniform keys)."""
    gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    u = torch.rand((), generator=gen, dtype=torch.float64)
    points = torch.remainder(u + torch.arange(timesteps, dtype=torch.float64) / timesteps, 1.0)
    counts = (torch.floor(points * length).long() + 1).clamp_(1, length).repeat_interleave(per_step)
    keys = torch.rand((timesteps * per_step, length), generator=gen, dtype=torch.float64)
    ranks = keys.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return ranks < counts[:, None], length / counts.to(torch.float64)


def nested(n_max: int, n: int) -> list[int]:
    """Indices of the n-sample sub-draw of an n_max stratified draw: every (n_max / n)-th point, from the first."""
    return list(range(0, n_max, n_max // n))


def draw_requests(row: dict, side: str, replicate: int, seed: int, n_max: int, scheme: str, eps: float):
    """The requests of one replicate of one response: the n_max x 1 draw, then each T x M split."""
    from pipeline.estimator.diffusion import sample_masks

    ids, prompt = row[IDS_COLUMNS[side]], row[IDS_COLUMNS["prompt"]]
    base = mask_seed(seed, row[PAIR_ID_COLUMN], side, 1000 + replicate)  # draws past any cache's (0..draws-1)
    ms = sample_masks(len(ids), n_max, base, scheme=scheme, eps=eps)
    out = {(n_max, 1): ScoreRequest(prompt, ids, ms.masks, ms.weights)}
    if scheme == "l_over_L":
        for t, m in SPLITS:
            masks, weights = split_masks(len(ids), t, m, mask_seed(seed, row[PAIR_ID_COLUMN], f"{side}/{t}x{m}",
                                                                    1000 + replicate))
            out[(t, m)] = ScoreRequest(prompt, ids, masks, weights)
    return out


def score_all(model, tok, rows, replicates: int, seed: int, n_max: int, scheme: str, eps: float,
              batch_tokens: int) -> dict:
    """terms[(pair, side, replicate, config)] -> Float64[n] for this model."""
    keys, requests = [], []
    for i, row in enumerate(rows):
        for side in SIDES:
            for r in range(replicates):
                for config, req in draw_requests(row, side, r, seed, n_max, scheme, eps).items():
                    keys.append((i, side, r, config))
                    requests.append(req)
    with torch.no_grad():
        terms = elbo_terms(model, requests, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                           batch_tokens=batch_tokens)
    return {k: t.double().cpu() for k, t in zip(keys, terms)}


def variance_table(pi: dict, ref: dict, pairs: int, replicates: int, n_max: int, configs: list) -> list[dict]:
    """One row per (config, masks): the variance across replicates of delta, averaged over pairs, and the mean
    within-draw estimate (train's score_variance)."""
    out = []
    for label, config, take in configs:
        for masks in ("shared", "independent"):
            per_pair, within = [], []
            for i in range(pairs):
                deltas = []
                for r in range(replicates):
                    r_ref = r if masks == "shared" else (r + 1) % replicates
                    side = {s: (pi[(i, s, r, config)][take], ref[(i, s, r_ref, config)][take]) for s in SIDES}
                    d = per_sample_scores(side["chosen"][0][None], side["rejected"][0][None],
                                          side["chosen"][1][None], side["rejected"][1][None])
                    deltas.append(float(d.mean()))
                    if masks == "shared":
                        within.append(float(score_variance(d)[0]))
                per_pair.append(statistics.variance(deltas))
            out.append({"config": label, "masks": masks, "variance": statistics.fmean(per_pair),
                        "within": statistics.fmean(within) if within and len(take) > 1 else float("nan")})
    return out


def configurations(n_max: int, scheme: str) -> list:
    configs = [(f"n={n} ({n}x1)", (n_max, 1), nested(n_max, n)) for n in BUDGETS if n <= n_max]
    if scheme == "l_over_L":
        configs += [(f"n={t * m} ({t}x{m})", (t, m), list(range(t * m))) for t, m in SPLITS]
    return configs


def accuracy_cells(run: Path, seeds: int, budgets, out: Path) -> None:
    """One round per (budget, seed) on round 1's pairs; prints a table (see the module docstring)."""
    import dataclasses

    import pyarrow.parquet as pq

    from pipeline.evaluation.intervals import paired_difference_interval
    from stages import evaluate, score_ref, train
    from stages.run_all import merged_config
    from stages.run_rounds import round_configs
    from stages.run_stages import planned_epochs

    round_dir = run / "round-1"
    before = [r["correct"] for r in pq.read_table(round_dir / "run" / "task_results.parquet").to_pylist()
              if r["model"] == "before"]
    print(f"# before (round 1's original model): {sum(before)}/{len(before)}")
    print("| n | seed | after (of %d) | difference | paired 95%% CI | seconds |" % len(before))
    print("|---|---|---|---|---|---|")
    by_n: dict[int, list[float]] = {}
    for seed in range(1, seeds + 1):  # seed by seed: a cut run still has every budget
        for n in budgets:
            cell = out / f"n{n}-seed{seed}"
            t0 = time.perf_counter()
            if not (cell / "run" / "eval.json").exists():
                cfg = merged_config(None, {"out": cell, "device": "cpu"})
                _, _, sc, tr, ev = round_configs(cfg, 1, cfg.model, cfg.model)
                sc = dataclasses.replace(sc, pairs=round_dir / "pairs.arrow", out=cell / "cache", samples=n, seed=seed)
                sc = dataclasses.replace(sc, draws=planned_epochs(sc, tr))  # one mask draw per epoch, as `run`
                score_ref.run(sc)
                train.run(dataclasses.replace(tr, scores=cell / "cache", out=cell / "run", seed=seed))
                evaluate.run(dataclasses.replace(ev, scores=None, model=str(cell / "run" / "final"), before="none",
                                                 out=cell / "run", train_sample=0))
            rows = pq.read_table(cell / "run" / "task_results.parquet").to_pylist()
            after = [r["correct"] for r in rows if r["model"] == "after"]
            diff = paired_difference_interval(before, after)
            by_n.setdefault(n, []).append(diff["difference"])
            print(f"| {n} | {seed} | {sum(after)} | {diff['difference']:+.3f} | {diff['low']:+.3f}..{diff['high']:+.3f} "
                  f"| {time.perf_counter() - t0:.0f} |", flush=True)
    for n, diffs in by_n.items():
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        print(f"# n={n}: mean difference {statistics.fmean(diffs):+.3f} (sd {sd:.3f}) over {len(diffs)} seeds")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="a finished `lldm-dpo run` output folder (round 1 is read)")
    p.add_argument("--policy", default=None, help="the policy (default: RUN/round-1/run/final)")
    p.add_argument("--pairs", type=int, default=32, help="pairs of round 1's cache to use (its train split)")
    p.add_argument("--replicates", type=int, default=16, help="independent draws per pair")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS)
    p.add_argument("--accuracy", type=int, default=0, metavar="SEEDS",
                   help="instead: train a round at each budget over this many seeds and measure task accuracy")
    p.add_argument("--budgets", default="1,2,4,8", help="budgets n of --accuracy")
    p.add_argument("--cells", default="runs/vrpo-accuracy", help="folder of --accuracy's rounds (reused)")
    args = p.parse_args(argv)
    if args.accuracy:
        accuracy_cells(Path(args.run), args.accuracy, [int(b) for b in args.budgets.split(",")], Path(args.cells))
        return

    round_dir = Path(args.run) / "round-1"
    cache = open_cache(round_dir / "cache")
    fp = cache.fingerprint
    rows = list(cache.split_rows("train", skip_identical=True))[: args.pairs]
    policy_name = args.policy or str(round_dir / "run" / "final")
    reference_name = cache.manifest.reference_model
    scheme, eps, n_max = fp["scheme"], fp.get("eps") or 1e-3, max(BUDGETS)
    t0 = time.perf_counter()
    terms = {}
    for label, name in (("policy", policy_name), ("reference", reference_name)):
        model, tok = load_model(name)
        model.eval()
        terms[label] = score_all(model, tok, rows, args.replicates, args.seed, n_max, scheme, eps, args.batch_tokens)
    seconds = time.perf_counter() - t0
    table = variance_table(terms["policy"], terms["reference"], len(rows), args.replicates, n_max,
                           configurations(n_max, scheme))
    base = next(r["variance"] for r in table if r["config"] == f"n={n_max} ({n_max}x1)" and r["masks"] == "shared")

    from score import matmul_flops  # bench/score.py

    print(f"# bench/vrpo.py: {len(rows)} pairs of {round_dir} (pad_to {fp.get('pad_to', 0)}, scheme {scheme}), "
          f"{args.replicates} independent draws each; policy {policy_name}, reference {reference_name}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"fp32 matmul {matmul_flops('cpu', torch.float32) / 1e9:.1f} GFLOP/s, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; scoring {seconds:.0f} s")
    print("| estimator (timesteps x masks) | masks | Var[delta] across draws | ratio to n=8 shared "
          "| within-draw estimate (train's score_variance) |")
    print("|---|---|---|---|---|")
    for r in table:
        within = "" if r["within"] != r["within"] else f"{r['within']:.4g}"
        print(f"| {r['config']} | {r['masks']} | {r['variance']:.4g} | {r['variance'] / base:.1f} | {within} |")


if __name__ == "__main__":
    main()
