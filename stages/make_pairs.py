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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.cli.commands import print_summary, stage_command, summary_dict
from pipeline.core.config import require
from pipeline.core.errors import ConfigError
from pipeline.core.lock import output_lock
from pipeline.evaluation.intervals import accuracy_record, format_accuracy
from pipeline.grading.verifiers import ANSWER_FORMATS, check_verifier_name
from pipeline.sampling.args import SAMPLING_RANGES, SamplingArgs
from pipeline.sampling.completion import check_loading

if TYPE_CHECKING:  # the run's module (pyarrow, numpy) loads when the command runs, not when it is parsed
    from pipeline.sampling.make_pairs_run import MakePairsResult

RANGES = {"num_generations": "[1, inf)", "pairs_per_question": "[1, inf)", **SAMPLING_RANGES, "limit": "[0, inf)",
          "offset": "[0, inf)", "round": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class MakePairsConfig(SamplingArgs):
    """The sampler's settings (``SamplingArgs``; temperature 0.7 here) and make-pairs' own."""

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
    temperature: float = 0.7
    """Gumbel-noise temperature; > 0 so the samples of a question differ."""
    batch_size: int = 8
    """Samples per forward pass (results do not depend on it)."""
    seed: int = 0
    """Seed of every sample's noise generator (with the question id and sample index)."""
    chat_template: Optional[bool] = None
    """Wrap each question as a user turn in the tokenizer's chat template; false: raw text; default: on when the tokenizer has one (pipeline/data/prompts.py). Score-ref the pairs under the same rule."""
    limit: int = 0
    """Use the first N questions only (0: all), counted after ``offset``."""
    offset: int = 0
    """Skip the first N questions of the file (`run --rounds` with ``fresh_questions`` moves it on each round)."""
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
        super().__post_init__(RANGES)
        check_loading(self)
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


def run(cfg: MakePairsConfig, sampler=None) -> MakePairsResult:
    """The stage, holding its output's lock (a second run into the same file refuses, naming the first);
    ``sampler`` (tests) replaces the model (``pipeline.sampling.make_pairs_run.make_pairs``)."""
    from pipeline.sampling.make_pairs_run import make_pairs

    with output_lock(cfg.out, "make-pairs", folder=False):
        result = make_pairs(cfg, sampler)
    questions_right = result.questions_all_correct + result.questions_mixed
    result.intervals = {"sample_accuracy": accuracy_record(result.correct_samples, result.samples),
                        "pass_at_k": accuracy_record(questions_right, result.questions)}
    return result


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
