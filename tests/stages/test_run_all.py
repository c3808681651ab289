"""`lldm-dpo run`: every stage in order on a shrunken default; the summary is what the files say."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.core.errors import ConfigError
from stages.cli import app
from stages.run_all import EMBEDDED_DEFAULT, merged_config, stage_configs

SHRUNK = {
    "model": "micro",
    "device": "cpu",
    "rounds": 0,  # the single pass on the ingest inputs (the embedded default runs one round instead)
    "questions": None,
    "ingest": {"eval_fraction": 0.2},
    "score_ref": {"limit": 40, "samples": 2, "max_length": 128},
    "train": {"max_steps": 3, "batch_size": 16, "save_every": 2},  # ~32 train pairs: 2 steps an epoch, 2 epochs
    "eval": {"limit_task": 2, "gen_length": 8, "block_length": 8, "steps": 4, "batch_size": 2, "limit_choices": 2,
             "samples": 2, "choices": "data/benchmarks/arithmetic_choice.jsonl"},
}


def test_embedded_default_resolves_and_validates_every_stage(tmp_path):
    from stages.run_rounds import round_configs

    cfg = merged_config(None, {"out": tmp_path / "x"})
    assert cfg.rounds == 1 and cfg.model == "skill"
    mp, _, score, train, ev = round_configs(cfg, 1, cfg.model, cfg.model)
    # the shipped data is found from any working directory
    assert Path(mp.questions).exists() and ev.benchmark.exists()
    assert score.model == train.model == mp.model == "skill"
    assert not mp.reference_solution_fallback and mp.num_generations > 1
    assert train.loss == "sigmoid,sft" and train.sft_total_weight > 0  # the NLL term on the chosen response
    assert ev.before == "skill" and ev.limit_task == 0
    assert score.pad_to == mp.gen_length > 0  # the pairs scored in the shape they were sampled in
    other = merged_config(None, {"out": tmp_path / "z", "make_pairs": {"gen_length": 32, "block_length": 4}})
    with pytest.raises(ConfigError, match=r"score_ref pad_to \(24\) differs from make_pairs gen_length \(32\)"):
        round_configs(other, 1, other.model, other.model)
    assert len(Path(ev.benchmark).read_text().splitlines()) >= 1000
    assert yaml.safe_load(EMBEDDED_DEFAULT.read_text())["model"] == "skill"
    # the single pass still validates with the shipped pairs
    single = merged_config(None, {"out": tmp_path / "y", "rounds": 0})
    ingest, *_ = stage_configs(single)
    assert Path(ingest.inputs[0]).exists()


def test_unknown_key_in_a_section_names_section_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.*unknown key 'learning_rat'"):
        stage_configs(merged_config(bad, {}))


def test_run_end_to_end_summary_matches_the_files(tmp_path):
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text(yaml.safe_dump({**SHRUNK, "out": str(tmp_path / "out")}))
    res = CliRunner().invoke(app, ["run", "--config", str(cfg_file), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    art = summary["artefacts"]
    for key in ("pairs", "quarantine", "reference_cache", "final_model", "metrics", "eval", "report_html",
                "report_png"):
        assert Path(art[key]).exists(), key
    assert summary["pairs"]["scored"] == 40 and summary["pairs"]["read"] == summary["pairs"]["accepted"] + \
        summary["pairs"]["quarantined"]
    eval_json = json.loads(Path(art["eval"]).read_text())
    assert summary["preference_accuracy"] == eval_json["preference_accuracy"]
    assert summary["preference_accuracy"]["before"] == 0.5  # the reference against itself: all ties
    # every accuracy with its count and interval, the before/after difference with the paired one
    assert summary["intervals"] == eval_json["intervals"]
    pref = summary["intervals"]["preference_accuracy"]
    assert pref["before"]["n"] == pref["after"]["n"] == pref["difference"]["n"] == eval_json["counts"]["pairs"]
    assert summary["intervals"]["task_accuracy"]["after"]["n"] == 2
    assert summary["choice_accuracy"] == eval_json["choice_accuracy"] and set(summary["choice_accuracy"]) == {
        "before", "after"}
    # One mask draw per epoch trained: score-ref was given as many draws as train needs.
    cache_manifest = json.loads((Path(art["reference_cache"]) / "manifest.json").read_text())
    assert cache_manifest["fingerprint"]["draws"] == 2
    metrics = pq.read_table(art["metrics"]).to_pylist()
    assert all(m["masks/reused"] != 1.0 for m in metrics)
    assert len(metrics) == 3 and summary["final_train_loss"] == pytest.approx(metrics[-1]["loss"])
    assert pq.read_table(Path(art["run"]) / "task_results.parquet").num_rows == 4  # 2 items x before/after
    assert "lldm-dpo query --pairs" in summary["example_query"]
    # The example query works as printed.
    import shlex

    args = shlex.split(summary["example_query"])[1:] + ["--json"]
    q = CliRunner().invoke(app, args)
    assert q.exit_code == 0, q.output
    assert sum(r["pairs"] for r in json.loads(q.stdout)) == 40

    q = CliRunner().invoke(app, ["query", "--run", art["run"], "--json",
                                 "SELECT model, count(*) AS n, avg(correct::INT) AS acc FROM task_results GROUP BY 1 ORDER BY 1"])
    assert q.exit_code == 0, q.output
    rows = json.loads(q.stdout)
    assert [r["model"] for r in rows] == ["after", "before"] and all(r["n"] == 2 for r in rows)
    assert rows[0]["acc"] == pytest.approx(summary["task_accuracy"]["after"])

    # A second run reuses the unchanged reference cache (no part rewritten) and retrains.
    manifest = Path(art["reference_cache"]) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    res2 = CliRunner().invoke(app, ["run", "--config", str(cfg_file), "--json"])
    assert res2.exit_code == 0, res2.output
    assert manifest.stat().st_mtime_ns == stamp
    assert len(pq.read_table(art["metrics"]).to_pylist()) == 3


def test_an_empty_choices_path_fails_when_the_run_config_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  choices: ''\n")
    with pytest.raises(ConfigError, match=r"run config: eval: choices is an empty path"):
        stage_configs(merged_config(bad, {"out": tmp_path / "x"}))


def test_run_summary_prints_counts_and_intervals(capsys):
    from pipeline.evaluation.intervals import credits_record, paired_difference_interval
    from pipeline.report.summary import RunResult
    from stages.run_all import print_run_summary

    b, a = [1, 0, 0, 1, 0, 0, 0, 0] * 4, [1, 1, 0, 1, 0, 0, 1, 0] * 4
    result = RunResult(out="o", seconds=1.0, stage_seconds={}, pairs={}, preference_accuracy={},
                       elbo_accuracy={}, task_accuracy={}, choice_accuracy={"before": 0.25, "after": 0.5},
                       final_train_loss=0.5, final_train_reward_accuracy=0.75, artefacts={}, example_query="q",
                       intervals={"choice_accuracy": {"before": credits_record(b), "after": credits_record(a),
                                                      "difference": paired_difference_interval(b, a)}})
    print_run_summary(result)
    out = capsys.readouterr().out
    assert "before          0.250 (8/32, 95% CI 0.133-0.421)" in out
    assert "after           0.500 (16/32, 95% CI 0.336-0.664)" in out
    assert "after - before  +0.250 (95% CI +0.083 to +0.395, newcombe-paired-score, 8 gained / 0 lost of 32)" in out


def test_run_wide_sampler_settings_reach_eval_and_make_pairs(tmp_path):
    cfg = merged_config(None, {"out": tmp_path / "x", "kv_cache": "dual", "threshold": 0.9})
    ev = stage_configs(cfg)[3]
    assert (ev.kv_cache, ev.threshold) == ("dual", 0.9)
    assert (cfg.make_pairs["kv_cache"], cfg.make_pairs["threshold"]) == ("dual", 0.9)
    plain = stage_configs(merged_config(None, {"out": tmp_path / "y"}))[3]
    assert (plain.kv_cache, plain.threshold) == ("dual", 0.9)  # the embedded default's eval: dual cache, threshold
    exact = stage_configs(merged_config(None, {"out": tmp_path / "w", "cache": "none"}))[3]  # the old name
    assert exact.kv_cache == "none"
    with pytest.raises(ConfigError, match="cache must be one of"):
        stage_configs(merged_config(None, {"out": tmp_path / "z", "kv_cache": "full"}))
