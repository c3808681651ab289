"""The run's accelerator (pipeline/trainer/accelerator.py): what it refuses, in one line."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.trainer.accelerator import fresh_accelerator


def test_an_accelerate_config_with_deepspeed_is_refused_in_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for distributed_type DEEPSPEED
    for command in ("train", "sft"):
        with pytest.raises(UserError) as err:
            fresh_accelerator("no", cpu=True, command=command)
        text = str(err.value)
        assert text.startswith(f"{command}: the accelerate config's distributed_type DEEPSPEED is refused")
        assert "untested" in text and "fsdp.yaml" in text and "\n" not in text
