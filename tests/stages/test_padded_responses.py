"""The padded-response contract (issue 31, item 2): responses scored and trained in the shape the model samples,
EOS-padded to the generation length as LLaDA's SFT (and ``lldm-dpo sft --pad-response-to``) pads them.

- the rendering, by hand-worked token ids;
- a model SFT-trained with padded responses has, on the same masks and timesteps, the same per-token terms in
  score-ref (with ``pad_to``) as in sft's objective, and train's NLL term is sft's objective on that sequence;
- ``pad_to`` is in the cache's fingerprint: score-ref refuses a cache made with another, and so does train."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.core.errors import ConfigError, UserError
from pipeline.data.tokenize import pad_response, tokenize_pair
from pipeline.estimator.diffusion import sample_masks
from pipeline.refcache.reader import open_cache

PAD_TO = 24


class CharTokenizer:
    """One token per character (its code point), EOS = 0: token ids that can be worked out by hand."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_padded_rendering_by_hand_worked_ids():
    tok = CharTokenizer()
    row = {"pair_id": "p", "prompt": "ab", "chosen": "c", "rejected": "dde"}
    plain = tokenize_pair(tok, row, max_length=16, use_chat_template=False)
    assert (plain.prompt_ids, plain.chosen_ids, plain.rejected_ids) == ([97, 98], [99, 0], [100, 100, 101, 0])
    padded = tokenize_pair(tok, row, max_length=16, use_chat_template=False, pad_to=5)
    assert padded.prompt_ids == [97, 98] and not padded.truncated
    assert padded.chosen_ids == [99, 0, 0, 0, 0]  # its own EOS, then three of padding
    assert padded.rejected_ids == [100, 100, 101, 0, 0]
    # A response already as long as pad_to (or longer) is left as it is.
    long_row = dict(row, chosen="wxyz", rejected="vwxyz")
    long_ = tokenize_pair(tok, long_row, max_length=16, use_chat_template=False, pad_to=5)
    assert long_.chosen_ids == [119, 120, 121, 122, 0] and long_.rejected_ids == [118, 119, 120, 121, 122, 0]
    # Padding comes before truncation: prompt tokens are dropped from the left to make room for it.
    cut = tokenize_pair(tok, dict(row, prompt="abc"), max_length=6, use_chat_template=False, pad_to=5)
    assert cut.prompt_ids == [99] and cut.chosen_ids == [99, 0, 0, 0, 0] and cut.truncated
    assert pad_response([5, 0], 0, 0) == [5, 0] and pad_response([5, 0], 3, 0) == [5, 0, 0]


