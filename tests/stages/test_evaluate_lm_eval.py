"""lldm-dpo eval --lm-eval-tasks: lm-eval tasks on the before and after models, into eval.json and the report."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import UserError
from stages.evaluate import EvalConfig, run


def _cfg(tmp_path, tasks_dir, **kw):
    return EvalConfig(**{**dict(model="micro", before="tiny", scores=None, out=tmp_path / "run",
                                lm_eval_tasks="lldm_test_mc", lm_eval_include_path=tasks_dir, samples=2,
                                chat_template=False, device="cpu"), **kw})


def test_lm_eval_tasks_before_and_after_in_eval_json(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")
    from pipeline.models import load_model
    from tests.pipeline.evaluation.test_lm_eval_model import MC_ITEMS, write_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks_dir = write_tasks(tmp_path / "tasks")
    result = run(_cfg(tmp_path, tasks_dir))
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    acc = data["lm_eval"]["lldm_test_mc/acc"]
    assert set(acc) == {"before", "after"} and result.lm_eval["lldm_test_mc/acc"] == acc
    for label, name in (("before", "tiny"), ("after", "micro")):  # each model's own number
        from pipeline.evaluation.lm_eval_model import run_tasks

        model, tok = load_model(name)
        direct = run_tasks(model, tok, ["lldm_test_mc"], include_path=tasks_dir, mc_samples=2, gen_length=64,
                           block_length=32, steps=64)
        assert acc[label] == direct["lldm_test_mc/acc"]
        assert acc[label] * len(MC_ITEMS) == pytest.approx(round(acc[label] * len(MC_ITEMS)))

    # lm-eval's accuracies with their document counts and intervals, the change with its paired interval
    iv = data["intervals"]["lm_eval/lldm_test_mc/acc"]
    assert iv["before"]["n"] == iv["after"]["n"] == len(MC_ITEMS) and iv["after"]["value"] == acc["after"]
    assert iv["difference"]["difference"] == pytest.approx(acc["after"] - acc["before"])

    from pipeline.report.visual import eval_rows

    assert ("lm_eval/lldm_test_mc/acc", acc["before"], acc["after"], None) in eval_rows(data)


def test_unknown_task_and_missing_harness_are_one_line(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")
    from tests.pipeline.evaluation.test_lm_eval_model import write_tasks

    tasks_dir = write_tasks(tmp_path / "tasks")
    with pytest.raises(UserError, match=r"--lm-eval-tasks: no lm-eval task named lldm_nope \(not among"):
        from pipeline.evaluation.lm_eval_model import task_manager

        # Only the local folder is indexed when it defines every task; otherwise lm-eval's own tasks are too.
        monkeypatch.setattr("lm_eval.tasks.TaskManager.__init__", _local_only(tasks_dir))
        task_manager(["lldm_nope"], str(tasks_dir))

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"^--lm-eval-tasks needs lm-evaluation-harness: pip install 'lldm-dpo\[eval"):
        run(_cfg(tmp_path, tasks_dir))


def _local_only(tasks_dir):
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__

    def patched(self, *args, include_defaults=True, **kwargs):
        init(self, *args, include_defaults=False, **kwargs)  # skip indexing lm-eval's built-in tasks (slow)

    return patched
