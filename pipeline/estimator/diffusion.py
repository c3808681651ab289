"""Seeded masks and the masked-diffusion ELBO estimator (pure functions, no I/O).

For a response y of L tokens after a prompt p (the prompt is never masked), the
ELBO of a masked diffusion model with a linear schedule is

    B(y) = sum_{l=1..L} (1/l) * mean_{|M|=l} S(M),
    S(M) = sum_{i in M} log p(y_i | p, y with the positions M replaced by [MASK]).

Two unbiased Monte Carlo schemes are offered (docs/estimator.md, "The ELBO", "The l_over_L scheme" and
"The one_over_t scheme"):

``l_over_L`` (default, LLaDA's): mask count l in 1..L, positions uniform
    without replacement, term = (L/l) * S(M). The n counts of one draw are
    stratified: one uniform offset u, the points (u + k/n) mod 1, count
    floor(point * L) + 1. Each count is marginally uniform on 1..L (so the mean of
    the n terms stays unbiased) while the n counts cover 1..L evenly.
``one_over_t``: t in (eps, 1], each response position masked independently
    with probability t, term = S(M) / t. The n timesteps are stratified the same
    way (each marginally uniform on (eps, 1]). An empty mask is KEPT, with count 0
    and term exactly 0: S(empty) = 0 is the integrand's true value, so keeping it
    leaves the estimator unbiased for the eps-truncated integral, whereas
    resampling would bias it. ``elbo_terms`` sends no row to the model for it.

Masks depend on (global seed, pair_id, side, draw) only: ``mask_seed`` hashes
them and ``sample_masks`` draws from its own CPU ``torch.Generator``, never the
global RNG, the device, the batch or the process rank. Training replays the same
masks for the policy (antithetic sampling: docs/estimator.md, "Shared masks"), so caches store seeds, not masks.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Sequence

from pipeline.core.lazy import deferred

torch = deferred("torch")  # score-ref's config reads SCHEMES: its --help and flag errors skip torch

SCHEMES = ("l_over_L", "one_over_t")

BATCH_TOKENS = 16384
"""The default token budget of one forward pass (padded rows x length): score-ref's, train's and eval's, and the
budget of a cache whose manifest does not record one."""

_MASK63 = (1 << 63) - 1


def mask_seed(global_seed: int, pair_id: str, side: str, draw: int) -> int:
    """A stable 63-bit seed for one (pair, side, draw): the same in every process, platform and run.

    blake2b of an unambiguous encoding (unit-separator between the fields), not
    Python's ``hash`` (salted per process).
    """
    key = f"lldm-dpo/mask/v1\x1f{int(global_seed)}\x1f{pair_id}\x1f{side}\x1f{int(draw)}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") & _MASK63


PAIR_MASKS = ("independent", "shared")
"""How a pair's two responses draw their masks: each side from its own seed, or both from one seed per draw."""


def side_seed(global_seed: int, pair_id: str, side: str, draw: int, pair_masks: str = "independent") -> int:
    """The mask seed of one (pair, side, draw) under ``pair_masks``.

    ``shared`` gives chosen and rejected one seed per draw, hence the same timesteps and, where their lengths
    agree (responses EOS-padded to one length), the same masked positions: the tokens the two responses share
    then enter both ELBO estimates under the same masks, so their terms nearly cancel in the preference margin
    and in its gradient, which is left to the tokens that differ (docs/estimator.md, "Masks shared across the
    pair"). Each side's estimator is unchanged: only the two estimates' correlation is.
    """
    if pair_masks not in PAIR_MASKS:
        raise ValueError(f"pair_masks must be one of {', '.join(PAIR_MASKS)}, got {pair_masks!r}")
    return mask_seed(global_seed, pair_id, "pair" if pair_masks == "shared" else side, draw)


@dataclass(frozen=True)
class MaskSet:
    """The n Monte Carlo samples of one draw for one response of length L."""

    masks: torch.Tensor
    """Bool[n, L]: True where the response token is replaced by [MASK]."""
    counts: torch.Tensor
    """Long[n]: masked tokens per sample (1..L for l_over_L; 0..L for one_over_t)."""
    timesteps: torch.Tensor
    """Float[n]: l/L for l_over_L, t for one_over_t."""
    weights: torch.Tensor
    """Float64[n]: L/l for l_over_L, 1/t for one_over_t."""

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def _stratified_points(n: int, gen: torch.Generator) -> torch.Tensor:
    """n points in [0, 1): one uniform offset, evenly spaced, wrapped; each point marginally uniform."""
    u = torch.rand((), generator=gen, dtype=torch.float64)
    return torch.remainder(u + torch.arange(n, dtype=torch.float64) / n, 1.0)


