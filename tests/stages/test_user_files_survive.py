"""No command removes what it did not write: a user's file in any output folder of any stage survives
reruns, ``run`` into a used folder, ``train --overwrite``, ``score-ref --overwrite``, checkpoint rotation
and the replacement of a model folder."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from stages.cli import app

NOTE = "my notes: do not delete\n"

SMALL = {
    "model": "micro",
    "device": "cpu",
    "rounds": 0,  # the single pass (the embedded default runs one round)
    "questions": None,
    "report": True,
    "score_ref": {"limit": 12, "samples": 1, "max_length": 192, "pairs_per_part": 4},
    "train": {"max_steps": 3, "batch_size": 2, "save_every": 1, "keep_checkpoints": 1},
    "eval": {"limit_task": 1, "gen_length": 4, "block_length": 4, "steps": 2, "batch_size": 1, "limit_choices": 1,
             "samples": 1},
}


def _drop_notes(root: Path) -> list[Path]:
    notes = []
    for folder, _, _ in os.walk(root):
        if Path(folder).name.startswith("."):
            continue
        note = Path(folder) / "MY_NOTES.txt"
        note.write_text(NOTE)
        notes.append(note)
    return notes


def test_a_users_file_in_every_output_folder_survives_every_stage(tmp_path):
    from stages import run_all
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref

    out = tmp_path / "out"
    cfg = run_all.load_config(run_all.RunConfig, values={**run_all.read_config_file(run_all.EMBEDDED_DEFAULT),
                                                          **SMALL, "out": str(out)})
    run_all.run(cfg, log=lambda *_: None)
    gen = out / "gen"
    gen.mkdir()
    notes = _drop_notes(out)
    folders = {n.parent.relative_to(out).as_posix() for n in notes}
    assert {".", "cache", "run", "run/final", "run/tensorboard", "gen"} <= folders
    assert any(f.startswith("run/checkpoint-") for f in folders)

    # `run` again into the used folder: it retrains, removing only what the first run wrote.
    again = run_all.run(cfg, log=lambda *_: None)
    assert Path(again.artefacts["final_model"], "config.json").exists()
    # score-ref with other settings and --overwrite: the old cache goes, the user's file stays.
    score_ref(ScoreRefConfig(pairs=out / "pairs.arrow", model="micro", out=out / "cache", samples=2, limit=4,
                             max_length=192, device="cpu", overwrite=True, progress=False))
    # generate, twice (the second resumes), and init-model --overwrite over a folder holding a user's file.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    for _ in range(2):
        res = CliRunner().invoke(app, ["generate", "--model", "micro", "--prompts", str(prompts), "--out",
                                       str(gen / "g.jsonl"), "--gen-length", "4", "--block-length", "4", "--steps",
                                       "2", "--device", "cpu", "--no-progress"])
        assert res.exit_code == 0, res.output
    model_dir = out / "model"
    assert CliRunner().invoke(app, ["init-model", "micro", str(model_dir)]).exit_code == 0
    notes += _drop_notes(model_dir)
    assert CliRunner().invoke(app, ["init-model", "micro", str(model_dir), "--overwrite"]).exit_code == 0

    lost = [str(n.relative_to(out)) for n in notes if not n.is_file() or n.read_text() != NOTE]
    assert lost == []
    assert (out / "run" / "final" / "config.json").exists() and (out / "cache" / "manifest.json").exists()


def test_train_overwrite_refuses_to_replace_a_file_it_did_not_write(small_cache, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.parquet").write_text("the user's own table")
    res = CliRunner().invoke(app, ["train", str(small_cache), "--out", str(run_dir), "--overwrite", "--device",
                                   "cpu", "--no-progress"])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    assert "metrics.parquet: was not written by lldm-dpo" in res.stderr
    assert (run_dir / "metrics.parquet").read_text() == "the user's own table"
