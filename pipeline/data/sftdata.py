"""SFT examples from the files users bring, tokenized by the one prompt renderer.

Accepted records (one per JSONL line, JSON array element, Parquet or ``datasets`` row; ``readers``):

- TRL's prompt-completion: ``{"prompt": str, "completion": str}``;
- TRL's conversational prompt-completion: ``prompt`` and ``completion`` as message lists;
- TRL's conversational: ``{"messages": [...]}``: the last message is the response (it must be the
  assistant's), the messages before it the prompt;
- TRL's language modelling: ``{"text": str}``: an empty prompt, the whole text as response;
- a pairs ``.arrow`` file written by ``lldm-dpo ingest``: its ``chosen`` side (``prompt_messages`` and
  ``chosen_messages`` when the file has them, as score-ref reads them).

Rendering and truncation are score-ref's (``pipeline.data.prompts``, ``pipeline.data.tokenize``): with the chat
template a text prompt is one user turn, the response what the template adds for the assistant turn,
then EOS; the prompt is cut from the left when prompt + response exceed ``max_length``. So a prompt is
the same token sequence here as in score-ref, eval and generate. A bad record stops the read with one
line naming the file, the line (or row) and the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import UserError
from pipeline.data.pairsfile import read_pairs
from pipeline.data.prompts import encode_prompt, encode_text, messages_of, render_response
from pipeline.data.readers import iter_records
from pipeline.data.tokenize import pad_response, truncate


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]
    """Ends with EOS (the EOS padding of ``pad_to`` after it, when asked for)."""
    truncated: bool
    source: str
    """file:line (or file:row) of the record."""


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, record dict) for every record of ``path``; an unparsable one is a one-line error."""
    if path.suffix == ".arrow":
        table = read_pairs(path)
        names = [c for c in ("prompt", "chosen", "prompt_messages", "chosen_messages") if c in table.column_names]
        for i, row in enumerate(table.select(names).to_pylist()):
            yield f"{path}:{i}", row
        return
    if not path.exists():
        raise UserError(f"{path}: training data not found")
    for rec in iter_records(path):
        if rec.reason is not None:
            raise UserError(f"{rec.location}: {rec.message or rec.reason}")
        if not isinstance(rec.value, dict):
            raise UserError(f"{rec.location}: expected a JSON object, got {type(rec.value).__name__}")
        yield rec.location, rec.value


def _field(row: dict, name: str, where: str, kinds=(str,)) -> Any:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: field '{name}' is missing")
    if not isinstance(value, kinds):
        want = "text" if kinds == (str,) else "text or a message list"
        raise UserError(f"{where}: field '{name}' must be {want}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{where}: field '{name}' is empty")
    return value


def prompt_and_response(row: dict, where: str, pairs: bool = False) -> tuple[Any, Any]:
    """The record's (prompt, response), each text or a message list."""
    if pairs:
        prompt = row.get("prompt_messages") or _field(row, "prompt", where)
        response = row.get("chosen_messages") or _field(row, "chosen", where)
        return prompt, response
    if "messages" in row:
        msgs = messages_of(row["messages"], f"{where}: field 'messages'", sep=" ")
        if not msgs:
            raise UserError(f"{where}: field 'messages' is empty")
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: field 'messages': the last message must be the assistant's (the response), "
                            f"got role '{msgs[-1]['role']}'")
        return msgs[:-1], [msgs[-1]]
    if "completion" in row or "prompt" in row:
        prompt = _field(row, "prompt", where, (str, list))
        completion = _field(row, "completion", where, (str, list))
        if isinstance(prompt, list):
            prompt = messages_of(prompt, f"{where}: field 'prompt'", sep=" ")
        if isinstance(completion, list):
            completion = messages_of(completion, f"{where}: field 'completion'", sep=" ")
        return prompt, completion
    if "text" in row:
        return "", _field(row, "text", where)
    raise UserError(f"{where}: no 'prompt'/'completion', 'messages' or 'text' field (TRL's SFT formats); "
                    f"fields are {', '.join(sorted(map(str, row))) or 'none'}")


def tokenize_example(tokenizer, prompt: Any, response: Any, *, max_length: int, chat_template: bool,
                     where: str, pad_to: int = 0) -> tuple[list[int], list[int], bool]:
    """(prompt ids, response ids ending with EOS, truncated), rendered as score-ref renders a pair."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer has no EOS token; every response must end with EOS")
    if chat_template:
        prompt = [] if prompt == "" else prompt  # no prompt (TRL's text format): no turn before the response
        text = render_response(tokenizer, prompt, response, chat_template=True, where=where)
        prompt_ids = encode_prompt(tokenizer, prompt, chat_template=True, where=where)
    else:
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise UserError(f"{where}: message lists need the chat template (drop --no-chat-template)")
        text, prompt_ids = response, encode_text(tokenizer, prompt)
    ids = encode_text(tokenizer, text)
    ids = ids if ids and ids[-1] == eos else ids + [eos]
    ids = pad_response(ids, pad_to, eos)
    prompt_ids, (ids,), truncated = truncate(prompt_ids, [ids], max_length, eos)
    return [int(t) for t in prompt_ids], [int(t) for t in ids], truncated


def load_examples(path: str | Path, tokenizer, *, max_length: int, chat_template: bool,
                  pad_to: int = 0) -> list[SFTExample]:
    """Every record of ``path`` as a tokenized example (in file order)."""
    path = Path(path)
    pairs = path.suffix == ".arrow"
    out = []
    for where, row in _records(path):
        prompt, response = prompt_and_response(row, where, pairs)
        p, r, truncated = tokenize_example(tokenizer, prompt, response, max_length=max_length,
                                           chat_template=chat_template, where=where, pad_to=pad_to)
        out.append(SFTExample(p, r, truncated, where))
    if not out:
        raise UserError(f"{path}: holds no training records")
    return out


def examples_digest(examples: list[SFTExample]) -> str:
    """sha256 of the token ids, in order: what a resume compares (content, not the file's path)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(b"p" + ",".join(map(str, ex.prompt_ids)).encode()
                 + b"r" + ",".join(map(str, ex.response_ids)).encode())
    return h.hexdigest()

