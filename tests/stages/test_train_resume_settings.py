"""train --resume continues the same run: a changed setting that shapes it is refused (named, both values), the
run's recorded config.yaml is never rewritten; and --device means what it means in every stage (issue 24)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import UserError
from stages.train import TrainConfig, run

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", beta=0.5, device="cpu", progress=False,
            tensorboard=False, max_steps=2, batch_size=2, save_every=1)


@pytest.fixture(scope="module")
def finished_run(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    run(TrainConfig(scores=small_cache, out=out, **FAST))
    return out


@pytest.mark.parametrize("change,value,shown", [
    ("learning_rate", 5e-4, "learning_rate = 0.0005; the run was started with learning_rate = 0.003"),
    ("beta", 0.1, "beta = 0.1; the run was started with beta = 0.5"),
    ("scheduler", "cosine", 'scheduler = "cosine"; the run was started with scheduler = "constant"'),
    ("loss", "sigmoid,sft", 'loss = "sigmoid,sft"; the run was started with loss = "sigmoid"'),
    ("sft_weight", 0.5, "sft_weight = 0.5"),
    ("weight_decay", 0.1, "weight_decay = 0.1"),
    ("lora_alpha", 8, "lora_alpha = 8; the run was started with lora_alpha = 16"),
    ("max_grad_norm", 0.5, "max_grad_norm = 0.5"),
])
def test_resume_refuses_a_setting_that_shapes_the_run(small_cache, finished_run, change, value, shown):
    recorded = (finished_run / "config.yaml").read_bytes()
    with pytest.raises(UserError, match="cannot resume with") as err:
        run(TrainConfig(scores=small_cache, out=finished_run, resume=True, **{**FAST, change: value}))
    assert shown in str(err.value)
    assert (finished_run / "config.yaml").read_bytes() == recorded  # the run's record is untouched


def test_resume_with_the_same_settings_keeps_the_recorded_config(small_cache, finished_run):
    recorded = (finished_run / "config.yaml").read_bytes()
    # keep_checkpoints and log_every change no step's result: allowed; config.yaml still says how the run started
    result = run(TrainConfig(scores=small_cache, out=finished_run, resume=True, **{**FAST, "keep_checkpoints": 3,
                                                                                    "log_every": 2}))
    assert result.steps == 2
    assert (finished_run / "config.yaml").read_bytes() == recorded


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_an_error_in_train_too(small_cache, tmp_path):
    with pytest.raises(UserError, match="device 'cuda' requested but CUDA is not available"):
        run(TrainConfig(scores=small_cache, out=tmp_path / "run", **{**FAST, "device": "cuda"}))
    assert not (tmp_path / "run").exists()
