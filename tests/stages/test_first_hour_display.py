"""What a new user reads at 80 columns: --help with room for its descriptions (issue 32; query's floats and
pair_ids at 80 columns: tests/pipeline/query/test_output.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.mark.parametrize("command", ["train", "score-ref", "eval"])
def test_help_at_80_columns_gives_descriptions_room(command, monkeypatch):
    from stages.cli import build_app

    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(build_app(command), [command, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    # each flag's description wraps in a column of 40+ characters: a short one stays on one line
    text = {"train": "Peak AdamW learning rate.", "score-ref": "Global mask seed; masks depend only on (seed,",
            "eval": "Tokens generated per question."}[command]
    assert any(text in line for line in lines), res.output
    widths = [len(line) - 34 for line in lines if line.startswith(" " * 34) and line.strip()]
    assert widths and max(widths) >= 40


def test_help_on_a_wide_terminal_keeps_rich_panels(monkeypatch):
    from pipeline.cli.commands import help_markup_mode

    monkeypatch.setenv("COLUMNS", "160")
    assert help_markup_mode() == "rich"
    monkeypatch.setenv("COLUMNS", "80")
    assert help_markup_mode() is None
