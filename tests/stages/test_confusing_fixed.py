"""The confusing ones of issue 24 (item 8), each fixed: every case failed on the main it was filed against."""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app

runner = CliRunner()


def test_eval_scores_empty_means_skip(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    args = ["eval", "--scores", "", "--benchmark", str(bench), "--model", "micro", "--out", str(tmp_path / "ev"),
            "--gen-length", "4", "--block-length", "4", "--steps", "2", "--device", "cpu"]
    printed = yaml.safe_load(runner.invoke(app, args + ["--print-config"]).stdout)
    assert printed["scores"] is None
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "task_accuracy" in json.loads((tmp_path / "ev" / "eval.json").read_text())


def test_weights_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert runner.invoke(app, ["init-model", "micro", str(tmp_path / "m")]).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir() if not p.name.startswith(".")}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_ingest_of_an_empty_file_exits_1(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["ingest", str(empty), "--out", str(tmp_path / "p.arrow")])
    assert res.exit_code == 1 and "empty input" in res.stderr, res.output


def test_ingest_with_no_input_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["ingest", "--out", str(tmp_path / "p.arrow")])
    assert res.exit_code == 1 and res.stderr.startswith("error: ingest: no input given (pass one or more INPUT")


def test_run_print_config_rejects_a_typo_as_run_does():
    res = runner.invoke(app, ["run", "--train", "{learning_rat: 0.1}", "--print-config"])
    assert res.exit_code == 1 and "unknown key 'learning_rat'" in res.stderr and res.stderr.count("\n") == 1


def _ingest(tmp_path, record, *flags):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(record) + "\n")
    return runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "p.arrow"), *flags])


def test_the_field_mapping_hint_only_when_the_names_are_wrong(tmp_path):
    wrong_names = _ingest(tmp_path, {"question": "q", "good": "a", "bad": "b"})
    assert wrong_names.exit_code == 1 and "--prompt-field" in wrong_names.stderr
    wrong_type = _ingest(tmp_path, {"prompt": "q", "chosen": 3, "rejected": "b"})
    assert wrong_type.exit_code == 1 and "wrong_type" in wrong_type.stderr
    assert "--prompt-field" not in wrong_type.stderr


def test_loss_weights_take_commas_like_loss(small_cache):
    args = ["train", str(small_cache), "--loss", "sigmoid,sft", "--print-config"]
    res = runner.invoke(app, args + ["--loss-weights", "1,0.5"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["loss_weights"] == [1.0, 0.5]
    res = runner.invoke(app, args + ["--loss-weights", "1", "--loss-weights", "2"])
    assert yaml.safe_load(res.stdout)["loss_weights"] == [1.0, 2.0]
    res = runner.invoke(app, args + ["--loss-weights", "1,b"])
    assert res.exit_code == 1 and res.stderr == "error: --loss-weights: 'b' is not a number (give floats, " \
                                               "comma-separated: e.g. 1,0.5)\n"


@pytest.mark.parametrize("argv", [["ingest", "/no/such/input.jsonl"], ["query", "SELECT 1", "--scores", "/no/dir"]])
def test_errors_under_json_are_json(argv):
    res = runner.invoke(app, argv + ["--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["exit_code"] == 1 and data["error"] in res.stderr


def test_ingest_json_failure_is_one_document(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["ingest", str(empty), "--out", str(tmp_path / "p.arrow"), "--json"])
    data = json.loads(res.stdout)
    assert res.exit_code == 1 and data["read"] == 0 and "empty input" in data["error"]
