"""One DPO micro-step on replayed masks: the policy's terms, the loss, the backward, and the collectives every
process makes alike (the FSDP forward-count agreement, the finite-loss flag, the gradient sync), so uneven
shares and a process the epoch's end left idle still meet the others at every collective.

Each batch replays the masks the cache recorded (draw = epoch mod draws) on the policy, so policy and reference
terms share their noise (VRPO's antithetic sampling) and the reference model is never loaded (unless
``reference: online``, the baseline).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.core.schemas import SIDES
from pipeline.estimator.diffusion import BATCH_TOKENS, ScoreRequest, elbo_terms, forward_calls
from pipeline.estimator.losses import METRICS, PER_TOKEN, PairStatistics, log_ratios, pair_statistics, sequence_weights
from pipeline.estimator.replay import PairBatch, replay_requests
from pipeline.estimator.score_variance import per_sample_scores, score_variance
from pipeline.refcache.rows import length, reference_terms
from pipeline.trainer.dpo_config import TrainConfig
from pipeline.trainer.placement import Placement
from pipeline.trainer.session import check_finite, pad_probe


@dataclass
class TrainContext:
    """What a DPO step needs beyond its batch, built once by the recipe: the policy as placed (``placed``: the
    recipe itself, whose accelerator, model and wrapper these are), the cache's fingerprint and batch layout."""

    cfg: TrainConfig
    placed: Placement
    """The accelerator, the policy and its DDP/FSDP wrapper (``session.Recipe`` is one; ``Placement(acc, model)``
    outside a recipe)."""
    tokenizer: Any
    fingerprint: dict[str, Any]
    ref_model: Any = None
    step: int = 0
    cache_batch_tokens: int = BATCH_TOKENS
    """score-ref's token budget per forward pass: the cache's batch layout, in which the start check and the
    held-out evaluation score (exact reproduction of the cached terms)."""


@dataclass
class MicroStats:
    """What one micro-batch reports (detached): its mean loss, its pairs' statistics, its size."""

    loss: torch.Tensor
    stats: PairStatistics
    pairs: int
    tokens: int
    score_variance: torch.Tensor | float = float("nan")
    """The sum over its pairs of the estimated variance of the preference score (``pipeline.estimator.score_variance``), a
    detached tensor: read once per step in ``step_metrics``, not per micro-batch (no device sync, and plan's
    fake-tensor trace of this step has no value to read)."""


def policy_terms(model, requests, tokenizer, cfg: TrainConfig) -> list[torch.Tensor]:
    return elbo_terms(model, requests, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                      batch_tokens=cfg.batch_tokens)


def batch_reference(batch: PairBatch, device, online: list[torch.Tensor] | None = None):
    """The reference of the batch, read once: its per-request terms ([pair0 chosen, pair0 rejected, ...], the
    online terms or the cache's of this draw, float64) and its ELBOs per side (the terms' means)."""
    if online is not None:
        means = torch.stack([t.mean() for t in online]).detach()
        return online, means[0::2], means[1::2]
    cached = [reference_terms(row, side, batch.draw) for row in batch.rows for side in SIDES]
    means = [sum(terms) / len(terms) for terms in cached]  # rows.reference_mean, on the lists just read
    return ([torch.tensor(t, dtype=torch.float64, device=device) for t in cached],
            torch.tensor(means[0::2], dtype=torch.float64, device=device),
            torch.tensor(means[1::2], dtype=torch.float64, device=device))


def reference_means(batch: PairBatch, device, ref_terms: list[torch.Tensor] | None = None):
    """Reference ELBOs of the batch: cached means of this draw, or the online terms' means."""
    return batch_reference(batch, device, ref_terms)[1:]


def batch_loss(cfg: TrainConfig, terms: list[torch.Tensor], ref_c, ref_r, chosen_len,
               rejected_len) -> tuple[torch.Tensor, PairStatistics]:
    """Mean DPO (+ SFT) loss of a batch from its per-request terms, and its pairs' statistics."""
    means = torch.stack([t.mean() for t in terms])
    stats = pair_statistics(means[0::2], means[1::2], ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                            label_smoothing=cfg.label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len,
                            preference_weight=cfg.preference_weight, sft_weight=cfg.sft_total_weight)
    return stats.losses.mean(), stats


