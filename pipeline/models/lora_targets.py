"""LoRA's default targets, named without model code (the training configs' defaults read them at import)."""

LORA_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
"""LLaDA's block projections (pipeline.models re-exports them)."""
