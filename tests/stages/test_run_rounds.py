"""`lldm-dpo run --rounds`: two rounds on `micro`; artefacts per round, the summary is what the files say, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.core.digest import content_digest
from pipeline.core.errors import ConfigError
from pipeline.models import model_identity
from stages.cli import app
from stages.run_all import merged_config

SMALL = {
    "model": "micro",
    "device": "cpu",
    "report": False,
    "ingest": {"eval_fraction": 0.3},
    "make_pairs": {"num_generations": 2, "gen_length": 8, "block_length": 4, "steps": 4, "batch_size": 16,
                   "pairs_per_question": 1, "reference_solution_fallback": True, "limit": 0},
    "score_ref": {"samples": 2, "max_length": 128, "limit": 0, "pad_to": 8},
    "train": {"max_steps": 2, "batch_size": 4, "save_every": 0},
    "eval": {"limit_task": 2, "gen_length": 8, "block_length": 4, "steps": 4, "batch_size": 2, "choices": None,
             "limit_choices": 0},
}


def write_questions(path: Path, n: int = 10) -> Path:
    rows = [{"question": f"What is {a} + {a + 3}?", "answer": f"{a} + {a + 3} = {2 * a + 3}\n#### {2 * a + 3}"}
            for a in range(1, n + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    cfg_file = tmp / "small.yaml"
    cfg_file.write_text(yaml.safe_dump(SMALL))
    questions = write_questions(tmp / "questions.jsonl")
    args = ["run", "--config", str(cfg_file), "--out", str(tmp / "out"), "--rounds", "2", "--questions",
            str(questions), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return tmp, args, json.loads(res.stdout)


def test_two_rounds_write_each_rounds_artefacts_and_a_true_summary(two_rounds):
    tmp, _, summary = two_rounds
    out = tmp / "out"
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["resumed_rounds"] == 0
    for r, row in enumerate(summary["rounds"], 1):
        d = out / f"round-{r}"
        for name in ("pairs.jsonl", "pairs.samples.jsonl", "pairs.arrow", "cache/manifest.json", "run/final",
                     "run/metrics.parquet", "run/eval.json", "round.json"):
            assert (d / name).exists(), (r, name)
        pairs, samples = lines(d / "pairs.jsonl"), lines(d / "pairs.samples.jsonl")
        assert row["pairs"] == len(pairs) and row["samples"] == len(samples) == 20 and row["questions"] == 10
        assert {p["round"] for p in pairs} == {s["round"] for s in samples} == {r}
        assert row["sample_accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 20, abs=1e-4)
        assert row["questions_all_correct"] + row["questions_all_wrong"] + row["questions_mixed"] == 10
        table = pa.ipc.open_file(pa.memory_map(str(d / "pairs.arrow"))).read_all()
        assert table.num_rows == row["pairs_train"] + row["pairs_eval"] == row["pairs"]  # nothing quarantined
        assert "question_id" in table.column_names and "chosen_from" in table.column_names
        ev = json.loads((d / "run" / "eval.json").read_text())
        assert row["task_accuracy"] == ev["task_accuracy"]["after"]
        assert json.loads((d / "round.json").read_text())["summary"] == row
    one, two = summary["rounds"]
    assert one["start_model"] == "micro" and one["reference_model"] == "micro"
    assert two["start_model"] == two["reference_model"] == str(out / "round-1" / "run" / "final")
    # Round 2 sampled with round 1's trained policy, by content.
    sha = content_digest(model_identity(out / "round-1" / "run" / "final"))
    assert {s["model_sha256"] for s in lines(out / "round-2" / "pairs.samples.jsonl")} == {sha}
    ev1 = json.loads((out / "round-1" / "run" / "eval.json").read_text())
    assert summary["initial_task_accuracy"] == ev1["task_accuracy"]["before"]
    assert "before" not in json.loads((out / "round-2" / "run" / "eval.json").read_text())["task_accuracy"]
    # Accuracies and intervals are eval's own records: round 1's from its eval.json, round 2's difference
    # against the original model from the per-question rows both evals wrote.
    from pipeline.evaluation.intervals import paired_difference_interval

    iv1 = ev1["intervals"]["task_accuracy"]
    assert one["task_accuracy_interval"] == iv1["after"] and one["initial_task_accuracy_interval"] == iv1["before"]
    assert one["task_accuracy_difference"] == iv1["difference"]
    ev2 = json.loads((out / "round-2" / "run" / "eval.json").read_text())
    assert two["task_accuracy_interval"] == ev2["intervals"]["task_accuracy"]["after"]
    import pyarrow.parquet as pq

    def correct(r, label):
        rows = pq.read_table(out / f"round-{r}" / "run" / "task_results.parquet").to_pylist()
        return [x["correct"] for x in sorted((x for x in rows if x["model"] == label), key=lambda x: x["index"])]

    assert two["task_accuracy_difference"] == paired_difference_interval(correct(1, "before"), correct(2, "after"))
    report = Path(summary["report"]).read_text()
    assert report.count("\n| 1 |") == 1 and report.count("\n| 2 |") == 1
    assert "task accuracy (held-out, greedy): before" in report.splitlines()[2]
    assert json.loads((out / "rounds.json").read_text())["rounds"] == summary["rounds"]


def test_rounds_table_holds_rounds_json_figures_and_query_reads_it(two_rounds):
    import pyarrow.parquet as pq

    from pipeline.core.atomic import recorded_names
    from pipeline.core.schemas import ROUNDS_SCHEMA

    tmp, _, summary = two_rounds
    out = tmp / "out"
    data = json.loads((out / "rounds.json").read_text())
    table = pq.read_table(out / "rounds.parquet")
    assert table.schema.equals(ROUNDS_SCHEMA)
    rows = table.to_pylist()
    assert [r["round"] for r in rows] == [0, 1, 2]
    first = data["rounds"][0]
    initial = first["initial_task_accuracy_interval"]
    assert rows[0]["model"] == "micro" and rows[0]["pairs"] is None and rows[0]["difference"] is None
    assert rows[0]["task_accuracy"] == data["initial_task_accuracy"] == initial["value"]
    assert (rows[0]["task_correct"], rows[0]["task_n"], rows[0]["task_low"], rows[0]["task_high"]) == (
        initial["count"], initial["n"], initial["low"], initial["high"])
    for row, s in zip(rows[1:], data["rounds"]):
        iv, diff = s["task_accuracy_interval"], s["task_accuracy_difference"]
        assert row["round"] == s["round"] and row["model"] == s["final_model"]
        assert (row["pairs"], row["pass_at_k"], row["sample_accuracy"], row["train_loss"]) == (
            s["pairs"], s["pass_at_k"], s["sample_accuracy"], s["final_train_loss"])
        assert (row["task_accuracy"], row["task_correct"], row["task_n"], row["task_low"], row["task_high"]) == (
            s["task_accuracy"], iv["count"], iv["n"], iv["low"], iv["high"])
        assert (row["difference"], row["difference_low"], row["difference_high"], row["method"]) == (
            diff["difference"], diff["low"], diff["high"], diff["method"])
    # `query` reads it (inside its sandbox) from --rounds-run, and from a rounds folder given as --samples.
    for flag in ("--rounds-run", "--samples"):
        res = CliRunner().invoke(app, ["query", flag, str(out), "--json", "SELECT * FROM rounds ORDER BY round"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == rows
    # The plot: a PNG next to rounds.md, recorded as ours, referenced from it.
    from PIL import Image

    png = out / "rounds.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (700, 450)
    assert {"rounds.png", "rounds.parquet", "rounds.md"} <= recorded_names(out)
    assert "](rounds.png)" in (out / "rounds.md").read_text()


def test_rounds_plot_draws_each_round_with_its_interval():
    from pipeline.report.visual import rounds_png

    row = {"round": 0, "task_accuracy": 0.5, "task_correct": 5, "task_n": 10, "task_low": 0.24, "task_high": 0.76}
    one = rounds_png([row], "t")
    assert one[:8] == b"\x89PNG\r\n\x1a\n"
    assert rounds_png([row, {**row, "round": 1, "task_accuracy": 0.9, "task_high": 0.98}], "t") != one
    assert rounds_png([row, {**row, "round": 1, "task_high": 0.9}], "t") != rounds_png(
        [row, {**row, "round": 1}], "t")  # the interval is drawn


def test_rounds_resume_round_by_round_and_refuse_another_run(two_rounds):
    tmp, args, summary = two_rounds
    out = tmp / "out"
    samples_before = (out / "round-2" / "pairs.samples.jsonl").read_bytes()
    (out / "round-2" / "round.json").unlink()  # as if killed after round 2's sampling
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["resumed_rounds"] == 1 and [r["round"] for r in again["rounds"]] == [1, 2]
    assert again["rounds"][0] == summary["rounds"][0]
    assert (out / "round-2" / "pairs.samples.jsonl").read_bytes() == samples_before
    assert again["rounds"][1]["pairs"] == summary["rounds"][1]["pairs"]
    other = CliRunner().invoke(app, [*args[:-1], "--round-reference", "initial"])
    assert other.exit_code == 1 and "holds a rounds run made with another round_reference" in other.output


def test_rounds_config_errors(tmp_path):
    no_questions = tmp_path / "nq.yaml"
    no_questions.write_text("questions: null\n")  # the embedded default's own questions removed
    with pytest.raises(ConfigError, match="needs --questions"):
        merged_config(no_questions, {"rounds": 2})
    with pytest.raises(ConfigError, match="round_reference must be one of policy, initial"):
        merged_config(None, {"rounds": 1, "questions": "q.jsonl", "round_reference": "old"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("make_pairs:\n  num_generation: 4\n")
    # refused when the config loads (so --print-config refuses it too), before any round starts
    with pytest.raises(ConfigError, match=r"make_pairs: unknown key 'num_generation'"):
        merged_config(bad, {"rounds": 1, "questions": str(write_questions(tmp_path / "q.jsonl")),
                            "out": tmp_path / "o"})
    assert not (tmp_path / "o").exists()


def test_round_reference_initial_scores_with_the_original_model(tmp_path):
    from stages.run_rounds import PROVENANCE_FIELDS, round_configs

    q = str(write_questions(tmp_path / "q.jsonl"))
    start = str(tmp_path / "out" / "round-1" / "run" / "final")
    for reference, ref_model in (("initial", "micro"), ("policy", start)):
        cfg = merged_config(None, {"rounds": 2, "questions": q, "model": "micro", "out": tmp_path / "out",
                                   "round_reference": reference})
        mp, ing, score, train, ev = round_configs(cfg, 2, start, ref_model)
        assert mp.model == train.model == start and mp.round == 2 and score.model == ref_model
        assert train.allow_different_init == (reference == "initial")
        assert ev.model == str(tmp_path / "out" / "round-2" / "run" / "final") and ev.before == "none"
        assert ing.inputs == [mp.out] and set(PROVENANCE_FIELDS) <= set(ing.keep_fields)


def test_one_chat_template_setting_for_sampling_scoring_and_eval(tmp_path):
    from stages.run_rounds import round_configs

    q = str(write_questions(tmp_path / "q.jsonl"))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("make_pairs:\n  chat_template: false\n")
    cfg = merged_config(cfg_file, {"rounds": 1, "questions": q, "model": "micro"})
    mp, _, score, _, ev = round_configs(cfg, 1, "micro", "micro")
    assert (mp.chat_template, score.chat_template, ev.chat_template) == (False, False, False)
    cfg_file.write_text("make_pairs:\n  chat_template: false\nscore_ref:\n  chat_template: true\n")
    cfg = merged_config(cfg_file, {"rounds": 1, "questions": q, "model": "micro"})
    with pytest.raises(ConfigError, match="chat_template differs between sections"):
        round_configs(cfg, 1, "micro", "micro")


def test_fresh_questions_move_each_round_on_and_need_the_file_to_hold_them(tmp_path):
    from stages.run_rounds import check_fresh_questions, round_configs

    q = str(write_questions(tmp_path / "q.jsonl", n=10))
    start = str(tmp_path / "out" / "round-1" / "run" / "final")
    flags = {"rounds": 3, "questions": q, "model": "micro", "out": tmp_path / "out", "fresh_questions": True,
             "make_pairs": {"limit": 3, "offset": 1}}
    cfg = merged_config(None, flags)
    offsets = [round_configs(cfg, r, "micro" if r == 1 else start, "micro")[0].offset for r in (1, 2, 3)]
    assert offsets == [1, 4, 7]  # rows 1-3, 4-6, 7-9 of the file's 10
    check_fresh_questions(round_configs(cfg, 1, "micro", "micro")[0], 3)
    with pytest.raises(ConfigError, match=r"q\.jsonl: fresh_questions needs 13 questions \(4 rounds of "
                                          r"make_pairs.limit 3 after offset 1\), the file holds 10"):
        check_fresh_questions(round_configs(cfg, 1, "micro", "micro")[0], 4)
    # the same questions each round unless asked; and the setting is refused where it cannot apply
    same = merged_config(None, {**flags, "fresh_questions": False})
    assert [round_configs(same, r, "micro", "micro")[0].offset for r in (1, 2)] == [1, 1]
    # a round's fingerprint names the offset only when there is one: rounds made before it existed still resume
    from pipeline.report.rounds import round_fingerprint

    first = merged_config(None, {**flags, "make_pairs": {"limit": 3}})
    prints = [round_fingerprint("policy", round_configs(first, r, "micro", "micro"), "micro", "micro") for r in (1, 2)]
    assert "offset" not in prints[0]["stages"]["make_pairs"] and prints[1]["stages"]["make_pairs"]["offset"] == 3
    for limit in (0, "3", 2.5):
        with pytest.raises(ConfigError, match="fresh_questions needs make_pairs.limit > 0"):
            merged_config(None, {**flags, "make_pairs": {"limit": limit}})
    with pytest.raises(ConfigError, match="offset"):  # make-pairs' own check of its key, not a crash
        round_configs(merged_config(None, {**flags, "make_pairs": {"limit": 3, "offset": "one"}}), 2, start, "micro")
    with pytest.raises(ConfigError, match="fresh_questions is for iterative rounds"):
        merged_config(None, {"fresh_questions": True, "rounds": 0, "out": tmp_path / "o2"})


def test_fresh_questions_are_refused_before_any_work_when_the_file_is_short(tmp_path):
    q = write_questions(tmp_path / "q.jsonl", n=4)
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text(yaml.safe_dump({**SMALL, "make_pairs": {**SMALL["make_pairs"], "limit": 2}}))
    res = CliRunner().invoke(app, ["run", "--config", str(cfg_file), "--out", str(tmp_path / "out"), "--rounds", "3",
                                   "--questions", str(q), "--fresh-questions"])
    assert res.exit_code != 0 and "fresh_questions needs 6 questions" in res.output
    assert not (tmp_path / "out" / "round-1").exists()
