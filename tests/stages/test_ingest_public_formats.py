"""Public DPO data shapes end to end: UltraFeedback-binarized rows and Anthropic HH strings
go through ingest, score-ref (micro preset, chat template) and one train step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data.pairsfile import read_pairs
from pipeline.refcache.reader import open_cache
from stages.ingest import IngestConfig
from stages.ingest import run as ingest
from stages.score_ref import ScoreRefConfig
from stages.score_ref import run as score_ref
from stages.train import TrainConfig
from stages.train import run as train

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731

QUESTIONS = [("What is 2 + 3?", "5", "6"), ("What is 4 + 4?", "8", "9"), ("Name a colour.", "Blue.", "Seven."),
             ("What is 10 - 7?", "3", "4")]


def ultrafeedback_rows() -> list[dict]:
    """The HuggingFaceH4/ultrafeedback_binarized shape: string prompt, whole conversations, scores."""
    return [{"prompt": q, "prompt_id": f"id{i}", "chosen": [U(q), A(good)], "rejected": [U(q), A(bad)],
             "score_chosen": 8.0, "score_rejected": 3.0} for i, (q, good, bad) in enumerate(QUESTIONS)]


def hh_rows() -> list[dict]:
    """The Anthropic/hh-rlhf shape: chosen/rejected transcripts, no prompt field."""
    rows = []
    for q, good, bad in QUESTIONS:
        opening = "\n\nHuman: Hi, can you help me?\n\nAssistant: Of course.\n\nHuman: " + q + "\n\nAssistant:"
        rows.append({"chosen": opening + " " + good, "rejected": opening + " " + bad})
    return rows


@pytest.mark.parametrize("shape", ["ultrafeedback", "hh"])
def test_public_shape_through_ingest_score_ref_and_a_train_step(tmp_path, shape):
    rows = ultrafeedback_rows() if shape == "ultrafeedback" else hh_rows()
    if shape == "ultrafeedback":
        import pyarrow as pa

        src = tmp_path / "train_prefs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)
    else:
        src = tmp_path / "hh.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    res = ingest(IngestConfig(inputs=[str(src)], out=str(tmp_path / "pairs.arrow"), progress=False))
    assert (res.read, res.accepted, res.quarantined) == (4, 4, 0)
    pairs = read_pairs(res.out).to_pylist()
    for row, (q, good, bad) in zip(pairs, QUESTIONS):
        assert row["prompt_messages"][-1] == U(q)  # the prompt ends with the question's user turn
        assert row["chosen_messages"] == [A(good)] and row["rejected_messages"] == [A(bad)]  # completions only
    if shape == "hh":
        assert pairs[0]["prompt_messages"] == [U("Hi, can you help me?"), A("Of course."), U(QUESTIONS[0][0])]

    cache = tmp_path / "scores"
    scored = score_ref(ScoreRefConfig(pairs=res.out, model="micro", out=cache, samples=2, draws=1, device="cpu", progress=False))
    assert scored.pairs == 4
    table = open_cache(cache).table().to_pylist()
    from pipeline.models import load_model

    _, tok = load_model("micro")
    for row in table:
        prompt_text = tok.decode(row["prompt_ids"])
        assert "<|start_header_id|>user<|end_header_id|>" in prompt_text and prompt_text.endswith("assistant<|end_header_id|>\n\n")
        # the completion is one assistant turn: the question is not repeated in it
        assert "user" not in tok.decode(row["chosen_ids"]) and not row["truncated"]

    run = train(TrainConfig(scores=cache, out=tmp_path / "run", max_steps=1, batch_size=2, learning_rate=1e-3,
                            warmup_ratio=0.0, device="cpu", progress=False, tensorboard=False))
    assert run.steps == 1 and math.isfinite(run.final_loss)
    assert Path(run.final_model).exists()
