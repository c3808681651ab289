"""`lldm-dpo generate`: the command end to end, resume, settings checks, inputs, stop tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli.loading import load_config
from pipeline.core.config import config_to_yaml
from pipeline.core.errors import UserError
from pipeline.sampling.generate_run import partial_path, read_prompts
from stages.cli import app
from stages.generate import GenerateConfig, run

STAGES = Path(__file__).resolve().parents[2] / "stages"
FAST = dict(model="micro", gen_length=8, block_length=4, steps=4, device="cpu", progress=False)

PROMPTS = [
    {"question": "What is 12 plus 30?", "answer": "#### 42"},
    {"prompt": "Write a short poem about the sea.", "id": 7},
    {"question": "How many days are in a week?", "answer": "#### 7"},
    {"prompt": [{"role": "user", "content": "Say hello."}]},
]


def write_prompts(path: Path, rows=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_generate_with_tiny_preset(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--gen-length", "16",
            "--block-length", "8", "--steps", "16", "--batch-size", "3", "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["prompts"] == 4 and summary["generated_now"] == 4 and summary["resumed"] == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["prompt"] == "What is 12 plus 30?" and rows[0]["answer"] == "#### 42"
    assert rows[1]["prompt"] == "Write a short poem about the sea." and rows[1]["id"] == 7
    assert rows[3]["prompt"] == PROMPTS[3]["prompt"]
    for row in rows:
        assert isinstance(row["completion"], str)
        assert 0 <= row["completion_tokens"] <= 16
        assert row["stopped"] == (row["completion_tokens"] < 16)
        assert row["sampler"]["steps"] == 16 and row["sampler"]["model"] == "tiny"
    assert not partial_path(out).exists()
    # A rerun finds everything done and changes nothing.
    before = out.read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["generated_now"] == 0
    assert out.read_bytes() == before


def test_print_config_and_shipped_yaml_match_defaults():
    result = CliRunner().invoke(app, ["generate", "--print-config", "--steps", "64"])
    assert result.exit_code == 0, result.output
    assert "steps: 64" in result.stdout
    assert (STAGES / "generate.yaml").read_text(encoding="utf-8") == config_to_yaml(GenerateConfig(), with_docs=True)
    assert load_config(GenerateConfig, STAGES / "generate.yaml") == GenerateConfig()


@pytest.mark.parametrize(
    "flags,message",
    [(["--gen-length", "10", "--block-length", "4"], "multiple of block_length"),
     (["--steps", "3", "--gen-length", "8", "--block-length", "4"], "multiple of the number of blocks"),
     (["--remasking", "entropy"], "remasking must be one of")],
)
def test_bad_settings_are_one_line_errors(tmp_path, flags, message):
    result = CliRunner().invoke(app, ["generate", "--prompts", "x.jsonl", *flags])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_resume_gives_what_one_run_gives(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    settings = dict(FAST, prompts=str(prompts), temperature=1.0, batch_size=2)
    whole = run(GenerateConfig(**settings, out=str(tmp_path / "whole.jsonl")))
    assert whole.generated_now == 4

    out = tmp_path / "pieces.jsonl"
    first = run(GenerateConfig(**settings, out=str(out), limit=2))
    assert (first.generated_now, first.resumed) == (2, 0)
    second = run(GenerateConfig(**{**settings, "batch_size": 3}, out=str(out)))
    assert (second.generated_now, second.resumed) == (2, 2)
    # Per-prompt seeds and left padding: batch size and resumption change nothing.
    assert read_rows(out) == read_rows(tmp_path / "whole.jsonl")


def test_interrupted_partial_file_is_resumed(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    settings = dict(FAST, prompts=str(prompts))
    run(GenerateConfig(**settings, out=str(tmp_path / "ref.jsonl")))
    reference = read_rows(tmp_path / "ref.jsonl")
    out = tmp_path / "out.jsonl"
    # As a crash leaves it: two finished rows, then half a line (in the partial file generate recorded writing).
    from pipeline.core.atomic import claim

    claim(partial_path(out))
    partial_path(out).write_text(
        json.dumps(reference[2]) + "\n" + json.dumps(reference[0]) + "\n" + json.dumps(reference[1])[:30],
        encoding="utf-8",
    )
    result = run(GenerateConfig(**settings, out=str(out)))
    assert (result.generated_now, result.resumed) == (2, 2)
    assert read_rows(out) == reference
    assert not partial_path(out).exists()


def test_output_made_with_other_settings_is_refused(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    out = tmp_path / "out.jsonl"
    run(GenerateConfig(**FAST, prompts=str(prompts), out=str(out)))
    with pytest.raises(UserError, match=r"made with steps=4, this run has steps=8"):
        run(GenerateConfig(**{**FAST, "steps": 8}, prompts=str(prompts), out=str(out)))
    other = write_prompts(tmp_path / "other.jsonl", [{"prompt": "something else"}])
    with pytest.raises(UserError, match="made from a prompts file whose content differs"):
        run(GenerateConfig(**FAST, prompts=str(other), out=str(out)))


def test_pairs_arrow_input_uses_prompt_messages(tmp_path):
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table(
        {
            "pair_id": ["a", "b"],
            "prompt": ["plain text prompt", "user: hi"],
            "chosen": ["x", "y"],
            "rejected": ["z", "w"],
            "prompt_messages": pa.array([None, [{"role": "user", "content": "hi"}]], type=messages),
        }
    )
    path = tmp_path / "pairs.data"  # recognised by its magic bytes, not its suffix
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    records = read_prompts(path)
    assert [r.prompt for r in records] == ["plain text prompt", [{"role": "user", "content": "hi"}]]
    result = run(GenerateConfig(**FAST, prompts=str(path), out=str(tmp_path / "out.jsonl")))
    assert result.generated_now == 2
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["pair_id"] for r in rows] == ["a", "b"] and rows[1]["prompt"] == "user: hi"



def test_too_long_prompt_is_a_clear_error(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "word " * 600}])
    with pytest.raises(UserError, match=r"prompt 0: \d+ tokens \+ gen_length 8 exceed the model's max_sequence_length 1024"):
        run(GenerateConfig(**FAST, prompts=str(prompts), out=str(tmp_path / "o.jsonl")))



def test_resume_goes_by_model_and_prompts_content_not_paths(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.models.init import init_model

    model_dir = tmp_path / "model"
    init_model("micro", model_dir)
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])
    out = tmp_path / "gen.jsonl"
    cfg = dict(FAST, model=str(model_dir))
    assert run(GenerateConfig(prompts=str(prompts), out=str(out), **cfg)).generated_now == 2

    # The same weights under another path: the finished rows are reused.
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_dir, moved)
    again = run(GenerateConfig(prompts=str(prompts), out=str(out), **dict(cfg, model=str(moved))))
    assert again.resumed == 2 and again.generated_now == 0

    # Retrained into the same folder: same path, other weights -> the old completions are not new ones.
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"gen.jsonl:1: made from a model whose content differs"):
        run(GenerateConfig(prompts=str(prompts), out=str(out), **cfg))

    # Same prompts file path, other content (a row that is not resumed changed): refused too.
    shutil.copytree(moved, model_dir, dirs_exist_ok=True)
    write_prompts(prompts, PROMPTS[:2] + [{"prompt": "new"}])
    with pytest.raises(UserError, match=r"made from a prompts file whose content differs"):
        run(GenerateConfig(prompts=str(prompts), out=str(out), **cfg))


def test_fast_sampler_settings_are_in_the_fingerprint(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "out.jsonl"
    run(GenerateConfig(**FAST, prompts=str(prompts), out=str(out), kv_cache="dual", threshold=0.9))
    rows = read_rows(out)
    assert all(r["sampler"]["kv_cache"] == "dual" and r["sampler"]["threshold"] == 0.9 for r in rows)
    with pytest.raises(UserError, match=r"made with kv_cache='dual', this run has kv_cache='none'"):
        run(GenerateConfig(**FAST, prompts=str(prompts), out=str(out), threshold=0.9))
    with pytest.raises(UserError, match=r"made with threshold=0\.9, this run has threshold=0\.5"):
        run(GenerateConfig(**FAST, prompts=str(prompts), out=str(out), kv_cache="dual", threshold=0.5))
    # A row written before these settings existed was made by the exact sampler: it resumes an exact run.
    exact = tmp_path / "exact.jsonl"
    run(GenerateConfig(**FAST, prompts=str(prompts), out=str(exact)))
    old = [{**r, "sampler": {k: v for k, v in r["sampler"].items() if k not in ("kv_cache", "threshold")}}
           for r in read_rows(exact)]
    exact.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    assert run(GenerateConfig(**FAST, prompts=str(prompts), out=str(exact))).resumed == 2
    with pytest.raises(UserError, match=r"made with kv_cache='none', this run has kv_cache='prefix'"):
        run(GenerateConfig(**FAST, prompts=str(prompts), out=str(exact), kv_cache="prefix"))
    # A row written when the setting was named cache holds it by that name: it resumes a run with that kv_cache.
    renamed = tmp_path / "renamed.jsonl"
    run(GenerateConfig(**FAST, prompts=str(prompts), out=str(renamed), kv_cache="dual"))
    older = [{**r, "sampler": {("cache" if k == "kv_cache" else k): v for k, v in r["sampler"].items()}}
             for r in read_rows(renamed)]
    renamed.write_text("".join(json.dumps(r) + "\n" for r in older), encoding="utf-8")
    assert run(GenerateConfig(**FAST, prompts=str(prompts), out=str(renamed), kv_cache="dual")).resumed == 2
    with pytest.raises(UserError, match=r"made with kv_cache='dual', this run has kv_cache='none'"):
        run(GenerateConfig(**FAST, prompts=str(prompts), out=str(renamed)))


@pytest.mark.parametrize("kw, msg", [({"kv_cache": "full"}, "kv_cache must be one of"),
                                     ({"threshold": 0}, "threshold"),
                                     ({"threshold": 0.9, "remasking": "random"}, "low_confidence")])
def test_fast_sampler_settings_are_checked(kw, msg):
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match=msg):
        GenerateConfig(**{**FAST, **kw})
