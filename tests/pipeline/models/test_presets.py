"""Presets, the built-in tokenizer and `lldm-dpo init-model`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.atomic import LEDGER
from pipeline.core.errors import UserError
from pipeline.models import PRESETS, build_preset, load_model, model_identity, preset_tokenizer, tokenizer_identity
from pipeline.models.init import init_model
from pipeline.models.presets import preset_config

LLADA_8B_PARAMETERS = 8_015_581_184


def test_tiny_is_a_few_million_and_deterministic():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_preset("tiny")
    after = torch.rand(1)
    assert torch.equal(before, after)  # the global RNG is not consumed
    b = build_preset("tiny")
    n = sum(p.numel() for p in a.parameters())
    assert 1_000_000 < n < 10_000_000
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert not a.training
    tok = preset_tokenizer("tiny")
    assert a.config.mask_token_id == tok.mask_token_id
    assert a.config.eos_token_id == tok.eos_token_id and a.config.pad_token_id == tok.pad_token_id
    assert len(tok) <= a.config.embedding_size


def test_llada_8b_shape_on_meta_has_exact_count_and_no_memory():
    import resource

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = build_preset("llada-8b-shape", device="meta", dtype="bfloat16")
    # 16 GB of bf16 weights would move the process's peak; a meta build must not.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == LLADA_8B_PARAMETERS
    assert all(p.device.type == "meta" for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    cfg = model.config
    expected = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                    vocab_size=126464, embedding_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5,
                    max_sequence_length=4096, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                    weight_tying=False)
    assert {k: getattr(cfg, k) for k in expected} == expected
    tok = preset_tokenizer("llada-8b-shape")
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (126336, 126081, 126081, 126080)
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 126348


def test_tokenizer_encodes_any_text_and_has_chat_template():
    tok = preset_tokenizer("tiny")
    text = "Line one\nLine 2: 12345 + 67890 = 80235\ttab ünïcödé 漢字 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids or tok.unk_token_id is None
    assert tok.mask_token == "<|mdm_mask|>" and tok.eos_token == "<|endoftext|>" == tok.pad_token
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # No BOS/EOS added by plain encoding (LLaDA: add_bos_token / add_eos_token false)
    assert tok.encode("hi")[0] != tok.bos_token_id and tok.encode("hi")[-1] != tok.eos_token_id


def test_identities_are_stable_and_distinct():
    assert tokenizer_identity(preset_tokenizer("tiny")) == tokenizer_identity(preset_tokenizer("micro"))
    assert tokenizer_identity(preset_tokenizer("tiny")) != tokenizer_identity(preset_tokenizer("llada-8b-shape"))
    assert model_identity("tiny") == model_identity("tiny")
    assert model_identity("tiny") != model_identity("micro")
    assert set(PRESETS) >= {"tiny", "llada-8b-shape"}


def test_unknown_preset_and_meta_write(tmp_path):
    with pytest.raises(UserError, match="unknown preset"):
        build_preset("huge")
    with pytest.raises(UserError, match="meta"):
        init_model("micro", tmp_path / "m", device="meta")


def test_init_model_writes_what_load_model_reads(tmp_path):
    target = tmp_path / "tiny"
    summary = init_model("tiny", target)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(summary["files"])
    # no temp leftovers; the ownership record says the folder is lldm-dpo's (a rerun may replace it)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [LEDGER]
    assert "tiny" in (tmp_path / LEDGER).read_text()
    model, tok = load_model(target)
    ref, ref_tok = load_model("tiny")
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tokenizer_identity(tok) == tokenizer_identity(ref_tok)
    assert tok.chat_template == ref_tok.chat_template
    with pytest.raises(UserError, match="already exists"):
        init_model("tiny", target)


def test_init_model_sharded_through_cli(tmp_path):
    from stages.cli import app

    target = tmp_path / "sharded"
    result = CliRunner().invoke(app, ["init-model", "tiny", str(target), "--max-shard-size", "4MB", "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((target / s).is_file() for s in shards)
    assert "model.transformer.blocks.3.ff_out.weight" in index["weight_map"]
    model, tok = load_model(target)
    assert tok.mask_token_id == model.config.mask_token_id
    ids = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, build_preset("tiny")(ids).logits)
    # bf16 on disk, overwrite in place
    result = CliRunner().invoke(app, ["init-model", "micro", str(target), "--dtype", "bfloat16", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (target / "model.safetensors.index.json").exists()
    assert json.loads((target / "config.json").read_text())["d_model"] == 64
    again, _ = load_model(target, dtype="bfloat16")
    assert next(again.parameters()).dtype == torch.bfloat16
    bad = CliRunner().invoke(app, ["init-model", "nope", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown preset" in bad.output


def test_preset_config_matches_tokenizer_for_every_preset():
    for name in PRESETS:
        cfg = preset_config(name)
        tok = preset_tokenizer(name)
        assert cfg.mask_token_id == tok.mask_token_id, name
        assert max(tok.get_vocab().values()) < cfg.embedding_size, name
