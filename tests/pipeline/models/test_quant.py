"""The 4-bit NF4 base on the CPU: bitsandbytes' Linear4bit in the native LLaDA model, its bytes against the
plan's, one computation path, dequantization, and the one-line errors of a missing or old bitsandbytes."""

from __future__ import annotations

import sys

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.models import load_model
from pipeline.models.init import init_model
from pipeline.models.quant import bitsandbytes_problem, require_bitsandbytes

needs_bnb = pytest.mark.skipif(bitsandbytes_problem() is not None, reason=str(bitsandbytes_problem()))


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "micro"
    init_model("micro", folder)
    return folder


def test_missing_or_old_bitsandbytes_is_one_line_naming_the_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^--load-in-4bit needs bitsandbytes >= 0\.50\.2: pip install "
                                        r"'lldm-dpo\[quant\]'$"):
        require_bitsandbytes("cpu")
    old = type(sys)("bitsandbytes")
    old.__version__ = "0.45.5"
    monkeypatch.setitem(sys.modules, "bitsandbytes", old)
    with pytest.raises(UserError, match=r"needs bitsandbytes >= 0\.50\.2 \(its CPU NF4 kernels\), found 0\.45\.5"):
        require_bitsandbytes("cpu")
    with pytest.raises(UserError, match="runs on the CPU or CUDA"):
        require_bitsandbytes("meta")
    message = str(pytest.raises(UserError, require_bitsandbytes, "cpu").value)
    assert "\n" not in message


@needs_bnb
def test_preset_and_folder_load_the_same_nf4_blocks_on_cpu(micro_dir):
    import bitsandbytes as bnb

    from pipeline.models.quant import weight_bytes

    folder, _ = load_model(micro_dir, dtype="bfloat16", device="cpu", load_in_4bit=True)
    preset, _ = load_model("micro", dtype="bfloat16", device="cpu", load_in_4bit=True)
    for model in (folder, preset):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert len(layers) == 7 * model.config.n_layers  # every block projection, never the head
        assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
        state = next(iter(layers.values())).weight.quant_state
        assert state.quant_type == "nf4" and state.nested and state.blocksize == 64
        assert state.dtype == torch.bfloat16 and next(iter(layers.values())).compute_dtype == torch.bfloat16
    assert weight_bytes(folder) == weight_bytes(preset)
    for (name, a), (_, b) in zip(folder.named_modules(), preset.named_modules()):
        if isinstance(a, bnb.nn.Linear4bit):
            assert torch.equal(a.weight.data, b.weight.data), name  # the same weights quantize to the same codes


@needs_bnb
def test_eval_passes_stay_on_the_training_path(micro_dir):
    """bitsandbytes would re-pack an eval-mode weight on an AVX512-BF16 CPU (another layout, another kernel):
    turned off, a no-grad eval pass and a training-mode pass give the same logits and keep the same bytes."""
    from pipeline.models.quant import weight_bytes

    model, _ = load_model(micro_dir, dtype="bfloat16", device="cpu", load_in_4bit=True)
    before = weight_bytes(model)
    ids = torch.randint(10, 500, (2, 12))
    with torch.no_grad():
        evaluated = model.eval()(ids).logits
    trained = model.train()(ids).logits.detach()
    assert torch.equal(evaluated, trained)
    assert weight_bytes(model) == before


@needs_bnb
def test_loaded_bytes_equal_the_plans_weights():
    """The plan's NF4 term (packed codes + double-quantized absmax constants) against the bytes bitsandbytes
    holds, for the reference as score-ref loads it (a 4-bit base prepared as train prepares it)."""
    from pipeline.models import load
    from pipeline.models.numerics import Numerics
    from pipeline.models.quant import weight_bytes
    from pipeline.plan import Shape, make_plan
    from pipeline.plan.memory import GIB
    from stages.score_ref import ScoreRefConfig

    for preset in ("micro", "tiny"):
        model, _ = load(preset, Numerics("bfloat16", "no", True), "cpu")
        cfg = ScoreRefConfig(model=preset, samples=2, batch_tokens=256, max_length=64, load_in_4bit=True)
        plan = make_plan("score-ref", cfg, Shape(2, 64, 16), 16 * GIB, "16 GiB")
        assert plan.components["weights"] == weight_bytes(model), preset
        unquantized, _ = load(preset, Numerics("bfloat16", "no", False), "cpu")
        assert weight_bytes(model) < 0.5 * weight_bytes(unquantized) or preset == "micro"


@needs_bnb
def test_dequantize_linears_gives_plain_linears_with_the_dequantized_weights(micro_dir):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from pipeline.models.quant import dequantize_linears

    model, _ = load_model(micro_dir, dtype="bfloat16", device="cpu", load_in_4bit=True)
    layer = model.model.transformer.blocks[0].q_proj
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    ids = torch.randint(10, 500, (1, 9))
    with torch.no_grad():
        quantized = model(ids).logits.float()
    assert dequantize_linears(model, torch.bfloat16) == 7 * model.config.n_layers
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert torch.equal(model.model.transformer.blocks[0].q_proj.weight.float(), expected)
    with torch.no_grad():
        dequantized = model(ids).logits.float()
    assert torch.allclose(dequantized, quantized, atol=2e-2)
