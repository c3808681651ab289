"""Preference pairs from a model's own graded samples (the logic of ``lldm-dpo make-pairs``).

Pure pieces, no file output:

* ``read_questions``: {question, answer} records of a JSONL file, each with a
  stable ``question_id`` (the record's id field, else a hash of the question
  text) and its normalised reference answer;
* ``sample_seed``: the noise seed of sample j of a question, a function of
  (seed, question_id, j) alone, so a sample does not depend on the batch, the
  order of the file or an interruption;
* ``grade``: the answer checker's verdict on one completion; ``grade_sample``: a verifier's
  (``pipeline.grading.verifiers``: the answer, and the working where the verifier checks it);
* ``pair_question``: the pairing policy on one question's graded samples;
* ``DiffusionSampler``: LLaDA's sampler over (prompt, seed) items, batched.

Pairs must go through ``lldm-dpo ingest`` untouched, so the policy never
emits what ingest would quarantine: empty completions are not used, and
samples whose normalised text repeats an earlier one are dropped before
pairing (they would make duplicate pairs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.core.errors import UserError
from pipeline.data.pairs import normalize_text
from pipeline.data.prompts import encode_prompt, resolve_chat_template
from pipeline.data.readers import jsonl_objects
from pipeline.grading.answers import extract_answer, normalize_number, reference_answer, same_number

if TYPE_CHECKING:
    from pipeline.sampling.args import SamplingArgs

SAMPLE_COLUMNS = {
    "question_id": "VARCHAR", "question_index": "BIGINT", "sample": "BIGINT", "prompt": "VARCHAR",
    "reference_answer": "VARCHAR", "completion": "VARCHAR", "completion_tokens": "BIGINT", "stopped": "BOOLEAN",
    "extracted_answer": "VARCHAR", "correct": "BOOLEAN", "working_correct": "BOOLEAN", "grade_reason": "VARCHAR",
    "model": "VARCHAR", "model_sha256": "VARCHAR",
    "seed": "BIGINT", "sample_seed": "BIGINT", "round": "BIGINT",
}
"""Columns of a samples file (one JSON row per sample) with their SQL types: the ``samples`` view of ``query``."""


# --- questions ---------------------------------------------------------------------


@dataclass
class Question:
    index: int
    """0-based position among the questions kept (duplicates skipped)."""
    where: str
    """file:line, for errors."""
    question_id: str
    prompt: str
    reference_answer: str
    """Normalised numeric answer the samples are graded against."""
    solution: str
    """Reference solution text, chosen by the fallback when no sample is correct."""
    answer_written: Any = None
    """The reference answer as the file writes it (decides the ``auto`` answer format); None: ``reference_answer``."""


@dataclass
class QuestionSet:
    questions: list[Question]
    duplicates: int = 0
    """Records skipped because an earlier record had the same question_id and answer."""


def question_id_of(text: str) -> str:
    """A stable id of a question's (normalised) text."""
    return "q-" + hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def solution_text(value: Any) -> str:
    """The reference solution as text; a bare number becomes GSM8K's final line ``#### N``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"#### {reference_answer(value)}"
    text = str(value)
    bare = normalize_number(text)
    return f"#### {bare}" if bare is not None else text


def read_questions(path: str | Path, *, question_field: str | None = None, answer_field: str = "answer",
                   id_field: str = "id", solution_field: str | None = None) -> QuestionSet:
    """Question records of a JSONL file in file order; one-line errors name file:line and field."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise UserError(f"{path}: questions file not found")
    out = QuestionSet([])
    seen: dict[str, Question] = {}
    for where, row in jsonl_objects(path):
        name = question_field or ("question" if "question" in row else "prompt")
        prompt = row.get(name)
        if not isinstance(prompt, str) or not prompt.strip():
            what = "missing" if prompt is None else "empty" if isinstance(prompt, str) else f"a {type(prompt).__name__}"
            raise UserError(f"{where}: field {name!r} is {what}; a question must be non-empty text")
        if answer_field not in row or row[answer_field] is None:
            raise UserError(f"{where}: no {answer_field!r} field (the reference answer)")
        answer = reference_answer(row[answer_field])
        if answer is None:
            raise UserError(f"{where}: field {answer_field!r} holds no number to grade against: "
                            f"{str(row[answer_field])[:60]!r}")
        sol_name = solution_field or answer_field
        if sol_name not in row or row[sol_name] is None:
            raise UserError(f"{where}: no {sol_name!r} field (the reference solution)")
        solution = solution_text(row[sol_name])
        if not normalize_text(solution):
            raise UserError(f"{where}: field {sol_name!r} is empty")
        qid = row.get(id_field)
        qid = question_id_of(prompt) if qid is None else str(qid)
        if qid in seen:
            first = seen[qid]
            if first.prompt != prompt or first.reference_answer != answer:
                raise UserError(f"{where}: question id {qid!r} already used by {first.where} with another "
                                "question or answer")
            out.duplicates += 1
            continue
        question = Question(len(out.questions), where, qid, prompt, answer, solution, row[answer_field])
        seen[qid] = question
        out.questions.append(question)
    if not out.questions:
        raise UserError(f"{path}: no questions")
    return out


# --- seeds and grading -------------------------------------------------------------------


