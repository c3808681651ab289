"""LLaDA's sampler: semi-autoregressive blocks with low-confidence remasking.

Pure torch, no I/O. The procedure follows the published one
(shared/reference/llada.md, "Sampling"):

* the sequence is the prompt followed by ``gen_length`` mask tokens;
* the generation is cut into blocks of ``block_length`` filled left to right;
  ``steps`` are spread evenly over the blocks and, inside a block, the masked
  positions are committed at an even rate: with n masked and s steps, every
  step commits ``n // s`` and the first ``n % s`` steps one more;
* each step is one forward pass; the prediction is the argmax of the logits
  (with Gumbel noise in float64 when ``temperature > 0``); the confidence is
  the softmax probability of the predicted token ("low_confidence") or a
  uniform draw ("random"); only masked positions of the current block are
  candidates, and the most confident ones are committed;
* with ``cfg_scale > 0`` a second pass sees the prompt masked and the logits
  become ``un + (cfg_scale + 1) * (cond - un)``.

Differences from the published code, each for a reason:

* prompts of different lengths are LEFT padded with an attention mask, so the
  generation region starts at the same column for every row and a row's
  result does not depend on its batch neighbours (bidirectional attention
  with relative positions sees no difference);
* Gumbel noise is drawn per row from that row's own ``torch.Generator`` (when
  a list is given) and only for the current block, so seeded sampling does
  not change with batch composition and never touches the global RNG;
* ``argmax(exp(l) / (-log u) ** T)`` is computed in its log form
  ``l - T * log(-log u)`` (same argmax, no overflow of ``exp`` in float64);
* the mask token is never the prediction (a committed [MASK] would be a hole
  that the step schedule never fills); confidences still use the full
  softmax;
* with a model exposing ``final_hidden`` and ``get_output_embeddings`` the LM
  head runs on the current block only, not on every position.

Fast-dLLM's two accelerations are available, both off by default (the exact
sampler above stays the reference):

* ``cache="prefix"``: at the first step of each block one full forward pass
  also returns every layer's keys and values; the block's later steps run
  the current block and everything after it only, attending to the cached
  keys and values of the prompt and the committed blocks. ``cache="dual"``
  runs the current block only and takes the suffix's (still masked) keys and
  values from the cache too. Approximate: the cached part is not updated as
  the block fills in, until the next block. Needs a model with
  ``hidden_with_kv`` (the native LLaDA); other models take the exact path
  with a one-line warning.
* ``threshold=t``: each step commits every masked position of the current
  block whose confidence exceeds t, and at least ``ceil(masked left / steps
  left)`` of the most confident ones, so every step commits one or more and
  the block is done within its share of ``steps``; a block stops early once
  filled. With t > 1 nothing exceeds it and the commits are exactly the
  fixed schedule's.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pipeline.core.lazy import deferred, no_grad

if TYPE_CHECKING:
    from torch import Tensor

torch = deferred("torch")  # the configs read the sampler's names and checks: their --help skips torch

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
SAMPLER_DEFAULTS = {"cache": "none", "threshold": None}
"""The fast-sampling settings of the exact sampler (what a record made before they existed was made with)."""


# --- small pure helpers ------------------------------------------------------


def num_transfer_tokens(n_masked: Tensor, steps: int) -> Tensor:
    """Tokens to commit at each of ``steps`` steps, per row: Long[B, steps].

    ``n_masked`` Long[B]. Every step gets ``n // steps``; the remainder goes one
    each to the first steps, so the row sums equal ``n_masked`` exactly.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    n_masked = n_masked.to(torch.long).reshape(-1)
    base = torch.div(n_masked, steps, rounding_mode="floor")
    remainder = n_masked - base * steps
    step_index = torch.arange(steps, device=n_masked.device)
    return base[:, None] + (step_index[None, :] < remainder[:, None]).to(torch.long)


def commit_counts(n_masked: Tensor, steps_left: int, n_above: Tensor) -> Tensor:
    """Tokens to commit at one step of threshold decoding, per row: Long[B].

    ``max(n_above, ceil(n_masked / steps_left))``, at most ``n_masked``: every
    row with masked positions left commits at least one, and the block is full
    after ``steps_left`` more steps. With ``n_above`` 0 throughout this is the
    fixed schedule of ``num_transfer_tokens``.
    """
    if steps_left <= 0:
        raise ValueError(f"steps_left must be positive, got {steps_left}")
    n_masked = n_masked.to(torch.long)
    need = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")
    return torch.minimum(torch.maximum(n_above.to(torch.long), need), n_masked)


