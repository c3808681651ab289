"""eval's figures on the reference cache: the policy's preference and ELBO accuracy on held-out pairs (rescored
as score-ref scored them), its margin on a sample of training pairs (cached and fresh masks), mask-seed spreads,
and the intervals block of eval.json."""

from __future__ import annotations

import random
import statistics
from typing import Any

from pipeline.core.lazy import deferred
from pipeline.core.schemas import SIDES
from pipeline.estimator.diffusion import side_seed
from pipeline.estimator.losses import pair_statistics
from pipeline.estimator.replay import PairBatch, elbo_pass, replay_requests, rescore_part, seeded_request
from pipeline.evaluation.intervals import credits_record, paired_difference_interval
from pipeline.models.numerics import Numerics, autocast
from pipeline.refcache.fingerprint import pair_masks_of
from pipeline.refcache.reader import read_part
from pipeline.refcache.rows import reference_elbo, row_split

torch = deferred("torch")


def preference_scores(model, tokenizer, cache, split: str, beta: float, numerics: Numerics,
                      limit: int = 0) -> dict[str, Any]:
    """The model's ELBOs on the held-out pairs, rescored part by part as score-ref scored them (same
    requests, order, token budget and numerics: the cache's own model gives every pair delta = 0 exactly),
    against the cached reference; with ``limit``, whole parts until that many pairs of the split are in.
    Accuracy uses the one tie rule (pipeline.estimator.losses.reward_accuracy)."""
    fp = cache.fingerprint
    batch_tokens = cache.manifest.batch_tokens
    device = next(model.parameters()).device
    sums = cache.manifest.part_sha256
    pi_c, pi_r, ref_c, ref_r = [], [], [], []
    for path in cache.parts:
        if limit and len(pi_c) >= limit:
            break
        rows = read_part(path, expected_sha256=sums.get(path.name)).to_pylist()
        if not any(row_split(r) == split for r in rows):
            continue
        scores = rescore_part(model, tokenizer, rows, fp, batch_tokens=batch_tokens,
                              autocast=autocast(device, numerics.mixed_precision))
        for row, sc in zip(rows, scores):
            if row_split(row) != split or (limit and len(pi_c) >= limit):
                continue
            pi_c.append(sc["chosen"])
            pi_r.append(sc["rejected"])
            ref_c.append(reference_elbo(row, "chosen"))
            ref_r.append(reference_elbo(row, "rejected"))
    return margin_summary(pi_c, pi_r, ref_c, ref_r, beta, with_elbo=True)


def margin_summary(pi_c, pi_r, ref_c, ref_r, beta: float, with_elbo: bool = False) -> dict[str, Any]:
    """Accuracy (with its count and Wilson interval, ``accuracy_interval``) and mean margin of pairs, and the
    per-pair credits (``credits``, with ``with_elbo`` also ``elbo_credits``) for paired differences."""
    t = [torch.tensor(v, dtype=torch.float64) for v in (pi_c, pi_r, ref_c, ref_r)]
    stats = pair_statistics(*t, beta=beta, preference_weight=0.0)  # margins and credits, no loss
    credit = stats.accuracies.tolist()  # the log-ratios' sign before beta scales them, with the one tie rule
    out = {"accuracy": float(sum(credit) / len(credit)) if credit else float("nan"),
           "mean_margin": float(stats.margins.mean()), "pairs": len(pi_c), "accuracy_interval": credits_record(credit),
           "credits": credit}
    if with_elbo:
        elbo = (t[0] > t[1]).double().tolist()
        out.update(elbo_accuracy=float(sum(elbo) / len(elbo)) if elbo else float("nan"),
                   elbo_accuracy_interval=credits_record(elbo), elbo_credits=elbo)
    return out


def fresh_requests(rows: list[dict], fingerprint: dict[str, Any], extra: int = 0) -> list:
    """Requests on masks training never saw: draw index ``draws + extra`` of each (pair, side), past the cache's."""
    draw = fingerprint["draws"] + extra
    pair_masks = pair_masks_of(fingerprint)
    return [seeded_request(row, side, side_seed(fingerprint["seed"], row["pair_id"], side, draw, pair_masks),
                           fingerprint)[0] for row in rows for side in SIDES]


