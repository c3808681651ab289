"""The run's accelerator (a fresh one per run in one process; DeepSpeed and Megatron-LM refused; FSDP on CPU)
and the process's peak memory, as the metrics report it."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from pipeline.core.errors import UserError
from pipeline.trainer.trackers import tracker_dir


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
