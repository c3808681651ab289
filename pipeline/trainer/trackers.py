"""Experiment trackers (``train --report-to``), through accelerate's tracker API.

``metrics.parquet`` is always written (it is the data contract). TensorBoard
(the default) is written by ``pipeline.trainer.metrics.MetricsWriter`` itself, which
purges the events a killed run left past its checkpoint on resume; every other
tracker accelerate knows (wandb, mlflow, comet_ml, aim, dvclive, trackio,
swanlab, clearml, or one registered with ``accelerate.tracking.register_tracker_class``)
is started through ``Accelerator(log_with=...)`` and fed each logged row by
``AccelerateSink``. A requested tracker that is not installed is an error, never
silently dropped (accelerate alone would only log that at debug level).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.errors import ConfigError, UserError
from pipeline.trainer.hub import SECRET_FIELDS

TENSORBOARD = "tensorboard"
PROJECT_NAME = "lldm-dpo"
"""The project/experiment name given to the trackers when none of their environment variables is set."""

PROJECT_ENV = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME", "comet_ml": "COMET_PROJECT_NAME",
               "trackio": "TRACKIO_PROJECT", "swanlab": "SWANLAB_PROJECT", "clearml": "CLEARML_PROJECT"}
"""Each tracker's usual environment variable for its project (as transformers' integrations read them)."""

RUN_NAME_KEY = {"wandb": "name", "mlflow": "run_name", "trackio": "name", "swanlab": "experiment_name"}
"""The keyword each tracker's init takes the run's name by."""


def project_name(names: list[str], environ: Mapping[str, str] | None = None) -> str:
    """The project of this run's trackers: the first requested tracker's environment variable that is set
    (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, ...), else ``PROJECT_NAME``. accelerate passes one project to every
    tracker; MLflow's own tracker reads MLFLOW_EXPERIMENT_NAME first in any case."""
    env = os.environ if environ is None else environ
    return next((env[PROJECT_ENV[n]] for n in names if env.get(PROJECT_ENV.get(n, ""))), PROJECT_NAME)


def init_kwargs(names: list[str], run_name: str | None) -> dict[str, dict[str, Any]]:
    """accelerate's per-tracker init arguments giving the run its name (TrainingArguments' run_name)."""
    return {n: {RUN_NAME_KEY[n]: run_name} for n in names if n in RUN_NAME_KEY} if run_name else {}


def hf_tag(metric: str) -> str:
    """The name a tracker sees, as transformers' Trainer logs it: ``eval/...`` as it is, the rest ``train/...``."""
    return metric if metric.startswith(("eval/", "train/")) else f"train/{metric}"


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``none`` (or empty, or None) -> ``[]``."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(p).strip().lower() for p in parts if str(p).strip()]
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"report_to: 'none' cannot be combined with other trackers, got '{value}'")
        return []
    return list(dict.fromkeys(names))  # first mention kept, in order


def resolve_trackers(names: list[str]) -> list[str]:
    """Check every requested tracker is known and installed; expand ``all``. One-line UserError otherwise."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    known = sorted(LOGGER_TYPE_TO_CLASS)
    # Classes registered at run time (register_tracker_class) are available by construction.
    available = {str(t) for t in get_available_trackers()} | (set(LOGGER_TYPE_TO_CLASS) - {str(t) for t in LoggerType})
    out: list[str] = []
    for name in names:
        if name == "all":
            out += [n for n in sorted(available) if n not in out]
            continue
        if name not in known:
            raise UserError(f"--report-to {name}: unknown tracker; choose from {', '.join(known + ['all', 'none'])}")
        if name not in available and name != TENSORBOARD:
            raise UserError(f"--report-to {name}: the {name} package is not installed (pip install {name}), "
                            "or drop it from --report-to")
        if name == TENSORBOARD and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--report-to tensorboard: the tensorboard package is not installed "
                            "(pip install tensorboard), or pass --report-to none")
        if name not in out:
            out.append(name)
    return out


def _plain(value: Any) -> Any:
    """Tracker configs take bool/str/int/float/None only."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class AccelerateSink:
    """Feeds each metrics row to the trackers an Accelerator was built with (main process only).

    ``MetricsWriter`` hands it the measured values under the names trackers see (transformers' ``train/...``,
    ``eval/...``). The project comes from the trackers' environment variables (``project_name``), the run's name from ``run_name``.
    """

    def __init__(self, accelerator, config: Mapping[str, Any], run_name: str | None = None):
        self.accelerator = accelerator
        names = [str(getattr(t, "value", t)) for t in accelerator.log_with]
        config = {k: _plain(v) for k, v in config.items() if k not in SECRET_FIELDS}  # never a token
        accelerator.init_trackers(project_name(names), config=config,
                                  init_kwargs=init_kwargs(names, run_name))

    def __call__(self, row: Mapping[str, Any], step: int) -> None:
        self.accelerator.log(dict(row), step=step)

    def close(self) -> None:
        # Not Accelerator.end_training(): that also destroys the process group, which the
        # caller (and, under data parallel, the other processes) may still be using.
        for tracker in self.accelerator.trackers:
            tracker.finish()


def accelerator_trackers(names: list[str]) -> list[str]:
    """The trackers accelerate starts (TensorBoard is written by the metrics writer itself)."""
    return [n for n in names if n != TENSORBOARD]


def tracker_dir(run_dir: Path) -> str:
    """Where trackers that keep local files put them (accelerate's logging_dir)."""
    return str(Path(run_dir) / "trackers")
