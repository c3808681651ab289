"""Tokenization of a preference pair into the token ids that are scored.

Standard rows (text): prompt ids = the prompt text; each response = its text,
then EOS. Both are encoded without added special tokens (no BOS/CLS/SEP: a
masked diffusion model's prompt is exactly the text given; LLaDA's tokenizer
adds none anyway), and separately, so the prompt ids are the same for chosen
and rejected.

Conversational rows (``prompt_messages`` / ``chosen_messages`` /
``rejected_messages`` set and ``use_chat_template``): the prompt is the chat
template applied to the prompt messages with ``add_generation_prompt=True``;
a response is what the template renders for prompt + response messages beyond
that prefix (the assistant turn(s) with their end-of-turn markers), then EOS.
Rendering to text and encoding once keeps special tokens in the template
(``<|eot_id|>`` ...) as single tokens.

Every response ends with the tokenizer's EOS (added unless already last).

Truncation to ``max_length`` (prompt + the longer response must fit):
1. drop prompt tokens from the LEFT (the end of the prompt, next to the
   response, matters most), keeping both responses whole;
2. if the longer response alone exceeds ``max_length``, the prompt is dropped
   entirely and each too-long response is cut from the RIGHT to ``max_length``
   tokens, its last token replaced by EOS so every response still ends with EOS.
``truncated`` is True when any token was dropped; score-ref counts these pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def _where(row: dict) -> str:
    pid = row.get("pair_id")
    src = row.get("source")
    if pid is not None:
        return f"pair {pid}"
    if src is not None:
        return f"record {src}"
    return "pair"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not text ({type(value).__name__})"
        raise UserError(f"{_where(row)}: field {field!r} is {kind}")
    return value


def _messages(row: dict, field: str) -> list[dict[str, Any]] | None:
    value = row.get(field)
    if value is None:
        return None
    msgs = list(value)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{_where(row)}: field {field!r} message {i} needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _conversational(tokenizer, row: dict, prompt_msgs, chosen_msgs, rejected_msgs):
    prompt_text = _render(tokenizer, prompt_msgs, add_generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text)
    responses = []
    for field, msgs in (("chosen_messages", chosen_msgs), ("rejected_messages", rejected_msgs)):
        if not msgs:
            raise UserError(f"{_where(row)}: field {field!r} is empty")
        full_text = _render(tokenizer, prompt_msgs + msgs, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            # Templates that rewrite earlier turns (e.g. strip reasoning) break the
            # prefix property; scoring such a response would be ill-defined.
            raise UserError(
                f"{_where(row)}: field {field!r}: the chat template's rendering of the conversation "
                "does not start with its rendering of the prompt"
            )
        responses.append(_encode(tokenizer, full_text[len(prompt_text) :]))
    return prompt_ids, responses[0], responses[1]


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, eos: int):
    """Apply the truncation policy; returns (prompt_ids, responses, truncated)."""
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, responses, False
    if longest <= max_length:
        keep = max_length - longest
        return (prompt_ids[len(prompt_ids) - keep :] if keep else []), responses, True
    cut = [r if len(r) <= max_length else r[: max_length - 1] + [eos] for r in responses]
    return [], cut, True


def tokenize_pair(tokenizer, row: dict, max_length: int, use_chat_template: bool = True) -> TokenizedPair:
    """Token ids of a pairs-file row as they are scored (see the module docstring for the policy)."""
    if max_length < 1:
        raise ValueError(f"tokenize_pair: max_length must be >= 1, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer has no EOS token; every response must end with EOS")
    chosen_msgs = _messages(row, "chosen_messages")
    rejected_msgs = _messages(row, "rejected_messages")
    conversational = use_chat_template and chosen_msgs is not None and rejected_msgs is not None
    if conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{_where(row)}: conversational pair but the tokenizer has no chat template "
                "(disable the chat template to score the text rendering)"
            )
        prompt_msgs = _messages(row, "prompt_messages") or []
        prompt_ids, chosen, rejected = _conversational(tokenizer, row, prompt_msgs, chosen_msgs, rejected_msgs)
    else:
        prompt_ids = _encode(tokenizer, _text(row, "prompt"))
        chosen = _encode(tokenizer, _text(row, "chosen"))
        rejected = _encode(tokenizer, _text(row, "rejected"))
    chosen, rejected = _with_eos(chosen, eos), _with_eos(rejected, eos)
    prompt_ids, (chosen, rejected), truncated = truncate(prompt_ids, [chosen, rejected], max_length, eos)
    return TokenizedPair(
        prompt_ids=[int(t) for t in prompt_ids],
        chosen_ids=[int(t) for t in chosen],
        rejected_ids=[int(t) for t in rejected],
        truncated=truncated,
    )
