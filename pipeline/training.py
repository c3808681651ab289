"""What the training stages (``train``, ``sft``) share: the accelerator, the policy's adaptation (LoRA,
checkpointing), AdamW and its schedule, the run folder's ownership checks, the data order, peak memory.

Functions taking ``cfg`` read only the fields they name (``gradient_checkpointing``, ``lora_*``,
``dtype``, ``mixed_precision``, ``load_in_4bit``, ``learning_rate``, ``weight_decay``, ``warmup_ratio``,
``scheduler``), which both stages' configs have.
"""

from __future__ import annotations

import math
import random
import resource
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.errors import UserError
from pipeline.layout import CONFIG_FILE, RUN_OUTPUTS
from pipeline.models import lora_target_modules
from pipeline.numerics import Numerics

SCHEDULERS = ("cosine", "linear", "constant")


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
            from pipeline.numerics import prepare_4bit

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


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (CPU and CUDA): about 10x faster than
    the per-tensor loop on CPU, which matters when the embedding and head are trained."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    betas = (getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999))  # torch's defaults unless set
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=betas,
                             fused=fused or None)


def make_scheduler(optimizer, cfg, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant" or total_steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_run_outputs(out: Path) -> None:
    """An earlier run's files that a training run would replace must be its own: a user's file is never removed."""
    from pipeline.atomic import is_owned

    for name in RUN_OUTPUTS + (CONFIG_FILE,):
        path = out / name
        if path.exists() and not path.is_dir() and not is_owned(path):
            raise UserError(f"{path}: was not written by lldm-dpo (not in {out}/.lldm-dpo-written); move it away "
                            "or choose another --out")
    final = out / "final"
    if final.is_dir() and not is_owned(final):
        raise UserError(f"{final}: was not written by lldm-dpo; move it away or choose another --out")


def remove_run_outputs(out: Path) -> None:
    """--overwrite: remove what earlier runs wrote (recorded in the folder), never anything else."""
    from pipeline.atomic import clear_owned, is_owned, remove_owned

    check_run_outputs(out)
    for name in RUN_OUTPUTS:
        path = out / name
        if is_owned(path):
            remove_owned(path)  # a folder of ours keeps the files the user added to it
        elif path.is_dir():
            clear_owned(path)  # a folder the user made: only our files in it go


def check_resume_layout(ckpt: Path, state: dict[str, Any], layout: dict[str, Any]) -> None:
    """Resuming must replay the same data order and schedule: the settings that fix them must match."""
    saved = state.get("layout", {})
    diffs = [k for k in layout if k in saved and saved[k] != layout[k]]
    if diffs:
        k = diffs[0]
        raise UserError(f"{ckpt}: cannot resume with {k} = {layout[k]}; the run was started with {k} = {saved[k]} "
                        "(the data position and schedule depend on it)")


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_rows))
    random.Random(f"{seed}:{epoch}").shuffle(order)  # string seeds are stable across Python runs
    return order


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
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # Not installed with this project's packages; FSDP covers sharding (README "From one card to many").
        raise UserError(f"{command} under DeepSpeed is not supported; use FSDP "
                        "(accelerate launch --config_file configs/accelerate/fsdp.yaml) for ZeRO-3-style sharding")
    if os.environ.get("ACCELERATE_USE_MEGATRON_LM", "false").lower() == "true":
        raise UserError(f"{command} under Megatron-LM is not supported; use FSDP (configs/accelerate/fsdp.yaml)")
    if log_with:
        from pipeline.trackers import tracker_dir

        acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=log_with, project_dir=tracker_dir(run_dir))
    else:
        acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type.name == "MULTI_CPU":
        # accelerate 1.15 only turns FSDP on for accelerator devices; torch's fully_shard
        # itself runs over gloo on CPU, so the plugin is attached here (fsdp_cpu.yaml).
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        acc.state.distributed_type = DistributedType.FSDP
    return acc


def micro_batch_rows(rows, cfg, step: int, micro: int, steps_per_epoch: int, world: int, rank: int,
                     order: list[int] | None = None):
    """The rows this process trains on at (step, micro). An epoch is one pass over its own shuffled order:
    its last micro-batches hold what is left (fewer rows, or none), never a pair already seen in the epoch."""
    epoch = step // steps_per_epoch
    order = epoch_order(len(rows), cfg.seed, epoch) if order is None else order  # the caller's cached order
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
