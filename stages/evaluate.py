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

import dataclasses
import importlib.util
import inspect
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli.commands import print_summary, stage_command, summary_dict
from pipeline.core.atomic import atomic_path, check_replaceable, check_writable, remove_owned, write_json_atomic
from pipeline.core.config import check_device, check_ranges, require_choice
from pipeline.core.devices import DTYPE_NAMES, PRECISION_NAMES, resolve_device
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.lazy import deferred
from pipeline.core.lock import output_lock
from pipeline.core.paths import EVAL_FILE, TASK_RESULTS
from pipeline.core.progress import progress_bar
from pipeline.core.schemas import REF_MARGIN_COLUMN, SIDES
from pipeline.data.choices import read_choices
from pipeline.data.prompts import encode_continuation, follow_cache, resolve_chat_template
from pipeline.data.readers import jsonl_objects
from pipeline.estimator.diffusion import mask_seed, masked_request
from pipeline.estimator.losses import pair_statistics
from pipeline.estimator.replay import PairBatch, elbo_pass, replay_requests, rescore_part, seeded_request
from pipeline.evaluation.evalrecord import environment
from pipeline.evaluation.intervals import (
    credits_record,
    few_items_warning,
    format_accuracy,
    format_difference,
    paired_difference_interval,
)
from pipeline.grading.answers import reference_answer
from pipeline.grading.verifiers import ANSWER_FORMATS, check_verifier_name, get_verifier
from pipeline.models.numerics import Numerics, autocast, follow, load, of_fingerprint
from pipeline.refcache.fingerprint import check_reference_model
from pipeline.refcache.reader import open_cache, read_part
from pipeline.refcache.rows import reference_elbo, row_split
from pipeline.sampling.completion import complete, config_error
from pipeline.sampling.sampler import check_fast_settings

torch = deferred("torch")  # imported by a run: eval --help and a refused flag need only EvalConfig

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
NORMALIZE = ("none", "length")
FIGURE_LABELS = {
    "preference_accuracy": "preference accuracy",
    "elbo_accuracy": "ELBO accuracy (B(chosen) > B(rejected))",
    "task_accuracy": "task accuracy (generation)",
    "working_accuracy": "task accuracy, answer and working right (the verifier's)",
    "choice_accuracy": "multiple-choice accuracy (option ELBO)",
}
"""Display names of eval's figures in the console; other figures show their own key."""


RANGES = {"beta": "(0, inf)", "limit_pairs": "[0, inf)", "limit_task": "[0, inf)", "limit_choices": "[0, inf)",
          "gen_length": "[1, inf)", "block_length": "[1, inf)", "steps": "[1, inf)", "samples": "[1, inf)",
          "batch_size": "[1, inf)", "batch_tokens": "[1, inf)", "seed": "[0, inf)", "train_sample": "[0, inf)",
          "lm_eval_limit": "[0, inf)", "lm_eval_num_fewshot": "[0, inf)", "mc_seeds": "[1, inf)",
          "threshold": "(0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class EvalConfig:
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
    cache: str = "none"
    """Sampler KV cache (Fast-dLLM's approximate one): none (exact), prefix or dual; native LLaDA models only,
    others take the exact path with a warning."""
    threshold: Optional[float] = None
    """Parallel decoding: each step commits every masked position of the block whose confidence exceeds this,
    and at least its share of the steps; unset: the fixed schedule (the exact sampler)."""
    samples: int = 8
    """Monte Carlo samples per option for multiple-choice ELBOs."""
    batch_size: int = 16
    """Prompts per generation batch."""
    batch_tokens: int = 16384
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
        check_ranges(self, RANGES)
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
        if self.gen_length % self.block_length:
            raise ConfigError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})")
        config_error(check_fast_settings, self.cache, self.threshold, "low_confidence")


