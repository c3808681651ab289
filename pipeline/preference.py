"""Held-out preference metrics of a policy on the cache's recorded masks.

``heldout_sums`` / ``heldout_metrics`` measure a policy on held-out pairs the
way ``train --eval-every`` reports them: one no-grad policy pass over the pairs
on draw 0's masks against the cached reference terms of that draw, so the
reference model is never loaded. The sums are additive over pairs, so under
data parallel each process scores its share and one all-reduce of the sums
gives the metrics of the whole split, whatever the shard sizes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from pipeline.errors import UserError
from pipeline.replay import PairBatch, replay_requests

EVAL_PREFIX = "eval/"
"""TRL's prefix of held-out metrics: ``eval/rewards/accuracies`` and so on (schemas.EVAL_METRIC_COLUMNS)."""

# Order of the entries in the sums vector; "pairs" first so the means divide by it.
_SUM_FIELDS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def heldout_sums(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    fingerprint: dict[str, Any],
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    preference_weight: float = 1.0,
    sft_weight: float = 0.0,
    batch_tokens: int | None = None,
    draw: int = 0,
    pairs_per_pass: int = 8,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """Float64 sums over ``rows`` (in ``_SUM_FIELDS`` order) of the policy's held-out DPO statistics.

    The policy's terms come from one no-grad pass on ``draw``'s cached masks;
    the reference's are the cached terms of the same draw. The loss is train's
    (``preference_weight`` x the preference loss + ``sft_weight`` x the SFT term),
    and accuracy follows train's one tie rule (``losses.reward_accuracy``: a tie
    counts one half), so the reference itself scores exactly 0.5.
    """
    from pipeline.diffusion import elbo_terms
    from pipeline.losses import dpo_loss, reward_accuracy, sft_loss

    sums = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64)
    for start in range(0, len(rows), pairs_per_pass):
        chunk = list(rows[start:start + pairs_per_pass])
        requests = replay_requests(PairBatch(chunk, draw), fingerprint)
        with torch.no_grad(), autocast():
            terms = elbo_terms(model, requests, mask_token_id=tokenizer.mask_token_id,
                               pad_token_id=tokenizer.pad_token_id, batch_tokens=batch_tokens)
        means = torch.stack([t.mean().double().cpu() for t in terms])
        pi_c, pi_r = means[0::2], means[1::2]
        ref_c = torch.tensor([_mean(r["ref_chosen_terms"][draw]) for r in chunk], dtype=torch.float64)
        ref_r = torch.tensor([_mean(r["ref_rejected_terms"][draw]) for r in chunk], dtype=torch.float64)
        chosen_len = torch.tensor([r["chosen_len"] for r in chunk])
        rejected_len = torch.tensor([r["rejected_len"] for r in chunk])
        losses, cr, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type,
                                  label_smoothing=label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len)
        losses = preference_weight * losses
        if sft_weight:
            losses = losses + sft_weight * sft_loss(pi_c, chosen_len)
        margins = cr - rr
        credit = reward_accuracy(cr, rr, ref_c, ref_r, beta=beta, loss_type=loss_type, chosen_len=chosen_len,
                                 rejected_len=rejected_len)
        sums += torch.stack([torch.tensor(float(len(chunk)), dtype=torch.float64), losses.sum(), cr.sum(),
                             rr.sum(), credit.sum(), margins.sum(), pi_c.sum(), pi_r.sum()])
    return sums


def heldout_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Means of the (possibly all-reduced) sums, named ``eval/...`` as TRL names them."""
    values = sums.double().cpu().tolist()
    n = values[0]
    if n <= 0:
        raise UserError("held-out evaluation: no pairs were scored")
    return {EVAL_PREFIX + name: v / n for name, v in zip(_SUM_FIELDS[1:], values[1:])}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)
