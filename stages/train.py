"""``lldm-dpo train``: DPO against the reference-score cache, one model in memory.

The recipe lives in the library (pipeline/trainer/): ``DPORecipe.setup`` (cache, policy, optimizer, start check
or resume), ``train`` (the loop) and ``save`` (the final model); this stage is its command. The names below are
re-exported for the benches and callers that import them from here.
"""

from __future__ import annotations

from pipeline.replay import PairBatch, replay_requests  # noqa: F401  (the batch type and its requests)
from pipeline.stagecli import stage_command
from pipeline.trainer.dpo_checks import (  # noqa: F401
    check_draws,
    epochs_needed,
    evaluate_heldout,
    setup_policy,
    start_check,
)
from pipeline.trainer.dpo_config import RANGES, RESUME_FREE, TrainConfig, TrainResult  # noqa: F401
from pipeline.trainer.dpo_recipe import DPORecipe, run  # noqa: F401
from pipeline.trainer.dpo_step import (  # noqa: F401
    MicroStats,
    TrainContext,
    batch_loss,
    micro_step,
    policy_terms,
    reference_means,
)
from pipeline.training import (  # noqa: F401  (shared with sft; importable from here as before)
    adapt_policy,
    check_run_outputs,
    epoch_order,
    fresh_accelerator,
    make_optimizer,
    micro_batch_rows,
)


def _train_action(cfg: TrainConfig, as_json: bool) -> None:
    from accelerate import PartialState

    from pipeline.stagecli import print_summary, summary_dict

    result = run(cfg)
    if PartialState().is_main_process:
        data = summary_dict(result)
        if not as_json:
            from pipeline.intervals import format_accuracy

            data.update({name: format_accuracy(rec) for name, rec in data.pop("intervals", {}).items()})
        print_summary("train", data, as_json)


command = stage_command(TrainConfig, _train_action, positional={"scores": True},
                        doc="Train the policy with DPO against the cached reference scores.")
