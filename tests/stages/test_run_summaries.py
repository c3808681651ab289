"""The closing summary of `run` holds every figure uncut at 80 columns, eval's intervals with it (the rounds'
summary: tests/pipeline/report/test_summary.py)."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.evaluation.intervals import credits_record, paired_difference_interval
from pipeline.report.summary import RunResult
from stages.run_all import print_run_summary


def _render(fn, result, width: int) -> str:
    buf = io.StringIO()
    fn(result, Console(file=buf, width=width, force_terminal=False, color_system=None))
    return buf.getvalue()


def test_run_summary_at_80_columns_holds_every_figure_uncut():
    b, a = [1, 0, 0, 1, 0, 0, 0, 0] * 4, [1, 1, 0, 1, 0, 0, 1, 0] * 4
    result = RunResult(out="o", seconds=83.0, stage_seconds={}, pairs={},
                       preference_accuracy={"before": 0.503906, "after": 0.671875},
                       elbo_accuracy={"before": 0.515625, "after": 0.6640625}, task_accuracy={},
                       choice_accuracy={"before": 0.25, "after": 0.5}, final_train_loss=0.5,
                       final_train_reward_accuracy=0.75, artefacts={"pairs": "runs/default/pairs.arrow"},
                       example_query="q",
                       intervals={"choice_accuracy": {"before": credits_record(b), "after": credits_record(a),
                                                      "difference": paired_difference_interval(b, a)}})
    out = _render(print_run_summary, result, 60)
    assert "…" not in out
    for figure in ("0.504", "0.672", "0.516", "0.664", "ELBO accuracy (B(chosen) > B(rejected))"):
        assert figure in out.replace("\n│", "").replace(" │", ""), (figure, out)


def test_run_passes_its_progress_to_every_stage_and_a_section_wins(tmp_path):
    """`run` no longer silences its stages: each gets run's progress (on by default), a section's own wins."""
    from stages.run_all import merged_config, stage_configs
    from stages.run_rounds import round_configs

    single = stage_configs(merged_config(None, {"out": tmp_path / "a", "rounds": 0}))
    assert [c.progress for c in single] == [True] * 4
    quiet = stage_configs(merged_config(None, {"out": tmp_path / "b", "rounds": 0, "progress": False}))
    assert [c.progress for c in quiet] == [False] * 4
    mixed = stage_configs(merged_config(None, {"out": tmp_path / "c", "rounds": 0, "eval": {"progress": False}}))
    assert [c.progress for c in mixed] == [True, True, True, False]
    cfg = merged_config(None, {"out": tmp_path / "d"})
    assert cfg.rounds and [c.progress for c in round_configs(cfg, 1, cfg.model, cfg.model)] == [True] * 5
