"""Two processes whose shares differ: responses of very different lengths (so ``--batch-tokens`` splits one
process's micro-batch into more forward passes than the other's) and an epoch whose last step leaves one
process no rows. Under FSDP every forward is a collective, and under both DDP and FSDP every process must
make the same collectives (the finite-loss flag, the gradient sync); each launch must finish, and equal one
process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from stages.train import TrainConfig, run
from tests.conftest import accelerate_launch

pytestmark = pytest.mark.slow

MODES = {
    "ddp": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"],
    "fsdp": ["--config_file", "configs/accelerate/fsdp_cpu.yaml"],
}
STEPS, BATCH, BATCH_TOKENS = 2, 3, 80  # 8 pairs: step 2 holds 2 pairs, all on process 0


@pytest.fixture(scope="module")
def uneven_cache(tmp_path_factory):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score

    tmp = tmp_path_factory.mktemp("uneven")
    src = tmp / "pairs.jsonl"
    with src.open("w") as fh:
        for i in range(8):
            words = 2 if i % 2 else 60  # short and long responses side by side
            fh.write(json.dumps({"prompt": f"Question {i}?", "chosen": " ".join(["yes"] * words) + f" {i}",
                                 "rejected": " ".join(["no"] * words) + f" {i}"}) + "\n")
    ingest(IngestConfig(inputs=[str(src)], out=str(tmp / "pairs.arrow"), progress=False))
    score(ScoreRefConfig(pairs=tmp / "pairs.arrow", model="micro", out=tmp / "cache", samples=2, device="cpu",
                         progress=False))
    return tmp / "cache"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_uneven_shares_and_an_idle_process_finish_and_equal_one_process(uneven_cache, tmp_path, mode):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    two = tmp_path / "two"
    cmd = [*accelerate_launch(), *MODES[mode], "-m", "stages.cli", "train", str(uneven_cache), "--out", str(two),
           "--batch-size", str(BATCH), "--batch-tokens", str(BATCH_TOKENS), "--max-steps", str(STEPS),
           "--learning-rate", "3e-3", "--warmup-ratio", "0", "--device", "auto", "--no-progress", "--no-tensorboard"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    run(TrainConfig(scores=uneven_cache, out=one, batch_size=2 * BATCH, batch_tokens=BATCH_TOKENS, max_steps=STEPS,
                    learning_rate=3e-3, warmup_ratio=0.0, device="cpu", progress=False, tensorboard=False))
    a = pq.read_table(one / "metrics.parquet").to_pylist()
    b = pq.read_table(two / "metrics.parquet").to_pylist()
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4)
        assert y["rewards/accuracies"] == pytest.approx(x["rewards/accuracies"])
        # Every pair weighs the same: the idle process's zero gradient does not halve step 2's (Adam would hide it).
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
