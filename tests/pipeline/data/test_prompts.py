"""pipeline.data.prompts: the one renderer (plain and conversational prompts, with and without the template)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.data.prompts import (
    default_chat_template,
    encode_continuation,
    encode_prompt,
    follow_cache,
    render_prompt,
    render_response,
    resolve_chat_template,
)
from pipeline.models import preset_tokenizer


def test_plain_prompt_is_a_user_turn_with_the_generation_prompt(tok, enc):
    text = render_prompt(tok, "What is 2 + 2?", chat_template=True)
    assert text == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert encode_prompt(tok, "What is 2 + 2?", chat_template=True) == enc(tok, text)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert render_prompt(tok, messages, chat_template=True) == text


def test_raw_prompt_is_the_text_and_messages_need_the_template(tok, enc):
    assert render_prompt(tok, "2 + 2 =", chat_template=False) == "2 + 2 ="
    assert encode_prompt(tok, "2 + 2 =", chat_template=False) == enc(tok, "2 + 2 =")
    with pytest.raises(UserError, match="message-list prompt needs the chat template"):
        render_prompt(tok, [{"role": "user", "content": "x"}], chat_template=False)
    with pytest.raises(UserError, match="message 0 needs string 'role' and 'content'"):
        render_prompt(tok, [{"role": "user"}], chat_template=True)


def test_default_follows_the_tokenizer(tok):
    assert default_chat_template(tok) and resolve_chat_template(tok, None) is True
    assert resolve_chat_template(tok, False) is False
    bare = preset_tokenizer("tiny")
    bare.chat_template = None
    assert not default_chat_template(bare) and resolve_chat_template(bare, None) is False
    with pytest.raises(UserError, match="no chat template"):
        resolve_chat_template(bare, True)
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(bare, "x", chat_template=True)


def test_response_is_the_assistant_turn_beyond_the_prompt(tok):
    assert render_response(tok, "Hi", "Hello there.", chat_template=True) == "Hello there.<|eot_id|>"
    assert render_response(tok, "Hi", " Hello", chat_template=False) == " Hello"
    whole = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                    tokenize=False)
    assert render_prompt(tok, "Hi", chat_template=True) + render_response(tok, "Hi", "Yo", chat_template=True) == whole


@pytest.mark.parametrize("chat_template", [False, True])
def test_continuation_is_encoded_jointly_as_llada_does(tok, chat_template, enc):
    # LLaDA's harness: trailing whitespace of the context moves to the continuation, the whole
    # text is encoded once, and the continuation is what lies beyond the context's own ids.
    question, option = "Question: 12 plus 30? Answer: ", "42"
    context_text = render_prompt(tok, question, chat_template=chat_template)
    stripped = context_text.rstrip()
    whole = enc(tok, stripped + context_text[len(stripped):] + option)
    n = len(enc(tok, stripped))
    ctx, cont = encode_continuation(tok, question, option, chat_template=chat_template)
    assert (ctx, cont) == (whole[:n], whole[n:])
    assert tok.decode(ctx + cont) == context_text + option  # nothing lost, nothing added
    assert tok.eos_token_id not in cont  # no EOS appended
    if not chat_template:
        # The space before the option is part of the option's first token, not a token of its own.
        assert tok.decode(cont) == " 42" and ctx == enc(tok, "Question: 12 plus 30? Answer:")


def test_follow_cache_takes_the_cache_rule_and_refuses_another(tok):
    assert follow_cache(None, {"chat_template": False}, "c") is False
    assert follow_cache(True, {"chat_template": True}, "c") is True
    with pytest.raises(UserError, match="c: the cache's prompts were rendered with chat_template=True, this run "
                                        "asks for chat_template=False"):
        follow_cache(False, {"chat_template": True}, "c")
