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

A finished round writes ``round.json`` with its summary and a fingerprint of
everything that decided it (the round's resolved stage configs, the content
identity of its starting and reference models, the questions file's hash).
A rerun skips each round whose ``round.json`` matches and redoes the first
that does not; make-pairs and score-ref inside a redone round resume from
what they finished. ``OUT/rounds.json`` holds the table across rounds,
``OUT/rounds.md`` the same as Markdown with ``OUT/rounds.png`` (task accuracy
per round, round 0 the original model, with 95% intervals) and
``OUT/rounds.parquet`` its figures, one row per round (``query --rounds-run``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from pipeline.core.atomic import atomic_path, check_writable, file_sha256, write_json_atomic, write_text_atomic
from pipeline.core.config import config_to_dict
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.paths import PAIRS_FILE, ROUNDS_PNG, ROUNDS_TABLE
from pipeline.evaluation.intervals import format_accuracy, format_difference, paired_difference_interval
from stages.run_stages import load_stages, score_train_eval, shipped_path, stage_timer

PROVENANCE_FIELDS = ["question_id", "chosen_from", "chosen_sample", "rejected_sample", "chosen_answer",
                     "rejected_answer", "reference_answer", "model", "model_sha256", "seed", "round"]
"""make-pairs columns carried into each round's pairs.arrow (queryable with `query --pairs`)."""
ROUND_FILE = "round.json"
ROUNDS_FILE = "rounds.json"


@dataclass
class RoundsResult:
    out: str
    seconds: float
    rounds: list[dict[str, Any]]
    """One summary per round (also in OUT/round-r/round.json)."""
    initial_task_accuracy: float | None
    """Task accuracy of the original model (round 1's `before`)."""
    report: str
    """OUT/rounds.md: the table across rounds."""
    resumed_rounds: int
    """Rounds found finished and skipped."""
    example_query: str


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r}"


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
    if score_cfg.pad_to and score_cfg.pad_to != mp_cfg.gen_length:  # 0: no padding, the user's choice
        raise ConfigError(f"run --rounds: score_ref pad_to ({score_cfg.pad_to}) differs from make_pairs gen_length "
                          f"({mp_cfg.gen_length}); the pairs are scored in the shape they were sampled in: set "
                          "them equal (or pad_to: 0 for no padding)")
    return configs


def _chat_template(cfg):
    """The one chat-template setting of the rounds: the sections that set it must agree."""
    given = {name: getattr(cfg, name)["chat_template"] for name in ("make_pairs", "score_ref", "eval")
             if getattr(cfg, name).get("chat_template") is not None}
    if len(set(given.values())) > 1:
        raise ConfigError("run --rounds: chat_template differs between sections ("
                          + ", ".join(f"{k}: {v}" for k, v in given.items())
                          + "); the pairs must be scored and evaluated under the rendering they were sampled with")
    return next(iter(given.values()), None)


def _fingerprint(cfg, configs, start_model: str, ref_model: str) -> dict[str, Any]:
    from pipeline.core.digest import content_digest
    from pipeline.models import model_identity

    # Paths inside the round folder are the same on every rerun; devices do not decide results.
    stages = {name: {k: v for k, v in config_to_dict(c).items() if k not in ("device", "progress")}
              for name, c in zip(("make_pairs", "ingest", "score_ref", "train", "eval"), configs)}
    stages["eval"].pop("scores", None)
    return {"stages": stages, "questions_sha256": file_sha256(configs[0].questions),
            "start_model": content_digest(model_identity(start_model)),
            "reference_model": content_digest(model_identity(ref_model)), "round_reference": cfg.round_reference}


def _check_out_folder(cfg) -> None:
    """A rounds folder is resumed only by the same run (same questions and sections); anything else is refused."""
    out = cfg.out
    if not out.exists() or not any(out.iterdir()):
        return
    marker = out / ROUNDS_FILE
    if not marker.is_file():
        raise UserError(f"{out}: folder holds files that are not a `run --rounds` run; choose another --out")
    previous = json.loads(marker.read_text(encoding="utf-8")).get("config", {})
    mine = _run_identity(cfg)
    for key in sorted(set(previous) | set(mine)):
        if previous.get(key) != mine.get(key):
            raise UserError(f"{out}: holds a rounds run made with another {key} ({ROUNDS_FILE}); "
                            "choose another --out to start a new one")


def _run_identity(cfg) -> dict[str, Any]:
    d = config_to_dict(cfg)
    return {k: d[k] for k in ("model", "questions", "round_reference", "make_pairs", "ingest", "score_ref", "train",
                              "eval")}


def run_rounds(cfg, log=print) -> RoundsResult:
    from stages import ingest, make_pairs

    start = time.perf_counter()
    round_configs(cfg, 1, cfg.model, cfg.model)  # every section validated before any work
    check_writable(cfg.out, "output folder")
    _check_out_folder(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    # Claim the folder first, so a run killed in round 1 is recognised (and resumed) by the next one.
    if not (cfg.out / ROUNDS_FILE).is_file():
        _write_report(cfg, [], None)
    summaries: list[dict[str, Any]] = []
    resumed = 0
    initial_acc = None
    for r in range(1, cfg.rounds + 1):
        d = round_dir(cfg.out, r)
        start_model = cfg.model if r == 1 else str(round_dir(cfg.out, r - 1) / "run" / "final")
        ref_model = start_model if cfg.round_reference == "policy" else cfg.model
        configs = round_configs(cfg, r, start_model, ref_model)
        fingerprint = _fingerprint(cfg, configs, start_model, ref_model)
        marker = d / ROUND_FILE
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf-8"))
            if found.get("fingerprint") == fingerprint:
                log(f"[round {r}] finished earlier, skipped")
                summaries.append(found["summary"])
                initial_acc = found.get("initial_task_accuracy", initial_acc)
                resumed += 1
                continue
            marker.unlink()  # ours, and stale: this round is redone
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        timed = stage_timer(log, times, r, since=start)
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
        summary = {
            "round": r, "start_model": start_model, "reference_model": ref_model,
            **{k: getattr(mp, k) for k in ("questions", "samples", "sample_accuracy", "pass_at_k",
                                           "questions_all_correct", "questions_all_wrong", "questions_mixed", "pairs",
                                           "pairs_reference_chosen")},
            "pairs_train": ing.splits.get("train", 0), "pairs_eval": ing.splits.get("eval", 0),
            "scored": sc.pairs, "train_steps": tr.steps, "final_train_loss": tr.final_loss,
            "final_train_reward_accuracy": tr.final_reward_accuracy,
            "task_accuracy": ev.task_accuracy.get("after"), **task,
            "preference_accuracy": ev.preference_accuracy.get("after"),
            "seconds": round(time.perf_counter() - t0, 2), "stage_seconds": times,
            "folder": str(d), "final_model": tr.final_model,
        }
        write_json_atomic(marker, {"fingerprint": fingerprint, "summary": summary,
                                   "initial_task_accuracy": initial_acc})
        summaries.append(summary)
        log(f"[round {r}] pairs {mp.pairs}, pass@k {mp.pass_at_k:.3f}, task accuracy "
            f"{_fmt(summary['task_accuracy'])}, {summary['seconds']:.1f}s")
        _write_report(cfg, summaries, initial_acc)
    report = _write_report(cfg, summaries, initial_acc)
    query = f"lldm-dpo query --samples {cfg.out} --preset samples_pass_rate"
    return RoundsResult(out=str(cfg.out), seconds=round(time.perf_counter() - start, 2), rounds=summaries,
                        initial_task_accuracy=initial_acc, report=str(report), resumed_rounds=resumed,
                        example_query=query)


def _correct_of(path: Path, label: str) -> list[bool]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=["model", "index", "correct"]).to_pylist()
    return [bool(r["correct"]) for r in sorted((r for r in rows if r["model"] == label), key=lambda r: r["index"])]


def task_figures(ev, run_dir: Path, initial_path: Path) -> dict[str, Any]:
    """The round's task accuracy as eval recorded it: its count and Wilson interval (eval.json's
    ``intervals``), and the paired difference against the original model on the same questions: eval's
    own interval in round 1, later rounds from the per-question records of round 1's eval."""
    iv = (getattr(ev, "intervals", None) or {}).get("task_accuracy", {})
    out: dict[str, Any] = {"task_accuracy_interval": iv.get("after")}
    if iv.get("before") is not None:
        out["initial_task_accuracy_interval"] = iv["before"]
    if iv.get("difference") is not None:
        out["task_accuracy_difference"] = iv["difference"]
    elif initial_path.is_file():
        before = _correct_of(initial_path, "before")
        after = _correct_of(Path(run_dir) / "task_results.parquet", "after")
        if before and len(before) == len(after):
            out["task_accuracy_difference"] = paired_difference_interval(before, after)
    return out


def _fmt(value) -> str:
    if isinstance(value, dict):  # an interval record: accuracy's [low, high] or a difference with its interval
        if "difference" in value:
            return f"{value['difference']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"
        return f"[{value['low']:.3f}, {value['high']:.3f}] ({value['count']:g}/{value['n']})"
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


COLUMNS = (("round", "round"), ("pairs", "pairs"), ("pairs_reference_chosen", "ref. chosen"),
           ("sample_accuracy", "sample acc."), ("pass_at_k", "pass@k"), ("questions_all_correct", "only correct"),
           ("questions_all_wrong", "only wrong"), ("final_train_loss", "train loss"),
           ("final_train_reward_accuracy", "reward acc."), ("preference_accuracy", "pref. acc. (held-out)"),
           ("task_accuracy", "task acc. after"), ("task_accuracy_interval", "95% CI"),
           ("task_accuracy_difference", "vs original [95% CI]"))


def headline(summaries: list[dict[str, Any]]) -> str:
    """The run's result in one line: held-out task accuracy of the original model and of the last round's,
    each with its count and 95% interval, and the paired difference with its interval (eval's records)."""
    if not summaries:
        return "task accuracy: no round finished yet"
    first, last = summaries[0], summaries[-1]
    before, after = first.get("initial_task_accuracy_interval"), last.get("task_accuracy_interval")
    if not after:
        return f"task accuracy after round {last['round']}: {_fmt(last.get('task_accuracy'))}"
    text = (f"task accuracy (held-out, greedy): before {format_accuracy(before) if before else '-'} -> "
            f"after round {last['round']} {format_accuracy(after)}")
    diff = last.get("task_accuracy_difference")
    return text + (f"; difference {format_difference(diff)}" if diff else "")


def report_markdown(cfg, summaries: list[dict[str, Any]], initial_acc) -> str:
    lines = [f"# lldm-dpo run --rounds {cfg.rounds}: {cfg.out}", "", f"**{headline(summaries)}**", "",
             f"Questions: {cfg.questions}; model {cfg.model}; reference each round: {cfg.round_reference}; "
             f"task accuracy of the original model: {_fmt(initial_acc)}.",
             "sample acc. and pass@k are the round's starting policy on the training questions; "
             "task acc. is the round's trained model on the benchmark.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summaries:
        lines.append("| " + " | ".join(_fmt(s.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", "![task accuracy per round, 95% intervals (round 0: the original model)](rounds.png)", "",
              "The same figures, one row per round: `rounds.parquet` "
              f"(`lldm-dpo query --rounds-run {cfg.out} 'SELECT * FROM rounds'`)."]
    return "\n".join(lines) + "\n"


def table_rows(model: str, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of OUT/rounds.parquet (``ROUNDS_SCHEMA``): round 0 the original model (its task figures from
    round 1's eval), then each round's figures as its summary holds them."""
    def task(row, iv):
        iv = iv or {}
        return {"task_correct": iv.get("count"), "task_n": iv.get("n"), "task_low": iv.get("low"),
                "task_high": iv.get("high"), **row}

    rows = []
    if summaries and summaries[0].get("initial_task_accuracy_interval"):
        iv = summaries[0]["initial_task_accuracy_interval"]
        rows.append(task({"round": 0, "model": model, "task_accuracy": iv.get("value")}, iv))
    for s in summaries:
        diff = s.get("task_accuracy_difference") or {}
        rows.append(task({
            "round": s["round"], "model": s.get("final_model"), "pairs": s.get("pairs"),
            "pairs_reference_chosen": s.get("pairs_reference_chosen"), "pass_at_k": s.get("pass_at_k"),
            "sample_accuracy": s.get("sample_accuracy"), "train_loss": s.get("final_train_loss"),
            "preference_accuracy": s.get("preference_accuracy"), "task_accuracy": s.get("task_accuracy"),
            "difference": diff.get("difference"), "difference_low": diff.get("low"),
            "difference_high": diff.get("high"), "method": diff.get("method")}, s.get("task_accuracy_interval")))
    return rows


def _write_report(cfg, summaries, initial_acc) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.schemas import ROUNDS_SCHEMA
    from pipeline.report.visual import rounds_png

    write_json_atomic(cfg.out / ROUNDS_FILE, {"config": _run_identity(cfg), "rounds": summaries,
                                              "initial_task_accuracy": initial_acc})
    rows = table_rows(cfg.model, summaries)
    with atomic_path(cfg.out / ROUNDS_TABLE) as tmp:  # recorded: the next round replaces it
        pq.write_table(pa.Table.from_pylist(rows, schema=ROUNDS_SCHEMA), tmp)
    with atomic_path(cfg.out / ROUNDS_PNG) as tmp:
        tmp.write_bytes(rounds_png(rows, f"lldm-dpo run --rounds {cfg.rounds}: task accuracy per round"))
    path = cfg.out / "rounds.md"
    write_text_atomic(path, report_markdown(cfg, summaries, initial_acc))
    return path


def print_rounds_summary(result: RoundsResult, console: Console | None = None) -> None:
    """The headline, then the table across rounds when the terminal shows it whole (about 120 columns and up),
    else each round's figures one (metric, value) a line."""
    from stages.run_stages import figure_table, fits_wide

    console = console or Console()
    title = (f"lldm-dpo run --rounds: done in {result.seconds:.0f}s "
             f"(original model's task accuracy {_fmt(result.initial_task_accuracy)})")
    console.print(headline(result.rounds), markup=False)  # the result leads, wrapped at its spaces
    cells = [[_fmt(s.get(k)) for k, _ in COLUMNS] for s in result.rounds]
    if fits_wide([header for _, header in COLUMNS], cells, console.width):
        table = Table(*(Column(header, justify="right") for _, header in COLUMNS), title=title, title_justify="left")
        for row in cells:
            table.add_row(*row)
        console.print(table)
    else:
        console.print(title, soft_wrap=True, markup=False)
        for row in cells:
            console.print(figure_table(f"round {row[0]}", [(header, value) for (_, header), value
                                                           in zip(COLUMNS[1:], row[1:])]))
    console.print(f"report: {result.report}", soft_wrap=True, markup=False)
    console.print("try:", result.example_query, soft_wrap=True, markup=False)
