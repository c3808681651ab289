"""What the DPO recipe checks and measures around its loop: the policy's start (init, tokenizer, numerics),
the mask draws an epoch count needs, the start check (ref/gap_max) and the held-out evaluation, both scored
in the cache's own batch layout, and the model card."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Optional

import torch
from torch.distributed.fsdp import FSDPModule

from pipeline.core.config import carry_given_as, config_to_dict, option_name
from pipeline.core.errors import UserError
from pipeline.core.schemas import LENGTH_COLUMNS, PAIR_ID_COLUMN
from pipeline.evaluation.intervals import accuracy_record, few_items_warning
from pipeline.evaluation.preference import cache_layout_sums, heldout_metrics
from pipeline.models import load, model_identity, tokenizer_identity
from pipeline.models.numerics import FIELDS as NUMERICS_FIELDS
from pipeline.models.numerics import Numerics, autocast, config_numerics, follow
from pipeline.refcache.fingerprint import describe_difference, fingerprint_differences, fingerprint_digest
from pipeline.refcache.reader import cache_part_paths, read_whole_part
from pipeline.refcache.rows import responses_differ, row_split
from pipeline.trainer.batching import step_counts, step_rows
from pipeline.trainer.dpo_config import TrainConfig
from pipeline.trainer.dpo_step import TrainContext
from pipeline.trainer.model_card import model_card
from pipeline.trainer.policy import adapt_policy


def setup_policy(cfg: TrainConfig, model_name: str, device: torch.device, numerics: Optional[Numerics] = None):
    """The policy as ``pipeline.models.load`` gives it in ``numerics`` (optionally 4-bit), then adapted for
    training: LoRA or all unfrozen, checkpointing."""
    numerics = numerics or config_numerics(cfg)
    model, tokenizer = load(model_name, numerics, device, trust_remote_code=cfg.trust_remote_code)
    return adapt_policy(model, cfg, numerics), tokenizer


def check_tokenizer(cfg: TrainConfig, cache, tokenizer) -> None:
    """Cached token ids only mean something under the tokenizer that produced them."""
    if tokenizer_identity(tokenizer) != cache.fingerprint.get("tokenizer"):
        raise UserError(f"{cfg.scores}: the policy's tokenizer differs from the one the cache was scored with "
                        "(fingerprint field 'tokenizer'); cached token ids would be read in another vocabulary")


def same_model(cache, model_name: str) -> bool:
    """Whether ``model_name`` is the cache's reference model, by name or by identity (content)."""
    return model_name == cache.manifest.reference_model or not fingerprint_differences(
        {"model": model_identity(model_name)}, {"model": cache.fingerprint.get("model")})


def check_init(cfg: TrainConfig, cache, model_name: str) -> None:
    """The policy must start from the cache's reference model unless the user says otherwise."""
    expected = cache.fingerprint.get("model")
    actual = model_identity(model_name)
    diffs = fingerprint_differences({"model": actual}, {"model": expected})
    if diffs and not cfg.allow_different_init:
        raise UserError(f"{cfg.scores}: policy init '{model_name}' is not the cache's reference model ("
                        + describe_difference({"model": actual}, {"model": expected}, "model")
                        + "); pass --allow-different-init to train from it anyway")


def check_cache_inputs(cfg: TrainConfig, cache):
    """The cache's train rows (read in slices, identical pairs skipped) and, with eval_every, its eval rows."""
    fp = cache.fingerprint
    for name in ("max_length", "max_prompt_length", "max_completion_length"):
        if getattr(cfg, name) is not None and getattr(cfg, name) != fp.get(name):
            raise UserError(f"{cfg.scores}: {name} {getattr(cfg, name)} differs from the cache's {fp.get(name)} "
                            f"(sequences were truncated when scored; rescore with score-ref's {name} to change it)")
    if cfg.pad_to is not None and cfg.pad_to != fp.get("pad_to", 0):
        raise UserError(f"{cfg.scores}: pad_to {cfg.pad_to} differs from the cache's {fp.get('pad_to', 0)} "
                        "(responses were EOS-padded when scored; rescore with score-ref --pad-to to change it)")
    # Read in slices: each process decodes only the row groups of its own micro-batches.
    # Truncation can make both responses the same ids: such a pair carries no preference, only noise.
    rows = cache.split_rows("train", skip_identical=True)
    if rows.identical:
        print(f"warning: skipping {len(rows.identical)} pair(s) whose responses are identical after truncation "
              f"(e.g. {rows.identical[0]}); raise score-ref's --max-length to keep them", file=sys.stderr)
    if not len(rows):
        raise UserError(f"{cfg.scores}: the cache holds no pairs of the train split")
    eval_rows = []
    if cfg.eval_every or cfg.eval_each_epoch:
        eval_rows = cache.split_rows("eval", skip_identical=True)  # read on demand, as the train split
        if not eval_rows:
            asked = option_name(cfg, "eval_each_epoch" if cfg.eval_each_epoch else "eval_every")
            raise UserError(f"{cfg.scores}: {asked} needs held-out pairs, but the cache holds none of the eval "
                            "split (ingest with --eval-fraction and score them)")
    return rows, eval_rows


