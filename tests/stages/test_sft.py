"""sft end to end: a short run from a preset, its metrics and final model, SIGKILL resume, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.errors import ConfigError, UserError
from stages.sft import SFTConfig, run
from tests.conftest import accelerate_launch

FAST = dict(model="micro", learning_rate=3e-3, batch_size=4, device="cpu", progress=False, tensorboard=False,
            report_to="none")


def write_sft_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 30), rng.randint(1, 30)
            fh.write(json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}. #### {a + b}"})
                     + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft_data(tmp_path_factory.mktemp("sft") / "d.jsonl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_not_run_on_the_cpu(data, tmp_path):
    with pytest.raises(UserError, match="device 'cuda' requested but CUDA is not available"):
        run(SFTConfig(data=data, out=tmp_path / "run", max_steps=1, **{**FAST, "device": "cuda"}))
    assert not (tmp_path / "run" / "final").exists()


def test_short_run_from_a_preset_learns_logs_and_saves_a_loadable_model(data, tmp_path):
    from pipeline.models import build_preset, load_model

    out = tmp_path / "run"
    result = run(SFTConfig(data=data, out=out, max_steps=12, log_every=3, seed=4, **FAST))
    assert result.steps == 12 and result.examples == 24 and result.num_tokens > 0
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert all(r["grad_norm"] > 0 and r["learning_rate"] > 0 and r["tokens_per_second"] > 0 for r in rows)
    assert [r["num_tokens"] for r in rows] == sorted(r["num_tokens"] for r in rows)
    assert rows[-1]["num_tokens"] == result.num_tokens
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    model, tok = load_model(out / "final")
    start = build_preset("micro", seed=4).state_dict()  # from scratch: the preset seeded by --seed
    trained = model.state_dict()
    assert all(not torch.equal(start[k], trained[k]) for k in start if k.endswith("weight") and "norm" not in k)
    assert tok.mask_token_id == model.config.mask_token_id


def test_the_seed_decides_the_initial_weights_and_the_run(data, tmp_path):
    a = run(SFTConfig(data=data, out=tmp_path / "a", max_steps=2, log_every=1, seed=1, **FAST))
    b = run(SFTConfig(data=data, out=tmp_path / "b", max_steps=2, log_every=1, seed=1, **FAST))
    c = run(SFTConfig(data=data, out=tmp_path / "c", max_steps=2, log_every=1, seed=2, **FAST))
    wa, wb, wc = (load_file(str(Path(r.final_model) / "model.safetensors")) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def _cli(data, out, *extra):
    return [sys.executable, "-m", "stages.cli", "sft", str(data), "--model", "micro", "--out", str(out),
            "--max-steps", "8", "--learning-rate", "3e-3", "--batch-size", "4", "--grad-accum", "2",
            "--scheduler", "cosine", "--warmup-ratio", "0.25", "--seed", "3", "--max-length", "64",
            "--log-every", "1", "--save-every", "2", "--device", "cpu", "--no-progress", *extra]


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(data, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_cli(data, full), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-4").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    subprocess.run(_cli(data, out, "--resume"), check=True, capture_output=True)
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert not [p.name for p in out.rglob("*.tmp")]
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-identical
    ma = pq.read_table(full / "metrics.parquet").to_pylist()
    mb = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mb] == list(range(1, 9))
    for x, y in zip(ma, mb):
        for key in ("loss", "learning_rate", "grad_norm", "num_tokens"):
            assert y[key] == x[key], key


def test_resume_refuses_other_data_and_a_used_folder_needs_resume(data, tmp_path):
    out = tmp_path / "run"
    run(SFTConfig(data=data, out=out, max_steps=4, save_every=2, **FAST))
    with pytest.raises(UserError, match="already holds a run"):
        run(SFTConfig(data=data, out=out, max_steps=4, **FAST))
    other = write_sft_data(tmp_path / "other.jsonl", seed=9)
    with pytest.raises(UserError, match=r"cannot resume: the data differs \(the checkpoint was trained on the examples of sha256"):
        run(SFTConfig(data=other, out=out, max_steps=4, save_every=2, resume=True, **FAST))


def test_config_ranges_and_lora_on_a_preset(data, tmp_path):
    with pytest.raises(ConfigError, match="mask_eps"):
        SFTConfig(data=data, mask_eps=1.0)
    with pytest.raises(ConfigError, match="scheduler"):
        SFTConfig(data=data, scheduler="steps")
    with pytest.raises(UserError, match="randomly initialised"):
        run(SFTConfig(data=data, out=tmp_path / "r", max_steps=1, **{**FAST, "model": "micro"}, lora_r=4))


def test_lora_on_a_model_folder_saves_an_adapter(data, tmp_path):
    from pipeline.models import load_model
    from pipeline.models.init import init_model

    base = tmp_path / "base"
    init_model("micro", base)
    result = run(SFTConfig(data=data, out=tmp_path / "run", max_steps=2, lora_r=4, **{**FAST, "model": str(base)}))
    final = Path(result.final_model)
    assert (final / "adapter_config.json").is_file()
    model, _ = load_model(final)  # the base with the adapter applied
    assert model is not None


def test_cli_json_print_config_and_trl_yaml(data, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import build_app

    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text("model_name_or_path: micro\nper_device_train_batch_size: 3\ngradient_accumulation_steps: 2\n"
                         "learning_rate: 1.0e-3\nlr_scheduler_type: linear\nlogging_steps: 1\nmax_steps: 2\n"
                         f"output_dir: {tmp_path / 'run'}\nnum_train_epochs: 1\nsave_total_limit: 1\n"
                         "disable_tqdm: true\nreport_to: none\n")
    app = build_app("sft")
    printed = CliRunner().invoke(app, ["sft", str(data), "--config", str(yaml_file), "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert "batch_size: 3" in printed.output and "grad_accum: 2" in printed.output and "scheduler: linear" in printed.output
    done = CliRunner().invoke(app, ["sft", str(data), "--config", str(yaml_file), "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["steps"] == 2 and Path(summary["final_model"]).is_dir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    failed = CliRunner().invoke(app, ["sft", str(bad), "--model", "micro", "--out", str(tmp_path / "x"),
                                      "--device", "cpu"])
    assert failed.exit_code == 1
    assert f"{bad}:2" in failed.output and "'completion'" in failed.output


@pytest.mark.slow
def test_two_processes_match_one_at_equal_global_batch(tmp_path):
    # 21 examples, 8 a step: step 3 holds 5, and its last micro-batch leaves the second process idle.
    data = write_sft_data(tmp_path / "d21.jsonl", n=21)
    one = tmp_path / "one"
    subprocess.run(_cli(data, one, "--save-every", "0", "--max-steps", "3"), check=True, capture_output=True)
    two = tmp_path / "two"
    args = _cli(data, two, "--save-every", "0", "--max-steps", "3", "--batch-size", "2")[3:]
    cmd = [*accelerate_launch(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stages.cli", *args]
    cmd[cmd.index("cpu")] = "auto"
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ma = pq.read_table(one / "metrics.parquet").to_pylist()
    mb = pq.read_table(two / "metrics.parquet").to_pylist()
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
        assert y["num_tokens"] == x["num_tokens"]


FSDP_RUNS = """
import sys
from pathlib import Path
from stages.sft import SFTConfig, run
data, out = sys.argv[1], Path(sys.argv[2])
args = dict(data=data, model="micro", batch_size=2, max_steps=4, save_every=2, log_every=1, learning_rate=3e-3,
            seed=3, device="auto", progress=False, tensorboard=False, report_to="none")
