"""The model card (README.md) of a final model folder: what was trained, from what, how, and how it did.

Its YAML front matter is the Hub's (``library_name``, ``base_model``, ``tags``), so the folder uploads as a
model repository with a card as it is; the body names the stage, the starting model, the data with its
fingerprint, every setting, the last logged metrics and the held-out results (accuracy with its count and
a 95% Wilson interval).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import yaml

from pipeline.evaluation.intervals import wilson_interval


def _table(rows: Mapping[str, Any]) -> list[str]:
    return ["| name | value |", "|---|---|"] + [
        f"| `{k}` | {f'{v:.6g}' if isinstance(v, float) else v} |" for k, v in rows.items()]


def model_card(*, stage: str, base_model: str, lora: bool, data: Mapping[str, Any], settings: Mapping[str, Any],
               metrics: Mapping[str, Any], eval_metrics: Mapping[str, Any] | None = None, eval_pairs: int = 0,
               eval_step: int | None = None) -> str:
    """README.md text for a model ``stage`` (``dpo`` or ``sft``) trained from ``base_model``.

    ``data`` describes what it was trained on (paths and fingerprints), ``settings`` is the resolved config,
    ``metrics`` the last logged row, ``eval_metrics`` the last held-out measurement (``eval/...``) on
    ``eval_pairs`` pairs at step ``eval_step``."""
    tags = ["lldm-dpo", stage, "llada", "masked-diffusion"] + (["lora"] if lora else [])
    front = {"library_name": "peft" if lora else "transformers", "base_model": base_model, "tags": tags}
    what = {"dpo": "DPO against a reference-score cache (masked-diffusion ELBOs, `lldm-dpo train`)",
            "sft": "masked-diffusion supervised fine-tuning (LLaDA's SFT objective, `lldm-dpo sft`)"}[stage]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {stage.upper()} of {base_model}", "",
             f"Trained from `{base_model}` with {what}{' as a LoRA adapter' if lora else ''}.", "",
             "## Data", ""]
    lines += _table(data)
    lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(dict(settings), sort_keys=False).rstrip(), "```",
              "", "## Last logged metrics", ""]
    lines += _table({k: v for k, v in metrics.items() if not str(k).startswith("eval/")})
    lines += ["", "## Eval results", ""]
    if eval_metrics:
        lines += [f"Held-out preference pairs: {eval_pairs}, measured at step {eval_step}.", ""]
        rows = dict(eval_metrics)
        acc = rows.get("eval/rewards/accuracies")
        if acc is not None and eval_pairs and math.isfinite(acc):  # a tie counts one half: k may be fractional
            lo, hi = wilson_interval(min(max(float(acc) * eval_pairs, 0.0), eval_pairs), eval_pairs)
            rows["eval/rewards/accuracies (95% Wilson interval)"] = f"[{lo:.3f}, {hi:.3f}] over {eval_pairs} pairs"
        lines += _table(rows)
    else:
        lines.append("None measured during training" + (" (train --eval-every measures held-out pairs)."
                                                         if stage == "dpo" else "."))
    return "\n".join(lines) + "\n"
