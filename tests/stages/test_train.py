"""train: DPO on replayed masks against the cache; LoRA, sequence micro-batches, resume, processes, merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.errors import ConfigError, UserError
from pipeline.estimator.replay import PairBatch, replay_requests
from pipeline.models import load_model
from pipeline.refcache.reader import open_cache
from pipeline.trainer.dpo_step import TrainContext, batch_loss, micro_step, policy_terms, reference_means
from pipeline.trainer.placement import Placement
from stages.train import TrainConfig, run
from tests.conftest import accelerate_launch

FAST = dict(learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", beta=0.5, device="cpu", progress=False,
            tensorboard=False)


def _cfg(cache, out, **kw):
    return TrainConfig(scores=cache, out=out, **{**FAST, **kw})


def _train_rows(cache_dir, k=4):
    return list(open_cache(cache_dir).rows(split="train"))[:k]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ctx(cfg, cache_dir, model, tok, ref_model=None):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    return TrainContext(cfg, Placement(acc, model), tok, open_cache(cache_dir).fingerprint, ref_model)


def test_cached_and_online_reference_give_the_same_loss_and_gradients(small_cache, tmp_path):
    rows = _train_rows(small_cache)
    grads, losses = {}, {}
    for mode in ("cached", "online"):
        model, tok = load_model("micro")
        model.requires_grad_(True)
        ref = load_model("micro")[0] if mode == "online" else None
        cfg = _cfg(small_cache, tmp_path / mode, reference=mode)
        stats = micro_step(_ctx(cfg, small_cache, model, tok, ref), PairBatch(rows, draw=1), 1.0, sync=True)
        losses[mode], grads[mode] = stats.loss.item(), _grads(model)
    assert losses["cached"] == pytest.approx(losses["online"], abs=1e-6)
    assert losses["cached"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    for name, g in grads["cached"].items():
        torch.testing.assert_close(g, grads["online"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type, sft", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.5)])
def test_sequence_microbatch_gradient_equals_one_pass(small_cache, tmp_path, loss_type, sft):
    rows = _train_rows(small_cache, 3)
    grads = {}
    for k in (0, 2):
        model, tok = load_model("micro")
        model.requires_grad_(True)
        with torch.no_grad():  # move the policy off the reference so the loss weights are not all equal
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        cfg = _cfg(small_cache, tmp_path / str(k), sequence_microbatch=k, loss=loss_type, sft_weight=sft,
                   label_smoothing=0.1 if loss_type == "robust" else 0.0)
        micro_step(_ctx(cfg, small_cache, model, tok), PairBatch(rows, draw=0), 1.0, sync=True)
        grads[k] = _grads(model)
    assert grads[0].keys() == grads[2].keys() and grads[0]
    for name in grads[0]:
        scale = grads[0][name].abs().max().item()  # float32 sums in another order: compare at the tensor's scale
        torch.testing.assert_close(grads[2][name], grads[0][name], rtol=1e-4, atol=1e-4 * scale + 1e-9)


def test_replayed_masks_reproduce_cached_reference_terms(small_cache):
    model, tok = load_model("micro")
    rows = _train_rows(small_cache)
    batch = PairBatch(rows, draw=1)
    cfg = TrainConfig(scores=small_cache, device="cpu")
    with torch.no_grad():
        terms = policy_terms(model, replay_requests(batch, open_cache(small_cache).fingerprint), tok, cfg)
    for i, row in enumerate(rows):
        assert terms[2 * i].tolist() == pytest.approx(row["ref_chosen_terms"][1], rel=1e-6)
        assert terms[2 * i + 1].tolist() == pytest.approx(row["ref_rejected_terms"][1], rel=1e-6)
    ref_c, ref_r = reference_means(batch, "cpu")
    loss, st = batch_loss(cfg, terms, ref_c, ref_r, torch.tensor([r["chosen_len"] for r in rows]),
                          torch.tensor([r["rejected_len"] for r in rows]))
    assert st.chosen_rewards.abs().max() < 1e-6 and loss.item() == pytest.approx(0.6931, abs=1e-4)


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score
    from tests.conftest import ingest_pairs

    tmp = tmp_path_factory.mktemp("train")
    pairs = ingest_pairs(tmp, n=16, eval_fraction=0.0)
    out = tmp / "cache"
    score(ScoreRefConfig(pairs=pairs, model="micro", out=out, samples=4, device="cpu", progress=False))
    return out


def test_short_full_run_learns_and_changes_every_parameter(train_cache, tmp_path):
    # 6 epochs on the cache's one mask draw: accepted with --reuse-masks, and marked in the metrics.
    result = run(_cfg(train_cache, tmp_path / "run", max_steps=12, batch_size=8, tensorboard=True, reuse_masks=True))
    metrics = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert [m["masks/reused"] for m in metrics] == [0.0] * 2 + [1.0] * 10
    assert metrics[0]["rewards/accuracies"] <= 0.75 and metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert min(m["rewards/accuracies"] for m in metrics[-3:]) > 0.9
    assert result.final_reward_accuracy > 0.9 and metrics[-1]["loss"] < 0.3
    assert all(m["grad_norm"] > 0 and m["tokens_per_second"] > 0 and m["peak_memory_bytes"] > 0 for m in metrics)
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    base, _ = load_model("micro")
    trained, _ = load_model(str(tmp_path / "run" / "final"))  # the final model loads and scores
    before = dict(base.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


def test_lora_changes_only_the_adapter_and_merge_equals_wrapped(train_cache, tmp_path):
    from stages.merge import merge

    run(_cfg(train_cache, tmp_path / "lora", max_steps=4, batch_size=4, lora_r=4, lora_alpha=8,
             learning_rate=1e-2))
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert not any(".ff_out.lora" in k and "blocks" not in k for k in adapter)  # never the LM head
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained

    wrapped, tok = load_model(str(final))  # the adapter folder: base + adapter, not merged
    base, _ = load_model("micro")
    base_params = dict(base.named_parameters())
    for name, p in wrapped.named_parameters():
        if "lora_" not in name:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_params[plain]), f"base weight {plain} changed"

    merged_dir = merge(final, tmp_path / "merged").out
    merged, _ = load_model(merged_dir)
    ids = torch.tensor([tok("What is 2 + 3? 2 + 3 = 5.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, wrapped(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)


def _cli(cache, out, *extra):
    return [sys.executable, "-m", "stages.cli", "train", str(cache), "--out", str(out), "--max-steps", "8",
            "--batch-size", "4", "--learning-rate", "3e-3", "--warmup-ratio", "0.25", "--device", "cpu",
            "--save-every", "2", "--no-progress", "--reuse-masks", *extra]


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(train_cache, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_cli(train_cache, full), check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(train_cache, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-4").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()  # killed mid-way
    subprocess.run(_cli(train_cache, out, "--resume"), check=True, capture_output=True)

    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert not [p.name for p in out.rglob("*.tmp")]  # the killed run's temporary files are gone
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    ma = pq.read_table(full / "metrics.parquet").to_pylist()
    mb = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["step"] for m in mb] == list(range(1, 9))
    for x, y in zip(ma, mb):
        for key in ("loss", "rewards/margins", "learning_rate", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_two_processes_match_one_at_equal_global_batch(train_cache, tmp_path):
    one = tmp_path / "one"
    subprocess.run(_cli(train_cache, one, "--save-every", "0", "--max-steps", "3"), check=True, capture_output=True)
    two = tmp_path / "two"
    cmd = [*accelerate_launch(), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stages.cli", "train", str(train_cache), "--out", str(two), "--max-steps", "3", "--batch-size", "2",
           "--learning-rate", "3e-3", "--warmup-ratio", "0.25", "--device", "auto", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ma = pq.read_table(one / "metrics.parquet").to_pylist()
    mb = pq.read_table(two / "metrics.parquet").to_pylist()
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4)
        assert y["rewards/accuracies"] == pytest.approx(x["rewards/accuracies"])


def test_init_mismatch_is_refused_unless_allowed(small_cache, tmp_path):
    with pytest.raises(UserError, match=r"not the cache's reference model \(model\.config_sha256: "):
        run(_cfg(small_cache, tmp_path / "a", model="tiny", max_steps=1))


def test_non_finite_loss_names_step_and_pairs(small_cache, tmp_path, monkeypatch):
    import pipeline.trainer.dpo_step as train_mod

    real = train_mod.policy_terms

    def poisoned(model, requests, tok, cfg):
        return [t * float("nan") for t in real(model, requests, tok, cfg)]

    monkeypatch.setattr(train_mod, "policy_terms", poisoned)
    with pytest.raises(UserError, match=r"step 1: loss is not finite .* on pairs [0-9a-f]+"):
        run(_cfg(small_cache, tmp_path / "nan", max_steps=2, save_every=1))
    assert not (tmp_path / "nan" / "final").exists()
    assert not list((tmp_path / "nan").glob("checkpoint-*"))


def test_config_validation_and_4bit_without_bitsandbytes(small_cache, tmp_path, monkeypatch):
    import sys

    with pytest.raises(ConfigError, match="unknown loss type 'kto'; expected one of sigmoid"):
        TrainConfig(loss="kto")
    with pytest.raises(ConfigError, match="lora_r > 0"):
        TrainConfig(load_in_4bit=True)
    with monkeypatch.context() as patch:  # 4-bit runs on the CPU too (tests/stages/test_quant.py), given bitsandbytes
        patch.setitem(sys.modules, "bitsandbytes", None)
        with pytest.raises(UserError, match=r"needs bitsandbytes >= 0\.50\.2"):
            run(_cfg(small_cache, tmp_path / "q", lora_r=4, load_in_4bit=True, max_steps=1,
                     allow_numerics_mismatch=True))
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        if not torch.cuda.is_available():
            run(_cfg(small_cache, tmp_path / "h", mixed_precision="fp16", max_steps=1, allow_numerics_mismatch=True))
        else:
            raise UserError("fp16 needs CUDA")  # nothing to check on a CUDA machine


def test_cli_json_and_existing_run_needs_resume(small_cache, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    runner = CliRunner()
    args = ["train", str(small_cache), "--out", str(tmp_path / "r"), "--max-steps", "2", "--batch-size", "2",
            "--device", "cpu", "--save-every", "1", "--no-progress", "--json", "--mixed-precision", "bf16",
            "--allow-numerics-mismatch", "--gap-threshold", "0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["steps"] == 2 and Path(data["final_model"]).is_dir()
    # where the seconds went: a fresh run from the cache's model checks it on step 1's pairs before step 1
    phases = data["phase_seconds"]
    assert set(phases) == {"setup", "start_check", "train", "save"} and min(phases.values()) > 0, phases
    assert sum(phases.values()) == pytest.approx(data["seconds"], abs=0.05), (phases, data["seconds"])
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "pass --resume" in res.output
    res = runner.invoke(app, [*args, "--resume"])  # a resume has no start check: the checkpoint is the policy
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["phase_seconds"]["start_check"] == 0.0


def test_adapter_folder_loads_through_load_model_and_generates(train_cache, tmp_path):
    """An adapter folder is a model name like any other: load_model, eval and generate accept it."""
    from pipeline.sampling.completion import complete

    run(_cfg(train_cache, tmp_path / "lora", max_steps=2, batch_size=4, lora_r=4, learning_rate=1e-2))
    model, tok = load_model(str(tmp_path / "lora" / "final"))
    assert type(model).__name__ == "PeftModel"
    out = complete(model, tok, ["What is 2 + 3?"], gen_length=8, block_length=8, steps=4)
    assert len(out) == 1 and isinstance(out[0]["completion"], str)


def test_adapter_folder_has_an_identity_that_covers_its_base(train_cache, tmp_path):
    from pipeline.models import model_identity

    run(_cfg(train_cache, tmp_path / "lora", max_steps=1, batch_size=2, lora_r=4))
    ident = model_identity(str(tmp_path / "lora" / "final"))
    assert ident["kind"] == "lora" and ident["base"] == model_identity("micro") and ident["weights"]
