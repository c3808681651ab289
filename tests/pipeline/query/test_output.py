"""query's table: floats at six significant digits, a long identifier cut (not wrapped) when the table is wide."""

from __future__ import annotations

from pipeline.query.output import format_cell, print_table, table_cells

PAIR_ID = "93cd77913cbd5ccd39cb00aa0c32b948"


def test_query_floats_at_six_digits_and_a_pair_id_on_one_line(monkeypatch, capsys):
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
