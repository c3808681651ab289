"""eval's run: the starting model and the policy measured in turn (preference figures on the cache, a training
sample, task accuracy, multiple choice, lm-eval tasks), then eval.json and task_results.parquet written.

``cfg`` is eval's config (stages/evaluate.py: ``EvalConfig``, a ``SamplingArgs`` for task accuracy); this module
holds what it does, so the stage is its config and command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_path, check_replaceable, check_writable, remove_owned, write_json_atomic
from pipeline.core.devices import resolve_device
from pipeline.core.errors import UserError
from pipeline.core.paths import EVAL_FILE, TASK_RESULTS
from pipeline.core.schemas import REF_MARGIN_COLUMN
from pipeline.data.choices import read_choices
from pipeline.data.prompts import follow_cache, resolve_chat_template
from pipeline.evaluation.choice_scoring import choice_credits
from pipeline.evaluation.evalrecord import eval_record
from pipeline.evaluation.intervals import few_items_warning
from pipeline.evaluation.metrics import (
    fresh_elbo_credits,
    interval_block,
    preference_scores,
    sample_terms,
    spread,
    train_sample_report,
    training_sample,
)
from pipeline.evaluation.tasks import TASK_RESULTS_SCHEMA, read_benchmark, task_accuracy, working_figures
from pipeline.models.numerics import Numerics, autocast, config_numerics, follow, of_fingerprint
from pipeline.refcache.fingerprint import check_reference_model
from pipeline.refcache.reader import open_cache
from pipeline.sampling.args import SamplingArgs


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

    @classmethod
    def of(cls, out: Path, report: dict[str, Any], seconds: float) -> "EvalResult":
        """The summary of an eval whose eval.json holds ``report``: its figures, as eval.json has them."""
        counts = report.get("counts", {})
        return cls(out=str(out), eval_json=str(out / EVAL_FILE), seconds=seconds, pairs=counts.get("pairs", 0),
                   task_items=counts.get("task_items", 0),
                   **{f.name: report[f.name] for f in dataclasses.fields(cls) if f.name in report})


def without_missing_default_cache(cfg, default: str | Path):
    """A task-accuracy eval (benchmark, choices, lm-eval tasks) given no --scores runs without a cache when the
    ``default`` cache folder is absent, rather than failing on a path the user never named."""
    asks_tasks = bool(cfg.benchmark or cfg.choices or cfg.lm_eval_tasks.strip())
    if asks_tasks and cfg.scores is not None and cfg.scores == Path(default) and not cfg.scores.exists():
        print(f"note: eval: no reference cache at the default {default}: task accuracy only, of --model"
              f"{' and --before' if cfg.before not in (None, '', 'none') else ''} (give --scores CACHE for "
              "preference figures and the cache's model as before)", file=sys.stderr)
        return replace(cfg, scores=None)
    return cfg


@dataclass
class EvalInputs:
    """What an eval measures on, read before any model is loaded."""

    device: str
    cache: Any
    """The reference cache (``open_cache``), or None."""
    reference_name: str | None
    before_name: str | None
    pair_rows: Any
    """The held-out pairs of the split (read in slices as they are scored), or []."""
    numerics: Numerics
    sample: list
    """Training pairs for the cached-vs-fresh masks figures."""
    bench: list
    choices: list
    lm_tasks: list[str]


def prepare(cfg) -> EvalInputs:
    """The outputs checked, the cache opened, its numerics followed, the inputs read; one-line errors first."""
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
        numerics = config_numerics(cfg)
    sample = training_sample(cache, cfg.train_sample, cfg.seed) if cache is not None and cfg.train_sample else []
    bench = read_benchmark(cfg.benchmark)[:cfg.limit_task or None] if cfg.benchmark else []
    # options a list of strings, answer an index in range
    mc = read_choices(cfg.choices)[:cfg.limit_choices or None] if cfg.choices else []
    lm_tasks = [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()]
    if lm_tasks and importlib.util.find_spec("lm_eval") is None:
        raise UserError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lldm-dpo[eval]'")
    if cache is not None and before_name is not None and before_name == reference_name:
        check_reference_model(cache.fingerprint, before_name, str(cfg.scores))  # its weights may have changed
    return EvalInputs(device, cache, reference_name, before_name, pair_rows, numerics, sample, bench, mc, lm_tasks)


@dataclass
class Figures:
    """What the models' measurements add up to: eval.json's figures, the per-item rows and credits."""

    report: dict[str, Any] = field(default_factory=dict)
    """eval.json: per figure {label: value}, then what it was measured with."""
    task_rows: list[dict] = field(default_factory=list)
    credits: dict[str, dict[str, list]] = field(default_factory=dict)
    """Per figure and label, the per-item credits behind its interval and paired difference."""
    spreads: dict[str, dict[str, Any]] = field(default_factory=dict)
    fresh_reference: dict | None = None
    """The reference's terms on the training sample's fresh masks."""

    def put(self, figure: str, label: str, value: Any, credits: list | None = None) -> None:
        self.report.setdefault(figure, {})[label] = value
        if credits is not None:
            self.credits.setdefault(figure, {})[label] = credits


def evaluate(cfg, inputs: EvalInputs) -> Figures:
    """Both models (``before``, then ``after``: the policy) measured in turn, one loaded at a time."""
    from pipeline.models import load  # transformers: when a model loads, not when eval parses its flags

    figures = Figures()
    held_out = (inputs.pair_rows.take(range(len(inputs.pair_rows)))
                if cfg.mc_seeds > 1 and len(inputs.pair_rows) else [])
    for label, name in (("before", inputs.before_name), ("after", cfg.model)):
        if name is None:
            continue
        model, tokenizer = load(name, inputs.numerics, inputs.device, trust_remote_code=cfg.trust_remote_code)
        model.eval()
        cache = inputs.cache
        chat_template = (follow_cache(cfg.chat_template, cache.fingerprint, str(cfg.scores)) if cache is not None
                         else resolve_chat_template(tokenizer, cfg.chat_template))
        if len(inputs.pair_rows):
            _preference(cfg, inputs, figures, model, tokenizer, label, held_out)
        if inputs.sample and (label == "after" or name == inputs.reference_name):
            terms = sample_terms(model, tokenizer, inputs.sample, cache.fingerprint, inputs.numerics, cfg.batch_tokens)
            if label == "before":
                figures.fresh_reference = terms  # the reference's terms on the fresh masks
            else:
                figures.report["train_sample"] = train_sample_report(inputs.sample, terms, figures.fresh_reference,
                                                                     cfg.beta)
        with autocast(inputs.device, inputs.numerics.mixed_precision):
            if inputs.bench:
                _tasks(cfg, inputs, figures, model, tokenizer, label, chat_template)
            if inputs.choices:
                _choices(cfg, inputs, figures, model, tokenizer, label, chat_template)
        if inputs.lm_tasks:
            _lm_eval(cfg, inputs, figures, model, tokenizer, label, chat_template)
        del model
    return figures


def _preference(cfg, inputs: EvalInputs, figures: Figures, model, tokenizer, label: str, held_out: list) -> None:
    """Preference and ELBO accuracy and the mean margin on the held-out pairs; with mc_seeds > 1 the ELBO
    accuracy's spread over fresh masks."""
    cache = inputs.cache
    pref = preference_scores(model, tokenizer, cache, cfg.split, cfg.beta, inputs.numerics, cfg.limit_pairs)
    figures.put("preference_accuracy", label, pref["accuracy"], pref["credits"])
    figures.put("elbo_accuracy", label, pref["elbo_accuracy"], pref["elbo_credits"])
    figures.put("mean_margin", label, pref["mean_margin"])
    if held_out:
        values = [sum(c) / len(c) for c in (
            fresh_elbo_credits(model, tokenizer, held_out, cache.fingerprint, inputs.numerics,
                               cache.manifest.batch_tokens, j)
            for j in range(cfg.mc_seeds))]
        figures.spreads.setdefault("elbo_accuracy_fresh_masks", {})[label] = spread(
            values, [cache.fingerprint["draws"] + j for j in range(cfg.mc_seeds)])


