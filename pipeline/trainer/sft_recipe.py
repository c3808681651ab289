"""Masked-diffusion SFT, LLaDA's objective (pipeline/estimator/sft_objective.py), as a recipe in the DPO recipe's shape: ``setup``
(data, model, optimizer, resume), ``train_step`` (one optimizer step), ``save`` (the final model and its card). The
run folder, accelerator, trackers, data-parallel or FSDP wrapping, metrics log, step loop, optimizer step, resume,
checkpoints and final model are the DPO recipe's (pipeline/trainer/session.py's ``Recipe``).

Each sequence draws t ~ U(eps, 1] and masks its response tokens independently with probability t (the prompt
never); the loss is the cross-entropy of the masked tokens divided by t, summed and divided by the response
length, averaged over the step's sequences. Masks are seeded by (seed, example, epoch), the data order by
(seed, epoch): a run is deterministic and a resumed run is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.core.config import config_to_dict
from pipeline.core.errors import UserError
from pipeline.data.prompts import resolve_chat_template
from pipeline.data.sftdata import examples_digest, load_examples
from pipeline.estimator.sft_objective import collate, draw_masks, sft_loss
from pipeline.models import load
from pipeline.models.numerics import config_numerics
from pipeline.models.presets import is_preset
from pipeline.trainer import session
from pipeline.trainer.accelerator import peak_memory_bytes
from pipeline.trainer.batching import micro_batch_rows, step_pair_count
from pipeline.trainer.model_card import model_card
from pipeline.trainer.policy import adapt_policy
from pipeline.trainer.sft_config import RESUME_FREE, SFTConfig, SFTResult


def load_start(cfg: SFTConfig, device):
    """(model, tokenizer) as ``pipeline.models.load`` gives it: a preset name is a fresh model seeded by cfg.seed
    (training from scratch, so no LoRA and no 4-bit base), anything else loads."""
    if is_preset(cfg.model) and (cfg.lora_r > 0 or cfg.load_in_4bit):
        raise UserError(f"--model {cfg.model}: a preset name is a randomly initialised model (training from "
                        "scratch); LoRA adapts a trained one: pass a model folder (lldm-dpo init-model writes one)")
    return load(cfg.model, config_numerics(cfg), device,
                trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)


class SFTRecipe(session.Recipe):
    stage, resume_free = "sft", RESUME_FREE

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg)
        self.num_tokens, self.model_name = 0, cfg.model

    # --- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.open_run()
        ckpt = self.resume_source() if cfg.resume else None  # the checkpoint-N folder, its settings this run's
        self.make_accelerator()
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_start(cfg, self.acc.device)
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise UserError(f"model '{cfg.model}': tokenizer needs mask and pad tokens")
        longest = getattr(model.config, "max_sequence_length", None)
        if longest is not None and cfg.max_length > longest:
            raise UserError(f"--max-length {cfg.max_length} exceeds the model's max_sequence_length {longest}")
        chat = resolve_chat_template(self.tokenizer, cfg.chat_template)
        self.examples = load_examples(cfg.data, self.tokenizer, max_length=cfg.max_length, chat_template=chat,
                                      pad_to=cfg.pad_response_to)
        self.data_sha256 = examples_digest(self.examples)
        self.count_steps(len(self.examples))
        self.prepare(adapt_policy(model, cfg))
        self.set_layout(mask_eps=cfg.mask_eps, data_sha256=self.data_sha256)
        if ckpt is not None:
            self.num_tokens = int(self.resume(ckpt).get("num_tokens", 0))
        self.open_log()
        self.window_start = time.perf_counter()
        self.window = [0.0, 0, 0]  # loss sum, sequences, tokens since the last log

    # --- train ------------------------------------------------------------------------------------------------

    def train_step(self, step: int, saving: bool) -> bool:
        cfg = self.cfg
        rows = max(1, step_pair_count(len(self.examples), cfg, step, self.steps_per_epoch, self.world))
        for micro in range(cfg.grad_accum):
            self.window = [a + b for a, b in zip(self.window, self._micro_step(step, micro, rows))]
        lr, grad_norm = self.optimizer_step()
        self.bar.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps or saving:
            self._log_window(step, lr, grad_norm)
        return False

    def _log_window(self, step: int, lr: float, grad_norm: float) -> None:
        """The loss is the mean over the window's sequences; reduced over processes at log time only."""
        sums = torch.tensor(self.window, dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        loss_sum, n, tokens = sums.tolist()
        self.num_tokens += int(tokens)
        seconds = time.perf_counter() - self.window_start
        self.last = {"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "loss": loss_sum / max(n, 1),
                     "learning_rate": lr, "grad_norm": grad_norm, "num_tokens": self.num_tokens,
                     "tokens_per_second": tokens / max(seconds, 1e-9),
                     "peak_memory_bytes": peak_memory_bytes(self.acc.device)}
        self.log(self.last)
        self.window, self.window_start = [0.0, 0, 0], time.perf_counter()

    def _micro_step(self, step: int, micro: int, scale_rows: int) -> tuple[float, int, int]:
        """Forward and backward of one micro-batch; returns (sum of sequence losses, sequences, tokens). Every
        process makes one forward and one backward of the scorer, also an idle one, so FSDP's gathers match."""
        cfg, acc, world = self.cfg, self.acc, self.world
        epoch, rows = micro_batch_rows(range(len(self.examples)), cfg, step, micro, self.steps_per_epoch, world,
                                       acc.process_index)
        with self.sync_context(micro == cfg.grad_accum - 1):
            if not rows:  # the epoch's end left this process nothing: a zero-weighted pass joins the others' sync
                self._idle_pass(step)
                return 0.0, 0, 0
            batch = collate([(self.examples[i].prompt_ids, self.examples[i].response_ids) for i in rows],
                            self.tokenizer.pad_token_id)
            t, mask = draw_masks(batch, rows, seed=cfg.seed, epoch=epoch, eps=cfg.mask_eps)
            with acc.autocast():
                losses = sft_loss(self.scorer, batch, t, mask, self.tokenizer.mask_token_id)
            total = losses.sum()
            session.check_finite(acc, self.wrapped is not None, total, step,
                                 ", ".join(self.examples[i].source for i in rows[:3]))
            # Each sequence weighs the same in a step: DDP and FSDP average over processes, hence the factor world.
            acc.backward(total * (world / scale_rows))
        return float(total.detach()), len(rows), int(batch.attention_mask.sum())

    def _idle_pass(self, step: int) -> None:
        with self.acc.autocast():
            zero = session.pad_probe(self.scorer, self.tokenizer.pad_token_id, self.acc.device)
        session.check_finite(self.acc, self.wrapped is not None, torch.zeros(()), step, "")
        self.acc.backward(0.0 * zero)

    def save_checkpoint(self, step: int, protect=(), **state) -> None:
        super().save_checkpoint(step, protect, num_tokens=self.num_tokens, **state)
        self.window_start = time.perf_counter()  # the save is not training time

    # --- save -------------------------------------------------------------------------------------------------

    def save(self) -> SFTResult:
        cfg = self.cfg
        result = self.save_final(sft_card(cfg, self.data_sha256, len(self.examples), self.last),
                                 examples=len(self.examples), truncated=sum(ex.truncated for ex in self.examples),
                                 num_tokens=self.num_tokens)
        return SFTResult(**result)


def sft_card(cfg: SFTConfig, data_sha256: str, n_examples: int, last: dict[str, Any]) -> str:
    data = {"training data": str(cfg.data), "examples sha256": data_sha256, "examples": n_examples}
    return model_card(stage="sft", base_model=cfg.model, lora=cfg.lora_r > 0, data=data,
                      settings=config_to_dict(cfg), metrics=last)


def run(cfg: SFTConfig) -> SFTResult:
    """setup, train, save, holding the run folder's lock (as train does)."""
    return SFTRecipe(cfg).run()