def test_pad_to_longer_than_max_length_is_refused():
    from stages.score_ref import ScoreRefConfig

    with pytest.raises(ConfigError, match=r"pad_to \(40\) exceeds max_length \(32\)"):
        ScoreRefConfig(pad_to=40, max_length=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro model SFT-trained on EOS-padded responses, the SFT data, and pairs whose chosen side is that data."""
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest
    from stages.sft import SFTConfig
    from stages.sft import run as sft

    tmp = tmp_path_factory.mktemp("padded")
    records = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}\n#### {a + b}"}
               for a, b in [(3, 4), (12, 9), (7, 7), (20, 5), (1, 16), (8, 30)]]
    data = tmp / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = sft(SFTConfig(data=data, out=tmp / "sft", model="micro", max_steps=6, batch_size=3, learning_rate=3e-3,
                           pad_response_to=PAD_TO, max_length=96, device="cpu", progress=False, tensorboard=False,
                           report_to="none"))
    pairs_src = tmp / "pairs.jsonl"
    pairs_src.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                             "rejected": r["completion"].replace("####", "####1")}) + "\n"
                                 for r in records))
    pairs = tmp / "pairs.arrow"
    ingest(IngestConfig(inputs=[str(pairs_src)], out=str(pairs), eval_fraction=0.0, progress=False))
    return {"model": result.final_model, "data": data, "pairs": pairs, "tmp": tmp}


def _score(trained, out, **kw):
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref

    base = dict(pairs=trained["pairs"], model=trained["model"], out=out, samples=4, draws=2, max_length=96,
                pad_to=PAD_TO, device="cpu", progress=False)
    return score_ref(ScoreRefConfig(**{**base, **kw}))


@pytest.mark.parametrize("scheme", ["one_over_t", "l_over_L"])
def test_an_sft_trained_model_has_the_same_elbo_in_score_ref_as_in_sft(trained, tmp_path, scheme):
    from pipeline.data.prompts import resolve_chat_template
    from pipeline.data.sftdata import load_examples
    from pipeline.estimator.losses import sft_loss as nll_term
    from pipeline.estimator.sft_objective import collate, sft_loss
    from pipeline.models import load_model

    _score(trained, tmp_path / "cache", scheme=scheme)
    cache = open_cache(tmp_path / "cache")
    assert cache.fingerprint["pad_to"] == PAD_TO
    model, tok = load_model(trained["model"])
    model.eval()
    chat = resolve_chat_template(tok, None)
    examples = load_examples(trained["data"], tok, max_length=96, chat_template=chat, pad_to=PAD_TO)
    by_prompt = {tuple(ex.prompt_ids): ex for ex in examples}
    rows = cache.table().to_pylist()
    assert len(rows) == len(examples)
    eos = tok.eos_token_id
    for row in rows:
        ex = by_prompt[tuple(row["prompt_ids"])]
        # The same sequence as sft trained on: the response EOS-padded to PAD_TO, the padding part of it.
        assert row["chosen_ids"] == ex.response_ids and row["chosen_len"] == PAD_TO
        assert row["chosen_ids"][-1] == eos and row["chosen_ids"][-2] == eos
        length = row["chosen_len"]
        batch = collate([(row["prompt_ids"], row["chosen_ids"])], tok.pad_token_id)
        plen = len(row["prompt_ids"])
        sft_values = []
        for draw in range(2):
            ms = sample_masks(length, 4, row["chosen_seeds"][draw], scheme=scheme)
            for k in range(4):
                if not bool(ms.masks[k].any()):  # an empty mask: both are exactly 0
                    assert row["ref_chosen_terms"][draw][k] == 0.0
                    sft_values.append(0.0)
                    continue
                mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
                mask[0, plen:plen + length] = ms.masks[k]
                t = 1.0 / ms.weights[k : k + 1]  # t of one_over_t; l/L of l_over_L
                with torch.no_grad():
                    (loss,) = sft_loss(model, batch, t, mask, tok.mask_token_id).tolist()
                # score-ref's term of this mask, per token, is minus sft's loss of the same mask and timestep.
                assert -row["ref_chosen_terms"][draw][k] / length == pytest.approx(loss, rel=1e-5, abs=1e-7)
                sft_values.append(loss)
        # Train's NLL term on the cached ELBO is sft's objective averaged over the same masks.
        nll = float(nll_term(torch.tensor(row["ref_chosen_elbo"], dtype=torch.float64), row["chosen_len"]))
        assert nll == pytest.approx(sum(sft_values) / len(sft_values), rel=1e-5)
    # Padding positions are scored: some mask covers the padding of the first row.
    first = rows[0]
    ms = sample_masks(first["chosen_len"], 4, first["chosen_seeds"][0], scheme=scheme)
    assert bool(ms.masks[:, -3:].any())


def test_a_cache_with_another_pad_to_is_refused_by_score_ref_and_train(trained, tmp_path):
    from stages.train import TrainConfig
    from stages.train import run as train

    _score(trained, tmp_path / "cache", samples=2, draws=1)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "cache", copy)
    with pytest.raises(UserError, match=rf"different settings \(pad_to: cache has {PAD_TO}, this run has 0"):
        _score(trained, copy, samples=2, draws=1, pad_to=0)
    fast = dict(model=trained["model"], max_steps=1, batch_size=2, learning_rate=1e-3, device="cpu", progress=False,
                tensorboard=False)
    with pytest.raises(UserError, match=rf"pad_to 16 differs from the cache's {PAD_TO}"):
        train(TrainConfig(scores=tmp_path / "cache", out=tmp_path / "r1", pad_to=16, **fast))
    result = train(TrainConfig(scores=tmp_path / "cache", out=tmp_path / "r2", pad_to=PAD_TO, **fast))
    assert result.steps == 1
