"""tokenize_pair: standard and conversational rows, EOS, truncation policy."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.data.tokenize import TokenizedPair, tokenize_pair, truncate


def test_standard_row_raw_text(tok, enc):
    row = {"pair_id": "p1", "prompt": "What is 2 plus 3?", "chosen": " The answer is 5.", "rejected": " It is 6."}
    out = tokenize_pair(tok, row, max_length=256, use_chat_template=False)
    assert isinstance(out, TokenizedPair) and not out.truncated
    eos = tok.eos_token_id
    assert out.prompt_ids == enc(tok, "What is 2 plus 3?")
    assert out.chosen_ids == enc(tok, " The answer is 5.") + [eos]
    assert out.rejected_ids == enc(tok, " It is 6.") + [eos]
    assert tok.decode(out.chosen_ids[:-1]) == " The answer is 5."
    assert tok.bos_token_id not in out.prompt_ids  # no added special tokens for plain text
    # Messages present but the chat template disabled: the text fields are scored.
    conv = dict(row, prompt_messages=[{"role": "user", "content": "x"}],
                chosen_messages=[{"role": "assistant", "content": "y"}],
                rejected_messages=[{"role": "assistant", "content": "z"}])
    assert tokenize_pair(tok, conv, 256, use_chat_template=False) == out


def test_standard_row_under_the_chat_template_is_a_user_turn_and_an_assistant_turn(tok, enc):
    row = {"pair_id": "p1", "prompt": "What is 2 plus 3?", "chosen": "The answer is 5.", "rejected": "It is 6."}
    out = tokenize_pair(tok, row, max_length=256)  # the template is on by default
    as_chat = tokenize_pair(tok, dict(row, prompt_messages=[{"role": "user", "content": row["prompt"]}],
                                      chosen_messages=[{"role": "assistant", "content": row["chosen"]}],
                                      rejected_messages=[{"role": "assistant", "content": row["rejected"]}]), 256)
    assert out == as_chat
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("assistant<|end_header_id|>\n\n")
    assert out.prompt_ids == enc(tok, text)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert out.chosen_ids == enc(tok, "The answer is 5.") + [eot, tok.eos_token_id]


def test_conversational_row_uses_chat_template(tok, enc):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
    row = {
        "pair_id": "c1", "prompt": "rendered", "chosen": "5", "rejected": "6",
        "prompt_messages": prompt,
        "chosen_messages": [{"role": "assistant", "content": "The answer is 5."}],
        "rejected_messages": [{"role": "assistant", "content": "It is 6."}],
    }
    out = tokenize_pair(tok, row, max_length=256)
    expected_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert out.prompt_ids == enc(tok, expected_prompt)
    assert out.prompt_ids[0] == tok.bos_token_id
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert out.chosen_ids == enc(tok, "The answer is 5.") + [eot, tok.eos_token_id]
    assert out.rejected_ids == enc(tok, "It is 6.") + [eot, tok.eos_token_id]
    # Prompt + response is exactly the template's rendering of the whole conversation, then EOS.
    full = tok.apply_chat_template(prompt + row["chosen_messages"], tokenize=False)
    assert out.prompt_ids + out.chosen_ids == enc(tok, full) + [tok.eos_token_id]
    assert not out.truncated


def test_conversational_multi_turn_response_and_empty_prompt(tok):
    row = {
        "pair_id": "c2",
        "prompt_messages": [],
        "chosen_messages": [{"role": "user", "content": "2 plus 3?"}, {"role": "assistant", "content": "5"}],
        "rejected_messages": [{"role": "user", "content": "2 plus 3?"}, {"role": "assistant", "content": "6"}],
    }
    out = tokenize_pair(tok, row, max_length=256)
    assert out.prompt_ids == []
    assert out.chosen_ids[0] == tok.bos_token_id and out.chosen_ids[-1] == tok.eos_token_id


def test_eos_not_doubled(tok):
    row = {"prompt": "What", "chosen": "is 5<|endoftext|>", "rejected": "is 6"}
    out = tokenize_pair(tok, row, 64)
    assert out.chosen_ids[-1] == tok.eos_token_id and out.chosen_ids[-2] != tok.eos_token_id
    assert out.rejected_ids[-1] == tok.eos_token_id


def test_truncation_drops_prompt_from_the_left_first(tok):
    row = {"prompt": "What is 2 plus 3? What is 2 plus 3?", "chosen": "The answer is 5.", "rejected": "6"}
    full = tokenize_pair(tok, row, 1000)
    longest = len(full.chosen_ids)
    budget = longest + 3
    out = tokenize_pair(tok, row, budget)
    assert out.truncated
    assert out.prompt_ids == full.prompt_ids[-3:]  # the end of the prompt, next to the response, is kept
    assert out.chosen_ids == full.chosen_ids and out.rejected_ids == full.rejected_ids
    assert len(out.prompt_ids) + max(len(out.chosen_ids), len(out.rejected_ids)) == budget
    # Exactly fitting is not truncated.
    exact = tokenize_pair(tok, row, len(full.prompt_ids) + longest)
    assert not exact.truncated and exact == full


def test_truncation_of_too_long_responses_keeps_final_eos(tok):
    row = {"prompt": "What is 2 plus 3?", "chosen": "The answer is 5. The answer is 5.", "rejected": "6."}
    full = tokenize_pair(tok, row, 1000)
    m = 4
    assert len(full.chosen_ids) > m and len(full.rejected_ids) <= m
    out = tokenize_pair(tok, row, m)
    assert out.truncated and out.prompt_ids == []
    assert out.chosen_ids == full.chosen_ids[: m - 1] + [tok.eos_token_id]
    assert out.rejected_ids == full.rejected_ids  # short enough: untouched
    assert tokenize_pair(tok, row, 1).chosen_ids == [tok.eos_token_id]


def test_truncate_helper_edge_cases():
    assert truncate([1, 2], [[3, 9], [4, 9]], 4, 9) == ([1, 2], [[3, 9], [4, 9]], False)
    assert truncate([1, 2], [[3, 9], [4, 9]], 3, 9) == ([2], [[3, 9], [4, 9]], True)
    assert truncate([1, 2], [[3, 9], [4, 9]], 2, 9) == ([], [[3, 9], [4, 9]], True)
    assert truncate([1], [[3, 5, 6, 9], [4, 9]], 2, 9) == ([], [[3, 9], [4, 9]], True)


def test_errors_name_the_pair_and_field(tok):
    with pytest.raises(UserError, match="pair p9: field 'rejected' is missing"):
        tokenize_pair(tok, {"pair_id": "p9", "prompt": "a", "chosen": "b"}, 16)
    with pytest.raises(UserError, match="field 'chosen' is not text"):
        tokenize_pair(tok, {"pair_id": "p9", "prompt": "a", "chosen": 3, "rejected": "c"}, 16)
    bad = {"pair_id": "p8", "prompt_messages": [{"role": "user", "content": "a"}],
           "chosen_messages": [{"role": "assistant"}], "rejected_messages": [{"role": "assistant", "content": "c"}]}
    with pytest.raises(UserError, match="pair p8: field 'chosen_messages' message 0"):
        tokenize_pair(tok, bad, 16)
    with pytest.raises(ValueError):
        tokenize_pair(tok, {"prompt": "a", "chosen": "b", "rejected": "c"}, 0)
