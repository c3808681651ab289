"""A tokenizer built in code (no download) with LLaDA-Instruct's special tokens and chat format.

Byte-level BPE: every string, any script, digits and newlines included,
encodes (unknown characters fall back to their UTF-8 bytes) and decodes back
exactly.  The merges are learnt from a small built-in text with the
``tokenizers`` trainer, which is deterministic for a fixed input, so the same
code always yields the same vocabulary (checked by ``tokenizer_identity`` in
the tests).
"""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"

# Order fixes the ids: specials come first (0..5).
SPECIAL_TOKENS = [BOS, EOS, MASK, EOT, START_HEADER, END_HEADER]

# Llama-3 style turns as in LLaDA-8B-Instruct: BOS once, then per message
# "<|start_header_id|>role<|end_header_id|>\n\n" + content.strip() + "<|eot_id|>";
# the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 512

# Training text for the merges: plain English, arithmetic and a little code,
# the kinds of strings the tests and the embedded demo feed in.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model that reads the whole
sequence at once can fill in masked words from both sides of the gap.
Question: what is 12 plus 30? Answer: 12 + 30 = 42. The answer is 42.
Question: how many days are in a week? Answer: There are 7 days in a week.
Preference pairs have a prompt, a chosen response and a rejected response.
The chosen answer is helpful, correct and kind; the rejected one is not.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
User: Please write a short poem about the sea.
Assistant: The sea is wide, the sea is deep, it sings the sailors off to sleep.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 250 1000 2024 3.14 -7 50%
Lists, commas, periods. Colons: semicolons; quotes "like this" and 'that'.
The training loop reads pairs, scores them, and updates the policy weights.
"""


@functools.lru_cache(maxsize=4)
def _backend_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer)
    return tok.to_str()


# Special token ids of LLaDA-8B's tokenizer (shared/reference/llada.md); the
# "llada" layout puts our specials there so a model with LLaDA-8B's exact
# config (mask_token_id 126336, eos/pad 126081) agrees with its tokenizer.
LLADA_SPECIAL_IDS = {BOS: 126080, EOS: 126081, MASK: 126336, START_HEADER: 126346, END_HEADER: 126347, EOT: 126348}
LLADA_VOCAB_SIZE = 126464


@functools.lru_cache(maxsize=2)
def _llada_layout_json(vocab_size: int) -> str:
    """Same merges, ids stretched to LLaDA's: unreachable filler tokens pad the gaps."""
    data = json.loads(_backend_json(vocab_size))
    compact = data["model"]["vocab"]
    ordinary = sorted((tok for tok in compact if tok not in SPECIAL_TOKENS), key=compact.__getitem__)
    first_special = min(LLADA_SPECIAL_IDS.values())
    vocab = {tok: i for i, tok in enumerate(ordinary)}
    # Fillers are never produced: BPE reaches a token only through merges of bytes.
    for i in range(len(vocab), first_special):
        vocab[f"<|reserved_{i}|>"] = i
    data["model"]["vocab"] = vocab
    by_id = {tid: tok for tok, tid in LLADA_SPECIAL_IDS.items()}
    data["added_tokens"] = [{"id": i, "content": by_id.get(i, f"<|reserved_{i}|>"), "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                            for i in range(first_special, LLADA_VOCAB_SIZE)]
    return json.dumps(data)


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, layout: str = "compact") -> PreTrainedTokenizerFast:
    """The built-in tokenizer: byte-level BPE, mask/eos/pad/bos set, LLaDA-Instruct chat template.

    ``layout="compact"``: ``vocab_size`` ids, specials first (0..5).
    ``layout="llada"``: the same tokens with LLaDA-8B's special ids and its
    126,464-entry id space (gaps filled with never-produced reserved tokens).
    No BOS/EOS are added by ``encode``; the chat template writes BOS itself
    (LLaDA's tokenizer: ``add_bos_token`` and ``add_eos_token`` false).
    """
    if layout not in ("compact", "llada"):
        raise ValueError(f"unknown tokenizer layout {layout!r} (compact or llada)")
    backend = Tokenizer.from_str((_backend_json if layout == "compact" else _llada_layout_json)(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        mask_token=MASK,
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [EOT, START_HEADER, END_HEADER]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
