"""SamplingArgs: the sampler's settings declared once, their checks, and the KV-cache setting's old name."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.cli import trl_names
from pipeline.cli.loading import load_config
from pipeline.cli.trl_names import overlay
from pipeline.core.config import config_to_dict
from pipeline.core.errors import ConfigError
from pipeline.sampling.args import SAMPLING_FIELDS, SamplingArgs, sampling_args


@pytest.mark.parametrize("kw, msg", [({"gen_length": 0}, "gen_length must be >= 1"),
                                     ({"gen_length": 10, "block_length": 4}, "multiple of block_length"),
                                     ({"gen_length": 8, "block_length": 4, "steps": 3}, "number of blocks"),
                                     ({"temperature": -1.0}, "temperature must be >= 0"),
                                     ({"remasking": "entropy"}, "remasking must be one of"),
                                     ({"kv_cache": "full"}, "kv_cache must be one of none, prefix, dual"),
                                     ({"threshold": 0.0}, "threshold must be > 0"),
                                     ({"threshold": 0.5, "remasking": "random"}, "low_confidence")])
def test_bad_settings_are_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SamplingArgs(**kw)


def test_the_three_sampling_stages_inherit_one_declaration():
    from stages.evaluate import EvalConfig
    from stages.generate import GenerateConfig
    from stages.make_pairs import MakePairsConfig

    for cls in (GenerateConfig, MakePairsConfig, EvalConfig):
        assert issubclass(cls, SamplingArgs)
        assert set(SAMPLING_FIELDS) <= {f.name for f in dataclasses.fields(cls)}
    assert MakePairsConfig().temperature == 0.7 and EvalConfig(scores=None, benchmark="b").gen_length == 64
    # eval's task accuracy is greedy: temperature, remasking and cfg_scale are no options there
    fixed = {f.name for f in dataclasses.fields(EvalConfig) if not f.init}
    assert fixed == {"temperature", "remasking", "cfg_scale"}
    assert not fixed & set(config_to_dict(EvalConfig(scores=None, benchmark="b")))  # no keys of --print-config
    with pytest.raises(ConfigError, match="unknown key 'temperature'"):
        load_config(EvalConfig, values={"temperature": 1.0, "benchmark": "b"})


def test_of_takes_the_sampling_fields_of_a_stage_config():
    from stages.generate import GenerateConfig

    cfg = GenerateConfig(gen_length=16, block_length=8, steps=4, kv_cache="dual", threshold=0.9, seed=3)
    args = SamplingArgs.of(cfg, steps=2)
    assert type(args) is SamplingArgs
    assert (args.gen_length, args.block_length, args.steps, args.kv_cache, args.threshold, args.seed) == \
        (16, 8, 2, "dual", 0.9, 3)


def test_keyword_settings_take_the_old_name_and_fail_as_value_errors():
    base = SamplingArgs(gen_length=8, block_length=4, steps=8)
    assert sampling_args(base, {}) is base
    assert sampling_args(base, {"cache": "prefix"}).kv_cache == "prefix"
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        sampling_args(base, {"cache": "full"})
    with pytest.raises(TypeError, match="unknown sampler setting"):
        sampling_args(base, {"temprature": 1.0})


@pytest.fixture
def fresh_notes(monkeypatch):
    monkeypatch.setattr(trl_names, "NOTED", set())


def test_old_name_cache_is_read_from_yaml_with_a_one_line_note(tmp_path, capsys, fresh_notes):
    from stages.generate import GenerateConfig

    path = tmp_path / "gen.yaml"
    path.write_text("cache: dual\nthreshold: 0.9\n", encoding="utf-8")
    cfg = load_config(GenerateConfig, path, {"cache": None})
    assert cfg.kv_cache == "dual"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'cache' is the old name of 'kv_cache'" in err[0]
    path.write_text("cache: dual\nkv_cache: prefix\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'kv_cache' and 'cache' both set kv_cache"):
        load_config(GenerateConfig, path)
    with pytest.raises(ConfigError, match=r"kv_cache must be one of .* \[kv_cache \(given as cache\)\]"):
        load_config(GenerateConfig, values={"cache": "full"})


@pytest.mark.parametrize("command", [["make-pairs", "q.jsonl"], ["eval", "--benchmark", "b.jsonl"],
                                     ["generate", "--prompts", "p.jsonl"]])
def test_old_flag_cache_still_works_and_kv_cache_is_listed(command, fresh_notes):
    from typer.testing import CliRunner

    from stages.cli import app

    res = CliRunner().invoke(app, [*command, "--cache", "prefix", "--print-config"])
    assert res.exit_code == 0, res.output
    assert "kv_cache: prefix" in res.stdout and "\ncache:" not in res.stdout
    assert "old name of 'kv_cache'" in res.stderr
    shown = CliRunner().invoke(app, [command[0], "--help"], terminal_width=200).output
    assert "--kv-cache" in shown and "--cache " not in shown  # the old flag is hidden


def test_a_section_over_the_default_replaces_a_key_given_by_its_other_name():
    default = {"kv_cache": "dual", "gen_length": 24}
    assert overlay(default, {"cache": "none"}) == {"gen_length": 24, "cache": "none"}
    assert overlay({"cache": "none", "steps": 4}, {"kv_cache": "dual"}) == {"steps": 4, "kv_cache": "dual"}
    assert overlay(default, {"gen_length": 8}) == {"kv_cache": "dual", "gen_length": 8}


def test_a_run_config_section_may_use_the_old_name(tmp_path, fresh_notes):
    from stages.run_all import merged_config, stage_configs

    path = tmp_path / "run.yaml"
    path.write_text("eval:\n  cache: none\nmake_pairs:\n  cache: prefix\n", encoding="utf-8")
    cfg = merged_config(path, {"out": tmp_path / "o"})
    assert stage_configs(cfg)[3].kv_cache == "none"  # over the embedded default's kv_cache: dual
    assert cfg.make_pairs["cache"] == "prefix" and "kv_cache" not in cfg.make_pairs
