"""Fixtures shared by the library's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok():
    """The tiny preset's tokenizer: byte-level BPE, LLaDA-Instruct specials and chat template."""
    from pipeline.models import preset_tokenizer

    return preset_tokenizer("tiny")


@pytest.fixture(scope="session")
def enc():
    """``enc(tokenizer, text)``: token ids of ``text`` with no special tokens added (the tests' own encoding)."""
    return lambda tokenizer, text: tokenizer(text, add_special_tokens=False)["input_ids"]
