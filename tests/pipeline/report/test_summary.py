"""The closing summary of `run --rounds` holds every figure uncut at 80 columns; a table only when it fits."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.evaluation.intervals import credits_record, paired_difference_interval
from pipeline.report.rounds import COLUMNS, format_figure
from pipeline.report.summary import RoundsResult, fits_wide, print_rounds_summary


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


def test_fits_wide_counts_the_figures_whole():
    assert fits_wide(["a", "b"], [["0.123", "0.456"]], 80)
    assert not fits_wide(["name"] * 13, [["+0.050 [-0.010, +0.110]"] * 13], 120)
