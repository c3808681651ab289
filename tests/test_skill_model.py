"""The shipped `skill` preset: its data, its training script's first steps, its checkpoint's hash, its loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "pipeline" / "models" / "weights" / "skill.json"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_skill_data_script_writes_the_shipped_files_and_its_splits_are_disjoint(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_skill_data.py"), "--root", str(tmp_path)],
                   check=True, capture_output=True)
    for rel in ("benchmarks/skill_heldout.jsonl", "questions/skill_train.jsonl"):
        assert (tmp_path / rel).read_bytes() == (REPO / "data" / rel).read_bytes(), rel
    splits = _script("make_skill_data").generate()
    questions = {name: {r["question"] for r in rows} for name, rows in splits.items()}
    assert len(questions["heldout"]) == 1000
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not questions[a] & questions[b], (a, b)
    for rows in splits.values():
        for r in rows:
            assert r["solution"].endswith(f"#### {r['answer']}")
            # each line of the worked solution is right: "a op b = c"
            for line in r["solution"].splitlines()[:-1]:
                expr, value = line.split(" = ")
                assert eval(expr) == int(value), line  # noqa: S307 - generated arithmetic only


def test_the_hard_family_adds_templates_whose_errors_are_not_one_number_slips():
    """skill-hard: the shipped five templates and five more; every solution's working passes the arithmetic
    verifier against its own question and fits the generation length; a distractor's line is right arithmetic
    from the question's numbers, so a sample that uses it fails on the answer, not on a slip."""
    from pipeline.grading.verifiers import ArithmeticVerifier, check_working
    from pipeline.models.tokenizer import build_tokenizer

    mod = _script("make_skill_data")
    splits = mod.generate(family="skill-hard", sft=2000)
    assert splits["heldout"] != mod.generate(sft=2000)["heldout"]
    templates = {r["template"] for r in splits["heldout"]}
    assert templates == {t.__name__[2:] for t in mod.FAMILIES["skill-hard"]} and len(templates) == 10
    questions = {name: {r["question"] for r in rows} for name, rows in splits.items()}
    assert sum(len(q) for q in questions.values()) == len(set().union(*questions.values()))  # disjoint, unique
    tok = build_tokenizer(layout="compact")
    for rows in splits.values():
        for r in rows:
            assert check_working(r["solution"], r["question"]) == (True, "ok"), r
            assert len(tok(r["solution"], add_special_tokens=False)["input_ids"]) < 24, r
    # the distractor template: "X has a ITEM and d OTHER, and gets b more ITEM"
    numbers = [tuple(int(x) for x in re.findall(r"\d+", r["question"])) for r in splits["heldout"]
               if r["template"] == "distract"]
    a, d, b = next(n for n in numbers if n[0] != n[1])
    wrong = f"{d} + {b} = {d + b}\n#### {d + b}"  # the other item's count instead of the asked one's
    grade = ArithmeticVerifier().grade(wrong, str(a + b), f"has {a} pens and {d} cups, and gets {b} more pens")
    assert grade.working_correct and not grade.answer_correct


def test_the_hard_familys_files_are_the_ones_results_measured(tmp_path):
    """bench/RESULTS.md, "Harder templates", ran on these exact files (--family skill-hard, the default seed)."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_skill_data.py"), "--family", "skill-hard", "--root",
                    str(tmp_path)], check=True, capture_output=True)
    digests = {rel: hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()[:16]
               for rel in ("benchmarks/skill_heldout.jsonl", "questions/skill_train.jsonl")}
    assert digests == {"benchmarks/skill_heldout.jsonl": "b55272e9cd153e5d", "questions/skill_train.jsonl": "1ac80809f29fa2c5"}


def test_the_training_script_can_start_from_a_trained_model(tmp_path):
    """--init-from: the initial model folder holds that model's weights (a warm start), not a seeded random one."""
    from pipeline.models import load_model

    mod = _script("train_skilled_model")
    n = mod.write_init_model(tmp_path / "init", 0, init_from="skill")
    preset, _ = load_model("skill")
    folder, _ = load_model(str(tmp_path / "init"))
    assert n == sum(p.numel() for p in preset.parameters())
    for (name, p), (_, q) in zip(preset.state_dict().items(), folder.state_dict().items()):
        assert torch.equal(p, q), name
    assert mod.parse_args(["--init-from", "skill", "--family", "skill-hard"]).init_from == "skill"