def resolve_numerics(cfg: TrainConfig, cache) -> tuple[TrainConfig, Numerics, Numerics]:
    """(cfg with its numerics resolved, the policy's numerics, the cache's): unset ones follow the cache."""
    cached = cache.manifest.numerics
    numerics = follow(cached, dtype=cfg.dtype, mixed_precision=cfg.mixed_precision, load_in_4bit=cfg.load_in_4bit,
                      allow_mismatch=cfg.allow_numerics_mismatch, where=str(cfg.scores),
                      names={name: option_name(cfg, name) for name in NUMERICS_FIELDS})
    if numerics.load_in_4bit and cfg.lora_r == 0:
        raise UserError(f"{cfg.scores}: the cache was scored with a 4-bit base (load_in_4bit), which trains "
                        "adapters only: set --lora-r > 0, or rescore without --load-in-4bit")
    cfg = carry_given_as(cfg, dataclasses.replace(cfg, dtype=numerics.dtype, mixed_precision=numerics.mixed_precision,
                                                  load_in_4bit=numerics.load_in_4bit))
    return cfg, numerics, cached


def plan_start(cfg: TrainConfig, model_name: str, rows, fp: dict[str, Any], device, check_memory) -> None:
    """Plan the peak memory on the longest cached pair before the policy loads: ``check_memory(cfg, samples,
    length, prompt_length, device)`` is the stage's (lldm-dpo plan's check; the trainer does not import plan)."""
    # Three length columns, not the rows: the cache stays on disk.
    prompt_lens, chosen_lens, rejected_lens = (rows.column(c) for c in LENGTH_COLUMNS)
    i = max(range(len(prompt_lens)), key=lambda k: prompt_lens[k] + max(chosen_lens[k], rejected_lens[k]))
    length = prompt_lens[i] + max(chosen_lens[i], rejected_lens[i])
    check_memory(dataclasses.replace(cfg, model=model_name), fp["samples"], length, prompt_lens[i], device)


def epochs_needed(n_rows: int, cfg: TrainConfig, world: int = 1) -> int:
    """Epochs a run starts (a partial last one counts): each needs its own mask draw."""
    steps_per_epoch, total_steps = step_counts(n_rows, cfg, world)
    return math.ceil(total_steps / steps_per_epoch)


def check_draws(cfg: TrainConfig, epochs: int, draws: int) -> bool:
    """Refuse more epochs than mask draws unless reuse_masks; returns whether draws are reused."""
    if epochs <= draws:
        return False
    if not cfg.reuse_masks:
        raise UserError(f"{cfg.scores}: this run trains {epochs} epochs but the cache holds {draws} mask draw(s), "
                        "one per epoch (replaying masks fits the policy to them and overstates rewards/*); rerun "
                        f"score-ref with --draws {epochs}, or pass --reuse-masks to replay draw epoch mod {draws}")
    print(f"warning: {epochs} epochs on {draws} mask draw(s): epochs past {draws} replay masks already trained "
          f"on (metric masks/reused = 1); rerun score-ref with --draws {epochs} to avoid it", file=sys.stderr)
    return True


def gap_error(cfg: TrainConfig, gap: float, numerics: Numerics, cached: Numerics) -> UserError:
    """What differs and what to do, when the policy does not start at the cached reference."""
    if numerics != cached:
        what = (f"the policy runs in {numerics.describe()} and the cache was scored in {cached.describe()}; "
                "drop the explicit --dtype/--mixed-precision/--load-in-4bit (train follows the cache) or rescore "
                "with score-ref in the policy's numerics")
    else:
        what = ("numerics match the cache's, so the weights or the scoring differ (another checkpoint under the "
                "same name, another device, or a cache from another version): rescore with score-ref")
    return UserError(f"step 1: the policy starts {gap:.4g} nats away from the cached reference terms on the same "
                     f"masks (ref/gap_max), beta * gap = {cfg.beta * gap:.4g} > gap_threshold {cfg.gap_threshold}; "
                     f"{what}; --gap-threshold 0 skips this check")


def train_card(cfg: TrainConfig, model_name: str, fp: dict[str, Any], n_pairs: int, last: dict[str, Any],
               last_eval: dict[str, Any], eval_pairs: int) -> str:
    data = {"reference-score cache": str(cfg.scores), "cache fingerprint": fingerprint_digest(fp),
            "training pairs": n_pairs, "samples per response": fp.get("samples"), "mask draws": fp.get("draws")}
    return model_card(stage="dpo", base_model=model_name, lora=cfg.lora_r > 0, data=data,
                      settings=config_to_dict(cfg), metrics=last, eval_metrics=last_eval.get("metrics"),
                      eval_pairs=eval_pairs, eval_step=last_eval.get("step"))


