"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` built under a temporary
name and renamed when complete, so a run killed at any moment leaves only
whole checkpoints. Only trainable parameters are stored (the LoRA adapter
under LoRA, every weight under full fine-tuning), as safetensors; optimizer
and scheduler states go through ``torch.save`` and come back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir, make_dir, remove_owned
from pipeline.errors import UserError

STEP_PATTERN = re.compile(r"^step-(\d{7})$")
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``RUN_DIR/checkpoints/step-NNNNNNN``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict[str, Any], keep: int = 2, protect: Sequence[Path] = ()) -> Path:
    """Write ``checkpoints/step-N`` atomically; keep the ``keep`` newest and every ``protect``ed one (the best)."""
    final = checkpoint_dir(run_dir, step)
    make_dir(final.parent)
    with atomic_dir(final, record=True) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
    kept = {Path(p).resolve() for p in protect}
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old.resolve() not in kept:
            remove_owned(old)  # what the checkpoint wrote; a file the user put there stays
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name) and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its trainer state (step, epoch, position...)."""
    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        missing = sorted(trainable - set(weights))[:3]
        extra = sorted(set(weights) - trainable)[:3]
        raise UserError(f"{path}: checkpoint does not match this model's trainable parameters "
                        f"(missing {missing}, unexpected {extra}); was it made with other LoRA settings?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE).read_text())
