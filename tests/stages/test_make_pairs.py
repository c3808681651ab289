"""`lldm-dpo make-pairs`: scripted samples through grading, pairing, provenance, counts, resume and ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.core.errors import ConfigError, UserError
from stages.cli import app
from stages.make_pairs import MakePairsConfig, run

sys.path.insert(0, str(Path(__file__).parent))
from selfpairs_stub import QUESTIONS, ScriptedSampler, write_questions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path, **kw) -> MakePairsConfig:
    questions = tmp_path / "questions.jsonl"
    if not questions.exists():
        write_questions(questions)
    base = dict(questions=str(questions), model="stub", out=str(tmp_path / "pairs.jsonl"), num_generations=4,
                pairs_per_question=2, batch_size=3, seed=5, round=2, progress=False,
                answer_format="any")  # the stub's completions answer in every style
    return MakePairsConfig(**{**base, **kw})


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_grading_pairing_provenance_and_counts(tmp_path):
    cfg = config(tmp_path)
    stub = ScriptedSampler()
    res = run(cfg, sampler=stub)
    assert (res.questions, res.samples, res.sampled_now, res.resumed) == (4, 16, 16, 0)
    assert (res.questions_all_correct, res.questions_all_wrong, res.questions_mixed) == (1, 1, 2)
    assert (res.correct_samples, res.empty_samples, res.pass_at_k, res.sample_accuracy) == (8, 1, 0.75, 0.5)
    from pipeline.evaluation.intervals import wilson_interval

    assert (res.intervals["pass_at_k"]["count"], res.intervals["pass_at_k"]["n"]) == (3, 4)
    assert (res.intervals["pass_at_k"]["low"], res.intervals["pass_at_k"]["high"]) == wilson_interval(3, 4)
    assert (res.intervals["sample_accuracy"]["count"], res.intervals["sample_accuracy"]["n"]) == (8, 16)
    assert (res.pairs, res.questions_with_pairs, res.pairs_reference_chosen) == (4, 2, 0)
    pairs = rows(cfg.out)
    q1, q4 = (p for p in pairs if p["prompt"] == "What is 5 + 3?"), (p for p in pairs if p["prompt"] == "What is 9 + 9?")
    assert [(p["chosen_sample"], p["rejected_sample"], p["chosen_answer"], p["rejected_answer"]) for p in q1] == [
        (0, 1, "8", "9"), (2, 3, "8", "2")]
    q4 = list(q4)
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in q4] == [(0, 2), (0, 3)]  # sample 1 repeats sample 0
    assert q4[0]["question_id"] == "nine-plus-nine" and q4[0]["chosen"] == "#### 18" and q4[0]["rejected"] == \
        "9 + 9 = 19. #### 19"
    for p in pairs:
        assert p["model"] == "stub" and p["seed"] == 5 and p["round"] == 2 and p["model_sha256"] == res.model_sha256
        assert p["reference_answer"] in ("8", "18") and p["chosen_from"] == "sample"
    samples = rows(res.samples_file)
    assert [(s["question_index"], s["sample"]) for s in samples] == [(i, j) for i in range(4) for j in range(4)]
    assert sorted(stub.calls) == sorted((s["question_id"], s["sample"]) for s in samples)
    wrong_42 = [s for s in samples if s["prompt"] == "What is 7 * 6?"]
    assert [(s["extracted_answer"], s["correct"]) for s in wrong_42] == [("13", False), ("48", False), (None, False),
                                                                          ("48", False)]
    assert len({s["sample_seed"] for s in samples}) == 16
    assert not Path(str(res.samples_file) + ".partial").exists()


def test_reference_solution_fallback(tmp_path):
    res = run(config(tmp_path, reference_solution_fallback=True), sampler=ScriptedSampler())
    assert res.pairs == 6 and res.pairs_reference_chosen == 2 and res.questions_with_pairs == 3
    ref = [p for p in rows(tmp_path / "pairs.jsonl") if p["chosen_from"] == "reference"]
    assert [(p["chosen"], p["rejected_sample"], p["chosen_sample"], p["chosen_answer"]) for p in ref] == [
        ("7 * 6 = 42.\nA: 42", 0, None, "42"), ("7 * 6 = 42.\nA: 42", 1, None, "42")]


def test_pairs_file_passes_ingest_with_nothing_quarantined(tmp_path):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest

    res = run(config(tmp_path, reference_solution_fallback=True, pairs_per_question=16), sampler=ScriptedSampler())
    keep = ["question_id", "chosen_from", "chosen_sample", "rejected_sample", "chosen_answer", "rejected_answer",
            "model", "seed", "round"]
    ing = ingest(IngestConfig(inputs=[res.out], out=str(tmp_path / "pairs.arrow"), keep_fields=keep,
                              eval_fraction=0.5, progress=False))
    assert ing.read == res.pairs == ing.accepted and ing.quarantined == 0
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "pairs.arrow"))).read_all()
    assert set(keep) <= set(table.column_names)
    assert sorted(table.column("question_id").to_pylist()) == sorted(p["question_id"] for p in rows(res.out))


def test_rerun_repairs_without_sampling_and_more_generations_sample_only_the_new(tmp_path):
    run(config(tmp_path), sampler=ScriptedSampler())
    samples_before = (tmp_path / "pairs.samples.jsonl").read_bytes()
    stub = ScriptedSampler()
    res = run(config(tmp_path, pairs_per_question=1), sampler=stub)  # a pairing flag only
    assert stub.calls == [] and res.resumed == 16 and res.pairs == 2
    assert (tmp_path / "pairs.samples.jsonl").read_bytes() == samples_before
    stub = ScriptedSampler()
    res = run(config(tmp_path, num_generations=6), sampler=stub)
    assert sorted(j for _, j in stub.calls) == [4] * 4 + [5] * 4 and res.resumed == 16 and res.samples == 24


def test_resume_checks_model_identity_settings_and_questions(tmp_path):
    run(config(tmp_path), sampler=ScriptedSampler())
    with pytest.raises(UserError, match=r"pairs\.samples\.jsonl:1: sampled by another model"):
        run(config(tmp_path), sampler=ScriptedSampler(name="stub-v2"))
    with pytest.raises(UserError, match=r"made with temperature=0\.7, this run has temperature=0\.9"):
        run(config(tmp_path, temperature=0.9), sampler=ScriptedSampler())
    changed = [dict(QUESTIONS[3], question="What is 9 + 9 + 0?"), *QUESTIONS[:3]]
    write_questions(tmp_path / "questions.jsonl", changed)  # id nine-plus-nine now names another question
    with pytest.raises(UserError, match=r"question 'nine-plus-nine' differs from .*questions\.jsonl:1"):
        run(config(tmp_path), sampler=ScriptedSampler())


def test_out_must_be_a_make_pairs_file_and_config_is_checked(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "mine", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(UserError, match=r"pairs\.jsonl: exists and was not written by lldm-dpo"):
        run(config(tmp_path), sampler=ScriptedSampler())
    from pipeline.core.atomic import claim

    claim(tmp_path / "pairs.jsonl")  # recorded as ours, yet not a make-pairs file: still refused
    with pytest.raises(UserError, match=r"pairs\.jsonl: exists and is not a `lldm-dpo make-pairs` output"):
        run(config(tmp_path), sampler=ScriptedSampler())
    with pytest.raises(ConfigError, match="draws the same sample k times"):
        config(tmp_path, temperature=0.0)
    with pytest.raises(ConfigError, match="num_generations must be >= 1"):
        config(tmp_path, num_generations=0)


def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    run(config(whole, batch_size=2), sampler=ScriptedSampler())
    cut = tmp_path / "cut"
    cut.mkdir()
    cfg = config(cut, batch_size=2)
    spec = cut / "spec.json"
    spec.write_text(json.dumps({"config": {**cfg.__dict__}, "delay": 1.0}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "selfpairs_stub.py"), str(spec)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = cut / "pairs.samples.jsonl.partial"
    deadline = time.time() + 300  # a loaded CI machine imports torch slowly
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and len(partial.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(partial.read_text().splitlines())
    assert 4 <= done_before < 16 and not (cut / "pairs.jsonl").exists()
    stub = ScriptedSampler()
    res = run(cfg, sampler=stub)
    assert res.resumed == done_before and len(stub.calls) == 16 - done_before
    assert (cut / "pairs.jsonl").read_bytes() == (whole / "pairs.jsonl").read_bytes()
    assert (cut / "pairs.samples.jsonl").read_bytes() == (whole / "pairs.samples.jsonl").read_bytes()
    assert not partial.exists()


@pytest.mark.parametrize("fast", [[], ["--kv-cache", "dual", "--threshold", "0.002"]], ids=["exact", "dual-0.002"])
def test_cli_on_micro_samples_do_not_depend_on_the_batch_size(tmp_path, fast):
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS[:3])
    outs = []
    for batch in (1, 5):
        out = tmp_path / f"b{batch}" / "pairs.jsonl"
        args = ["make-pairs", str(questions), "--model", "micro", "--out", str(out), "--num-generations", "3",
                "--gen-length", "8", "--block-length", "4", "--steps", "4", "--batch-size", str(batch),
                "--reference-solution-fallback", "--device", "cpu", "--json", *fast]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout)
        assert summary["samples"] == 9 and summary["sampled_now"] == 9
        assert summary["questions_all_correct"] + summary["questions_all_wrong"] + summary["questions_mixed"] == 3
        outs.append([(s["completion"], s["correct"]) for s in rows(summary["samples_file"])])
    assert outs[0] == outs[1]
    assert len({c for c, _ in outs[0]}) > 1  # temperature 0.7: the samples differ
    sampler = rows(summary["samples_file"])[0]["sampler"]
    assert (sampler["kv_cache"], sampler["threshold"]) == (("dual", 0.002) if fast else ("none", None))


def test_samples_are_queryable_per_round(tmp_path):
    for r, script_name in ((1, "stub-v1"), (2, "stub-v2")):
        folder = tmp_path / "rounds" / f"round-{r}"
        folder.mkdir(parents=True)
        write_questions(folder / "questions.jsonl")
        run(config(folder, round=r), sampler=ScriptedSampler(name=script_name))
    res = CliRunner().invoke(app, ["query", "--samples", str(tmp_path / "rounds"), "--preset", "samples_pass_rate",
                                   "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.stdout)
    assert [r["round"] for r in table] == [1, 2]
    assert table[0] == {"round": 1, "questions": 4, "share_with_a_correct_sample": 0.75, "only_correct": 1,
                        "only_wrong": 1, "sample_accuracy": 0.5, "samples_per_question": 4}
    one = CliRunner().invoke(app, ["query", "--samples", str(tmp_path / "rounds" / "round-1" / "pairs.samples.jsonl"),
                                   "SELECT count(*) AS n, count(DISTINCT question_id) AS q FROM samples", "--json"])
    assert json.loads(one.stdout) == [{"n": 16, "q": 4}]
    missing = CliRunner().invoke(app, ["query", "--samples", str(tmp_path), "SELECT 1"])
    assert missing.exit_code == 0  # the folder holds samples files further down
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(app, ["query", "--samples", str(empty), "SELECT 1"])
    assert bad.exit_code == 1 and "no *.samples.jsonl files" in bad.output


def test_shipped_yaml_and_print_config_match_the_defaults():
    from pipeline.cli.loading import load_config
    from pipeline.core.config import config_to_yaml

    shipped = ROOT / "stages" / "make_pairs.yaml"
    assert shipped.read_text(encoding="utf-8") == config_to_yaml(MakePairsConfig(), with_docs=True)
    assert load_config(MakePairsConfig, shipped) == MakePairsConfig()
    res = CliRunner().invoke(app, ["make-pairs", "q.jsonl", "--num-generations", "8", "--print-config"])
    assert res.exit_code == 0 and "num_generations: 8" in res.stdout and "questions: q.jsonl" in res.stdout


def test_one_text_under_two_ids_never_gives_a_pair_ingest_would_refuse(tmp_path):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest

    write_questions(tmp_path / "questions.jsonl", [dict(QUESTIONS[0], id="a"), dict(QUESTIONS[0], id="b")])
    res = run(config(tmp_path), sampler=ScriptedSampler())  # the stub answers by text: both ids get the same samples
    assert res.questions == 2 and res.questions_mixed == 2 and res.pairs == 2 and res.repeated_pairs == 2
    ing = ingest(IngestConfig(inputs=[res.out], out=str(tmp_path / "p.arrow"), progress=False))
    assert ing.accepted == 2 and ing.quarantined == 0


SKILL_Q = {"question": "Ava has 9 pens, gets 7 more and gives 5 away. How many are left?", "answer": 11}
SKILL_SCRIPT = {SKILL_Q["question"]: [
    "9 + 7 = 16\n15 - 5 = 113#### 11",  # right answer, wrong working (the chosen)
    "9 + 7 = 17\n16 - 5 = 12\n#### 12",  # wrong answer (the rejected)
    "9 + 7 = 16\n16 - 5 = 11\n#### 11",  # right answer, right working
    "9 + 7 = 16\n16 - 5 = 11",  # no #### line: under the strict format no answer (no last-number fallback)
]}


def test_the_arithmetic_verifier_chooses_only_right_working_and_regrades_without_sampling(tmp_path):
    write_questions(tmp_path / "questions.jsonl", [SKILL_Q])
    stub = ScriptedSampler(SKILL_SCRIPT)
    res = run(config(tmp_path, answer_format="auto", pairs_per_question=4), sampler=stub)
    samples = rows(tmp_path / "pairs.samples.jsonl")
    # the default answer verifier, strict #### (the reference is a bare number): samples 0 and 2 are correct
    assert [s["correct"] for s in samples] == [True, False, True, False]
    assert all(s["working_correct"] is None for s in samples)
    assert (res.correct_samples, res.wrong_working_samples, res.pairs) == (2, 0, 4)
    assert {(p["chosen_sample"], p["rejected_sample"]) for p in rows(tmp_path / "pairs.jsonl")} == {
        (0, 1), (0, 3), (2, 1), (2, 3)}

    calls = len(stub.calls)
    res = run(config(tmp_path, answer_format="auto", pairs_per_question=4, verifier="arithmetic"), sampler=stub)
    assert len(stub.calls) == calls and res.sampled_now == 0  # regraded, not resampled
    samples = rows(tmp_path / "pairs.samples.jsonl")
    assert [s["working_correct"] for s in samples] == [False, False, True, False]
    assert samples[0]["grade_reason"] == "line 2: 15 - 5 is 10, not 113"
    assert (res.correct_samples, res.wrong_working_samples, res.pairs) == (2, 1, 2)
    pairs = rows(tmp_path / "pairs.jsonl")
    # only sample 2 (right answer, right working) is chosen; sample 0 is neither chosen nor rejected
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in pairs] == [(2, 1), (2, 3)]

    # the last-number fallback, asked for, credits sample 3 again
    res = run(config(tmp_path, answer_format="any", pairs_per_question=4, verifier="arithmetic"), sampler=stub)
    assert rows(tmp_path / "pairs.samples.jsonl")[3]["correct"] is True and res.pairs == 1


def test_an_unknown_verifier_or_answer_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="verifier: unknown verifier 'exact'"):
        config(tmp_path, verifier="exact")
    with pytest.raises(ConfigError, match="answer_format must be one of auto, ####, any"):
        config(tmp_path, answer_format="strict")


def test_offset_skips_questions_before_the_limit(tmp_path):
    stub = ScriptedSampler()
    res = run(config(tmp_path, offset=1, limit=2), sampler=stub)
    sampled = {r["prompt"] for r in rows(tmp_path / "pairs.samples.jsonl")}
    assert res.questions == 2 and sampled == {"What is 10 - 4?", "What is 7 * 6?"}
    assert {r["question_index"] for r in rows(tmp_path / "pairs.samples.jsonl")} == {1, 2}  # the file's own rows
    with pytest.raises(UserError, match=r"no questions after the first 4 \(offset\) of 4"):
        run(config(tmp_path, offset=4), sampler=stub)
    with pytest.raises(ConfigError, match="offset"):
        config(tmp_path, offset=-1)
