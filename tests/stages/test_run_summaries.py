"""The closing summaries of `run` and `run --rounds` hold every figure uncut at 80 columns."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.evaluation.intervals import credits_record, paired_difference_interval
from pipeline.report.rounds import COLUMNS, format_figure
from pipeline.report.summary import RoundsResult, RunResult, fits_wide, print_rounds_summary
from stages.run_all import print_run_summary


def _render(fn, result, width: int) -> str:
    buf = io.StringIO()
    fn(result, Console(file=buf, width=width, force_terminal=False, color_system=None))
    return buf.getvalue()


def _round(r: int) -> dict:
    before, after = [1, 0, 0, 1, 0, 0, 0, 0] * 25, [1, 1, 0, 1, 0, 0, 1, 0] * 25
    return {"round": r, "pairs": 123 + r, "pairs_reference_chosen": 7, "sample_accuracy": 0.3125 + r / 100,
            "pass_at_k": 0.6875, "questions_all_correct": 11, "questions_all_wrong": 29,
            "final_train_loss": 0.912345, "final_train_reward_accuracy": 0.8125, "preference_accuracy": 0.734375,
            "task_accuracy": 0.5 + r / 1000, "task_accuracy_interval": credits_record(after),
            "initial_task_accuracy_interval": credits_record(before),
            "task_accuracy_difference": paired_difference_interval(before, after)}


def _rounds_result() -> RoundsResult:
    return RoundsResult(out="runs/x", seconds=831.0, rounds=[_round(1), _round(2)], initial_task_accuracy=0.25,
                        report="runs/x/rounds.md", resumed_rounds=0, example_query="lldm-dpo query --samples x")


def test_rounds_summary_at_80_columns_holds_every_figure_uncut():
    result = _rounds_result()
    out = _render(print_rounds_summary, result, 80)
    assert "…" not in out and max(len(line) for line in out.splitlines() if "│" in line) <= 80
    for s in result.rounds:
        for key, header in COLUMNS:
            assert format_figure(s.get(key)) in out, (header, format_figure(s.get(key)), out)
    for header in ("pass@k", "vs original [95% CI]", "pref. acc. (held-out)"):
        assert header in out
    # wide enough: one table across rounds, a row per round
    wide = _render(print_rounds_summary, result, 240)
    assert "…" not in wide and "round 1" not in wide
    assert any(line.count("│") >= len(COLUMNS) for line in wide.splitlines())


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


def test_fits_wide_counts_the_figures_whole():
    assert fits_wide(["a", "b"], [["0.123", "0.456"]], 80)
    assert not fits_wide(["name"] * 13, [["+0.050 [-0.010, +0.110]"] * 13], 120)


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


def test_stage_timer_names_the_stage_and_the_run_time(capsys):
    import time

    from pipeline.core.progress import stage_timer

    lines, times = [], {}
    timed = stage_timer(lines.append, times, 2, since=time.perf_counter() - 65)
    assert timed("eval", lambda cfg: cfg + 1, 41) == 42
    assert lines[0] == "[round 2: eval] ... (run 1m05s so far)"
    assert lines[1].startswith("[round 2: eval] done in 0s (run 1m05s)") and "eval" in times
