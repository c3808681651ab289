"""pipeline.plan: fake-tensor plans against the same steps run for real, the NF4 term, extrapolation, FSDP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import ConfigError, UserError
from pipeline.plan import Shape, check_start, largest, make_plan, nf4_bytes, parse_memory
from pipeline.plan.estimate import _affine, trace
from pipeline.plan.memory import GIB
from pipeline.plan.trace import build_model, materialize, new_fake_mode, quantize_standins

REPO = Path(__file__).resolve().parents[3]


def _train_cfg(**kw):
    from stages.train import TrainConfig

    base = dict(model="micro", batch_size=2, tensorboard=False, progress=False, batch_tokens=512)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(lora_r=4, gradient_checkpointing=True, sequence_microbatch=4, batch_size=1)])
def test_fake_train_step_agrees_with_the_real_step(kw):
    cfg, shape = _train_cfg(**kw), Shape(samples=3, max_length=40, prompt_length=12)
    fake, real = trace("train", cfg, shape, fake=True), trace("train", cfg, shape, fake=False)
    assert real.peak["total"] > 0 and real.peak["opt"] > 0
    assert fake.peak["total"] == pytest.approx(real.peak["total"], rel=0.05)
    assert fake.peak["act"] + fake.peak["temp"] == pytest.approx(real.peak["act"] + real.peak["temp"], rel=0.05)


def test_fake_score_ref_batch_agrees_with_the_real_batch():
    from stages.score_ref import ScoreRefConfig

    cfg, shape = ScoreRefConfig(model="micro", samples=4, batch_tokens=600), Shape(4, 64, 16)
    fake, real = trace("score-ref", cfg, shape, fake=True), trace("score-ref", cfg, shape, fake=False)
    assert fake.peak["total"] == pytest.approx(real.peak["total"], rel=0.05)
    assert fake.peak["param"] == real.peak["param"] == sum(p.numel() * 4 for p in build_model("micro", "float32",
                                                                                            fake=True).parameters())


def bnb_packing_bytes(n: int) -> int:
    """bitsandbytes.functional.quantize_4bit with compress_statistics=True, written out from its source:
    out = zeros(((n + 1) // 2, 1), uint8); absmax = zeros(ceil(n / 64), float32), then double quantization:
    offset = absmax.mean() (float32), quantize_blockwise(absmax - offset, blocksize=256) -> uint8 codes of
    the absmaxes, float32 absmax per 256 of them, its 256-entry float32 dynamic code; NF4 code: 16 float32."""
    blocks = -(n // -64)
    nested = -(blocks // -256)
    return (n + 1) // 2 + blocks * 1 + nested * 4 + 4 + 256 * 4 + 16 * 4


@pytest.mark.parametrize("n", [1, 63, 64, 65, 4096 * 4096, 4096 * 12288, 7 * 64 * 256 + 3])
def test_nf4_term_is_the_bitsandbytes_packing_formula(n):
    assert nf4_bytes(n) == bnb_packing_bytes(n)
    assert nf4_bytes(n, double_quant=False) == (n + 1) // 2 + 4 * math.ceil(n / 64) + 64


def test_nf4_standins_hold_exactly_the_packed_bytes():
    model = build_model("micro", "bfloat16", fake=True)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".blocks." in n}
    assert quantize_standins(model, torch.bfloat16) == len(shapes) > 0
    materialize(model, new_fake_mode())
    for name, (i, o) in shapes.items():
        layer = model.get_submodule(name)
        held = layer.weight.numel() * layer.weight.element_size() + layer.quant_state.numel()
        assert held == nf4_bytes(i * o), name
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and head.shape[0] == model.config.padded_vocab_size


@pytest.mark.skipif(__import__("pipeline.models.quant", fromlist=["x"]).bitsandbytes_problem() is not None,
                    reason="bitsandbytes >= 0.50.2 not importable (the real 4-bit step needs it)")
@pytest.mark.parametrize("kw", [dict(), dict(gradient_checkpointing=True, mixed_precision="bf16"),
                                dict(gradient_checkpointing=True, sequence_microbatch=2)],
                         ids=["lora", "checkpointing-bf16-autocast", "checkpointing-seqmb2"])
def test_4bit_plan_against_the_real_bitsandbytes_step(kw):
    """The plan (NF4 stand-ins on fake tensors) against the same QLoRA step run with bitsandbytes' Linear4bit
    on real CPU tensors: its weights exactly, its peak (tracked + the stated slack, no CUDA context) never
    under the real step's allocations and at most 15% over."""
    from pipeline.plan.memory import context_bytes

    cfg = _train_cfg(lora_r=4, load_in_4bit=True, dtype="bfloat16", batch_size=1, **{"mixed_precision": "no", **kw})
    shape = Shape(samples=3, max_length=40, prompt_length=12)
    plan = make_plan("train", cfg, shape, 16 * GIB, "16 GiB")
    real = trace("train", cfg, shape, fake=False)
    assert plan.components["weights"] + plan.components["adapters"] == real.peak["param"] + real.peak["buffer"]
    planned = plan.total - context_bytes()
    assert real.peak["total"] <= planned <= 1.15 * real.peak["total"], (planned, real.peak)


def test_4bit_train_plan_is_smaller_than_bf16_lora():
    kw = dict(lora_r=4, dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing=True)
    shape = Shape(2, 32, 8)
    q = trace("train", _train_cfg(load_in_4bit=True, **kw), shape)
    b = trace("train", _train_cfg(**kw), shape)
    assert q.frozen_bytes < b.frozen_bytes and q.trainable_bytes > 0


@pytest.mark.parametrize("stage", ["train", "score-ref"])
def test_per_block_extrapolation_matches_the_whole_trace(stage):
    from stages.score_ref import ScoreRefConfig

    cfg = (_train_cfg(lora_r=4, gradient_checkpointing=True, batch_size=1) if stage == "train"
           else ScoreRefConfig(model="micro", samples=4, batch_tokens=512))
    shape = Shape(2, 48, 16)
    whole = trace(stage, cfg, shape, layers=4)
    one, two = trace(stage, cfg, shape, layers=1), trace(stage, cfg, shape, layers=2)
    assert _affine(one, two, 2).peak["total"] == pytest.approx(whole.peak["total"], rel=0.01)


def test_fsdp_shards_weights_gradients_and_optimizer_states():
    cfg = _train_cfg(batch_size=1)
    one = make_plan("train", cfg, Shape(2, 32, 8), 80 * GIB, "80 GiB")
    eight = make_plan("train", cfg, Shape(2, 32, 8, world_size=8), 80 * GIB, "80 GiB")
    assert eight.components["optimizer_states"] == -(-one.components["optimizer_states"] // 8)
    assert eight.components["weights"] < one.components["weights"]
    assert eight.tracked_peak < one.tracked_peak
    assert any("FSDP over 8" in n for n in eight.notes)


def test_components_sum_to_the_total_and_fit_is_decided_on_it():
    plan = make_plan("train", _train_cfg(), Shape(2, 32, 8), GIB, "1 GiB")
    assert sum(plan.components.values()) == plan.total and plan.fits and plan.headroom == GIB - plan.total
    assert min(plan.components.values()) >= 0
    tight = make_plan("train", _train_cfg(), Shape(2, 32, 8), plan.total - 1, "tight")
    assert not tight.fits


def test_a_fit_keeps_five_percent_of_the_card_free():
    from pipeline.plan.memory import headroom_bytes

    total = make_plan("train", _train_cfg(), Shape(2, 32, 8), GIB, "").total
    card = math.ceil(total / 0.95) + 1  # total + 5% of this card: just fits
    assert headroom_bytes(card) >= 0.05 * card
    edge = make_plan("train", _train_cfg(), Shape(2, 32, 8), card, "")
    assert edge.fits and edge.reserve == headroom_bytes(card) and edge.headroom >= edge.reserve
    last_mib = make_plan("train", _train_cfg(), Shape(2, 32, 8), total + 2**20, "")
    assert not last_mib.fits and last_mib.headroom == 2**20  # the last MiB is no margin


def test_largest_settings_fit_and_a_larger_one_does_not():
    from stages.score_ref import ScoreRefConfig

    cfg, shape = ScoreRefConfig(model="micro", samples=4, batch_tokens=4096), Shape(4, 64, 16)
    base = make_plan("score-ref", cfg, shape, 64 * GIB, "")
    budget = base.total - base.components["activations"] // 2  # the current batch does not fit
    found = largest("score-ref", cfg, shape, budget, base.total, reserve=0)["batch_tokens"]
    assert found["value"] is not None and found["value"] < 4096 and found["total"] <= budget
    # By default the search leaves 5% of the card free: on a card whose 95% is that budget, it fits in the 95%.
    card = math.ceil(budget / 0.95) + 1
    kept = largest("score-ref", cfg, shape, card, base.total)["batch_tokens"]
    assert kept["value"] is not None and kept["total"] <= card - math.ceil(0.05 * card)


def test_parse_memory_sizes_and_cards():
    assert parse_memory("16GiB")[0] == 16 * GIB
    assert parse_memory("24GB")[0] == 24 * 10**9
    assert parse_memory("rtx4080")[0] == 16 * GIB and parse_memory("H100")[0] == 80 * GIB
    for bad in ("lots", "12", "-3GiB"):
        with pytest.raises(ConfigError):
            parse_memory(bad)


def test_start_check_stops_with_the_largest_settings(monkeypatch):
    from stages.score_ref import ScoreRefConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    headroom = math.ceil(0.05 * 16 * GIB)  # kept free of the card's 16 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**20 + headroom, 16 * GIB))
    cfg = ScoreRefConfig(model="micro", samples=4, batch_tokens=4096, max_length=64)
    with pytest.raises(UserError, match=r"0\.80 GiB is free, of which 0\.80 GiB is kept as headroom .*largest settings that fit.*"
                                        r"--batch-tokens"):
        check_start("score-ref", cfg, Shape(4, 64, 16), "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * GIB, 16 * GIB))
    check_start("score-ref", cfg, Shape(4, 64, 16), "cuda")  # fits: returns
    check_start("score-ref", cfg, Shape(4, 64, 16), "cpu")  # CPU runs are never checked


def test_llada_8b_shape_plans_in_a_minute_without_allocating_the_model():
    """CPU seconds of the planning process (user + system), not wall time: on a shared CI machine other
    processes stretch the wall clock, not the work."""
    import resource

    code = ("import json, resource, sys; sys.argv = ['lldm-dpo', 'plan', 'train', "
            "'--model', 'llada-8b-shape', '--dtype', 'bfloat16', '--mixed-precision', 'bf16', '--lora-r', '16', "
            "'--gradient-checkpointing', '--batch-size', '1', '--samples', '8', '--max-length', '1024', "
            "'--gpu-memory', 'rtx4090', '--no-search', '--json']\n"
            "from stages.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    stats = json.loads(lines[-1])
    plan = json.loads("\n".join(lines[:-1]))
    assert stats["rss"] < 2 * GIB, stats
    assert cpu < 60, (cpu, wall)
    # LLaDA-8B's 8,015,581,184 bf16 parameters: counted (extrapolated per block) without ever being held.
    assert plan["components"]["weights"] == pytest.approx(2 * 8_015_581_184, rel=1e-3)
    assert plan["components"]["adapters"] > 0 and plan["method"].startswith("traced at 1 and 2 blocks")
