"""``lldm-dpo eval``: held-out preference accuracy, task accuracy, multiple choice; before and after.

- Preference accuracy: on the cache's held-out pairs, the policy's terms on the
  cached masks (every draw) against the cached reference terms; a pair counts
  when the implicit reward margin beta * ((B_pi(c) - B_ref(c)) - (B_pi(r) -
  B_ref(r))) is positive (ties count one half, so the reference itself scores
  0.5). Also the ELBO accuracy: the share where the model's own B(c) > B(r).
- Task accuracy: completions from LLaDA's sampler on a benchmark of questions
  with numeric answers, graded by ``pipeline.answers``; per-item rows go to
  ``task_results.parquet``.
- Multiple choice: each option's ELBO given the question; the highest wins.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import typer

from pipeline.atomic import atomic_path, remove_owned, write_json_atomic
from pipeline.cache import open_cache
from pipeline.errors import ConfigError, UserError
from pipeline.prompts import follow_cache, resolve_chat_template

TASK_RESULTS = "task_results.parquet"
TASK_RESULTS_SCHEMA = pa.schema([
    ("model", pa.string()),  # "before" or "after"
    ("index", pa.int64()),
    ("question", pa.string()),
    ("reference", pa.string()),
    ("completion", pa.string()),
    ("predicted", pa.string()),
    ("correct", pa.bool_()),
])
EVAL_FILE = "eval.json"
NORMALIZE = ("none", "length")


RANGES = {"beta": "(0, inf)", "limit_pairs": "[0, inf)", "limit_task": "[0, inf)", "limit_choices": "[0, inf)",
          "gen_length": "[1, inf)", "block_length": "[1, inf)", "steps": "[1, inf)", "samples": "[1, inf)",
          "batch_size": "[1, inf)", "batch_tokens": "[1, inf)", "seed": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class EvalConfig:
    model: str = "runs/dpo/final"
    """The trained policy: a checkpoint folder, a LoRA adapter folder (RUN_DIR/final), or a preset."""
    scores: Optional[Path] = Path("cache/ref-scores")
    """Reference-score cache holding the held-out pairs (score-ref over the eval split); empty to skip."""
    before: Optional[str] = None
    """The starting model to compare against; default the cache's reference model; 'none' to skip."""
    benchmark: Optional[Path] = None
    """JSONL of {question, answer} for task accuracy (GSM8K '#### N' and 'A: N' answers understood)."""
    choices: Optional[Path] = None
    """JSONL of {question, options, answer (index)} for multiple-choice accuracy by ELBO."""
    out: Path = Path("runs/dpo")
    """Folder for eval.json and task_results.parquet (the run folder, so `query --run` and `report` find them)."""
    split: str = "eval"
    """Which split of the cache to measure preference accuracy on."""
    beta: float = 0.1
    """beta of the reported implicit rewards (the sign, and so the accuracy, does not depend on it)."""
    limit_pairs: int = 0
    """Held-out pairs to use (0 = all)."""
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
    """Prompts per generation batch."""
    batch_tokens: int = 16384
    """Token budget of one scoring forward pass."""
    chat_template: Optional[bool] = None
    """Render prompts with the tokenizer's chat template (pipeline/prompts.py); default: the cache's rule when
    `scores` is given, else on when the tokenizer has a template. A setting that differs from the cache's is refused."""
    normalize: str = "none"
    """Multiple-choice score of an option: none (its ELBO, LLaDA's protocol) or length (ELBO per option token)."""
    seed: int = 0
    """Seed of sampling noise and multiple-choice masks."""
    dtype: str = "float32"
    """Model dtype."""
    device: str = "auto"
    """cpu, cuda or auto."""
    trust_remote_code: bool = False
    """Allow a non-LLaDA checkpoint to run its own modeling code."""
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
        from pipeline.config import check_device, check_ranges

        check_ranges(self, RANGES)
        check_device(self.device)
        self.scores = Path(self.scores) if self.scores not in (None, "") else None
        self.benchmark = Path(self.benchmark) if self.benchmark not in (None, "") else None
        self.choices = Path(self.choices) if self.choices not in (None, "") else None
        self.lm_eval_include_path = (Path(self.lm_eval_include_path) if self.lm_eval_include_path not in (None, "")
                                     else None)
        if self.scores is None and self.benchmark is None and self.choices is None and not self.lm_eval_tasks:
            raise ConfigError("nothing to evaluate: give scores, benchmark, choices or lm_eval_tasks")
        if self.lm_eval_limit < 0 or (self.lm_eval_num_fewshot is not None and self.lm_eval_num_fewshot < 0):
            raise ConfigError("lm_eval_limit and lm_eval_num_fewshot must be >= 0")
        for name in ("gen_length", "block_length", "steps", "samples", "batch_size", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE)}, got '{self.normalize}'")
        if self.gen_length % self.block_length:
            raise ConfigError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})")


