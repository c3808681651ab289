"""What makes two evaluations comparable, and eval results as rows.

``environment()`` is the machine and software an evaluation ran on (device
name, torch, transformers, peft, accelerate, lm-eval and this package's
versions, Python, platform): diffusion-LM results drift by several points
between harnesses and cards, so eval.json records them beside its figures
(``record``), with the sampler settings, seeds and numerics.

``result_rows(data, run)`` flattens one eval.json's ``intervals`` into rows
(figure, model, value, count, n, low, high, ...), the ``eval_results`` view
of ``lldm-dpo query`` across runs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.models.numerics import Numerics

PACKAGES = ("torch", "transformers", "peft", "accelerate", "lm_eval", "lldm-dpo")

RESULT_COLUMNS = {
    "run": "VARCHAR", "figure": "VARCHAR", "model": "VARCHAR", "value": "DOUBLE", "count": "DOUBLE", "n": "BIGINT",
    "low": "DOUBLE", "high": "DOUBLE", "confidence": "DOUBLE", "method": "VARCHAR", "gained": "DOUBLE",
    "lost": "DOUBLE", "before_model": "VARCHAR", "after_model": "VARCHAR", "device_name": "VARCHAR",
    "torch": "VARCHAR", "dtype": "VARCHAR", "mixed_precision": "VARCHAR", "seed": "BIGINT",
}
"""Columns of ``eval_results`` (one row per figure and model; model "difference" is after - before)."""


def device_name(device: str) -> str:
    """A human name of the device: the GPU's (torch.cuda.get_device_name) or the CPU's model name."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine() or "unknown")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages an evaluation depends on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict[str, Any]:
    """Where an evaluation ran: device and its name, package versions, Python and platform."""
    return {"device": str(device), "device_name": device_name(device), "versions": versions(),
            "python": platform.python_version(), "platform": platform.platform()}


def result_rows(data: dict[str, Any], run: str) -> list[dict[str, Any]]:
    """One row per (figure, model) of an eval.json's ``intervals`` block, with the record's key settings."""
    def part(block: dict, key: str) -> dict:  # a block of the file, {} when absent or malformed
        return block.get(key) if isinstance(block.get(key), dict) else {}

    record = part(data, "record")
    env, numerics, seeds, models = (part(record, "environment"), part(record, "numerics"), part(record, "seeds"),
                                    part(data, "models"))
    common = {"run": run, "before_model": models.get("before"), "after_model": models.get("after"),
              "device_name": env.get("device_name"), "torch": (env.get("versions") or {}).get("torch"),
              "dtype": numerics.get("dtype"), "mixed_precision": numerics.get("mixed_precision"),
              "seed": seeds.get("seed")}
    rows = []
    intervals = part(data, "intervals")
    for figure in intervals:
        for model, rec in part(intervals, figure).items():
            if not isinstance(rec, dict):
                continue
            rows.append({**{k: None for k in RESULT_COLUMNS}, **common, "figure": figure, "model": model,
                         **{k: rec.get(k) for k in ("count", "n", "low", "high", "confidence", "method", "gained",
                                                    "lost")},
                         "value": rec.get("difference") if model == "difference" else rec.get("value")})
    return rows


def eval_record(cfg, numerics: Numerics, cache, device: str) -> dict[str, Any]:
    """What makes this eval comparable with another: sampler settings, seeds, numerics, the multiple-choice
    estimator, the cache it was measured against, and the machine and package versions."""
    fp = cache.fingerprint if cache is not None else {}
    return {
        "sampler": {"gen_length": cfg.gen_length, "block_length": cfg.block_length, "steps": cfg.steps,
                    "batch_size": cfg.batch_size, "kv_cache": cfg.kv_cache, "threshold": cfg.threshold,
                    "temperature": cfg.temperature, "remasking": cfg.remasking, "cfg_scale": cfg.cfg_scale},
        "seeds": {"seed": cfg.seed, "mc_seeds": cfg.mc_seeds, "cache_mask_seed": fp.get("seed")},
        "multiple_choice": {"samples": cfg.samples, "normalize": cfg.normalize},
        "numerics": dataclasses.asdict(numerics),
        "cache": None if cache is None else {"path": str(cfg.scores), "model": cache.manifest.reference_model,
                                             "samples": fp.get("samples"), "draws": fp.get("draws"),
                                             "scheme": fp.get("scheme")},
        "lm_eval": {"tasks": cfg.lm_eval_tasks, "limit": cfg.lm_eval_limit,
                    "num_fewshot": cfg.lm_eval_num_fewshot} if cfg.lm_eval_tasks else None,
        "environment": environment(device),
    }
