"""make-pairs' run: each question's samples drawn (resumably: rows streamed to ``SAMPLES.partial``, checked against
this run's model content, sampler settings and questions), graded by the verifier, paired by the policy of
``pipeline.sampling.selfpairs``, and the pairs and samples files written."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import check_replaceable, check_writable, sweep_stale
from pipeline.core.digest import content_digest
from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.data.pairs import normalize_text
from pipeline.grading.verifiers import get_verifier
from pipeline.sampling.completion import (
    append_jsonl,
    check_settings,
    earlier_rows,
    load_for_sampling,
    sampler_settings,
    write_jsonl,
)
from pipeline.sampling.selfpairs import (
    DiffusionSampler,
    PairingPolicy,
    Question,
    SampleItem,
    grade_sample,
    pair_question,
    read_questions,
    sample_seed,
)


@dataclass
class MakePairsResult:
    out: str
    samples_file: str
    questions: int
    duplicate_questions: int
    """Records skipped as repeats of an earlier question (same id and answer)."""
    samples: int
    sampled_now: int
    resumed: int
    """Samples reused from an earlier (possibly interrupted) run."""
    correct_samples: int
    """Samples with the right answer (whatever their working)."""
    wrong_working_samples: int
    """Distinct samples with the right answer over wrong working (the verifier's): never chosen."""
    empty_samples: int
    questions_all_correct: int
    questions_all_wrong: int
    questions_mixed: int
    questions_with_pairs: int
    pairs: int
    pairs_reference_chosen: int
    repeated_pairs: int
    """Pairs dropped as repeats of another question's (two ids holding the same text); ingest would refuse them."""
    sample_accuracy: float
    """Share of samples graded correct."""
    pass_at_k: float
    """Share of questions with at least one correct sample."""
    seconds: float
    samples_per_second: float
    """Samples drawn per second of sampling, this invocation."""
    model_sha256: str
    details: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, Any] = field(default_factory=dict)
    """sample_accuracy and pass_at_k with their counts and 95% Wilson intervals (pipeline.evaluation.intervals, which
    the stage adds: sampling sits below evaluation). pass@k's
    unit is the question; sample accuracy's is the sample, and the k samples of one question are not
    independent, so its interval understates the uncertainty (take pass@k's for question-level claims)."""


def make_pairs(cfg, sampler=None) -> MakePairsResult:
    """Sample, grade and pair the questions of ``cfg`` (make-pairs' config: a ``SamplingArgs`` and its files,
    grading and pairing options); ``sampler`` (tests) replaces the model: a callable over ``SampleItem`` batches
    with an ``identity`` attribute."""
    start = time.perf_counter()
    if not cfg.questions:
        raise UserError("no questions file given (the QUESTIONS argument, or questions: in --config)")
    qset = read_config_questions(cfg)
    questions = qset.questions[cfg.offset :]
    questions = questions[: cfg.limit] if cfg.limit else questions
    if not questions:
        raise UserError(f"{cfg.questions}: no questions after the first {cfg.offset} (offset) of "
                        f"{len(qset.questions)}")
    out = Path(cfg.out)
    _check_outputs(out, cfg.samples_path)
    if sampler is not None:
        identity = sampler.identity
    else:
        from pipeline.models import model_identity  # model code (torch) only when a run needs it

        identity = model_identity(cfg.model)
    drawn = _draw_samples(cfg, questions, sampler, identity)
    pairing = pair_all(cfg, questions, drawn.rows, drawn.model_sha)
    write_jsonl(out, pairing.pairs)
    correct = sum(bool(r["correct"]) for r in drawn.rows)
    counts, pairs = pairing.counts, pairing.pairs
    return MakePairsResult(
        out=str(out), samples_file=str(cfg.samples_path), questions=len(questions),
        duplicate_questions=qset.duplicates, samples=len(drawn.rows), sampled_now=drawn.sampled_now,
        resumed=drawn.resumed, correct_samples=correct, wrong_working_samples=pairing.wrong_working,
        empty_samples=pairing.empty, questions_all_correct=counts["all_correct"],
        questions_all_wrong=counts["all_wrong"], questions_mixed=counts["mixed"],
        questions_with_pairs=pairing.with_pairs, pairs=len(pairs),
        pairs_reference_chosen=sum(p["chosen_from"] == "reference" for p in pairs),
        sample_accuracy=round(correct / len(drawn.rows), 4) if drawn.rows else 0.0,
        pass_at_k=round((counts["all_correct"] + counts["mixed"]) / len(questions), 4),
        seconds=round(time.perf_counter() - start, 3),
        samples_per_second=round(drawn.sampled_now / drawn.seconds, 3) if drawn.seconds else 0.0,
        repeated_pairs=pairing.repeats, model_sha256=drawn.model_sha,
        details={"settings": drawn.settings, "partial": str(drawn.partial)},
    )


