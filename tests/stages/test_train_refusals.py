"""What train refuses, each with a one-line error saying what to do: a used run folder (until --overwrite),
a resume with other settings, a policy with another tokenizer than the cache's, sequence micro-batches with
LoRA dropout."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import UserError
from pipeline.models import load_model
from stages.train import TrainConfig
from stages.train import run as train

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, device="cpu", progress=False, tensorboard=False)


def test_fresh_train_into_a_used_run_folder_is_refused_then_overwritten(small_cache, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, max_steps=1, batch_size=2, **FAST))
    with pytest.raises(UserError, match=r"already holds a run \(final, metrics.parquet\).*--overwrite"):
        train(TrainConfig(scores=small_cache, out=out, max_steps=1, batch_size=2, **FAST))
    train(TrainConfig(scores=small_cache, out=out, max_steps=2, batch_size=2, overwrite=True, **FAST))
    assert pq.read_table(out / "metrics.parquet").num_rows == 2


def test_resume_with_another_batch_size_is_refused(small_cache, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, max_steps=4, batch_size=2, save_every=2, **FAST))
    shutil.rmtree(out / "final")
    with pytest.raises(UserError, match=r"cannot resume with batch_size = 3; the run was started with batch_size = 2"):
        train(TrainConfig(scores=small_cache, out=out, max_steps=4, batch_size=3, resume=True, **FAST))


def test_policy_with_another_tokenizer_is_refused(small_cache, tmp_path):
    model, tok = load_model("micro")
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    with pytest.raises(UserError, match="tokenizer differs from the one the cache was scored with"):
        train(TrainConfig(scores=small_cache, out=tmp_path / "r", model=str(folder), allow_different_init=True,
                          max_steps=1, **FAST))


def test_sequence_microbatch_with_lora_dropout_is_refused():
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="sequence_microbatch needs lora_dropout = 0"):
        TrainConfig(sequence_microbatch=2, lora_r=4, lora_dropout=0.1)
