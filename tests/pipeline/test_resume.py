"""pipeline.resume: which recorded settings differ (hand-made records)."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.resume import changed_settings, check_resume_config


def test_changed_settings_ignores_free_ones_and_settings_the_record_lacks():
    recorded = {"beta": 0.1, "learning_rate": 1e-5, "progress": True, "loss_weights": None}
    current = {"beta": 0.1, "learning_rate": 5e-4, "progress": False, "loss_weights": [1.0], "new_option": 3}
    assert changed_settings(recorded, current, free=("progress",)) == ["learning_rate", "loss_weights"]
    assert changed_settings({**recorded, "gone": 1}, recorded, free=()) == ["gone"]


def test_check_resume_config_names_the_setting_and_both_values(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("beta: 0.1\nlearning_rate: 1.0e-05\n")
    check_resume_config(path, {"beta": 0.1, "learning_rate": 1e-5}, free=())
    with pytest.raises(UserError, match=r"cannot resume with beta = 0.5; the run was started with beta = 0.1"):
        check_resume_config(path, {"beta": 0.5, "learning_rate": 1e-5}, free=())
    check_resume_config(tmp_path / "absent.yaml", {"beta": 0.5}, free=())  # nothing recorded: nothing to compare
