"""Task accuracy: completions from LLaDA's sampler on a benchmark of questions with numeric answers, graded by a
verifier (pipeline/grading/verifiers.py); the per-item rows eval writes to task_results.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.data.readers import jsonl_objects
from pipeline.grading.answers import reference_answer
from pipeline.grading.verifiers import get_verifier
from pipeline.sampling.completion import complete

TASK_RESULTS_SCHEMA = pa.schema([
    ("model", pa.string()),  # "before" or "after"
    ("index", pa.int64()),
    ("question", pa.string()),
    ("reference", pa.string()),
    ("completion", pa.string()),
    ("predicted", pa.string()),
    ("correct", pa.bool_()),
    ("working_correct", pa.bool_()),  # null where the verifier does not check working
    ("grade_reason", pa.string()),
])
"""Columns of task_results.parquet: one row per (model, benchmark item)."""


def read_benchmark(path: Path) -> list[dict]:
    """The benchmark's {question, answer} records; an answer that cannot be read as a number (a fraction, a
    marked solution '#### N', ...: pipeline.grading.answers.reference_answer) is a one-line error naming the record."""
    items = []
    for where, item in jsonl_objects(path):
        for key in ("question", "answer"):
            if key not in item:
                raise UserError(f"{where}: missing field '{key}'")
        if reference_answer(item["answer"]) is None:
            raise UserError(f"{where}: field 'answer' holds no readable number: {str(item['answer'])[:60]!r} "
                            "(a number such as 18, 3/4, \\frac{3}{4}, 1e3, or a solution ending '#### N')")
        items.append(item)
    return items


def task_accuracy(model, tokenizer, items: list[dict], cfg, label: str,
                  chat_template: bool) -> tuple[float, list[dict]]:
    """(accuracy, per-item rows) of ``items`` ({question, answer}) under ``cfg``'s sampler settings (a
    ``SamplingArgs``), verifier and answer format; ``label`` names the model in the rows."""
    prompts = [it["question"] for it in items]
    with progress_bar(f"eval: task accuracy ({label})", len(prompts), cfg.progress, unit="questions") as bar:
        done = complete(model, tokenizer, prompts, cfg, chat_template=chat_template,
                        on_batch=lambda rows: bar.advance(len(rows)))
    verifier = get_verifier(cfg.verifier, cfg.answer_format)
    rows = []
    for i, (it, out) in enumerate(zip(items, done)):
        ref = reference_answer(it["answer"])
        g = verifier.grade(out["completion"], ref, it["question"], reference_text=it["answer"])
        rows.append({"model": label, "index": i, "question": it["question"], "reference": str(ref),
                     "completion": out["completion"], "predicted": g.answer, "correct": bool(g.answer_correct),
                     "working_correct": g.working_correct, "grade_reason": g.reason})
    return sum(r["correct"] for r in rows) / max(1, len(rows)), rows


def working_figures(rows: list[dict]) -> tuple[list[int], dict[str, Any]] | None:
    """Per question 1 when answer and working are right (else 0), and {correct, right_working, share}: of the
    correct answers, how many have right working; None when the verifier does not check working."""
    if not rows or any(r["working_correct"] is None for r in rows):
        return None
    both = [int(r["correct"] and r["working_correct"]) for r in rows]
    correct = sum(r["correct"] for r in rows)
    return both, {"correct": correct, "right_working": sum(both),
                  "share": sum(both) / correct if correct else float("nan")}
