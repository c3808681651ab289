"""bench/skill_run.py's seeds table: per-seed paired figures, pooled over seeds and problems, DPO+NLL vs RFT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import skill_run  # noqa: E402


def test_problem_keys_group_questions_by_their_worked_solution(tmp_path):
    rows = [{"question": "Ivy has 9 cards and gives 4 away.", "answer": 5, "solution": "9 - 4 = 5\n#### 5"},
            {"question": "Ben has 9 pens and gives 4 away.", "answer": 5, "solution": "9 - 4 = 5\n#### 5"},
            {"question": "Ava buys 3 boxes of 6 toys.", "answer": 18, "solution": "3 * 6 = 18\n#### 18"}]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = skill_run.problem_keys(path)
    assert keys[0] == keys[1] != keys[2]


def test_seeds_summary_by_hand():
    # 4 questions, problems (0, 0, 1, 2); before the same in both seeds (greedy, one model)
    before = [False, False, True, False]
    records = {"dpo_nll": {0: (before, [True, True, True, False]), 1: (before, [False, False, True, True])},
               "rft": {0: (before, [True, False, True, False]), 1: (before, [False, False, False, False])}}
    out = skill_run.seeds_summary(records, ["a", "a", "b", "c"])
    assert (out["items"], out["problems"]) == (4, 3)
    dpo = out["variants"]["dpo_nll"]
    assert [(r["before"], r["after"], r["gained"], r["lost"]) for r in dpo["seeds"]] == [(1, 3, 2, 0), (1, 2, 1, 0)]
    assert dpo["pooled"]["mean"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert [r["gain"] for r in dpo["seeds"]] == pytest.approx([0.5, 0.25])
    vs = out["dpo_nll_vs_rft"]
    assert [(r["dpo_nll"], r["rft"]) for r in vs["seeds"]] == [(3, 2), (2, 0)]
    assert vs["pooled"]["mean"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    # the two questions of problem "a" agree before (both wrong): the one pair of one problem agrees
    assert out["before_within_problem_agreement"] == 1.0


def test_the_tuning_rows_are_never_sampled(tmp_path):
    from stages.run_all import merged_config

    # the embedded default's make-pairs stops before the tuning rows (1500-1999 of its questions file)
    assert 0 < merged_config(None, {"out": tmp_path / "d"}).make_pairs["limit"] <= skill_run.TUNE_QUESTIONS.start
    with pytest.raises(SystemExit, match="rows must end by 1500 .* up to row 1600"):
        skill_run.variant_flags("dpo_nll", tmp_path / "o", {"make_pairs": {"limit": 1600}}, None, 0)
    with pytest.raises(SystemExit, match="up to row 1600"):  # an offset moves the rows on
        skill_run.variant_flags("dpo_nll", tmp_path / "o", {"make_pairs": {"limit": 500, "offset": 1100}}, None, 0)
    # fresh questions each round: three rounds of 512 end at row 1536, inside the tuning rows; of 500 they fit
    with pytest.raises(SystemExit, match="up to row 1536"):
        skill_run.variant_flags("dpo_nll", tmp_path / "o", {"rounds": 3, "fresh_questions": True}, None, 0)
    skill_run.variant_flags("dpo_nll", tmp_path / "o", {"rounds": 3, "fresh_questions": True,
                                                       "make_pairs": {"limit": 500}}, None, 0)
    flags = skill_run.variant_flags("rft", tmp_path / "o", {}, None, 2)
    assert flags["train"]["loss"] == "sft"
    assert (flags["make_pairs"]["seed"], flags["score_ref"]["seed"], flags["train"]["seed"]) == (2, 2, 2)


def test_item_records_take_the_asked_round_and_name_an_unfinished_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "dpo_nll-seed0"
    for r, after in ((1, [True, False]), (2, [True, True])):
        (run / f"round-{r}" / "run").mkdir(parents=True)
        rows = [{"model": m, "index": i, "correct": c} for m, cs in (("before", [False, False]), ("after", after))
                for i, c in enumerate(cs)]
        pq.write_table(pa.Table.from_pylist(rows), run / f"round-{r}" / "run" / "task_results.parquet")
    assert skill_run.item_records(run, 1) == ([False, False], [True, False])
    assert skill_run.item_records(run) == ([False, False], [True, True])  # the last round by default
    (run / "round-3" / "run").mkdir(parents=True)  # a third round under way: no eval yet
    with pytest.raises(SystemExit, match=r"round-3 of .*dpo_nll-seed0 is unfinished; pass --round K"):
        skill_run.item_records(run)
    assert skill_run.item_records(run, 2) == ([False, False], [True, True])


def test_tuning_rows_and_problems_come_from_the_configured_files(tmp_path):
    """--set questions=... eval.benchmark=...: another family's files give the tuning rows and the problems."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(2100)))
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"question": "x", "answer": 1, "solution": "1 + 0 = 1\n#### 1"}) + "\n")
    sets = skill_run.parse_sets([f"questions={questions}", f"eval.benchmark={bench}"])
    assert skill_run.configured_files(sets) == (questions, bench)
    rows = [json.loads(x) for x in skill_run.tune_benchmark(tmp_path, sets).read_text().splitlines()]
    assert [r["answer"] for r in rows] == list(range(1500, 2000))
    # without --set: the shipped files
    shipped_questions, shipped_bench = skill_run.configured_files(None)
    assert shipped_questions.name == "skill_train.jsonl" and shipped_bench.name == "skill_heldout.jsonl"
    assert shipped_questions.resolve() == (skill_run.ROOT / "data/questions/skill_train.jsonl").resolve()
