"""A recipe's commands carry the user's own options as flags, in the stage's own spellings."""

from __future__ import annotations

from pipeline.plan.fitting import option_flags


def test_option_flags_spell_booleans_lists_and_values_and_leave_out_the_recipes_own():
    options = {"lora_r": 8, "gradient_checkpointing": False, "bf16": True, "lora_target_modules": ["q_proj", "v_proj"],
               "learning_rate": 1e-6, "dtype": None, "model": "llada-8b"}
    assert option_flags(options, {"lora_r", "model"}) == [
        "--no-gradient-checkpointing", "--bf16", "--lora-target-modules", "q_proj,v_proj", "--learning-rate", "1e-06"]
