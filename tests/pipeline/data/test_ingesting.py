"""pipeline.data.ingesting and ingest_chunks: fixed batches, first pair wins, the fast path's rows equal the exact path's."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pytest

from pipeline.core.errors import ConfigError, UserError
from pipeline.data import ingesting
from pipeline.data.ingest_chunks import process_lines
from pipeline.data.pairs import FieldMap, pair_id_of


def _rules(**kw):
    return ingesting.chunk_rules(FieldMap(), kw.get("max_chars", 0), kw.get("eval_fraction", 0.0), (), "split")


def _lines(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def test_writer_batches_depend_on_rows_only(tmp_path, monkeypatch):
    monkeypatch.setattr(ingesting, "_BATCH_ROWS", 3)
    schema = pa.schema([("x", pa.int64()), ("s", pa.string()), ("m", pa.list_(pa.string()))])
    files = []
    for cuts in ((7,), (1, 1, 5), (4, 0, 3)):
        path = tmp_path / f"{len(files)}.arrow"
        writer, start = ingesting.PairsWriter(path, schema), 0
        for n in cuts:
            xs = range(start, start + n)
            writer.add(pa.record_batch([pa.array(xs, pa.int64()), pa.array([None if x % 3 else "t%d" % x for x in xs]),
                                        pa.nulls(n, pa.list_(pa.string()))], schema=schema))
            start += n
        writer.close()
        files.append(path.read_bytes())
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == [3, 3, 1]
    assert files[0] == files[1] == files[2]


def test_first_pair_wins_across_chunks_and_within_one():
    rules = _rules()
    a, b = {"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "c", "rejected": "r"}
    dedup = ingesting.FirstPairWins()
    first = process_lines(_lines([a, b"{bad", a]), 1, "in.jsonl", rules)
    batch, entries = dedup.resolve(first, lambda line: "raw %d" % line)
    assert batch.column("prompt").to_pylist() == ["p"]
    assert [(line, reason) for line, reason, _ in entries] == [(2, "invalid_json"), (3, "duplicate_pair")]
    assert json.loads(entries[1][2])["raw"] == "raw 3"
    second = process_lines(_lines([b, a]), 4, "in.jsonl", rules)
    batch, entries = dedup.resolve(second, str)
    assert batch.column("prompt").to_pylist() == ["q"] and [e[:2] for e in entries] == [(5, "duplicate_pair")]
    assert dedup.seen == {pair_id_of("p", "c", "r"), pair_id_of("q", "c", "r")}


def test_fast_and_exact_chunk_paths_give_the_same_rows():
    rows = [{"prompt": " p ", "chosen": "c\r\nd", "rejected": "r"}, b'{"prompt": "x"}', {"prompt": "e\u0301", "chosen": "a",
            "rejected": "b", "split": "test"}, {"prompt": "p2", "chosen": "same", "rejected": "same"},
            {"chosen": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "b"}]}]
    fast = _rules(eval_fraction=0.5)
    got = [process_lines(_lines(rows), 10, "s", r) for r in (fast, dataclasses.replace(fast, fast=False))]
    assert got[0].batch.equals(got[1].batch) and got[0].quarantine == got[1].quarantine
    assert got[0].batch.column("_line").to_pylist() == [10, 12, 14]
    assert got[0].batch.column("split").to_pylist()[1] == "eval"
    assert [(line, reason) for line, reason, _ in got[0].quarantine] == [(11, "missing_field"), (13, "identical_responses")]


def test_outputs_checked_before_reading(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    with pytest.raises(ConfigError, match="same file"):
        ingesting.check_outputs([src], tmp_path / "a", tmp_path / "a")
    with pytest.raises(UserError, match="also an output"):
        ingesting.check_outputs([src], src, tmp_path / "q.jsonl")
    with pytest.raises(UserError, match="input not found"):
        ingesting.check_inputs([str(tmp_path / "nope.jsonl")], "example.jsonl")
    with pytest.raises(UserError, match="shipped example"):
        ingesting.check_inputs([str(tmp_path / "example.jsonl")], str(tmp_path / "example.jsonl"))


def test_clean_jsonl_ingest_imports_no_pandas(tmp_path):
    """pyarrow imports pandas on its first Python-object conversion: the clean path builds from buffers instead."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "in.jsonl"
    rows = [{"prompt": f" p{i}\u00e9 ", "chosen": "c", "rejected": "r", "split": "test" if i % 5 else "train"}
            for i in range(50)]
    src.write_bytes(_lines(rows + rows[:2]))  # two duplicates
    code = ("import sys; from pipeline.data import ingesting; from pipeline.data.pairs import FieldMap; "
            "from pathlib import Path; rules = ingesting.chunk_rules(FieldMap(), 40, 0.3, (), 'split'); "
            f"c = ingesting.ingest_files([Path({str(src)!r})], Path({str(tmp_path / 'o.arrow')!r}), "
            f"Path({str(tmp_path / 'q.jsonl')!r}), rules); "
            "print(c.accepted, c.quarantined, c.splits['eval'], 'pandas' in sys.modules)")
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    accepted, quarantined, held_out, pandas = done.stdout.split()
    assert (accepted, quarantined, pandas) == ("50", "2", "False") and int(held_out) >= 40


