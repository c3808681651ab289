"""Readers (every input format, per-line parse errors) and pair validation (every reason code)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import UserError
from pipeline.data.pairs import FieldMap, Invalid, normalize_text, pair_id_of, split_of, validate_record
from pipeline.data.readers import iter_records, parse_line

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


# --- bulk (Arrow) helpers of the JSONL fast path ----------------------------------


def test_unicode_ws_is_what_str_strip_removes():
    import sys

    from pipeline.data.pairs import UNICODE_WS

    assert UNICODE_WS == "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert all((c + "a" + c).strip() == "a" for c in UNICODE_WS)


TEXTS = ["plain", " lead", "trail\t", "\u00a0nbsp", "ideo\u3000", "caf\u00e9", "e\u0301", "\u2028x", "x\u0085", "", "  ", "\U0001f600"]


def test_arrow_pair_ids_and_splits_match_the_per_row_definition():
    from pipeline.data.pairs import arrow_pair_ids, arrow_splits, normalize_text

    rows = [(TEXTS[i % len(TEXTS)] + "p", TEXTS[(i * 5) % len(TEXTS)] + "c", "r" + TEXTS[(i * 7) % len(TEXTS)]) for i in range(60)]
    norm = [[normalize_text(t) for t in row] for row in rows]
    cols = [pa.array([n[k] for n in norm], pa.string()) for k in range(3)]
    assert arrow_pair_ids(*cols) == [pair_id_of(*n) for n in norm]
    assert arrow_splits(cols[0], 0.5) == [split_of(n[0], 0.5) for n in norm]
    # A sliced array (non-zero offset) hashes the same.
    assert arrow_pair_ids(*(c.slice(7, 20) for c in cols)) == [pair_id_of(*n) for n in norm[7:27]]


def test_arrow_clean_mask_accepts_only_what_validate_record_accepts_unchanged():
    import unicodedata

    from pipeline.data.pairs import arrow_clean_mask

    rows = [(a, b, c) for a in TEXTS for b in TEXTS[:6] for c in ("x", "plain", "\u00a0y\u3000")]
    rows += [("a\rb", "c", "d"), ("p", "c\r\n", "d"), (None, "c", "d")]
    cols = [pa.array([r[k] for r in rows], pa.string()) for k in range(3)]
    for max_chars in (0, 5):
        for cr in (True, list(range(len(rows) - 3, len(rows)))):
            mask, normalized = arrow_clean_mask(*cols, max_chars, cr)
            for i, (row, ok) in enumerate(zip(rows, mask.to_pylist())):
                try:
                    pair = validate_record(dict(zip(("prompt", "chosen", "rejected"), row)), max_chars=max_chars)
                except Invalid:
                    pair = None
                if ok:  # accepted in bulk: the exact path accepts it with the same normalized texts
                    assert pair is not None and pair.pair_id == pair_id_of(*(n[i].as_py() for n in normalized)), row
                elif pair is not None:  # left to the exact path: only rows needing more than strip()
                    assert any("\r" in t or not unicodedata.is_normalized("NFC", t) for t in row), row


def test_escape_lines_finds_every_line_with_cr_or_escapes():
    from pipeline.data.readers import escape_lines

    lines = [b'{"a": "x"}', b'{"a": "\\u00e9"}', b'{"a": "y\\r"}', b"{}", b'{"a": "\\\\q"}', b'{"a": "z\rz"}', b'{"a": "\\n"}', b"\\u"]
    naive = [i for i, line in enumerate(lines) if b"\r" in line or b"\\r" in line or b"\\u" in line]
    assert escape_lines(lines) == naive == [1, 2, 5, 7]
    assert escape_lines([b"{}", b"{}"]) == []


def test_arrow_segments_cover_every_line_once(monkeypatch):
    from pipeline.data import readers

    good = [json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}).encode() for i in range(400)]
    lines = list(good)
    lines[10] = b'{"prompt": 1, "chosen": "c", "rejected": "r"}'  # passes the shape check, Arrow rejects it
    lines[200] = b'{"prompt": "p", "chosen": "c"'  # cut short
    lines[300] = b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}'  # invalid UTF-8
    lines[350] = b'{"prompt": "\\ud800", "chosen": "c", "rejected": "r"}'  # lone surrogate escape
    monkeypatch.setattr(readers.pa, "cpu_count", lambda: 2)  # several blocks are parsed only with several threads
    for parallel_bytes in (1 << 30, 0):  # single-block parse, and several blocks on Arrow's threads
        monkeypatch.setattr(readers, "_PARALLEL_PARSE_BYTES", parallel_bytes)
        monkeypatch.setattr(readers, "_RUN_LINES", 16)
        seen, exact = [], []
        for rows, table in readers.arrow_segments(lines, ("prompt", "chosen", "rejected")):
            rows = list(rows)
            seen += rows
            if table is None:
                exact += rows
            else:
                assert table.column("prompt").to_pylist() == [json.loads(lines[i])["prompt"] for i in rows]
        assert sorted(seen) == list(range(len(lines)))
        assert {10, 200, 300, 350} <= set(exact) and len(exact) <= 4 + 16


# --- public dataset shapes (issue 11) ---------------------------------------------

S = lambda c: {"role": "system", "content": c}  # noqa: E731


def test_ultrafeedback_rows_drop_the_repeated_prompt_turn():
    """UltraFeedback-binarized: a string prompt, chosen/rejected as whole conversations repeating it."""
    row = {"prompt": "Name a prime. ", "chosen": [U("Name a prime."), A("7")], "rejected": [U("Name a prime."), A("8")]}
    pair = validate_record(row)
    assert pair.prompt_messages == [U("Name a prime. ")]
    assert (pair.chosen_messages, pair.rejected_messages) == ([A("7")], [A("8")])
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Name a prime. ", "7", "8")
    # the same pair as its explicit-prompt form: the same id (and duplicates across shapes are found)
    assert pair.pair_id == validate_record({"prompt": "Name a prime.", "chosen": [A("7")], "rejected": [A("8")]}).pair_id
    # a message-list prompt repeated in full is removed the same way
    msgs = [S("be brief"), U("Name a prime.")]
    again = validate_record({"prompt": msgs, "chosen": msgs + [A("7")], "rejected": msgs + [A("8")]})
    assert (again.prompt_messages, again.chosen_messages) == (msgs, [A("7")])
    # a system turn before the repeated user turn: the shared turns are the prompt (TRL's implicit prompt)
    sys_first = validate_record({"prompt": "Name a prime.", "chosen": msgs + [A("7")], "rejected": msgs + [A("8")]})
    assert (sys_first.prompt_messages, sys_first.chosen_messages, sys_first.rejected_messages) == (msgs, [A("7")], [A("8")])


def test_conversations_that_contradict_the_prompt_are_malformed():
    with pytest.raises(Invalid) as info:
        validate_record({"prompt": "Name a prime.", "chosen": [U("Other question"), A("7")], "rejected": [U("Other question"), A("8")]})
    assert info.value.reason == "malformed_messages" and "do not repeat field 'prompt'" in info.value.message
    # responses that only share an opening assistant turn are responses, as given
    pair = validate_record({"prompt": "q", "chosen": [A("Sure."), U("go"), A("7")], "rejected": [A("Sure."), U("go"), A("8")]})
    assert pair.prompt_messages == [U("q")] and pair.chosen_messages[0] == A("Sure.")


def test_anthropic_hh_strings_become_messages_with_the_shared_prompt():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4"
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5, I think"
    pair = validate_record({"chosen": chosen, "rejected": rejected})
    assert pair.prompt_messages == [U("Hi there"), A("Hello!"), U("What is 2+2?")]
    assert (pair.chosen_messages, pair.rejected_messages) == ([A("4")], [A("5, I think")])
    conv = validate_record({"prompt": [U("Hi there"), A("Hello!"), U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5, I think")]})
    assert pair.pair_id == conv.pair_id
    # strings without a prompt that are not HH transcripts stay missing_field
    with pytest.raises(Invalid) as info:
        validate_record({"chosen": "4", "rejected": "5"})
    assert (info.value.reason, info.value.message) == ("missing_field", "field 'prompt' is missing")
    with pytest.raises(Invalid) as info:  # only one side is a transcript: the message says which is not
        validate_record({"chosen": chosen, "rejected": "5"})
    assert info.value.reason == "missing_field" and "field 'rejected' is not an Anthropic HH transcript" in info.value.message


def test_declared_split_names():
    from pipeline.data.pairs import declared_split

    assert [declared_split(n) for n in ("train", "TRAIN_prefs", "test", "test_prefs", "validation", "valid", "eval", "dev")] == [
        "train", "train", "eval", "eval", "eval", "eval", "eval", "eval"]
    for bad in ("holdout", "", 3):
        with pytest.raises(ValueError):
            declared_split(bad)


def test_json_gz_array_is_read_as_an_array(tmp_path):
    with gzip.open(tmp_path / "a.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n  " + json.dumps(ROWS, indent=2))
    assert _values(tmp_path / "a.json.gz") == [(0, ROWS[0], None), (1, ROWS[1], None)]
    with gzip.open(tmp_path / "l.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    assert _values(tmp_path / "l.json.gz") == [(1, ROWS[0], None), (2, ROWS[1], None)]
    (tmp_path / "x.json.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="x.json.gz: cannot read input"):
        list(iter_records(tmp_path / "x.json.gz"))


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_a_record_not_a_crash(tmp_path):
    rec = parse_line(('{"prompt": ' + DEEP + ', "chosen": "c", "rejected": "r"}').encode(), "f.jsonl", 3)
    assert (rec.reason, rec.line) == ("invalid_json", 3) and "nested deeper" in rec.message
    # in an array, the deep element alone is rejected; the elements after it are read
    (tmp_path / "a.json").write_text("[" + json.dumps(ROWS[0]) + ", {\"x\": " + DEEP + ', "s": "]}["}, ' + json.dumps(ROWS[1]) + "]")
    got = _values(tmp_path / "a.json")
    assert [(line, reason) for line, _, reason in got] == [(0, None), (1, "invalid_json"), (2, None)]
    assert got[2][1] == ROWS[1]
    (tmp_path / "b.json").write_text("[" + json.dumps(ROWS[0]) + ", " + "[" * 100_000)
    assert [reason for _, _, reason in _values(tmp_path / "b.json")] == [None, "invalid_json"]


def test_datasetdict_records_carry_their_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.split for r in iter_records(tmp_path / "dd")] == ["train", "train", "test"]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert [r.split for r in iter_records(tmp_path / "ds")] == [None, None]


def test_texts_are_all_nfc_exactly_when_joined_by_newlines_they_are():
    """pairs._all_nfc asks once of the texts joined by newlines: the same answer as asking each, for texts that
    compose across their ends (e + combining acute, Hangul jamo), reorder (combining marks), or decompose."""
    import random
    import unicodedata

    from pipeline.data.pairs import _all_nfc

    palette = ["e", "\u0301", "\u0327", "\u00e9", "\u1100", "\u1161", "\u11a8", "\uac00", "\u212b", "\u0344", "a",
               "\n", " ", "\u0f73", "\u05b0", "\u0591"]
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        texts = ["".join(rng.choices(palette, k=rng.randrange(0, 4))) for _ in range(rng.randrange(1, 4))]
        each = all(unicodedata.is_normalized("NFC", t) for t in texts)
        assert _all_nfc(pa.array(texts, pa.string())) == each, texts
        assert _all_nfc(pa.array(["x", *texts], pa.string()).slice(1)) == each  # an offset array too
        seen.add(each)
    assert seen == {True, False}
