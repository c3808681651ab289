"""What the training stages (``train``, ``sft``) share: the accelerator, the policy's adaptation (LoRA,
checkpointing), AdamW and its schedule, the run folder's ownership checks, the data order, peak memory.

Functions taking ``cfg`` read only the fields they name (``gradient_checkpointing``, ``lora_*``,
``dtype``, ``mixed_precision``, ``load_in_4bit``, ``learning_rate``, ``weight_decay``, ``warmup_ratio``,
``warmup_steps``, ``scheduler``, ``lr_scheduler_kwargs``, ``optim``, ``adam_*``), which both stages' configs have.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import random
import resource
import sys
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from tqdm import tqdm

from pipeline.core.atomic import clear_owned, is_owned, remove_owned
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.paths import CONFIG_FILE, FINAL_DIR, RUN_OUTPUTS, run_outputs_in
from pipeline.models import lora_target_modules
from pipeline.models.numerics import Numerics, prepare_4bit
from pipeline.trainer.trackers import tracker_dir

REFUSED_SCHEDULERS = {
    "reduce_lr_on_plateau": "it steps on an eval metric, and lldm-dpo steps the schedule once per optimizer step",
    "greedy": "it steps on a training metric, and lldm-dpo steps the schedule once per optimizer step",
}
"""transformers' scheduler names that cannot apply here, with why."""


def scheduler_names() -> tuple[str, ...]:
    """Every ``transformers.SchedulerType`` name that applies here (lr_scheduler_type's choices)."""
    from transformers import SchedulerType  # lazy here and below: it loads transformers' trainer_utils and peft

    return tuple(t.value for t in SchedulerType if t.value not in REFUSED_SCHEDULERS)


def check_scheduler(name: str, kwargs: Optional[dict] = None) -> None:
    """A one-line ConfigError unless ``name`` is a transformers scheduler that applies here and takes
    ``kwargs`` (tried on a one-parameter optimizer, so a config fails before any model loads)."""
    if name in REFUSED_SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type {name} cannot apply here: {REFUSED_SCHEDULERS[name]}")
    names = scheduler_names()
    if name not in names:
        raise ConfigError(f"scheduler (lr_scheduler_type) must be one of {', '.join(names)}, got '{name}'")
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(name, probe, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=dict(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lr_scheduler_kwargs {dict(kwargs or {})}: not accepted by the {name} scheduler: "
                          f"{str(exc).splitlines()[0]}") from None


def warmup_steps_of(cfg, total_steps: int) -> int:
    """TrainingArguments' rule: warmup_steps >= 1 is a count, in (0, 1) a share of the steps; 0 = warmup_ratio."""
    steps = float(getattr(cfg, "warmup_steps", 0) or 0)
    if steps >= 1:
        return int(steps)
    share = steps if steps > 0 else float(cfg.warmup_ratio)
    return math.ceil(total_steps * share)


def adapt_policy(model, cfg, numerics: Optional[Numerics] = None):
    """What training does to a loaded model: checkpointing, k-bit preparation, LoRA or full unfreeze.
    ``lldm-dpo plan`` runs it on a model that allocates nothing."""
    numerics = numerics or Numerics(dtype=cfg.dtype or "float32", mixed_precision=cfg.mixed_precision or "no",
                                    load_in_4bit=bool(cfg.load_in_4bit))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        if numerics.load_in_4bit:
            model = prepare_4bit(model, cfg.gradient_checkpointing)
        names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        targets = lora_target_modules(getattr(model.config, "model_type", ""), names)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none")
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise UserError(f"--lora-targets {cfg.lora_targets}: {exc}") from None
    else:
        model.requires_grad_(True)
    model.train()
    return model


TORCH_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
BNB_OPTIMS = {"adamw_8bit": (8, False), "adamw_bnb_8bit": (8, False), "paged_adamw_8bit": (8, True),
              "paged_adamw_32bit": (32, True)}
"""bitsandbytes' AdamW names: (optimizer state bits, paged)."""


def check_optim(name: str) -> None:
    """A one-line ConfigError unless ``name`` is an optim built here (bitsandbytes' only where it is installed)."""
    built = TORCH_OPTIMS + tuple(BNB_OPTIMS)
    if name in BNB_OPTIMS and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim {name} needs bitsandbytes, which is not installed (pip install bitsandbytes), "
                          "or use adamw_torch")
    if name not in built:
        from transformers.training_args import OptimizerNames

        what = "a transformers optim not built here" if name in {o.value for o in OptimizerNames} else "unknown"
        raise ConfigError(f"optim {name}: {what}; choose from {', '.join(built)}")


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """``cfg.optim`` (TrainingArguments' names) over ``params``. adamw_torch is torch's AdamW with the fused
    kernel where it runs (CPU and CUDA: about 10x faster than the per-tensor loop on CPU, which matters
    when the embedding and head are trained); adamw_torch_fused insists on it."""
    name = getattr(cfg, "optim", "adamw_torch")
    check_optim(name)
    lr, wd = cfg.learning_rate, cfg.weight_decay
    betas = (getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999))  # torch's defaults unless set
    eps = getattr(cfg, "adam_epsilon", 1e-8)
    if name in ("adamw_torch", "adamw_torch_fused"):
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in params)
        if name == "adamw_torch_fused" and not fused:
            raise UserError("optim adamw_torch_fused: torch's fused AdamW does not run on these parameters' "
                            "device or dtype; use adamw_torch")
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, eps=eps, fused=fused or None)
    if name == "adafactor":  # as Trainer builds it: the given learning rate, no relative step
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    if name in ("sgd", "adagrad", "rmsprop"):
        kind = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[name]
        return kind(params, lr=lr, weight_decay=wd, **({} if name == "sgd" else {"eps": eps}))
    bits, paged = BNB_OPTIMS[name]
    import bitsandbytes as bnb

    return bnb.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, optim_bits=bits, is_paged=paged)


