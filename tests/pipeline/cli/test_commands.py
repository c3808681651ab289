"""The generated CLI: every config field is a flag and a YAML key with its type; TRL's names resolve to ours."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import commands as stagecli
from pipeline.cli.loading import load_config
from pipeline.core.config import check_keys, coerce_values, config_to_dict, field_types, unwrap_optional
from pipeline.core.errors import ConfigError
from stages.cli import COMMANDS, build_app


def _commands():
    """(command name, command function) for every command generated from a config class."""
    out = []
    for name, target in COMMANDS:
        module, func = target.split(":")
        command = getattr(importlib.import_module(module), func)
        if hasattr(command, "config_class"):
            out.append((name, command))
    return out


COMMAND_FUNCS = _commands()
PASS_THROUGH = {"plan"}
"""Commands that forward another stage's flags (plan STAGE --stage-options) rather than own a config class."""


def test_every_command_is_generated_from_a_config_class():
    assert {name for name, _ in COMMANDS} - PASS_THROUGH == {name for name, _ in COMMAND_FUNCS}


def _sample(tp):
    """A non-default value of type ``tp`` as (command-line text, expected typed value)."""
    base, _ = unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        item = typing.get_args(base)[0]
        return (["7", "9"], [7.0, 9.0]) if item is float else (["a", "b"], ["a", "b"])
    if base is dict:
        return "{k: 1}", {"k": 1}
    if base is bool:
        return None, True
    if base is int:
        return "7", 7
    if base is float:
        return "0.25", 0.25
    if base is Path:
        return "some/path", Path("some/path")
    return "text", "text"


class _Captured(Exception):
    pass


@pytest.mark.parametrize("name,command", COMMAND_FUNCS, ids=[n for n, _ in COMMAND_FUNCS])
def test_every_field_is_a_flag_with_its_type(name, command, monkeypatch):
    cls = command.config_class
    seen = {}

    def capture(cls_, config_file, flags, load):
        seen.update(flags)
        raise _Captured

    monkeypatch.setattr(stagecli, "_resolve", capture)
    app = build_app(name)
    positional = [p.name for p in __import__("inspect").signature(command).parameters.values()
                  if type(p.default).__name__ == "ArgumentInfo"]
    for f in (f for f in dataclasses.fields(cls) if f.init):  # init=False: fixed by the class, no key
        text, expected = _sample(field_types(cls)[f.name])
        args = []
        for p in positional:  # arguments in order: the field under test gets its value, the others a placeholder
            if p == f.name:
                args += text if isinstance(text, list) else [text]
            else:
                args.append("x")
        if f.name in positional:
            pass
        elif text is None:  # a boolean: --x/--no-x
            args += [f"--no-{f.name.replace('_', '-')}"]
            expected = False
        elif isinstance(text, list):
            for t in text:
                args += [stagecli.flag_name(f.name), t]
        else:
            args += [stagecli.flag_name(f.name), text]
        seen.clear()
        result = CliRunner().invoke(app, [name, *args])
        assert isinstance(result.exception, _Captured), f"{name} {args}: {result.output}"
        assert seen.get(f.name) == expected, f"{name}: {f.name} from {args} gave {seen.get(f.name)!r}"
        assert type(seen[f.name]) is type(expected), f"{name}: {f.name} is {type(seen[f.name]).__name__}"


@pytest.mark.parametrize("name,command", COMMAND_FUNCS, ids=[n for n, _ in COMMAND_FUNCS])
def test_every_field_is_a_yaml_key_with_its_type(name, command, tmp_path):
    cls = command.config_class
    for f in (f for f in dataclasses.fields(cls) if f.init):  # init=False: fixed by the class, no key
        text, expected = _sample(field_types(cls)[f.name])
        value = text if text is not None else "true"
        doc = f"{f.name}: {value if not isinstance(value, list) else '[' + ', '.join(value) + ']'}\n"
        path = tmp_path / "c.yaml"
        path.write_text(doc)
        data = yaml.safe_load(path.read_text())
        check_keys(cls, data, str(path))
        got = coerce_values(cls, data, str(path))[f.name]
        assert got == expected and type(got) is type(expected), f"{name}: {doc!r} gave {got!r}"


def test_exponent_floats_in_yaml_load_as_floats(tmp_path):
    from stages.train import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("learning_rate: 5e-6\nbeta: 1e-1\n")
    assert yaml.safe_load(path.read_text())["learning_rate"] == "5e-6"  # what YAML 1.1 gives
    cfg = load_config(TrainConfig, path)
    assert cfg.learning_rate == 5e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.beta == 0.1 and isinstance(cfg.beta, float)


