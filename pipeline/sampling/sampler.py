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

* ``kv_cache="prefix"``: at the first step of each block one full forward pass
  also returns every layer's keys and values; the block's later steps run
  the current block and everything after it only, attending to the cached
  keys and values of the prompt and the committed blocks. ``kv_cache="dual"``
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pipeline.core.lazy import deferred, no_grad
from pipeline.sampling.args import SamplingArgs, sampling_args

if TYPE_CHECKING:
    from torch import Tensor

torch = deferred("torch")  # imported by the first sampling call, not by the configs that import this package



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
                         kv_cache: str, kv: list | None) -> tuple[Tensor, list]:
    """Logits for [start, end) with the approximate KV cache; ``kv`` None: a full pass that refreshes it."""
    head = model.get_output_embeddings()
    if kv is None:
        hidden, kv = model.hidden_with_kv(input_ids, attention_mask)
        return head(hidden[:, start:end]).float(), kv
    hi = input_ids.shape[1] if kv_cache == "prefix" else end
    hidden, _ = model.hidden_with_kv(input_ids[:, start:hi], attention_mask, kv_cache=kv, start=start)
    return head(hidden[:, : end - start]).float(), kv


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


# --- the sampler ------------------------------------------------------------------


@no_grad
def generate(
    model: Callable[..., Any],
    prompts: Sequence[Sequence[int]],
    args: SamplingArgs | None = None,
    *,
    mask_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    logits_shift: bool | None = None,
    device: Any = None,
    **settings: Any,
) -> Tensor:
    """Sample ``args.gen_length`` tokens after each prompt; returns Long[B, gen_length].

    ``model`` is an nn.Module with the models contract (``model(ids,
    attention_mask=...)`` -> ``.logits``; ``final_hidden`` optional) or any
    callable ``fn(input_ids, attention_mask=...) -> logits``. ``prompts`` are
    token-id lists of any lengths. ``args``: the sampler's settings
    (``SamplingArgs``: schedule, temperature, remasking, cfg_scale, and
    Fast-dLLM's ``kv_cache`` and ``threshold``, module docstring); keyword
    ``settings`` name a few of its fields instead (``cache`` is ``kv_cache``'s
    old name). ``generator`` is one ``torch.Generator`` for the whole batch,
    or one per row (results then independent of the batch); ``None`` means a
    fresh generator seeded 0 (never the global RNG). Stop tokens are not cut
    here: see ``trim_at_stop``.
    """
    args = sampling_args(args, settings)
    if not len(prompts):
        return torch.zeros((0, args.gen_length), dtype=torch.long)
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    shift = bool(getattr(model, "logits_shift", False)) if logits_shift is None else logits_shift
    kv_cache = args.kv_cache
    if kv_cache != "none" and (shift or not supports_kv_cache(model)):
        warnings.warn(f"sampler: {type(model).__name__} has no KV cache support; kv_cache={kv_cache!r} falls back "
                      "to the exact path", stacklevel=2)
        kv_cache = "none"
    canvas = _Canvas.start(prompts, args.gen_length, mask_token_id, pad_token_id, device, args.cfg_scale > 0)
    noise = _Noise.of(generator, len(prompts), device)
    run = _Run(model, args, canvas, noise, mask_token_id, shift, kv_cache, device)
    for block in range(args.gen_length // args.block_length):
        run.fill_block(canvas.width + block * args.block_length)
    return canvas.x[:, canvas.width:].clone()


@dataclass
class _Canvas:
    """The sequences being filled: prompt (left padded) then the generation, which positions are still masked,
    and the attention mask (None without padding)."""

    x: Tensor
    attn: Tensor | None
    masked: Tensor
    width: int
    """Columns of the (padded) prompt: the generation starts here in every row."""
    un_prompt: Tensor | None
    """With classifier-free guidance: the prompt with its real tokens masked (the unconditional pass's)."""

    @classmethod
    def start(cls, prompts: Sequence[Sequence[int]], gen_length: int, mask_token_id: int, pad_token_id: int,
              device: Any, guided: bool) -> "_Canvas":
        batch = len(prompts)
        prompt_ids, prompt_attn = left_pad(prompts, pad_token_id, device)
        width = prompt_ids.shape[1]
        x = torch.cat([prompt_ids, torch.full((batch, gen_length), mask_token_id, dtype=torch.long, device=device)],
                      1)
        attn = torch.cat([prompt_attn, torch.ones((batch, gen_length), dtype=torch.long, device=device)], 1)
        # Explicit mask state (not ``x == mask_id``): a prompt may legitimately
        # contain the mask token, and it is never a candidate.
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[:, width:] = True
        # The unconditional pass: real prompt tokens masked, padding stays padding.
        un_prompt = (torch.where(prompt_attn.bool(), torch.full_like(prompt_ids, mask_token_id), prompt_ids)
                     if guided else None)
        # Without padding the mask is all ones: pass None so attention can take its
        # unmasked fast path (flash kernels on GPU).
        return cls(x, None if bool(attn.all()) else attn, masked, width, un_prompt)

    def model_input(self) -> tuple[Tensor, Tensor | None]:
        """(ids, attention mask) of one pass: the rows, then (with guidance) their unconditional copies."""
        if self.un_prompt is None:
            return self.x, self.attn
        ids = torch.cat([self.x, torch.cat([self.un_prompt, self.x[:, self.width:]], 1)])
        return ids, None if self.attn is None else torch.cat([self.attn, self.attn])


@dataclass
class _Noise:
    """Where the random draws come from: one generator for the batch, or one per row."""

    shared: torch.Generator | None
    rows: list | None

    @classmethod
    def of(cls, generator: Any, batch: int, device: Any) -> "_Noise":
        if isinstance(generator, torch.Generator) or generator is None:
            return cls(generator if generator is not None else torch.Generator(device=device).manual_seed(0), None)
        rows = list(generator)
        if len(rows) != batch:
            raise ValueError(f"got {len(rows)} generators for {batch} prompts")
        return cls(None, rows)

    def gumbel_uniform(self, shape: tuple[int, ...], active: Tensor | None, device: Any) -> Tensor:
        """Uniform draws for the Gumbel noise, float64 of ``shape`` [B, L, V]."""
        if self.rows is None:
            return _uniform(shape, self.shared, device, torch.float64)
        # A row whose block is full draws nothing, so its noise stream does not depend on how
        # many steps its neighbours still need (threshold decoding).
        row_shape = tuple(shape[1:])
        return torch.stack([_uniform(row_shape, g, device, torch.float64)
                            if active is None or bool(active[r]) else torch.full(row_shape, 0.5, device=device,
                                                                                 dtype=torch.float64)
                            for r, g in enumerate(self.rows)])

    def confidence(self, batch: int, block_length: int, device: Any) -> Tensor:
        """Random remasking's confidences, float64 [B, block_length]."""
        if self.rows is None:
            return _uniform((batch, block_length), self.shared, device, torch.float64)
        return torch.stack([_uniform((block_length,), g, device, torch.float64) for g in self.rows])


@dataclass
class _Run:
    """One ``generate`` call: fills the canvas block by block."""

    model: Any
    args: SamplingArgs
    canvas: _Canvas
    noise: _Noise
    mask_token_id: int
    shift: bool
    kv_cache: str
    device: Any

    def fill_block(self, start: int) -> None:
        """The block at columns [start, start + block_length): its share of the steps, each committing the most
        confident masked positions (the fixed schedule, or threshold decoding)."""
        args, canvas = self.args, self.canvas
        end = start + args.block_length
        steps_per_block = args.steps // (args.gen_length // args.block_length)
        schedule = num_transfer_tokens(canvas.masked[:, start:end].sum(1), steps_per_block)
        kv = None  # the approximate cache is refreshed by the first pass of every block
        for step in range(steps_per_block):
            block_masked = canvas.masked[:, start:end]
            if args.threshold is None:
                k = schedule[:, step]
                if not bool((k > 0).any()):
                    continue  # nothing to commit anywhere: the forward pass would be wasted
                active = left = None
            else:
                left = block_masked.sum(1)
                active = left > 0
                if not bool(active.any()):
                    break  # the block is full in every row
            logits, kv = self.logits(start, end, kv)
            pred = self.predict(logits, active)
            confidence = self.confidence(logits, pred).masked_fill(~block_masked, float("-inf"))
            if args.threshold is not None:
                k = commit_counts(left, steps_per_block - step, (confidence > args.threshold).sum(1))
            self.commit(start, end, pred, confidence, k, block_masked)

    def logits(self, start: int, end: int, kv: list | None) -> tuple[Tensor, list | None]:
        """The block's logits (guided when cfg_scale > 0), and the KV cache for the block's next steps."""
        ids, ids_attn = self.canvas.model_input()
        if self.kv_cache == "none":
            logits = _block_logits(self.model, ids, ids_attn, start, end, self.shift)
        else:
            logits, kv = _cached_block_logits(self.model, ids, ids_attn, start, end, self.kv_cache, kv)
        if self.args.cfg_scale > 0:
            batch = self.canvas.x.shape[0]
            cond, un = logits[:batch], logits[batch:]
            logits = un + (self.args.cfg_scale + 1.0) * (cond - un)
        return logits, kv

    def predict(self, logits: Tensor, active: Tensor | None) -> Tensor:
        """Each position's token: the argmax, with Gumbel noise when temperature > 0; never the mask token."""
        choice_logits = logits.clone()
        if 0 <= self.mask_token_id < logits.shape[-1]:
            choice_logits[..., self.mask_token_id] = float("-inf")
        temperature = self.args.temperature
        if temperature <= 0:
            return choice_logits.argmax(-1)
        u = self.noise.gumbel_uniform(tuple(logits.shape), active, self.device)
        # log of exp(l) / (-log u)^T: argmax-equivalent, overflow-free.
        scores = choice_logits.double() - temperature * torch.log(-torch.log(u))
        return scores.argmax(-1)

    def confidence(self, logits: Tensor, pred: Tensor) -> Tensor:
        """float64 [B, block]: the prediction's softmax probability, or a uniform draw (random remasking)."""
        if self.args.remasking == "low_confidence":
            logp = torch.log_softmax(logits, dim=-1)
            return logp.gather(-1, pred[..., None]).squeeze(-1).exp().double()
        return self.noise.confidence(self.canvas.x.shape[0], self.args.block_length, self.device)

    def commit(self, start: int, end: int, pred: Tensor, confidence: Tensor, k: Tensor, block_masked: Tensor) -> None:
        """Commit the ``k`` most confident masked positions of each row."""
        # Stable descending order: ties go to the leftmost position, on every device.
        order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(self.args.block_length, device=self.device).expand(order.shape[0], -1))
        commit = (rank < k[:, None]) & block_masked
        canvas = self.canvas
        canvas.x[:, start:end] = torch.where(commit, pred, canvas.x[:, start:end])
        canvas.masked[:, start:end] = block_masked & ~commit
