"""train and sft write transformers' checkpoint layout (checkpoint-N + TrainerState's trainer_state.json), resume
from resume_from_checkpoint true or a path (checked by content), rotate only their own checkpoints, refuse the old
layout, and push the final model with push_to_hub (a recording HfApi: no network)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.core.errors import ConfigError, UserError
from stages.sft import SFTConfig
from stages.sft import run as sft
from stages.train import TrainConfig
from stages.train import run as train
from tests.stages.test_sft import write_sft_data

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", beta=0.5, device="cpu", progress=False,
            tensorboard=False, batch_size=2)
SFT_FAST = dict(model="micro", learning_rate=3e-3, batch_size=4, device="cpu", progress=False, tensorboard=False,
                report_to="none", max_length=64)


def _train(cache, out, **kw):
    return train(TrainConfig(scores=cache, out=out, **{**FAST, **kw}))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_sft_data(tmp_path_factory.mktemp("sftdata") / "d.jsonl", n=16)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_train_writes_checkpoint_n_with_trainer_state_that_transformers_reads(small_cache, tmp_path):
    from transformers import TrainerState
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "run"
    _train(small_cache, out, max_steps=5, save_every=2, keep_checkpoints=0, log_every=1, eval_every=2)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "checkpoints").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    ckpt = out / "checkpoint-4"
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    assert (state.global_step, state.max_steps, state.logging_steps, state.save_steps, state.eval_steps,
            state.train_batch_size) == (4, 5, 1, 2, 2, 2)
    metrics = {r["step"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    train_entries = [e for e in state.log_history if "loss" in e]
    eval_entries = [e for e in state.log_history if "eval_loss" in e]
    assert [e["step"] for e in train_entries] == [1, 2, 3, 4]
    assert [e["step"] for e in eval_entries] == [2, 4]
    assert all(e["loss"] == metrics[e["step"]]["loss"] for e in train_entries)
    assert all(e["eval_rewards/accuracies"] == metrics[e["step"]]["eval/rewards/accuracies"] for e in eval_entries)
    assert state.epoch == pytest.approx(metrics[4]["epoch"])
    # the resume state: optimizer, scheduler, RNG, loadable without pickle; the run's recorded config
    for name in ("optimizer.pt", "scheduler.pt", "rng-00000.pt"):
        torch.load(ckpt / name, weights_only=True)
    assert (ckpt / "config.yaml").read_text() == (out / "config.yaml").read_text()
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()  # still a model


def test_train_resumes_from_a_given_checkpoint_path_into_another_folder(small_cache, tmp_path):
    full = tmp_path / "full"
    _train(small_cache, full, max_steps=4, save_every=2)
    out = tmp_path / "continued"
    result = _train(small_cache, out, max_steps=4, save_every=2, resume_from_checkpoint=str(full / "checkpoint-2"))
    assert result.resumed_from == 2
    a, b = _weights(full / "final"), _weights(out / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert [r["step"] for r in pq.read_table(out / "metrics.parquet").to_pylist()] == [3, 4]
    with pytest.raises(UserError, match=r"checkpoint-2/config.yaml: cannot resume with learning_rate = 0.01") as err:
        _train(small_cache, tmp_path / "other", max_steps=4, save_every=2, learning_rate=1e-2,
               resume_from_checkpoint=str(full / "checkpoint-2"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="cannot resume with max_steps = 6; the run was started with max_steps = 4"):
        _train(small_cache, tmp_path / "other2", max_steps=6, save_every=2,
               resume_from_checkpoint=str(full / "checkpoint-2"))


def test_rotation_and_resume_leave_a_users_checkpoint_folder_alone(small_cache, tmp_path):
    out = tmp_path / "run"
    theirs = out / "checkpoint-99"
    theirs.mkdir(parents=True)
    (theirs / "trainer_state.json").write_text('{"global_step": 99}')  # someone's transformers checkpoint
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a run \(checkpoint-99\)"):
        _train(small_cache, out, max_steps=4, save_every=1)
    _train(small_cache, out, max_steps=4, save_every=1, keep_checkpoints=1, overwrite=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-99"]
    assert (theirs / "notes.txt").read_text() == "mine" and (theirs / "trainer_state.json").is_file()
    result = _train(small_cache, out, max_steps=4, save_every=1, keep_checkpoints=1, resume=True)
    assert result.resumed_from == 3  # the newest of the run's own, not the user's folder
    _train(small_cache, out, max_steps=2, overwrite=True)
    assert (theirs / "notes.txt").read_text() == "mine"  # --overwrite removes only what runs wrote


def test_a_run_folder_of_the_old_layout_is_refused_in_one_line(small_cache, tmp_path):
    out = tmp_path / "old"
    step = out / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(UserError, match=r"step-0000002: a checkpoint of the layout before transformers'") as err:
        _train(small_cache, out, max_steps=4, resume=True)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints\)"):
        _train(small_cache, out, max_steps=4)


def test_sft_resumes_from_a_path_bit_identically_and_refuses_other_data(sft_data, tmp_path):
    full = tmp_path / "full"
    sft(SFTConfig(data=sft_data, out=full, max_steps=4, save_every=2, log_every=1, seed=3, **SFT_FAST))
    state = json.loads((full / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [e["step"] for e in state["log_history"]] == [1, 2]
    assert state["num_input_tokens_seen"] == state["log_history"][-1]["num_tokens"] > 0
    out = tmp_path / "continued"
    result = sft(SFTConfig(data=sft_data, out=out, max_steps=4, save_every=2, log_every=1, seed=3,
                           resume_from_checkpoint=str(full / "checkpoint-2"), **SFT_FAST))
    assert result.resumed_from == 2
    a, b = _weights(full / "final"), _weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    with pytest.raises(UserError, match=r"config.yaml: cannot resume with learning_rate = 0.01; the run was started "
                                        r"with learning_rate = 0.003"):
        sft(SFTConfig(data=sft_data, out=tmp_path / "y", max_steps=4, save_every=2, log_every=1, seed=3,
                      resume_from_checkpoint=str(full / "checkpoint-2"), **{**SFT_FAST, "learning_rate": 1e-2}))
    other = write_sft_data(tmp_path / "other.jsonl", n=16, seed=9)
    with pytest.raises(UserError, match="cannot resume: the data differs"):
        sft(SFTConfig(data=other, out=tmp_path / "x", max_steps=4, save_every=2, log_every=1, seed=3,
                      resume_from_checkpoint=str(full / "checkpoint-2"), **SFT_FAST))


def test_sft_push_to_hub_uploads_the_final_folder_with_its_card_and_never_records_the_token(sft_data, tmp_path,
                                                                                            monkeypatch):
    import huggingface_hub

    calls = []

    class Api:
        def __init__(self, token=None, **kw):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw["private"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            folder = kw["folder_path"]
            calls.append(("upload_folder", kw["repo_id"], folder, sorted(p.name for p in
                                                                        __import__("pathlib").Path(folder).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    out = tmp_path / "run"
    sft(SFTConfig(data=sft_data, out=out, max_steps=2, save_every=1, push_to_hub=True, hub_model_id="me/sft-micro",
                  hub_private_repo=True, hub_token="hf_SECRET123", **SFT_FAST))
    assert calls[0] == ("init", "hf_SECRET123")
    assert calls[1] == ("create_repo", "me/sft-micro", True)
    _, repo, folder, names = calls[2]
    assert (repo, folder) == ("me/sft-micro", str(out / "final")) and "README.md" in names
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["push_to_hub"] is True and recorded["hub_model_id"] == "me/sft-micro"
    for path in [out / "config.yaml", out / "final" / "README.md", out / "checkpoint-1" / "config.yaml"]:
        assert "hf_SECRET123" not in path.read_text(), path


def test_push_to_hub_without_hub_model_id_is_one_line_before_training(sft_data, tmp_path):
    from stages.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["sft", str(sft_data), "--model", "micro", "--out", str(out), "--push-to-hub"])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "push_to_hub needs hub_model_id" in err
    assert not out.exists()  # nothing ran
    with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
        TrainConfig(push_to_hub=True)
