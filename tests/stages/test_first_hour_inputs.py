"""The bad inputs a new user met that got past the guards (issue 32): each is a one-line error now, naming
what to do, with nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli.loading import load_config
from pipeline.core.errors import ConfigError, UserError

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", device="cpu", progress=False,
            tensorboard=False, max_steps=2, batch_size=2, save_every=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_score_ref_refuses_a_sample_count_no_memory_holds(small_pairs, tmp_path):
    from stages.score_ref import ScoreRefConfig

    with pytest.raises(ConfigError, match=r"samples must be in \[1, 4096\], got 1000000000000"):
        load_config(ScoreRefConfig, None, {"pairs": small_pairs, "out": tmp_path / "c", "samples": 10**12})
    line = _one_line_error(_cli("score-ref", str(small_pairs), "--out", str(tmp_path / "c"), "--samples",
                                "1000000000000", "--device", "cpu"))
    assert "samples must be in [1, 4096]" in line and not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", [-5, "-5", -2])
def test_train_max_steps_below_minus_one_is_refused_not_made_minus_one(value):
    from stages.train import TrainConfig

    with pytest.raises(ConfigError, match=r"max_steps must be >= 0 \(or -1: from the epochs"):
        load_config(TrainConfig, None, {"max_steps": value})
    assert load_config(TrainConfig, None, {"max_steps": -1}).max_steps == 0  # TrainingArguments' -1 still means it


def test_train_out_in_the_cache_folder_is_refused(small_cache):
    from stages.train import TrainConfig

    for out in (small_cache, small_cache / "run"):
        with pytest.raises(ConfigError, match="reference cache folder .* choose another --out"):
            load_config(TrainConfig, None, {"scores": small_cache, "out": out})


def test_resuming_from_another_caches_checkpoint_says_the_data_differs(small_cache, tmp_path):
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref
    from stages.train import TrainConfig
    from stages.train import run as train
    from tests.conftest import ingest_pairs

    other = tmp_path / "other-cache"
    score_ref(ScoreRefConfig(pairs=ingest_pairs(tmp_path, n=14, seed=5), model="micro", out=other, samples=3,
                             draws=2, pairs_per_part=4, device="cpu", progress=False))
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, **{**FAST, "max_steps": 0, "epochs": 1}))  # 7 steps
    with pytest.raises(UserError) as err:
        train(TrainConfig(scores=other, out=out, resume=True, **{**FAST, "max_steps": 0, "epochs": 1}))  # 5
    message = str(err.value)
    assert "cannot resume: the data differs" in message and "total_steps" not in message


def test_score_ref_out_onto_a_file_is_a_sentence_not_file_exists(small_pairs, tmp_path):
    target = tmp_path / "scores.parquet"
    target.write_text("mine")
    line = _one_line_error(_cli("score-ref", str(small_pairs), "--out", str(target), "--device", "cpu"))
    assert "a file is there, and the" in line and "choose another --out" in line and "File exists" not in line
    assert target.read_text() == "mine"


@pytest.mark.parametrize("stage,field", [("train", "out"), ("score_ref", "out"), ("ingest", "out"),
                                         ("ingest", "quarantine")])
def test_an_output_name_with_a_newline_is_refused(stage, field, tmp_path):
    from stages.run_stages import stage_classes

    cls = stage_classes()[stage]
    with pytest.raises(ConfigError, match=rf"{field} '.*\\nb' has a control character"):
        load_config(cls, None, {field: str(tmp_path / "a\nb")})
    assert not list(tmp_path.iterdir())
