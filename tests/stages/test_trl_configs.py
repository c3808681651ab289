"""train and sft run from a YAML written in TRL's DPOConfig / SFTConfig words, as it is."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.cli.loading import load_config

# The keys of TRL's documented DPO example (trl/scripts/dpo.py, LoRA variant), plus report_to as a list,
# warmup_steps, save_strategy: steps, optim and lr_scheduler_type: cosine_with_min_lr.
DPO_YAML = """
model_name_or_path: micro
learning_rate: 5.0e-4
num_train_epochs: 1
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: true
eval_strategy: steps
eval_steps: 2
output_dir: {out}
remove_unused_columns: false
logging_steps: 1
use_peft: true
lora_r: 4
lora_alpha: 8
report_to: [tensorboard]
warmup_steps: 1
save_strategy: steps
save_steps: 1
optim: sgd
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
max_steps: 3
bf16: false
beta: 0.1
loss_type: sigmoid
run_name: trl-words
push_to_hub: false
do_train: true
logging_dir: {out}/logs
"""


def test_train_runs_from_a_trl_dpo_config_yaml(small_cache, tmp_path):
    from stages.train import TrainConfig, run

    out = tmp_path / "run"
    path = tmp_path / "dpo.yaml"
    path.write_text(DPO_YAML.format(out=out))
    cfg = load_config(TrainConfig, path, {"scores": small_cache, "device": "cpu", "progress": False})
    assert (cfg.optim, cfg.scheduler, cfg.lora_r, cfg.grad_accum, cfg.eval_every) == ("sgd", "cosine_with_min_lr",
                                                                                       4, 2, 2)
    result = run(cfg)
    assert result.steps == 3
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3]
    # HF's warmup from 0 over 1 step, then cosine down to 0.1 * peak over the other 2 (step 3: half way).
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.0, 5e-4, 5e-4 * (0.1 + 0.9 * 0.5)])
    assert rows[1]["eval/rewards/accuracies"] == rows[1]["eval/rewards/accuracies"]  # measured at eval_steps
    assert (out / "final" / "adapter_config.json").exists()  # use_peft + lora_r: an adapter
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in out.glob("checkpoint-*"))  # save_strategy: steps, save_steps: 1


SFT_YAML = """
model_name_or_path: micro
dataset_name: {data}
output_dir: {out}
learning_rate: 2.0e-3
num_train_epochs: 1
packing: false
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
gradient_checkpointing: false
logging_steps: 1
eval_strategy: "no"
save_strategy: "no"
report_to: none
warmup_steps: 1
max_length: 64
optim: adamw_torch
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs: {{min_lr: 1.0e-4}}
max_steps: 3
completion_only_loss: true
dataset_text_field: text
seed: 5
bf16: false
"""


def test_sft_runs_from_a_trl_sft_config_yaml(tmp_path):
    from stages.sft import SFTConfig, run
    from tests.stages.test_sft import write_sft_data

    data, out = write_sft_data(tmp_path / "d.jsonl"), tmp_path / "run"
    path = tmp_path / "sft.yaml"
    path.write_text(SFT_YAML.format(data=data, out=out))
    cfg = load_config(SFTConfig, path, {"device": "cpu", "progress": False, "tensorboard": False})
    assert (cfg.data, cfg.save_every, cfg.report_to) == (data, 0, "none")
    result = run(cfg)
    assert result.steps == 3
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.0, 2e-3, 1e-4 + (2e-3 - 1e-4) * 0.5])
    assert (out / "final" / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def _front_matter(path):
    import yaml

    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_final_models_carry_a_model_card(small_cache, tmp_path):
    from pipeline.refcache.fingerprint import fingerprint_digest
    from pipeline.refcache.reader import open_cache
    from stages.sft import SFTConfig
    from stages.sft import run as sft
    from stages.train import TrainConfig
    from stages.train import run as train
    from tests.stages.test_sft import write_sft_data

    out = tmp_path / "dpo"
    train(TrainConfig(scores=small_cache, out=out, max_steps=2, eval_every=2, lora_r=2, device="cpu",
                      progress=False, report_to="none", learning_rate=1e-3))
    front, text = _front_matter(out / "final" / "README.md")
    cache = open_cache(small_cache)
    assert front["base_model"] == cache.manifest.reference_model and "dpo" in front["tags"]
    assert front["library_name"] == "peft"
    assert fingerprint_digest(cache.fingerprint) in text and "eval/rewards/accuracies" in text
    assert "95% Wilson interval" in text and "lora_r: 2" in text

    data, out = write_sft_data(tmp_path / "d.jsonl"), tmp_path / "sft"
    sft(SFTConfig(data=data, out=out, model="micro", max_steps=2, device="cpu", progress=False, report_to="none",
                  max_length=64))
    front, text = _front_matter(out / "final" / "README.md")
    assert front == {"library_name": "transformers", "base_model": "micro",
                     "tags": ["lldm-dpo", "sft", "llada", "masked-diffusion"]}
    assert str(data) in text and "examples sha256" in text


class _Terminal:
    """stderr as a terminal: what tqdm draws on, captured."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_sft_shows_a_progress_bar_with_eta_on_a_terminal(tmp_path, monkeypatch, progress):
    import sys

    from stages.sft import SFTConfig, run
    from tests.stages.test_sft import write_sft_data

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    data = write_sft_data(tmp_path / "d.jsonl", n=8)
    run(SFTConfig(data=data, out=tmp_path / "run", model="micro", max_steps=3, log_every=1, device="cpu",
                  progress=progress, report_to="none", max_length=64, batch_size=2))
    text = term.buffer.getvalue()
    if progress:
        assert "sft: 100%" in text and "3/3" in text and "<00:00" in text  # tqdm's elapsed<remaining (ETA)
        assert "step 3" in text or "loss" in text  # the metric lines still print, above the bar
    else:
        assert text == ""