def test_wrong_types_are_one_line_errors(tmp_path):
    from stages.train import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("batch_size: 2.5\n")
    with pytest.raises(ConfigError, match=r"train.yaml: batch_size must be an integer, got 2.5"):
        load_config(TrainConfig, path)
    path.write_text("mixed_precision: no\n")  # YAML 1.1 reads it as false
    with pytest.raises(ConfigError, match="mixed_precision must be a string, got False .quote it"):
        load_config(TrainConfig, path)


TRL_YAML = """
model_name_or_path: micro
output_dir: runs/trl
per_device_train_batch_size: 8
gradient_accumulation_steps: 2
num_train_epochs: 3.0
learning_rate: 5e-7
beta: 1e-1
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
rpo_alpha: 0.25
lr_scheduler_type: linear
warmup_ratio: 0.05
max_grad_norm: 0.5
weight_decay: 0.01
seed: 3
max_steps: 40
save_steps: 10
save_total_limit: 3
logging_steps: 5
bf16: true
gradient_checkpointing: true
lora_r: 8
lora_target_modules: [q_proj, v_proj]
max_length: 512
"""

OUR_YAML = """
model: micro
out: runs/trl
batch_size: 8
grad_accum: 2
epochs: 3
learning_rate: 0.0000005
beta: 0.1
loss: sigmoid,sft
loss_weights: [1.0, 0.5]
sft_weight: 0.25
scheduler: linear
warmup_ratio: 0.05
max_grad_norm: 0.5
weight_decay: 0.01
seed: 3
max_steps: 40
save_every: 10
keep_checkpoints: 3
log_every: 5
mixed_precision: bf16
gradient_checkpointing: true
lora_r: 8
lora_targets: q_proj,v_proj
max_length: 512
"""


def test_trl_yaml_resolves_to_the_same_config_as_ours(tmp_path):
    from stages.train import TrainConfig

    trl, ours = tmp_path / "trl.yaml", tmp_path / "ours.yaml"
    trl.write_text(TRL_YAML)
    ours.write_text(OUR_YAML)
    a, b = load_config(TrainConfig, trl), load_config(TrainConfig, ours)
    assert config_to_dict(a) == config_to_dict(b)
    assert a.preference_loss == "sigmoid" and a.preference_weight == 1.0 and a.sft_total_weight == 0.75


def test_trl_flags_resolve_like_ours(tmp_path):
    app = build_app("train")
    trl = CliRunner().invoke(app, ["train", "cache", "--per_device_train_batch_size", "8", "--num-train-epochs", "2",
                                   "--bf16", "--loss-type", "ipo", "--output_dir", "runs/x", "--print-config"])
    ours = CliRunner().invoke(app, ["train", "cache", "--batch-size", "8", "--epochs", "2", "--mixed-precision",
                                    "bf16", "--loss", "ipo", "--out", "runs/x", "--print-config"])
    assert trl.exit_code == 0 and ours.exit_code == 0, trl.output + ours.output
    assert yaml.safe_load(trl.output) == yaml.safe_load(ours.output)
    assert yaml.safe_load(trl.output)["batch_size"] == 8


def test_a_field_given_under_both_names_must_agree(tmp_path):
    from stages.train import TrainConfig

    path = tmp_path / "both.yaml"
    path.write_text("batch_size: 4\nper_device_train_batch_size: 8\n")
    with pytest.raises(ConfigError, match="both set batch_size"):
        load_config(TrainConfig, path)


def test_readme_table_lists_every_trl_name():
    from pipeline.cli.trl_names import TRL_NAMES

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in readme.splitlines() if line.startswith("| `")]
    for cls_name, table in TRL_NAMES.items():
        for trl_name, alias in table.items():
            if trl_name == alias.field:
                continue
            assert any(f"`{trl_name}`" in r[0] and f"`{alias.field}`" in r[1] for r in rows), (cls_name, trl_name)


def test_shared_options_are_spelled_the_same_everywhere():
    for name, command in COMMAND_FUNCS:
        params = __import__("inspect").signature(command).parameters
        assert {"config", "print_config", "as_json"} <= set(params), name
        fields = set(field_types(command.config_class))
        if "progress" in fields:  # --progress/--no-progress, never --quiet
            assert params["progress"].default.param_decls == ("--progress/--no-progress",)
        for shared in ("device", "dtype"):
            if shared in fields:
                assert params[shared].default.param_decls[0] == f"--{shared}"


