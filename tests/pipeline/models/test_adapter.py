"""The transformers adapter on a tiny locally built BertForMaskedLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM

from pipeline.core.errors import UserError
from pipeline.models import load_model, score_tokens
from pipeline.models.tokenizer import build_tokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=1,
    )
    BertForMaskedLM(config).eval().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_loads_as_adapter_with_tokenizer_mask(bert_dir):
    model, tokenizer = load_model(bert_dir)
    assert type(model).__name__ == "BertForMaskedLM"
    assert model.config.mask_token_id == tokenizer.mask_token_id == 2
    assert model.logits_shift is False
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    direct = BertForMaskedLM.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(out, direct(input_ids=ids, attention_mask=mask).logits)
        # final_hidden is the LM head's input: head(final_hidden) reproduces the logits
        hidden = model.final_hidden(ids, mask)
        torch.testing.assert_close(model.get_output_embeddings()(hidden), out, atol=1e-6, rtol=1e-5)
    assert hidden.shape == (2, 10, 32)


def test_score_tokens_unshifted_and_shifted(bert_dir):
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    index = torch.tensor([[0, 1], [0, 6], [1, 3], [1, 9]])
    targets = torch.tensor([5, 6, 7, 8])
    model, _ = load_model(bert_dir)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
        plain = score_tokens(model, ids, mask, index, targets)
    torch.testing.assert_close(plain, logp[index[:, 0], index[:, 1], targets])

    shifted, _ = load_model(bert_dir, logits_shift=True)
    assert shifted.logits_shift is True
    with torch.no_grad():
        got = score_tokens(shifted, ids, mask, index, targets)
    # position p is predicted by the output at p - 1
    torch.testing.assert_close(got, logp[index[:, 0], index[:, 1] - 1, targets])
    assert not torch.allclose(got, plain)
    with pytest.raises(ValueError, match="position 0"):
        score_tokens(shifted, ids, mask, torch.tensor([[0, 0]]), torch.tensor([5]))


def test_flags_persist_through_save(bert_dir, tmp_path):
    model, tokenizer = load_model(bert_dir, logits_shift=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["logits_shift"] is True and config["mask_token_id"] == 2
    again, _ = load_model(tmp_path)
    assert again.logits_shift is True


def test_dream_model_type_defaults_to_shift():
    from pipeline.models.adapter import adapt

    def config():
        return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16)

    model = BertForMaskedLM(config())
    model.config.model_type = "dream"  # instance attribute: what a Dream config.json would say
    assert adapt(model, mask_token_id=3, logits_shift=None).logits_shift is True
    model2 = BertForMaskedLM(config())
    with pytest.raises(UserError, match="mask_token_id"):
        adapt(model2, mask_token_id=None, logits_shift=None)


def test_custom_code_needs_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mystery_diffusion",
        "architectures": ["MysteryModel"],
        "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig", "AutoModel": "modeling_mystery.MysteryModel"},
    }))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="trust-remote-code"):
        load_model(tmp_path)


def test_gradients_flow_through_adapter(bert_dir):
    model, _ = load_model(bert_dir)
    model.train()
    ids = torch.randint(3, VOCAB, (1, 8))
    value = score_tokens(model, ids, None, torch.tensor([[0, 2]]), torch.tensor([9]))
    value.sum().backward()
    assert model.bert.embeddings.word_embeddings.weight.grad is not None


def test_explicit_mask_id_wins(bert_dir):
    model, tokenizer = load_model(bert_dir, mask_token_id=5)
    assert model.config.mask_token_id == tokenizer.mask_token_id == 5
