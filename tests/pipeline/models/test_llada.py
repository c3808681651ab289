"""Native LLaDA: reference forward, checkpoint layout, padding, checkpointing, LoRA, bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models import LORA_TARGET_MODULES, load_model, score_tokens
from pipeline.models.llada import LLaDAConfig, LLaDAModelLM, apply_rope, rope_tables
from pipeline.models.tokenizer import build_tokenizer

VOCAB = 512


def small_config(**overrides) -> LLaDAConfig:
    kw = dict(
        d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=96, vocab_size=VOCAB,
        embedding_size=VOCAB, mask_token_id=2, eos_token_id=1, pad_token_id=1, max_sequence_length=256,
    )
    kw.update(overrides)
    return LLaDAConfig(**kw)


def random_model(seed=0, **overrides) -> LLaDAModelLM:
    torch.manual_seed(seed)
    model = LLaDAModelLM(small_config(**overrides)).eval()
    # Non-trivial norm weights so a wrong norm placement shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def naive_forward(w: dict, cfg: dict, ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """llada.md's forward written out plainly from a weight dict (float64 for a sharp reference)."""
    w = {k: v.double() for k, v in w.items()}
    d, nh, nkv, eps, theta = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
    hd = d // nh
    b, s = ids.shape

    def rms(x, weight):
        return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    j = torch.arange(hd // 2, dtype=torch.float64)
    inv = theta ** (-2 * j / hd)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)

    def rope(x):  # x [b, h, s, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    x = w["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "q_proj.weight"].T).view(b, s, nh, hd).transpose(1, 2)
        k = (h @ w[p + "k_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
        v = (h @ w[p + "v_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = torch.stack([k[:, hh // (nh // nkv)] for hh in range(nh)], 1)
        v = torch.stack([v[:, hh // (nh // nkv)] for hh in range(nh)], 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        att = torch.softmax(scores, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, s, d) @ w[p + "attn_out.weight"].T
        h = rms(x, w[p + "ff_norm.weight"])
        gate = h @ w[p + "ff_proj.weight"].T
        x = x + ((gate * torch.sigmoid(gate)) * (h @ w[p + "up_proj.weight"].T)) @ w[p + "ff_out.weight"].T
    x = rms(x, w["model.transformer.ln_f.weight"])
    return x @ w["model.transformer.ff_out.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_logits_match_independent_reference(n_kv_heads):
    model = random_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 11:] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    ref = naive_forward(model.state_dict(), model.config.to_dict(), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real].double(), ref[real], atol=2e-5, rtol=1e-5)


def test_padding_invariance():
    model = random_model()
    gen = torch.Generator().manual_seed(3)
    short = torch.randint(3, VOCAB, (1, 9), generator=gen)
    long = torch.randint(3, VOCAB, (1, 20), generator=gen)
    batch = torch.full((2, 20), 1, dtype=torch.long)
    batch[0] = long[0]
    batch[1, :9] = short[0]
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0] = 1
    mask[1, :9] = 1
    with torch.no_grad():
        alone = model(short).logits[0]
        alone_long = model(long).logits[0]
        batched = model(batch, attention_mask=mask).logits
    assert (alone - batched[1, :9]).abs().max() < 1e-5
    assert (alone_long - batched[0]).abs().max() < 1e-5
    # Without the mask the padding leaks into the short row: the mask is doing the work.
    with torch.no_grad():
        unmasked = model(batch).logits
    assert (alone - unmasked[1, :9]).abs().max() > 1e-3


def test_gradient_checkpointing_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    grads = []
    for checkpointing in (False, True):
        model = random_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.model.transformer.blocks)
        logits = model(ids, attention_mask=mask).logits
        loss = torch.log_softmax(logits, -1)[..., 5].sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_runs_and_tracks_fp32():
    model = random_model()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        bf = model.to(torch.bfloat16)(ids).logits
    assert bf.dtype == torch.bfloat16
    assert torch.isfinite(bf).all()
    assert (bf.float() - ref).abs().max() < 0.1
    assert model.final_hidden(ids).dtype == torch.bfloat16


def test_final_hidden_and_head_give_logits():
    model = random_model()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = model.final_hidden(ids)
    assert hidden.shape == (2, 7, 64)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), out.logits)
    torch.testing.assert_close(out.hidden_states, hidden)
    assert model.logits_shift is False
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


def test_parameter_names_are_lladas():
    model = random_model()
    names = set(model.state_dict())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    for i in range(2):
        for part in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
            expected.add(f"model.transformer.blocks.{i}.{part}.weight")
    assert names == expected


def test_save_load_round_trip_identical(tmp_path):
    model = random_model(n_kv_heads=2)
    model.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert config["d_model"] == 64 and config["n_kv_heads"] == 2 and config["weight_tying"] is False
    loaded, tokenizer = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tokenizer.mask_token_id == loaded.config.mask_token_id == 2


def _write_llada_layout(folder, model: LLaDAModelLM, n_shards: int = 2) -> None:
    """A folder as the LLaDA release ships it: its config keys, remote-code auto_map, sharded safetensors."""
    cfg = model.config
    config = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": cfg.d_model,
        "embedding_dropout": 0.0, "embedding_size": cfg.embedding_size, "eos_token_id": cfg.eos_token_id,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": cfg.mask_token_id,
        "max_sequence_length": cfg.max_sequence_length, "mlp_hidden_size": cfg.mlp_hidden_size, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers, "pad_token_id": cfg.pad_token_id, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": cfg.rope_theta, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": cfg.vocab_size, "weight_tying": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for n in range(n_shards):
        fname = f"model-{n + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[n::n_shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    tok = build_tokenizer()
    tok.save_pretrained(folder)
    # LLaDA's tokenizer_config names no mask token and ships no template with Base.
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc.pop("mask_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def test_llada_release_layout_sharded_loads_without_remote_code(tmp_path):
    model = random_model(n_kv_heads=2)
    _write_llada_layout(tmp_path, model, n_shards=3)
    assert not (tmp_path / "modeling_llada.py").exists()  # no remote code to run, and none needed
    loaded, tokenizer = load_model(tmp_path, trust_remote_code=False)
    assert isinstance(loaded, LLaDAModelLM)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = loaded(ids).logits
    ref = naive_forward(model.state_dict(), model.config.to_dict(), ids)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    # mask token filled in from config.json; chat template supplied for the header tokens
    assert tokenizer.mask_token_id == 2 and tokenizer.pad_token_id == 1
    assert tokenizer.chat_template is not None
    # Saving writes the same layout back: same names, same config keys.
    out = tmp_path / "resaved"
    loaded.save_pretrained(out, max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    saved_cfg = json.loads((out / "config.json").read_text())
    original = json.loads((tmp_path / "config.json").read_text())
    for key in set(original) - {"auto_map", "transformers_version"}:
        assert saved_cfg[key] == original[key], key
    # The release's remote-code files are absent here, so auto_map (pointing at them) is dropped.
    assert "auto_map" not in saved_cfg


def test_resave_keeps_remote_code_files_with_auto_map(tmp_path):
    src = tmp_path / "release"
    src.mkdir()
    _write_llada_layout(src, random_model(), n_shards=2)
    for name in ("configuration_llada.py", "modeling_llada.py"):
        (src / name).write_text(f"# stand-in for the published {name}\n")
    loaded, _ = load_model(src)
    out = tmp_path / "out"
    loaded.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert (out / "modeling_llada.py").read_text() == (src / "modeling_llada.py").read_text()
    assert (out / "configuration_llada.py").is_file()


def test_peft_lora_targets_blocks_not_head():
    peft = pytest.importorskip("peft")
    model = random_model()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0)
    )
    wrapped = {name for name, mod in lora.named_modules() if hasattr(mod, "lora_A")}
    for i in range(2):
        for part in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
            assert any(n.endswith(f"transformer.blocks.{i}.{part}") for n in wrapped), part
    assert not any(n.endswith("transformer.ff_out") for n in wrapped)  # the LM head stays plain
    assert len(wrapped) == 14
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The pipeline's attributes reach through the PeftModel wrapper.
    assert lora.logits_shift is False and lora.config.mask_token_id == 2
    assert isinstance(lora.get_output_embeddings(), torch.nn.Linear)
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    assert lora.final_hidden(ids, mask).shape == (2, 8, 64)
    # One optimiser step moves only LoRA weights.
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    lora.train()
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # lora_B starts at zero, so A moves only from the second step
        opt.zero_grad()
        idx = torch.tensor([[0, 1], [1, 3]])
        loss = -score_tokens(lora, ids, mask, idx, torch.tensor([4, 5])).sum()
        loss.backward()
        opt.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_lora_with_gradient_checkpointing_same_gradients():
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lora = peft.get_peft_model(
            random_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
        )
        lora.train()
        if checkpointing:
            lora.gradient_checkpointing_enable()
            assert lora.base_model.model.model.transformer.blocks[0].gradient_checkpointing
        value = score_tokens(lora, ids, mask, torch.tensor([[0, 2], [1, 6]]), torch.tensor([3, 4]))
        value.sum().backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
        assert grads[0][name].abs().sum() > 0, name


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="weight_tying"):
        LLaDAModelLM(small_config(weight_tying=True))
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAModelLM(small_config(n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="residual_dropout"):
        LLaDAModelLM(small_config(residual_dropout=0.1))


def test_fully_padded_row_is_finite():
    model = random_model()
    ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_only_the_silu_activation_is_accepted():
    # LLaDA-8B's llama block: silu(ff_proj(x)) * up_proj(x) with activation_type "silu". "swiglu" in LLaDA's
    # code splits its input in two, another function: refused rather than run as plain SiLU.
    small = dict(d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=64, embedding_size=64)
    LLaDAModelLM(LLaDAConfig(activation_type="silu", **small))
    for name in ("swiglu", "gelu"):
        with pytest.raises(ValueError, match=f"activation_type='{name}' not supported"):
            LLaDAModelLM(LLaDAConfig(activation_type=name, **small))


# --- the approximate KV cache (Fast-dLLM) used by the sampler ---------------------------------


def _padded_batch(gen, length=20, short=13):
    ids = torch.randint(3, VOCAB, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, : length - short] = 1  # left padding, as the sampler lays rows out
    mask[1, : length - short] = 0
    return ids, mask


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cached_keys_and_values_equal_a_full_forward(n_kv_heads):
    model = random_model(n_kv_heads=n_kv_heads)
    ids, mask = _padded_batch(torch.Generator().manual_seed(5))
    seen = {}
    hooks = [getattr(block, name).register_forward_hook(
        lambda _m, _i, out, key=(i, name): seen.__setitem__(key, out))
        for i, block in enumerate(model.model.transformer.blocks) for name in ("k_proj", "v_proj")]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        hidden, kv = model.hidden_with_kv(ids, attention_mask=mask)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, atol=1e-5, rtol=1e-5)
    assert len(kv) == 2
    hd = 64 // 4
    cos, sin = rope_tables(20, hd, model.config.rope_theta, "cpu")
    for i, (k, v) in enumerate(kv):
        assert k.shape == v.shape == (2, n_kv_heads, 20, hd)
        k_ref = apply_rope(seen[(i, "k_proj")].view(2, 20, n_kv_heads, hd).transpose(1, 2), cos, sin)
        v_ref = seen[(i, "v_proj")].view(2, 20, n_kv_heads, hd).transpose(1, 2)
        real = mask.bool()[:, None, :, None].expand_as(k)
        torch.testing.assert_close(k[real], k_ref[real], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v[real], v_ref[real], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [(12, 20), (12, 16), (0, 8)])
def test_window_on_a_fresh_cache_equals_the_full_forward(window):
    # Prefix (window to the end) and dual (window inside) on the sequence the cache was made from: exact.
    model = random_model(n_kv_heads=2)
    ids, mask = _padded_batch(torch.Generator().manual_seed(6))
    lo, hi = window
    with torch.no_grad():
        full, kv = model.hidden_with_kv(ids, attention_mask=mask)
        part, own = model.hidden_with_kv(ids[:, lo:hi], attention_mask=mask, kv_cache=kv, start=lo)
    real = mask.bool()[:, lo:hi]
    torch.testing.assert_close(part[real], full[:, lo:hi][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own[0][0], kv[0][0][:, :, lo:hi], atol=1e-6, rtol=1e-6)


def test_stale_cache_is_exact_for_one_layer_and_approximate_for_two():
    # With one layer the keys and values of the other positions depend on their own tokens only, so
    # changing the window's tokens leaves the cache exact; with two they also see the window: stale.
    gen = torch.Generator().manual_seed(7)
    for layers, exact in ((1, True), (2, False)):
        model = random_model(n_layers=layers)
        ids, mask = _padded_batch(gen)
        changed = ids.clone()
        changed[:, 12:16] = torch.randint(3, VOCAB, (2, 4), generator=gen)
        with torch.no_grad():
            _, kv = model.hidden_with_kv(ids, attention_mask=mask)
            dual, _ = model.hidden_with_kv(changed[:, 12:16], attention_mask=mask, kv_cache=kv, start=12)
            prefix, _ = model.hidden_with_kv(changed[:, 12:], attention_mask=mask, kv_cache=kv, start=12)
            truth = model.final_hidden(changed, attention_mask=mask)
        gap_dual = (dual - truth[:, 12:16]).abs().max().item()
        gap_prefix = (prefix[:, :4] - truth[:, 12:16]).abs().max().item()
        if exact:
            assert gap_dual < 1e-5 and gap_prefix < 1e-5
        else:
            assert gap_dual > 1e-4 and gap_prefix > 1e-4


def test_hidden_with_kv_refuses_bad_windows():
    model = random_model()
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        _, kv = model.hidden_with_kv(ids)
        with pytest.raises(ValueError, match="needs a kv_cache"):
            model.hidden_with_kv(ids[:, 2:], start=2)
        with pytest.raises(ValueError, match="outside the sequence"):
            model.hidden_with_kv(ids[:, 2:], kv_cache=kv, start=4)
        with pytest.raises(ValueError, match="layers"):
            model.hidden_with_kv(ids[:, 2:], kv_cache=kv[:1], start=2)
