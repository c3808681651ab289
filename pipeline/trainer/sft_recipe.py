"""Masked-diffusion SFT, LLaDA's objective (pipeline/sft.py), as a recipe in the DPO recipe's shape: ``setup``
(data, model, optimizer, resume), ``train`` (the loop), ``save`` (the final model and its card). The run folder,
accelerator, trackers, metrics log, optimizer step, resume and checkpoints are the DPO recipe's
(pipeline/trainer/session.py).

Each sequence draws t ~ U(eps, 1] and masks its response tokens independently with probability t (the prompt
never); the loss is the cross-entropy of the masked tokens divided by t, summed and divided by the response
length, averaged over the step's sequences. Masks are seeded by (seed, example, epoch), the data order by
(seed, epoch): a run is deterministic and a resumed run is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.layout import FINAL_DIR, METRICS_FILE
from pipeline.trainer import session
from pipeline.trainer.sft_config import RESUME_FREE, SFTConfig, SFTResult
from pipeline.training import epoch_order, micro_batch_rows, peak_memory_bytes, reset_peak_memory, step_pair_count


def load_start(cfg: SFTConfig, device):
    """(model, tokenizer): a preset name is a fresh model seeded by cfg.seed, anything else loads."""
    from pipeline.models.presets import PRESETS

    if cfg.model in PRESETS and not Path(cfg.model).is_dir():
        if cfg.lora_r > 0 or cfg.load_in_4bit:
            raise UserError(f"--model {cfg.model}: a preset name is a randomly initialised model (training from "
                            "scratch); LoRA adapts a trained one: pass a model folder (lldm-dpo init-model writes one)")
        from pipeline.models import build_preset, preset_tokenizer

        return build_preset(cfg.model, device=device, dtype=cfg.dtype, seed=cfg.seed), preset_tokenizer(cfg.model)
    from pipeline.numerics import Numerics, load

    return load(cfg.model, Numerics(cfg.dtype, cfg.mixed_precision, cfg.load_in_4bit), device,
                trust_remote_code=cfg.trust_remote_code)


class SFTRecipe:
    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.start_time = time.perf_counter()
        self.start_step, self.resumed_from, self.num_tokens = 0, None, 0
        self.last: dict[str, Any] = {}
        self._order: tuple[int, list[int]] = (-1, [])

    # --- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        session.prepare_run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        self.trackers = session.resolve_report_to(cfg)
        self.acc = acc = session.make_accelerator(cfg, self.trackers, "sft")
        if acc.distributed_type.name == "FSDP":
            raise UserError("sft under FSDP is not supported yet; use data parallel (accelerate launch --multi_gpu)")
        self.world = acc.num_processes
        self._setup_model()
        self.layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": self.world,
                       "total_steps": self.total_steps, "seed": cfg.seed, "lora_r": cfg.lora_r, "optim": cfg.optim,
                       "mask_eps": cfg.mask_eps, "data_sha256": self.data_sha256}
        if cfg.resume:  # the checkpoint-N folder (resume_from_checkpoint), its recorded settings this run's
            ckpt = session.resume_source(cfg, RESUME_FREE)
            state = session.resume_state(ckpt, self.layout, self.world, model=self.model, wrapped=self.wrapped,
                                         optimizer=self.optimizer, scheduler=self.scheduler, accelerator=acc)
            self.start_step = self.resumed_from = int(state["step"])
            self.num_tokens = int(state.get("num_tokens", 0))
        session.start_run(cfg, acc)
        self.log = session.RunLog(cfg, acc, self.trackers, self.total_steps, self.start_step, self.resumed_from,
                                  "sft")

    def _setup_model(self) -> None:
        from pipeline.prompts import resolve_chat_template
        from pipeline.sftdata import examples_digest, load_examples
        from pipeline.training import adapt_policy, make_optimizer, make_scheduler

        cfg, acc = self.cfg, self.acc
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_start(cfg, acc.device)
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise UserError(f"model '{cfg.model}': tokenizer needs mask and pad tokens")
        longest = getattr(model.config, "max_sequence_length", None)
        if longest is not None and cfg.max_length > longest:
            raise UserError(f"--max-length {cfg.max_length} exceeds the model's max_sequence_length {longest}")
        chat = resolve_chat_template(self.tokenizer, cfg.chat_template)
        self.examples = load_examples(cfg.data, self.tokenizer, max_length=cfg.max_length, chat_template=chat,
                                      pad_to=cfg.pad_response_to)
        self.data_sha256 = examples_digest(self.examples)
        self.model = adapt_policy(model, cfg)
        optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.steps_per_epoch, self.total_steps = session.step_counts(len(self.examples), cfg, self.world)
        self.scheduler = make_scheduler(optimizer, cfg, self.total_steps)  # stepped by hand: once per step
        self.wrapped, self.optimizer, self.params = session.prepare_model(acc, self.model, optimizer,
                                                                          distributed=self.world > 1)

    # --- train ------------------------------------------------------------------------------------------------

    @property
    def scorer(self):
        return self.model if self.wrapped is None else self.wrapped

    def order(self, epoch: int) -> list[int]:
        """The epoch's data order (train's: a pure function of seed and epoch), computed once per epoch."""
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), self.cfg.seed, epoch))
        return self._order[1]

    def train(self) -> None:
        cfg, acc = self.cfg, self.acc
        reset_peak_memory(acc.device)
        window = [0.0, 0, 0, time.perf_counter()]  # loss sum, sequences, tokens since the last log; its start
        for step in range(self.start_step, self.total_steps):
            rows = max(1, step_pair_count(len(self.examples), cfg, step, self.steps_per_epoch, self.world))
            for micro in range(cfg.grad_accum):
                loss_sum, n, tokens = self._micro_step(step, micro, rows)
                window[0] += loss_sum
                window[1] += n
                window[2] += tokens
            lr, grad_norm = session.optimizer_step(acc, self.params, self.optimizer, self.scheduler,
                                                   cfg.max_grad_norm)
            self.log.bar.step()
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps
            saving = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < self.total_steps
            if logged or saving:
                self._log_window(step, window, lr, grad_norm)
                window = [0.0, 0, 0, time.perf_counter()]
            if saving:
                self._save_checkpoint(step + 1)
                window[3] = time.perf_counter()  # the save is not training time

    def _log_window(self, step: int, window: list, lr: float, grad_norm: float) -> None:
        """The loss is the mean over the window's sequences; reduced over processes at log time only."""
        sums = torch.tensor(window[:3], dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        loss_sum, n, tokens = sums.tolist()
        self.num_tokens += int(tokens)
        seconds = time.perf_counter() - window[3]
        self.last = {"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "loss": loss_sum / max(n, 1),
                     "learning_rate": lr, "grad_norm": grad_norm, "num_tokens": self.num_tokens,
                     "tokens_per_second": tokens / max(seconds, 1e-9),
                     "peak_memory_bytes": peak_memory_bytes(self.acc.device)}
        self.log.log(self.last)

    def _micro_step(self, step: int, micro: int, scale_rows: int) -> tuple[float, int, int]:
        """Forward and backward of one micro-batch; returns (sum of sequence losses, sequences, tokens)."""
        from pipeline.sft import collate, draw_masks, sft_loss

        cfg, acc, world = self.cfg, self.acc, self.world
        epoch, rows = micro_batch_rows(range(len(self.examples)), cfg, step, micro, self.steps_per_epoch, world,
                                       acc.process_index, order=self.order(step // self.steps_per_epoch))
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if self.wrapped is None or last else acc.no_sync(self.wrapped):
            if not rows:  # the epoch's end left this process nothing: a zero-weighted pass joins the others' sync
                self._idle_pass(step)
                return 0.0, 0, 0
            batch = collate([(self.examples[i].prompt_ids, self.examples[i].response_ids) for i in rows],
                            self.tokenizer.pad_token_id)
            t, mask = draw_masks(batch, rows, seed=cfg.seed, epoch=epoch, eps=cfg.mask_eps)
            with acc.autocast():
                losses = sft_loss(self.scorer, batch, t, mask, self.tokenizer.mask_token_id)
            total = losses.sum()
            self._check_finite(step, total, rows)
            # Each sequence weighs the same in a step: DDP averages over processes, hence the factor world.
            acc.backward(total * (world / scale_rows))
        return float(total.detach()), len(rows), int(batch.attention_mask.sum())

    def _idle_pass(self, step: int) -> None:
        with self.acc.autocast():
            zero = session.pad_probe(self.scorer, self.tokenizer.pad_token_id, self.acc.device)
        if self.world > 1:
            session.stop_with_others(self.acc, False, step)
        self.acc.backward(0.0 * zero)

    def _check_finite(self, step: int, total: torch.Tensor, rows) -> None:
        bad = not bool(torch.isfinite(total))
        if self.world > 1:
            session.stop_with_others(self.acc, bad, step)
        if bad:
            raise UserError(f"step {step + 1}: loss is not finite ({float(total)}) on "
                            f"{', '.join(self.examples[i].source for i in rows[:3])}; nothing was saved for this "
                            "step (try a lower --learning-rate or --mixed-precision no)")

    def _save_checkpoint(self, step: int) -> None:
        """checkpoint-N: a model folder, trainer_state.json and the resume state."""
        session.save_step_checkpoint(
            self.cfg, self.acc, self.log, step, model=self.model, wrapped=self.wrapped, optimizer=self.optimizer,
            scheduler=self.scheduler, tokenizer=self.tokenizer, base_name=self.cfg.model,
            state={"epoch": step / self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                   "layout": self.layout, "num_tokens": self.num_tokens})

    # --- save -------------------------------------------------------------------------------------------------

    def save(self) -> SFTResult:
        from pipeline.checkpoint import save_model_dir

        cfg = self.cfg
        self.acc.wait_for_everyone()
        self.log.flush()
        save_model_dir(cfg.out / FINAL_DIR, self.model, self.tokenizer, self.acc, base_name=cfg.model,
                       card=sft_card(cfg, self.data_sha256, len(self.examples), self.last))
        session.push_final(cfg, self.acc, "sft")
        return SFTResult(
            steps=self.total_steps, epochs_seen=self.total_steps / self.steps_per_epoch,
            examples=len(self.examples), truncated=sum(ex.truncated for ex in self.examples),
            final_loss=float(self.last.get("loss", float("nan"))), num_tokens=self.num_tokens,
            seconds=time.perf_counter() - self.start_time, out=str(cfg.out), final_model=str(cfg.out / FINAL_DIR),
            metrics=str(cfg.out / METRICS_FILE), resumed_from=self.resumed_from)

    def close(self) -> None:
        if getattr(self, "log", None) is not None:
            self.log.close()


def sft_card(cfg: SFTConfig, data_sha256: str, n_examples: int, last: dict[str, Any]) -> str:
    from pipeline.config import config_to_dict
    from pipeline.model_card import model_card

    data = {"training data": str(cfg.data), "examples sha256": data_sha256, "examples": n_examples}
    return model_card(stage="sft", base_model=cfg.model, lora=cfg.lora_r > 0, data=data,
                      settings=config_to_dict(cfg), metrics=last)


def run(cfg: SFTConfig) -> SFTResult:
    """setup, train, save, holding the run folder's lock (as train does)."""
    return session.run_recipe(SFTRecipe(cfg), "sft")
