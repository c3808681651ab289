"""``lldm-dpo eval``: held-out preference accuracy, task accuracy, multiple choice; before and after.

- Preference accuracy: on the cache's held-out pairs, the policy's terms on the
  cached masks (every draw) against the cached reference terms; a pair counts
  when the implicit reward margin beta * ((B_pi(c) - B_ref(c)) - (B_pi(r) -
  B_ref(r))) is positive (ties count one half, so the reference itself scores
  0.5). Also the ELBO accuracy: the share where the model's own B(c) > B(r).
- Task accuracy: completions from LLaDA's sampler on a benchmark of questions
  with numeric answers, graded by ``pipeline.grading.answers``; per-item rows go to
  ``task_results.parquet``.
- Multiple choice: each option's ELBO given the question; the highest wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.cli.commands import print_summary, stage_command, summary_dict
from pipeline.core.config import check_device, require_choice
from pipeline.core.devices import DTYPE_NAMES, PRECISION_NAMES
from pipeline.core.errors import ConfigError
from pipeline.core.lock import output_lock
from pipeline.estimator.diffusion import BATCH_TOKENS
from pipeline.evaluation.choice_scoring import NORMALIZE
from pipeline.evaluation.intervals import print_intervals
from pipeline.grading.verifiers import ANSWER_FORMATS, check_verifier_name
from pipeline.sampling.args import SAMPLING_RANGES, SamplingArgs

if TYPE_CHECKING:  # the run's module (pyarrow, torch) loads when the command runs, not when it is parsed
    from pipeline.evaluation.eval_run import EvalResult

GREEDY = ("temperature", "remasking", "cfg_scale")
"""The sampler's settings eval fixes (task accuracy is greedy): no options, no ranges."""

