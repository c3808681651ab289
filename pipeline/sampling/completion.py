"""Completions in memory with LLaDA's sampler: what ``generate`` writes and ``eval`` scores.

Each prompt's noise comes from its own generator seeded by (seed, index), and
batches are left padded, so a completion depends neither on the batch size nor
on its neighbours.

Also what ``generate`` and ``make-pairs`` share: the model options' checks
(the sampler's own are ``SamplingArgs``'), the settings each output row stores,
the model load, and their resumable JSONL outputs (rows streamed to a partial
file, checked against this run on resume; a row's ``cache`` is the old name of
its ``kv_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

import pipeline.models.numerics as numerics
from pipeline.core.atomic import write_text_atomic
from pipeline.core.config import check_device, require, require_choice
from pipeline.core.devices import DTYPE_NAMES, resolve_device
from pipeline.core.errors import UserError
from pipeline.core.lazy import deferred
from pipeline.data.prompts import encode_prompt, resolve_chat_template
from pipeline.sampling.args import OLD_NAMES, SamplingArgs, sampling_args
from pipeline.sampling.sampler import generate, trim_at_stop

torch = deferred("torch")  # generate's and make-pairs' configs read the checks here: their --help skips torch

STOP_TOKENS = ("<|eot_id|>",)
"""Stop tokens besides the tokenizer's EOS, used when the vocabulary has them."""


def special_ids(model, tokenizer) -> tuple[int, int, list[int]]:
    """(mask, pad, stop token ids) the sampler runs with: the model config's mask id before the tokenizer's,
    EOS as padding when there is no pad token, EOS and ``STOP_TOKENS`` as stops."""
    mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    return mask_id, pad_id, sorted(set(stops + [vocab[t] for t in STOP_TOKENS if t in vocab]))


def sample_batch(model, tokenizer, prompts: Sequence[list[int]], seeds: Sequence[int],
                 ids: tuple[int, int, list[int]], args: SamplingArgs) -> list[dict[str, Any]]:
    """One batch of encoded prompts through the sampler with ``args`` (``ids``: ``special_ids``), each row's
    noise from its own generator seeded by ``seeds``: per row ``completion`` (cut at the first stop token),
    ``completion_tokens`` and ``stopped``."""
    (mask_id, pad_id, stops), device = ids, next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    tokens = generate(model, list(prompts), args, mask_token_id=mask_id, pad_token_id=pad_id, generator=generators,
                      device=device).cpu()
    kept = [trim_at_stop(row, stops) for row in tokens]
    return [{"completion": tokenizer.decode(k, skip_special_tokens=True), "completion_tokens": len(k),
             "stopped": len(k) < args.gen_length} for k in kept]


