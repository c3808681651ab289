"""Every TrainingArguments / TRL key in a train or sft YAML: applied, accepted as harmless, or refused with why."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.cli.loading import load_config
from pipeline.cli.trl_args import training_arguments
from pipeline.core.errors import ConfigError


def _load(cls, tmp_path, text, **flags):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(cls, path, flags)


@pytest.fixture(params=["train", "sft"])
def cls(request):
    if request.param == "train":
        from stages.train import TrainConfig

        return TrainConfig
    from stages.sft import SFTConfig

    return SFTConfig


def test_the_field_list_is_transformers_own():
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert set(training_arguments()) == names and {"deepspeed", "warmup_steps", "optim", "run_name"} <= names


def test_every_training_arguments_field_at_its_default_loads(cls, tmp_path):
    import yaml

    defaults = {k: v for k, v in training_arguments().items()
                if isinstance(v, (bool, int, float, str, type(None))) or v in ([], {})}
    defaults = {k: getattr(v, "value", v) for k, v in defaults.items()}
    cfg = _load(cls, tmp_path, yaml.safe_dump(defaults))  # TrainingArguments() as a YAML: nothing refused
    assert (cfg.optim, cfg.scheduler, cfg.max_steps) == (defaults["optim"], "linear", 0)  # -1 = from epochs
    assert len(defaults) > 100


@pytest.mark.parametrize("text, message", [
    ("deepspeed: ds.json\n", "deepspeed: 'ds.json' cannot apply here: DeepSpeed is not supported here (lldm-dpo's "
                            "trainer is not wired to DeepSpeed's engine, and untested)"),
    ("deepspeed: {zero_optimization: {stage: 3}}\n", "deepspeed: {'zero_optimization': {'stage': 3}} cannot apply"),
    ("tpu_num_cores: 8\n", "tpu_num_cores: 8 cannot apply here: there is no TPU"),
    ("push_to_hub: true\n", "push_to_hub needs hub_model_id"),
    ("hub_strategy: checkpoint\n", "hub_strategy: 'checkpoint' cannot apply here: push_to_hub uploads the final"),
    ("hub_revision: dev\n", "hub_revision: 'dev' cannot apply here"),
    ("eval_strategy: daily\neval_steps: 5\n", "eval_strategy: 'daily' cannot apply here"),
    ("save_strategy: daily\n", "save_strategy: 'daily' cannot apply here"),
    ("save_strategy: [steps]\n", "save_strategy: ['steps'] cannot apply here"),  # a list: no TypeError
    ("use_peft: true\n", "use_peft: true needs lora_r > 0"),
    ("resume_from_checkpoint: [1, 2]\n", "resume_from_checkpoint must be true, false or a checkpoint folder's"),
    ("torch_empty_cache_steps: 3\n", "torch_empty_cache_steps: 3 cannot apply here: lldm-dpo's trainer does not"),
    ("sync_ref_model: true\n", "sync_ref_model: True cannot apply here"),
    ("no_such_key: 1\n", "unknown key 'no_such_key'"),
])
def test_what_cannot_apply_is_a_one_line_error_naming_the_key(cls, tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        _load(cls, tmp_path, text)
    assert message in str(err.value) and "\n" not in str(err.value) and "c.yaml" in str(err.value)


def test_bookkeeping_keys_are_accepted_and_the_meaningful_ones_take_effect(tmp_path):
    from stages.train import TrainConfig

    cfg = _load(TrainConfig, tmp_path, """
run_name: exp-1
logging_dir: somewhere/logs
push_to_hub: false
do_train: true
overwrite_output_dir: true
eval_strategy: steps
eval_steps: 5
save_strategy: steps
save_steps: 10
use_peft: true
lora_r: 8
resume_from_checkpoint: true
report_to: [tensorboard, wandb]
warmup_steps: 3
use_cpu: true
remove_unused_columns: false
""")
    assert (cfg.run_name, cfg.overwrite, cfg.eval_every, cfg.save_every, cfg.lora_r, cfg.resume) == \
        ("exp-1", True, 5, 10, 8, True)
    assert (cfg.report_to, cfg.warmup_steps, cfg.device) == ("tensorboard,wandb", 3, "cpu")
    assert _load(TrainConfig, tmp_path, "save_strategy: no\nsave_steps: 0\n").save_every == 0  # YAML's no
    assert _load(TrainConfig, tmp_path, "report_to: all\n").report_to == "all"
    assert _load(TrainConfig, tmp_path, "report_to: none\n").report_to == "none"
    with pytest.raises(ConfigError, match="'save_st.*' and 'save_st.*' both set save_every"):
        _load(TrainConfig, tmp_path, "save_strategy: 'no'\nsave_steps: 10\n")
    with pytest.raises(ConfigError, match="eval_strategy: steps needs eval_steps"):
        _load(TrainConfig, tmp_path, "eval_strategy: steps\n")


def test_sft_takes_dataset_name_and_refuses_an_eval_strategy(tmp_path):
    from stages.sft import SFTConfig

    assert str(_load(SFTConfig, tmp_path, "dataset_name: d.jsonl\n").data) == "d.jsonl"
    with pytest.raises(ConfigError, match="sft measures no held-out split"):
        _load(SFTConfig, tmp_path, "eval_strategy: steps\neval_steps: 3\n")
    with pytest.raises(ConfigError, match="packing: True cannot apply here"):
        _load(SFTConfig, tmp_path, "packing: true\n")
    cfg = _load(SFTConfig, tmp_path, "save_strategy: epoch\nlogging_strategy: epoch\n")
    assert (cfg.save_each_epoch, cfg.log_each_epoch) == (True, True)
    with pytest.raises(ConfigError, match="sft measures no held-out split"):
        _load(SFTConfig, tmp_path, "eval_strategy: epoch\n")


def test_epoch_strategies_become_each_epoch_intervals_once_an_epoch_is_known():
    from pipeline.trainer.session import Recipe
    from stages.train import TrainConfig

    session = Recipe.__new__(Recipe)
    session.cfg, session.world = TrainConfig(batch_size=2, grad_accum=2, epochs=3, max_steps=0, eval_every=1,
                                             save_each_epoch=True, log_each_epoch=True, eval_each_epoch=True), 1
    session.count_steps(10)  # 10 rows at 4 a step: 3 steps an epoch, 9 in all
    assert (session.steps_per_epoch, session.total_steps) == (3, 9)
    assert (session.cfg.save_every, session.cfg.log_every, session.cfg.eval_every) == (3, 3, 3)
