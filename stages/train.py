"""``lldm-dpo train``: DPO against the reference-score cache, one model in memory.

The recipe lives in the library (pipeline/trainer/): ``DPORecipe.setup`` (cache, policy, optimizer, start check
or resume), ``train`` (the loop) and ``save`` (the final model); this stage is its command. The names below are
re-exported for the benches and callers that import them from here.
"""

from __future__ import annotations

from pipeline.intervals import format_accuracy
from pipeline.replay import PairBatch, replay_requests  # noqa: F401  (the batch type and its requests)
from pipeline.stagecli import stage_command, summarize
from pipeline.trainer.dpo_checks import epochs_needed, setup_policy  # noqa: F401
from pipeline.trainer.dpo_config import TrainConfig
from pipeline.trainer.dpo_recipe import run
from pipeline.trainer.dpo_step import TrainContext, batch_loss, micro_step, policy_terms, reference_means  # noqa: F401
from pipeline.training import check_run_outputs, fresh_accelerator, make_optimizer, micro_batch_rows  # noqa: F401


def _intervals_as_text(data: dict) -> dict:
    """The table shows each accuracy's interval record as one line (JSON keeps the records)."""
    data.update({name: format_accuracy(rec) for name, rec in data.pop("intervals", {}).items()})
    return data


command = stage_command(TrainConfig, summarize("train", run, main_process_only=True, table=_intervals_as_text),
                        positional={"scores": True},
                        doc="Train the policy with DPO against the cached reference scores.")
