"""The config layers: defaults < YAML file < flags, unknown keys rejected, docs read from field docstrings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from pipeline.cli.loading import load_config
from pipeline.core.config import config_to_yaml, field_docs
from pipeline.core.errors import ConfigError


@dataclass
class DemoConfig:
    steps: int = 10
    """How many steps to run."""
    name: str = "demo"
    """A label for the run."""
    out: Path = Path("runs/demo")
    """Where outputs go."""

    def __post_init__(self):
        self.out = Path(self.out)
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


def test_layers_defaults_file_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 5\nname: from-file\n")
    cfg = load_config(DemoConfig, cfg_file, {"name": "from-flag", "steps": None})
    assert cfg.steps == 5  # file beats default, an unset flag (None) does not override
    assert cfg.name == "from-flag"  # flag beats file
    assert cfg.out == Path("runs/demo")


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'stepz'"):
        load_config(DemoConfig, cfg_file)


def test_validation_error_names_the_file(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: steps must be >= 1"):
        load_config(DemoConfig, cfg_file)


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(DemoConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DemoConfig, lst)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DemoConfig, tmp_path / "missing.yaml")


def test_yaml_round_trip_with_docs():
    cfg = DemoConfig(steps=3)
    text = config_to_yaml(cfg, with_docs=True)
    assert "# How many steps to run." in text
    assert yaml.safe_load(text) == {"steps": 3, "name": "demo", "out": "runs/demo"}
    assert field_docs(DemoConfig)["out"] == "Where outputs go."


@dataclass
class WithPaths:
    out: Path = Path("x")
    """Required path."""
    choices: Optional[Path] = None
    """Optional path."""


def test_an_empty_path_is_an_error_when_the_config_loads(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("choices: ''\n")
    # Path("") is ".", the current folder: it used to fail only when the stage opened it
    with pytest.raises(ConfigError, match=r"c\.yaml: choices is an empty path \(null or leave the key out"):
        load_config(WithPaths, cfg)
    with pytest.raises(ConfigError, match=r"run config: out is an empty path$"):
        load_config(WithPaths, values={"out": "  "}, origin="run config")
    assert load_config(WithPaths, values={"choices": None}).choices is None
    assert load_config(WithPaths, values={"choices": "a.jsonl"}).choices == Path("a.jsonl")


def test_field_docs_are_what_the_classes_source_says():
    """field_docs finds each config class in its module's syntax tree: the same docstrings as parsing the class's
    own source (inspect.getsource), for every stage's config and a class made in a function."""
    import ast
    import dataclasses
    import inspect
    import textwrap

    from pipeline.core.config import _class_body
    from stages.cli import app

    @dataclass
    class Local:
        x: int = 1
        """A local field."""

    commands = [getattr(info.callback, "__wrapped__", None) for info in app.registered_commands]
    classes = [command.config_class for command in commands if hasattr(command, "config_class")]
    assert len(classes) >= 8
    for cls in [*classes, DemoConfig, WithPaths, Local]:
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass):
                want = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
                assert ast.dump(ast.Module(_class_body(klass), [])) == ast.dump(ast.Module(want, [])), klass
    assert field_docs(Local) == {"x": "A local field."}