def sample_masks(length: int, n: int, seed: int, scheme: str = "l_over_L", eps: float = 1e-3) -> MaskSet:
    """Draw the n masks of one draw for a response of ``length`` tokens from a generator seeded with ``seed``."""
    if length < 1:
        raise ValueError(f"sample_masks: response length must be >= 1, got {length}")
    if n < 1:
        raise ValueError(f"sample_masks: number of samples must be >= 1, got {n}")
    if scheme not in SCHEMES:
        raise ValueError(f"sample_masks: unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"sample_masks: eps must be in [0, 1), got {eps}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) & _MASK63)
    # Draw order is part of the reproducibility contract: offset first, then the
    # position keys. Changing it changes every cached mask.
    points = _stratified_points(n, gen)
    keys = torch.rand((n, length), generator=gen, dtype=torch.float64)
    if scheme == "l_over_L":
        counts = (torch.floor(points * length).long() + 1).clamp_(1, length)
        # Rank of each position's key within its row: the `count` smallest keys
        # form a uniformly random subset of exactly that size.
        ranks = keys.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        masks = ranks < counts[:, None]
        timesteps = counts.to(torch.float32) / length
        weights = length / counts.to(torch.float64)
    else:
        # t = 1 - (1 - eps) * point lies in (eps, 1]; uniform since point is.
        t = 1.0 - (1.0 - eps) * points
        masks = keys < t[:, None]
        counts = masks.sum(dim=1)
        timesteps = t.to(torch.float32)
        weights = 1.0 / t
    return MaskSet(masks=masks, counts=counts, timesteps=timesteps, weights=weights)


