"""Trackers: the project from its usual environment variable, the run's name, transformers' metric names."""

from __future__ import annotations

from pipeline.trainer.trackers import PROJECT_NAME, hf_tag, init_kwargs, parse_report_to, project_name


def test_project_comes_from_the_trackers_environment_variables():
    assert project_name(["wandb"], {"WANDB_PROJECT": "my-dpo"}) == "my-dpo"
    assert project_name(["mlflow"], {"MLFLOW_EXPERIMENT_NAME": "exp"}) == "exp"
    assert project_name(["comet_ml", "wandb"], {"WANDB_PROJECT": "w", "COMET_PROJECT_NAME": "c"}) == "c"
    assert project_name(["wandb"], {"MLFLOW_EXPERIMENT_NAME": "exp"}) == PROJECT_NAME  # not wandb's variable
    assert project_name(["wandb"], {}) == PROJECT_NAME


def test_run_name_reaches_each_tracker_by_its_keyword():
    assert init_kwargs(["wandb", "mlflow", "aim"], "run-1") == {"wandb": {"name": "run-1"},
                                                                 "mlflow": {"run_name": "run-1"}}
    assert init_kwargs(["wandb"], None) == {}


def test_trackers_see_transformers_names():
    assert [hf_tag(m) for m in ("loss", "rewards/accuracies", "eval/rewards/accuracies", "learning_rate")] == \
        ["train/loss", "train/rewards/accuracies", "eval/rewards/accuracies", "train/learning_rate"]


def test_report_to_takes_trl_s_list_form():
    assert parse_report_to(["wandb"]) == ["wandb"]
    assert parse_report_to(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    assert parse_report_to("none") == [] and parse_report_to(["none"]) == []
    assert parse_report_to("all") == ["all"]
