"""One-line errors where the README promises them: every numeric config field out of range, an unknown
device, an unwritable output; each is ``error: ...`` on one line and exit 1, before any model is loaded."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli.loading import load_config
from pipeline.core.config import numeric_fields, parse_interval
from pipeline.core.errors import ConfigError
from stages.cli import COMMANDS, app


def stage_configs() -> list[type]:
    """Every ``*Config`` dataclass of every command's module (a stage added later is walked too)."""
    found = {}
    for _, target in COMMANDS:
        module = importlib.import_module(target.split(":")[0])
        for value in vars(module).values():
            # the stage's own config, defined there or in the library (train's TrainConfig: pipeline/trainer)
            if dataclasses.is_dataclass(value) and isinstance(value, type) and value.__name__.endswith("Config") \
                    and value.__module__.split(".")[0] in ("stages", "pipeline"):
                found[value.__name__] = value
    return sorted(found.values(), key=lambda c: c.__name__)


def declared_ranges(cls: type) -> dict[str, str] | None:
    return getattr(sys.modules[cls.__module__], "RANGES", None)


def outside(spec: str | None, kind: str) -> list:
    """Values just outside ``spec`` (both ends), plus values no numeric field takes."""
    values: list = [-1] if kind == "int" else [-1.0, math.nan, math.inf]
    if kind == "int":
        values.append(2.5)
    if spec is not None:
        lo, hi, lo_closed, hi_closed = parse_interval(spec)
        step = 1 if kind == "int" else 1e-3
        values.append(lo - step if lo_closed else lo)
        if not math.isinf(hi):
            values.append(hi + step if hi_closed else hi)
    return sorted({repr(v): v for v in values}.values(), key=repr)


HF_UNSET = {("max_steps", -1), ("max_steps", -1.0)}
"""TrainingArguments' own "not set" values, read as ours (max_steps -1: from the epochs), so not refused."""

CASES = [(cls, name, value) for cls in stage_configs() for name, kind in numeric_fields(cls).items()
         for value in outside((declared_ranges(cls) or {}).get(name), kind) if (name, value) not in HF_UNSET]


def test_the_walk_finds_every_stage_and_every_numeric_field_has_a_range():
    names = {c.__name__ for c in stage_configs()}
    assert {"IngestConfig", "ScoreRefConfig", "TrainConfig", "EvalConfig", "GenerateConfig"} <= names
    for cls in stage_configs():
        ranges = declared_ranges(cls) or {}  # every numeric field's range declared once, checked from there
        assert set(numeric_fields(cls)) == set(ranges), cls.__name__
    assert len(CASES) > 100


@pytest.mark.parametrize("cls, name, value", CASES, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in CASES])
def test_every_numeric_field_refuses_values_out_of_range(cls, name, value):
    with pytest.raises(ConfigError) as err:
        load_config(cls, values={name: value}, origin="my.yaml")
    message = str(err.value)
    assert name in message and "\n" not in message, message


def test_numbers_written_as_text_in_yaml_are_read_as_numbers(tmp_path):
    from stages.train import TrainConfig

    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text("learning_rate: 1e-5\nbatch_size: '8'\n")  # YAML 1.1 reads 1e-5 as a string
    cfg = load_config(TrainConfig, cfg_file)
    assert cfg.learning_rate == 1e-5 and cfg.batch_size == 8


def _no_model(monkeypatch):
    # Modules that bind build_preset at import are imported first: one first imported under the patch would keep
    # the guard after this test (a later test's init-model would then fail).
    import pipeline.models
    import pipeline.models.init

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(pipeline.models, "load_model", boom)
    monkeypatch.setattr(pipeline.models, "build_preset", boom)
    monkeypatch.setattr("pipeline.models.presets.build_preset", boom)
    monkeypatch.setattr("pipeline.models.init.build_preset", boom)
    monkeypatch.setattr("stages.merge.load_model", boom)


def _one_line(res, fragment: str) -> None:
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert fragment in err, err


@pytest.mark.parametrize("args, fragment", [
    (["train", "CACHE", "--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    (["train", "CACHE", "--lora-r", "4", "--lora-dropout", "2"], "lora_dropout must be in [0, 1)"),
    (["train", "CACHE", "--sft-weight", "-1"], "sft_weight must be >= 0"),
    (["train", "CACHE", "--lora-alpha", "-1"], "lora_alpha must be >= 1"),
    (["train", "CACHE", "--max-grad-norm", "-1"], "max_grad_norm must be >= 0"),
    (["eval", "--scores", "CACHE", "--limit-pairs", "-1"], "limit_pairs must be >= 0"),
    (["eval", "--scores", "CACHE", "--beta", "0"], "beta must be > 0"),
    (["score-ref", "PAIRS", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["train", "CACHE", "--device", "tpu"], "device must be auto"),
    (["eval", "--scores", "CACHE", "--device", "tpu"], "device must be auto"),
    (["generate", "--prompts", "PAIRS", "--device", "tpu"], "device must be auto"),
    (["run", "--device", "tpu"], "device must be auto"),
    (["make-pairs", "PAIRS", "--device", "tpu"], "device must be auto"),
    (["make-pairs", "PAIRS", "--num-generations", "0"], "num_generations must be >= 1"),
])
def test_bad_flags_are_one_line_before_any_model(small_pairs, small_cache, monkeypatch, tmp_path, args, fragment):
    _no_model(monkeypatch)
    args = [str(small_cache) if a == "CACHE" else str(small_pairs) if a == "PAIRS" else a for a in args]
    if args[0] in ("train", "eval", "run"):
        args += ["--out", str(tmp_path / "out")]
    _one_line(CliRunner().invoke(app, args), fragment)


def test_unwritable_output_is_one_line_before_any_model_for_every_stage(small_pairs, small_cache, monkeypatch,
                                                                       tmp_path):
    _no_model(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "out"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "What is 1 + 1?", "answer": 2}\n')
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text('{"prompt": "What is 1 + 1?", "completion": "2"}\n')
    commands = {
        "ingest": ["ingest", str(src), "--out", str(bad / "pairs.arrow")],
        "score-ref": ["score-ref", str(small_pairs), "--model", "micro", "--device", "cpu", "--out", str(bad)],
        "train": ["train", str(small_cache), "--device", "cpu", "--out", str(bad)],
        "eval": ["eval", "--scores", str(small_cache), "--device", "cpu", "--out", str(bad)],
        "generate": ["generate", "--model", "micro", "--prompts", str(prompts), "--device", "cpu",
                     "--out", str(bad / "gen.jsonl")],
        "merge": ["merge", str(adapter), "--out", str(bad)],
        "init-model": ["init-model", "micro", str(bad)],
        "report": ["report", str(run_dir), "--out-png", str(bad / "r.png")],
        "run": ["run", "--model", "micro", "--device", "cpu", "--out", str(bad)],
        "make-pairs": ["make-pairs", str(questions), "--model", "micro", "--device", "cpu",
                       "--out", str(bad / "pairs.jsonl")],
        "sft": ["sft", str(sft_data), "--model", "micro", "--device", "cpu", "--out", str(bad)],
    }
    # query and plan only read and print.
    assert set(commands) >= {name for name, _ in COMMANDS} - {"query", "plan"}, "a command that writes is not covered"
    for name, args in commands.items():
        if args[0] not in {n for n, _ in COMMANDS}:
            continue
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, (name, res.output)
        err = res.stderr.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, (name, err)
        assert "a-file" in err, (name, err)
    assert blocker.read_text() == "not a folder"