def prompt_seed(seed: int, index: int) -> int:
    """The noise seed of prompt ``index``: a stable 63-bit hash."""
    digest = hashlib.sha256(f"lldm-dpo/generate/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def complete(
    model,
    tokenizer,
    prompts: Sequence[Any],
    args: SamplingArgs | None = None,
    *,
    chat_template: Optional[bool] = None,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Sample a completion for each prompt (text or messages), in memory, with ``args`` (the sampler's
    settings, its ``batch_size`` prompts a pass, each prompt's noise seeded by ``args.seed`` and its index;
    keyword ``settings`` name a few of its fields instead).

    Returns one dict per prompt in the given order: ``index``, ``completion``,
    ``completion_tokens``, ``stopped``. ``indices`` (default 0..n-1) seed each
    prompt's noise; ``on_batch`` receives each batch's results as they finish.
    Prompts are rendered by ``pipeline.data.prompts`` (``chat_template`` None: the tokenizer's default).
    """
    args = sampling_args(args, settings)
    indices = list(range(len(prompts))) if indices is None else list(indices)
    special = special_ids(model, tokenizer)
    chat_template = resolve_chat_template(tokenizer, chat_template)
    encoded = [encode_prompt(tokenizer, p, chat_template=chat_template, where=f"prompt {i}")
               for p, i in zip(prompts, indices)]
    limit = getattr(getattr(model, "config", None), "max_sequence_length", None)
    if isinstance(limit, int):
        for ids, i in zip(encoded, indices):
            if len(ids) + args.gen_length > limit:
                raise UserError(
                    f"prompt {i}: {len(ids)} tokens + gen_length {args.gen_length} exceed the model's "
                    f"max_sequence_length {limit}"
                )
    # Longest first, so each batch holds similar lengths (little padding) and
    # an out-of-memory shows up in the first batch.
    order = sorted(range(len(prompts)), key=lambda j: -len(encoded[j]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    for first in range(0, len(order), args.batch_size):
        chunk = order[first : first + args.batch_size]
        rows = sample_batch(model, tokenizer, [encoded[j] for j in chunk],
                            [prompt_seed(args.seed, indices[j]) for j in chunk], special, args)
        for j, row in zip(chunk, rows):
            results[j] = {"index": indices[j], **row}
        if on_batch is not None:
            on_batch([results[j] for j in chunk])
    return results  # type: ignore[return-value]


# --- what generate and make-pairs share ------------------------------------------------------

SAMPLER_FIELDS = ("gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale", "seed",
                  "chat_template", "dtype", "kv_cache", "threshold")
"""The options besides the model that change a completion, as each output row's ``sampler`` stores them."""

SAMPLER_DEFAULTS = {"kv_cache": "none", "threshold": None}
"""The fast-sampling settings of the exact sampler (what a record made before they existed was made with)."""


def check_loading(cfg) -> None:
    """The checks of a sampling stage's model options (its ``SamplingArgs`` checked themselves): device, dtype;
    a 4-bit base computes in bfloat16 (float32 becomes bfloat16, as in score-ref and train)."""
    check_device(cfg.device)
    require_choice("dtype", cfg.dtype, DTYPE_NAMES)
    if cfg.load_in_4bit and cfg.dtype == "float32":
        cfg.dtype = "bfloat16"
    require(not cfg.load_in_4bit or cfg.dtype == "bfloat16",
            f"load_in_4bit computes in bfloat16, got dtype '{cfg.dtype}'")


def sampler_settings(cfg) -> dict[str, Any]:
    """``SAMPLER_FIELDS`` of ``cfg``, and ``load_in_4bit`` when set."""
    return {**{k: getattr(cfg, k) for k in SAMPLER_FIELDS}, **({"load_in_4bit": True} if cfg.load_in_4bit else {})}


def load_for_sampling(cfg):
    """(model in eval mode, tokenizer) of ``cfg.model`` on ``cfg.device`` with ``cfg``'s dtype and 4-bit setting."""
    from pipeline.models import load

    model, tokenizer = load(cfg.model, numerics.Numerics(dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit),
                            resolve_device(cfg.device), trust_remote_code=cfg.trust_remote_code)
    model.eval()
    return model, tokenizer


def dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """``rows`` as a JSONL file, written atomically."""
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def append_jsonl(stream: IO[str], rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` appended to an open partial file and fsync'd: a killed run loses at most the line it was writing."""
    stream.write("".join(dumps(r) + "\n" for r in rows))
    stream.flush()
    os.fsync(stream.fileno())


def earlier_rows(path: Path, *, tolerate_tail: bool) -> Iterator[tuple[str, Any]]:
    """(``file:line``, row) of an earlier run's JSONL output; ``tolerate_tail``: a partial file, whose last line
    may be cut short by an interrupted run (it ends the rows)."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if tolerate_tail and number >= len(lines) - 1:
                return  # the line a killed run was writing
            raise UserError(f"{path}:{number}: invalid JSON; delete the file to start over") from None
        yield f"{path}:{number}", row


def check_settings(where: str, previous: dict[str, Any], settings: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """Refuse an earlier row made with other settings (a row older than a setting had its default)."""
    old = {new: old for old, new in OLD_NAMES.items()}
    for key, value in settings.items():
        # a row written before a setting was renamed holds it by its old name (kv_cache was cache)
        had = previous.get(key, previous.get(old.get(key, key), SAMPLER_DEFAULTS.get(key)))
        if key not in skip and had != value:
            raise UserError(f"{where}: made with {key}={had!r}, this run has {key}={value!r}; "
                            "delete the file or choose another --out")
