"""``lldm-dpo run --rounds R --questions FILE``: iterative DPO on the policy's own graded samples.

Round r (folder ``OUT/round-r``):

1. make-pairs: the round's starting policy (the original model in round 1,
   round r-1's final model after) samples ``num_generations`` solutions per
   question; graded pairs go to ``pairs.jsonl`` (samples beside it);
2. ingest: ``pairs.arrow`` with the provenance columns kept; nothing may be
   quarantined (make-pairs never writes what ingest refuses);
3. score-ref: the reference is the round's starting policy
   (``round_reference: policy``, iterative RPO) or the original model
   (``initial``), cached in ``cache/``;
4. train: DPO from the round's starting policy into ``run/``;
5. eval: task accuracy (and preference accuracy on the round's held-out
   pairs) of ``run/final``; round 1 also evaluates the original model.

The files a round and the rounds write (``round.json``, ``rounds.json``,
``rounds.md``, ``rounds.png``, ``rounds.parquet``) and how a rerun resumes
are pipeline/report/rounds.py's; make-pairs and score-ref inside a redone
round resume from what they finished.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from pipeline.core.atomic import check_writable
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.paths import PAIRS_FILE
from pipeline.core.progress import stage_timer
from pipeline.report.rounds import (
    ROUNDS_FILE,
    check_rounds_folder,
    finished_round,
    format_figure,
    round_dir,
    round_fingerprint,
    round_summary,
    task_figures,
    write_round,
    write_rounds_report,
)
from pipeline.report.summary import RoundsResult
from stages.run_stages import load_stages, score_train_eval, shipped_path

PROVENANCE_FIELDS = ["question_id", "chosen_from", "chosen_sample", "rejected_sample", "chosen_answer",
                     "rejected_answer", "reference_answer", "model", "model_sha256", "seed", "round"]
"""make-pairs columns carried into each round's pairs.arrow (queryable with `query --pairs`)."""


def round_configs(cfg, r: int, start_model: str, ref_model: str, has_eval_pairs: bool | None = None):
    """The five stage configs of round r (validated; make-pairs' and ingest's first)."""
    d = round_dir(cfg.out, r)
    rendering = _chat_template(cfg)
    shown = {"device": cfg.device, "progress": cfg.progress}  # a section's own settings win
    mp = {**shown, **cfg.make_pairs, "questions": shipped_path(str(cfg.questions)), "model": start_model,
          "out": str(d / "pairs.jsonl"), "round": r}
    ingest = {"progress": cfg.progress, **{k: v for k, v in cfg.ingest.items() if k != "inputs"},
              "inputs": [str(d / "pairs.jsonl")], "out": str(d / PAIRS_FILE),
              "keep_fields": sorted(set(cfg.ingest.get("keep_fields", [])) | set(PROVENANCE_FIELDS))}
    score = {**shown, **cfg.score_ref, "model": ref_model, "pairs": d / PAIRS_FILE, "out": d / "cache"}
    train = {**shown, **cfg.train, "scores": d / "cache", "out": d / "run", "model": start_model,
             "allow_different_init": start_model != ref_model, "overwrite": True, "resume": False}
    ev = {**shown, **cfg.eval, "scores": d / "cache" if has_eval_pairs is not False else None,
          "out": d / "run", "model": str(d / "run" / "final"), "before": cfg.model if r == 1 else "none"}
    if rendering is not None:  # sampled, scored and evaluated under one prompt rendering
        mp["chat_template"] = score["chat_template"] = ev["chat_template"] = rendering
    configs = load_stages(f"run config, round {r}", make_pairs=mp, ingest=ingest, score_ref=score, train=train,
                          eval=ev)
    mp_cfg, score_cfg = configs[0], configs[2]
    if cfg.fresh_questions and r > 1:  # round r takes the next `limit` questions after the validated offset
        mp_cfg = replace(mp_cfg, offset=mp_cfg.offset + (r - 1) * mp_cfg.limit)
        configs = (mp_cfg, *configs[1:])
    if score_cfg.pad_to and score_cfg.pad_to != mp_cfg.gen_length:  # 0: no padding, the user's choice
        raise ConfigError(f"run --rounds: score_ref pad_to ({score_cfg.pad_to}) differs from make_pairs gen_length "
                          f"({mp_cfg.gen_length}); the pairs are scored in the shape they were sampled in: set "
                          "them equal (or pad_to: 0 for no padding)")
    return configs


def check_fresh_questions(mp_cfg, rounds: int) -> None:
    """``fresh_questions``: the questions file holds ``rounds`` x ``limit`` questions after the offset."""
    from pipeline.sampling.make_pairs_run import read_config_questions

    held = len(read_config_questions(mp_cfg).questions)
    needed = mp_cfg.offset + rounds * mp_cfg.limit
    if held < needed:
        raise ConfigError(f"{mp_cfg.questions}: fresh_questions needs {needed} questions ({rounds} rounds of "
                          f"make_pairs.limit {mp_cfg.limit} after offset {mp_cfg.offset}), the file holds {held}")