def check_fast_settings(cache: str, threshold: float | None, remasking: str) -> None:
    """``ValueError`` for a cache mode or threshold the sampler does not take."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if threshold is not None:
        if not 0 < threshold < float("inf"):
            raise ValueError(f"threshold must be a number > 0 (or unset for the fixed schedule), got {threshold}")
        if remasking != "low_confidence":
            raise ValueError("threshold decoding compares softmax confidences: it needs remasking low_confidence")


def supports_kv_cache(model: Any) -> bool:
    """Whether the sampler can run ``model`` with the approximate KV cache (the native LLaDA can)."""
    return (callable(getattr(model, "hidden_with_kv", None)) and callable(getattr(model, "get_output_embeddings", None))
            and not bool(getattr(model, "logits_shift", False)))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: Any = None) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists to one length: (input_ids Long[B, P], attention_mask Long[B, P])."""
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            attn[row, width - len(prompt) :] = 1
    return ids.to(device), attn.to(device)


def trim_at_stop(tokens: Sequence[int] | Tensor, stop_token_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (EOS, ``<|eot_id|>``, ...)."""
    stops = {int(t) for t in stop_token_ids}
    return list(itertools.takewhile(lambda t: t not in stops,
                                    map(int, tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)))


def check_schedule(gen_length: int, block_length: int, steps: int) -> None:
    """The published sampler's constraints, as ``ValueError`` with the numbers."""
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(
            f"gen_length, block_length and steps must be positive (got {gen_length}, {block_length}, {steps})"
        )
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {blocks} (gen_length / block_length)")


# --- the model call ------------------------------------------------------------


def _block_logits(
    model: Any, input_ids: Tensor, attention_mask: Tensor | None, start: int, end: int, shift: bool
) -> Tensor:
    """Logits for positions [start, end) as float32 [B, end - start, V].

    With ``shift`` (Dream-style models) position i is predicted from position
    i - 1. Models with ``final_hidden`` + ``get_output_embeddings`` get the head
    applied on the block rows only (LLaDA's head is 126k wide).
    """
    lo, hi = (start - 1, end - 1) if shift else (start, end)
    if lo < 0:
        raise ValueError("a model with shifted logits needs a non-empty prompt")
    final_hidden = getattr(model, "final_hidden", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(final_hidden) and callable(get_head) else None
    if head is not None:
        hidden = final_hidden(input_ids, attention_mask=attention_mask)
        logits = head(hidden[:, lo:hi])
    else:
        out = model(input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits[:, lo:hi]
    return logits.float()


def _cached_block_logits(model: Any, input_ids: Tensor, attention_mask: Tensor | None, start: int, end: int,
                         cache: str, kv: list | None) -> tuple[Tensor, list]:
    """Logits for [start, end) with the approximate KV cache; ``kv`` None: a full pass that refreshes it."""
    head = model.get_output_embeddings()
    if kv is None:
        hidden, kv = model.hidden_with_kv(input_ids, attention_mask)
        return head(hidden[:, start:end]).float(), kv
    hi = input_ids.shape[1] if cache == "prefix" else end
    hidden, _ = model.hidden_with_kv(input_ids[:, start:hi], attention_mask, kv_cache=kv, start=start)
    return head(hidden[:, : end - start]).float(), kv


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


# --- the sampler ------------------------------------------------------------------


@no_grad
def generate(
    model: Callable[..., Any],
    prompts: Sequence[Sequence[int]],
    *,
    mask_token_id: int,
    pad_token_id: int,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    logits_shift: bool | None = None,
    device: Any = None,
    cache: str = "none",
    threshold: float | None = None,
) -> Tensor:
    """Sample ``gen_length`` tokens after each prompt; returns Long[B, gen_length].

    ``model`` is an nn.Module with the models contract (``model(ids,
    attention_mask=...)`` -> ``.logits``; ``final_hidden`` optional) or any
    callable ``fn(input_ids, attention_mask=...) -> logits``. ``prompts`` are
    token-id lists of any lengths. ``generator`` is one ``torch.Generator``
    for the whole batch, or one per row (results then independent of the
    batch); ``None`` means a fresh generator seeded 0 (never the global RNG).
    Stop tokens are not cut here: see ``trim_at_stop``. ``cache`` and
    ``threshold``: Fast-dLLM's KV cache and parallel decoding (module docstring).
    """
    check_schedule(gen_length, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
    check_fast_settings(cache, threshold, remasking)
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature and cfg_scale must be >= 0 (got {temperature}, {cfg_scale})")
    if not len(prompts):
        return torch.zeros((0, gen_length), dtype=torch.long)
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    shift = bool(getattr(model, "logits_shift", False)) if logits_shift is None else logits_shift
    if cache != "none" and (shift or not supports_kv_cache(model)):
        warnings.warn(f"sampler: {type(model).__name__} has no KV cache support; cache={cache!r} falls back to "
                      "the exact path", stacklevel=2)
        cache = "none"

    batch = len(prompts)
    prompt_ids, prompt_attn = left_pad(prompts, pad_token_id, device)
    width = prompt_ids.shape[1]
    x = torch.cat([prompt_ids, torch.full((batch, gen_length), mask_token_id, dtype=torch.long, device=device)], 1)
    attn = torch.cat([prompt_attn, torch.ones((batch, gen_length), dtype=torch.long, device=device)], 1)
    # Explicit mask state (not ``x == mask_id``): a prompt may legitimately
    # contain the mask token, and it is never a candidate.
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, width:] = True

    if cfg_scale > 0:
        # The unconditional pass: real prompt tokens masked, padding stays padding.
        x_un_prompt = torch.where(prompt_attn.bool(), torch.full_like(prompt_ids, mask_token_id), prompt_ids)

    # Without padding the mask is all ones: pass None so attention can take its
    # unmasked fast path (flash kernels on GPU).
    if bool(attn.all()):
        attn = None

    if isinstance(generator, torch.Generator) or generator is None:
        shared_gen = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
        row_gens = None
    else:
        row_gens = list(generator)
        if len(row_gens) != batch:
            raise ValueError(f"got {len(row_gens)} generators for {batch} prompts")

    n_blocks = gen_length // block_length
    steps_per_block = steps // n_blocks
    for block in range(n_blocks):
        start = width + block * block_length
        end = start + block_length
        schedule = num_transfer_tokens(masked[:, start:end].sum(1), steps_per_block)
        kv = None  # the approximate cache is refreshed by the first pass of every block
        for step in range(steps_per_block):
            block_masked = masked[:, start:end]
            if threshold is None:
                k = schedule[:, step]
                if not bool((k > 0).any()):
                    continue  # nothing to commit anywhere: the forward pass would be wasted
                active = None
            else:
                left = block_masked.sum(1)
                active = left > 0
                if not bool(active.any()):
                    break  # the block is full in every row
            ids, ids_attn = x, attn
            if cfg_scale > 0:  # the conditional rows, then the unconditional ones
                ids = torch.cat([x, torch.cat([x_un_prompt, x[:, width:]], 1)])
                ids_attn = None if attn is None else torch.cat([attn, attn])
            if cache == "none":
                logits = _block_logits(model, ids, ids_attn, start, end, shift)
            else:
                logits, kv = _cached_block_logits(model, ids, ids_attn, start, end, cache, kv)
            if cfg_scale > 0:
                cond, un = logits[:batch], logits[batch:]
                logits = un + (cfg_scale + 1.0) * (cond - un)

            choice_logits = logits.clone()
            if 0 <= mask_token_id < logits.shape[-1]:
                choice_logits[..., mask_token_id] = float("-inf")
            if temperature > 0:
                if row_gens is None:
                    u = _uniform(tuple(logits.shape), shared_gen, device, torch.float64)
                else:
                    # A row whose block is full draws nothing, so its noise stream does not depend on how
                    # many steps its neighbours still need (threshold decoding).
                    shape = tuple(logits.shape[1:])
                    u = torch.stack([_uniform(shape, g, device, torch.float64)
                                     if active is None or bool(active[r]) else torch.full(shape, 0.5, device=device,
                                                                                          dtype=torch.float64)
                                     for r, g in enumerate(row_gens)])
                # log of exp(l) / (-log u)^T: argmax-equivalent, overflow-free.
                scores = choice_logits.double() - temperature * torch.log(-torch.log(u))
                pred = scores.argmax(-1)
            else:
                pred = choice_logits.argmax(-1)

            if remasking == "low_confidence":
                logp = torch.log_softmax(logits, dim=-1)
                confidence = logp.gather(-1, pred[..., None]).squeeze(-1).exp().double()
            elif row_gens is None:
                confidence = _uniform((batch, block_length), shared_gen, device, torch.float64)
            else:
                confidence = torch.stack([_uniform((block_length,), g, device, torch.float64) for g in row_gens])

            confidence = confidence.masked_fill(~block_masked, float("-inf"))
            if threshold is not None:
                k = commit_counts(left, steps_per_block - step, (confidence > threshold).sum(1))
            # Stable descending order: ties go to the leftmost position, on every device.
            order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(block_length, device=device).expand(batch, -1))
            commit = (rank < k[:, None]) & block_masked

            x[:, start:end] = torch.where(commit, pred, x[:, start:end])
            masked[:, start:end] = block_masked & ~commit
    return x[:, width:].clone()
