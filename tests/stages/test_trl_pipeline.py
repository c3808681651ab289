"""One TRL DPOConfig YAML drives ingest, score-ref, train and run: each stage applies its keys and leaves the
others in one line; what cannot apply is reported in one pass, by the user's own names."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli.loading import load_config
from pipeline.core.errors import ConfigError, UserError
from tests.conftest import write_arithmetic_pairs

# TRL's documented DPOConfig keys (TrainingArguments' and DPOConfig's own), as a TRL user writes them.
DPO_CONFIG = """
model_name_or_path: micro
output_dir: {run}
bf16: true
learning_rate: 5.0e-4
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
num_train_epochs: 2
max_length: 96
max_prompt_length: 8
max_completion_length: 24
beta: 0.1
loss_type: apo_zero
eval_strategy: epoch
save_strategy: epoch
logging_strategy: epoch
save_total_limit: null
report_to: none
seed: 3
gradient_checkpointing: false
remove_unused_columns: false
"""


def test_one_dpo_config_yaml_drives_ingest_score_ref_and_train(tmp_path, capsys):
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref
    from stages.train import TrainConfig
    from stages.train import run as train

    run_dir, path = tmp_path / "run", tmp_path / "dpo.yaml"
    path.write_text(DPO_CONFIG.format(run=run_dir))
    data = write_arithmetic_pairs(tmp_path / "prefs.jsonl", 20)
    pairs, cache = tmp_path / "pairs.arrow", tmp_path / "cache"

    ingest(load_config(IngestConfig, path, {"inputs": [str(data)], "out": str(pairs), "eval_fraction": 0.3,
                                            "progress": False}))
    note = capsys.readouterr().err
    assert "note: " in note and "ingest applies none of its keys; leaves model_name_or_path" in note
    assert "learning_rate" in note and note.count("\n") == 1

    cfg = load_config(ScoreRefConfig, path, {"pairs": pairs, "out": cache, "device": "cpu", "samples": 2,
                                             "draws": 2, "progress": False})
    note = capsys.readouterr().err
    assert (cfg.model, cfg.mixed_precision, cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length) == \
        ("micro", "bf16", 96, 8, 24)
    assert cfg.out == cache  # output_dir is train's run folder, left to train
    assert "score-ref applies model_name_or_path, bf16" in note and "output_dir" in note.split("leaves")[1]
    score_ref(cfg)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fingerprint"]["max_prompt_length"] == 8 and manifest["fingerprint"]["mixed_precision"] == "bf16"
    from pipeline.refcache.reader import open_cache

    lengths = open_cache(cache).table(["prompt_len", "truncated"]).to_pylist()
    assert max(r["prompt_len"] for r in lengths) <= 8 and all(r["truncated"] for r in lengths)  # TRL's keep-end

    cfg = load_config(TrainConfig, path, {"scores": cache, "device": "cpu", "progress": False})
    assert (cfg.loss, cfg.eval_each_epoch, cfg.save_each_epoch, cfg.log_each_epoch) == ("apo_zero", True, True, True)
    result = train(cfg)
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    per_epoch = result.steps // 2
    assert [r["step"] for r in metrics] == [per_epoch, 2 * per_epoch]  # logged at each epoch's end
    assert all(r["eval/rewards/accuracies"] == r["eval/rewards/accuracies"] for r in metrics)  # evaluated there
    assert (run_dir / f"checkpoint-{per_epoch}").is_dir()  # saved at the first epoch's end (the second: final)
    assert not list(run_dir.glob("checkpoint-1")) or per_epoch == 1


def test_what_cannot_apply_is_reported_in_one_pass_by_the_users_names(tmp_path):
    from stages.train import TrainConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("bf16: maybe\ndeepspeed: ds.json\npacking: true\nloss_type: sigmoid\nlearning_rat: 1\n"
                    "loss_typo: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path, {})
    message = str(err.value)
    assert message.startswith(f"{path}: 4 problems: ") and "\n" not in message
    for part in ("4 problems: bf16 must be true or false, got 'maybe'", "deepspeed: 'ds.json' cannot apply here",
                 "packing: True cannot apply here: sequences are not packed", "unknown keys 'learning_rat', "
                 "'loss_typo'"):
        assert part in message
    bf16 = next(part for part in message.split("; ") if "bf16" in part)
    assert "mixed-precision" not in bf16 and "mixed_precision" not in bf16  # the user's name, not ours


def test_a_numerics_refusal_names_the_users_bf16(small_cache, tmp_path):
    from stages.train import TrainConfig
    from stages.train import run as train

    path = tmp_path / "dpo.yaml"
    path.write_text(f"bf16: true\noutput_dir: {tmp_path / 'run'}\nmax_steps: 1\n")
    cfg = load_config(TrainConfig, path, {"scores": small_cache, "device": "cpu", "progress": False})
    with pytest.raises(UserError, match=r"asks for mixed_precision=bf16 \(your bf16\); drop bf16 to follow"):
        train(cfg)


def test_score_ref_refuses_a_key_no_stage_has(tmp_path):
    from stages.score_ref import ScoreRefConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("learning_rate: 1.0e-5\nsamplez: 3\n")  # learning_rate is left to train; samplez is a typo
    with pytest.raises(ConfigError, match="unknown key 'samplez' for ScoreRefConfig"):
        load_config(ScoreRefConfig, path, {})


def test_run_moves_a_dpo_configs_keys_into_train_and_score_ref(tmp_path, capsys):
    from stages.run_all import merged_config, stage_configs

    path = tmp_path / "run.yaml"
    path.write_text(DPO_CONFIG.format(run=tmp_path / "out") + "rounds: 0\nquestions: null\n")
    cfg = merged_config(path, {})
    assert "run gives bf16, max_length, max_prompt_length, max_completion_length, loss_type" in capsys.readouterr().err
    ingest, score, train, _ = stage_configs(cfg)
    assert (score.mixed_precision, score.max_length, score.max_prompt_length, score.max_completion_length) == \
        ("bf16", 96, 8, 24)
    assert (train.loss, train.loss_weights, train.mixed_precision, train.eval_each_epoch, train.epochs,
            train.learning_rate, train.seed) == ("apo_zero", None, "bf16", True, 2, 5e-4, 3)
    assert cfg.out == tmp_path / "out"


def test_a_value_refused_after_translation_names_the_key_the_user_wrote(tmp_path):
    from stages.train import TrainConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("per_device_train_batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1, got 0 \[batch_size \(given as "
                                          r"per_device_train_batch_size\)\]"):
        load_config(TrainConfig, path, {})
    with pytest.raises(ConfigError, match=r"\[save_best \(given as load_best_model_at_end\)\]"):
        load_config(TrainConfig, None, {"load_best_model_at_end": True})


def test_only_a_message_about_the_field_is_annotated():
    from pipeline.core.config import in_users_words

    given = {"model": "model_name_or_path", "batch_size": "per_device_train_batch_size"}
    assert in_users_words("the model is not a LLaDA checkpoint", given) == "the model is not a LLaDA checkpoint"
    assert in_users_words("batch_size must be >= 1, got 0", given).endswith(
        "[batch_size (given as per_device_train_batch_size)]")
    assert in_users_words("lower --batch-size", given).endswith("[batch_size (given as per_device_train_batch_size)]")