@dataclass
class EvalResult:
    out: str
    eval_json: str
    seconds: float
    preference_accuracy: dict[str, float] = field(default_factory=dict)
    elbo_accuracy: dict[str, float] = field(default_factory=dict)
    mean_margin: dict[str, float] = field(default_factory=dict)
    task_accuracy: dict[str, float] = field(default_factory=dict)
    choice_accuracy: dict[str, float] = field(default_factory=dict)
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    """lm-eval results: {"task/metric": {"before": ..., "after": ...}}."""
    pairs: int = 0
    task_items: int = 0


def preference_scores(model, tokenizer, rows: list[dict], fingerprint: dict, beta: float,
                      batch_tokens: int) -> dict[str, Any]:
    """Policy ELBOs on the cached masks of every draw, against the cached reference."""
    from pipeline.diffusion import elbo_terms
    from pipeline.replay import PairBatch, replay_requests

    margins, own, scales = [], [], []
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        sums = torch.zeros(len(chunk), 2, dtype=torch.float64)
        for draw in range(fingerprint["draws"]):
            requests = replay_requests(PairBatch(chunk, draw), fingerprint)
            with torch.no_grad():
                terms = elbo_terms(model, requests, mask_token_id=tokenizer.mask_token_id,
                                   pad_token_id=tokenizer.pad_token_id, batch_tokens=batch_tokens)
            means = torch.stack([t.mean().cpu() for t in terms]).view(-1, 2)
            sums += means
        pi = sums / fingerprint["draws"]
        for i, row in enumerate(chunk):
            pi_c, pi_r = float(pi[i, 0]), float(pi[i, 1])
            # Accuracy reads the sign of the margin before beta scales it: it cannot depend on beta.
            margins.append((pi_c - row["ref_chosen_elbo"]) - (pi_r - row["ref_rejected_elbo"]))
            scales.append(abs(row["ref_chosen_elbo"]) + abs(row["ref_rejected_elbo"]))
            own.append(pi_c - pi_r)
    n = len(margins)
    # The reference scoring itself ties exactly up to float32 noise, which grows
    # with the size of the ELBOs (sums over many tokens, weights L/l): a tie is a
    # margin within 1e-5 of the ELBOs' scale, and counts one half.
    def credit(m: float, scale: float) -> float:
        tol = 1e-5 * scale
        return 1.0 if m > tol else 0.5 if m >= -tol else 0.0

    acc = sum(credit(m, s) for m, s in zip(margins, scales)) / n
    return {"accuracy": acc, "elbo_accuracy": sum(o > 0 for o in own) / n, "mean_margin": beta * sum(margins) / n}


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
        for key in required:
            if key not in item:
                raise UserError(f"{path}:{line_no}: missing field '{key}'")
        items.append(item)
    return items


def task_accuracy(model, tokenizer, items: list[dict], cfg: EvalConfig, label: str,
                  chat_template: bool) -> tuple[float, list[dict]]:
    from pipeline.answers import extract_answer, is_correct, reference_answer
    from pipeline.completion import complete

    prompts = [it["question"] for it in items]
    done = complete(model, tokenizer, prompts, gen_length=cfg.gen_length, block_length=cfg.block_length,
                    steps=cfg.steps, seed=cfg.seed, chat_template=chat_template, batch_size=cfg.batch_size)
    rows = []
    for i, (it, out) in enumerate(zip(items, done)):
        ref = reference_answer(str(it["answer"]))
        rows.append({"model": label, "index": i, "question": it["question"], "reference": str(ref),
                     "completion": out["completion"], "predicted": extract_answer(out["completion"]),
                     "correct": bool(is_correct(out["completion"], str(it["answer"])))})
    return sum(r["correct"] for r in rows) / max(1, len(rows)), rows