@dataclass
class EvalResult:
    out: str
    eval_json: str
    seconds: float
    preference_accuracy: dict[str, float] = field(default_factory=dict)
    elbo_accuracy: dict[str, float] = field(default_factory=dict)
    mean_margin: dict[str, float] = field(default_factory=dict)
    task_accuracy: dict[str, float] = field(default_factory=dict)
    working_accuracy: dict[str, float] = field(default_factory=dict)
    """With a verifier that checks working: the share of questions whose answer and working are both right."""
    working_share: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With a verifier that checks working: per model {correct, right_working, share}: of the correct answers,
    how many have right working."""
    choice_accuracy: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per accuracy-like figure: {"before"/"after": {value, count, n, low, high (95% Wilson)}, "difference":
    after - before on the same items with Newcombe's paired interval} (pipeline.evaluation.intervals)."""
    mc_spread: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With mc_seeds > 1: per ELBO-based figure and model, its value under each mask seed, mean, sd, min, max."""
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    """lm-eval results: {"task/metric": {"before": ..., "after": ...}}."""
    pairs: int = 0
    task_items: int = 0
    train_sample: dict[str, Any] = field(default_factory=dict)
    """The policy on training pairs: margin and accuracy on the cached masks and on fresh masks."""


def preference_scores(model, tokenizer, cache, split: str, beta: float, numerics: Numerics,
                      limit: int = 0) -> dict[str, Any]:
    """The model's ELBOs on the held-out pairs, rescored part by part as score-ref scored them (same
    requests, order, token budget and numerics: the cache's own model gives every pair delta = 0 exactly),
    against the cached reference; with ``limit``, whole parts until that many pairs of the split are in.
    Accuracy uses the one tie rule (pipeline.estimator.losses.reward_accuracy)."""
    fp = cache.fingerprint
    batch_tokens = cache.manifest.batch_tokens
    device = next(model.parameters()).device
    sums = cache.manifest.part_sha256
    pi_c, pi_r, ref_c, ref_r = [], [], [], []
    for path in cache.parts:
        if limit and len(pi_c) >= limit:
            break
        rows = read_part(path, expected_sha256=sums.get(path.name)).to_pylist()
        if not any(row_split(r) == split for r in rows):
            continue
        scores = rescore_part(model, tokenizer, rows, fp, batch_tokens=batch_tokens,
                              autocast=autocast(device, numerics.mixed_precision))
        for row, sc in zip(rows, scores):
            if row_split(row) != split or (limit and len(pi_c) >= limit):
                continue
            pi_c.append(sc["chosen"])
            pi_r.append(sc["rejected"])
            ref_c.append(reference_elbo(row, "chosen"))
            ref_r.append(reference_elbo(row, "rejected"))
    return margin_summary(pi_c, pi_r, ref_c, ref_r, beta, with_elbo=True)


def margin_summary(pi_c, pi_r, ref_c, ref_r, beta: float, with_elbo: bool = False) -> dict[str, Any]:
    """Accuracy (with its count and Wilson interval, ``accuracy_interval``) and mean margin of pairs, and the
    per-pair credits (``credits``, with ``with_elbo`` also ``elbo_credits``) for paired differences."""
    t = [torch.tensor(v, dtype=torch.float64) for v in (pi_c, pi_r, ref_c, ref_r)]
    stats = pair_statistics(*t, beta=beta, preference_weight=0.0)  # margins and credits, no loss
    credit = stats.accuracies.tolist()  # the log-ratios' sign before beta scales them, with the one tie rule
    out = {"accuracy": float(sum(credit) / len(credit)) if credit else float("nan"),
           "mean_margin": float(stats.margins.mean()), "pairs": len(pi_c), "accuracy_interval": credits_record(credit),
           "credits": credit}
    if with_elbo:
        elbo = (t[0] > t[1]).double().tolist()
        out.update(elbo_accuracy=float(sum(elbo) / len(elbo)) if elbo else float("nan"),
                   elbo_accuracy_interval=credits_record(elbo), elbo_credits=elbo)
    return out


def fresh_requests(rows: list[dict], fingerprint: dict[str, Any], extra: int = 0) -> list:
    """Requests on masks training never saw: draw index ``draws + extra`` of each (pair, side), past the cache's."""
    draw = fingerprint["draws"] + extra
    return [seeded_request(row, side, mask_seed(fingerprint["seed"], row["pair_id"], side, draw), fingerprint)[0]
            for row in rows for side in SIDES]


