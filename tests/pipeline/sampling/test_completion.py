"""Completions in memory: stop tokens, chat templates, per-prompt seeds."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.sampling.completion import complete, prompt_seed


class ForcedModel(torch.nn.Module):
    """Predicts token ``a`` on the first ``keep`` generated positions and EOS after them."""

    def __init__(self, tokenizer, gen_length: int, keep: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"mask_token_id": tokenizer.mask_token_id})()
        self.token_a = tokenizer("a", add_special_tokens=False)["input_ids"][0]
        self.eos, self.vocab = tokenizer.eos_token_id, len(tokenizer)
        self.gen_length, self.keep = gen_length, keep

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        first_gen = input_ids.shape[1] - self.gen_length
        logits[:, first_gen : first_gen + self.keep, self.token_a] = 9.0
        logits[:, first_gen + self.keep :, self.eos] = 9.0
        return logits


def test_completions_are_cut_at_the_stop_token():
    from pipeline.models import load_model

    _, tokenizer = load_model("micro")
    model = ForcedModel(tokenizer, gen_length=8, keep=3)
    results = complete(model, tokenizer, ["hi", "a longer prompt here"], gen_length=8, block_length=4, steps=8)
    for r in results:
        assert (r["completion"], r["completion_tokens"], r["stopped"]) == ("aaa", 3, True)
    full = complete(ForcedModel(tokenizer, 8, 8), tokenizer, ["hi"], gen_length=8, block_length=4, steps=8)
    assert (full[0]["completion"], full[0]["stopped"]) == ("a" * 8, False)


def test_no_chat_template_tokenizer_is_a_clear_error():
    from pipeline.models import load_model

    _, tokenizer = load_model("micro")
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        complete(ForcedModel(tokenizer, 4, 4), tokenizer, ["hi"], gen_length=4, block_length=4, steps=4,
                 chat_template=True)
    # The default follows the tokenizer: no template, raw text.
    default = complete(ForcedModel(tokenizer, 4, 4), tokenizer, ["hi"], gen_length=4, block_length=4, steps=4)
    assert default[0]["completion"] == "aaaa"
    plain = complete(ForcedModel(tokenizer, 4, 4), tokenizer, ["hi"], gen_length=4, block_length=4, steps=4,
                     chat_template=False)
    assert plain[0]["completion"] == "aaaa"


def test_prompt_seed_is_stable_and_distinct():
    assert prompt_seed(0, 1) == prompt_seed(0, 1)
    assert len({prompt_seed(s, i) for s in range(3) for i in range(50)}) == 150
    assert all(0 <= prompt_seed(5, i) < 2**63 for i in range(10))