def choice_requests(tokenizer, item: dict, index: int, *, samples: int, seed: int, chat_template: bool,
                    where: str = "item") -> list:
    """One ScoreRequest per option, as LLaDA evaluates multiple choice: question and option encoded
    jointly (pipeline.prompts.encode_continuation), the option's tokens the masked continuation, no EOS."""
    from pipeline.diffusion import ScoreRequest, mask_seed, sample_masks
    from pipeline.prompts import encode_continuation

    requests = []
    for j, option in enumerate(item["options"]):
        context, continuation = encode_continuation(tokenizer, item["question"], str(option),
                                                    chat_template=chat_template, where=where)
        if not continuation:
            raise UserError(f"{where}: option {j} encodes to no token")
        ms = sample_masks(len(continuation), samples, mask_seed(seed, f"choice-{index}", f"option-{j}", 0))
        requests.append(ScoreRequest(context, continuation, ms.masks, ms.weights))
    return requests


def choice_accuracy(model, tokenizer, items: list[dict], cfg: EvalConfig, chat_template: bool | None = None) -> float:
    """Pick the option with the highest ELBO given the question (per token with normalize=length)."""
    from pipeline.diffusion import elbo_terms
    from pipeline.prompts import resolve_chat_template

    chat_template = resolve_chat_template(tokenizer, chat_template)
    correct = 0
    for i, item in enumerate(items):
        options = list(item["options"])
        if not options:
            raise UserError(f"{cfg.choices} item {i}: field 'options' is empty")
        requests = choice_requests(tokenizer, item, i, samples=cfg.samples, seed=cfg.seed,
                                   chat_template=chat_template, where=f"{cfg.choices} item {i}")
        with torch.no_grad():
            terms = elbo_terms(model, requests, mask_token_id=tokenizer.mask_token_id,
                               pad_token_id=tokenizer.pad_token_id, batch_tokens=cfg.batch_tokens)
        scores = [t.double().mean().item() / (len(r.response_ids) if cfg.normalize == "length" else 1)
                  for t, r in zip(terms, requests)]
        correct += int(max(range(len(options)), key=lambda j: scores[j]) == int(item["answer"]))
    return correct / max(1, len(items))


