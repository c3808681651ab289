"""train under accelerate's FSDP (version 2) on 2 CPU processes (configs/accelerate/fsdp_cpu.yaml).

Few and small: three launches in all (an uninterrupted run, a killed-and-resumed run, a LoRA run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.errors import UserError
from stages.train import TrainConfig, run
from tests.conftest import accelerate_launch

REPO = Path(__file__).resolve().parents[2]
FSDP_CPU = REPO / "configs" / "accelerate" / "fsdp_cpu.yaml"
STEPS = 6
EVAL_PAIRS = 5  # held-out pairs, unevenly many for 2 processes
EVAL_EVERY = 3
ARGS = ["--learning-rate", "3e-3", "--warmup-ratio", "0.25", "--device", "auto", "--no-progress", "--no-tensorboard"]

pytestmark = pytest.mark.slow


def _launch(cache, out, *extra, wait=True):
    cmd = [*accelerate_launch(), "--config_file", str(FSDP_CPU),
           "-m", "stages.cli", "train", str(cache), "--out", str(out), "--batch-size", "2", *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if not wait:  # its own process group, so a SIGKILL reaches the launcher and both workers
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score
    from tests.conftest import write_arithmetic_pairs

    tmp = tmp_path_factory.mktemp("fsdp")
    src = write_arithmetic_pairs(tmp / "pairs.jsonl", 24 + EVAL_PAIRS)
    lines = src.read_text().splitlines()  # the last few are the user's held-out split (--eval-every)
    src.write_text("".join((line[:-1] + ', "split": "test"}' if i >= 24 else line) + "\n"
                           for i, line in enumerate(lines)))
    pairs = tmp / "pairs.arrow"
    ingest(IngestConfig(inputs=[str(src)], out=str(pairs), progress=False))
    out = tmp / "cache"
    score(ScoreRefConfig(pairs=pairs, model="micro", out=out, samples=2, pairs_per_part=4, device="cpu",
                         progress=False))
    return out


@pytest.fixture(scope="module")
def fsdp_run(cache, tmp_path_factory):
    """Two processes at batch 2, full fine-tuning, the online reference sharded like the policy."""
    out = tmp_path_factory.mktemp("fsdp-run") / "run"
    _launch(cache, out, "--max-steps", str(STEPS), "--save-every", "2", "--reference", "online",
            "--eval-every", str(EVAL_EVERY))
    return out


def _logged(value) -> bool:
    return value is not None and value == value  # a step without eval has NaN in the column


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_two_fsdp_processes_at_batch_2_equal_one_process_at_batch_4(cache, fsdp_run, tmp_path):
    one = tmp_path / "one"
    run(TrainConfig(scores=cache, out=one, batch_size=4, max_steps=STEPS, learning_rate=3e-3, warmup_ratio=0.25,
                    device="cpu", progress=False, tensorboard=False, eval_every=EVAL_EVERY))
    a = pq.read_table(one / "metrics.parquet").to_pylist()
    b = pq.read_table(fsdp_run / "metrics.parquet").to_pylist()
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4)
        assert y["rewards/accuracies"] == pytest.approx(x["rewards/accuracies"])
        # --eval-every under FSDP: the held-out split's numbers, at the same steps, as one process gets.
        evaluated = y["step"] % EVAL_EVERY == 0
        assert _logged(y["eval/loss"]) == evaluated == _logged(x["eval/loss"])
        if evaluated:
            for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
                assert y[key] == pytest.approx(x[key], abs=1e-4), key
    wa, wb = _weights(one / "final"), _weights(fsdp_run / "final")
    assert set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    # The checkpoint: consolidated model files plus one optimizer shard per process.
    ckpt = fsdp_run / f"checkpoint-{STEPS - 2}"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert sorted(p.name for p in (ckpt / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_sigkill_after_a_sharded_checkpoint_then_resume_gives_the_uninterrupted_weights(cache, fsdp_run, tmp_path):
    out = tmp_path / "killed"
    extra = ["--max-steps", str(STEPS), "--save-every", "2", "--reference", "online"]
    proc = _launch(cache, out, *extra, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-2").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-2").exists() and not (out / "final").exists()
    # The run folder's lock names the killed run's main process: wait until it is gone (until then, a resume is
    # rightly refused: it may still write), after which the lock is stale and taken over.
    from pipeline.core.lock import _is_stale, _owner, lock_path

    owner = _owner(lock_path(out, folder=True))
    deadline = time.time() + 60
    while owner and not _is_stale(owner) and time.time() < deadline:
        time.sleep(0.1)
    assert not owner or _is_stale(owner), owner

    # Another world size is refused with what to do instead (checked before anything is loaded twice).
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(UserError, match="sharded over 2 processes"):
        run(TrainConfig(scores=cache, out=copy, batch_size=2, max_steps=STEPS, learning_rate=3e-3,
                        warmup_ratio=0.25, reference="online", device="cpu", progress=False, resume=True))

    _launch(cache, out, *extra, "--resume")
    wa, wb = _weights(fsdp_run / "final"), _weights(out / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ma = pq.read_table(fsdp_run / "metrics.parquet").to_pylist()
    mb = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)


def test_fsdp_with_lora_trains_adapters_only_and_saves_adapter_checkpoints(cache, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.models import load_model

    out = tmp_path / "lora"
    _launch(cache, out, "--max-steps", "2", "--save-every", "1", "--lora-r", "4", "--learning-rate", "1e-2",
            "--warmup-ratio", "0")  # HF's warmup starts at lr 0: a warmup step would leave B at 0
    ckpt = out / "checkpoint-1"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    # The optimizer state is sharded over both processes and holds the adapters only: the base is frozen.
    keys = FileSystemReader(str(ckpt / "optimizer")).read_metadata().state_dict_metadata
    param_keys = [k for k in keys if ".exp_avg" in k]
    assert param_keys and all("lora_" in k for k in param_keys)
    assert len(list((ckpt / "optimizer").glob("*.distcp"))) == 2
    model, _ = load_model(str(out / "final"))
    assert type(model).__name__ == "PeftModel"


def test_deepspeed_config_is_refused_with_the_fsdp_alternative(monkeypatch):
    from pipeline.trainer.accelerator import fresh_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed is not supported.*fsdp.yaml"):
        fresh_accelerator("no", cpu=True)
