"""Every checkpoint is a model: RUN/checkpoint-N loads wherever --model is taken (issue 12, item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models import load_model
from pipeline.trainer.checkpoint import list_checkpoints
from stages.evaluate import EvalConfig
from stages.evaluate import run as evaluate
from stages.generate import GenerateConfig
from stages.generate import run as generate
from stages.train import TrainConfig
from stages.train import run as train


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_eval_and_generate_take_a_mid_run_checkpoint(small_cache, tmp_path, lora_r):
    out = tmp_path / "run"
    train(TrainConfig(scores=small_cache, out=out, max_steps=3, save_every=1, keep_checkpoints=5, batch_size=2,
                      lora_r=lora_r, learning_rate=1e-2, warmup_ratio=0.0, device="cpu", progress=False,
                      tensorboard=False))
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["checkpoint-1", "checkpoint-2"]
    mid = ckpts[0]
    expected = ["adapter_config.json", "adapter_model.safetensors"] if lora_r else ["config.json",
                                                                                   "model.safetensors"]
    assert all((mid / name).is_file() for name in expected + ["tokenizer.json"])

    model, _ = load_model(str(mid))
    final, _ = load_model(str(out / "final"))
    assert type(model).__name__ == ("PeftModel" if lora_r else "LLaDAModelLM")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # a mid-run model, not the final one
        assert not torch.allclose(model(ids).logits, final(ids).logits)

    result = evaluate(EvalConfig(model=str(mid), scores=small_cache, before="none", out=tmp_path / "eval",
                                 device="cpu"))
    assert result.pairs > 0 and 0.0 <= result.preference_accuracy["after"] <= 1.0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n")
    gen_out = tmp_path / "gen.jsonl"
    generate(GenerateConfig(model=str(mid), prompts=str(prompts), out=str(gen_out), gen_length=8, block_length=8,
                            steps=4, device="cpu", progress=False))
    rows = [json.loads(line) for line in gen_out.read_text().splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["completion"], str)
