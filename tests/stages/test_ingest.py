"""``lldm-dpo ingest``: accounting, quarantine, formats, split, determinism, atomicity, real GSM8K."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import UserError
from pipeline.core.paths import quarantine_path_for
from pipeline.core.schemas import PAIRS_SCHEMA, QUARANTINE_FIELDS, REASON_CODES
from pipeline.data import ingesting, readers
from stages.ingest import IngestConfig, run

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "example_model_solutions.jsonl"
REPO = Path(__file__).resolve().parents[2]


def _read(path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()


def _quarantine(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731

# One broken line per reason code (line numbers are 1-based; line 1 is a good pair).
BROKEN = {
    "invalid_json": '{"prompt": "p", "chosen": "c",',
    "missing_field": {"prompt": "p2", "chosen": "c"},
    "wrong_type": {"prompt": "p3", "chosen": 42, "rejected": "r"},
    "empty_text": {"prompt": "p4", "chosen": "   ", "rejected": "r"},
    "identical_responses": {"prompt": "p5", "chosen": "same", "rejected": "same"},
    "duplicate_pair": {"prompt": "p1", "chosen": "good", "rejected": "bad"},
    "malformed_messages": {"prompt": [U("p6")], "chosen": [A("c")], "rejected": [{"role": "wizard", "content": "r"}]},
    "too_long": {"prompt": "p7", "chosen": "x" * 500, "rejected": "r"},
}


def _run_counting(cfg: IngestConfig) -> ingesting.IngestResult:
    """``run``, also when every record is quarantined (an error that still writes both files)."""
    try:
        return run(cfg)
    except ingesting.NothingAccepted as exc:
        return exc.result


def _broken_file(tmp_path: Path) -> Path:
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps({"prompt": "p1", "chosen": "good", "rejected": "bad"}).encode()]
    for value in BROKEN.values():
        lines.append((value if isinstance(value, str) else json.dumps(value)).encode())
    lines.append(b'{"prompt": "p8", "chosen": "\xc3\x28", "rejected": "r"}')  # invalid_utf8
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_reason_code_is_quarantined_with_location(tmp_path):
    src = _broken_file(tmp_path)
    res = run(IngestConfig(inputs=[str(src)], out=str(tmp_path / "pairs.arrow"), max_chars=100, progress=False))
    assert res.read == 10 and res.accepted == 1 and res.quarantined == 9
    assert res.by_reason == {code: 1 for code in REASON_CODES}
    assert res.quarantine == str(tmp_path / "pairs.quarantine.jsonl")
    records = _quarantine(res.quarantine)
    assert [tuple(r) for r in records] == [QUARANTINE_FIELDS] * 9
    got = {r["reason"]: r for r in records}
    expected_lines = {code: i + 2 for i, code in enumerate(BROKEN)} | {"invalid_utf8": 10}
    assert {code: r["line"] for code, r in got.items()} == expected_lines
    assert all(r["source"] == str(src) for r in records)
    assert got["invalid_json"]["raw"] == BROKEN["invalid_json"]
    assert json.loads(got["wrong_type"]["raw"]) == BROKEN["wrong_type"]
    assert "'chosen'" in got["wrong_type"]["message"]
    table = _read(res.out)
    assert table.column("prompt").to_pylist() == ["p1"]
    assert table.column("source").to_pylist() == [f"{src}:1"]


def test_strict_still_writes_and_reports(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    src = _broken_file(tmp_path)
    out = tmp_path / "o.arrow"
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--strict", "--json", "--max-chars", "100"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --strict: 9 of 10 records quarantined")
    report = json.loads(result.stdout)
    assert report["read"] == 10 and out.exists() and quarantine_path_for(out).exists()


def test_cli_end_to_end_json_report_and_print_config(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    src = _write_jsonl(
        tmp_path / "in.jsonl",
        [{"question": f"q{i}", "response_j": f"right {i}", "response_k": f"wrong {i}", "meta": {"i": i}} for i in range(20)] + ["{bad"],
    )
    out, quar = tmp_path / "o" / "pairs.arrow", tmp_path / "q.jsonl"
    args = ["ingest", str(src), "--out", str(out), "--quarantine", str(quar), "--prompt-field", "question",
            "--chosen-field", "response_j", "--rejected-field", "response_k", "--keep-field", "meta", "--eval-fraction", "0.3", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("read", "accepted", "quarantined", "out", "quarantine")} == {
        "read": 21, "accepted": 20, "quarantined": 1, "out": str(out), "quarantine": str(quar)}
    assert report["by_reason"]["invalid_json"] == 1 and sum(report["by_reason"].values()) == 1
    table = _read(out)
    assert table.schema.names == PAIRS_SCHEMA.names + ["meta"]
    assert json.loads(table.column("meta")[3].as_py()) == {"i": 3}
    assert 0 < table.column("split").to_pylist().count("eval") < 20
    human = CliRunner().invoke(app, args[:-1])
    assert human.exit_code == 0 and "accepted" in human.output and "20" in human.output
    printed = CliRunner().invoke(app, ["ingest", "--print-config", "--max-chars", "77"])
    assert printed.exit_code == 0 and "max_chars: 77" in printed.output and "# " in printed.output
    missing = CliRunner().invoke(app, ["ingest", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert missing.exit_code == 1 and missing.stderr.startswith("error:") and len(missing.stderr.strip().splitlines()) == 1


def test_all_formats_several_inputs_and_implicit_prompt(tmp_path):
    datasets = pytest.importorskip("datasets")
    std = [{"prompt": "s1", "chosen": "c", "rejected": "r"}]
    conv = [{"chosen": [U("i1"), A("c")], "rejected": [U("i1"), A("r")]}]
    _write_jsonl(tmp_path / "a.jsonl", std)
    (tmp_path / "b.json").write_text(json.dumps(conv))
    pq.write_table(pa.Table.from_pylist([{"prompt": "s2", "chosen": "c", "rejected": "r"}]), tmp_path / "c.parquet")
    datasets.Dataset.from_list([{"prompt": [U("e1")], "chosen": [A("c")], "rejected": [A("r")]}]).save_to_disk(str(tmp_path / "d"))
    import gzip

    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"prompt": "s3", "chosen": "c", "rejected": "r"}) + "\n")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.parquet", "d", "e.jsonl.gz")]
    res = run(IngestConfig(inputs=inputs, out=str(tmp_path / "p.arrow"), progress=False))
    assert (res.read, res.accepted) == (5, 5)
    t = _read(res.out).to_pylist()
    assert [r["prompt"] for r in t] == ["s1", "i1", "s2", "e1", "s3"]
    assert [r["source"] for r in t] == [f"{inputs[0]}:1", f"{inputs[1]}:0", f"{inputs[2]}:0", f"{inputs[3]}:0", f"{inputs[4]}:1"]
    assert t[1]["prompt_messages"] == [U("i1")] and t[1]["chosen_messages"] == [A("c")]
    assert t[0]["prompt_messages"] is None


def test_eval_split_by_prompt_and_deterministic_bytes(tmp_path):
    src = REPO / "data" / "preference_data" / "reasoning_prefs.jsonl"
    outs = []
    for name in ("one", "two"):
        cfg = IngestConfig(inputs=[str(src)], out=str(tmp_path / name / "pairs.arrow"), eval_fraction=0.2, progress=False)
        outs.append(run(cfg))
    a, b = outs
    assert Path(a.out).read_bytes() == Path(b.out).read_bytes()
    assert Path(a.quarantine).read_bytes() == Path(b.quarantine).read_bytes()
    rows = _read(a.out).to_pylist()
    assert a.accepted >= 2000 and a.quarantined == 0
    by_side = {"train": set(), "eval": set()}
    for r in rows:
        by_side[r["split"]].add(r["prompt"])
    assert not by_side["train"] & by_side["eval"]
    assert 0.15 < len(by_side["eval"]) / (len(by_side["eval"]) + len(by_side["train"])) < 0.25
    assert len({r["prompt"] for r in rows}) < len(rows)  # some prompts have 2 pairs: the by-prompt rule matters


def test_failure_mid_write_keeps_old_output(tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(10)])
    cfg = IngestConfig(inputs=[str(src)], out=str(tmp_path / "p.arrow"), progress=False)
    run(cfg)
    before = (Path(cfg.out).read_bytes(), cfg.quarantine_path.read_bytes())
    monkeypatch.setattr(ingesting, "_BATCH_ROWS", 2)  # force batches onto disk before the crash
    monkeypatch.setattr(ingesting, "_CHUNK_BYTES", 100)  # several chunks, so several adds
    calls = {"n": 0}
    real = ingesting.PairsWriter.add

    def boom(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(self, batch)

    monkeypatch.setattr(ingesting.PairsWriter, "add", boom)
    _write_jsonl(src, [{"prompt": f"new{i}", "chosen": "c", "rejected": "r"} for i in range(10)] + ["{bad"])
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(cfg)
    assert (Path(cfg.out).read_bytes(), cfg.quarantine_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lldm-dpo-written", "in.jsonl", "p.arrow",
                                                          "p.quarantine.jsonl"]


def test_config_errors(tmp_path):
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_fraction"):
        IngestConfig(eval_fraction=1.5)
    with pytest.raises(ConfigError, match="clashes"):
        IngestConfig(keep_fields=["split"])
    with pytest.raises(ConfigError, match="must differ"):
        IngestConfig(chosen_field="x", rejected_field="x")
    with pytest.raises(UserError, match="no input"):
        run(IngestConfig(inputs=[], out=str(tmp_path / "p.arrow")))
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(UserError, match="also an output"):
        run(IngestConfig(inputs=[str(src)], out=str(tmp_path / "p.arrow"), quarantine=str(src)))


def test_default_yaml_matches_config():
    from pipeline.core.config import config_to_yaml

    shipped = (REPO / "stages" / "ingest.yaml").read_text(encoding="utf-8")
    assert shipped == config_to_yaml(IngestConfig(), with_docs=True)


_GOOD = st.fixed_dictionaries(
    {"prompt": st.text(max_size=8), "chosen": st.text(max_size=8), "rejected": st.one_of(st.text(max_size=8), st.integers(), st.none())}
)
_LINE = st.one_of(
    _GOOD.map(lambda d: json.dumps(d).encode()),
    _GOOD.map(lambda d: json.dumps(d).encode()[: len(json.dumps(d)) // 2]),  # truncated line
    st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b),  # random bytes
    st.sampled_from([b"[]", b"null", b"{}", b'{"prompt": "a", "chosen": "b", "rejected": "c"}']),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=25))
def test_fuzz_accounting_identity(tmp_path, lines):
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    res = _run_counting(IngestConfig(inputs=[str(src)], out=str(tmp_path / "f.arrow"), progress=False))
    assert res.read == res.accepted + res.quarantined
    # Blank lines are not records; nor is a UTF-8 byte-order mark at the start of the file.
    texts = [lines[0].removeprefix(b"\xef\xbb\xbf")] + lines[1:] if lines else []
    assert res.read == sum(1 for line in texts if line.strip(b" \t\x0b\x0c"))
    assert _read(res.out).num_rows == res.accepted
    assert len(_quarantine(res.quarantine)) == res.quarantined
    assert sum(res.by_reason.values()) == res.quarantined


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"shared GSM8K data not found at {GSM8K}")
def test_real_gsm8k_model_solutions(tmp_path):
    """Recipe: prompt = question; chosen = the ground-truth solution; rejected = each
    incorrect model solution (one pair per incorrect solution)."""
    rows = []
    for line in GSM8K.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for key in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"):
            if not rec[key]["is_correct"]:
                rows.append({"question": rec["question"], "correct": rec["ground_truth"], "incorrect": rec[key]["solution"], "model": key})
    src = _write_jsonl(tmp_path / "gsm8k_pairs.jsonl", rows)
    cfg = IngestConfig(inputs=[str(src)], out=str(tmp_path / "g.arrow"), prompt_field="question", chosen_field="correct",
                       rejected_field="incorrect", keep_fields=["model"], eval_fraction=0.1, progress=False)
    res = run(cfg)
    assert res.read == len(rows) == 3275
    assert res.read == res.accepted + res.quarantined
    # Two models can write the same wrong solution: those are the only expected rejects.
    assert set(k for k, v in res.by_reason.items() if v) <= {"duplicate_pair"}
    t = _read(res.out).to_pylist()
    questions = {"train": set(), "eval": set()}
    for r in t:
        questions[r["split"]].add(r["prompt"])
    assert not questions["train"] & questions["eval"] and questions["eval"]
    assert len({r["pair_id"] for r in t}) == len(t)
    assert {r["model"] for r in t} == {"6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"}


def test_output_independent_of_workers_and_chunking(tmp_path, monkeypatch):
    """Parallel parsing (several chunks, duplicates across chunks) gives the same bytes as one process."""
    rows = []
    for i in range(600):
        rows.append({"prompt": f"q{i % 300}", "chosen": f"right {i % 300}", "rejected": f"wrong {i % 300}"})
        if i % 97 == 0:
            rows.append("{broken")
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    monkeypatch.setattr(ingesting, "_BATCH_ROWS", 64)
    monkeypatch.setattr(ingesting, "_PARALLEL_MIN_BYTES", 0)  # use the pool even for this small file
    results = []
    for workers, chunk in ((1, 1 << 20), (2, 2048), (2, 999)):
        monkeypatch.setattr(ingesting, "_CHUNK_BYTES", chunk)
        out = tmp_path / f"w{workers}_{chunk}" / "pairs.arrow"
        res = run(IngestConfig(inputs=[str(src)], out=str(out), eval_fraction=0.25, workers=workers, progress=False))
        results.append((res.to_dict() | {"out": None, "quarantine": None}, out.read_bytes(), Path(res.quarantine).read_bytes()))
    assert results[0][0]["by_reason"]["duplicate_pair"] == 300 and results[0][0]["by_reason"]["invalid_json"] == 7
    assert results[0] == results[1] == results[2]
    lines = [json.loads(x)["line"] for x in results[0][2].decode().splitlines()]
    assert lines == sorted(lines)


_TEXT = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["a", " a ", "a\r\n", "\x1c", "é", "e\u0301", "", "  ", "\u00a0b\u3000", "\u2028", "x\u0085", "\U0001f600"]),
)
_STD = st.fixed_dictionaries(
    {"prompt": _TEXT, "chosen": _TEXT, "rejected": st.one_of(_TEXT, st.none(), st.integers())}, optional={"x": st.integers()}
)
_FAST_LINE = st.one_of(
    _STD.map(lambda d: json.dumps(d).encode()),
    _STD.map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
    _STD.map(lambda d: json.dumps(d).encode()[:-3]),
    st.binary(max_size=20).filter(lambda b: b"\n" not in b),
    st.sampled_from([b"null", b"{} null", b"[]", b"{}", b'{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}',
                     b'{"prompt": "\\ud800", "chosen": "c", "rejected": "d"}', b'{"prompt": "a", "chosen": "b", "rejected": "c"}\r']),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_FAST_LINE, max_size=30))
def test_fuzz_fast_path_matches_exact_path(tmp_path, lines):
    """The Arrow fast path for JSONL gives the same bytes as the per-record path, bad lines included."""
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    outputs = []
    # Fast path; fast path with Arrow's multi-block threaded parse forced; exact path.
    for fast, parallel_bytes in ((True, readers._PARALLEL_PARSE_BYTES), (True, 0), (False, readers._PARALLEL_PARSE_BYTES)):
        default_bytes = readers._PARALLEL_PARSE_BYTES
        ingesting._FAST_PATH, readers._PARALLEL_PARSE_BYTES = fast, parallel_bytes
        try:
            res = _run_counting(IngestConfig(inputs=[str(src)], out=str(tmp_path / f"{fast}.arrow"), max_chars=5, eval_fraction=0.5, progress=False))
        finally:
            ingesting._FAST_PATH, readers._PARALLEL_PARSE_BYTES = True, default_bytes
        outputs.append((res.to_dict() | {"out": None, "quarantine": None}, Path(res.out).read_bytes(), Path(res.quarantine).read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


def test_shipped_example_data_is_what_the_generator_writes(tmp_path):
    import importlib.util
    import subprocess
    import sys

    script = REPO / "scripts" / "make_example_data.py"
    subprocess.run([sys.executable, str(script), "--root", str(tmp_path)], check=True, capture_output=True)
    for rel in ("preference_data/reasoning_prefs.jsonl", "benchmarks/arithmetic_heldout.jsonl"):
        assert (tmp_path / rel).read_bytes() == (REPO / "data" / rel).read_bytes(), rel
    prefs = [json.loads(x) for x in (REPO / "data/preference_data/reasoning_prefs.jsonl").read_text().splitlines()]
    bench = [json.loads(x) for x in (REPO / "data/benchmarks/arithmetic_heldout.jsonl").read_text().splitlines()]
    assert len(prefs) >= 2000 and len(bench) >= 200
    assert not {p["prompt"] for p in prefs} & {b["question"] for b in bench}
    assert {p["flaw"] for p in prefs} == {"wrong_operation", "dropped_step", "arithmetic_slip", "unit_confusion"}
    for p in prefs:
        good, bad = (int(p[k].rsplit("#### ", 1)[1]) for k in ("chosen", "rejected"))
        assert good != bad
    assert all(isinstance(b["answer"], int) for b in bench)
    spec = importlib.util.spec_from_file_location("make_example_data", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.generate(7, 30, 5) == mod.generate(7, 30, 5)


# --- issue 11: public shapes, all-quarantined, user splits, .json.gz, deep records, outputs ---


def test_every_record_quarantined_for_one_reason_is_an_error_naming_the_fields(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    rows = [{"question": f"q{i}", "answer_good": f"g{i}", "answer_bad": f"b{i}", "id": i} for i in range(5)]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.arrow"
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--no-progress"])
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ingest: all 5 records were quarantined as missing_field")
    assert "question, answer_good, answer_bad, id" in err
    assert "--prompt-field" in err and "--chosen-field" in err and "--rejected-field" in err
    # both files and the report are still written (the quarantine is what to look at)
    assert len(_quarantine(quarantine_path_for(out))) == 5 and _read(out).num_rows == 0
    as_json = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["by_reason"]["missing_field"] == 5
    with pytest.raises(ingesting.NothingAccepted) as info:
        run(IngestConfig(inputs=[str(src)], out=str(out), progress=False))
    assert info.value.result.by_reason["missing_field"] == 5
    # mapping the fields as the message says fixes it
    fixed = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--prompt-field", "question",
                                     "--chosen-field", "answer_good", "--rejected-field", "answer_bad", "--json"])
    assert fixed.exit_code == 0 and json.loads(fixed.stdout)["accepted"] == 5
    # all too long: the limit is named
    with pytest.raises(UserError, match=r"quarantined as too_long.*--max-chars 1 "):
        run(IngestConfig(inputs=[str(_write_jsonl(tmp_path / "l.jsonl", [{"prompt": "pp", "chosen": "cc", "rejected": "rr"}]))],
                         out=str(out), max_chars=1, progress=False))


def test_report_counts_every_reason_including_too_long(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    src = _broken_file(tmp_path)
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o.arrow"), "--max-chars", "100"])
    assert result.exit_code == 0, result.output
    for code in REASON_CODES:  # one of each in the broken file: every reason has its own row with its count
        assert any(line.split("│")[1:3] and line.split("│")[1].strip() == code and line.split("│")[2].strip() == "1"
                   for line in result.stdout.splitlines()), (code, result.stdout)
    report = json.loads(CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o.arrow"), "--max-chars", "100", "--json"]).stdout)
    assert report["by_reason"]["too_long"] == 1 and report["quarantined"] == sum(report["by_reason"].values())


def _split_of_prompt(path) -> dict[str, str]:
    return {r["prompt"]: r["split"] for r in _read(path).to_pylist()}


def test_datasetdict_keeps_its_splits_and_eval_fraction_draws_from_train(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = [{"prompt": f"t{i}", "chosen": "c", "rejected": "r"} for i in range(40)]
    test = [{"prompt": f"e{i}", "chosen": "c", "rejected": "r"} for i in range(5)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(train), "test_prefs": datasets.Dataset.from_list(test)}).save_to_disk(
        str(tmp_path / "dd"))
    res = run(IngestConfig(inputs=[str(tmp_path / "dd")], out=str(tmp_path / "a.arrow"), progress=False))
    assert res.splits == {"train": 40, "eval": 5}
    got = _split_of_prompt(res.out)
    assert all(got[f"e{i}"] == "eval" for i in range(5)) and all(got[f"t{i}"] == "train" for i in range(40))
    # --eval-fraction holds out a share of the train prompts; the user's eval split stays eval
    res = run(IngestConfig(inputs=[str(tmp_path / "dd")], out=str(tmp_path / "b.arrow"), eval_fraction=0.5, progress=False))
    got = _split_of_prompt(res.out)
    assert all(got[f"e{i}"] == "eval" for i in range(5))
    assert 5 < sum(got[f"t{i}"] == "eval" for i in range(40)) < 35
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "holdout": datasets.Dataset.from_list(test)}).save_to_disk(
        str(tmp_path / "odd"))
    with pytest.raises(UserError, match=r"odd\[holdout\]:0: split 'holdout' is neither"):
        run(IngestConfig(inputs=[str(tmp_path / "odd")], out=str(tmp_path / "c.arrow"), progress=False))


def test_split_column_in_jsonl_json_and_parquet(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "split": ["train", "test", "validation", None][i % 4]} for i in range(24)]
    rows[5] = {"prompt": "conv", "chosen": [A("c")], "rejected": [A("r")], "split": "test"}  # a record through the exact path
    want = {r["prompt"]: "eval" if r["split"] in ("test", "validation") else "train" for r in rows}
    _write_jsonl(tmp_path / "in.jsonl", rows)
    (tmp_path / "in.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["prompt"] != "conv"]), tmp_path / "in.parquet")
    outs = []
    for name in ("in.jsonl", "in.json", "in.parquet"):
        res = run(IngestConfig(inputs=[str(tmp_path / name)], out=str(tmp_path / f"{name}.arrow"), progress=False))
        got = _split_of_prompt(res.out)
        assert got == {p: s for p, s in want.items() if p in got} and len(got) >= 23, name
        outs.append(res)
    assert outs[0].splits == {"train": 12, "eval": 12}
    # the fast path and the per-record path agree
    ingesting._FAST_PATH = False
    try:
        slow = run(IngestConfig(inputs=[str(tmp_path / "in.jsonl")], out=str(tmp_path / "slow.arrow"), progress=False))
    finally:
        ingesting._FAST_PATH = True
    assert Path(slow.out).read_bytes() == Path(outs[0].out).read_bytes()
    # --split-field '' ignores the column; an unknown name is a one-line error naming file and line
    res = run(IngestConfig(inputs=[str(tmp_path / "in.jsonl")], out=str(tmp_path / "n.arrow"), split_field="", progress=False))
    assert res.splits == {"train": 24, "eval": 0}
    _write_jsonl(tmp_path / "bad.jsonl", rows[:3] + [{"prompt": "z", "chosen": "c", "rejected": "r", "split": "math"}])
    with pytest.raises(UserError, match=r"bad.jsonl:4: split 'math' is neither.*--split-field ''"):
        run(IngestConfig(inputs=[str(tmp_path / "bad.jsonl")], out=str(tmp_path / "b.arrow"), progress=False))


def test_json_gz_array_ingests_as_array(tmp_path):
    import gzip

    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)]
    with gzip.open(tmp_path / "a.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)
    res = run(IngestConfig(inputs=[str(tmp_path / "a.json.gz")], out=str(tmp_path / "a.arrow"), progress=False))
    assert (res.read, res.accepted) == (3, 3)
    assert [r["source"] for r in _read(res.out).to_pylist()] == [f"{tmp_path / 'a.json.gz'}:{i}" for i in range(3)]


def test_deeply_nested_record_is_quarantined_with_its_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps({"prompt": "p1", "chosen": "c", "rejected": "r"}),
             '{"prompt": ' + deep + ', "chosen": "c", "rejected": "r"}',
             '{"meta": ' + deep + ', "prompt": "p3", "chosen": "c", "rejected": "r"}',  # deep, but not in a pair field
             json.dumps({"prompt": "p4", "chosen": "c", "rejected": "r"})]
    src = _write_jsonl(tmp_path / "deep.jsonl", lines)
    outputs = []
    for fast in (True, False):
        ingesting._FAST_PATH = fast
        try:
            res = run(IngestConfig(inputs=[str(src)], out=str(tmp_path / f"{fast}.arrow"), progress=False))
        finally:
            ingesting._FAST_PATH = True
        q = _quarantine(res.quarantine)
        assert [(r["line"], r["reason"]) for r in q] == [(2, "invalid_json")] and "nested deeper" in q[0]["message"]
        assert [r["prompt"] for r in _read(res.out).to_pylist()] == ["p1", "p3", "p4"]
        outputs.append((Path(res.out).read_bytes(), Path(res.quarantine).read_bytes()))
    assert outputs[0] == outputs[1]


def test_unwritable_output_is_a_one_line_error_before_reading_input(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    # an input that would fail to read: the output error must come first
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(b"not gzip")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "pairs.arrow", tmp_path):
        result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out)])
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert result.stderr.startswith(f"error: {out}:") and "--out" in result.stderr
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o.arrow"), "--quarantine", str(tmp_path / "file" / "q")])
    assert result.exit_code == 1 and "--quarantine" in result.stderr
    import os

    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(ro / "p.arrow")])
        assert result.exit_code == 1 and "not writable" in result.stderr