def mean_terms(model, tokenizer, requests: list, batch_tokens: int, mixed_precision: str = "no") -> list[float]:
    """Each request's mean ELBO term (no grad, under ``mixed_precision``'s autocast)."""
    terms = elbo_pass(model, tokenizer, requests, batch_tokens=batch_tokens,
                      autocast=autocast(next(model.parameters()).device, mixed_precision))
    return [t.double().mean().item() for t in terms]


def sample_terms(model, tokenizer, rows: list[dict], fingerprint: dict[str, Any], numerics: Numerics,
                 batch_tokens: int) -> dict[str, list[float]]:
    """Mean ELBOs of each sampled training pair on the cached masks (all draws, as training saw them) and
    on fresh masks: {"cached_c", "cached_r", "fresh_c", "fresh_r"}."""
    draws = fingerprint["draws"]
    cached = [0.0] * (2 * len(rows))
    for draw in range(draws):
        for i, v in enumerate(mean_terms(model, tokenizer, replay_requests(PairBatch(rows, draw), fingerprint),
                                         batch_tokens, numerics.mixed_precision)):
            cached[i] += v / draws
    fresh = mean_terms(model, tokenizer, fresh_requests(rows, fingerprint), batch_tokens, numerics.mixed_precision)
    return {"cached_c": cached[0::2], "cached_r": cached[1::2], "fresh_c": fresh[0::2], "fresh_r": fresh[1::2]}


def fresh_elbo_credits(model, tokenizer, rows: list[dict], fingerprint: dict[str, Any], numerics: Numerics,
                       batch_tokens: int, extra: int) -> list[float]:
    """Per pair 1 when the model's ELBO of the chosen response beats the rejected one's on fresh masks
    (draw ``draws + extra``), else 0."""
    means = mean_terms(model, tokenizer, fresh_requests(rows, fingerprint, extra), batch_tokens,
                       numerics.mixed_precision)
    return [float(c > r) for c, r in zip(means[0::2], means[1::2])]


def spread(values: list[float], seeds: list[int]) -> dict[str, Any]:
    """A figure under several mask seeds: the values, their mean, sample standard deviation, min and max."""
    return {"seeds": list(seeds), "values": list(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def interval_block(credits: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """{figure: {label: Wilson record, "difference": paired interval when both models were measured}}."""
    out: dict[str, dict[str, Any]] = {}
    for figure, by_label in credits.items():
        rec: dict[str, Any] = {label: credits_record(c) for label, c in by_label.items()}
        if "before" in by_label and "after" in by_label and len(by_label["before"]) == len(by_label["after"]):
            rec["difference"] = paired_difference_interval(by_label["before"], by_label["after"])
        out[figure] = rec
    return out


def training_sample(cache, size: int, seed: int) -> list[dict]:
    rows = cache.split_rows("train")  # read on demand: only the sampled rows are decoded
    picked = range(len(rows))
    if len(rows) > size:  # the same draw as sampling the rows themselves (sample depends on the length only)
        picked = sorted(random.Random(f"train-sample:{seed}").sample(range(len(rows)), size))
    return rows.take(picked)


def train_sample_report(rows: list[dict], policy: dict, reference: dict | None, beta: float) -> dict[str, Any]:
    """The policy on sampled training pairs: margin and accuracy on the cached masks, and (given the reference's
    terms on the fresh masks) on fresh masks."""
    ref_c = [reference_elbo(r, "chosen") for r in rows]
    ref_r = [reference_elbo(r, "rejected") for r in rows]
    return {"pairs": len(rows),
            "cached_masks": margin_summary(policy["cached_c"], policy["cached_r"], ref_c, ref_r, beta),
            # fresh masks need the cache's model as `before` (the reference on the fresh masks)
            "fresh_masks": None if reference is None else margin_summary(
                policy["fresh_c"], policy["fresh_r"], reference["fresh_c"], reference["fresh_r"], beta)}