def make_scheduler(optimizer, cfg, total_steps: int):
    """``transformers.get_scheduler(cfg.scheduler, ...)``: HF's schedules and warmup (from 0 to the peak over the
    warmup steps), with ``lr_scheduler_kwargs`` passed on (cosine_with_min_lr's min_lr or min_lr_rate, ...)."""
    from transformers import get_scheduler

    kwargs = dict(getattr(cfg, "lr_scheduler_kwargs", None) or {})
    check_scheduler(cfg.scheduler, kwargs)
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup_steps_of(cfg, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)


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


@functools.lru_cache(maxsize=4)  # every micro-batch of an epoch reads the same order: shuffled once
def epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_rows))
    random.Random(f"{seed}:{epoch}").shuffle(order)  # string seeds are stable across Python runs
    return tuple(order)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident size (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or on CPU the peak resident size since the run started."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux, never reset


def fresh_accelerator(mixed_precision: str, cpu: bool, log_with: Optional[list[str]] = None,
                      run_dir: Optional[Path] = None, command: str = "train"):
    """An Accelerator with this run's settings. accelerate keeps one state per
    process; in a single process (tests, sweeps, ``lldm-dpo run``) it is reset so
    each ``run(cfg)`` gets its own mixed precision."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # Not a dependency; FSDP covers sharding (README "From one card to many").
        raise UserError(f"{command}: the accelerate config's distributed_type DEEPSPEED is refused: DeepSpeed is not "
                        "supported here (this trainer steps its own optimizer, clipping and checkpoints, not "
                        "DeepSpeed's engine; untested); use FSDP (accelerate launch --config_file "
                        "configs/accelerate/fsdp.yaml) for ZeRO-3-style sharding")
    if os.environ.get("ACCELERATE_USE_MEGATRON_LM", "false").lower() == "true":
        raise UserError(f"{command} under Megatron-LM is not supported; use FSDP (configs/accelerate/fsdp.yaml)")
    trackers = {"log_with": log_with, "project_dir": tracker_dir(run_dir)} if log_with else {}
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **trackers)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type.name == "MULTI_CPU":
        # accelerate 1.15 only turns FSDP on for accelerator devices; torch's fully_shard
        # itself runs over gloo on CPU, so the plugin is attached here (fsdp_cpu.yaml).
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        acc.state.distributed_type = DistributedType.FSDP
    return acc


def micro_batch_rows(rows, cfg, step: int, micro: int, steps_per_epoch: int, world: int, rank: int):
    """The rows this process trains on at (step, micro). An epoch is one pass over its own shuffled order:
    its last micro-batches hold what is left (fewer rows, or none), never a pair already seen in the epoch."""
    epoch = step // steps_per_epoch
    order = epoch_order(len(rows), cfg.seed, epoch)
    start, stop = _micro_batch_span(len(rows), cfg, step, micro, steps_per_epoch, world, rank)
    return epoch, [rows[order[i]] for i in range(start, stop)]


def _micro_batch_span(n_rows: int, cfg, step: int, micro: int, steps_per_epoch: int, world: int,
                      rank: int) -> tuple[int, int]:
    """Positions [start, stop) in the epoch's order of the rows process ``rank`` trains on at (step, micro)."""
    pos = step % steps_per_epoch
    start = (pos * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
    return start, max(start, min(start + cfg.batch_size, n_rows))


def step_pair_count(n_rows: int, cfg, step: int, steps_per_epoch: int, world: int) -> int:
    """Pairs the whole step trains on, over every micro-batch and process (``micro_batch_rows``' arithmetic)."""
    spans = (_micro_batch_span(n_rows, cfg, step, micro, steps_per_epoch, world, rank)
             for micro in range(cfg.grad_accum) for rank in range(world))
    return sum(stop - start for start, stop in spans)


class StepBar:
    """A progress bar with ETA over the optimizer steps (tqdm's, as transformers' Trainer shows), on stderr when
    it is a terminal and progress is on (main process only). ``stream`` is where metric lines go meanwhile:
    through the bar, so it stays whole; without a bar it is None and lines go to stderr as before."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        from pipeline.core.progress import PlainProgress, stage_label

        self.bar = self.plain = None
        out = sys.stderr
        if enabled and hasattr(out, "isatty") and out.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=stage_label(desc), unit="step", file=out,
                            dynamic_ncols=True)
        elif enabled and total > initial:  # a log file: plain periodic lines with the ETA (pipeline.core.progress)
            self.plain = PlainProgress(desc, total - initial, "steps")
        self.stream = _BarStream(self.bar) if self.bar is not None else None

    def step(self, loss: float | None = None) -> None:
        if self.plain is not None:
            self.plain.advance(1)
        if self.bar is not None:
            if loss is not None and loss == loss:
                self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()
        if self.bar is not None:
            self.bar.close()


class _BarStream:
    """A text stream whose whole lines are printed above the bar (tqdm.write)."""

    def __init__(self, bar):
        self.bar, self.buffer = bar, ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.bar.write(line, file=self.bar.fp)
        return len(text)

    def flush(self) -> None:
        pass