def _chat_template(cfg):
    """The one chat-template setting of the rounds: the sections that set it must agree."""
    given = {name: getattr(cfg, name)["chat_template"] for name in ("make_pairs", "score_ref", "eval")
             if getattr(cfg, name).get("chat_template") is not None}
    if len(set(given.values())) > 1:
        raise ConfigError("run --rounds: chat_template differs between sections ("
                          + ", ".join(f"{k}: {v}" for k, v in given.items())
                          + "); the pairs must be scored and evaluated under the rendering they were sampled with")
    return next(iter(given.values()), None)


def run_rounds(cfg, log=print) -> RoundsResult:
    start = time.perf_counter()
    first = round_configs(cfg, 1, cfg.model, cfg.model)  # every section validated before any work
    if cfg.fresh_questions:
        check_fresh_questions(first[0], cfg.rounds)
    check_writable(cfg.out, "output folder")
    check_rounds_folder(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    # Claim the folder first, so a run killed in round 1 is recognised (and resumed) by the next one.
    if not (cfg.out / ROUNDS_FILE).is_file():
        write_rounds_report(cfg, [], None)
    summaries: list[dict[str, Any]] = []
    resumed = 0
    initial_acc = None
    for r in range(1, cfg.rounds + 1):
        start_model = cfg.model if r == 1 else str(round_dir(cfg.out, r - 1) / "run" / "final")
        ref_model = start_model if cfg.round_reference == "policy" else cfg.model
        configs = round_configs(cfg, r, start_model, ref_model)
        fingerprint = round_fingerprint(cfg.round_reference, configs, start_model, ref_model)
        found = finished_round(round_dir(cfg.out, r), fingerprint)
        if found is not None:
            log(f"[round {r}] finished earlier, skipped")
            summaries.append(found["summary"])
            initial_acc = found.get("initial_task_accuracy", initial_acc)
            resumed += 1
            continue
        summary, initial_acc = _run_round(cfg, r, start_model, ref_model, configs, log, start, initial_acc)
        write_round(round_dir(cfg.out, r), fingerprint, summary, initial_acc)
        summaries.append(summary)
        log(f"[round {r}] pairs {summary['pairs']}, pass@k {summary['pass_at_k']:.3f}, task accuracy "
            f"{format_figure(summary['task_accuracy'])}, {summary['seconds']:.1f}s")
        write_rounds_report(cfg, summaries, initial_acc)
    report = write_rounds_report(cfg, summaries, initial_acc)
    query = f"lldm-dpo query --samples {cfg.out} --preset samples_pass_rate"
    return RoundsResult(out=str(cfg.out), seconds=round(time.perf_counter() - start, 2), rounds=summaries,
                        initial_task_accuracy=initial_acc, report=str(report), resumed_rounds=resumed,
                        example_query=query)


def _run_round(cfg, r: int, start_model: str, ref_model: str, configs, log, since: float, initial_acc):
    """Round r's stages in order: its summary, and the original model's task accuracy (round 1 measures it)."""
    from stages import ingest, make_pairs

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    timed = stage_timer(log, times, r, since=since)
    mp_cfg, ing_cfg, sc_cfg, tr_cfg, _ = configs
    mp = timed("make-pairs", make_pairs.run, mp_cfg)
    if mp.pairs == 0:
        raise UserError(f"round {r}: make-pairs made no pairs from {mp.questions} questions "
                        f"({mp.questions_all_correct} only correct, {mp.questions_all_wrong} only wrong); "
                        "raise num_generations or turn on reference_solution_fallback")
    ing = timed("ingest", ingest.run, ing_cfg)
    if ing.quarantined:
        raise UserError(f"round {r}: ingest quarantined {ing.quarantined} of make-pairs' pairs "
                        f"(see {ing.quarantine}); this is a bug")
    ev_cfg = round_configs(cfg, r, start_model, ref_model, has_eval_pairs=ing.splits.get("eval", 0) > 0)[4]
    sc, tr, ev, _ = score_train_eval(cfg, timed, sc_cfg, tr_cfg, ev_cfg)
    if r == 1:
        initial_acc = ev.task_accuracy.get("before")
    # round 1's eval records of the original model: the "before" rows of its task_results.parquet
    task = task_figures(ev, tr_cfg.out, round_dir(cfg.out, 1) / "run" / "task_results.parquet")
    summary = round_summary(r, start_model, ref_model, (mp, ing, sc, tr, ev), task, time.perf_counter() - t0,
                            times, round_dir(cfg.out, r))
    return summary, initial_acc
