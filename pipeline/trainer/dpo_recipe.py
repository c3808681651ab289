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

import time
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.layout import FINAL_DIR, METRICS_FILE
from pipeline.replay import PairBatch, cache_part_paths
from pipeline.trainer import dpo_checks as checks
from pipeline.trainer import session
from pipeline.trainer.dpo_config import RESUME_FREE, TrainConfig, TrainResult
from pipeline.trainer.dpo_step import TrainContext, micro_step, step_metrics
from pipeline.training import micro_batch_rows, peak_memory_bytes, reset_peak_memory, step_pair_count


class DPORecipe:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.start_time = time.perf_counter()
        self.gap, self.start_stats = float("nan"), {}
        self.best: dict[str, Any] = {"best_metric": None, "best_model_checkpoint": None}
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.intervals: dict[str, Any] = {}
        self.start_step, self.resumed_from = 0, None

    # --- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before step 1; refuses what it can before any model loads."""
        self._setup_inputs()
        self._setup_model()
        self._setup_state()

    def _setup_inputs(self) -> None:
        from pipeline.cache import open_cache
        from pipeline.devices import resolve_device

        cfg = self.cfg
        session.prepare_run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        resolve_device(cfg.device)  # an unavailable --device is an error here too, never a silent CPU run
        self.cache = cache = open_cache(cfg.scores)
        self.fp = cache.fingerprint
        self.model_name = cfg.model or cache.manifest["config"]["model"]
        checks.check_init(cfg, cache, self.model_name)
        self.rows, self.eval_rows = checks.check_cache_inputs(cfg, cache)
        self.trackers = session.resolve_report_to(cfg)
        cfg, self.numerics, self.cached_numerics = checks.resolve_numerics(cfg, cache)
        if cfg.resume:  # the checkpoint's recorded settings (and the run folder's) must be this run's
            self.resume_ckpt = session.resume_source(cfg, RESUME_FREE)
        self.cfg = cfg

    def _setup_model(self) -> None:
        import sys

        from pipeline.numerics import accelerate_override_note
        from pipeline.training import make_optimizer, make_scheduler

        cfg, fp = self.cfg, self.fp
        self.acc = acc = session.make_accelerator(cfg, self.trackers, "train")
        if (note := accelerate_override_note(cfg.mixed_precision, str(cfg.scores))) and acc.is_main_process:
            print(note, file=sys.stderr, flush=True)
        self.fsdp, self.world = acc.distributed_type.name == "FSDP", acc.num_processes
        self.steps_per_epoch, self.total_steps = session.step_counts(len(self.rows), cfg, self.world)
        self.reused_draws = checks.check_draws(cfg, checks.epochs_needed(len(self.rows), cfg, self.world),
                                               fp["draws"])
        if cfg.plan and not self.fsdp:  # data parallel keeps a whole model per process; FSDP's shape differs
            checks.plan_start(cfg, self.model_name, self.rows, fp, acc.device)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = checks.setup_policy(cfg, self.model_name, acc.device, self.numerics)
        checks.check_tokenizer(cfg, self.cache, self.tokenizer)
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise UserError(f"model '{self.model_name}': tokenizer needs mask and pad tokens")
        ref_model = self._online_reference_model()
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.wrapped, self.optimizer, self.params = session.prepare_model(
            acc, self.model, self.optimizer, distributed=self.world > 1 or self.fsdp)
        self.ctx = TrainContext(cfg, self.model, self.tokenizer, acc, fp, ref_model, wrapped=self.wrapped,
                                fsdp=self.fsdp, cache_batch_tokens=int(self.cache.manifest.get("config", {})
                                                                       .get("batch_tokens", 16384)))

    def _online_reference_model(self):
        """``reference: online``'s live reference (None: cached terms, or under LoRA the base with adapters off,
        unless the policy started elsewhere)."""
        cfg, ref_name = self.cfg, self.cache.manifest["config"]["model"]
        if cfg.reference != "online" or (cfg.lora_r > 0 and self.model_name == ref_name):
            return None
        from pipeline.numerics import load

        ref_model, _ = load(ref_name, self.numerics, self.acc.device, trust_remote_code=cfg.trust_remote_code)
        ref_model.eval().requires_grad_(False)
        return checks.shard_frozen(self.acc, ref_model) if self.fsdp else ref_model  # FSDP: same memory shape

    def _setup_state(self) -> None:
        """The start check (a fresh run from the cache's model) or the resume; the folder, config and logs."""
        cfg, acc = self.cfg, self.acc
        if not cfg.resume and cfg.reference == "cached" and checks.same_model(self.cache, self.model_name):
            # The policy IS the cache's model: it must reproduce the cached terms before it learns anything.
            pair_ids = checks.step_pair_ids(self.rows, cfg, 0, self.steps_per_epoch, self.world)
            self.gap, self.start_stats = checks.start_check(self.ctx, self.cache, pair_ids)
            if cfg.gap_threshold > 0 and cfg.beta * self.gap > cfg.gap_threshold:
                raise checks.gap_error(cfg, self.gap, self.numerics, self.cached_numerics)
        self.layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": self.world,
                       "total_steps": self.total_steps, "seed": cfg.seed, "lora_r": cfg.lora_r, "optim": cfg.optim,
                       "scores_digest": self.cache.manifest.get("fingerprint_digest")}  # the cache by content
        if cfg.resume:  # the checkpoint-N folder resume_source found
            state = session.resume_state(self.resume_ckpt, self.layout, self.world, model=self.model, wrapped=self.wrapped,
                                         optimizer=self.optimizer, scheduler=self.scheduler, accelerator=acc)
            self.start_step = self.resumed_from = int(state["step"])
            self.best = {k: state.get(k) for k in self.best}
        session.start_run(cfg, acc)
        self.log = session.RunLog(cfg, acc, self.trackers, self.total_steps, self.start_step, self.resumed_from,
                                  "train")
        # Held-out pairs are scored in the cache's layout, whole parts: under data parallel each process scores
        # its share of the parts (the sums all-reduced); under FSDP (every forward a collective) all of them.
        parts = [] if not self.eval_rows else checks.part_loaders(self.cache, cache_part_paths(self.cache,
                                                                                               split="eval"))
        self.eval_share = parts if self.fsdp else parts[acc.process_index::self.world]

    # --- train ------------------------------------------------------------------------------------------------

    def train(self) -> None:
        """The optimizer steps from ``start_step`` (0, or the resumed checkpoint's)."""
        reset_peak_memory(self.acc.device)
        for step in range(self.start_step, self.total_steps):
            row, step_pairs = self._train_step(step)
            evaluated = bool(self.cfg.eval_every) and (step + 1) % self.cfg.eval_every == 0
            new_best = self._evaluate(step, row) if evaluated else False
            self.last = row
            self.intervals["rewards/accuracies"] = checks.accuracy_of(row["rewards/accuracies"], step_pairs)
            self.log.bar.step(row["loss"])
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total_steps or evaluated:
                self.log.log(row)
            every = self.cfg.save_every and (step + 1) % self.cfg.save_every == 0 and step + 1 < self.total_steps
            if new_best or every:
                self._save_checkpoint(step + 1)

    def _train_step(self, step: int) -> tuple[dict[str, Any], int]:
        """One optimizer step over every micro-batch of this process; returns its metrics row and pair count."""
        cfg, ctx = self.cfg, self.ctx
        ctx.step, t0 = step, time.perf_counter()
        # Each pair weighs the same within a step, also when the epoch's end leaves short (or no) micro-batches
        # on some processes: DDP and FSDP average gradients over processes, hence the factor world.
        step_pairs = max(1, step_pair_count(len(self.rows), cfg, step, self.steps_per_epoch, self.world))
        micro = []
        for i in range(cfg.grad_accum):
            epoch, rows = micro_batch_rows(self.rows, cfg, step, i, self.steps_per_epoch, self.world,
                                           self.acc.process_index)
            batch = PairBatch(rows, draw=epoch % self.fp["draws"])  # the cached masks of this epoch's draw
            micro.append(micro_step(ctx, batch, len(rows) * self.world / step_pairs, sync=i == cfg.grad_accum - 1))
        lr, grad_norm = session.optimizer_step(self.acc, self.params, self.optimizer, self.scheduler,
                                               cfg.max_grad_norm)
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
            row["masks/reused"] = float(step // self.steps_per_epoch >= self.fp["draws"])
        return row, step_pairs

    def _evaluate(self, step: int, row: dict[str, Any]) -> bool:
        """eval/... into ``row``; returns whether it is a new best (save_best; the first best is kept on ties)."""
        from pipeline.checkpoint import checkpoint_dir

        row.update(checks.evaluate_heldout(self.ctx, self.eval_share))
        self.last_eval = {"step": step + 1, "metrics": {k: v for k, v in row.items() if k.startswith("eval/")}}
        score = row["eval/rewards/accuracies"]
        self.intervals["eval/rewards/accuracies"] = checks.accuracy_of(score, len(self.eval_rows))
        new_best = self.cfg.save_best and (self.best["best_metric"] is None or score > self.best["best_metric"])
        if new_best:
            self.best = {"best_metric": score, "best_model_checkpoint": str(checkpoint_dir(self.cfg.out, step + 1))}
        return new_best

    def _save_checkpoint(self, step: int) -> None:
        """checkpoint-N (a model folder, trainer_state.json, the resume state); the best one is never rotated."""
        from pathlib import Path

        best = self.best["best_model_checkpoint"]
        session.save_step_checkpoint(
            self.cfg, self.acc, self.log, step, protect=[Path(best)] if best else [], model=self.model,
            wrapped=self.wrapped, optimizer=self.optimizer, scheduler=self.scheduler, tokenizer=self.tokenizer,
            base_name=self.model_name, state={"epoch": step / self.steps_per_epoch,
                                              "steps_per_epoch": self.steps_per_epoch, "layout": self.layout,
                                              **self.best})

    # --- save -------------------------------------------------------------------------------------------------

    def save(self) -> TrainResult:
        """The final model (full weights or the LoRA adapter) with its model card; every process calls this."""
        from pipeline.checkpoint import save_model_dir

        cfg = self.cfg
        self.acc.wait_for_everyone()
        self.log.flush()
        card = checks.train_card(cfg, self.model_name, self.fp, len(self.rows), self.last, self.last_eval,
                                 len(self.eval_rows))
        save_model_dir(cfg.out / FINAL_DIR, self.model, self.tokenizer, self.acc, base_name=self.model_name,
                       card=card)
        session.push_final(cfg, self.acc, "train")
        return TrainResult(
            steps=self.total_steps, epochs_seen=self.total_steps / self.steps_per_epoch,
            final_loss=float(self.last.get("loss", float("nan"))),
            final_reward_accuracy=float(self.last.get("rewards/accuracies", float("nan"))),
            seconds=time.perf_counter() - self.start_time, out=str(cfg.out), final_model=str(cfg.out / FINAL_DIR),
            metrics=str(cfg.out / METRICS_FILE), resumed_from=self.resumed_from,
            best_checkpoint=self.best["best_model_checkpoint"], best_metric=self.best["best_metric"],
            intervals=self.intervals)

    def close(self) -> None:
        if getattr(self, "log", None) is not None:
            self.log.close()


def run(cfg: TrainConfig) -> TrainResult:
    """setup, train, save, holding the run folder's lock (a second train into it refuses, naming the first)."""
    return session.run_recipe(DPORecipe(cfg), "train")
