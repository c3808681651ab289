"""``lldm-dpo make-pairs``: preference pairs from the model's own samples, graded by the answer checker.

Input: JSONL of {question, answer} records (GSM8K answers, ``A: N`` solutions
or bare numbers). For each question the model draws ``num_generations``
solutions with LLaDA's sampler; each is graded against the reference answer
by the ``verifier`` (``pipeline.grading.verifiers``: ``answer``, ``arithmetic`` which
also checks each ``a op b = c`` line of the working, ``math-verify``) under
the ``answer_format`` (``auto``: strict ``#### N`` where the reference is a
bare number or a ``####`` solution, no last-number fallback); samples with the
right answer (and right working, where the verifier checks it) are chosen and
wrong answers rejected (``pipeline.sampling.selfpairs`` holds the pairing policy).
Outputs, beside each other:

* ``OUT`` (JSONL): TRL standard-format pairs ``prompt``, ``chosen``,
  ``rejected`` with provenance columns ``question_id``, ``chosen_from``
  (sample or reference), ``chosen_sample``, ``rejected_sample``,
  ``chosen_answer``, ``rejected_answer``, ``reference_answer``, ``model``,
  ``model_sha256``, ``seed``, ``round``: ready for ``lldm-dpo ingest``
  (``--keep-field`` to carry provenance into the pairs file);
* ``OUT stem.samples.jsonl``: one row per sample (completion, extracted
  answer, correct, working_correct, grade_reason, sample seed...), the
  ``samples`` view of ``lldm-dpo query``.

Samples stream to ``SAMPLES.partial`` after every batch (fsync'd). A rerun
reuses finished samples whose model content identity
(``pipeline.models.model_identity``), sampler settings and question text
match, and samples only the rest; anything else that differs is an error
naming it. Each sample's noise is seeded by (seed, question_id, sample index)
alone, so a resumed run gives what an uninterrupted one would. The pairs are
a pure function of the samples and the pairing and grading flags: changing
only those regrades and re-pairs without sampling.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.cli.commands import print_summary, stage_command, summary_dict
from pipeline.core.atomic import check_replaceable, check_writable, sweep_stale
from pipeline.core.config import require
from pipeline.core.digest import content_digest
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.lock import output_lock
from pipeline.core.progress import progress_bar
from pipeline.data.pairs import normalize_text
from pipeline.evaluation.intervals import accuracy_record, format_accuracy
from pipeline.grading.verifiers import ANSWER_FORMATS, check_verifier_name, get_verifier
from pipeline.sampling.completion import (
    SAMPLING_RANGES,
    append_jsonl,
    check_sampling,
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

RANGES = {"num_generations": "[1, inf)", "pairs_per_question": "[1, inf)", **SAMPLING_RANGES, "round": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class MakePairsConfig:
    questions: str = ""
    """Questions file: JSONL with a question (or prompt) and a reference answer per line."""
    model: str = "tiny"
    """The policy that samples: preset name (tiny, micro), a local model folder or a LoRA adapter folder."""
    out: str = "data/out/self_pairs.jsonl"
    """Pairs JSONL (TRL standard format plus provenance columns); samples go beside it as <stem>.samples.jsonl."""
    question_field: Optional[str] = None
    """Input field holding the question; default: `question`, else `prompt`."""
    answer_field: str = "answer"
    """Input field holding the reference answer (a GSM8K solution, `A: N`, or a number)."""
    solution_field: Optional[str] = None
    """Input field holding the reference solution used by the fallback; default: the answer field (a bare number N becomes `#### N`)."""
    id_field: str = "id"
    """Input field holding a question id; records without it get a hash of the question text."""
    num_generations: int = 4
    """Samples drawn per question (TRL's name; the k of best-of-k)."""
    pairs_per_question: int = 1
    """Most pairs made from one question's samples."""
    reference_solution_fallback: bool = False
    """When no sample of a question is correct, pair the reference solution (chosen) with wrong samples instead of skipping it."""
    verifier: str = "answer"
    """How a sample is graded (pipeline/grading/verifiers.py): answer (the final answer), arithmetic (also each `a op b = c`
    line of the working: a chosen sample must pass it, a rejected one has a wrong answer) or math-verify
    (answer equivalence by the math-verify package)."""
    answer_format: str = "auto"
    """Where the answer is read: #### (strict: the number after the first ####, nothing else), any (also
    \\boxed, A:, 'the answer is', the last number), auto (#### where the reference is a bare number or a ####
    solution, else any)."""
    gen_length: int = 128
    """Tokens generated per sample."""
    block_length: int = 32
    """Semi-autoregressive block size; gen_length must be a multiple of it."""
    steps: int = 128
    """Sampling steps in all (one forward pass each), a multiple of gen_length / block_length."""
    temperature: float = 0.7
    """Gumbel-noise temperature; > 0 so the samples of a question differ."""
    remasking: str = "low_confidence"
    """Which masked tokens to commit each step: low_confidence or random."""
    cfg_scale: float = 0.0
    """Classifier-free guidance scale; > 0 adds a pass with the prompt masked."""
    cache: str = "none"
    """Sampler KV cache (Fast-dLLM's approximate one): none (exact), prefix or dual; native LLaDA models only,
    others take the exact path with a warning."""
    threshold: Optional[float] = None
    """Parallel decoding: each step commits every masked position of the block whose confidence exceeds this,
    and at least its share of the steps; unset: the fixed schedule (the exact sampler)."""
    batch_size: int = 8
    """Samples per forward pass (results do not depend on it)."""
    seed: int = 0
    """Seed of every sample's noise generator (with the question id and sample index)."""
    chat_template: Optional[bool] = None
    """Wrap each question as a user turn in the tokenizer's chat template; false: raw text; default: on when the tokenizer has one (pipeline/data/prompts.py). Score-ref the pairs under the same rule."""
    limit: int = 0
    """Use the first N questions only (0: all)."""
    round: int = 0
    """Round label written in every row (`run --rounds` sets it; 0 for a standalone run)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (bfloat16 under load_in_4bit)."""
    load_in_4bit: bool = False
    """Quantize the model's block projections to 4-bit NF4 with bitsandbytes (CPU or CUDA), as a QLoRA base."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (accelerate's device for this process)."""
    trust_remote_code: bool = False
    """Allow a hub model's own modeling code."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check_sampling(self, RANGES)
        if self.num_generations > 1 and self.temperature == 0 and self.remasking == "low_confidence":
            raise ConfigError("num_generations > 1 with temperature 0 and low_confidence remasking draws the same "
                              "sample k times: set temperature > 0")
        require(bool(self.out), "out must be a path")
        require(bool(self.answer_field) and bool(self.id_field), "answer_field and id_field must be non-empty")
        check_verifier_name(self.verifier)
        require(self.answer_format in ANSWER_FORMATS,
                f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")

    @property
    def samples_path(self) -> Path:
        """Where the per-sample rows go: beside the pairs (``pairs.jsonl`` -> ``pairs.samples.jsonl``)."""
        return Path(self.out).with_name(f"{Path(self.out).stem}.samples.jsonl")


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
    """sample_accuracy and pass_at_k with their counts and 95% Wilson intervals (pipeline.evaluation.intervals). pass@k's
    unit is the question; sample accuracy's is the sample, and the k samples of one question are not
    independent, so its interval understates the uncertainty (take pass@k's for question-level claims)."""


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


# --- the stage ---------------------------------------------------------------------------


def run(cfg: MakePairsConfig, sampler=None) -> MakePairsResult:
    """The stage, holding its output's lock (a second run into the same file refuses, naming the first)."""
    with output_lock(cfg.out, "make-pairs", folder=False):
        return _run(cfg, sampler)


def _run(cfg: MakePairsConfig, sampler=None) -> MakePairsResult:
    """Sample, grade and pair; ``sampler`` (tests) replaces the model: a callable over
    ``SampleItem`` batches with an ``identity`` attribute."""
    start = time.perf_counter()
    if not cfg.questions:
        raise UserError("no questions file given (the QUESTIONS argument, or questions: in --config)")
    qset = read_questions(cfg.questions, question_field=cfg.question_field, answer_field=cfg.answer_field,
                          id_field=cfg.id_field, solution_field=cfg.solution_field)
    questions = qset.questions[: cfg.limit] if cfg.limit else qset.questions
    by_id = {q.question_id: q for q in questions}
    out, samples_file = Path(cfg.out), cfg.samples_path
    partial = samples_file.with_name(samples_file.name + ".partial")
    check_writable(out, "pairs file")
    for path in (out, samples_file, partial):
        check_replaceable(path, "--out")
    for name in (out.name, samples_file.name, partial.name):
        sweep_stale(out.parent, name)  # temporary files of a killed run of ours
    _check_pairs_target(out)
    settings = sampler_settings(cfg)
    if sampler is not None:
        identity = sampler.identity
    else:
        from pipeline.models import model_identity  # model code (torch) only when a run needs it

        identity = model_identity(cfg.model)
    model_sha = content_digest(identity)
    k = cfg.num_generations
    verifier = get_verifier(cfg.verifier, cfg.answer_format)
    done = _read_done(samples_file, by_id, settings, model_sha, k, tolerate_tail=False)
    done.update(_read_done(partial, by_id, settings, model_sha, k, tolerate_tail=True))
    pending = [SampleItem(q, j, sample_seed(cfg.seed, q.question_id, j))
               for q in questions for j in range(k) if (q.question_id, j) not in done]
    resumed = len(questions) * k - len(pending)

    sampled: list[dict] = []
    sample_seconds = 0.0
    if pending or partial.exists() or not samples_file.exists():
        write_jsonl(partial, done.values())  # the partial file starts as the rows already done
        if pending:
            sampler = sampler if sampler is not None else _load_sampler(cfg, identity)
            sample_seconds = _sample_into(cfg, sampler, pending, partial, settings, model_sha, sampled, verifier)
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

    policy = PairingPolicy(cfg.pairs_per_question, cfg.reference_solution_fallback)
    provenance = {"model": cfg.model, "model_sha256": model_sha, "seed": cfg.seed, "round": cfg.round}
    counts = {"all_correct": 0, "all_wrong": 0, "mixed": 0}
    pairs: list[dict] = []
    empty = with_pairs = repeats = wrong_working = 0
    seen: set[tuple[str, str, str]] = set()
    for i, q in enumerate(questions):
        outcome = pair_question(q, ordered[i * k : (i + 1) * k], policy)
        counts[outcome.kind] += 1
        empty += outcome.empty
        wrong_working += outcome.wrong_working
        kept = []
        for p in outcome.pairs:
            # Two ids may hold the same question text: ingest would quarantine the repeated pair.
            key = (normalize_text(p["prompt"]), normalize_text(p["chosen"]), normalize_text(p["rejected"]))
            if key in seen:
                repeats += 1
                continue
            seen.add(key)
            kept.append({**p, **provenance})
        with_pairs += bool(kept)
        pairs += kept
    write_jsonl(out, pairs)

    correct = sum(bool(r["correct"]) for r in ordered)
    return MakePairsResult(
        out=str(out), samples_file=str(samples_file), questions=len(questions), duplicate_questions=qset.duplicates,
        samples=len(ordered), sampled_now=len(sampled), resumed=resumed, correct_samples=correct,
        wrong_working_samples=wrong_working, empty_samples=empty, questions_all_correct=counts["all_correct"], questions_all_wrong=counts["all_wrong"],
        questions_mixed=counts["mixed"], questions_with_pairs=with_pairs, pairs=len(pairs),
        pairs_reference_chosen=sum(p["chosen_from"] == "reference" for p in pairs),
        sample_accuracy=round(correct / len(ordered), 4) if ordered else 0.0,
        pass_at_k=round((counts["all_correct"] + counts["mixed"]) / len(questions), 4),
        seconds=round(time.perf_counter() - start, 3),
        samples_per_second=round(len(sampled) / sample_seconds, 3) if sample_seconds else 0.0,
        repeated_pairs=repeats, model_sha256=model_sha, details={"settings": settings, "partial": str(partial)},
        intervals={"sample_accuracy": accuracy_record(correct, len(ordered)),
                   "pass_at_k": accuracy_record(counts["all_correct"] + counts["mixed"], len(questions))},
    )


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


def _load_sampler(cfg: MakePairsConfig, identity: Any):
    model, tokenizer = load_for_sampling(cfg)
    return DiffusionSampler(model, tokenizer, identity=identity, gen_length=cfg.gen_length,
                            block_length=cfg.block_length, steps=cfg.steps, temperature=cfg.temperature,
                            remasking=cfg.remasking, cfg_scale=cfg.cfg_scale, chat_template=cfg.chat_template,
                            cache=cfg.cache, threshold=cfg.threshold)


def _sample_into(cfg: MakePairsConfig, sampler, pending: list[SampleItem], partial: Path, settings: dict,
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


def _make_pairs_action(cfg: MakePairsConfig, as_json: bool) -> None:
    data = summary_dict(run(cfg))
    data.pop("details", None)
    if not as_json:  # each accuracy with its count and interval, in place of the bare share
        intervals = data.pop("intervals", {})
        for key, rec in intervals.items():
            data[key] = format_accuracy(rec)
    print_summary("make-pairs", data, as_json)


command = stage_command(MakePairsConfig, _make_pairs_action, positional={"questions": False},
                        doc="Preference pairs from the model's own samples: k solutions per question, graded, "
                            "correct chosen.")
