"""Diffusion language models: native LLaDA, a transformers adapter, presets, and scoring.

Public entry points (the "Models" contract):
- ``load(name_or_path, numerics, device, *, trust_remote_code, seed) -> (model, tokenizer)``: the one loader
  (preset, folder, LoRA adapter folder, hub id in the local cache; a 4-bit base prepared as train prepares it)
- ``load_model(name_or_path, *, dtype, device, ...)``: its name resolution in one weights dtype (the model as stored)
- ``score_tokens(model, input_ids, attention_mask, index, targets, chunk_size)``
- ``MaskedRowScorer(model)``: body + masked-row head + float64 row sums as one module call (DDP/FSDP wrap it)
- ``model_identity(model_dir_or_name)`` / ``tokenizer_identity(tokenizer)`` for cache fingerprints
- ``PRESETS`` / ``build_preset(name, device=, dtype=)``

LoRA: ``LORA_TARGET_MODULES`` is a regex for peft's ``target_modules`` that
selects every block projection (q/k/v/attn_out and the MLP's ff_proj/up_proj/
ff_out) but not the LM head, which LLaDA also calls ``ff_out``
(``model.transformer.ff_out``).  A plain list ``["q_proj", ..., "ff_out"]``
would wrap the 126k-row head too.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Sequence

from pipeline.models.lora_targets import LORA_TARGET_NAMES

_EXPORTS = {
    "LLaDAConfig": "llada", "LLaDAModelLM": "llada",
    "load": "loading", "load_model": "loading", "model_identity": "loading", "tokenizer_identity": "loading",
    "PRESETS": "presets", "build_preset": "presets", "preset_tokenizer": "presets",
    "MaskedRowScorer": "scoring", "score_tokens": "scoring",
    "build_tokenizer": "tokenizer",
}
"""Public name -> the submodule that defines it. Imported on first use (PEP 562): the configs read
``pipeline.models.numerics`` and ``pipeline.models.lora_targets`` while parsing flags, and must not pay for
transformers there."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"pipeline.models.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")


def lora_target_modules(model_type: str, names: Sequence[str] = LORA_TARGET_NAMES) -> str | list[str]:
    """peft ``target_modules`` adapting ``names``: for LLaDA a pattern anchored on ``blocks.N.``
    (its LM head is also called ``ff_out``; peft fullmatches a string on the module's full name),
    for other models the plain names."""
    if model_type == "llada":
        return r".*\.blocks\.\d+\.(" + "|".join(map(re.escape, names)) + ")"
    return list(names)


LORA_TARGET_MODULES = lora_target_modules("llada")

__all__ = [
    "LLaDAConfig",
    "LLaDAModelLM",
    "LORA_TARGET_MODULES",
    "LORA_TARGET_NAMES",
    "MaskedRowScorer",
    "PRESETS",
    "build_preset",
    "build_tokenizer",
    "lora_target_modules",
    "load",
    "load_model",
    "model_identity",
    "preset_tokenizer",
    "score_tokens",
    "tokenizer_identity",
]
