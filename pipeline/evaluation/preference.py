"""Held-out preference metrics of a policy on the cache's recorded masks.

``cache_layout_sums`` / ``heldout_metrics`` measure a policy on held-out pairs
the way ``train --eval-every`` reports them: one no-grad policy pass over the
pairs on draw 0's masks, in the cache's own batch layout, against the cached
reference terms of that draw, so the reference model is never loaded. The sums
are additive over pairs, so under data parallel each process scores its share
and one all-reduce of the sums gives the metrics of the whole split, whatever
the shard sizes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from pipeline.core.errors import UserError
from pipeline.core.schemas import SIDES
from pipeline.estimator.losses import METRICS, pair_statistics
from pipeline.estimator.replay import rescore_part_draws
from pipeline.refcache.rows import length, reference_mean

EVAL_PREFIX = "eval/"
"""TRL's prefix of held-out metrics: ``eval/rewards/accuracies`` and so on (schemas.EVAL_METRIC_COLUMNS)."""

# Order of the entries in the sums vector (a tensor, so that processes all-reduce it in one call): each named.
_SUM_FIELDS = ("pairs", *METRICS.values())


def _chunk_sums(pi_c: torch.Tensor, pi_r: torch.Tensor, chunk: Sequence[dict[str, Any]], draw: int, *, beta: float,
                loss_type: str, label_smoothing: float, preference_weight: float, sft_weight: float) -> torch.Tensor:
    """``losses.pair_statistics`` of the chunk against its cached reference terms, summed (``_SUM_FIELDS``)."""
    ref_c, ref_r = (torch.tensor([reference_mean(r, side, draw) for r in chunk], dtype=torch.float64) for side in SIDES)
    chosen_len, rejected_len = (torch.tensor([length(r, side) for r in chunk]) for side in SIDES)
    stats = pair_statistics(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            chosen_len=chosen_len, rejected_len=rejected_len, preference_weight=preference_weight,
                            sft_weight=sft_weight)
    sums = {"pairs": float(len(chunk)), **stats.sums()}
    return torch.tensor([sums[name] for name in _SUM_FIELDS], dtype=torch.float64)


def cache_layout_sums(
    model,
    tokenizer,
    parts: Sequence[list[dict[str, Any]]],
    fingerprint: dict[str, Any],
    keep: Callable[[dict[str, Any]], bool],
    *,
    beta: float,
    batch_tokens: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    preference_weight: float = 1.0,
    sft_weight: float = 0.0,
    draw: int = 0,
) -> tuple[torch.Tensor, float]:
    """Float64 sums (in ``_SUM_FIELDS`` order) of train's statistics of the policy on the rows ``keep`` selects,
    against the cached reference terms of ``draw``: train's loss (``preference_weight`` x the preference loss +
    ``sft_weight`` x the SFT term) and train's one tie rule (a tie counts one half). Scored in the cache's own
    batch layout: each part's batches as score-ref planned them (pipeline.estimator.replay.rescore_part_draws:
    the same requests, order and ``batch_tokens``, the cache's), only those that hold a kept row's requests of
    ``draw`` run, the policy's mean of ``draw``'s terms taken as the cached reference's is. The cache's model
    in the cache's numerics therefore reproduces the reference exactly (accuracy 0.5, margins 0) in any dtype,
    where a pass in train's batches differs by the padding and shapes. Also returns the largest
    |B_pi(y) - B_ref(y)| (nats) over every response of ``draw`` those batches scored whole: the kept ones and
    those batched with them (train's ref/gap_max; they were paid for, so they are checked)."""
    sums = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64)
    gap = 0.0
    for rows in parts:
        kept = [i for i, r in enumerate(rows) if keep(r)]
        if not kept:
            continue
        with autocast():
            per = rescore_part_draws(model, tokenizer, rows, fingerprint, batch_tokens=batch_tokens,
                                     autocast=contextlib.nullcontext(), only_rows=kept, draw=draw)
        # every response of the draw the batches scored whole (the kept ones among them): its ELBO once
        elbo = {(i, side): _mean(terms[side][draw]) for i, terms in enumerate(per) for side in SIDES
                if terms[side][draw] is not None}
        gap = max([gap, *(abs(b - reference_mean(rows[i], side, draw)) for (i, side), b in elbo.items())])
        chunk = [rows[i] for i in kept]
        pi_c, pi_r = (torch.tensor([elbo[(i, side)] for i in kept], dtype=torch.float64) for side in SIDES)
        sums += _chunk_sums(pi_c, pi_r, chunk, draw, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing, preference_weight=preference_weight,
                            sft_weight=sft_weight)
    return sums, gap


def heldout_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Means of the (possibly all-reduced) sums, named ``eval/...`` as TRL names them."""
    values = dict(zip(_SUM_FIELDS, sums.double().cpu().tolist()))
    n = values.pop("pairs")
    if n <= 0:
        raise UserError("held-out evaluation: no pairs were scored")
    return {EVAL_PREFIX + name: v / n for name, v in values.items()}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)