def sample_seed(seed: int, question_id: str, sample: int) -> int:
    """Noise seed of sample ``sample`` of a question: a stable 63-bit hash."""
    digest = hashlib.sha256(f"lldm-dpo/make-pairs/{seed}/{question_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def grade(completion: str, reference: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) of one completion against a normalised reference answer (exact
    rational comparison: ``pipeline.grading.answers.same_number``)."""
    got = extract_answer(completion)
    return got, same_number(got, reference)


def grade_sample(verifier, question: Question, completion: str) -> dict[str, Any]:
    """A sample's grade fields under ``verifier`` (``pipeline.grading.verifiers.get_verifier``): extracted_answer,
    correct (the answer), working_correct (None where the verifier does not check working), grade_reason."""
    written = question.reference_answer if question.answer_written is None else question.answer_written
    g = verifier.grade(completion, question.reference_answer, question.prompt, reference_text=written)
    return {"extracted_answer": g.answer, "correct": g.answer_correct, "working_correct": g.working_correct,
            "grade_reason": g.reason}


# --- pairing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PairingPolicy:
    pairs_per_question: int = 1
    reference_solution_fallback: bool = False


@dataclass
class QuestionOutcome:
    kind: str
    """all_correct, all_wrong or mixed (over every sample, empty ones included)."""
    pairs: list[dict[str, Any]] = field(default_factory=list)
    empty: int = 0
    """Samples with no text (never paired: ingest would quarantine them)."""
    repeated: int = 0
    """Samples whose normalised text repeats an earlier sample's (dropped before pairing)."""
    wrong_working: int = 0
    """Distinct samples with the right answer over wrong working (the verifier's): neither chosen nor rejected."""


def pair_question(question: Question, samples: Sequence[dict[str, Any]], policy: PairingPolicy) -> QuestionOutcome:
    """Pairs of one question from its graded samples (dicts with sample, completion, extracted_answer, correct).

    Correct samples are chosen, wrong ones rejected; a sample with the right answer whose working the
    verifier found wrong (``working_correct`` False) is neither. With C distinct correct
    and W distinct wrong samples the candidates are the C * W combinations,
    taken diagonal by diagonal (correct i with wrong (i + d) mod W for d = 0,
    1, ...), so the first pairs use as many different samples as possible.
    With no correct sample and the fallback on, the reference solution is
    chosen against distinct wrong samples; otherwise the question gives none.
    """
    samples = sorted(samples, key=lambda s: s["sample"])
    n_correct = sum(bool(s["correct"]) for s in samples)
    kind = "all_correct" if n_correct == len(samples) else "all_wrong" if n_correct == 0 else "mixed"
    outcome = QuestionOutcome(kind)
    seen: set[str] = set()
    correct, wrong = [], []
    for s in samples:
        key = normalize_text(s["completion"])
        if not key:
            outcome.empty += 1
            continue
        if key in seen:
            outcome.repeated += 1
            continue
        seen.add(key)
        if s["correct"] and s.get("working_correct") is False:
            outcome.wrong_working += 1
            continue
        (correct if s["correct"] else wrong).append(s)

    def row(chosen: dict | None, rejected: dict) -> dict[str, Any]:
        return {
            "prompt": question.prompt,
            "chosen": question.solution if chosen is None else chosen["completion"],
            "rejected": rejected["completion"],
            "question_id": question.question_id,
            "chosen_from": "reference" if chosen is None else "sample",
            "chosen_sample": None if chosen is None else chosen["sample"],
            "rejected_sample": rejected["sample"],
            "chosen_answer": question.reference_answer if chosen is None else chosen["extracted_answer"],
            "rejected_answer": rejected["extracted_answer"],
            "reference_answer": question.reference_answer,
        }

    n = policy.pairs_per_question
    if correct and wrong:
        for d in range(len(wrong)):
            for i, c in enumerate(correct):
                if len(outcome.pairs) < n:
                    outcome.pairs.append(row(c, wrong[(i + d) % len(wrong)]))
    elif wrong and policy.reference_solution_fallback:
        solution = normalize_text(question.solution)
        outcome.pairs = [row(None, w) for w in wrong if normalize_text(w["completion"]) != solution][:n]
    return outcome


# --- sampling ---------------------------------------------------------------------------


@dataclass
class SampleItem:
    question: Question
    sample: int
    seed: int


class DiffusionSampler:
    """LLaDA's sampler over items of (question prompt, noise seed); one generator per item.

    Rows are left padded and each has its own ``torch.Generator``, so an
    item's completion does not depend on its batch neighbours.
    """

    def __init__(self, model, tokenizer, args: SamplingArgs, *, identity: Any, chat_template: bool | None):
        """``args``: the sampler's settings (``pipeline.sampling.args.SamplingArgs``, or a config extending it)."""
        from pipeline.sampling.completion import (
            special_ids,  # torch: not for the query command, which reads this module
        )

        self.model, self.tokenizer, self.identity, self.args = model, tokenizer, identity, args
        self.chat_template = resolve_chat_template(tokenizer, chat_template)
        self._encoded: dict[str, list[int]] = {}
        self.ids = special_ids(model, tokenizer)
        self.max_length = getattr(getattr(model, "config", None), "max_sequence_length", None)

    def encode(self, question: Question) -> list[int]:
        if question.prompt not in self._encoded:
            ids = encode_prompt(self.tokenizer, question.prompt, chat_template=self.chat_template,
                                where=question.where)
            if isinstance(self.max_length, int) and len(ids) + self.args.gen_length > self.max_length:
                raise UserError(f"{question.where}: {len(ids)} prompt tokens + gen_length "
                                f"{self.args.gen_length} exceed the model's max_sequence_length {self.max_length}")
            self._encoded[question.prompt] = ids
        return self._encoded[question.prompt]

    def sort_key(self, item: SampleItem) -> int:
        """Longest prompts first, so each batch holds similar lengths and an out-of-memory shows at once."""
        return -len(self.encode(item.question))

    def __call__(self, items: Sequence[SampleItem]) -> list[dict[str, Any]]:
        from pipeline.sampling.completion import sample_batch

        return sample_batch(self.model, self.tokenizer, [self.encode(item.question) for item in items],
                            [item.seed for item in items], self.ids, self.args)