@dataclass
class ScoreRequest:
    """One response to score under n masks: the rows are prompt + masked response."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    masks: torch.Tensor
    """Bool[n, L] over the response positions."""
    weights: torch.Tensor
    """[n] per-sample weight (L/l or 1/t)."""

    def __post_init__(self) -> None:
        length = len(self.response_ids)
        if self.masks.dim() != 2 or self.masks.shape[1] != length:
            raise ValueError(f"ScoreRequest: masks must be [n, {length}] for a response of {length} tokens, "
                             f"got {list(self.masks.shape)}")
        if self.weights.shape != (self.masks.shape[0],):
            raise ValueError(f"ScoreRequest: weights must be [{self.masks.shape[0]}], got {list(self.weights.shape)}")


def masked_request(prompt_ids: Sequence[int], response_ids: Sequence[int], samples: int, seed: int, *,
                   scheme: str = "l_over_L", eps: float = 1e-3) -> tuple[ScoreRequest, MaskSet]:
    """The one way a response becomes a request to score: its ``samples`` masks drawn from ``seed``
    (``sample_masks`` over the response's length), the prompt unmasked. Every scorer builds its requests
    here (score-ref, the cache replay, eval, plan, the lm-eval model), so the same (response, seed, scheme)
    is the same request everywhere; the MaskSet comes back for what a caller records or checks."""
    ms = sample_masks(len(response_ids), samples, seed, scheme=scheme, eps=eps)
    return ScoreRequest(prompt_ids, response_ids, ms.masks, ms.weights), ms


def plan_batches(lengths: Sequence[int], batch_tokens: int | None) -> list[list[int]]:
    """Group row indices into batches sorted by length (longest first) with max_len * rows <= batch_tokens.

    A row longer than the budget gets a batch of its own. ``None`` means one batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_tokens is None:
        return [order] if order else []
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    batches: list[list[int]] = []
    for i in order:
        # Rows come longest first, so the batch's padded length is its first row's.
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _scored_rows(requests: Sequence[ScoreRequest]) -> tuple[list[tuple[int, int]], list[int]]:
    """The (request r, sample k) rows with at least one masked token, and each row's length."""
    rows = [(r, k) for r, req in enumerate(requests) for k, keep in enumerate(req.masks.any(dim=1).tolist()) if keep]
    return rows, [len(requests[r].prompt_ids) + len(requests[r].response_ids) for r, _ in rows]


def forward_batches(requests: Sequence[ScoreRequest], batch_tokens: int | None) -> list[list[int]]:
    """The row lengths of each module call ``elbo_terms`` makes for ``requests`` (its batch plan, unpadded)."""
    lengths = _scored_rows(requests)[1]
    return [[lengths[i] for i in batch] for batch in plan_batches(lengths, batch_tokens)]


def forward_calls(requests: Sequence[ScoreRequest], batch_tokens: int | None) -> int:
    """How many module calls ``elbo_terms`` makes for ``requests``: one per planned batch of non-empty rows."""
    return len(forward_batches(requests, batch_tokens))


def elbo_terms(model, requests: Sequence[ScoreRequest], *, mask_token_id: int, pad_token_id: int,
               batch_tokens: int | None = None, chunk_size: int = 4096,
               wanted: Sequence[bool] | None = None) -> list[torch.Tensor | None]:
    """Per request, the n terms weight_k * sum_{masked i} log p(y_i | prompt, masked response).

    Every (request, sample) row with a non-empty mask is laid out as prompt +
    masked response, rows are sorted by length and packed into right-padded
    batches of at most ``batch_tokens`` padded tokens (padding excluded from
    attention), and only masked positions go through the LM head
    (``pipeline.models.scoring.MaskedRowScorer``, one module call per batch;
    ``model`` may be that scorer already, wrapped by DDP or FSDP). Per-row sums are taken in float64 in a
    fixed order, so a request's terms do not depend on what it is batched with.
    Returns float64 tensors on the model's device; differentiable when grad is enabled.

    ``wanted`` (one flag per request) runs only the planned batches that hold a row of a wanted request, the
    plan made over all ``requests`` as without it: those batches are the very inputs the full pass feeds the
    model, so a wanted request's terms are the full pass's, bit for bit, at the cost of its own batches. So are
    the terms of every other request whose rows all fell in those batches (what was paid for is returned); the
    entry of a request with a row outside them is None.
    """
    # Imported on use: the models package is heavy and this module stays importable without it.
    from pipeline.models.scoring import as_row_scorer, reused_head_buffers

    scorer = as_row_scorer(model, chunk_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    rows, lengths = _scored_rows(requests)

    # Each request's ids and masks as CPU tensors once, not once per sample row.
    prompts = [torch.as_tensor(list(req.prompt_ids), dtype=torch.long) for req in requests]
    responses = [torch.as_tensor(list(req.response_ids), dtype=torch.long) for req in requests]
    cpu_masks = [req.masks.detach().to("cpu", torch.bool) for req in requests]

    row_ids: list[torch.Tensor] = []
    row_sums: list[torch.Tensor] = []
    batches = plan_batches(lengths, batch_tokens)
    covered = None
    if wanted is not None:
        batches = [batch for batch in batches if any(wanted[rows[i][0]] for i in batch)]
        ran = {i for batch in batches for i in batch}
        covered = [True] * len(requests)
        for i, (r, _) in enumerate(rows):
            covered[r] = covered[r] and i in ran
    with reused_head_buffers():  # the CPU head's buffers once for the pass, not once per batch
        for batch in batches:
            width = max(lengths[i] for i in batch)
            input_ids = torch.full((len(batch), width), int(pad_token_id), dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            index_parts: list[torch.Tensor] = []
            target_parts: list[torch.Tensor] = []
            for b, i in enumerate(batch):
                r, k = rows[i]
                plen = len(prompts[r])
                response = responses[r]
                mask = cpu_masks[r][k]
                input_ids[b, :plen] = prompts[r]
                input_ids[b, plen : plen + len(response)] = torch.where(mask, int(mask_token_id), response)
                attention_mask[b, : plen + len(response)] = 1
                pos = mask.nonzero().squeeze(1)
                index_parts.append(torch.stack([torch.full_like(pos, b), pos + plen], dim=1))
                target_parts.append(response[pos])
            # One module call: under DDP/FSDP the wrapper's forward covers body, head and sums.
            row_sums.append(scorer(input_ids.to(device), attention_mask.to(device), torch.cat(index_parts).to(device),
                                   torch.cat(target_parts).to(device), len(batch)))
            row_ids.append(torch.as_tensor(batch, dtype=torch.long))

    # Scatter the row sums back to request order; empty-mask rows stay exactly 0.
    offsets = [0, *itertools.accumulate(int(req.masks.shape[0]) for req in requests)]
    flat_index = [offsets[r] + k for r, k in rows]
    flat = torch.zeros(offsets[-1], dtype=torch.float64, device=device)
    if row_sums:
        src = torch.cat(row_sums).to(device)
        order = torch.cat(row_ids)
        dest = torch.as_tensor(flat_index, dtype=torch.long)[order].to(device)
        flat = flat.index_copy(0, dest, src)
    return [req.weights.to(device=device, dtype=torch.float64) * flat[offsets[r]:offsets[r + 1]]
            if covered is None or covered[r] else None for r, req in enumerate(requests)]