@pytest.mark.parametrize("data", [
    b'{"a": 1}\n{"b": 2}\n', b'{"a": 1}\n{"b": 2}', b'{"a": 1}\n\n{"b": 2}\n', b'{"a": 1}\n  \n', b'{"a": 1}\r\n',
    b'{"a": 1}\n{"b"\n', b' {"a": 1}\n', b'{"a": 1} \n', b'[1]\n', b'{}\n', b'\n', b'{"a": "\xff"}\n',
])
def test_plain_line_count_is_what_splitting_finds(data):
    """A chunk is plain exactly when every line, split as _nonblank_lines splits it, is an object's braces."""
    from pipeline.data.ingest_chunks import _nonblank_lines
    from pipeline.data.readers import SplitLines, plain_line_count

    lines, numbers, blob = _nonblank_lines(data, 1)
    pieces = data.split(b"\n")[: len(data.split(b"\n")) - data.endswith(b"\n")]
    plain = all(line.startswith(b"{") and line.endswith(b"}") for line in pieces) and b"\r" not in data
    assert plain_line_count(data) == (len(lines) if plain else None)
    if plain:  # then the lazy lines are those lines, and the chunk is its own blob
        assert list(SplitLines(data, len(lines))) == lines and blob is data and numbers.tolist() == [1, 2][: len(lines)]


def test_plain_chunks_give_the_rows_the_line_by_line_path_gives(monkeypatch):
    from pipeline.data import ingest_chunks

    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": "r"},
            {"prompt": " e\u0301", "chosen": "a", "rejected": "b", "split": "test"}, {"prompt": "x", "chosen": 1},
            {"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "z", "chosen": "y", "rejected": "w"}]
    data = _lines(rows)
    assert ingest_chunks.plain_line_count(data) == len(rows)
    plain = process_lines(data, 3, "s", _rules(eval_fraction=0.5))
    monkeypatch.setattr(ingest_chunks, "plain_line_count", lambda data: None)
    split = process_lines(data, 3, "s", _rules(eval_fraction=0.5))
    assert plain.batch.equals(split.batch) and plain.quarantine == split.quarantine and plain.read == split.read == 6
    assert [(line, reason) for line, reason, _ in plain.quarantine] == [(6, "missing_field"), (7, "identical_responses")]


def _many_chunks_input(path, n=300):
    """Lines of every kind (clean, duplicates across chunks, bad JSON and UTF-8, CR, blank, conversations)."""
    out = []
    for i in range(n):
        kind = i % 10
        row = {"prompt": f"question {i % 120}", "chosen": f"right {i % 120}", "rejected": f"wrong {i % 120}"}
        if kind == 3:
            out.append(b'{"prompt": "broken' + str(i).encode())
        elif kind == 5:
            out.append(json.dumps(row).encode()[:-2] + b'\xff"}')
        elif kind == 6:
            row["chosen"] = f"right\r\n{i}"
        elif kind == 7:
            out.append(b"   ")
        elif kind == 8:
            row = {"chosen": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": "b"}]}
        if kind not in (3, 5, 7):
            out.append(json.dumps(row, ensure_ascii=False).encode())
    path.write_bytes(b"\n".join(out) + b"\n")


def test_overlapped_chunks_write_the_same_bytes(tmp_path, monkeypatch):
    """The next chunk parsed on a thread while this one is validated (the default where Arrow has several threads)
    gives the same pairs file, quarantine and counts as one chunk at a time, whatever the chunking."""
    src = tmp_path / "in.jsonl"
    _many_chunks_input(src)
    monkeypatch.setattr(ingesting, "_BATCH_ROWS", 16)
    rules = _rules(eval_fraction=0.3)
    results = {}
    for chunk_bytes in (700, 2000, 1 << 20):
        monkeypatch.setattr(ingesting, "_CHUNK_BYTES", chunk_bytes)
        for overlap in (False, True):
            out = tmp_path / f"{chunk_bytes}-{overlap}"
            counts = ingesting.ingest_files([src], out / "p.arrow", out / "q.jsonl", rules, progress=False,
                                            overlap=overlap)
            results[chunk_bytes, overlap] = ((out / "p.arrow").read_bytes(), (out / "q.jsonl").read_bytes(),
                                             counts.to_dict() | {"out": "", "quarantine": ""})
    assert len(set(map(repr, results.values()))) == 1
    counts = results[700, True][2]
    assert counts["read"] == 270 and counts["by_reason"]["duplicate_pair"] > 0 and counts["splits"]["eval"] > 0


def test_an_error_in_an_overlapped_chunk_is_raised_in_input_order(tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "split": "train"} for i in range(60)]
    rows[40]["split"], rows[50]["split"] = "weird", "odd"
    src.write_bytes(_lines(rows))
    monkeypatch.setattr(ingesting, "_CHUNK_BYTES", 300)
    for overlap in (False, True):
        with pytest.raises(UserError, match=r"in.jsonl:41: split 'weird'"):
            ingesting.ingest_files([src], tmp_path / "o.arrow", tmp_path / "q.jsonl", _rules(), progress=False,
                                   overlap=overlap)
        assert not (tmp_path / "o.arrow").exists()