def test_the_training_scripts_first_steps_reproduce_the_recorded_losses(tmp_path):
    """The script trains through `lldm-dpo sft` (stages.sft.run): its first steps are the recorded run's."""
    record = json.loads(RECORD.read_text())
    mod = _script("train_skilled_model")
    args = mod.parse_args(["--max-steps", "3", "--no-eval", "--work", str(tmp_path / "w")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = mod.train(args, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    # warmup (100 steps) does not depend on --max-steps: a 3-step run's losses are the recorded run's first three
    assert result["first_losses"] == pytest.approx(record["first_losses"][:3], abs=2e-4)
    assert len(result["first_losses"]) == 3 and len(set(result["first_losses"])) == 3  # a real run's losses
    # the run is a real `lldm-dpo sft` run folder: its config names the stage's fields, its final model loads
    from pipeline.models import load_model

    cfg = (tmp_path / "w" / "sft-run" / "config.yaml").read_text()
    assert "mask_eps" in cfg and "pad_response_to: 24" in cfg
    load_model(str(tmp_path / "w" / "sft-run" / "final"))


def test_a_stopped_run_is_chosen_from_without_training_again(tmp_path):
    """--stopped-run reuses an sft run of the script cut short: no checkpoints is refused; with some, nothing
    is trained (the first losses are the run's own, the step its last checkpoint's)."""
    mod = _script("train_skilled_model")
    work = ["--work", str(tmp_path / "w"), "--no-eval"]
    with pytest.raises(SystemExit, match="no checkpoints"):
        mod.train(mod.parse_args([*work, "--stopped-run"]), log=lambda *_: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = mod.train(mod.parse_args([*work, "--max-steps", "4", "--save-every", "2"]), log=lambda *_: None)
        metrics = (tmp_path / "w" / "sft-run" / "metrics.parquet").stat().st_mtime_ns
        finished = mod.train(mod.parse_args([*work, "--max-steps", "4", "--stopped-run"]), log=lambda *_: None)
        shutil.rmtree(tmp_path / "w" / "sft-run" / "final")  # as if stopped after the checkpoint of step 2
        reused = mod.train(mod.parse_args([*work, "--max-steps", "4", "--stopped-run"]), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "w" / "sft-run" / "metrics.parquet").stat().st_mtime_ns == metrics  # nothing trained
    assert finished["steps"] == 4 and reused["steps"] == 2 and reused["train_seconds"] is None
    assert reused["first_losses"] == trained["first_losses"] and reused["parameters"] == trained["parameters"]


def test_the_shipped_checkpoint_matches_its_recorded_hash_and_loads_as_a_preset(tmp_path):
    from pipeline.models import load_model, model_identity
    from pipeline.models.presets import PRESETS, preset_weights_path

    path = preset_weights_path("skill")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = json.loads(RECORD.read_text())
    assert digest == PRESETS["skill"].weights_sha256 == record["sha256"]
    assert path.stat().st_size <= 8 * 1024 * 1024
    model, tok = load_model("skill")
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert model_identity("skill")["weights"] == f"preset:skill:sha256={digest}"
    # init-model writes it as a folder that loads to the same weights
    from typer.testing import CliRunner

    from stages.cli import app

    res = CliRunner().invoke(app, ["init-model", "skill", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    folder, _ = load_model(str(tmp_path / "m"))
    ids = torch.tensor([tok("3 + 4 = 7", add_special_tokens=False)["input_ids"]])
    assert torch.equal(folder(ids).logits, model(ids).logits)


def test_a_damaged_weights_file_is_refused_naming_the_file(tmp_path, monkeypatch):
    from pipeline.core.errors import UserError
    from pipeline.models import presets

    bad = tmp_path / "skill.safetensors"
    bad.write_bytes(presets.preset_weights_path("skill").read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(presets, "WEIGHTS_DIR", tmp_path)
    presets.preset_weights.cache_clear()
    try:
        with pytest.raises(UserError, match="skill.safetensors has sha256"):
            presets.build_preset("skill")
    finally:
        presets.preset_weights.cache_clear()


def test_make_pairs_on_the_shipped_model_pairs_its_own_correct_and_wrong_samples(tmp_path):
    from pipeline.grading.answers import is_correct
    from stages.make_pairs import MakePairsConfig
    from stages.make_pairs import run as make_pairs

    out = tmp_path / "pairs.jsonl"
    res = make_pairs(MakePairsConfig(questions=str(REPO / "data" / "questions" / "skill_train.jsonl"), model="skill",
                                     out=str(out), num_generations=4, temperature=0.7, gen_length=24, block_length=4,
                                     steps=24, kv_cache="dual", batch_size=64, limit=24, device="cpu", progress=False))
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert res.pairs == len(pairs) > 0 and res.pairs_reference_chosen == 0
    assert 0 < res.sample_accuracy < 1 and res.questions_mixed == res.questions_with_pairs > 0
    for p in pairs:
        assert p["chosen_from"] == "sample"
        assert is_correct(p["chosen"], p["reference_answer"]) and not is_correct(p["rejected"], p["reference_answer"])
