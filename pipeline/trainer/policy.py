"""What training does to a loaded model before its first step: gradient checkpointing, a 4-bit base's k-bit
preparation, LoRA adapters (or every weight unfrozen). ``pipeline.models.load`` loads it; this adapts it.

Functions taking ``cfg`` read only the fields they name (``gradient_checkpointing``, ``lora_*``, ``dtype``,
``mixed_precision``, ``load_in_4bit``), which train's and sft's configs both have.
"""

from __future__ import annotations

from typing import Optional

from pipeline.core.errors import UserError
from pipeline.models import lora_target_modules
from pipeline.models.numerics import Numerics, config_numerics, prepare_4bit


def adapt_policy(model, cfg, numerics: Optional[Numerics] = None):
    """What training does to a loaded model: checkpointing, k-bit preparation, LoRA or full unfreeze.
    ``lldm-dpo plan`` runs it on a model that allocates nothing."""
    numerics = numerics or config_numerics(cfg)
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