def _tasks(cfg, inputs: EvalInputs, figures: Figures, model, tokenizer, label: str, chat_template: bool) -> None:
    """Task accuracy on the benchmark; with a verifier that checks working, the working figures too."""
    acc, rows = task_accuracy(model, tokenizer, inputs.bench, cfg, label, chat_template)
    figures.put("task_accuracy", label, acc, [r["correct"] for r in rows])
    figures.task_rows += rows
    working = working_figures(rows)
    if working is not None:
        figures.put("working_accuracy", label, sum(working[0]) / len(working[0]), working[0])
        figures.put("working_share", label, working[1])


def _choices(cfg, inputs: EvalInputs, figures: Figures, model, tokenizer, label: str, chat_template: bool) -> None:
    """Multiple-choice accuracy (its first mask seed), and with mc_seeds > 1 its spread over the seeds."""
    mc = inputs.choices
    seeds = [cfg.seed + j for j in range(cfg.mc_seeds)]
    per_seed = [choice_credits(model, tokenizer, mc, cfg, chat_template, seed=sd) for sd in seeds]
    figures.put("choice_accuracy", label, sum(per_seed[0]) / len(mc), per_seed[0])
    if cfg.mc_seeds > 1:
        figures.spreads.setdefault("choice_accuracy", {})[label] = spread([sum(c) / len(mc) for c in per_seed], seeds)


