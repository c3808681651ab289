"""Completions in memory with LLaDA's sampler: what ``generate`` writes and ``eval`` scores.

Each prompt's noise comes from its own generator seeded by (seed, index), and
batches are left padded, so a completion depends neither on the batch size nor
on its neighbours.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import torch

from pipeline.errors import UserError
from pipeline.prompts import encode_prompt, resolve_chat_template
from pipeline.sampler import generate, trim_at_stop

STOP_TOKENS = ("<|eot_id|>",)
"""Stop tokens besides the tokenizer's EOS, used when the vocabulary has them."""


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in STOP_TOKENS if t in vocab]
    return sorted(set(ids))


def prompt_seed(seed: int, index: int) -> int:
    """The noise seed of prompt ``index``: a stable 63-bit hash."""
    digest = hashlib.sha256(f"lldm-dpo/generate/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def complete(
    model,
    tokenizer,
    prompts: Sequence[Any],
    *,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    seed: int = 0,
    chat_template: Optional[bool] = None,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    cache: str = "none",
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Sample a completion for each prompt (text or messages), in memory.

    Returns one dict per prompt in the given order: ``index``, ``completion``,
    ``completion_tokens``, ``stopped``. ``indices`` (default 0..n-1) seed each
    prompt's noise; ``on_batch`` receives each batch's results as they finish.
    Prompts are rendered by ``pipeline.prompts`` (``chat_template`` None: the tokenizer's default).
    ``cache`` and ``threshold``: the sampler's Fast-dLLM settings (``pipeline.sampler``).
    """
    indices = list(range(len(prompts))) if indices is None else list(indices)
    device = next(model.parameters()).device
    mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    chat_template = resolve_chat_template(tokenizer, chat_template)
    encoded = [encode_prompt(tokenizer, p, chat_template=chat_template, where=f"prompt {i}")
               for p, i in zip(prompts, indices)]
    limit = getattr(getattr(model, "config", None), "max_sequence_length", None)
    if isinstance(limit, int):
        for ids, i in zip(encoded, indices):
            if len(ids) + gen_length > limit:
                raise UserError(
                    f"prompt {i}: {len(ids)} tokens + gen_length {gen_length} exceed the model's "
                    f"max_sequence_length {limit}"
                )
    # Longest first, so each batch holds similar lengths (little padding) and
    # an out-of-memory shows up in the first batch.
    order = sorted(range(len(prompts)), key=lambda j: -len(encoded[j]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        generators = [torch.Generator(device=device).manual_seed(prompt_seed(seed, indices[j])) for j in chunk]
        tokens = generate(
            model, [encoded[j] for j in chunk], mask_token_id=mask_id, pad_token_id=pad_id,
            gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
            remasking=remasking, cfg_scale=cfg_scale, generator=generators, device=device, cache=cache,
            threshold=threshold,
        ).cpu()
        batch_results = []
        for j, row in zip(chunk, tokens):
            kept = trim_at_stop(row, stops)
            results[j] = {
                "index": indices[j],
                "completion": tokenizer.decode(kept, skip_special_tokens=True),
                "completion_tokens": len(kept),
                "stopped": len(kept) < gen_length,
            }
            batch_results.append(results[j])
        if on_batch is not None:
            on_batch(batch_results)
    return results  # type: ignore[return-value]
