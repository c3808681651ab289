"""DPO against the reference-score cache, one model in memory: a recipe in torchtune's shape on accelerate's
primitives. ``setup`` checks the inputs and loads the cache, policy, optimizer and state (a fresh start's start
check, or a resume); ``train`` runs the optimizer steps (eval, checkpoints, metrics); ``save`` writes the final
model with its card and returns the run's result. ``run(cfg)`` does all three under the run folder's lock.

Not ``transformers.Trainer``: its loop draws each process's micro-batches from its own data loader and stops a
process whose loader is empty (``Trainer.get_batch_samples`` breaks on StopIteration), while accelerate's loader
pads a short share by repeating pairs (``even_batches``). Here a process the epoch's end leaves short or idle
still makes every collective the others make, and each pair is used once per epoch with the same weight as on
one process (tests/stages/test_train_uneven.py, test_an_epoch_uses_every_pair_once_and_never_wraps_round).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

from pipeline.core.errors import UserError
from pipeline.estimator.replay import PairBatch
from pipeline.models import MaskedRowScorer, load
from pipeline.models.numerics import accelerate_override_note
from pipeline.refcache.reader import cache_part_paths, open_cache
from pipeline.trainer import dpo_checks as checks
from pipeline.trainer import session
from pipeline.trainer.accelerator import peak_memory_bytes
from pipeline.trainer.batching import micro_batch_rows, step_pair_count
from pipeline.trainer.checkpoint import checkpoint_dir
from pipeline.trainer.dpo_config import RESUME_FREE, TrainConfig, TrainResult
from pipeline.trainer.dpo_step import TrainContext, micro_step, step_metrics


class DPORecipe(session.Recipe):
    stage, resume_free = "train", RESUME_FREE

    def __init__(self, cfg: TrainConfig, check_memory=None):
        super().__init__(cfg)
        self.phase_seconds = {"setup": 0.0, "start_check": 0.0}  # the check's 0 when a run has none (resume, online)
        self.check_memory = check_memory
        self.gap, self.start_stats = float("nan"), {}
        self.best: dict[str, Any] = {"best_metric": None, "best_model_checkpoint": None}
        self.last_eval: dict[str, Any] = {}
        self.intervals: dict[str, Any] = {}

    # --- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before step 1; refuses what it can before any model loads."""
        self._setup_inputs()
        self._setup_model()
        self._setup_state()

    def _setup_inputs(self) -> None:
        cfg = self.cfg
        self.open_run()
        self.cache = cache = open_cache(cfg.scores)
        self.fp = cache.fingerprint
        self.model_name = cfg.model or cache.manifest.reference_model
        checks.check_init(cfg, cache, self.model_name)
        self.rows, self.eval_rows = checks.check_cache_inputs(cfg, cache)
        self.cfg, self.numerics, self.cached_numerics = checks.resolve_numerics(cfg, cache)
        # the checkpoint's recorded settings (and the run folder's) must be this run's, numerics resolved
        self.resume_ckpt = self.resume_source() if cfg.resume else None

    def _setup_model(self) -> None:
        self.make_accelerator()
        cfg, fp, acc = self.cfg, self.fp, self.acc
        if (note := accelerate_override_note(cfg.mixed_precision, str(cfg.scores))) and acc.is_main_process:
            print(note, file=sys.stderr, flush=True)
        self.count_steps(len(self.rows))
        self.reused_draws = checks.check_draws(cfg, checks.epochs_needed(len(self.rows), cfg, self.world),
                                               self.cache.manifest.draws)
        # data parallel keeps a whole model per process; FSDP's shape differs
        if cfg.plan and not self.fsdp and self.check_memory is not None:
            checks.plan_start(cfg, self.model_name, self.rows, fp, acc.device, self.check_memory)
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = checks.setup_policy(cfg, self.model_name, acc.device, self.numerics)
        checks.check_tokenizer(cfg, self.cache, self.tokenizer)
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise UserError(f"model '{self.model_name}': tokenizer needs mask and pad tokens")
        ref_model = self._online_reference_model()
        self.prepare(model)
        # the step's context, built once: the accelerator, policy and wrapper it uses are this recipe's own
        self.ctx = TrainContext(cfg, self, self.tokenizer, fp, ref_model,
                                cache_batch_tokens=self.cache.manifest.batch_tokens)

    def _online_reference_model(self):
        """``reference: online``'s live reference (None: cached terms, or under LoRA the base with adapters off,
        unless the policy started elsewhere)."""
        cfg, ref_name = self.cfg, self.cache.manifest.reference_model
        if cfg.reference != "online" or (cfg.lora_r > 0 and self.model_name == ref_name):
            return None
        ref_model, _ = load(ref_name, self.numerics, self.acc.device, trust_remote_code=cfg.trust_remote_code)
        ref_model.eval().requires_grad_(False)
        # FSDP: sharded like the policy, inside its own scorer (the same memory shape)
        return fsdp2_prepare_model(self.acc, MaskedRowScorer(ref_model)) if self.fsdp else ref_model

    def _setup_state(self) -> None:
        """The start check (a fresh run from the cache's model) or the resume; the folder, config and logs."""
        cfg, acc = self.cfg, self.acc
        if not cfg.resume and cfg.reference == "cached" and checks.same_model(self.cache, self.model_name):
            # The policy IS the cache's model: it must reproduce the cached terms before it learns anything.
            pair_ids = checks.step_pair_ids(self.rows, cfg, 0, self.steps_per_epoch, self.world)
            self.end_phase("setup")
            self.gap, self.start_stats = checks.start_check(self.ctx, self.cache, pair_ids)
            self.end_phase("start_check")
            if cfg.gap_threshold > 0 and cfg.beta * self.gap > cfg.gap_threshold:
                raise checks.gap_error(cfg, self.gap, self.numerics, self.cached_numerics)
        self.set_layout(scores_digest=self.cache.manifest.digest)  # the cache by content
        if self.resume_ckpt is not None:
            state = self.resume(self.resume_ckpt)
            self.best = {k: state.get(k) for k in self.best}
        self.open_log()
        # Held-out pairs are scored in the cache's layout, whole parts: under data parallel each process scores
        # its share of the parts (the sums all-reduced); under FSDP (every forward a collective) all of them.
        parts = [] if not self.eval_rows else checks.part_loaders(self.cache, cache_part_paths(self.cache,
                                                                                               split="eval"))
        self.eval_share = parts if self.fsdp else parts[acc.process_index::self.world]

    # --- train ------------------------------------------------------------------------------------------------

    def train_step(self, step: int, saving: bool) -> bool:
        """One optimizer step over every micro-batch of this process, its eval and log; returns whether it is a
        new best (a checkpoint follows)."""
        cfg, ctx = self.cfg, self.ctx
        ctx.step, t0 = step, time.perf_counter()
        # Each pair weighs the same within a step, also when the epoch's end leaves short (or no) micro-batches
        # on some processes: DDP and FSDP average gradients over processes, hence the factor world.
        step_pairs = max(1, step_pair_count(len(self.rows), cfg, step, self.steps_per_epoch, self.world))
        micro = []
        for i in range(cfg.grad_accum):
            epoch, rows = micro_batch_rows(self.rows, cfg, step, i, self.steps_per_epoch, self.world,
                                           self.acc.process_index)
            batch = PairBatch(rows, draw=epoch % self.cache.manifest.draws)  # the cached masks of this epoch's draw
            micro.append(micro_step(ctx, batch, len(rows) * self.world / step_pairs, sync=i == cfg.grad_accum - 1))
        lr, grad_norm = self.optimizer_step()
        means = step_metrics(self.acc, micro)
        row = {"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "loss": means["loss"],
               **{k: v for k, v in means.items() if k not in ("loss", "tokens")},
               "learning_rate": lr, "grad_norm": grad_norm,
               "tokens_per_second": means["tokens"] / max(time.perf_counter() - t0, 1e-9),
               "peak_memory_bytes": peak_memory_bytes(self.acc.device)}
        if step == 0:
            row["ref/gap_max"] = self.gap
            row.update(self.start_stats)  # step 1's statistics of the policy before its update, in the cache's layout
        if self.reused_draws:
            row["masks/reused"] = float(step // self.steps_per_epoch >= self.cache.manifest.draws)
        evaluated = bool(cfg.eval_every) and (step + 1) % cfg.eval_every == 0
        new_best = self._evaluate(step, row) if evaluated else False
        self.last = row
        self.intervals["rewards/accuracies"] = checks.accuracy_of(row["rewards/accuracies"], step_pairs)
        self.bar.step(row["loss"])
        if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps or evaluated:
            self.log(row)
        return new_best

    def _evaluate(self, step: int, row: dict[str, Any]) -> bool:
        """eval/... into ``row``; returns whether it is a new best (save_best; the first best is kept on ties)."""
        row.update(checks.evaluate_heldout(self.ctx, self.eval_share))
        self.last_eval = {"step": step + 1, "metrics": {k: v for k, v in row.items() if k.startswith("eval/")}}
        score = row["eval/rewards/accuracies"]
        self.intervals["eval/rewards/accuracies"] = checks.accuracy_of(score, len(self.eval_rows))
        new_best = self.cfg.save_best and (self.best["best_metric"] is None or score > self.best["best_metric"])
        if new_best:
            self.best = {"best_metric": score, "best_model_checkpoint": str(checkpoint_dir(self.cfg.out, step + 1))}
        return new_best

    def save_checkpoint(self, step: int, protect=(), **state) -> None:
        """checkpoint-N with the best so far; the best one is never rotated."""
        best = self.best["best_model_checkpoint"]
        super().save_checkpoint(step, [Path(best)] if best else [], **self.best, **state)

    # --- save -------------------------------------------------------------------------------------------------

    def save(self) -> TrainResult:
        """The final model (full weights or the LoRA adapter) with its model card; every process calls this."""
        card = checks.train_card(self.cfg, self.model_name, self.fp, len(self.rows), self.last, self.last_eval,
                                 len(self.eval_rows))
        if self.acc.is_main_process:
            for line in checks.interval_warnings(self.intervals):
                print(line, file=sys.stderr)
        return TrainResult(**self.save_final(
            card, final_reward_accuracy=float(self.last.get("rewards/accuracies", float("nan"))),
            best_checkpoint=self.best["best_model_checkpoint"], best_metric=self.best["best_metric"],
            intervals=self.intervals))


def run(cfg: TrainConfig, check_memory=None) -> TrainResult:
    """setup, train, save, holding the run folder's lock (a second train into it refuses, naming the first).
    ``check_memory(cfg, samples, length, prompt_length, device)``: the memory plan checked before the policy
    loads (``lldm-dpo train`` passes lldm-dpo plan's; None skips it)."""
    return DPORecipe(cfg, check_memory).run()
