"""The files of a ``lldm-dpo run --rounds`` folder: each round's ``round.json`` and the table across rounds.

A finished round writes ``round.json`` with its summary and a fingerprint of
everything that decided it (the round's resolved stage configs, the content
identity of its starting and reference models, the questions file's hash).
A rerun skips each round whose ``round.json`` matches and redoes the first
that does not. ``OUT/rounds.json`` holds the table across rounds (and the
run's identity: a folder is resumed only by the same run), ``OUT/rounds.md``
the same as Markdown with ``OUT/rounds.png`` (task accuracy per round, round
0 the original model, with 95% intervals) and ``OUT/rounds.parquet`` its
figures, one row per round (``query --rounds-run``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_path, file_sha256, write_json_atomic, write_text_atomic
from pipeline.core.config import config_to_dict
from pipeline.core.errors import UserError
from pipeline.core.paths import ROUNDS_PNG, ROUNDS_TABLE
from pipeline.evaluation.intervals import format_accuracy, format_difference, paired_difference_interval

ROUND_FILE = "round.json"
ROUNDS_FILE = "rounds.json"
STAGE_NAMES = ("make_pairs", "ingest", "score_ref", "train", "eval")
"""A round's stages in the order it runs them (and its configs are given)."""
MAKE_PAIRS_FIGURES = ("questions", "samples", "sample_accuracy", "pass_at_k", "questions_all_correct",
                      "questions_all_wrong", "questions_mixed", "pairs", "pairs_reference_chosen")
"""make-pairs' figures a round's summary carries."""


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r}"


def run_identity(cfg) -> dict[str, Any]:
    """What makes a rounds run the same run (``cfg``: run's config): a folder is resumed only by it."""
    d = config_to_dict(cfg)
    identity = {k: d[k] for k in ("model", "questions", "round_reference", "make_pairs", "ingest", "score_ref",
                                  "train", "eval")}
    if d.get("fresh_questions"):  # only when on: a run of the same questions each round keeps its identity
        identity["fresh_questions"] = True
    return identity


def check_rounds_folder(cfg) -> None:
    """A rounds folder is resumed only by the same run (same questions and sections); anything else is refused."""
    out = cfg.out
    if not out.exists() or not any(out.iterdir()):
        return
    marker = out / ROUNDS_FILE
    if not marker.is_file():
        raise UserError(f"{out}: folder holds files that are not a `run --rounds` run; choose another --out")
    previous = json.loads(marker.read_text(encoding="utf-8")).get("config", {})
    mine = run_identity(cfg)
    for key in sorted(set(previous) | set(mine)):
        if previous.get(key) != mine.get(key):
            raise UserError(f"{out}: holds a rounds run made with another {key} ({ROUNDS_FILE}); "
                            "choose another --out to start a new one")


def round_fingerprint(round_reference: str, configs, start_model: str, ref_model: str) -> dict[str, Any]:
    """Everything that decided a round: its stage configs (``STAGE_NAMES`` order), the content identity of its
    starting and reference models, the questions file's hash."""
    from pipeline.core.digest import content_digest
    from pipeline.models import model_identity

    # Paths inside the round folder are the same on every rerun; devices do not decide results.
    stages = {name: {k: v for k, v in config_to_dict(c).items() if k not in ("device", "progress")}
              for name, c in zip(STAGE_NAMES, configs)}
    stages["eval"].pop("scores", None)
    if not stages["make_pairs"].get("offset"):  # a later key: rounds of the file's first questions keep their prints
        stages["make_pairs"].pop("offset", None)
    return {"stages": stages, "questions_sha256": file_sha256(configs[0].questions),
            "start_model": content_digest(model_identity(start_model)),
            "reference_model": content_digest(model_identity(ref_model)), "round_reference": round_reference}


