"""eval --benchmark without a cache measures task accuracy alone; preference figures come only from a cache
with an eval split; accuracies on few pairs, or on one training step's pairs, come with a warning (issue 32)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli.loading import load_config
from pipeline.core.errors import UserError
from pipeline.evaluation.intervals import accuracy_record, few_items_warning

FAST = {"model": "micro", "gen_length": 8, "block_length": 8, "steps": 4, "device": "cpu", "train_sample": 0}


def _bench(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"})
                               for a in range(3)) + "\n")
    return bench


def test_eval_benchmark_without_a_cache_measures_task_accuracy_alone(tmp_path, monkeypatch, capsys):
    from stages.evaluate import EvalConfig, run

    monkeypatch.chdir(tmp_path)  # no cache/ref-scores here: the default names a folder the user never made
    cfg = load_config(EvalConfig, None, {**FAST, "benchmark": _bench(tmp_path), "out": tmp_path / "run"})
    result = run(cfg)
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(data["task_accuracy"]) == {"after"} and "preference_accuracy" not in data
    assert result.task_items == 3 and result.pairs == 0 and data["record"]["cache"] is None
    assert "no reference cache at the default cache/ref-scores: task accuracy only" in capsys.readouterr().err
    # a cache the user names is still required to exist
    with pytest.raises(UserError, match="missing"):
        run(load_config(EvalConfig, None, {**FAST, "benchmark": _bench(tmp_path), "out": tmp_path / "r2",
                                           "scores": tmp_path / "missing"}))


def test_a_cache_without_an_eval_split_still_serves_a_task_accuracy_eval(tmp_path, capsys):
    from stages.evaluate import EvalConfig, run
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref
    from tests.conftest import ingest_pairs

    cache = tmp_path / "cache"
    score_ref(ScoreRefConfig(pairs=ingest_pairs(tmp_path, n=6, eval_fraction=0.0), model="micro", out=cache,
                             samples=2, device="cpu", progress=False))
    result = run(EvalConfig(scores=cache, benchmark=_bench(tmp_path), out=tmp_path / "run", **FAST))
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(data["task_accuracy"]) == {"before", "after"} and "preference_accuracy" not in data
    assert result.pairs == 0
    assert "holds no pairs of split 'eval': no preference figures, task accuracy only" in capsys.readouterr().err
    with pytest.raises(UserError, match="holds no pairs of split 'eval'"):  # nothing else asked: still refused
        run(EvalConfig(scores=cache, out=tmp_path / "run2", **FAST))


def test_a_preference_accuracy_on_few_held_out_pairs_is_warned_of(small_cache, tmp_path, capsys):
    from stages.evaluate import EvalConfig, run

    result = run(EvalConfig(scores=small_cache, out=tmp_path / "run", **{**FAST, "train_sample": 0}))
    err = capsys.readouterr().err
    assert 0 < result.pairs < 50
    assert f"warning: preference accuracy rests on {result.pairs} held-out pairs (fewer than 50)" in err


def test_few_items_warning_and_trains_closing_notes():
    from pipeline.trainer.dpo_checks import interval_warnings

    assert few_items_warning("x", accuracy_record(30, 50), "pairs") is None
    assert few_items_warning("x", accuracy_record(0, 0), "pairs") is None
    line = few_items_warning("x", accuracy_record(5, 10), "pairs")
    assert line.startswith("warning: x rests on 10 pairs (fewer than 50): its 95% interval 0.24-0.76")
    lines = interval_warnings({"rewards/accuracies": accuracy_record(1, 2),
                               "eval/rewards/accuracies": accuracy_record(3, 6)})
    assert "over the last step's 2 pairs only" in lines[0] and "rests on 6 held-out pairs" in lines[1]
    assert interval_warnings({"eval/rewards/accuracies": accuracy_record(60, 100)}) == []


def test_ingest_warns_when_most_records_are_quarantined(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    src = tmp_path / "p.jsonl"
    rows = [{"prompt": "q", "chosen": "a" * 50, "rejected": "b"}] * 3 + [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o.arrow"), "--max-chars", "20"])
    assert res.exit_code == 0, res.output
    assert "warning: 3 of 4 records (75%) were quarantined (too_long 3)" in res.stderr
