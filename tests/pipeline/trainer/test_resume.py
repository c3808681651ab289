"""pipeline.trainer.resume: which recorded settings differ (hand-made records)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.trainer.resume import changed_settings, check_resume_config


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


def test_resume_from_checkpoint_is_true_false_or_a_path():
    from pipeline.core.errors import ConfigError
    from pipeline.trainer.resume import resume_setting

    assert resume_setting(False, None) == (False, None)
    assert resume_setting(True, None) == (True, None)
    assert resume_setting(False, True) == (True, None)
    assert resume_setting(False, "true") == (True, None)  # a flag's text
    assert resume_setting(True, "false") == (True, None)  # --resume stands
    assert resume_setting(False, "runs/a/checkpoint-4") == (True, "runs/a/checkpoint-4")
    with pytest.raises(ConfigError, match="resume_from_checkpoint must be true, false or a checkpoint"):
        resume_setting(False, 3)


def _checkpoint(folder, step, config="beta: 0.1\n"):
    from pipeline.trainer.checkpoint import RECORD, STATE

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / RECORD).write_text("{}")
    (path / "config.yaml").write_text(config)
    (path / STATE).write_text("{}")
    return path


def test_find_resume_checkpoint_newest_or_the_given_folder_with_one_line_errors(tmp_path):
    from pipeline.trainer.resume import find_resume_checkpoint

    run = tmp_path / "run"
    with pytest.raises(UserError, match="holds no complete checkpoint-N folder"):
        find_resume_checkpoint(run, None)
    _checkpoint(run, 2)
    newest = _checkpoint(run, 10)
    assert find_resume_checkpoint(run, None) == newest
    assert find_resume_checkpoint(tmp_path / "elsewhere", str(run / "checkpoint-2")) == run / "checkpoint-2"
    with pytest.raises(UserError, match="it is a run folder: give one of its checkpoints \\(checkpoint-10"):
        find_resume_checkpoint(tmp_path / "x", str(run))
    with pytest.raises(UserError, match="no such checkpoint folder"):
        find_resume_checkpoint(run, str(run / "checkpoint-3"))
    old = tmp_path / "old"
    (old / "checkpoints" / "step-0000002").mkdir(parents=True)
    for given in (None, str(old / "checkpoints" / "step-0000002")):
        with pytest.raises(UserError, match="layout before transformers'") as err:
            find_resume_checkpoint(old, given)
        assert "\n" not in str(err.value)


def test_check_resume_source_compares_the_checkpoints_own_config(tmp_path):
    from pipeline.trainer.resume import check_resume_source

    ckpt = _checkpoint(tmp_path / "a", 4, config="beta: 0.1\nprogress: true\n")
    out = tmp_path / "b"  # another run folder, empty: the checkpoint's record decides
    assert check_resume_source(out, str(ckpt), {"beta": 0.1, "progress": False}, free=("progress",)) == ckpt
    with pytest.raises(UserError, match=r"checkpoint-4/config.yaml: cannot resume with beta = 0.5"):
        check_resume_source(out, str(ckpt), {"beta": 0.5, "progress": True}, free=())
    out.mkdir()
    (out / "config.yaml").write_text("beta: 0.3\n")  # a folder holding another run's record
    with pytest.raises(UserError, match=r"b/config.yaml: cannot resume with beta = 0.1"):
        check_resume_source(out, str(ckpt), {"beta": 0.1, "progress": True}, free=())