RANGES = {**{k: v for k, v in SAMPLING_RANGES.items() if k not in GREEDY}, "beta": "(0, inf)", "limit_pairs": "[0, inf)", "limit_task": "[0, inf)",
          "limit_choices": "[0, inf)", "samples": "[1, inf)", "batch_tokens": "[1, inf)", "train_sample": "[0, inf)",
          "lm_eval_limit": "[0, inf)", "lm_eval_num_fewshot": "[0, inf)", "mc_seeds": "[1, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class EvalConfig(SamplingArgs):
    """The sampler's settings (``SamplingArgs``) for task accuracy and eval's own. Task accuracy is greedy: the
    sampler's temperature, remasking and cfg_scale are fixed here (no options), at the exact sampler's."""

    temperature: float = field(default=0.0, init=False)
    remasking: str = field(default="low_confidence", init=False)
    cfg_scale: float = field(default=0.0, init=False)
    model: str = "runs/dpo/final"
    """The trained policy: a checkpoint folder, a LoRA adapter folder (RUN_DIR/final), or a preset."""
    scores: Optional[Path] = Path("cache/ref-scores")
    """Reference-score cache holding the held-out pairs (score-ref over the eval split); null to skip."""
    before: Optional[str] = None
    """The starting model to compare against; default the cache's reference model; 'none' to skip."""
    benchmark: Optional[Path] = None
    """JSONL of {question, answer} for task accuracy (GSM8K '#### N' and 'A: N' answers understood)."""
    verifier: str = "answer"
    """How task answers are graded (pipeline/grading/verifiers.py): answer, arithmetic (also checks each `a op b = c`
    line of the working and reports the share of correct answers whose working is right) or math-verify."""
    answer_format: str = "auto"
    """Where a completion's answer is read: #### (strict), any (also \\boxed, A:, 'the answer is', the last
    number) or auto (#### where the reference is a bare number or a #### solution, else any)."""
    choices: Optional[Path] = None
    """JSONL of {question, options, answer (index)} for multiple-choice accuracy by ELBO."""
    out: Path = Path("runs/dpo")
    """Folder for eval.json and task_results.parquet (the run folder, so `query --run` and `report` find them)."""
    split: str = "eval"
    """Which split of the cache to measure preference accuracy on."""
    beta: float = 0.1
    """beta of the reported implicit rewards (the sign, and so the accuracy, does not depend on it)."""
    limit_pairs: int = 0
    """Held-out pairs to use (0 = all); whole cache parts are scored (the cache's batch layout)."""
    limit_task: int = 0
    """Benchmark questions to use (0 = all)."""
    limit_choices: int = 0
    """Multiple-choice items to use (0 = all)."""
    gen_length: int = 64
    """Tokens generated per question."""
    block_length: int = 32
    """Semi-autoregressive block length."""
    steps: int = 64
    """Sampling steps (one forward pass each)."""
    samples: int = 8
    """Monte Carlo samples per option for multiple-choice ELBOs."""
    batch_size: int = 16
    """Prompts per generation batch (results do not depend on it)."""
    batch_tokens: int = BATCH_TOKENS
    """Token budget of one scoring forward pass (multiple choice, training sample; held-out pairs use the cache's)."""
    chat_template: Optional[bool] = None
    """Render prompts with the tokenizer's chat template (pipeline/data/prompts.py); default: the cache's rule when
    `scores` is given, else on when the tokenizer has a template. A setting that differs from the cache's is refused."""
    normalize: str = "none"
    """Multiple-choice score of an option: none (its ELBO, LLaDA's protocol) or length (ELBO per option token)."""
    seed: int = 0
    """Seed of sampling noise and multiple-choice masks."""
    mc_seeds: int = 1
    """Rescore the ELBO-based figures under this many mask seeds and report their spread (mc_spread in
    eval.json): multiple-choice accuracy with seeds seed, seed+1, ..., and the held-out ELBO accuracy on fresh
    masks (draws past the cache's); 1 = the one seed."""
    dtype: Optional[str] = None
    """Weights dtype of both models; default: the cache's (so the reference reproduces its cached terms)."""
    mixed_precision: Optional[str] = None
    """Autocast: no, bf16 or fp16; default: the cache's."""
    load_in_4bit: Optional[bool] = None
    """4-bit NF4 base (bitsandbytes, CPU or CUDA); default: the cache's."""
    allow_numerics_mismatch: bool = False
    """Accept numerics other than the cache's (the reference then no longer scores exactly 0.5)."""
    train_sample: int = 32
    """Training pairs on which the policy's margin and accuracy are measured on the cached masks and on fresh
    masks (the gap shows how much training fitted the replayed masks); 0 = skip."""
    device: str = "auto"
    """cpu, cuda or auto."""
    trust_remote_code: bool = False
    """Allow a non-LLaDA checkpoint to run its own modeling code."""
    progress: bool = True
    """Progress of the sampling and scoring passes (a bar on a terminal, periodic lines otherwise)."""
    lm_eval_tasks: str = ""
    """Comma-separated lm-evaluation-harness tasks run on both models through the `lldm` adapter (loglikelihood by
    our ELBO with `samples` samples, generation by our sampler with gen_length/block_length/steps); needs the [eval]
    extra."""
    lm_eval_include_path: Optional[Path] = None
    """Folder of extra lm-eval task YAMLs (tasks on local files, say)."""
    lm_eval_limit: int = 0
    """Documents per lm-eval task (0 = all)."""
    lm_eval_num_fewshot: Optional[int] = None
    """Few-shot examples per lm-eval prompt (default: each task's own)."""

    def __post_init__(self):
        self.out = Path(self.out)
        super().__post_init__(RANGES)
        check_device(self.device)
        for name in ("scores", "benchmark", "choices", "lm_eval_include_path"):  # '' (a flag's empty value): none
            value = getattr(self, name)
            setattr(self, name, Path(value) if value not in (None, "") else None)
        if self.scores is None and self.benchmark is None and self.choices is None and not self.lm_eval_tasks:
            raise ConfigError("nothing to evaluate: give scores, benchmark, choices or lm_eval_tasks")
        if self.dtype is not None:
            require_choice("dtype", self.dtype, DTYPE_NAMES)
        if self.mixed_precision is not None:
            require_choice("mixed_precision", self.mixed_precision, PRECISION_NAMES)
        require_choice("normalize", self.normalize, NORMALIZE)
        check_verifier_name(self.verifier)
        require_choice("answer_format", self.answer_format, ANSWER_FORMATS)



def run(cfg: EvalConfig) -> EvalResult:
    """The stage, holding its output's lock (a second run into the same place refuses, naming the first)."""
    from pipeline.evaluation.eval_run import (
        EvalResult,
        evaluate,
        finish,
        prepare,
        without_missing_default_cache,
        write_outputs,
    )

    with output_lock(cfg.out, "eval", folder=True):
        start = time.perf_counter()
        cfg = without_missing_default_cache(cfg, EvalConfig.__dataclass_fields__["scores"].default)
        inputs = prepare(cfg)
        figures = evaluate(cfg, inputs)
        report = finish(cfg, inputs, figures)
        write_outputs(cfg.out, report, figures.task_rows)
    return EvalResult.of(cfg.out, report, seconds=time.perf_counter() - start)


def _eval_action(cfg: EvalConfig, as_json: bool) -> None:
    result = run(cfg)
    data = summary_dict(result)
    if as_json:
        print_summary("eval", data, True)
        return
    print_summary("eval", {k: v for k, v in data.items() if k not in ("intervals", "mc_spread")}, False)
    print_intervals(result.intervals, result.mc_spread)


command = stage_command(EvalConfig, _eval_action,
                        doc="Evaluate the policy (and its starting model): held-out preference accuracy, "
                            "task and choice accuracy.")
