"""The one prompt renderer: how a prompt (and a response after it) becomes text and token ids.

score-ref (and so train, which reads the cache's ids), eval, generate, the
multiple-choice scorer and make-pairs all render through this module, so a
prompt is the same token sequence wherever it is scored or sampled.

The rule:

- ``chat_template=True``: a plain-text prompt becomes one user turn; a message
  list is taken as is; the tokenizer's chat template is applied with
  ``add_generation_prompt=True`` (the text ends where the assistant speaks).
  A response is what the template adds for the assistant turn(s) beyond that
  prompt (content and end-of-turn marker), as LLaDA-Instruct was fine-tuned.
- ``chat_template=False``: the prompt and the response are raw text; a
  message-list prompt is refused (it has no raw rendering).

Text is encoded without added special tokens (the template writes BOS itself;
LLaDA's tokenizer adds none). The default (``default_chat_template``) is on
when the tokenizer has a chat template. score-ref records the resolved rule in
the cache's fingerprint (``chat_template``) and eval/generate follow it.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pipeline.core.errors import UserError

PROMPT_RENDERER = "user-turn-v1"
"""Version of the rendering rule, in the cache's fingerprint: caches rendered by an earlier rule do not match."""

Prompt = Union[str, list]
"""A prompt: text, or a list of {"role", "content"} messages."""


def default_chat_template(tokenizer) -> bool:
    """True when the tokenizer has a chat template (the default rendering then uses it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer, setting: Optional[bool]) -> bool:
    """The rule to use: ``setting`` when given (True needs a template), else the tokenizer's default."""
    if setting is None:
        return default_chat_template(tokenizer)
    if setting and not default_chat_template(tokenizer):
        raise UserError("the model's tokenizer has no chat template: pass --no-chat-template")
    return bool(setting)


def follow_cache(setting: Optional[bool], fingerprint: dict, where: str) -> bool:
    """The chat-template rule of a run that evaluates a cached run: the cache's, unless the user set
    another explicitly, which is refused (the cached terms were scored under the cache's rule)."""
    cached = fingerprint.get("chat_template")
    if not isinstance(cached, bool):
        raise UserError(f"{where}: the cache's fingerprint records no chat_template rule; rescore it with score-ref")
    if setting is not None and bool(setting) != cached:
        raise UserError(f"{where}: the cache's prompts were rendered with chat_template={cached}, this run asks "
                        f"for chat_template={bool(setting)}; drop --chat-template/--no-chat-template to follow the "
                        "cache")
    return cached


def messages_of(value: Any, where: str = "prompt", sep: str = ": ") -> list[dict[str, str]]:
    """A validated copy of a message list (only role and content kept)."""
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}{sep}message {i} needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _as_messages(prompt: Prompt, where: str, role: str = "user") -> list[dict[str, str]]:
    """Text as one ``role`` turn; a message list validated."""
    if isinstance(prompt, str):
        return [{"role": role, "content": prompt}]
    return messages_of(prompt, where)


def _apply(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    if not messages:
        return ""  # nothing before the response: an empty prompt, not a bare generation prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer, prompt: Prompt, *, chat_template: bool, where: str = "prompt") -> str:
    """The prompt's text as the model sees it (see the module docstring for the rule)."""
    if chat_template and resolve_chat_template(tokenizer, True):  # (raises when the tokenizer has no template)
        return _apply(tokenizer, _as_messages(prompt, where), add_generation_prompt=True)
    if isinstance(prompt, (list, tuple)):
        raise UserError(f"{where}: a message-list prompt needs the chat template (drop --no-chat-template)")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: must be text or a message list, got {type(prompt).__name__}")
    return prompt


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text (no added special tokens)."""
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def encode_prompt(tokenizer, prompt: Prompt, *, chat_template: bool, where: str = "prompt") -> list[int]:
    """Token ids of ``render_prompt``'s text."""
    return encode_text(tokenizer, render_prompt(tokenizer, prompt, chat_template=chat_template, where=where))


def render_response(tokenizer, prompt: Prompt, response: Prompt, *, chat_template: bool,
                    where: str = "response") -> str:
    """The text that follows ``render_prompt``'s text for this response (no EOS added).

    With the template a text response is one assistant turn, a message list is
    taken as is, and the result is the rendering of prompt + response beyond
    the prompt's rendering; raw: the response text itself.
    """
    if not chat_template:
        if not isinstance(response, str):
            raise UserError(f"{where}: a message-list response needs the chat template (drop --no-chat-template)")
        return response
    prompt_msgs = _as_messages(prompt, where)
    reply = _as_messages(response, where, role="assistant")
    if not reply:
        raise UserError(f"{where}: is empty")
    head = render_prompt(tokenizer, prompt_msgs, chat_template=True, where=where)
    full = _apply(tokenizer, prompt_msgs + reply, add_generation_prompt=False)
    if not full.startswith(head):
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the
        # prefix property; scoring such a response would be ill-defined.
        raise UserError(f"{where}: the chat template's rendering of the conversation does not start with "
                        "its rendering of the prompt")
    return full[len(head):]


def encode_continuation(tokenizer, prompt: Prompt, continuation: str, *, chat_template: bool,
                        where: str = "prompt") -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a prompt and a continuation encoded jointly, as LLaDA's
    evaluation harness does for multiple choice: whitespace at the end of the rendered prompt moves
    to the continuation, the whole text is encoded once, and the continuation is what lies beyond
    the context's own encoding. No EOS is appended.
    """
    context = render_prompt(tokenizer, prompt, chat_template=chat_template, where=where)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = encode_text(tokenizer, stripped + continuation)
    n = len(encode_text(tokenizer, stripped))
    return whole[:n], whole[n:]