def read_config_questions(cfg):
    """The questions file of make-pairs' config ``cfg``, read with its field names (every question, before
    ``offset`` and ``limit``)."""
    return read_questions(cfg.questions, question_field=cfg.question_field, answer_field=cfg.answer_field,
                          id_field=cfg.id_field, solution_field=cfg.solution_field)


def _check_outputs(out: Path, samples_file: Path) -> None:
    """The pairs, samples and partial files ours to write: stale temporaries of a killed run of ours swept."""
    partial = samples_file.with_name(samples_file.name + ".partial")
    check_writable(out, "pairs file")
    for path in (out, samples_file, partial):
        check_replaceable(path, "--out")
    for name in (out.name, samples_file.name, partial.name):
        sweep_stale(out.parent, name)  # temporary files of a killed run of ours
    _check_pairs_target(out)


@dataclass
class Drawn:
    """Every question's k samples, graded by this run's verifier, in question order."""

    rows: list[dict]
    sampled_now: int
    resumed: int
    seconds: float
    """Seconds of sampling, this invocation."""
    model_sha: str
    settings: dict
    partial: Path


def _draw_samples(cfg, questions: list[Question], sampler, identity: Any) -> Drawn:
    """The samples of an earlier run reused (same model content, settings and questions), the rest drawn into
    the partial file; all regraded with this run's verifier, the samples file written when anything changed."""
    samples_file = cfg.samples_path
    partial = samples_file.with_name(samples_file.name + ".partial")
    by_id = {q.question_id: q for q in questions}
    settings = sampler_settings(cfg)
    model_sha = content_digest(identity)
    k = cfg.num_generations
    verifier = get_verifier(cfg.verifier, cfg.answer_format)
    done = _read_done(samples_file, by_id, settings, model_sha, k, tolerate_tail=False)
    done.update(_read_done(partial, by_id, settings, model_sha, k, tolerate_tail=True))
    pending = [SampleItem(q, j, sample_seed(cfg.seed, q.question_id, j))
               for q in questions for j in range(k) if (q.question_id, j) not in done]
    resumed = len(questions) * k - len(pending)
    sampled: list[dict] = []
    seconds = 0.0
    if pending or partial.exists() or not samples_file.exists():
        write_jsonl(partial, done.values())  # the partial file starts as the rows already done
        if pending:
            sampler = sampler if sampler is not None else load_sampler(cfg, identity)
            seconds = _sample_into(cfg, sampler, pending, partial, settings, model_sha, sampled, verifier)
        rows = {**done, **{(r["question_id"], r["sample"]): r for r in sampled}}
        ordered = [rows[(q.question_id, j)] for q in questions for j in range(k)]
        for r in ordered:
            r["round"] = cfg.round
        _regrade(ordered, by_id, verifier)
        write_jsonl(samples_file, ordered)
        partial.unlink(missing_ok=True)
    else:
        ordered = [done[(q.question_id, j)] for q in questions for j in range(k)]
        if _regrade(ordered, by_id, verifier):  # graded by another verifier or format: the file follows
            write_jsonl(samples_file, ordered)
    return Drawn(ordered, len(sampled), resumed, seconds, model_sha, settings, partial)


@dataclass
class Pairing:
    """The pairs of every question, and what the questions' samples were."""

    pairs: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"all_correct": 0, "all_wrong": 0, "mixed": 0})
    empty: int = 0
    with_pairs: int = 0
    repeats: int = 0
    wrong_working: int = 0


def pair_all(cfg, questions: list[Question], ordered: list[dict], model_sha: str) -> Pairing:
    """Each question's samples (``ordered``: k per question, in question order) paired under ``cfg``'s policy,
    with the provenance columns; a pair repeating another question's (two ids, one text) is dropped."""
    k = cfg.num_generations
    policy = PairingPolicy(cfg.pairs_per_question, cfg.reference_solution_fallback)
    provenance = {"model": cfg.model, "model_sha256": model_sha, "seed": cfg.seed, "round": cfg.round}
    tally = Pairing()
    seen: set[tuple[str, str, str]] = set()
    for i, q in enumerate(questions):
        outcome = pair_question(q, ordered[i * k : (i + 1) * k], policy)
        tally.counts[outcome.kind] += 1
        tally.empty += outcome.empty
        tally.wrong_working += outcome.wrong_working
        kept = []
        for p in outcome.pairs:
            # Two ids may hold the same question text: ingest would quarantine the repeated pair.
            key = (normalize_text(p["prompt"]), normalize_text(p["chosen"]), normalize_text(p["rejected"]))
            if key in seen:
                tally.repeats += 1
                continue
            seen.add(key)
            kept.append({**p, **provenance})
        tally.with_pairs += bool(kept)
        tally.pairs += kept
    return tally