def mean_terms(model, tokenizer, requests: list, batch_tokens: int, mixed_precision: str = "no") -> list[float]:
    """Each request's mean ELBO term (no grad, under ``mixed_precision``'s autocast)."""
    terms = elbo_pass(model, tokenizer, requests, batch_tokens=batch_tokens,
                      autocast=autocast(next(model.parameters()).device, mixed_precision))
    return [t.double().mean().item() for t in terms]


def sample_terms(model, tokenizer, rows: list[dict], fingerprint: dict[str, Any], numerics: Numerics,
                 batch_tokens: int) -> dict[str, list[float]]:
    """Mean ELBOs of each sampled training pair on the cached masks (all draws, as training saw them) and
    on fresh masks: {"cached_c", "cached_r", "fresh_c", "fresh_r"}."""
    draws = fingerprint["draws"]
    cached = [0.0] * (2 * len(rows))
    for draw in range(draws):
        for i, v in enumerate(mean_terms(model, tokenizer, replay_requests(PairBatch(rows, draw), fingerprint),
                                         batch_tokens, numerics.mixed_precision)):
            cached[i] += v / draws
    fresh = mean_terms(model, tokenizer, fresh_requests(rows, fingerprint), batch_tokens, numerics.mixed_precision)
    return {"cached_c": cached[0::2], "cached_r": cached[1::2], "fresh_c": fresh[0::2], "fresh_r": fresh[1::2]}


def fresh_elbo_credits(model, tokenizer, rows: list[dict], fingerprint: dict[str, Any], numerics: Numerics,
                       batch_tokens: int, extra: int) -> list[float]:
    """Per pair 1 when the model's ELBO of the chosen response beats the rejected one's on fresh masks
    (draw ``draws + extra``), else 0."""
    means = mean_terms(model, tokenizer, fresh_requests(rows, fingerprint, extra), batch_tokens,
                       numerics.mixed_precision)
    return [float(c > r) for c, r in zip(means[0::2], means[1::2])]


