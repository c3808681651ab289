"""Readers (every input format, per-line parse errors) and pair validation (every reason code)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.pairs import FieldMap, Invalid, normalize_text, pair_id_of, split_of, validate_record
from pipeline.readers import iter_records, parse_line

ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    {"prompt": "What is 3 * 3?", "chosen": "9", "rejected": "6"},
]


def _values(path):
    return [(r.line, r.value, r.reason) for r in iter_records(path)]


# --- readers -------------------------------------------------------------------


def test_jsonl_lines_are_1_based_and_blank_lines_skipped(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\r\n\n   \n" + json.dumps(ROWS[1]).encode())
    recs = list(iter_records(p))
    assert [(r.line, r.value, r.reason) for r in recs] == [(1, ROWS[0], None), (4, ROWS[1], None)]
    assert recs[0].source == str(p) and recs[0].location == f"{p}:1"


def test_jsonl_gz(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert _values(p) == [(1, ROWS[0], None), (2, ROWS[1], None)]


def test_invalid_json_and_utf8_per_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n{\"prompt\": \n" + b'{"prompt": "caf\xe9"}\n' + json.dumps(ROWS[1]).encode() + b"\n")
    recs = list(iter_records(p))
    assert [(r.line, r.reason) for r in recs] == [(1, None), (2, "invalid_json"), (3, "invalid_utf8"), (4, None)]
    assert recs[1].raw == '{"prompt": ' and "column" in recs[1].message
    assert recs[2].raw == '{"prompt": "caf\\xe9"}' and recs[2].value is None


def test_lone_surrogate_escape_is_invalid_utf8():
    # json accepts "\ud800" escapes, but the text cannot be stored as UTF-8: quarantine it.
    rec = parse_line(b'{"prompt": "\\ud800"}')
    assert rec.reason == "invalid_utf8" and rec.value is None
    pair = parse_line(b'{"prompt": "\\ud83d\\ude00"}')  # a proper surrogate pair is fine
    assert pair.reason is None and pair.value == {"prompt": "\U0001f600"}


def test_json_array_and_json_named_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(ROWS, indent=2))
    assert _values(arr) == [(0, ROWS[0], None), (1, ROWS[1], None)]
    lines = tmp_path / "b.json"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert _values(lines) == [(1, ROWS[0], None), (2, ROWS[1], None)]
    empty = tmp_path / "c.json"
    empty.write_text(" [ ] ")
    assert _values(empty) == []


def test_json_array_broken_element_keeps_earlier_ones(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": oops}, {"x": 1}]')
    recs = list(iter_records(p))
    assert [(r.line, r.reason) for r in recs] == [(0, None), (1, "invalid_json")]
    assert recs[1].raw.startswith('{"prompt": oops}') and '{"x": 1}' in recs[1].raw


def test_json_array_invalid_utf8_element(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'[{"prompt": "ok"}, {"prompt": "\xff\xfe"}, {"prompt": "fine"}]')
    assert [(r.line, r.reason) for r in iter_records(p)] == [(0, None), (1, "invalid_utf8"), (2, None)]


def test_json_array_trailing_garbage(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"a": 1}] trailing')
    assert [(r.line, r.reason) for r in iter_records(p)] == [(0, None), (1, "invalid_json")]


def test_parquet_rows_0_based(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    recs = list(iter_records(p))
    assert [(r.line, r.value) for r in recs] == [(0, ROWS[0]), (1, ROWS[1])]
    assert json.loads(recs[1].raw) == ROWS[1]


def test_datasets_save_to_disk_folder_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert _values(tmp_path / "ds") == [(0, ROWS[0], None), (1, ROWS[1], None)]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = list(iter_records(tmp_path / "dd"))
    assert [(r.source.rsplit("[", 1)[1], r.line) for r in recs] == [("train]", 0), ("train]", 1), ("test]", 0)]


def test_unknown_and_missing_inputs(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match="unknown input type"):
        list(iter_records(tmp_path / "a.csv"))
    with pytest.raises(UserError, match="not found"):
        list(iter_records(tmp_path / "nope.jsonl"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="save_to_disk"):
        list(iter_records(tmp_path / "folder"))


# --- validation ---------------------------------------------------------------

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "wrong_type"),
        ({"prompt": "p", "chosen": "c"}, "missing_field"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "missing_field"),
        ({"chosen": "c", "rejected": "r"}, "missing_field"),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, "wrong_type"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "wrong_type"),
        ({"prompt": "p", "chosen": "c", "rejected": [A("r")]}, "wrong_type"),
        ({"prompt": "  \n", "chosen": "c", "rejected": "r"}, "empty_text"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty_text"),
        ({"prompt": "p", "chosen": "same ", "rejected": "same"}, "identical_responses"),
        ({"prompt": "p", "chosen": "e\u0301", "rejected": "\u00e9"}, "identical_responses"),  # NFC
        ({"prompt": [U("p")], "chosen": [A("c")], "rejected": [{"role": "robot", "content": "r"}]}, "malformed_messages"),
        ({"prompt": [U("p")], "chosen": [A("c")], "rejected": ["r"]}, "malformed_messages"),
        ({"prompt": [U("p")], "chosen": [A("c")], "rejected": [{"role": "assistant"}]}, "malformed_messages"),
        ({"prompt": [U("p")], "chosen": [A("c")], "rejected": [U("r")]}, "malformed_messages"),
        ({"chosen": [U("p"), A("c")], "rejected": [U("p"), A("c")]}, "identical_responses"),
        ({"chosen": [U("p"), A("c")], "rejected": [U("q"), A("r")]}, "missing_field"),
        ({"chosen": [U("p"), A("c")], "rejected": [U("p"), A("c"), U("more")]}, "malformed_messages"),
        ({"prompt": [U("p")], "chosen": [A(" ")], "rejected": [A("r")]}, "empty_text"),
        ({"prompt": [], "chosen": [A("c")], "rejected": [A("r")]}, "empty_text"),
        ({"prompt": {"x": 1}, "chosen": [A("c")], "rejected": [A("r")]}, "wrong_type"),
        ({"prompt": "p", "chosen": "c" * 11, "rejected": "r"}, "too_long"),
    ],
)
def test_reason_codes(record, reason):
    with pytest.raises(Invalid) as info:
        validate_record(record, FieldMap(), max_chars=10)
    assert info.value.reason == reason
    assert "\n" not in info.value.message


def test_standard_pair_and_field_mapping():
    pair = validate_record({"question": "Q?", "response_j": "good", "response_k": "bad"}, FieldMap("question", "response_j", "response_k"))
    assert (pair.prompt, pair.chosen, pair.rejected, pair.chosen_messages) == ("Q?", "good", "bad", None)
    # stored text is untouched; the id ignores whitespace/newline style/Unicode composition
    other = validate_record({"prompt": " Q?\r\n", "chosen": "good", "rejected": "bad"})
    assert other.prompt == " Q?\r\n" and other.pair_id == pair.pair_id
    assert len(pair.pair_id) == 32 and pair.pair_id == pair_id_of("Q?", "good", "bad")


def test_implicit_prompt_is_shared_prefix():
    sys_msg = {"role": "system", "content": "be brief"}
    pair = validate_record({"chosen": [sys_msg, U("2+2?"), A("4")], "rejected": [sys_msg, U("2+2?"), A("5"), U("sure?"), A("yes")]})
    assert pair.prompt_messages == [sys_msg, U("2+2?")]
    assert pair.chosen_messages == [A("4")]
    assert pair.rejected_messages == [A("5"), U("sure?"), A("yes")]
    assert pair.prompt == "system: be brief\n\nuser: 2+2?" and pair.chosen == "4"
    explicit = validate_record({"prompt": [sys_msg, U("2+2?")], "chosen": [A("4")], "rejected": [A("5"), U("sure?"), A("yes")]})
    assert explicit.pair_id == pair.pair_id


def test_string_prompt_with_message_responses():
    pair = validate_record({"prompt": "hi", "chosen": [A("hello")], "rejected": [A("go away")]})
    assert pair.prompt_messages == [U("hi")] and pair.prompt == "hi"


def test_split_is_deterministic_and_roughly_the_fraction():
    keys = [f'"question {i}"' for i in range(4000)]
    first = [split_of(k, 0.2) for k in keys]
    assert first == [split_of(k, 0.2) for k in keys]
    frac = first.count("eval") / len(keys)
    assert 0.17 < frac < 0.23
    assert all(split_of(k, 0.0) == "train" for k in keys[:50])


def test_normalize_text():
    assert normalize_text(" a\r\nb\r ") == "a\nb"
    assert normalize_text("e\u0301") == "\u00e9"