run(SFTConfig(out=out / "fsdp", **args))
run(SFTConfig(out=out / "resumed", resume_from_checkpoint=str(out / "fsdp" / "checkpoint-2"), **args))
"""


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_sharded_checkpoint_resumes(tmp_path):
    # 13 examples, 4 a step: step 4 holds 1, and leaves the second process idle. One launch runs a fresh FSDP run
    # and a resume from its sharded checkpoint-2 (into another folder: resume_from_checkpoint as a path).
    data = write_sft_data(tmp_path / "d13.jsonl", n=13)
    script = tmp_path / "runs.py"
    script.write_text(FSDP_RUNS)
    fsdp_cpu = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp_cpu.yaml"
    proc = subprocess.run([*accelerate_launch(), "--config_file", str(fsdp_cpu), str(script), str(data),
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = run(SFTConfig(data=data, out=tmp_path / "one", **{**FAST, "batch_size": 4}, max_steps=4, save_every=2,
                        log_every=1, seed=3))
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert sorted(p.name for p in (ckpt / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ma, mb, mc = (pq.read_table(tmp_path / name / "metrics.parquet").to_pylist() for name in ("one", "fsdp",
                                                                                                "resumed"))
    assert [m["step"] for m in mb] == [1, 2, 3, 4] and [m["step"] for m in mc] == [3, 4]
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6) and y["num_tokens"] == x["num_tokens"]
    for x, y in zip(mb[2:], mc):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
    wa, wb, wc = (load_file(str(Path(folder) / "model.safetensors"))
                  for folder in (one.final_model, tmp_path / "fsdp" / "final", tmp_path / "resumed" / "final"))
    for k in wa:  # Adam's m / sqrt(v) enlarges the all-reduce's other summation order on near-zero gradients
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(wc[k], wb[k], rtol=0, atol=1e-6)
