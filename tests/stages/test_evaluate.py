"""eval: preference accuracy on held-out pairs, task and multiple-choice accuracy, before and after."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.errors import ConfigError, UserError
from pipeline.models import load_model
from stages.evaluate import EvalConfig, choice_credits, preference_scores, run


def test_reference_against_itself_is_chance_and_a_better_policy_wins(small_cache, monkeypatch):
    from pipeline.models.numerics import Numerics
    from pipeline.refcache.reader import open_cache

    cache = open_cache(small_cache)
    rows = list(cache.rows(split="eval"))
    model, tok = load_model("micro")
    same = preference_scores(model, tok, cache, "eval", 0.1, Numerics())
    assert same["accuracy"] == 0.5 and same["mean_margin"] == 0.0  # every pair an exact tie
    assert same["pairs"] == len(rows)
    # ELBO accuracy of the reference equals the share of pairs its cached margin favours.
    assert same["elbo_accuracy"] == pytest.approx(sum(r["ref_margin"] > 0 for r in rows) / len(rows))

    # A policy whose rejected answers score 5 nats lower than the reference's: it wins every pair.
    import pipeline.estimator.diffusion as diffusion

    rejected = {tuple(r["rejected_ids"]) for r in rows}
    real = diffusion.elbo_terms

    def tilted_terms(m, requests, **kw):
        out = real(m, requests, **kw)
        return [t - 5.0 if tuple(req.response_ids) in rejected else t for t, req in zip(out, requests)]

    monkeypatch.setattr(diffusion, "elbo_terms", tilted_terms)
    better = preference_scores(model, tok, cache, "eval", 0.1, Numerics())
    assert better["accuracy"] == 1.0 and better["mean_margin"] == pytest.approx(0.5, rel=1e-6)
    # Accuracy is the sign of the margin, whatever beta scales it by (beta 0 once gave 0.5: every pair a "tie").
    for beta in (0.0, 1e-300, 10.0):
        assert preference_scores(model, tok, cache, "eval", beta, Numerics())["accuracy"] == 1.0
    with pytest.raises(ConfigError, match="beta must be > 0, got 0"):
        EvalConfig(beta=0)


def test_normalize_length_scores_options_per_token(tmp_path, monkeypatch):
    import pipeline.estimator.diffusion as diffusion

    model, tok = load_model("micro")
    # Every token of every option scores -1 nat, plus -3 nats once: the short option has the higher ELBO,
    # the long one the higher ELBO per token.
    monkeypatch.setattr(diffusion, "elbo_terms", lambda m, requests, **kw: [
        torch.full((r.masks.shape[0],), -1.0 * len(r.response_ids) - 3.0) for r in requests])
    item = {"question": "Pick one:", "options": ["yes", "yes yes yes yes yes yes"], "answer": 1}
    for normalize, expected in (("none", 0.0), ("length", 1.0)):
        cfg = EvalConfig(scores=None, choices=tmp_path / "c.jsonl", samples=2, device="cpu", normalize=normalize)
        assert sum(choice_credits(model, tok, [item], cfg)) == expected
    with pytest.raises(ConfigError, match="normalize must be one of none, length"):
        EvalConfig(scores=None, choices=tmp_path / "c.jsonl", normalize="mean")


def test_choice_accuracy_picks_the_highest_elbo(tmp_path):
    model, tok = load_model("micro")
    cfg = EvalConfig(scores=None, choices=tmp_path / "c.jsonl", samples=2, device="cpu")
    items = [{"question": "2 + 2 =", "options": ["4", "5", "22"], "answer": j} for j in range(3)]
    acc = sum(choice_credits(model, tok, items, cfg)) / len(items)
    # The model picks one option for the (identical) question: exactly one of the three answers is right.
    assert acc == pytest.approx(1 / 3)


def test_end_to_end_writes_eval_json_and_task_results(small_cache, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"})
                               for a in range(3)) + "\n")
    choices = tmp_path / "choices.jsonl"
    choices.write_text(json.dumps({"question": "1 + 1 =", "options": ["2", "3"], "answer": 0}) + "\n")
    cfg = EvalConfig(model="micro", scores=small_cache, benchmark=bench, choices=choices, out=tmp_path / "run",
                     gen_length=8, block_length=8, steps=4, samples=2, device="cpu")
    result = run(cfg)
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(data["preference_accuracy"]) == {"before", "after"}
    assert data["preference_accuracy"]["before"] == data["preference_accuracy"]["after"] == 0.5  # same model
    assert data["counts"] == {"pairs": result.pairs, "task_items": 3, "choice_items": 1}
    assert data["mean_margin"] == {"before": 0.0, "after": 0.0}
    # Training pairs: the policy's margin on the masks training replayed and on masks it never saw.
    assert set(data["train_sample"]) == {"pairs", "cached_masks", "fresh_masks"}
    assert data["train_sample"]["fresh_masks"]["mean_margin"] == 0.0
    assert len(data["reference_margins"]) == result.pairs
    table = pq.read_table(tmp_path / "run" / "task_results.parquet").to_pylist()
    assert [r["model"] for r in table] == ["before"] * 3 + ["after"] * 3
    assert [r["reference"] for r in table[:3]] == ["1", "2", "3"]
    assert data["task_accuracy"]["after"] == sum(r["correct"] for r in table[3:]) / 3


def test_errors_are_one_line_and_name_the_file(small_cache, tmp_path):
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(scores=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: missing field 'answer'"):
        run(EvalConfig(model="micro", scores=None, benchmark=bad, device="cpu", out=tmp_path))
    bad.write_text('{"question": "x", "answer": "#### 4"}\n{"question": "y", "answer": "\\\\sqrt{2}"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field 'answer' holds no readable number: '\\\\sqrt\{2\}'"):
        run(EvalConfig(model="micro", scores=None, benchmark=bad, device="cpu", out=tmp_path))
    with pytest.raises(UserError, match="no pairs of split 'test'"):
        run(EvalConfig(model="micro", scores=small_cache, split="test", device="cpu", out=tmp_path))


def test_eval_json_gives_every_accuracy_its_count_interval_and_paired_difference(small_cache, tmp_path, capsys):
    from pipeline.evaluation.intervals import paired_difference_interval, wilson_interval

    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"question": f"{a} + 1 =", "options": [str(a + 1), str(a + 2)],
                                           "answer": a % 2}) + "\n" for a in range(4)))
    cfg = EvalConfig(model="micro", scores=small_cache, choices=choices, out=tmp_path / "run", samples=2,
                     device="cpu", mc_seeds=3, train_sample=4)
    result = run(cfg)
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    iv = data["intervals"]
    assert set(iv) >= {"preference_accuracy", "elbo_accuracy", "choice_accuracy",
                       "train_sample/cached_masks/accuracy"}
    pref = iv["preference_accuracy"]
    n = result.pairs
    # the same model before and after: every pair a tie (half credit), the paired difference exactly 0
    assert pref["before"]["count"] == pref["after"]["count"] == n / 2 and pref["after"]["n"] == n
    assert (pref["after"]["low"], pref["after"]["high"]) == pytest.approx(wilson_interval(n / 2, n))
    d = pref["difference"]
    assert d["difference"] == 0 and d["low"] < 0 < d["high"] and d["method"] == "newcombe-paired-score"
    mc = iv["choice_accuracy"]
    k = round(data["choice_accuracy"]["after"] * 4)
    assert mc["after"]["count"] == k and mc["after"]["n"] == 4
    assert mc["difference"]["n"] == 4 and mc["difference"]["gained"] == mc["difference"]["lost"] == 0
    assert paired_difference_interval([1, 0], [1, 0])["difference"] == 0
    # --mc-seeds 3: the ELBO-based figures under three mask seeds, the first one the reported figure
    sp = data["mc_spread"]["choice_accuracy"]["after"]
    assert sp["seeds"] == [0, 1, 2] and len(sp["values"]) == 3 and sp["values"][0] == data["choice_accuracy"]["after"]
    assert sp["min"] <= sp["mean"] <= sp["max"] and sp["sd"] >= 0
    fresh = data["mc_spread"]["elbo_accuracy_fresh_masks"]
    assert fresh["before"]["values"] == fresh["after"]["values"]  # the same model on the same fresh masks
    assert "credits" not in data["train_sample"]["cached_masks"]
    assert data["train_sample"]["cached_masks"]["accuracy_interval"]["n"] == 4
    # comparable records: sampler settings, seeds, numerics, device name, package versions
    rec = data["record"]
    assert rec["sampler"]["gen_length"] == cfg.gen_length and rec["sampler"]["temperature"] == 0.0
    assert rec["seeds"] == {"seed": 0, "mc_seeds": 3, "cache_mask_seed": rec["seeds"]["cache_mask_seed"]}
    assert rec["numerics"] == {"dtype": "float32", "mixed_precision": "no", "load_in_4bit": False}
    assert rec["environment"]["device"] == "cpu" and rec["environment"]["device_name"].startswith("cpu")
    import importlib.metadata

    assert rec["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert rec["multiple_choice"] == {"samples": 2, "normalize": "none"} and rec["cache"]["draws"] == 2
    # query's eval_results view: this run and a copy of it side by side, one row per figure and model
    from stages.query import QueryConfig
    from stages.query import run as query

    other = tmp_path / "other"
    other.mkdir()
    (other / "eval.json").write_text((tmp_path / "run" / "eval.json").read_text())
    cols, rows = query(QueryConfig(evals=tmp_path, sql="SELECT run, model, value, n, low, high, method, device_name "
                                   "FROM eval_results WHERE figure = 'choice_accuracy' ORDER BY run, model"))
    assert [(r[0].rsplit("/", 1)[-1], r[1]) for r in rows] == [
        ("other", "after"), ("other", "before"), ("other", "difference"),
        ("run", "after"), ("run", "before"), ("run", "difference")]
    after = dict(zip(cols, rows[3]))
    assert (after["value"], after["n"], after["low"], after["high"]) == (
        mc["after"]["value"], 4, mc["after"]["low"], mc["after"]["high"])
    assert dict(zip(cols, rows[5]))["method"] == "newcombe-paired-score" and after["device_name"].startswith("cpu")

    # the console summary shows them
    from stages.evaluate import print_intervals

    print_intervals(result.intervals, result.mc_spread)
    out = capsys.readouterr().out
    assert f"0.500 ({n / 2:g}/{n}, 95% CI" in out and "newcombe-paired-score, 0 gained / 0 lost" in out
    assert "over 3 mask seeds" in out


def test_task_eval_records_the_sampler_and_threshold_above_one_is_exact(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"})
                               for a in range(3)) + "\n")
    completions = {}
    for name, fast in (("exact", {}), ("above-one", {"threshold": 1.5}), ("dual", {"cache": "dual", "threshold": 0.9})):
        cfg = EvalConfig(model="micro", scores=None, before="none", benchmark=bench, out=tmp_path / name,
                         gen_length=8, block_length=4, steps=8, device="cpu", train_sample=0, **fast)
        run(cfg)
        data = json.loads((tmp_path / name / "eval.json").read_text())
        assert data["sampler"] == {"gen_length": 8, "block_length": 4, "steps": 8,
                                   "cache": fast.get("cache", "none"), "threshold": fast.get("threshold")}
        completions[name] = [r["completion"] for r in pq.read_table(tmp_path / name / "task_results.parquet").to_pylist()]
    assert completions["above-one"] == completions["exact"] and len(completions["dual"]) == 3
    with pytest.raises(ConfigError, match="cache must be one of"):
        EvalConfig(model="micro", scores=None, benchmark=bench, cache="full")


def test_fresh_masks_are_the_draws_past_the_cache_and_replay_is_the_cached_draw(small_cache):
    """eval's fresh masks: draw index draws + extra of each (pair, side) under the cache's settings, never one
    training saw; the replay of a cached draw gives the cached counts (one request builder for both)."""
    from pipeline.estimator.diffusion import mask_seed, sample_masks
    from pipeline.estimator.replay import cached_request
    from pipeline.refcache.reader import open_cache
    from stages.evaluate import fresh_requests

    cache = open_cache(small_cache)
    fp, row = cache.fingerprint, cache.table().to_pylist()[0]
    chosen, rejected = fresh_requests([row], fp, extra=1)
    expected = sample_masks(row["chosen_len"], fp["samples"], mask_seed(fp["seed"], row["pair_id"], "chosen",
                                                                          fp["draws"] + 1), scheme=fp["scheme"])
    assert torch.equal(chosen.masks, expected.masks) and list(rejected.response_ids) == row["rejected_ids"]
    replayed = cached_request(row, "chosen", 0, fp)
    assert replayed.masks.sum(dim=1).tolist() == list(row["chosen_mask_counts"][0])
    assert not torch.equal(replayed.masks, chosen.masks)


def test_task_grading_under_a_verifier_reports_the_share_of_correct_answers_with_right_working(tmp_path, monkeypatch):
    import stages.evaluate as evaluate

    q = "Ava has 9 pens, gets 7 more and gives 5 away. How many are left?"
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": 11}) + "\n" for _ in range(4)))
    scripted = ["9 + 7 = 16\n16 - 5 = 11\n#### 11",  # right answer, right working
                "9 + 7 = 16\n15 - 5 = 113#### 11",  # right answer, wrong working
                "9 + 7 = 17\n16 - 5 = 12\n#### 12",  # wrong answer
                "9 + 7 = 16\n16 - 5 = 11"]  # no #### line: strict format (the reference is a bare number), no answer
    monkeypatch.setattr(evaluate, "complete", lambda model, tok, prompts, **kw: [
        {"completion": scripted[i % 4]} for i in range(len(prompts))])
    cfg = EvalConfig(model="micro", scores=None, before="none", benchmark=bench, out=tmp_path / "run",
                     verifier="arithmetic", device="cpu", train_sample=0)
    result = run(cfg)
    assert result.task_accuracy == {"after": 0.5} and result.working_accuracy == {"after": 0.25}
    assert result.working_share == {"after": {"correct": 2, "right_working": 1, "share": 0.5}}
    assert (result.intervals["working_accuracy"]["after"]["count"], result.intervals["working_accuracy"]["after"]["n"]) \
        == (1, 4)
    rows = pq.read_table(tmp_path / "run" / "task_results.parquet").to_pylist()
    assert [r["working_correct"] for r in rows] == [True, False, False, False]
    assert rows[1]["grade_reason"] == "line 2: 15 - 5 is 10, not 113" and rows[3]["predicted"] is None
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert data["grading"] == {"verifier": "arithmetic", "answer_format": "auto"}
    # the answer-only verifier reports no working figures; the last-number fallback, asked for, credits item 4
    plain = run(EvalConfig(model="micro", scores=None, before="none", benchmark=bench, out=tmp_path / "plain",
                           answer_format="any", device="cpu", train_sample=0))
    assert plain.task_accuracy == {"after": 0.75} and plain.working_share == {} and plain.working_accuracy == {}
