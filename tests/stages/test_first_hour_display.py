"""What a new user reads at 80 columns: --help with room for its descriptions, query's floats at six
significant digits and a pair_id on one line (issue 32)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

PAIR_ID = "93cd77913cbd5ccd39cb00aa0c32b948"


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


def test_query_floats_at_six_digits_and_a_pair_id_on_one_line(monkeypatch, capsys):
    from pipeline.query.output import format_cell, print_table, table_cells

    assert format_cell(0.7291949572679925) == "0.729195" and format_cell(-1234567.891) == "-1.23457e+06"
    assert format_cell(18) == "18" and format_cell(None) == "NULL" and format_cell([1, 2]) == "[1, 2]"
    columns = ["pair_id", "ref_margin", "chosen_len", "rejected_len", "split", "prompt"]
    rows = [(PAIR_ID, 0.7291949572679925, 18, 18, "train", "What is 55 + 25?")]
    wide, cut = table_cells(columns, rows, width=200)
    assert wide[0][0] == PAIR_ID and not cut
    narrow, cut = table_cells(columns, rows, width=80)
    assert narrow[0][0] == PAIR_ID[:12] + "…" and cut and narrow[0][1] == "0.729195"

    monkeypatch.setenv("COLUMNS", "80")
    print_table(columns, rows)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert PAIR_ID[:12] + "…" in out and "0.729195" in out and "0.7291949572" not in out
    assert "--csv or --json print them whole" in out