def spread(values: list[float], seeds: list[int]) -> dict[str, Any]:
    """A figure under several mask seeds: the values, their mean, sample standard deviation, min and max."""
    return {"seeds": list(seeds), "values": list(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def interval_block(credits: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """{figure: {label: Wilson record, "difference": paired interval when both models were measured}}."""
    out: dict[str, dict[str, Any]] = {}
    for figure, by_label in credits.items():
        rec: dict[str, Any] = {label: credits_record(c) for label, c in by_label.items()}
        if "before" in by_label and "after" in by_label and len(by_label["before"]) == len(by_label["after"]):
            rec["difference"] = paired_difference_interval(by_label["before"], by_label["after"])
        out[figure] = rec
    return out


def training_sample(cache, size: int, seed: int) -> list[dict]:
    rows = cache.split_rows("train")  # read on demand: only the sampled rows are decoded
    picked = range(len(rows))
    if len(rows) > size:  # the same draw as sampling the rows themselves (sample depends on the length only)
        picked = sorted(random.Random(f"train-sample:{seed}").sample(range(len(rows)), size))
    return rows.take(picked)


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


def task_accuracy(model, tokenizer, items: list[dict], cfg: EvalConfig, label: str,
                  chat_template: bool) -> tuple[float, list[dict]]:
    prompts = [it["question"] for it in items]
    with progress_bar(f"eval: task accuracy ({label})", len(prompts), cfg.progress, unit="questions") as bar:
        done = complete(model, tokenizer, prompts, gen_length=cfg.gen_length, block_length=cfg.block_length,
                        steps=cfg.steps, seed=cfg.seed, chat_template=chat_template, batch_size=cfg.batch_size,
                        cache=cfg.cache, threshold=cfg.threshold, on_batch=lambda rows: bar.advance(len(rows)))
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


def choice_requests(tokenizer, item: dict, index: int, *, samples: int, seed: int, chat_template: bool,
                    where: str = "item") -> list:
    """One ScoreRequest per option, as LLaDA evaluates multiple choice: question and option encoded
    jointly (pipeline.data.prompts.encode_continuation), the option's tokens the masked continuation, no EOS."""
    requests = []
    for j, option in enumerate(item["options"]):
        context, continuation = encode_continuation(tokenizer, item["question"], str(option),
                                                    chat_template=chat_template, where=where)
        if not continuation:
            raise UserError(f"{where}: option {j} encodes to no token")
        requests.append(masked_request(context, continuation, samples,
                                       mask_seed(seed, f"choice-{index}", f"option-{j}", 0))[0])
    return requests


def choice_credits(model, tokenizer, items: list[dict], cfg: EvalConfig, chat_template: bool | None = None,
                   seed: int | None = None) -> list[int]:
    """Per item 1 when the option with the highest ELBO given the question (per token with normalize=length) is
    the answer, else 0; masks drawn from ``seed`` (default ``cfg.seed``)."""
    chat_template = resolve_chat_template(tokenizer, chat_template)
    seed = cfg.seed if seed is None else seed
    credits = []
    with progress_bar(f"eval: multiple choice (seed {seed})", len(items), cfg.progress, unit="items") as bar:
        for i, item in enumerate(items):
            options = list(item["options"])
            if not options:
                raise UserError(f"{cfg.choices} item {i}: field 'options' is empty")
            requests = choice_requests(tokenizer, item, i, samples=cfg.samples, seed=seed,
                                       chat_template=chat_template, where=f"{cfg.choices} item {i}")
            scores = [m / (len(r.response_ids) if cfg.normalize == "length" else 1)
                      for m, r in zip(mean_terms(model, tokenizer, requests, cfg.batch_tokens), requests)]
            credits.append(int(max(range(len(options)), key=lambda j: scores[j]) == int(item["answer"])))
            bar.advance(1)
    return credits


def run(cfg: EvalConfig) -> EvalResult:
    """The stage, holding its output's lock (a second run into the same place refuses, naming the first)."""
    with output_lock(cfg.out, "eval", folder=True):
        return _run(cfg)


def _without_missing_default_cache(cfg: EvalConfig) -> EvalConfig:
    """A task-accuracy eval (benchmark, choices, lm-eval tasks) given no --scores runs without a cache when the
    default cache folder is absent, rather than failing on a path the user never named."""
    default = EvalConfig.__dataclass_fields__["scores"].default
    asks_tasks = bool(cfg.benchmark or cfg.choices or cfg.lm_eval_tasks.strip())
    if asks_tasks and cfg.scores is not None and cfg.scores == Path(default) and not cfg.scores.exists():
        print(f"note: eval: no reference cache at the default {default}: task accuracy only, of --model"
              f"{' and --before' if cfg.before not in (None, '', 'none') else ''} (give --scores CACHE for "
              "preference figures and the cache's model as before)", file=sys.stderr)
        return replace(cfg, scores=None)
    return cfg


def _run(cfg: EvalConfig) -> EvalResult:
    start = time.perf_counter()
    cfg = _without_missing_default_cache(cfg)
    check_writable(cfg.out, "eval output folder")
    for name in (EVAL_FILE, TASK_RESULTS):
        check_replaceable(cfg.out / name, "--out")
    device = str(resolve_device(cfg.device))
    cache = open_cache(cfg.scores) if cfg.scores is not None else None
    reference_name = cache.manifest.reference_model if cache is not None else None
    before_name = reference_name if cfg.before is None else None if cfg.before in ("none", "") else cfg.before
    # Read in slices of 8 pairs as they are scored: memory does not grow with the split.
    pair_rows = cache.split_rows(cfg.split) if cache is not None else []
    if cache is not None and not len(pair_rows):
        if not (cfg.benchmark or cfg.choices or cfg.lm_eval_tasks.strip()):
            raise UserError(f"{cfg.scores}: the cache holds no pairs of split '{cfg.split}' "
                            "(ingest with --eval-fraction and score them)")
        print(f"note: eval: {cfg.scores} holds no pairs of split '{cfg.split}': no preference figures, task "
              "accuracy only", file=sys.stderr)
    if cfg.limit_pairs and cache is not None:
        pair_rows = pair_rows.limit(cfg.limit_pairs)
    if cache is not None:
        numerics = follow(of_fingerprint(cache.fingerprint), dtype=cfg.dtype, mixed_precision=cfg.mixed_precision,
                          load_in_4bit=cfg.load_in_4bit, allow_mismatch=cfg.allow_numerics_mismatch,
                          where=str(cfg.scores))
    else:
        numerics = Numerics(dtype=cfg.dtype or "float32", mixed_precision=cfg.mixed_precision or "no",
                            load_in_4bit=bool(cfg.load_in_4bit))
    sample = training_sample(cache, cfg.train_sample, cfg.seed) if cache is not None and cfg.train_sample else []
    fresh_ref = None
    bench = read_benchmark(cfg.benchmark)[:cfg.limit_task or None] if cfg.benchmark else []
    # options a list of strings, answer an index in range
    mc = read_choices(cfg.choices)[:cfg.limit_choices or None] if cfg.choices else []
    lm_tasks = [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()]
    if lm_tasks and importlib.util.find_spec("lm_eval") is None:
        raise UserError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lldm-dpo[eval]'")

    report: dict[str, Any] = {}  # eval.json: per figure {label: value}, then what it was measured with
    task_rows: list[dict] = []
    credits: dict[str, dict[str, list]] = {}
    spreads: dict[str, dict[str, Any]] = {}
    held_out = (pair_rows.take(range(len(pair_rows))) if cfg.mc_seeds > 1 and len(pair_rows) else [])
    if cache is not None and before_name is not None and before_name == reference_name:
        check_reference_model(cache.fingerprint, before_name, str(cfg.scores))  # its weights may have changed
    for label, name in (("before", before_name), ("after", cfg.model)):
        if name is None:
            continue
        model, tokenizer = load(name, numerics, device, trust_remote_code=cfg.trust_remote_code)
        model.eval()
        chat_template = (follow_cache(cfg.chat_template, cache.fingerprint, str(cfg.scores)) if cache is not None
                         else resolve_chat_template(tokenizer, cfg.chat_template))
        if len(pair_rows):
            pref = preference_scores(model, tokenizer, cache, cfg.split, cfg.beta, numerics, cfg.limit_pairs)
            for figure, key in (("preference_accuracy", "accuracy"), ("elbo_accuracy", "elbo_accuracy"),
                                ("mean_margin", "mean_margin")):
                report.setdefault(figure, {})[label] = pref[key]
            credits.setdefault("preference_accuracy", {})[label] = pref["credits"]
            credits.setdefault("elbo_accuracy", {})[label] = pref["elbo_credits"]
            if held_out:
                values = [sum(c) / len(c) for c in (
                    fresh_elbo_credits(model, tokenizer, held_out, cache.fingerprint, numerics,
                                       cache.manifest.batch_tokens, j)
                    for j in range(cfg.mc_seeds))]
                spreads.setdefault("elbo_accuracy_fresh_masks", {})[label] = spread(
                    values, [cache.fingerprint["draws"] + j for j in range(cfg.mc_seeds)])
        if sample and (label == "after" or name == reference_name):
            terms = sample_terms(model, tokenizer, sample, cache.fingerprint, numerics, cfg.batch_tokens)
            if label == "before":
                fresh_ref = terms  # the reference's terms on the fresh masks
            else:
                report["train_sample"] = _sample_report(sample, terms, fresh_ref, cfg.beta)
        if bench:
            with autocast(device, numerics.mixed_precision):
                acc, rows = task_accuracy(model, tokenizer, bench, cfg, label, chat_template)
            report.setdefault("task_accuracy", {})[label] = acc
            task_rows += rows
            credits.setdefault("task_accuracy", {})[label] = [r["correct"] for r in rows]
            working = working_figures(rows)
            if working is not None:
                report.setdefault("working_accuracy", {})[label] = sum(working[0]) / len(working[0])
                report.setdefault("working_share", {})[label] = working[1]
                credits.setdefault("working_accuracy", {})[label] = working[0]
        if mc:
            seeds = [cfg.seed + j for j in range(cfg.mc_seeds)]
            with autocast(device, numerics.mixed_precision):
                per_seed = [choice_credits(model, tokenizer, mc, cfg, chat_template, seed=sd) for sd in seeds]
            report.setdefault("choice_accuracy", {})[label] = sum(per_seed[0]) / len(mc)
            credits.setdefault("choice_accuracy", {})[label] = per_seed[0]
            if cfg.mc_seeds > 1:
                spreads.setdefault("choice_accuracy", {})[label] = spread([sum(c) / len(mc) for c in per_seed], seeds)
        if lm_tasks:
            from pipeline.evaluation.lm_eval_model import run_tasks

            docs: dict[str, list[float]] = {}
            scores = run_tasks(model, tokenizer, lm_tasks, include_path=cfg.lm_eval_include_path,
                               limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot,
                               apply_chat_template=chat_template, mc_samples=cfg.samples,
                               batch_tokens=cfg.batch_tokens, seed=cfg.seed, gen_length=cfg.gen_length,
                               block_length=cfg.block_length, steps=cfg.steps, per_document=docs)
            for metric, values in docs.items():  # accuracies: their count, interval and paired difference
                if metric in scores:
                    credits.setdefault(f"lm_eval/{metric}", {})[label] = values
            for name, value in scores.items():
                report.setdefault("lm_eval", {}).setdefault(name, {})[label] = value
        del model
    if len(pair_rows):
        report["reference_margins"] = pair_rows.column(REF_MARGIN_COLUMN)
    for key in ("cached_masks", "fresh_masks"):
        summary = report.get("train_sample", {}).get(key)
        if summary:
            credits[f"train_sample/{key}/accuracy"] = {"after": summary.pop("credits")}
    report["intervals"] = interval_block(credits)
    pref = report["intervals"].get("preference_accuracy", {})
    warning = few_items_warning("preference accuracy", pref.get("after") or pref.get("before") or {},
                                "held-out pairs")
    if warning:
        print(warning + " (score more eval pairs: ingest --eval-fraction)", file=sys.stderr)
    report["mc_spread"] = spreads
    report["models"] = {"before": before_name, "after": cfg.model}
    report["record"] = eval_record(cfg, numerics, cache, device)
    if bench:  # what produced task_accuracy: compare evals by it
        report["sampler"] = {"gen_length": cfg.gen_length, "block_length": cfg.block_length, "steps": cfg.steps,
                             "cache": cfg.cache, "threshold": cfg.threshold}
        report["grading"] = {"verifier": cfg.verifier, "answer_format": cfg.answer_format}
    report["counts"] = {"pairs": len(pair_rows), "task_items": len(bench), "choice_items": len(mc)}
    report = {k: v for k, v in report.items() if v != {}}
    cfg.out.mkdir(parents=True, exist_ok=True)
    if task_rows:
        with atomic_path(cfg.out / TASK_RESULTS, record=True) as tmp:
            pq.write_table(pa.Table.from_pylist(task_rows, schema=TASK_RESULTS_SCHEMA), tmp)
    else:  # an earlier eval's per-item rows would contradict this eval.json
        remove_owned(cfg.out / TASK_RESULTS)
    write_json_atomic(cfg.out / EVAL_FILE, report, record=True)
    return EvalResult(out=str(cfg.out), eval_json=str(cfg.out / EVAL_FILE), seconds=time.perf_counter() - start,
                      pairs=len(pair_rows), task_items=len(bench),  # and the figures, as eval.json has them
                      **{f.name: report[f.name] for f in dataclasses.fields(EvalResult) if f.name in report})


def eval_record(cfg: EvalConfig, numerics: Numerics, cache, device: str) -> dict[str, Any]:
    """What makes this eval comparable with another: sampler settings, seeds, numerics, the multiple-choice
    estimator, the cache it was measured against, and the machine and package versions."""
    defaults = {k: p.default for k, p in inspect.signature(complete).parameters.items()
                if k in ("temperature", "remasking", "cfg_scale")}
    fp = cache.fingerprint if cache is not None else {}
    return {
        "sampler": {"gen_length": cfg.gen_length, "block_length": cfg.block_length, "steps": cfg.steps,
                    "batch_size": cfg.batch_size, "cache": cfg.cache, "threshold": cfg.threshold, **defaults},
        "seeds": {"seed": cfg.seed, "mc_seeds": cfg.mc_seeds, "cache_mask_seed": fp.get("seed")},
        "multiple_choice": {"samples": cfg.samples, "normalize": cfg.normalize},
        "numerics": dataclasses.asdict(numerics),
        "cache": None if cache is None else {"path": str(cfg.scores), "model": cache.manifest.reference_model,
                                             "samples": fp.get("samples"), "draws": fp.get("draws"),
                                             "scheme": fp.get("scheme")},
        "lm_eval": {"tasks": cfg.lm_eval_tasks, "limit": cfg.lm_eval_limit,
                    "num_fewshot": cfg.lm_eval_num_fewshot} if cfg.lm_eval_tasks else None,
        "environment": environment(device),
    }


def _sample_report(rows: list[dict], policy: dict, reference: dict | None, beta: float) -> dict[str, Any]:
    ref_c = [reference_elbo(r, "chosen") for r in rows]
    ref_r = [reference_elbo(r, "rejected") for r in rows]
    return {"pairs": len(rows),
            "cached_masks": margin_summary(policy["cached_c"], policy["cached_r"], ref_c, ref_r, beta),
            # fresh masks need the cache's model as `before` (the reference on the fresh masks)
            "fresh_masks": None if reference is None else margin_summary(
                policy["fresh_c"], policy["fresh_r"], reference["fresh_c"], reference["fresh_r"], beta)}



def print_intervals(intervals: dict, mc_spread: dict | None = None, title: str = "accuracy with 95% intervals") -> None:
    """The intervals block as plain lines (not wrapped): per figure before, after and after - before (paired)."""
    if not intervals:
        return
    print(f"{title}:")
    for name, rec in intervals.items():  # every accuracy with its count and interval, the paired difference
        print(f"  {FIGURE_LABELS.get(name, name)}")
        for label, key, show in (("before", "before", format_accuracy), ("after", "after", format_accuracy),
                                 ("after - before", "difference", format_difference)):
            if rec.get(key):
                print(f"    {label:15} {show(rec[key])}")
    for figure, by_label in (mc_spread or {}).items():
        for label, sp in by_label.items():
            print(f"  {figure} ({label}) over {len(sp['seeds'])} mask seeds: mean {sp['mean']:.3f}, "
                  f"sd {sp['sd']:.3f}, min {sp['min']:.3f}, max {sp['max']:.3f}")


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