# --- earlier samples ------------------------------------------------------------------


def _read_done(path: Path, by_id: dict[str, Question], settings: dict, model_sha: str, k: int,
               *, tolerate_tail: bool) -> dict[tuple[str, int], dict]:
    done: dict[tuple[str, int], dict] = {}
    for where, row in earlier_rows(path, tolerate_tail=tolerate_tail):
        if not isinstance(row, dict) or not {"question_id", "sample", "sampler", "model_sha256"} <= row.keys():
            raise UserError(f"{where}: not a `lldm-dpo make-pairs` sample row; choose another --out")
        if row["model_sha256"] != model_sha:
            raise UserError(f"{where}: sampled by another model (content identity {row['model_sha256']}, "
                            f"this run's {model_sha}); delete the file or choose another --out")
        check_settings(where, row["sampler"] or {}, settings)
        question = by_id.get(row["question_id"])
        if question is None or not 0 <= row["sample"] < k:
            continue  # beyond --limit / --num-generations or another file's question: not ours to write back
        if row.get("prompt") != question.prompt or row.get("reference_answer") != question.reference_answer:
            raise UserError(f"{where}: question {question.question_id!r} differs from {question.where}; "
                            "a different questions file? delete the file or choose another --out")
        done[(row["question_id"], row["sample"])] = row
    return done


def _check_pairs_target(out: Path) -> None:
    """Refuse to replace a file that is not an earlier make-pairs output (no command removes what it did not write)."""
    if not out.exists():
        return
    with out.open("rb") as f:
        first = f.readline()
    if not first.strip():
        return
    try:
        row = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        row = None
    if not isinstance(row, dict) or "question_id" not in row or "chosen_from" not in row:
        raise UserError(f"{out}: exists and is not a `lldm-dpo make-pairs` output; choose another --out")


def _regrade(rows: list[dict], by_id: dict[str, Question], verifier) -> bool:
    """Grade every row with this run's verifier (samples reused from a run graded otherwise are regraded:
    grading is cheap and decides the pairs); True when any row's grade changed."""
    changed = False
    for row in rows:
        graded = grade_sample(verifier, by_id[row["question_id"]], row["completion"])
        if any(row.get(key) != value for key, value in graded.items()):
            row.update(graded)
            changed = True
    return changed


def load_sampler(cfg, identity: Any) -> DiffusionSampler:
    """The policy loaded for sampling, as a ``DiffusionSampler`` with ``cfg``'s sampler settings."""
    model, tokenizer = load_for_sampling(cfg)
    return DiffusionSampler(model, tokenizer, cfg, identity=identity,
                            chat_template=cfg.chat_template)


def _sample_into(cfg, sampler, pending: list[SampleItem], partial: Path, settings: dict,
                 model_sha: str, sink: list, verifier) -> float:
    sort_key = getattr(sampler, "sort_key", None)
    order = sorted(pending, key=sort_key) if sort_key else pending
    started = time.perf_counter()
    with partial.open("a", encoding="utf-8") as stream, \
            progress_bar("make-pairs", len(order), cfg.progress, unit="samples") as bar:
        for first in range(0, len(order), cfg.batch_size):
            chunk = order[first : first + cfg.batch_size]
            results = sampler(chunk)
            rows = []
            for item, res in zip(chunk, results):
                graded = grade_sample(verifier, item.question, res["completion"])
                rows.append({
                    "question_id": item.question.question_id, "question_index": item.question.index,
                    "sample": item.sample, "prompt": item.question.prompt,
                    "reference_answer": item.question.reference_answer, "completion": res["completion"],
                    "completion_tokens": res["completion_tokens"], "stopped": res["stopped"],
                    **graded, "model": cfg.model,
                    "model_sha256": model_sha, "seed": cfg.seed, "sample_seed": item.seed, "round": cfg.round,
                    "sampler": settings,
                })
            append_jsonl(stream, rows)
            sink.extend(rows)
            bar.advance(len(rows))
    return time.perf_counter() - started