def micro_step(ctx: TrainContext, batch: PairBatch, scale: float, sync: bool) -> Optional[MicroStats]:
    """Forward and backward of one micro-batch; returns its detached statistics (None when this process
    has no rows: the end of an epoch left it nothing, and it only joins the others' collectives)."""
    requests = replay_requests(batch, ctx.fingerprint) if batch.rows else []
    ref_terms = _online_reference(ctx, requests) if ctx.cfg.reference == "online" else None
    if not batch.rows:
        _idle_micro_step(ctx, sync)
        return None
    device = ctx.placed.acc.device
    ref_terms, ref_c, ref_r = batch_reference(batch, device, ref_terms)
    lengths = tuple(torch.tensor([length(r, side) for r in batch.rows], device=device) for side in SIDES)
    if ctx.cfg.sequence_microbatch == 0:
        loss, stats, terms = _one_pass(ctx, batch, requests, (ref_c, ref_r), lengths, scale, sync)
    else:
        loss, stats, terms = _per_sequence(ctx, batch, requests, (ref_c, ref_r), lengths, scale, sync)
    tokens = sum(req.masks.shape[0] * (len(req.prompt_ids) + len(req.response_ids)) for req in requests)
    return MicroStats(loss=loss.detach().float(), stats=dataclasses.replace(stats, losses=stats.losses.detach()),
                      pairs=len(batch.rows), tokens=tokens,
                      score_variance=batch_score_variance(ctx.cfg, terms, ref_terms, lengths))


def batch_score_variance(cfg: TrainConfig, terms, ref_terms, lengths) -> torch.Tensor:
    """The sum over the batch's pairs of their preference score's estimated variance, from the per-sample terms
    of the policy (``terms``) and of the reference (``batch_reference``'s: online, or the cache's of this draw)."""
    policy, ref = torch.stack([t.detach() for t in terms]), torch.stack([t.detach() for t in ref_terms])
    per_token = cfg.loss_type in PER_TOKEN
    d = per_sample_scores(policy[0::2], policy[1::2], ref[0::2], ref[1::2],
                          *(lengths if per_token else (None, None)))
    return score_variance(d).sum()


def _online_reference(ctx: TrainContext, requests) -> list[torch.Tensor]:
    """The live reference's terms on the same masks (every process, also an idle one: FSDP's collectives)."""
    with torch.no_grad(), ctx.placed.acc.autocast():
        if ctx.ref_model is not None:
            return lockstep_terms(ctx, ctx.ref_model, requests)[0]
        with ctx.placed.model.disable_adapter():  # LoRA: the base model with adapters switched off is the reference
            return lockstep_terms(ctx, ctx.placed.scorer, requests)[0]


def _one_pass(ctx: TrainContext, batch, requests, refs, lengths, scale: float, sync: bool):
    with ctx.placed.sync_context(sync):  # forward and backward both inside, as DDP requires
        with ctx.placed.acc.autocast():
            terms, pad = lockstep_terms(ctx, ctx.placed.scorer, requests)
            loss, stats = batch_loss(ctx.cfg, terms, *refs, *lengths)
        _check_finite(ctx, loss, batch)
        _backward(ctx, _with_pad(loss * scale, pad))
    return loss, stats, terms


