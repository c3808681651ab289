"""load (the one loader) and load_model (its name resolution): refusals, tokenizer completion, cache identities."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.errors import UserError
from pipeline.models import build_preset, load, load_model, model_identity, preset_tokenizer, tokenizer_identity
from pipeline.models.init import init_model
from pipeline.models.numerics import Numerics
from pipeline.models.presets import is_preset


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "micro"
    init_model("micro", folder)
    return folder


@pytest.mark.parametrize("name", ["GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B", "bert-base-uncased"])
def test_hub_ids_fail_with_offline_message(name):
    with pytest.raises(UserError, match="not found locally and hub downloads are not available offline"):
        load_model(name)


def test_missing_and_non_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_model(f)
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)


def test_load_gives_the_model_in_the_numerics_asked(micro_dir):
    """load: a folder or a preset in the numerics' weights dtype, eval mode, its tokenizer; the same weights as
    load_model in that dtype."""
    for name in (micro_dir, "micro"):
        model, tok = load(name, Numerics(dtype="bfloat16", mixed_precision="bf16"), "cpu")
        assert not model.training and next(model.parameters()).dtype == torch.bfloat16
        assert tok.mask_token_id == model.config.mask_token_id
        same, _ = load_model(name, dtype="bfloat16")
        for (key, a), b in zip(model.state_dict().items(), same.state_dict().values()):
            assert torch.equal(a, b), key
    default, _ = load("micro")
    assert next(default.parameters()).dtype == torch.float32


def test_load_seeds_a_preset_and_not_a_folder(micro_dir):
    """seed: a preset's initialisation (sft from scratch), None its own; a folder's weights are what it holds."""
    seeded, _ = load("micro", seed=4)
    other, _ = load("micro", seed=5)
    own, _ = load("micro")
    key = "model.transformer.blocks.0.q_proj.weight"
    assert torch.equal(seeded.state_dict()[key], build_preset("micro", seed=4).state_dict()[key])
    assert not torch.equal(seeded.state_dict()[key], other.state_dict()[key])
    assert torch.equal(own.state_dict()[key], build_preset("micro").state_dict()[key])
    folder, _ = load(micro_dir, seed=4)
    assert torch.equal(folder.state_dict()[key], own.state_dict()[key])  # init-model wrote the preset's own


def test_a_folder_named_like_a_preset_is_not_the_preset(tmp_path, monkeypatch):
    assert is_preset("micro") and not is_preset("nope")
    (tmp_path / "micro").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not is_preset("micro")
    with pytest.raises(UserError, match="shadows the preset"):
        load("micro")


def test_preset_names_load_in_memory():
    model, tok = load_model("micro", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.mask_token_id == tok.mask_token_id
    assert tok.chat_template and tok.pad_token and tok.eos_token
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("micro", dtype="int3")


def test_pickled_weights_refused(tmp_path, micro_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((micro_dir / name).read_bytes())
    torch.save(load_file(str(micro_dir / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin.*refused"):
        load_model(folder)


def test_missing_tokenizer_is_a_user_error(tmp_path, micro_dir):
    folder = tmp_path / "notok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((micro_dir / name).read_bytes())
    with pytest.raises(UserError, match="no tokenizer files"):
        load_model(folder)


def test_mask_token_mismatch_is_reported(tmp_path, micro_dir):
    folder = tmp_path / "mismatch"
    folder.mkdir()
    for p in micro_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mask_token_id"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="mask"):
        load_model(folder)


def test_model_identity_tracks_weights_and_config(tmp_path, micro_dir):
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in micro_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    base = model_identity(micro_dir)
    assert model_identity(folder) == base  # content, not location
    assert set(base["weights"]) == {"model.safetensors"}
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.transformer.ln_f.weight"] = weights["model.transformer.ln_f.weight"] * 1.001
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    changed = model_identity(folder)
    assert changed["weights"] != base["weights"] and changed["config_sha256"] == base["config_sha256"]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(cfg))
    assert model_identity(folder)["config_sha256"] != base["config_sha256"]
    with pytest.raises(UserError):
        model_identity(tmp_path / "absent")


def test_model_identity_of_modules():
    a = build_preset("micro")
    b = build_preset("micro")
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():
        b.model.transformer.ln_f.weight[0] += 1e-3
    assert model_identity(a)["weights"] != model_identity(b)["weights"]


def test_tokenizer_identity_tracks_vocab_specials_and_template(tmp_path):
    tok = preset_tokenizer("tiny")
    base = tokenizer_identity(tok)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path)) == base  # survives a save/load
    other = preset_tokenizer("tiny")
    other.chat_template = other.chat_template.replace("assistant", "model")
    assert tokenizer_identity(other) != base
    other = preset_tokenizer("tiny")
    other.add_tokens(["<|extra|>"])
    assert tokenizer_identity(other) != base
    other = preset_tokenizer("tiny")
    other.pad_token = "<|eot_id|>"
    assert tokenizer_identity(other) != base
    truncating = preset_tokenizer("tiny")
    truncating.backend_tokenizer.enable_truncation(8)
    assert tokenizer_identity(truncating) == base  # runtime settings are not identity


def test_loaded_folder_runs_on_requested_dtype(micro_dir):
    model, tok = load_model(micro_dir, dtype="bfloat16")
    ids = torch.tensor([tok.encode("hello 123")])
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert out.dtype == torch.bfloat16 and out.shape == (1, ids.shape[1], model.config.embedding_size)


def test_4bit_without_bitsandbytes_is_one_line(micro_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed (tests/pipeline/models/test_quant.py
    for name in ("micro", micro_dir):                          # loads both in 4-bit with it)
        with pytest.raises(UserError, match=r"needs bitsandbytes >= 0\.50\.2: pip install 'lldm-dpo\[quant\]'"):
            load_model(name, load_in_4bit=True, device="cpu")


def test_a_folder_named_like_a_preset_is_named_as_shadowing_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "micro").mkdir()  # a scratch folder of a preset's name, without config.json
    with pytest.raises(UserError, match=r"model 'micro': the folder .*micro \(no config.json\) shadows the preset"):
        model_identity("micro")
    with pytest.raises(UserError, match=r"micro: no config.json \(not a model folder\); it shadows the preset 'micro'"):
        load_model("micro")
    with pytest.raises(UserError, match=r"model 'other': not a preset and no config.json there"):
        (tmp_path / "other").mkdir()
        model_identity("other")
