"""No stage writes over a file it did not write: a user's file at any output path of any stage is refused with a
one-line error and left byte for byte as it was (issue 24, item 1; the rule is ``pipeline.core.atomic.check_replaceable``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app

USER = b"the user's own file: do not touch\n"


def _questions(tmp: Path) -> Path:
    path = tmp / "q.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    return path


def _prompts(tmp: Path) -> Path:
    path = tmp / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    return path


def _raw_pairs(tmp: Path) -> Path:
    path = tmp / "raw.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    return path


GEN = ["--model", "micro", "--gen-length", "4", "--block-length", "4", "--steps", "2", "--device", "cpu",
       "--no-progress"]

# (case, victim path relative to tmp, argv builder(tmp, pairs, cache))
CASES = [
    ("ingest --out", "victim.arrow", lambda t, p, c: ["ingest", str(_raw_pairs(t)), "--out", str(t / "victim.arrow")]),
    ("ingest quarantine beside --out", "out.quarantine.jsonl",
     lambda t, p, c: ["ingest", str(_raw_pairs(t)), "--out", str(t / "out.arrow")]),
    ("ingest --quarantine", "mine.jsonl", lambda t, p, c: ["ingest", str(_raw_pairs(t)), "--out", str(t / "o.arrow"),
                                                           "--quarantine", str(t / "mine.jsonl")]),
    ("eval eval.json", "ev/eval.json", lambda t, p, c: ["eval", "--scores", str(c), "--model", "micro", "--out",
                                                        str(t / "ev"), "--device", "cpu"]),
    ("eval task_results.parquet", "ev/task_results.parquet",
     lambda t, p, c: ["eval", "--scores", str(c), "--model", "micro", "--out", str(t / "ev"), "--device", "cpu"]),
    ("generate --out", "g.jsonl", lambda t, p, c: ["generate", "--prompts", str(_prompts(t)), "--out",
                                                   str(t / "g.jsonl"), *GEN]),
    ("generate partial", "g.jsonl.partial", lambda t, p, c: ["generate", "--prompts", str(_prompts(t)), "--out",
                                                             str(t / "g.jsonl"), *GEN]),
    ("make-pairs --out", "mp.jsonl", lambda t, p, c: ["make-pairs", str(_questions(t)), "--out", str(t / "mp.jsonl"),
                                                      *GEN]),
    ("make-pairs samples", "mp.samples.jsonl",
     lambda t, p, c: ["make-pairs", str(_questions(t)), "--out", str(t / "mp.jsonl"), *GEN]),
    ("make-pairs partial", "mp.samples.jsonl.partial",
     lambda t, p, c: ["make-pairs", str(_questions(t)), "--out", str(t / "mp.jsonl"), *GEN]),
    ("score-ref fingerprint.json", "sc/fingerprint.json",
     lambda t, p, c: ["score-ref", str(p), "--model", "micro", "--out", str(t / "sc"), "--device", "cpu",
                      "--no-progress"]),
    ("score-ref manifest", "sc/manifest.json", lambda t, p, c: ["score-ref", str(p), "--model", "micro", "--out",
                                                                str(t / "sc"), "--device", "cpu", "--no-progress"]),
    ("score-ref part", "sc/part-00000.parquet", lambda t, p, c: ["score-ref", str(p), "--model", "micro", "--out",
                                                                 str(t / "sc"), "--device", "cpu", "--no-progress"]),
    ("train config.yaml", "run/config.yaml", lambda t, p, c: ["train", str(c), "--out", str(t / "run"), "--device",
                                                              "cpu", "--no-progress"]),
    ("train --overwrite metrics.parquet", "run/metrics.parquet",
     lambda t, p, c: ["train", str(c), "--out", str(t / "run"), "--overwrite", "--device", "cpu", "--no-progress"]),
    ("report --out-html", "r.html", lambda t, p, c: ["report", str(t / "run"), "--out-html", str(t / "r.html")]),
    ("report --out-png", "r.png", lambda t, p, c: ["report", str(t / "run"), "--out-png", str(t / "r.png")]),
    ("run pairs.arrow", "all/pairs.arrow", lambda t, p, c: ["run", "--out", str(t / "all"), "--model", "micro",
                                                            "--device", "cpu", "--rounds", "0"]),
    ("init-model over a file", "m", lambda t, p, c: ["init-model", "micro", str(t / "m"), "--overwrite"]),
]


def _fake_run(tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.atomic import atomic_path

    run_dir = tmp / "run"
    run_dir.mkdir(exist_ok=True)
    if not (run_dir / "metrics.parquet").exists():
        with atomic_path(run_dir / "metrics.parquet") as t:
            pq.write_table(pa.table({"step": [1], "loss": [0.69]}), t)


@pytest.mark.parametrize("case,victim,argv", CASES, ids=[c[0] for c in CASES])
def test_a_users_file_at_an_output_path_is_refused_and_survives(case, victim, argv, tmp_path, small_pairs,
                                                                small_cache):
    if case.startswith("report"):
        _fake_run(tmp_path)
    path = tmp_path / victim
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USER)
    res = CliRunner().invoke(app, argv(tmp_path, small_pairs, small_cache))
    assert res.exit_code == 1, (case, res.output)
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in res.stderr, res.stderr  # one line, no traceback
    assert str(path) in error[0] and "not written by lldm-dpo" in error[0], res.stderr
    assert path.read_bytes() == USER


def test_a_rerun_replaces_what_the_stage_wrote(tmp_path):
    """The rule refuses only foreign files: ingest twice into one place works, and records what it wrote."""
    from pipeline.core.atomic import is_owned

    argv = ["ingest", str(_raw_pairs(tmp_path)), "--out", str(tmp_path / "p.arrow")]
    for _ in range(2):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 0, res.output
    assert is_owned(tmp_path / "p.arrow") and is_owned(tmp_path / "p.quarantine.jsonl")


def test_eval_without_benchmark_removes_stale_task_results(small_cache, tmp_path):
    """A task_results.parquet an earlier eval wrote (its ownership recorded) goes when this eval has none."""
    from pipeline.core.atomic import atomic_path
    from stages.evaluate import EvalConfig
    from stages.evaluate import run as evaluate

    stale = tmp_path / "task_results.parquet"
    with atomic_path(stale, record=True) as tmp:  # as an earlier eval wrote it
        tmp.write_bytes(b"old")
    evaluate(EvalConfig(model="micro", scores=small_cache, out=tmp_path, device="cpu", before="none"))
    assert not stale.exists()
