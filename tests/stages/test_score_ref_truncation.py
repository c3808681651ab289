"""score-ref's truncation to --max-length: responses that become identical (counted, skipped by train), and nothing
left to tell apart (refused); no prompt left for a shifted model: tests/pipeline/refcache/test_scoring.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import UserError
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score
from stages.train import TrainConfig
from stages.train import run as train

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, device="cpu", progress=False, tensorboard=False)


def test_identical_after_truncation_is_counted_and_skipped_by_train(small_pairs, tmp_path, capsys):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest

    # Three pairs differ only after a long shared start: cut at 24 tokens, their responses are the same.
    long = "step by step " * 12
    rows = [{"prompt": f"q{i}", "chosen": long + "yes", "rejected": long + "no"} for i in range(3)]
    rows += [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(5)]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = Path(ingest(IngestConfig(inputs=[str(src)], out=str(tmp_path / "p.arrow"), progress=False)).out)
    out = tmp_path / "c"
    result = score(ScoreRefConfig(pairs=pairs, model="micro", out=out, samples=2, max_length=24, device="cpu",
                                  progress=False, chat_template=False))  # lengths of the raw text
    assert result.identical_after_truncation == 3 and result.truncated >= 3 and result.pairs == 8
    assert json.loads((out / "manifest.json").read_text())["identical_after_truncation"] == 3
    train(TrainConfig(scores=out, out=tmp_path / "r", max_steps=1, **FAST))
    assert "skipping 3 pair(s) whose responses are identical after truncation" in capsys.readouterr().err
    # When truncation leaves nothing to tell apart, score-ref refuses before scoring.
    with pytest.raises(UserError, match=r"all 20 pairs are longer than --max-length 3"):
        score(ScoreRefConfig(pairs=small_pairs, model="micro", out=tmp_path / "c3", samples=2, max_length=3,
                             device="cpu", progress=False))