def _lm_eval(cfg, inputs: EvalInputs, figures: Figures, model, tokenizer, label: str, chat_template: bool) -> None:
    """lm-evaluation-harness tasks through the ``lldm`` adapter; accuracies with their per-document credits."""
    from pipeline.evaluation.lm_eval_model import run_tasks

    docs: dict[str, list[float]] = {}
    scores = run_tasks(model, tokenizer, inputs.lm_tasks, include_path=cfg.lm_eval_include_path,
                       limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot,
                       apply_chat_template=chat_template, mc_samples=cfg.samples,
                       batch_tokens=cfg.batch_tokens, seed=cfg.seed, per_document=docs,
                       # generation by eval's schedule on the exact sampler, as lm-eval's tasks always ran
                       sampling=SamplingArgs.of(cfg, kv_cache="none", threshold=None))
    for metric, values in docs.items():  # accuracies: their count, interval and paired difference
        if metric in scores:
            figures.credits.setdefault(f"lm_eval/{metric}", {})[label] = values
    for name, value in scores.items():
        figures.report.setdefault("lm_eval", {}).setdefault(name, {})[label] = value


def finish(cfg, inputs: EvalInputs, figures: Figures) -> dict[str, Any]:
    """eval.json's content: the figures, their intervals, spreads, the models, the record of what produced them
    and the counts (empty blocks left out)."""
    report, credits = figures.report, figures.credits
    if len(inputs.pair_rows):
        report["reference_margins"] = inputs.pair_rows.column(REF_MARGIN_COLUMN)
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
    report["mc_spread"] = figures.spreads
    report["models"] = {"before": inputs.before_name, "after": cfg.model}
    report["record"] = eval_record(cfg, inputs.numerics, inputs.cache, inputs.device)
    if inputs.bench:  # what produced task_accuracy: compare evals by it
        report["sampler"] = {"gen_length": cfg.gen_length, "block_length": cfg.block_length, "steps": cfg.steps,
                             "kv_cache": cfg.kv_cache, "threshold": cfg.threshold}
        report["grading"] = {"verifier": cfg.verifier, "answer_format": cfg.answer_format}
    report["counts"] = {"pairs": len(inputs.pair_rows), "task_items": len(inputs.bench),
                        "choice_items": len(inputs.choices)}
    return {k: v for k, v in report.items() if v != {}}


def write_outputs(out: Path, report: dict[str, Any], task_rows: list[dict]) -> None:
    """task_results.parquet (or an earlier one removed: it would contradict), then eval.json, each atomically."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    if task_rows:
        with atomic_path(out / TASK_RESULTS, record=True) as tmp:
            pq.write_table(_task_table(task_rows), tmp)
    else:  # an earlier eval's per-item rows would contradict this eval.json
        remove_owned(out / TASK_RESULTS)
    write_json_atomic(out / EVAL_FILE, report, record=True)


def _task_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=TASK_RESULTS_SCHEMA)
