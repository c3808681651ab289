"""``lldm-dpo sft``: masked-diffusion supervised fine-tuning, LLaDA's objective (pipeline/estimator/sft_objective.py).

The recipe lives in the library (pipeline/trainer/sft_recipe.py: ``SFTRecipe.setup``, ``train``, ``save``), on the
same run-folder, logging, optimizer-step, resume and checkpoint machinery as train's; this stage is its command.
"""

from __future__ import annotations

from pipeline.cli.commands import stage_command, summarize
from pipeline.trainer.sft_config import SFTConfig


def run(cfg: SFTConfig):
    """``pipeline.trainer.sft_recipe.run``, imported when the command runs (torch, transformers, accelerate):
    ``sft --help`` and a refused flag need only ``SFTConfig``."""
    from pipeline.trainer.sft_recipe import run as recipe_run

    return recipe_run(cfg)

command = stage_command(SFTConfig, summarize("sft", run, main_process_only=True), positional={"data": True},
                        doc="Supervised fine-tuning with LLaDA's masked-diffusion objective.")
