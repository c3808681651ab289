"""Multiple-choice records are validated (issue 24, item 7): no ValueError traceback, no silent wrong score."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import UserError
from pipeline.data.choices import read_choices


@pytest.mark.parametrize("record,message", [
    ({"question": "q", "options": ["a", "b"], "answer": "b"}, "field 'answer' must be the index of the right option"),
    ({"question": "q", "options": ["a", "b"], "answer": 2}, "field 'answer' is 2, out of range for 2 options"),
    ({"question": "q", "options": ["a", "b"], "answer": -1}, "field 'answer' is -1, out of range"),
    ({"question": "q", "options": ["a", "b"], "answer": True}, "field 'answer' must be the index"),
    ({"question": "q", "options": "ab", "answer": 0}, "field 'options' must be a list of strings, got str"),
    ({"question": "q", "options": ["a", 3], "answer": 0}, "must be a list of strings, got a list with int"),
    ({"question": "q", "options": [], "answer": 0}, "field 'options' is empty"),
    ({"question": "q", "options": ["a"]}, "missing field 'answer'"),
])
def test_a_bad_choice_record_is_a_one_line_error_naming_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "choices.jsonl"
    path.write_text(json.dumps({"question": "ok", "options": ["x", "y"], "answer": 1}) + "\n" + json.dumps(record)
                    + "\n")
    with pytest.raises(UserError, match=message) as err:
        read_choices(path)
    assert str(err.value).startswith(f"{path}:2: ") and "\n" not in str(err.value)


def test_good_records_read():
    from pathlib import Path

    items = read_choices(Path(__file__).resolve().parents[3] / "data" / "benchmarks" / "arithmetic_choice.jsonl")
    assert items and all(0 <= it["answer"] < len(it["options"]) for it in items)
