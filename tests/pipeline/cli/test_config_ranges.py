"""Integer settings are range-checked to 64 bits (issue 24, item 7: `train --seed 18446744073709551616` was an
OverflowError traceback)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.core.errors import ConfigError
from stages.cli import app


def test_a_seed_beyond_64_bits_is_a_config_error(tmp_path):
    from stages.score_ref import ScoreRefConfig
    from stages.train import TrainConfig

    with pytest.raises(ConfigError, match="seed must fit in a signed 64-bit integer"):
        TrainConfig(seed=2**64)
    with pytest.raises(ConfigError, match="seed must fit in a signed 64-bit integer"):
        ScoreRefConfig(seed=2**63)
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1


def test_cli_seed_overflow_is_one_line(small_cache, tmp_path):
    res = CliRunner().invoke(app, ["train", str(small_cache), "--out", str(tmp_path / "r"), "--seed",
                                   "18446744073709551616", "--device", "cpu"])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    assert "seed must fit in a signed 64-bit integer" in res.stderr
