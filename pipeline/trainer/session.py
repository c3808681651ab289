"""What every training recipe (DPO, SFT) does around its own step: ``Recipe``, the base of both, holds the run
folder's checks, the accelerator and trackers, the policy's optimizer, schedule and data-parallel or FSDP wrapping,
the metrics log (metrics.parquet, TensorBoard, trackers, the progress bar), the step loop, the optimizer step, the
resume from a checkpoint, the checkpoint save and the final model. Written once, so both recipes keep the same
guarantees (no file removed that a run did not write, config.yaml written once, a resume that replays the same
order, a sharded checkpoint and a consolidated final model under FSDP)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core.atomic import check_writable, clear_owned, is_owned, remove_owned, sweep_stale, write_text_atomic
from pipeline.core.config import config_to_dict, config_to_yaml, option_name
from pipeline.core.devices import resolve_device
from pipeline.core.errors import UserError
from pipeline.core.lock import output_lock
from pipeline.core.paths import (
    CONFIG_FILE,
    FINAL_DIR,
    LEGACY_CHECKPOINTS_DIR,
    METRICS_FILE,
    RUN_OUTPUTS,
    run_outputs_in,
)
from pipeline.models import MaskedRowScorer
from pipeline.trainer.accelerator import fresh_accelerator, reset_peak_memory
from pipeline.trainer.batching import step_counts
from pipeline.trainer.checkpoint import load_checkpoint, save_checkpoint, save_model_dir
from pipeline.trainer.hub import push_folder
from pipeline.trainer.metrics import MetricsWriter, StepBar
from pipeline.trainer.optim import make_optimizer, make_scheduler
from pipeline.trainer.placement import Placement
from pipeline.trainer.resume import check_resume_source
from pipeline.trainer.trackers import (
    TENSORBOARD,
    AccelerateSink,
    accelerator_trackers,
    parse_report_to,
    resolve_trackers,
)


def check_run_outputs(out: Path) -> None:
    """An earlier run's files that a training run would replace must be its own: a user's file is never removed."""
    for name in RUN_OUTPUTS + (CONFIG_FILE,):
        path = out / name
        if path.exists() and not path.is_dir() and not is_owned(path):
            raise UserError(f"{path}: was not written by lldm-dpo (not in {out}/.lldm-dpo-written); move it away "
                            "or choose another --out")
    final = out / FINAL_DIR
    if final.is_dir() and not is_owned(final):
        raise UserError(f"{final}: was not written by lldm-dpo; move it away or choose another --out")


def remove_run_outputs(out: Path) -> None:
    """--overwrite: remove what earlier runs wrote (recorded in the folder), never anything else."""
    check_run_outputs(out)
    for name in run_outputs_in(out):  # checkpoint-N folders included
        path = out / name
        if is_owned(path):
            remove_owned(path)  # a folder of ours keeps the files the user added to it
        elif path.is_dir():
            clear_owned(path)  # a folder the user made: only our files in it go


def pad_probe(scorer, pad_token_id: int, device) -> torch.Tensor:
    """One forward of a two-token pad row through ``scorer`` (a MaskedRowScorer or the model): the sum to weight
    by 0. Under data parallel or FSDP it joins a forward (and, in the loss, a backward) the other processes
    make on real rows, so a process with nothing to train on still meets them."""
    probe = torch.full((1, 2), int(pad_token_id), device=device)
    index = torch.tensor([[0, 1]], device=device)  # position 1: shifted models predict it from 0
    return scorer(probe, None, index, probe[0, :1], 1).sum()


def check_finite(acc, distributed: bool, loss: torch.Tensor, step: int, where: str) -> None:
    """Stop on a non-finite loss, naming the step and ``where`` (its pairs or records). Distributed, the flag is
    all-reduced (every process calls this, also one without rows: ``loss`` 0), so that when any process's loss
    is not finite all stop and none waits for the others forever; the bad one says why."""
    bad = not bool(torch.isfinite(loss).all())
    if distributed:
        flag = torch.tensor([1.0 if bad else 0.0], device=acc.device)
        if acc.reduce(flag, reduction="sum").item() > 0 and not bad:
            raise UserError(f"step {step + 1}: loss is not finite on another process; stopping with it")
    if bad:
        raise UserError(f"step {step + 1}: loss is not finite ({loss.item()}) on {where}; nothing was saved for "
                        "this step (try a lower --learning-rate or --mixed-precision no)")


class Recipe(Placement):
    """The shape of a recipe: ``run()`` = ``setup()``, ``train()``, ``save()`` under the run folder's lock. A
    subclass sets ``stage`` and ``resume_free`` and writes ``setup`` (with the helpers below), ``train_step``
    and ``save``."""

    stage = ""
    """The command ("train", "sft"): the lock's, the accelerator's and the progress bar's name."""
    resume_free: tuple[str, ...] = ()
    """The settings a resume may change (the config's RESUME_FREE)."""

    def __init__(self, cfg):
        self.cfg, self.start_time = cfg, time.perf_counter()
        self.phase_seconds: dict[str, float] = {}
        self._phase_start = self.start_time
        self.start_step, self.resumed_from, self.writer, self.sinks, self.bar = 0, None, None, [], None
        self.last: dict[str, Any] = {}

    def run(self):
        """``setup()``, ``train()``, ``save()``, holding the run folder's lock (a second run into the folder
        refuses, naming the first); ``close()`` whatever happens. Returns ``save()``'s result."""
        with output_lock(self.cfg.out, self.stage, folder=True):
            try:
                self.setup()
                self.end_phase("setup")
                self.train()
                self.end_phase("train")
                return self.save()
            finally:
                self.close()

    def end_phase(self, name: str) -> None:
        """Add the seconds since the last phase ended to ``phase_seconds[name]`` (the result's breakdown of
        ``seconds``: setup, the start check where there is one, train, save)."""
        now = time.perf_counter()
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + now - self._phase_start
        self._phase_start = now

    # --- setup ------------------------------------------------------------------------------------------------

    def open_run(self) -> None:
        """Before anything loads: the folder is writable, a killed run's temporary files are swept (provably its
        own, its process gone), and a fresh run refuses a folder that holds a run unless ``overwrite`` (the one
        place this is checked; the files go in ``open_log``, only those runs wrote). Then the installed
        trackers of ``report_to`` (tensorboard dropped by ``tensorboard: false``)."""
        cfg = self.cfg
        check_writable(cfg.out, "run folder")
        for folder in (cfg.out, cfg.out / LEGACY_CHECKPOINTS_DIR):
            sweep_stale(folder)
        if not cfg.resume:
            earlier = run_outputs_in(cfg.out)
            if earlier and not cfg.overwrite:
                raise UserError(f"{cfg.out}: run folder already holds a run ({', '.join(earlier)}); pass --resume "
                                "to continue it, --overwrite to start afresh, or choose another --out")
            check_run_outputs(cfg.out)
        resolve_device(cfg.device)  # an unavailable --device is an error, never a silent CPU run
        requested = parse_report_to(cfg.report_to)
        self.trackers = resolve_trackers([n for n in requested if cfg.tensorboard or n != TENSORBOARD])

    def resume_source(self) -> Path:
        """The checkpoint-N folder a resume continues from (``resume_from_checkpoint``: true, the newest in the run
        folder; a path, that one), refused unless its recorded settings outside ``resume_free`` are this run's."""
        return check_resume_source(self.cfg.out, self.cfg.resume_from_checkpoint, config_to_dict(self.cfg),
                                   self.resume_free)

    def make_accelerator(self) -> None:
        cfg = self.cfg
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError(f"{option_name(cfg, 'mixed_precision')} fp16 needs CUDA (loss scaling on CPU is not "
                            "supported); use bf16 or no")
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        self.acc = fresh_accelerator(cfg.mixed_precision, cpu, log_with=accelerator_trackers(self.trackers),
                                     run_dir=cfg.out, command=self.stage)
        # Decided once here: on CPU the FSDP mode is attached to accelerate's state by hand (fresh_accelerator),
        # and any later AcceleratorState() copies the process state's MULTI_CPU back over it.
        self.fsdp, self.world = self.acc.distributed_type.name == "FSDP", self.acc.num_processes

    def count_steps(self, n_rows: int) -> None:
        self.steps_per_epoch, self.total_steps = step_counts(n_rows, self.cfg, self.world)
        # TRL's *_strategy: epoch, now that an epoch's steps are known (recorded in config.yaml as the interval)
        for each_epoch, every in (("save_each_epoch", "save_every"), ("log_each_epoch", "log_every"),
                                  ("eval_each_epoch", "eval_every")):
            if getattr(self.cfg, each_epoch, False):
                setattr(self.cfg, every, self.steps_per_epoch)

    def prepare(self, model) -> None:
        """The optimizer over ``model``'s trained parameters, its schedule (stepped by hand once per optimizer step:
        accelerate's wrapper would step it once per process and change the schedule with the world size), and,
        distributed, DDP or FSDP around a MaskedRowScorer: it does body, masked-row head and row sums in one
        forward, so DDP's gradient sync and FSDP's weight gathering see every use."""
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], self.cfg)
        self.model, self.scheduler = model, make_scheduler(optimizer, self.cfg, self.total_steps)
        if self.world > 1 or self.fsdp:
            self.wrapped, self.optimizer = self.acc.prepare(MaskedRowScorer(model), optimizer)
            self.params = [p for p in self.wrapped.parameters() if p.requires_grad]  # FSDP: DTensors
        else:
            self.wrapped, self.optimizer = None, self.acc.prepare(optimizer)
            self.params = [p for p in model.parameters() if p.requires_grad]

    def set_layout(self, **extra) -> None:
        """What fixes the data order and schedule (a resume must match it), with the data by content."""
        cfg = self.cfg
        self.layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": self.world,
                       "total_steps": self.total_steps, "seed": cfg.seed, "lora_r": cfg.lora_r, "optim": cfg.optim,
                       **extra}

    def resume(self, ckpt: Path) -> dict[str, Any]:
        """Load checkpoint ``ckpt`` into the model, optimizer, scheduler and RNG after checking it was written by a
        run of the same layout (data order and schedule) and world size; returns its record."""
        state = load_checkpoint(ckpt, layout=self.layout, model=self.model, wrapped=self.wrapped,
                                optimizer=self.optimizer, scheduler=self.scheduler, accelerator=self.acc)
        self.start_step = self.resumed_from = int(state["step"])
        return state

    def open_log(self) -> None:
        """A fresh run removes what earlier runs wrote (``overwrite``, checked in ``open_run``); config.yaml is
        written once, when the run starts: a resume never rewrites the run's recorded settings. Then the log:
        metrics.parquet (+ TensorBoard) and accelerate's trackers on the main process, and the progress bar."""
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            if not cfg.resume:
                remove_run_outputs(cfg.out)
            if not (cfg.resume and (cfg.out / CONFIG_FILE).is_file()):
                cfg.out.mkdir(parents=True, exist_ok=True)
                write_text_atomic(cfg.out / CONFIG_FILE, config_to_yaml(cfg), record=True)
        main = acc.is_main_process
        if main and accelerator_trackers(self.trackers):
            self.sinks.append(AccelerateSink(acc, dataclasses.asdict(cfg),
                                             run_name=cfg.run_name or cfg.out.name))
        self.bar = StepBar(self.total_steps, self.start_step, cfg.progress and main, self.stage)
        if main:
            self.writer = MetricsWriter(cfg.out, tensorboard=TENSORBOARD in self.trackers,
                                        resume_step=self.resumed_from, console=self.bar.stream or cfg.progress,
                                        sinks=tuple(self.sinks))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.log(row)

    # --- train ------------------------------------------------------------------------------------------------

    def train(self) -> None:
        """The optimizer steps from ``start_step`` (0, or the resumed checkpoint's); checkpoint-N every
        ``save_every`` steps (not at the end: the final model is saved) and whenever ``train_step`` asks."""
        reset_peak_memory(self.acc.device)
        for step in range(self.start_step, self.total_steps):
            every = self.cfg.save_every and (step + 1) % self.cfg.save_every == 0 and step + 1 < self.total_steps
            if self.train_step(step, bool(every)) or every:
                self.save_checkpoint(step + 1)

    def train_step(self, step: int, saving: bool) -> bool:
        """One optimizer step (``saving``: a checkpoint follows); returns whether to save one anyway."""
        raise NotImplementedError

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, step, schedule, zero; returns (the step's learning rate, the gradient norm before clipping)."""
        max_norm = self.cfg.max_grad_norm
        grad_norm = self.acc.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, float(grad_norm)

    def save_checkpoint(self, step: int, protect=(), **state) -> None:
        """checkpoint-N (a model folder, trainer_state.json, optimizer, scheduler and RNG state), the metrics
        flushed first so a resume continues them; rotation keeps ``keep_checkpoints`` newest, never ``protect``."""
        self.acc.wait_for_everyone()
        if self.writer is not None:
            self.writer.flush()
        save_checkpoint(self.cfg.out, step, model=self.model, wrapped=self.wrapped, optimizer=self.optimizer,
                        scheduler=self.scheduler, tokenizer=self.tokenizer, accelerator=self.acc,
                        base_name=self.model_name, keep=self.cfg.keep_checkpoints, protect=list(protect), cfg=self.cfg,
                        state={"epoch": step / self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                               "layout": self.layout, **state})

    # --- save -------------------------------------------------------------------------------------------------

    def save_final(self, card: str, **result) -> dict[str, Any]:
        """The final model (full weights, gathered under FSDP, or the LoRA adapter) with its model card, pushed
        with push_to_hub; every process calls this. Returns the result's common fields with ``result``."""
        cfg = self.cfg
        self.acc.wait_for_everyone()
        if self.writer is not None:
            self.writer.flush()
        save_model_dir(cfg.out / FINAL_DIR, self.model, self.tokenizer, self.acc, base_name=self.model_name,
                       card=card)
        if self.acc.is_main_process:
            push_folder(cfg.out / FINAL_DIR, cfg, stage=self.stage)
        self.end_phase("save")
        return {"steps": self.total_steps, "epochs_seen": self.total_steps / self.steps_per_epoch,
                "final_loss": float(self.last.get("loss", float("nan"))), "out": str(cfg.out),
                "final_model": str(cfg.out / FINAL_DIR), "metrics": str(cfg.out / METRICS_FILE),
                "resumed_from": self.resumed_from, "seconds": time.perf_counter() - self.start_time,
                "phase_seconds": {name: round(t, 3) for name, t in self.phase_seconds.items()}, **result}

    def close(self) -> None:
        for closing in [self.bar, self.writer, *self.sinks]:
            if closing is not None:
                closing.close()
