"""Tokenization of a preference pair into the token ids that are scored.

Rendering goes through ``pipeline.data.prompts`` (the one renderer, shared with
generate, eval and the multiple-choice scorer):

- chat template on (the default when the tokenizer has one): the prompt
  (``prompt_messages`` when the row has them, else the ``prompt`` text as one
  user turn) is the template's rendering with the generation prompt; a
  response (``chosen_messages``/``rejected_messages``, else the text as one
  assistant turn) is what the template renders beyond that prompt (the
  assistant turn with its end-of-turn marker), then EOS. Rendering to text and
  encoding once keeps template specials (``<|eot_id|>`` ...) single tokens.
- chat template off: prompt ids = the prompt text; each response = its text,
  then EOS (message fields are ignored; the text fields are scored).

Text is encoded without added special tokens, prompt and responses
separately, so the prompt ids are the same for chosen and rejected and equal
``encode_prompt``'s. Every response ends with the tokenizer's EOS (added
unless already last).

EOS padding (``pad_to``, 0 = off): a response shorter than ``pad_to`` tokens
gets EOS tokens appended after its own EOS up to ``pad_to``, the padding part
of the response (masked and scored like any response token), as LLaDA's SFT
pads and as ``lldm-dpo sft --pad-response-to`` does (one function,
``pad_response``): a response sampled with a generation length of ``pad_to``
fills its tail with EOS, so scored this way it has the shape the model
samples. Longer responses are left as they are. Padding comes before
truncation.

Truncation to ``max_length`` (prompt + the longer response must fit):
1. drop prompt tokens from the LEFT (the end of the prompt, next to the
   response, matters most), keeping both responses whole;
2. if the longer response alone exceeds ``max_length``, the prompt is dropped
   entirely and each too-long response is cut from the RIGHT to ``max_length``
   tokens, its last token replaced by EOS so every response still ends with EOS.
Before that, TRL's ``max_prompt_length`` and ``max_completion_length`` (when
given) apply as TRL applies them: the prompt keeps its last
``max_prompt_length`` tokens and each response its first
``max_completion_length`` (the last of them replaced by EOS, as above).
``truncated`` is True when any token was dropped; score-ref counts these pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import UserError
from pipeline.core.schemas import SIDES
from pipeline.data.prompts import (
    default_chat_template,
    encode_prompt,
    encode_text,
    messages_of,
    render_response,
)


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def _where(row: dict) -> str:
    if row.get("pair_id") is not None:
        return f"pair {row['pair_id']}"
    return f"record {row['source']}" if row.get("source") is not None else "pair"


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not text ({type(value).__name__})"
        raise UserError(f"{_where(row)}: field {field!r} is {kind}")
    return value


def _cut(ids: list[int], length: int, eos: int) -> list[int]:
    """A response cut from the right to ``length`` tokens, still ending with EOS."""
    return ids if len(ids) <= length else ids[: length - 1] + [eos]


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, eos: int,
             max_prompt_length: int | None = None, max_completion_length: int | None = None):
    """Apply the truncation policy; returns (prompt_ids, responses, truncated)."""
    cut_before = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, cut_before = prompt_ids[len(prompt_ids) - max_prompt_length:] if max_prompt_length else [], True
    if max_completion_length is not None and max(len(r) for r in responses) > max_completion_length:
        responses, cut_before = [_cut(r, max_completion_length, eos) for r in responses], True
    prompt_ids, responses, cut = _truncate_total(prompt_ids, responses, max_length, eos)
    return prompt_ids, responses, cut or cut_before


def _truncate_total(prompt_ids: list[int], responses: list[list[int]], max_length: int, eos: int):
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, responses, False
    if longest <= max_length:
        keep = max_length - longest
        return (prompt_ids[len(prompt_ids) - keep :] if keep else []), responses, True
    return [], [_cut(r, max_length, eos) for r in responses], True


def pad_response(ids: list[int], pad_to: int, eos: int) -> list[int]:
    """``ids`` (ending with EOS) with EOS appended up to ``pad_to`` tokens; unchanged when already that long
    or ``pad_to`` is 0."""
    if pad_to < 0:
        raise ValueError(f"pad_response: pad_to must be >= 0, got {pad_to}")
    return ids + [eos] * (pad_to - len(ids)) if len(ids) < pad_to else ids


def _messages_or_text(row: dict, field: str):
    """The row's ``{field}_messages`` (validated) when it has them, else its ``field`` text."""
    value = row.get(f"{field}_messages")
    if value is None:
        return _text(row, field)
    return messages_of(value, f"{_where(row)}: field '{field}_messages'", sep=" ")


def tokenize_pair(tokenizer, row: dict, max_length: int, use_chat_template: bool = True, pad_to: int = 0, *,
                  max_prompt_length: int | None = None, max_completion_length: int | None = None) -> TokenizedPair:
    """Token ids of a pairs-file row as they are scored (see the module docstring for the policy)."""
    if max_length < 1:
        raise ValueError(f"tokenize_pair: max_length must be >= 1, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer has no EOS token; every response must end with EOS")
    where = _where(row)
    if use_chat_template:
        if not default_chat_template(tokenizer):
            raise UserError(f"{where}: the tokenizer has no chat template (pass --no-chat-template to score "
                            "the raw text)")
        prompt = _messages_or_text(row, "prompt")
        responses = []
        for side in SIDES:
            response = _messages_or_text(row, side)
            field = f"{side}_messages" if isinstance(response, list) else side
            text = render_response(tokenizer, prompt, response, chat_template=True, where=f"{where}: field '{field}'")
            responses.append(encode_text(tokenizer, text))
        prompt_ids = encode_prompt(tokenizer, prompt, chat_template=True, where=f"{where}: prompt")
        chosen, rejected = responses
    else:
        prompt_ids, chosen, rejected = (encode_text(tokenizer, _text(row, name)) for name in ("prompt", *SIDES))
    chosen, rejected = (ids if ids and ids[-1] == eos else ids + [eos] for ids in (chosen, rejected))
    chosen, rejected = (pad_response(ids, pad_to, eos) for ids in (chosen, rejected))
    prompt_ids, (chosen, rejected), truncated = truncate(prompt_ids, [chosen, rejected], max_length, eos,
                                                         max_prompt_length, max_completion_length)
    return TokenizedPair(*([int(t) for t in ids] for ids in (prompt_ids, chosen, rejected)), truncated=truncated)
