"""``lldm-dpo train``: DPO against the reference-score cache, one model in memory.

The recipe lives in the library (pipeline/trainer/): ``DPORecipe.setup`` (cache, policy, optimizer, start check
or resume), ``train`` (the loop) and ``save`` (the final model); this stage is its command.

The recipe (torch, transformers, accelerate) is imported when the command runs, not when it is parsed: ``train
--help`` and a refused flag need only ``TrainConfig``.
"""

from __future__ import annotations

from pipeline.cli.commands import stage_command, summarize
from pipeline.evaluation.intervals import format_accuracy
from pipeline.trainer.dpo_config import TrainConfig


def run(cfg: TrainConfig):
    """``pipeline.trainer.dpo_recipe.run``: setup, train, save under the run folder's lock, with lldm-dpo plan's
    memory check before the policy loads (it returns at once on the CPU)."""
    from pipeline.trainer.dpo_recipe import run as recipe_run

    return recipe_run(cfg, check_memory=check_memory)


def check_memory(cfg: TrainConfig, samples: int, length: int, prompt_length: int, device) -> None:
    """Refuse, before the policy loads, a run that lldm-dpo plan says does not fit ``device``."""
    from pipeline.plan import Shape, check_start

    check_start("train", cfg, Shape(samples, length, prompt_length), device)


def _intervals_as_text(data: dict) -> dict:
    """The table shows each accuracy's interval record as one line (JSON keeps the records)."""
    data.update({name: format_accuracy(rec) for name, rec in data.pop("intervals", {}).items()})
    return data


command = stage_command(TrainConfig, summarize("train", run, main_process_only=True, table=_intervals_as_text),
                        positional={"scores": True},
                        doc="Train the policy with DPO against the cached reference scores.")