def test_run_sections_as_flags_add_to_the_file(tmp_path):
    app = build_app("run")
    res = CliRunner().invoke(app, ["run", "--train", "{max_steps: 3}", "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["train"]["max_steps"] == 3 and cfg["train"]["batch_size"] == 8  # the rest of the embedded section stays


def test_every_config_field_has_a_flag():
    """What YAML can set, the command line can set too (field names as --kebab-case)."""
    import inspect

    from stages import evaluate, score_ref, train
    from stages.train import TrainConfig as TC

    for module, cls in ((score_ref, score_ref.ScoreRefConfig), (train, TC), (evaluate, evaluate.EvalConfig)):
        params = set(inspect.signature(module.command).parameters)
        fields = {name for name, f in cls.__dataclass_fields__.items() if f.init}  # init=False: fixed, no key
        missing = fields - params - {"progress"}  # progress is --no-progress / --quiet
        assert not missing, f"{cls.__name__}: no flag for {sorted(missing)}"


STAGE_OWN = {  # shared training fields (pipeline/trainer/args.py) whose default or help is the stage's own
    "model": ("none", "tiny"), "out": ("runs/dpo", "runs/sft"), "learning_rate": ("1e-05", "2e-05"),
    "batch_size": ("4", "8"), "epochs": ("1", "1"), "warmup_ratio": ("0.1", "0.0"), "mixed_precision": ("none", "no"),
    "dtype": ("none", "float32"), "load_in_4bit": ("none", "False"), "save_every": ("0", "0"),
    "overwrite": ("False", "False"), "seed": ("0", "0"), "log_every": ("1", "10"),
    "report_to": ("tensorboard", "tensorboard"), "max_length": ("none", "1024")}
"""Field -> (train's shown default, sft's), as `lldm-dpo train --help` and `lldm-dpo sft --help` print them."""


def test_train_and_sft_keep_their_own_defaults_and_help():
    """One base declares the fields train and sft share; each command still shows its own defaults and help."""
    import inspect

    from stages import sft, train

    def options(module):  # field -> (help text, default shown)
        return {name: (p.default.help, p.default.show_default)
                for name, p in inspect.signature(module.command).parameters.items()}

    ours, theirs = options(train), options(sft)
    shared = ours.keys() & theirs.keys()
    assert {name for name in shared if ours[name] != theirs[name]} == set(STAGE_OWN)
    assert {name: (ours[name][1], theirs[name][1]) for name in STAGE_OWN} == STAGE_OWN
    assert ours["batch_size"][0] == "Pairs per micro-batch per process."
    assert theirs["batch_size"][0] == "Sequences per micro-batch per process."
    assert ours["log_every"][0] == "Log metrics every N steps." and "(and the last step)" in theirs["log_every"][0]
    assert "the cache's" in ours["dtype"][0] and theirs["dtype"][0] == "dtype the weights are loaded in (float32, " \
                                                                        "bfloat16, float16)."
    assert {"learning_rate", "lora_targets", "hub_token", "keep_checkpoints", "progress"} <= shared
    for module, opts in ((train, ours), (sft, theirs)):  # every field's help is its docstring, inherited or own
        assert all(opts[name][0] for name in field_types(module.command.config_class))


@pytest.mark.parametrize("stage", ["train", "sft"])
def test_save_total_limit_null_keeps_every_checkpoint(stage, tmp_path):
    """TrainingArguments' save_total_limit: null means no limit (keep_checkpoints 0), not our default of 2."""
    from stages import sft, train

    cls = {"train": train.TrainConfig, "sft": sft.SFTConfig}[stage]
    path = tmp_path / "trl.yaml"
    for text, keep in (("save_total_limit: null\n", 0), ("save_total_limit: 3\n", 3), ("save_steps: 5\n", 2)):
        path.write_text(text)
        assert load_config(cls, path).keep_checkpoints == keep, text
    app = build_app(stage)
    for value, keep in (("none", 0), ("4", 4)):
        res = CliRunner().invoke(app, [stage, "x", "--save-total-limit", value, "--print-config"])
        assert res.exit_code == 0, res.output
        assert yaml.safe_load(res.output)["keep_checkpoints"] == keep


def test_summary_table_shows_a_breakdown_on_one_line(capsys, monkeypatch):
    """A mapping of numbers (phase_seconds) is one row "name value, ..."; floats keep 6 digits; other values as
    text."""
    monkeypatch.setenv("COLUMNS", "80")
    stagecli.print_summary("train", {"seconds": 12.3456789, "phase_seconds": {"setup": 3.14159, "start_check": 0.25,
                                                                              "train": 8.0, "save": 0.9},
                                      "best_checkpoint": None}, as_json=False)
    out = capsys.readouterr().out
    assert "12.3457" in out
    assert "setup 3.14, start_check 0.25, train 8, save 0.9" in out
    assert "None" in out
