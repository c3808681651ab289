"""What every training recipe (DPO, SFT) does around its own step: the run folder's checks, the accelerator and
trackers, the metrics log (metrics.parquet, TensorBoard, trackers, the progress bar), the optimizer step, the
resume from a checkpoint and the checkpoint save. Written once, so both recipes keep the same guarantees
(no file removed that a run did not write, config.yaml written once, a resume that replays the same order)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.errors import UserError
from pipeline.layout import CONFIG_FILE, run_outputs_in


def step_counts(n_rows: int, cfg, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): an epoch is one pass over the rows at cfg's global batch."""
    steps_per_epoch = max(1, math.ceil(n_rows / (cfg.batch_size * cfg.grad_accum * world)))
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


def prepare_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before anything loads: the folder is writable, a killed run's temporary files are swept (provably its
    own, its process gone), and a fresh run refuses a folder that holds a run unless ``overwrite`` (the one
    place this is checked; the files go in ``start_fresh``, only those runs wrote)."""
    from pipeline.atomic import check_writable, sweep_stale
    from pipeline.training import check_run_outputs

    check_writable(out, "run folder")
    from pipeline.layout import LEGACY_CHECKPOINTS_DIR

    for folder in (out, out / LEGACY_CHECKPOINTS_DIR):
        sweep_stale(folder)
    if resume:
        return
    earlier = run_outputs_in(out)
    if earlier and not overwrite:
        raise UserError(f"{out}: run folder already holds a run ({', '.join(earlier)}); pass --resume to "
                        "continue it, --overwrite to start afresh, or choose another --out")
    check_run_outputs(out)


def resolve_report_to(cfg) -> list[str]:
    """The installed trackers of ``report_to`` (tensorboard dropped by ``tensorboard: false``)."""
    from pipeline.trackers import TENSORBOARD, parse_report_to, resolve_trackers

    requested = parse_report_to(cfg.report_to)
    if not cfg.tensorboard:
        requested = [n for n in requested if n != TENSORBOARD]
    return resolve_trackers(requested)


def make_accelerator(cfg, trackers: list[str], command: str):
    from pipeline.trackers import accelerator_trackers
    from pipeline.training import fresh_accelerator

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs CUDA (loss scaling on CPU is not supported); use bf16 or no")
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return fresh_accelerator(cfg.mixed_precision, cpu, log_with=accelerator_trackers(trackers), run_dir=cfg.out,
                             command=command)


def prepare_model(acc, model, optimizer, distributed: bool):
    """(wrapped, optimizer, trained parameters). Distributed, DDP syncs gradients and FSDP gathers weights in
    forward(): the MaskedRowScorer does body, masked-row head and row sums in one forward, so both see every
    use. The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per
    process and change the schedule with the world size."""
    if not distributed:
        return None, acc.prepare(optimizer), [p for p in model.parameters() if p.requires_grad]
    from pipeline.models.scoring import MaskedRowScorer

    wrapped, optimizer = acc.prepare(MaskedRowScorer(model), optimizer)
    return wrapped, optimizer, [p for p in wrapped.parameters() if p.requires_grad]  # FSDP: DTensors


def pad_probe(scorer, pad_token_id: int, device) -> torch.Tensor:
    """One forward of a two-token pad row through ``scorer`` (a MaskedRowScorer or the model): the sum to weight
    by 0. Under data parallel or FSDP it joins a forward (and, in the loss, a backward) the other processes
    make on real rows, so a process with nothing to train on still meets them."""
    probe = torch.full((1, 2), int(pad_token_id), device=device)
    index = torch.tensor([[0, 1]], device=device)  # position 1: shifted models predict it from 0
    return scorer(probe, None, index, probe[0, :1], 1).sum()


def stop_with_others(acc, bad: bool, step: int) -> None:
    """The finite-loss flag, all-reduced (every process calls it, also one without rows), so that when any
    process's loss is not finite all stop and none waits for the others forever; the bad one says why."""
    flag = torch.tensor([1.0 if bad else 0.0], device=acc.device)
    if acc.reduce(flag, reduction="sum").item() > 0 and not bad:
        raise UserError(f"step {step + 1}: loss is not finite on another process; stopping with it")