def interval_warnings(intervals: dict[str, dict[str, Any]]) -> list[str]:
    """Where train's closing accuracies may mislead: the training figure is the last step's pairs only, and a
    held-out figure on few pairs is wide."""
    lines = []
    last = intervals.get("rewards/accuracies")
    if last and last.get("n"):
        lines.append(f"note: rewards/accuracies and its interval are over the last step's {last['n']} pairs only "
                     "(a training figure, on pairs the model was just fitted to); eval/rewards/accuracies (--eval-every "
                     "or eval_strategy) measures held-out pairs")
    warning = few_items_warning("eval/rewards/accuracies", intervals.get("eval/rewards/accuracies") or {},
                                "held-out pairs")
    if warning:
        lines.append(warning + " (score more eval pairs: ingest --eval-fraction)")
    return lines


def accuracy_of(share: float, n: int) -> dict[str, Any]:
    """An accuracy (a mean of credits 0, 1/2, 1 over ``n`` pairs) as a count with its Wilson interval."""
    count = min(max(round(share * n * 2) / 2, 0.0), float(n)) if math.isfinite(share) else 0.0
    return accuracy_record(count, n)


def step_pair_ids(rows, cfg: TrainConfig, step: int, steps_per_epoch: int, world: int) -> list[str]:
    """The pair_ids a step trains on, over every micro-batch and process (no row is read)."""
    return [rows.pair_ids[i] for i in step_rows(len(rows), cfg, step, steps_per_epoch, world)]


def part_loaders(cache, paths) -> list:
    """One zero-argument reader per cache part (read when scored, not held)."""
    return [functools.partial(read_whole_part, cache, p) for p in paths]


def _cache_layout_sums(ctx: TrainContext, loaders, keep, draw: int = 0):
    """``pipeline.evaluation.preference.cache_layout_sums`` of the policy (eval mode, no dropout) on the cache's parts
    (``loaders``), in the cache's numerics and token budget; under FSDP through the wrapped scorer."""
    cfg, acc, model = ctx.cfg, ctx.placed.acc, ctx.placed.model
    was_training = model.training
    model.eval()
    try:
        return cache_layout_sums(ctx.placed.scorer if ctx.placed.fsdp else model, ctx.tokenizer,
                                 (load() for load in loaders), ctx.fingerprint, keep, beta=cfg.beta,
                                 batch_tokens=ctx.cache_batch_tokens,
                                 autocast=lambda: autocast(acc.device, cfg.mixed_precision),
                                 loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                 preference_weight=cfg.preference_weight, sft_weight=cfg.sft_total_weight, draw=draw)
    finally:
        model.train(was_training)  # no dropout above: the numbers measure the model, not a noisy copy of it
        if ctx.placed.fsdp:
            # FSDP keeps the root's weights gathered after a forward, for the backward that follows; a no-grad
            # forward has none, so they are resharded here (else the next save or step sees them gathered).
            for module in ctx.placed.scorer.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def start_check(ctx: TrainContext, cache, pair_ids: list[str]) -> tuple[float, dict[str, float]]:
    """Step 1's check of a policy that is the cache's model: ref/gap_max (largest |B_pi - B_ref|, nats) and
    step 1's rewards/... and logps/... statistics, from a no-grad pass over step 1's pairs (every process's)
    in the cache's own batch layout (of the parts that hold them, only the forward batches that hold their draw-0
    requests, as score-ref ran them: the cost of those pairs, not of their parts),
    so the cache's model gives gap 0 and rewards/accuracies 0.5 exactly, in any dtype. Every process scores
    the same parts (the same calls under FSDP) and gets the same numbers."""
    wanted = set(pair_ids)
    if not wanted:
        return 0.0, {}
    sums, gap = _cache_layout_sums(ctx, part_loaders(cache, cache_part_paths(cache, pair_ids=wanted)),
                                   lambda r: r[PAIR_ID_COLUMN] in wanted, draw=0)
    stats = heldout_metrics(sums)
    return gap, {k[len("eval/"):]: v for k, v in stats.items() if k != "eval/loss"}


def evaluate_heldout(ctx: TrainContext, loaders) -> dict[str, float]:
    """eval/... metrics of the policy on this process's share of the held-out parts (``loaders``), scored in
    the cache's batch layout (so the cache's model scores accuracy 0.5 exactly), reduced over processes."""
    acc, fsdp = ctx.placed.acc, ctx.placed.fsdp
    sums, _ = _cache_layout_sums(ctx, loaders, lambda r: row_split(r) == "eval" and responses_differ(r), draw=0)
    if acc.num_processes > 1 and not fsdp:  # under FSDP every process scored the whole split
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
    return heldout_metrics(sums)
