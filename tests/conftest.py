"""Shared fixtures: a small preference set, ingested, and a reference cache scored with the `micro` preset."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Tests never reach a model hub: the CLI's offline default, for library calls too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_arithmetic_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Short synthetic pairs: a correct sum is chosen, an off-by-some sum rejected."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
            fh.write(json.dumps({"prompt": f"What is {a} + {b}?",
                                 "chosen": f"{a} + {b} = {a + b}. #### {a + b}",
                                 "rejected": f"{a} + {b} = {wrong}. #### {wrong}"}) + "\n")
    return path


def ingest_pairs(tmp: Path, n: int = 12, eval_fraction: float = 0.25, seed: int = 0) -> Path:
    from stages.ingest import IngestConfig, run

    src = write_arithmetic_pairs(tmp / "pairs.jsonl", n, seed)
    out = tmp / "pairs.arrow"
    run(IngestConfig(inputs=[str(src)], out=str(out), eval_fraction=eval_fraction, progress=False))
    return out


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory) -> Path:
    return ingest_pairs(tmp_path_factory.mktemp("pairs"), n=20, eval_fraction=0.3)  # P(no eval pair) < 0.1%


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, small_pairs) -> Path:
    from stages.score_ref import ScoreRefConfig, run

    out = tmp_path_factory.mktemp("cache") / "scores"
    run(ScoreRefConfig(pairs=small_pairs, model="micro", out=out, samples=3, draws=2, pairs_per_part=4,
                       device="cpu", progress=False))
    return out


def accelerate_launch() -> list[str]:
    """The start of an ``accelerate launch`` command on a free rendezvous port, so two test sessions (or a
    process of an earlier test still closing) never meet on accelerate's default port 29500."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