def optimizer_step(acc, params, optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip, step, schedule, zero; returns (the step's learning rate, the gradient norm before clipping)."""
    grad_norm = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, float(grad_norm)


def resume_source(cfg, free) -> Path:
    """The checkpoint-N folder a resume continues from (``resume_from_checkpoint``: true, the newest in the run
    folder; a path, that one), refused unless its recorded settings outside ``free`` are this run's."""
    from pipeline.config import config_to_dict
    from pipeline.resume import check_resume_source

    return check_resume_source(cfg.out, cfg.resume_from_checkpoint, config_to_dict(cfg), free)


def resume_state(ckpt: Path, layout: dict[str, Any], world: int, **objects) -> dict[str, Any]:
    """Load checkpoint ``ckpt`` into ``objects`` (model, wrapped, optimizer, scheduler, accelerator) after
    checking it was written by a run of the same layout (data order and schedule) and world size."""
    from pipeline.checkpoint import check_world, load_checkpoint, read_state
    from pipeline.training import check_resume_layout

    saved = read_state(ckpt)
    check_world(ckpt, saved, world)  # before the layout: its message says what to do instead
    check_resume_layout(ckpt, saved, layout)
    return load_checkpoint(ckpt, **objects)


def start_run(cfg, acc) -> None:
    """A fresh run removes what earlier runs wrote (``overwrite``, checked in ``prepare_run_folder``); config.yaml
    is written once, when the run starts: a resume never rewrites the run's recorded settings."""
    from pipeline.atomic import write_text_atomic
    from pipeline.config import config_to_yaml
    from pipeline.training import remove_run_outputs

    if not acc.is_main_process:
        return
    if not cfg.resume:
        remove_run_outputs(cfg.out)
    if not (cfg.resume and (cfg.out / CONFIG_FILE).is_file()):
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.out / CONFIG_FILE, config_to_yaml(cfg), record=True)


class RunLog:
    """metrics.parquet (+ TensorBoard) and accelerate's trackers on the main process, and the progress bar."""

    def __init__(self, cfg, acc, trackers: list[str], total_steps: int, start_step: int,
                 resumed_from: Optional[int], desc: str):
        from pipeline.metrics import TB_TAGS, MetricsWriter
        from pipeline.trackers import TENSORBOARD, AccelerateSink, accelerator_trackers
        from pipeline.training import StepBar

        self.writer, self.sinks = None, []
        main = acc.is_main_process
        if main and accelerator_trackers(trackers):
            self.sinks.append(AccelerateSink(acc, dataclasses.asdict(cfg), TB_TAGS,
                                             run_name=cfg.run_name or cfg.out.name))
        self.bar = StepBar(total_steps, start_step, cfg.progress and main, desc)
        if main:
            self.writer = MetricsWriter(cfg.out, tensorboard=TENSORBOARD in trackers, resume_step=resumed_from,
                                        console=self.bar.stream or cfg.progress, sinks=tuple(self.sinks))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.log(row)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()


def save_step_checkpoint(cfg, acc, log: RunLog, step: int, *, state: dict[str, Any], protect=(), **objects) -> None:
    """Checkpoint ``step`` (a model folder plus optimizer, scheduler and RNG state), the metrics flushed first so
    a resume continues them; rotation keeps ``keep_checkpoints`` newest and never ``protect``."""
    from pipeline.checkpoint import save_checkpoint

    acc.wait_for_everyone()
    log.flush()
    save_checkpoint(cfg.out, step, accelerator=acc, state=state, keep=cfg.keep_checkpoints, protect=list(protect),
                    cfg=cfg, **objects)


def push_final(cfg, acc, stage: str) -> None:
    """push_to_hub: the main process uploads the final model folder (pipeline.hub) once it is written."""
    if acc.is_main_process:
        from pipeline.hub import push_folder
        from pipeline.layout import FINAL_DIR

        push_folder(cfg.out / FINAL_DIR, cfg, stage=stage)


def run_recipe(recipe, stage: str):
    """``setup()``, ``train()``, ``save()`` of a recipe, holding its run folder's lock (a second run into the
    folder refuses, naming the first); ``close()`` whatever happens. Returns ``save()``'s result."""
    from pipeline.lock import output_lock

    with output_lock(recipe.cfg.out, stage, folder=True):
        try:
            recipe.setup()
            recipe.train()
            return recipe.save()
        finally:
            recipe.close()