def finished_round(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The round's record (``summary``, ``initial_task_accuracy``) when it finished with this fingerprint; a
    record of another fingerprint is ours and stale: removed, and the round is redone."""
    marker = folder / ROUND_FILE
    if not marker.is_file():
        return None
    found = json.loads(marker.read_text(encoding="utf-8"))
    if found.get("fingerprint") == fingerprint:
        return found
    marker.unlink()
    return None


def write_round(folder: Path, fingerprint: dict[str, Any], summary: dict[str, Any], initial_acc) -> None:
    write_json_atomic(folder / ROUND_FILE, {"fingerprint": fingerprint, "summary": summary,
                                            "initial_task_accuracy": initial_acc})


def round_summary(r: int, start_model: str, ref_model: str, results, task: dict[str, Any], seconds: float,
                  stage_seconds: dict[str, float], folder: Path) -> dict[str, Any]:
    """A round's summary (its round.json and a row of the table) from its stages' results (``results``: make-pairs,
    ingest, score-ref, train and eval's) and its task figures (``task_figures``)."""
    mp, ing, sc, tr, ev = results
    return {
        "round": r, "start_model": start_model, "reference_model": ref_model,
        **{k: getattr(mp, k) for k in MAKE_PAIRS_FIGURES},
        "pairs_train": ing.splits.get("train", 0), "pairs_eval": ing.splits.get("eval", 0),
        "scored": sc.pairs, "train_steps": tr.steps, "final_train_loss": tr.final_loss,
        "final_train_reward_accuracy": tr.final_reward_accuracy,
        "task_accuracy": ev.task_accuracy.get("after"), **task,
        "preference_accuracy": ev.preference_accuracy.get("after"),
        "seconds": round(seconds, 2), "stage_seconds": stage_seconds,
        "folder": str(folder), "final_model": tr.final_model,
    }


def _correct_of(path: Path, label: str) -> list[bool]:
    """Per benchmark item, in order, whether the model eval recorded as ``label`` answered it right."""
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


def format_figure(value) -> str:
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
        return f"task accuracy after round {last['round']}: {format_figure(last.get('task_accuracy'))}"
    text = (f"task accuracy (held-out, greedy): before {format_accuracy(before) if before else '-'} -> "
            f"after round {last['round']} {format_accuracy(after)}")
    diff = last.get("task_accuracy_difference")
    return text + (f"; difference {format_difference(diff)}" if diff else "")


def report_markdown(cfg, summaries: list[dict[str, Any]], initial_acc) -> str:
    """OUT/rounds.md: the headline, the run's settings (``cfg``: run's config) and the table across rounds."""
    lines = [f"# lldm-dpo run --rounds {cfg.rounds}: {cfg.out}", "", f"**{headline(summaries)}**", "",
             f"Questions: {cfg.questions}; model {cfg.model}; reference each round: {cfg.round_reference}; "
             f"task accuracy of the original model: {format_figure(initial_acc)}.",
             "sample acc. and pass@k are the round's starting policy on the training questions; "
             "task acc. is the round's trained model on the benchmark.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summaries:
        lines.append("| " + " | ".join(format_figure(s.get(k)) for k, _ in COLUMNS) + " |")
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


def write_rounds_report(cfg, summaries, initial_acc) -> Path:
    """OUT/rounds.json, rounds.parquet, rounds.png and rounds.md (``cfg``: run's config), each replaced whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.schemas import ROUNDS_SCHEMA
    from pipeline.report.visual import rounds_png

    write_json_atomic(cfg.out / ROUNDS_FILE, {"config": run_identity(cfg), "rounds": summaries,
                                              "initial_task_accuracy": initial_acc})
    rows = table_rows(cfg.model, summaries)
    with atomic_path(cfg.out / ROUNDS_TABLE) as tmp:  # recorded: the next round replaces it
        pq.write_table(pa.Table.from_pylist(rows, schema=ROUNDS_SCHEMA), tmp)
    with atomic_path(cfg.out / ROUNDS_PNG) as tmp:
        tmp.write_bytes(rounds_png(rows, f"lldm-dpo run --rounds {cfg.rounds}: task accuracy per round"))
    path = cfg.out / "rounds.md"
    write_text_atomic(path, report_markdown(cfg, summaries, initial_acc))
    return path