def test_train_shows_a_progress_bar_with_eta_on_a_terminal(small_cache, tmp_path, monkeypatch):
    import sys

    from stages.train import TrainConfig, run

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run(TrainConfig(scores=small_cache, out=tmp_path / "run", max_steps=2, device="cpu", progress=True,
                    report_to="none", learning_rate=1e-3))
    text = term.buffer.getvalue()
    assert "train: 100%" in text and "2/2" in text and "loss=" in text


SEED_YAML = """
model_name_or_path: micro
preference_data_path: {data}
output_dir: {out}
learning_rate: 2.0e-4
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
num_train_epochs: 2
beta: 0.2
diffusion_steps: 12
use_mixed_precision: true
gradient_checkpointing: true
"""


def test_run_takes_the_seed_project_config_keys(tmp_path):
    from pipeline.core.errors import ConfigError
    from stages.run_all import merged_config, stage_configs

    path = tmp_path / "config.yaml"
    path.write_text(SEED_YAML.format(data=tmp_path / "prefs.jsonl", out=tmp_path / "out"))
    cfg = merged_config(path, {})
    assert (cfg.model, cfg.out) == ("micro", tmp_path / "out")
    ingest, score, train, ev = stage_configs(cfg)
    assert [str(p) for p in ingest.inputs] == [str(tmp_path / "prefs.jsonl")]
    assert (train.learning_rate, train.batch_size, train.grad_accum, train.epochs, train.max_steps) == \
        (2e-4, 2, 4, 2, 0)  # the epochs count: the embedded default's max_steps is cleared
    assert (train.beta, train.gradient_checkpointing, score.mixed_precision, ev.steps) == (0.2, True, "bf16", 12)
    # eval's config refuses a schedule its sampler cannot run (the embedded default generates 24 tokens in 6
    # blocks), as generate's and make-pairs' do: one declaration, one check (pipeline/sampling/args.py)
    path.write_text(SEED_YAML.format(data=tmp_path / "prefs.jsonl", out=tmp_path / "out").replace(
        "diffusion_steps: 12", "diffusion_steps: 8"))
    with pytest.raises(ConfigError, match="steps 8 must be a multiple of the number of blocks 6"):
        stage_configs(merged_config(path, {}))


def test_a_seed_key_and_its_section_key_must_agree(tmp_path):
    from pipeline.cli.trl_names import seed_project_config
    from pipeline.core.errors import ConfigError

    assert seed_project_config({"beta": 0.1, "train": {"beta": 0.1}}, "c.yaml") == {"train": {"beta": 0.1}}
    with pytest.raises(ConfigError, match="c.yaml: 'beta' and 'train.beta' give different values"):
        seed_project_config({"beta": 0.2, "train": {"beta": 0.1}}, "c.yaml")
    with pytest.raises(ConfigError, match="use_mixed_precision must be fp16, bf16, no, true or false, got 'half'"):
        seed_project_config({"use_mixed_precision": "half"}, "c.yaml")
    assert seed_project_config({"use_mixed_precision": False}, "c.yaml") == {"score_ref": {"mixed_precision": "no"}}
    # the seed's README gives fp16 or bf16 (and its config.yaml "no"): accelerate's names
    for value, expected in (("fp16", "fp16"), ("bf16", "bf16"), ("no", "no"), ("BF16", "bf16"), (True, "bf16")):
        assert seed_project_config({"use_mixed_precision": value}, "c.yaml") == \
            {"score_ref": {"mixed_precision": expected}}
