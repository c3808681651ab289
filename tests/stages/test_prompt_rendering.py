"""One renderer: score-ref, generate, eval and multiple choice see the same prompt, plain or conversational,
with and without the chat template."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.prompts import encode_prompt, render_prompt
from pipeline.models import load_model
from pipeline.refcache.reader import open_cache


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory):
    from stages.ingest import IngestConfig, run

    tmp = tmp_path_factory.mktemp("mixed")
    src = tmp / "pairs.jsonl"
    rows = [
        {"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "41"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 5?"}],
         "chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "pairs.arrow"
    run(IngestConfig(inputs=[str(src)], out=str(out), eval_fraction=0.0, progress=False))
    return out


def _captured_generation_prompts(monkeypatch):
    import pipeline.sampling.completion as completion  # the sampler loop generate and eval share

    seen: list[list[int]] = []

    def fake_generate(model, prompts, args, **kw):
        seen.extend([list(p) for p in prompts])
        return torch.full((len(prompts), args.gen_length), 0, dtype=torch.long)

    monkeypatch.setattr(completion, "generate", fake_generate)
    return seen


@pytest.mark.parametrize("chat_template", [True, False])
def test_every_stage_renders_the_same_prompt(mixed_pairs, tmp_path, monkeypatch, chat_template):
    from pipeline.data.pairsfile import read_pairs
    from pipeline.evaluation.choice_scoring import choice_requests
    from pipeline.evaluation.tasks import task_accuracy
    from stages.evaluate import EvalConfig
    from stages.generate import GenerateConfig
    from stages.generate import run as generate_run
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score

    _, tok = load_model("micro")
    pairs = read_pairs(mixed_pairs).to_pylist()
    # What the rule says each row's prompt is: messages through the template, else the text.
    wanted = {}
    for row in pairs:
        prompt = row["prompt_messages"] if (chat_template and row["prompt_messages"]) else row["prompt"]
        wanted[row["pair_id"]] = (prompt, encode_prompt(tok, prompt, chat_template=chat_template))
    assert len({tuple(ids) for _, ids in wanted.values()}) == 2
    if chat_template:  # the plain row became a user turn
        plain = next(r for r in pairs if not r["prompt_messages"])
        assert wanted[plain["pair_id"]][1][0] == tok.bos_token_id

    cache = tmp_path / "cache"
    score(ScoreRefConfig(pairs=mixed_pairs, model="micro", out=cache, samples=1, device="cpu", progress=False,
                         chat_template=chat_template))
    opened = open_cache(cache)
    assert opened.fingerprint["chat_template"] is chat_template
    for row in opened.rows():
        assert row["prompt_ids"] == wanted[row["pair_id"]][1]

    # generate over the same pairs file, following the cache's rule (no explicit setting).
    seen = _captured_generation_prompts(monkeypatch)
    generate_run(GenerateConfig(model="micro", prompts=str(mixed_pairs), out=str(tmp_path / "g.jsonl"),
                                scores=str(cache), gen_length=4, block_length=4, steps=4, device="cpu",
                                progress=False))
    assert sorted(seen) == sorted(ids for _, ids in wanted.values())

    # eval's task accuracy and multiple choice, on the same prompts.
    model, _ = load_model("micro")
    cfg = EvalConfig(scores=None, benchmark=tmp_path / "b.jsonl", gen_length=4, block_length=4, steps=4,
                     device="cpu")
    seen.clear()
    items = [{"question": p, "answer": "1"} for p, _ in wanted.values()]
    task_accuracy(model, tok, items, cfg, "after", chat_template)
    assert sorted(seen) == sorted(ids for _, ids in wanted.values())
    for i, (prompt, _) in enumerate(wanted.values()):
        (request,) = choice_requests(tok, {"question": prompt, "options": ["7"]}, i, samples=1, seed=0,
                                     chat_template=chat_template)
        text = render_prompt(tok, prompt, chat_template=chat_template)
        moved = text[len(text.rstrip()):]  # LLaDA's joint encoding moves trailing whitespace to the option
        assert tok.decode(request.prompt_ids) + moved == text
        assert tok.decode(request.response_ids) == moved + "7"
