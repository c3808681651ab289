"""query reads only the files behind its views (issue 24, item 6): DuckDB's external access is limited to them,
--allow-read PATH adds more; a bad or cut Parquet is named (item 7)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.core.errors import UserError
from stages.cli import app
from stages.query import QueryConfig, run


@pytest.fixture()
def secret(tmp_path):
    path = tmp_path / "outside" / "secret.csv"
    path.parent.mkdir()
    path.write_text("name,value\npassword,hunter2\n")
    return path


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('{p}')",
    "SELECT * FROM glob('{d}/*')",
    "SELECT * FROM read_csv('{p}')",
    "SELECT * FROM read_csv_auto('{p}')",
    "SELECT * FROM '{p}'",
    "SELECT count(*) FROM scores, read_text('{p}')",
])
def test_a_query_cannot_read_a_file_outside_the_views(small_pairs, small_cache, secret, sql):
    with pytest.raises(UserError, match="query failed: Permission Error"):
        run(QueryConfig(sql=sql.format(p=secret, d=secret.parent), pairs=small_pairs, scores=small_cache))


def test_the_views_still_read_and_allow_read_opens_more(small_pairs, small_cache, secret):
    cols, rows = run(QueryConfig(sql="SELECT count(*) FROM pairs JOIN scores USING (pair_id)", pairs=small_pairs,
                                 scores=small_cache))
    assert rows[0][0] > 0
    sql = f"SELECT value FROM read_csv('{secret}')"
    assert run(QueryConfig(sql=sql, pairs=small_pairs, allow_read=[secret]))[1] == [("hunter2",)]
    assert run(QueryConfig(sql=sql, pairs=small_pairs, allow_read=[secret.parent]))[1] == [("hunter2",)]
    # a statement cannot lift the limit again
    with pytest.raises(UserError):
        run(QueryConfig(sql="SET enable_external_access = true", pairs=small_pairs))


def test_cli_allow_read_and_the_refusal(small_pairs, secret):
    sql = f"SELECT count(*) AS n FROM read_csv('{secret}')"
    res = CliRunner().invoke(app, ["query", sql, "--pairs", str(small_pairs), "--csv"])
    assert res.exit_code == 1 and "Permission Error" in res.stderr and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["query", sql, "--pairs", str(small_pairs), "--csv", "--allow-read", str(secret)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["n", "1"]


@pytest.mark.parametrize("damage", ["junk", "cut"])
@pytest.mark.parametrize("name", ["metrics.parquet", "task_results.parquet"])
def test_a_bad_or_cut_parquet_is_named(tmp_path, damage, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pq.write_table(pa.table({"step": [1, 2], "loss": [0.7, 0.6]}), run_dir / "metrics.parquet")
    pq.write_table(pa.table({"model": ["after"], "correct": [True]}), run_dir / "task_results.parquet")
    path = run_dir / name
    data = path.read_bytes()
    path.write_bytes(b"not parquet at all" if damage == "junk" else data[: len(data) // 2])
    res = CliRunner().invoke(app, ["query", "SELECT count(*) FROM metrics", "--run", str(run_dir)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert res.stderr.startswith(f"error: {path}: not a readable Parquet file") and res.stderr.count("\n") == 1
