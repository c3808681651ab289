"""Masked-diffusion supervised fine-tuning: LLaDA's SFT objective as pure functions (no I/O).

For one example, a prompt p and a response y = (y_1..y_L) (ending with EOS):

    t ~ U(eps, 1]                      one timestep per sequence (eps = 1e-3)
    M = {i : u_i < t}, u_i ~ U[0, 1)   each response token masked independently with probability t;
                                       the prompt is never masked
    loss(y) = -(1 / (t * L)) * sum_{i in M} log p_theta(y_i | p, y with M replaced by [MASK])

and a batch's loss is the mean of ``loss(y)`` over its sequences (LLaDA's guidelines: the masked
cross-entropy divided by t, summed, divided by the response length, averaged over the batch).

Choices, each for a reason:

- Normalised by the response length L of each sequence (LLaDA's ``answer_lengths``), not by the
  number of masked tokens: dividing by |M| would weight a sequence's tokens by 1/|M| and no longer be
  the ELBO's estimator; dividing by L makes ``E[loss(y)] = -B_eps(y) / L``, the per-token negative
  ELBO (docs/estimator.md, "The SFT objective"), so long and short responses weigh the same per token.
- Padding is not part of the response: it is excluded from attention and never a target, and L counts
  the response's own tokens (its EOS included). LLaDA's released SFT pads with EOS and counts the pad
  as response; ``tokenize_completion``'s ``pad_to`` gives that behaviour explicitly when wanted.
- An empty mask (probability (1-t)^L) is kept: its loss is exactly 0, the integrand's true value, so
  the estimator stays unbiased for the eps-truncated integral (as ``diffusion.py``'s 1/t scheme).
- Masks come from a CPU ``torch.Generator`` seeded by (seed, example, epoch) alone
  (``diffusion.mask_seed``), so a run's masks do not depend on the batch, the process count or the
  global RNG: runs are deterministic and a resumed run draws what the uninterrupted one drew.
- The LM head runs on the masked rows only (``MaskedRowScorer``: one module call, so DDP and FSDP see
  one forward); full-vocabulary logits at every position are never formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.estimator.diffusion import mask_seed
from pipeline.models.scoring import as_row_scorer

EPS = 1e-3
"""The floor of the timestep: t ~ U(eps, 1] (LLaDA's 1e-3)."""

SIDE = "sft"
"""The ``side`` field of ``mask_seed`` for SFT masks (distinct from a pair's chosen/rejected masks)."""


@dataclass(frozen=True)
class SFTBatch:
    """Sequences laid out as prompt + response + right padding, unmasked."""

    input_ids: torch.Tensor
    """Long[B, W]: prompt, then response, then pad tokens."""
    attention_mask: torch.Tensor
    """Long[B, W]: 1 on prompt and response, 0 on padding."""
    prompt_len: torch.Tensor
    """Long[B]."""
    response_len: torch.Tensor
    """Long[B] (>= 1)."""

    def response_positions(self) -> torch.Tensor:
        """Bool[B, W]: True on response tokens (never prompt or padding)."""
        cols = torch.arange(self.input_ids.shape[1])[None, :]
        start = self.prompt_len[:, None]
        return (cols >= start) & (cols < start + self.response_len[:, None])


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int) -> SFTBatch:
    """(prompt ids, response ids) pairs -> one right-padded ``SFTBatch``."""
    if not examples:
        raise ValueError("collate: no examples")
    lengths = [len(p) + len(r) for p, r in examples]
    width = max(lengths)
    ids = torch.full((len(examples), width), int(pad_token_id), dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for b, (p, r) in enumerate(examples):
        if not len(r):
            raise ValueError(f"collate: example {b} has an empty response")
        ids[b, : lengths[b]] = torch.as_tensor([*p, *r], dtype=torch.long)
        attn[b, : lengths[b]] = 1
    return SFTBatch(ids, attn, torch.tensor([len(p) for p, _ in examples]), torch.tensor([len(r) for _, r in examples]))


def draw_mask(length: int, seed: int, eps: float = EPS) -> tuple[float, torch.Tensor]:
    """(t, Bool[length]) for one response: t = 1 - (1 - eps) u with u ~ U[0, 1) (so t in (eps, 1]), then
    each position masked when its own uniform key is below t. Draw order (u first, then the keys) is part
    of the reproducibility contract."""
    if length < 1:
        raise ValueError(f"draw_mask: response length must be >= 1, got {length}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"draw_mask: eps must be in [0, 1), got {eps}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    t = 1.0 - (1.0 - eps) * u
    keys = torch.rand(length, generator=gen, dtype=torch.float64)
    return t, keys < t


def draw_masks(batch: SFTBatch, example_ids: Sequence[int], *, seed: int, epoch: int,
               eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(t Float64[B], mask Bool[B, W]) for a batch: each row's draw seeded by (seed, example id, epoch) only."""
    width = batch.input_ids.shape[1]
    ts = torch.empty(len(example_ids), dtype=torch.float64)
    mask = torch.zeros((len(example_ids), width), dtype=torch.bool)
    for b, ex in enumerate(example_ids):
        plen, rlen = int(batch.prompt_len[b]), int(batch.response_len[b])
        t, m = draw_mask(rlen, mask_seed(seed, str(int(ex)), SIDE, epoch), eps)
        ts[b] = t
        mask[b, plen : plen + rlen] = m
    return ts, mask


def masked_inputs(batch: SFTBatch, mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The model's input: masked positions replaced by [MASK] (only response positions may be masked)."""
    if bool((mask & ~batch.response_positions()).any()):
        raise ValueError("masked_inputs: a mask covers a prompt or padding position")
    return torch.where(mask, int(mask_token_id), batch.input_ids)


def sequence_losses(logp_sums: torch.Tensor, t: torch.Tensor, response_len: torch.Tensor) -> torch.Tensor:
    """Per sequence -(1 / (t * L)) * sum of log p over its masked positions (float64)."""
    t = t.to(device=logp_sums.device, dtype=torch.float64)
    length = response_len.to(device=logp_sums.device, dtype=torch.float64)
    return -logp_sums.to(torch.float64) / (t * length)


def masked_logp_sums(model, batch: SFTBatch, mask: torch.Tensor, mask_token_id: int,
                     chunk_size: int = 4096) -> torch.Tensor:
    """Float64[B]: per sequence, the sum of log p(y_i) over its masked positions; the head on those rows
    only. ``model`` is a model or a (DDP/FSDP-wrapped) ``MaskedRowScorer``: one module call."""
    scorer = as_row_scorer(model, chunk_size)
    device = next(iter(scorer.parameters())).device
    inputs = masked_inputs(batch, mask, mask_token_id)
    index = mask.nonzero()  # [N, 2] (row, position), row-major: a fixed order
    targets = batch.input_ids[index[:, 0], index[:, 1]]
    padded = not bool(batch.attention_mask.all())
    attn = batch.attention_mask.to(device) if padded else None  # no padding: no mask (SDPA's fast kernels)
    return scorer(inputs.to(device), attn, index.to(device), targets.to(device), inputs.shape[0])


def sft_loss(model, batch: SFTBatch, t: torch.Tensor, mask: torch.Tensor, mask_token_id: int,
             chunk_size: int = 4096) -> torch.Tensor:
    """Per-sequence SFT losses (float64 [B], differentiable); the batch loss is their mean."""
    sums = masked_logp_sums(model, batch, mask, mask_token_id, chunk_size)
    return sequence_losses(sums, t, batch.response_len)