def _per_sequence(ctx: TrainContext, batch, requests, refs, lengths, scale: float, sync: bool):
    """One no-grad pass gives each pair's dL/d(log-ratio) per side; then every sequence's term is backpropagated on its own
    with that weight (docs/estimator.md, "The gradient, sample by sample"), K sequences at a time, so activations
    follow K rather than 2n."""
    cfg, acc = ctx.cfg, ctx.placed.acc
    with torch.no_grad(), acc.autocast():
        terms, _ = lockstep_terms(ctx, ctx.placed.scorer, requests)
        loss, stats = batch_loss(cfg, terms, *refs, *lengths)
    _check_finite(ctx, loss, batch)
    chosen_len, rejected_len = lengths
    ratios = log_ratios(stats.chosen_logps, stats.rejected_logps, *refs, loss_type=cfg.loss_type,
                        chosen_len=chosen_len, rejected_len=rejected_len)
    chosen_w, rejected_w = sequence_weights(
        ratios, ctx.fingerprint["samples"], beta=cfg.beta, loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_total_weight, chosen_len=chosen_len,
        normalizer=len(batch.rows), rejected_len=rejected_len, dpo_weight=cfg.preference_weight)
    # Empty masks (possible under the 1/t scheme) have a constant term 0: no forward needed.
    seqs = [(j, k) for j, req in enumerate(requests) for k in range(req.masks.shape[0]) if bool(req.masks[k].any())]
    K = cfg.sequence_microbatch
    groups = [seqs[g:g + K] for g in range(0, len(seqs), K)]
    n_groups = ctx.placed.most(len(groups)) if ctx.placed.fsdp else len(groups)  # FSDP: a backward per group, everywhere
    if n_groups == 0:
        with ctx.placed.sync_context(sync):
            _backward(ctx, torch.zeros((), device=acc.device))
    for g in range(n_groups):
        group = groups[g] if g < len(groups) else []
        sub = [ScoreRequest(requests[j].prompt_ids, requests[j].response_ids, requests[j].masks[k:k + 1],
                            requests[j].weights[k:k + 1]) for j, k in group]
        weights = [(chosen_w if j % 2 == 0 else rejected_w)[j // 2] for j, _ in group]
        with ctx.placed.sync_context(sync and g + 1 >= n_groups):
            with acc.autocast():
                sub_terms, pad = lockstep_terms(ctx, ctx.placed.scorer, sub)
            surrogate = sum((w.to(t.dtype) * t.sum() for w, t in zip(weights, sub_terms)),
                            torch.zeros((), device=acc.device))
            _backward(ctx, _with_pad(surrogate * scale, pad))
    return loss, stats, terms


def _probe(ctx: TrainContext, scorer) -> torch.Tensor:
    return pad_probe(scorer, ctx.tokenizer.pad_token_id, ctx.placed.acc.device)


def lockstep_terms(ctx: TrainContext, scorer, requests) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """``policy_terms`` of ``requests`` (none on a process the epoch's end left idle), and under FSDP the sum of
    the pad forwards that bring this process to the most forward passes any process makes here (None when
    there are none). Every FSDP forward is a collective (the sharded weights are gathered), so every process
    must make as many; the count is agreed first, before any of them. Add ``0 * pad`` to a loss that is
    backpropagated, so the pad passes join the backward too."""
    local = most = 0
    if ctx.placed.fsdp:
        local = forward_calls(requests, ctx.cfg.batch_tokens) if requests else 0
        most = ctx.placed.most(local)
    terms = policy_terms(scorer, requests, ctx.tokenizer, ctx.cfg) if requests else []
    pad = None
    for _ in range(most - local):
        p = _probe(ctx, scorer)
        pad = p if pad is None else pad + p
    return terms, pad


def _with_pad(loss: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    return loss if pad is None else loss + 0.0 * pad.to(loss.dtype)


def _idle_micro_step(ctx: TrainContext, sync: bool) -> None:
    """A process with no rows makes the collectives ``micro_step`` makes on the others: under FSDP as many
    forward passes (and backward passes) as the busiest process, the finite-loss flag, and the gradient sync."""
    acc, zero = ctx.placed.acc, torch.zeros((), device=ctx.placed.acc.device)
    if ctx.cfg.sequence_microbatch == 0:
        with ctx.placed.sync_context(sync):
            with acc.autocast():
                _, pad = lockstep_terms(ctx, ctx.placed.scorer, [])
                if pad is None and ctx.placed.wrapped is not None:  # DDP may sync in a forward: make it where the others do
                    pad = _probe(ctx, ctx.placed.scorer)
            _check_finite(ctx, zero, PairBatch([], 0))
            _backward(ctx, _with_pad(zero, pad))
        return
    with torch.no_grad(), acc.autocast():
        lockstep_terms(ctx, ctx.placed.scorer, [])
    _check_finite(ctx, zero, PairBatch([], 0))
    n_groups = ctx.placed.most(0) if ctx.placed.fsdp else 0
    if n_groups == 0:
        with ctx.placed.sync_context(sync):
            _backward(ctx, zero)
    for g in range(n_groups):
        with ctx.placed.sync_context(sync and g + 1 >= n_groups):
            with acc.autocast():
                _, pad = lockstep_terms(ctx, ctx.placed.scorer, [])
            _backward(ctx, _with_pad(zero, pad))


def _backward(ctx: TrainContext, loss: torch.Tensor) -> None:
    """Backward, also when the loss does not depend on the weights (every mask empty under
    the 1/t scheme, or no rows left for this process): alone that adds nothing; under data
    parallel the other processes wait for this one's gradients, so a zero-weighted pass
    through the body and head joins them."""
    if not loss.requires_grad:
        if ctx.placed.wrapped is None:
            return
        # Through the wrapped scorer, so DDP/FSDP see the same one forward as on a real batch.
        loss = loss + 0.0 * _probe(ctx, ctx.placed.scorer)
    ctx.placed.acc.backward(loss)


def _check_finite(ctx: TrainContext, loss: torch.Tensor, batch: PairBatch) -> None:
    check_finite(ctx.placed.acc, ctx.placed.wrapped is not None, loss, ctx.step, f"pairs {', '.join(batch.pair_ids)}")


def step_metrics(acc, micro: list[Optional[MicroStats]]) -> dict[str, float]:
    """Means over the step's pairs (all micro-batches and processes), with TRL's names: every process sums
    its micro-batches' statistics by name, one all-reduce adds the processes' sums."""
    names = ("pairs", "tokens", "score_variance", *METRICS.values())
    sums = dict.fromkeys(names, 0.0)
    for m in micro:
        if m is None:
            continue
        sums["pairs"] += m.pairs
        sums["tokens"] += m.tokens
        sums["score_variance"] += float(m.score_variance)
        for name, value in m.stats.sums().items():
            sums[name] += value
    local = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        local = acc.reduce(local, reduction="sum")
    total = dict(zip(names, local.tolist()))
    pairs, tokens = max(total.pop("pairs"), 1.0), total.pop("tokens")
    return {"tokens": tokens, **{name: v / pairs for name, v in total.items()}}
