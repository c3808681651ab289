"""The model card of a final model folder: Hub front matter, what was trained from what, settings, results."""

from __future__ import annotations

import math

import pytest
import yaml

from pipeline.model_card import model_card, wilson_interval


def test_wilson_interval_against_hand_worked_values():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7217..., half-width 0.2311...
    lo, hi = wilson_interval(0.8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(1.0, 5)[1] == 1.0 and math.isnan(wilson_interval(0.5, 0)[0])


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
