"""Masks shared across a pair (score-ref ``pair_masks: shared``) against independent masks per side: the noise of
the DPO gradient and of the preference score, on a finished run's own pairs.

For ``--pairs`` pairs of round 1's cache (its train split) and ``--replicates`` mask draws of each (draw indices
past any cache's, at the cache's ``samples``, ``scheme`` and ``pad_to``), under each setting:

- the gradient of the policy's side of the margin, ``g = d/dtheta [mean_k T_k(chosen) - mean_k T_k(rejected)]``
  (the DPO gradient of a pair is this times the loss's weight ``f'(delta)``, one number; the reference is a
  constant), for the policy at the start of training (``--policy``, default the cache's reference model): per
  pair the noise ``E||g_r - g_bar||^2`` across draws and the signal ``||g_bar||^2 - noise / R`` (unbiased), each
  averaged over pairs, and the signal-to-noise ratio of one draw;
- the variance across draws of the preference score ``delta_hat`` (policy minus reference, on masks shared
  between them as always) for the round's trained policy (``--trained``, default ROUND/run/final).

    OMP_NUM_THREADS=1 python bench/pair_masks.py --run runs/default      # after `lldm-dpo run --out runs/default`

Prints a table with the ratio shared / independent of each figure and the machine's float32 matmul rate.
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
from pipeline.estimator.diffusion import PAIR_MASKS, elbo_terms, masked_request, side_seed  # noqa: E402
from pipeline.models import load  # noqa: E402
from pipeline.models.numerics import autocast  # noqa: E402
from pipeline.refcache.reader import open_cache  # noqa: E402


def requests(row: dict, replicate: int, pair_masks: str, fp: dict, seed: int) -> list:
    """The (chosen, rejected) requests of one replicate draw under ``pair_masks``."""
    return [masked_request(row[IDS_COLUMNS["prompt"]], row[IDS_COLUMNS[side]], fp["samples"],
                           side_seed(seed, row[PAIR_ID_COLUMN], side, 1000 + replicate, pair_masks),
                           scheme=fp["scheme"], eps=fp.get("eps") or 1e-3)[0] for side in SIDES]


def margin(model, tok, reqs: list, mixed_precision: str) -> torch.Tensor:
    """mean_k T_k(chosen) - mean_k T_k(rejected), under the cache's autocast (scored as the reference was)."""
    with autocast("cpu", mixed_precision):
        terms = elbo_terms(model, reqs, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id)
    return terms[0].mean() - terms[1].mean()


def gradient_noise(model, tok, rows: list[dict], replicates: int, pair_masks: str, fp: dict, seed: int,
                   mixed_precision: str) -> dict:
    """Mean over pairs of the noise E||g_r - g_bar||^2 and the unbiased signal ||g_bar||^2 - noise / R."""
    params = [p for p in model.parameters() if p.requires_grad]
    noise, signal = [], []
    for row in rows:
        grads = []
        for r in range(replicates):
            model.zero_grad()
            margin(model, tok, requests(row, r, pair_masks, fp, seed), mixed_precision).backward()
            grads.append(torch.cat([p.grad.reshape(-1).double() for p in params]))
        g = torch.stack(grads)
        mean = g.mean(0)
        var = float(((g - mean) ** 2).sum(1).sum() / (replicates - 1))
        noise.append(var)
        signal.append(float(mean.pow(2).sum()) - var / replicates)
    model.zero_grad()
    return {"noise": statistics.fmean(noise), "signal": statistics.fmean(signal)}


def score_variance(policy, reference, tok, rows, replicates, pair_masks, fp, seed, mixed_precision) -> float:
    """Mean over pairs of the variance across draws of delta_hat (policy and reference on the same masks)."""
    out = []
    with torch.no_grad():
        for row in rows:
            deltas = []
            for r in range(replicates):
                reqs = requests(row, r, pair_masks, fp, seed)
                deltas.append(float(margin(policy, tok, reqs, mixed_precision)
                                    - margin(reference, tok, reqs, mixed_precision)))
            out.append(statistics.variance(deltas))
    return statistics.fmean(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="a finished `lldm-dpo run` output folder (round 1 is read)")
    p.add_argument("--policy", default=None, help="the model whose gradient is measured (default: the reference)")
    p.add_argument("--trained", default=None, help="the trained policy of the score's variance "
                                                   "(default: RUN/round-1/run/final)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--replicates", type=int, default=16)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)

    round_dir = Path(args.run) / "round-1"
    cache = open_cache(round_dir / "cache")
    fp = cache.fingerprint
    rows = list(cache.split_rows("train", skip_identical=True))[: args.pairs]
    numerics = cache.manifest.numerics  # the policy trains, and so is measured, in the cache's numerics
    reference, tok = load(cache.manifest.reference_model, numerics)
    policy = reference if args.policy is None else load(args.policy, numerics)[0]
    trained = load(args.trained or str(round_dir / "run" / "final"), numerics)[0]
    for m in (reference, policy, trained):
        m.eval()  # no dropout: the draws are the only randomness
    t0 = time.perf_counter()
    figures = {}
    for pm in PAIR_MASKS:
        figures[pm] = gradient_noise(policy, tok, rows, args.replicates, pm, fp, args.seed, numerics.mixed_precision)
        figures[pm]["score"] = score_variance(trained, reference, tok, rows, args.replicates, pm, fp, args.seed,
                                              numerics.mixed_precision)
    seconds = time.perf_counter() - t0

    from score import matmul_flops  # bench/score.py

    lengths = [len(r[IDS_COLUMNS["chosen"]]) for r in rows]
    differing = [sum(a != b for a, b in zip(r[IDS_COLUMNS["chosen"]], r[IDS_COLUMNS["rejected"]]))
                 + abs(len(r[IDS_COLUMNS["chosen"]]) - len(r[IDS_COLUMNS["rejected"]])) for r in rows]
    print(f"# bench/pair_masks.py: {len(rows)} pairs of {round_dir} (n {fp['samples']}, scheme {fp['scheme']}, "
          f"pad_to {fp.get('pad_to', 0)}; responses {min(lengths)}-{max(lengths)} tokens, differing in "
          f"{statistics.median(differing):.0f} (median) of them), {args.replicates} draws each")
    print(f"# gradient of {args.policy or 'the reference (the policy at step 0)'}; score variance of "
          f"{args.trained or round_dir / 'run' / 'final'} against the reference")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"fp32 matmul {matmul_flops('cpu', torch.float32) / 1e9:.1f} GFLOP/s, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {seconds:.0f} s")
    print("| figure (mean over pairs) | independent | shared | shared / independent |")
    print("|---|---|---|---|")
    rows_out = [("gradient noise E||g - g_bar||^2", "noise"), ("gradient signal ||g_bar||^2", "signal"),
                ("Var[delta_hat] across draws", "score")]
    for label, key in rows_out:
        a, b = figures["independent"][key], figures["shared"][key]
        print(f"| {label} | {a:.4g} | {b:.4g} | {b / a:.3f} |")
    snr = {pm: figures[pm]["signal"] / figures[pm]["noise"] for pm in PAIR_MASKS}
    print(f"| signal / noise of one draw | {snr['independent']:.4g} | {snr['shared']:.4g} | "
          f"{snr['shared'] / snr['independent']:.1f} |")


if __name__ == "__main__":
    main()
