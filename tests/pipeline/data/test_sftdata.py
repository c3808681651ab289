"""SFT data: TRL's formats, the pairs file's chosen side rendered as score-ref renders it, one-line errors."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import UserError
from pipeline.data.sftdata import examples_digest, load_examples


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_prompt_completion_messages_and_conversational_forms_render_alike(tmp_path, tok):
    text = _write(tmp_path / "t.jsonl", [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."}])
    msgs = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                                                      {"role": "assistant", "content": "2 + 3 = 5."}]}])
    conv = _write(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                                          "completion": [{"role": "assistant", "content": "2 + 3 = 5."}]}])
    got = [load_examples(p, tok, max_length=256, chat_template=True)[0] for p in (text, msgs, conv)]
    assert got[0].prompt_ids == got[1].prompt_ids == got[2].prompt_ids
    assert got[0].response_ids == got[1].response_ids == got[2].response_ids
    assert got[0].response_ids[-1] == tok.eos_token_id
    assert tok.decode(got[0].prompt_ids).endswith("assistant<|end_header_id|>\n\n")
    assert got[0].source == f"{text}:1"
    raw = load_examples(text, tok, max_length=256, chat_template=False)[0]
    assert tok.decode(raw.prompt_ids) == "What is 2 + 3?"
    assert tok.decode(raw.response_ids[:-1]) == "2 + 3 = 5."


def test_pairs_file_chosen_side_is_tokenized_as_score_ref_tokenizes_it(tmp_path, tok):
    from pipeline.data.pairsfile import read_pairs
    from pipeline.data.tokenize import tokenize_pair
    from tests.conftest import ingest_pairs

    pairs = ingest_pairs(tmp_path, n=6, eval_fraction=0.0)
    examples = load_examples(pairs, tok, max_length=64, chat_template=True)
    rows = read_pairs(pairs).to_pylist()
    assert len(examples) == len(rows)
    for ex, row in zip(examples, rows):
        ref = tokenize_pair(tok, row, 64, use_chat_template=True)
        assert ex.prompt_ids == ref.prompt_ids and ex.response_ids == ref.chosen_ids


def test_truncation_keeps_the_response_and_pad_to_adds_eos(tmp_path, tok):
    path = _write(tmp_path / "t.jsonl", [{"prompt": "word " * 80, "completion": "ok"}])
    ex = load_examples(path, tok, max_length=20, chat_template=False)[0]
    assert ex.truncated and len(ex.prompt_ids) + len(ex.response_ids) == 20
    padded = load_examples(path, tok, max_length=40, chat_template=False, pad_to=12)[0]
    assert len(padded.response_ids) == 12 and set(padded.response_ids[-5:]) == {tok.eos_token_id}


def test_the_digest_follows_the_content_not_the_path(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    b = _write(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    c = _write(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "d"}])
    digest = [examples_digest(load_examples(p, tok, max_length=64, chat_template=False)) for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]


@pytest.mark.parametrize("record,message", [
    ('{"prompt": "a"', "t.jsonl:2"),
    ({"prompt": "a"}, "t.jsonl:2: field 'completion' is missing"),
    ({"prompt": "a", "completion": 3}, "t.jsonl:2: field 'completion' must be text or a message list"),
    ({"prompt": "a", "completion": "  "}, "t.jsonl:2: field 'completion' is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "t.jsonl:2: field 'messages': the last message must be"),
    ({"messages": [{"role": "user"}]}, "t.jsonl:2: field 'messages' message 0 needs"),
    ({"question": "q"}, "t.jsonl:2: no 'prompt'/'completion'"),
    ([1, 2], "t.jsonl:2: expected a JSON object"),
])
def test_a_bad_record_is_one_line_naming_file_line_and_field(tmp_path, tok, record, message):
    path = _write(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c"}, record])
    with pytest.raises(UserError) as err:
        load_examples(path, tok, max_length=64, chat_template=True)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_and_missing_files(tmp_path, tok):
    with pytest.raises(UserError, match="not found"):
        load_examples(tmp_path / "nope.jsonl", tok, max_length=64, chat_template=False)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no training records"):
        load_examples(empty, tok, max_length=64, chat_template=False)
