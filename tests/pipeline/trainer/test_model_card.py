"""The model card of a final model folder: Hub front matter, what was trained from what, settings, results."""

from __future__ import annotations

import yaml

from pipeline.trainer.model_card import model_card


def test_card_has_hub_front_matter_and_names_data_settings_and_results():
    card = model_card(stage="dpo", base_model="GSAI-ML/LLaDA-8B-Instruct", lora=True,
                      data={"cache fingerprint": "abc123"}, settings={"beta": 0.1, "lora_r": 8},
                      metrics={"step": 10, "loss": 0.5, "eval/loss": 0.6},
                      eval_metrics={"eval/rewards/accuracies": 0.8, "eval/loss": 0.6}, eval_pairs=10, eval_step=10)
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    front = yaml.safe_load(head)
    assert front == {"library_name": "peft", "base_model": "GSAI-ML/LLaDA-8B-Instruct",
                     "tags": ["lldm-dpo", "dpo", "llada", "masked-diffusion", "lora"]}
    assert "abc123" in body and "beta: 0.1" in body and "| `loss` | 0.5 |" in body
    assert "[0.490, 0.943] over 10 pairs" in body and "measured at step 10" in body
    sft = model_card(stage="sft", base_model="micro", lora=False, data={}, settings={}, metrics={})
    assert yaml.safe_load(sft.split("---\n")[1])["library_name"] == "transformers"
    assert "None measured" in sft
