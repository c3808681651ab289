"""``lldm-dpo sft``: masked-diffusion supervised fine-tuning, LLaDA's objective (pipeline/sft.py).

The recipe lives in the library (pipeline/trainer/sft_recipe.py: ``SFTRecipe.setup``, ``train``, ``save``), on the
same run-folder, logging, optimizer-step, resume and checkpoint machinery as train's; this stage is its command.
"""

from __future__ import annotations

from pipeline.stagecli import stage_command
from pipeline.trainer.sft_config import RANGES, SFTConfig, SFTResult  # noqa: F401
from pipeline.trainer.sft_recipe import SFTRecipe, load_start, run, sft_card  # noqa: F401


def _sft_action(cfg: SFTConfig, as_json: bool) -> None:
    from accelerate import PartialState

    from pipeline.stagecli import print_summary, summary_dict

    result = run(cfg)
    if PartialState().is_main_process:
        print_summary("sft", summary_dict(result), as_json)


command = stage_command(SFTConfig, _sft_action, positional={"data": True},
                        doc="Supervised fine-tuning with LLaDA's masked-diffusion objective.")
