"""``lldm-dpo query``: the view contract, presets, output formats and one-line errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.core.errors import UserError
from pipeline.core.schemas import METRIC_COLUMNS, SCORES_SCHEMA
from pipeline.query.sql import execute
from pipeline.query.views import open_connection
from stages.cli import app
from stages.ingest import IngestConfig, run
from stages.query import preset_sql, presets

CONTRACT = {
    "pairs": ["pair_id", "prompt", "chosen", "rejected", "split", "source"],
    "quarantine": ["source", "line", "reason", "message", "raw"],
    "scores": ["pair_id", "ref_chosen_elbo", "ref_rejected_elbo", "ref_margin", "chosen_len", "rejected_len",
               "prompt_len", "truncated", "prompt_ids", "chosen_ids", "rejected_ids", "split"],
    "metrics": ["step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "learning_rate", "grad_norm"],
}


@pytest.fixture()
def files(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(6)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n" + json.dumps(rows[0]) + "\n")
    res = run(IngestConfig(inputs=[str(src)], out=str(tmp_path / "pairs.arrow"), progress=False))
    ids = pa.ipc.open_file(res.out).read_all().column("pair_id").to_pylist()

    scores = tmp_path / "scores"
    scores.mkdir()
    for part, chunk in enumerate((ids[:3], ids[3:])):
        recs = []
        for j, pid in enumerate(chunk):
            c, r = -10.0 - j, -12.0 + 3 * j
            recs.append({
                "pair_id": pid, "split": "train", "prompt_ids": [1, 2], "chosen_ids": [3, 4, 9], "rejected_ids": [5, 9],
                "prompt_len": 2, "chosen_len": 3, "rejected_len": 2, "truncated": j == 2,
                "chosen_seeds": [1], "rejected_seeds": [2], "chosen_mask_counts": [[1, 2]], "rejected_mask_counts": [[1, 2]],
                "chosen_timesteps": [[0.3, 0.6]], "rejected_timesteps": [[0.5, 1.0]],
                "ref_chosen_terms": [[c, c]], "ref_rejected_terms": [[r, r]],
                "ref_chosen_elbo": c, "ref_rejected_elbo": r, "ref_margin": c - r,
            })
        pq.write_table(pa.Table.from_pylist(recs, schema=SCORES_SCHEMA), scores / f"part-{part:05d}.parquet")
    from pipeline.core.atomic import file_sha256  # a finished cache: query reads the parts its manifest lists, checked

    names = [f"part-{part:05d}.parquet" for part in range(2)]
    (scores / "manifest.json").write_text(json.dumps({"fingerprint": {}, "parts": names,
                                                      "part_sha256": {n: file_sha256(scores / n) for n in names}}))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = {name: [float(i) for i in range(4)] for name in METRIC_COLUMNS}
    metrics["step"] = [1, 2, 3, 4]
    pq.write_table(pa.table(metrics), run_dir / "metrics.parquet")
    return {"pairs": Path(res.out), "scores": scores, "run": run_dir, "ids": ids, "quarantine": Path(res.quarantine)}


def test_views_expose_contract_columns(files):
    con = open_connection(pairs=files["pairs"], scores=files["scores"], run=files["run"])
    for view, cols in CONTRACT.items():
        names, _ = execute(con, f"SELECT * FROM {view} LIMIT 0")
        assert set(cols) <= set(names), (view, set(cols) - set(names))
    assert execute(con, "SELECT count(*) FROM pairs")[1] == [(6,)]
    assert execute(con, "SELECT count(*) FROM scores")[1] == [(6,)]
    _, rows = execute(con, "SELECT line, reason FROM quarantine ORDER BY line")
    assert rows == [(7, "invalid_json"), (8, "duplicate_pair")]
    _, rows = execute(con, 'SELECT max("rewards/chosen") FROM metrics')
    assert rows == [(3.0,)]
    # scores join pairs by pair_id
    _, rows = execute(con, "SELECT count(*) FROM scores JOIN pairs USING (pair_id)")
    assert rows == [(6,)]


def test_quarantine_absent_is_empty_view_and_explicit_path(files, tmp_path):
    files["quarantine"].unlink()
    con = open_connection(pairs=files["pairs"])
    assert execute(con, "SELECT count(*) FROM quarantine")[1] == [(0,)]
    other = tmp_path / "elsewhere.jsonl"
    other.write_text(json.dumps({"source": "x", "line": 3, "reason": "too_long", "message": "m", "raw": "r"}) + "\n")
    con = open_connection(quarantine=other)
    assert execute(con, "SELECT source, line, reason FROM quarantine")[1] == [("x", 3, "too_long")]
    with pytest.raises(UserError, match="quarantine file not found"):
        open_connection(quarantine=tmp_path / "missing.jsonl")


def test_every_preset_runs(files):
    assert set(presets()) >= {"scores_summary", "ref_prefers_rejected", "margin_vs_length", "pairs_summary"}
    con = open_connection(pairs=files["pairs"], scores=files["scores"], run=files["run"])
    for name in presets():
        if "needs --samples" in preset_sql(name):
            continue  # make-pairs output: tests/stages/test_make_pairs.py runs it
        cols, rows = execute(con, preset_sql(name))
        assert cols and rows, name
    cols, rows = execute(con, preset_sql("ref_prefers_rejected"))
    margins = [dict(zip(cols, r))["ref_margin"] for r in rows]
    assert margins == sorted(margins) and all(m < 0 for m in margins) and len(margins) == 4
    cols, rows = execute(con, preset_sql("scores_summary"))
    summary = dict(zip(cols, rows[0]))
    assert summary["pairs"] == 6 and summary["truncated"] == 2 and summary["ref_prefers_chosen"] == pytest.approx(2 / 6, abs=1e-4)


def test_cli_json_csv_table(files):
    runner = CliRunner()
    base = ["query", "--pairs", str(files["pairs"])]
    res = runner.invoke(app, base + ["SELECT pair_id, split FROM pairs ORDER BY source", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["pair_id"] for r in rows] == files["ids"] and rows[0]["split"] == "train"
    res = runner.invoke(app, ["query", "--scores", str(files["scores"]), "SELECT pair_id, chosen_ids FROM scores ORDER BY pair_id", "--csv"])
    assert res.exit_code == 0, res.output
    parsed = list(csv.reader(io.StringIO(res.stdout)))
    assert parsed[0] == ["pair_id", "chosen_ids"] and json.loads(parsed[1][1]) == [3, 4, 9] and len(parsed) == 7
    res = runner.invoke(app, base + ["--preset", "pairs_summary"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "duplicate_pair" in res.stdout and "invalid_json" in res.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["SELEC nonsense FROM pairs"], "query failed"),
        (["SELECT * FROM scores"], "query failed"),  # view not given
        (["--preset", "nope"], "unknown preset"),
        (["SELECT 1", "--scores", "/nonexistent/dir"], "no part-*.parquet"),
        (["SELECT 1", "--run", "/nonexistent/run"], "metrics file not found"),
        (["SELECT 1", "--json", "--csv"], "one of --json and --csv"),
        ([], "no SQL given"),
    ],
)
def test_errors_are_one_line(files, args, fragment):
    res = CliRunner().invoke(app, ["query", "--pairs", str(files["pairs"])] + args)
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and fragment in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_pairs_file(tmp_path):
    with pytest.raises(UserError, match="pairs file not found"):
        open_connection(pairs=tmp_path / "nope.arrow")


@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM pairs) TO '{out}'",
    "EXPORT DATABASE '{dir}'",
    "ATTACH '{dir}/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
    "SET threads = 1",
    "PRAGMA enable_profiling='json'",
])
def test_statements_that_write_are_refused_unless_allowed(files, tmp_path, sql):
    out = tmp_path / "leak.csv"
    text = sql.format(out=out, dir=tmp_path / "export")
    res = CliRunner().invoke(app, ["query", "--pairs", str(files["pairs"]), text])
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("error: query refused") and "--allow-write" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "export").exists()


def test_allow_write_lets_copy_through_and_reads_stay_allowed(files, tmp_path):
    out = tmp_path / "pairs.csv"
    runner = CliRunner()
    base = ["query", "--pairs", str(files["pairs"])]
    res = runner.invoke(app, base + [f"COPY (SELECT pair_id FROM pairs) TO '{out}'", "--allow-write"])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 1 + len(files["ids"])
    for sql in ("WITH t AS (SELECT * FROM pairs) SELECT count(*) FROM t", "DESCRIBE pairs", "EXPLAIN SELECT 1",
                "FROM pairs LIMIT 1"):
        res = runner.invoke(app, base + [sql, "--json"])
        assert res.exit_code == 0, (sql, res.output)


def test_rounds_view_needs_a_rounds_table(tmp_path):
    with pytest.raises(UserError, match=r"rounds\.parquet: rounds table not found"):
        open_connection(rounds_run=tmp_path)
    (tmp_path / "rounds.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        open_connection(rounds_run=tmp_path)