def run(cfg: EvalConfig) -> EvalResult:
    from pipeline.atomic import check_writable
    from pipeline.models import load_model
    from stages.score_ref import resolve_device

    start = time.perf_counter()
    check_writable(cfg.out, "eval output folder")
    device = str(resolve_device(cfg.device))
    cache = open_cache(cfg.scores) if cfg.scores is not None else None
    before_name = cfg.before
    if before_name is None and cache is not None:
        before_name = cache.manifest["config"]["model"]
    if before_name in ("none", ""):
        before_name = None
    pair_rows = list(cache.rows(split=cfg.split)) if cache is not None else []
    if cache is not None and not pair_rows:
        raise UserError(f"{cfg.scores}: the cache holds no pairs of split '{cfg.split}' "
                        "(ingest with --eval-fraction and score them)")
    if cfg.limit_pairs:
        pair_rows = pair_rows[:cfg.limit_pairs]
    bench = read_jsonl(cfg.benchmark, ("question", "answer")) if cfg.benchmark else []
    if cfg.limit_task:
        bench = bench[:cfg.limit_task]
    mc = read_jsonl(cfg.choices, ("question", "options", "answer")) if cfg.choices else []
    if cfg.limit_choices:
        mc = mc[:cfg.limit_choices]
    lm_tasks = [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()]
    if lm_tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise UserError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lldm-dpo[eval]'")

    result = EvalResult(out=str(cfg.out), eval_json=str(cfg.out / EVAL_FILE), seconds=0.0, pairs=len(pair_rows),
                        task_items=len(bench))
    report: dict[str, Any] = {"preference_accuracy": {}, "elbo_accuracy": {}, "mean_margin": {}}
    task_rows: list[dict] = []
    for label, name in (("before", before_name), ("after", cfg.model)):
        if name is None:
            continue
        model, tokenizer = load_model(name, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code)
        model.eval()
        chat_template = (follow_cache(cfg.chat_template, cache.fingerprint, str(cfg.scores)) if cache is not None
                         else resolve_chat_template(tokenizer, cfg.chat_template))
        if pair_rows:
            pref = preference_scores(model, tokenizer, pair_rows, cache.fingerprint, cfg.beta, cfg.batch_tokens)
            result.preference_accuracy[label] = report["preference_accuracy"][label] = pref["accuracy"]
            result.elbo_accuracy[label] = report["elbo_accuracy"][label] = pref["elbo_accuracy"]
            result.mean_margin[label] = report["mean_margin"][label] = pref["mean_margin"]
        if bench:
            acc, rows = task_accuracy(model, tokenizer, bench, cfg, label, chat_template)
            result.task_accuracy[label] = acc
            report.setdefault("task_accuracy", {})[label] = acc
            task_rows += rows
        if mc:
            acc = choice_accuracy(model, tokenizer, mc, cfg, chat_template)
            result.choice_accuracy[label] = acc
            report.setdefault("choice_accuracy", {})[label] = acc
        if lm_tasks:
            from pipeline.lm_eval_model import run_tasks

            scores = run_tasks(model, tokenizer, lm_tasks, include_path=cfg.lm_eval_include_path,
                               limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot,
                               apply_chat_template=chat_template, mc_samples=cfg.samples,
                               batch_tokens=cfg.batch_tokens, seed=cfg.seed, gen_length=cfg.gen_length,
                               block_length=cfg.block_length, steps=cfg.steps)
            for name, value in scores.items():
                result.lm_eval.setdefault(name, {})[label] = value
                report.setdefault("lm_eval", {}).setdefault(name, {})[label] = value
        del model
    if pair_rows:
        report["reference_margins"] = [r["ref_margin"] for r in pair_rows]
    report["models"] = {"before": before_name, "after": cfg.model}
    report["counts"] = {"pairs": len(pair_rows), "task_items": len(bench), "choice_items": len(mc)}
    report = {k: v for k, v in report.items() if v != {}}
    cfg.out.mkdir(parents=True, exist_ok=True)
    if task_rows:
        with atomic_path(cfg.out / TASK_RESULTS, record=True) as tmp:
            pq.write_table(pa.Table.from_pylist(task_rows, schema=TASK_RESULTS_SCHEMA), tmp)
    else:  # an earlier eval's per-item rows would contradict this eval.json
        remove_owned(cfg.out / TASK_RESULTS)
    write_json_atomic(cfg.out / EVAL_FILE, report, record=True)
    result.seconds = time.perf_counter() - start
    return result


def command(
    model: Optional[str] = typer.Option(None, "--model", help="Trained policy (folder, adapter folder or preset)."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Reference-score cache with the held-out pairs."),
    before: Optional[str] = typer.Option(None, "--before", help="Starting model (default: the cache's); 'none' skips."),
    benchmark: Optional[Path] = typer.Option(None, "--benchmark", help="JSONL {question, answer}."),
    choices: Optional[Path] = typer.Option(None, "--choices", help="JSONL {question, options, answer}."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where eval.json and task_results.parquet go."),
    split: Optional[str] = typer.Option(None, "--split"),
    limit_pairs: Optional[int] = typer.Option(None, "--limit-pairs"),
    limit_task: Optional[int] = typer.Option(None, "--limit-task"),
    limit_choices: Optional[int] = typer.Option(None, "--limit-choices"),
    gen_length: Optional[int] = typer.Option(None, "--gen-length"),
    block_length: Optional[int] = typer.Option(None, "--block-length"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    samples: Optional[int] = typer.Option(None, "--samples"),
    beta: Optional[float] = typer.Option(None, "--beta", help="beta of the reported implicit rewards."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Multiple-choice score: none or length."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    device: Optional[str] = typer.Option(None, "--device"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code"),
    lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval-tasks", help="lm-eval tasks, comma-separated."),
    lm_eval_include_path: Optional[Path] = typer.Option(None, "--lm-eval-include-path", help="Extra task YAMLs."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="Documents per lm-eval task."),
    lm_eval_num_fewshot: Optional[int] = typer.Option(None, "--lm-eval-num-fewshot"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Evaluate the policy (and its starting model): held-out preference accuracy, task and choice accuracy."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "print_config", "as_json")}
    from pipeline.stagecli import print_summary, resolve_config, summary_dict

    cfg = resolve_config(EvalConfig, config, flags, print_config)
    if cfg is None:
        return
    print_summary("eval", summary_dict(run(cfg)), as_json)
