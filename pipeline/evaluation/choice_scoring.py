"""Multiple-choice accuracy by ELBO, as LLaDA evaluates it: each option's ELBO given the question (per option
token with normalize=length), the highest wins."""

from __future__ import annotations

from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.data.prompts import encode_continuation, resolve_chat_template
from pipeline.estimator.diffusion import mask_seed, masked_request

NORMALIZE = ("none", "length")
"""How an option's ELBO is scored: as it is (LLaDA's protocol) or per option token."""


def choice_requests(tokenizer, item: dict, index: int, *, samples: int, seed: int, chat_template: bool,
                    where: str = "item") -> list:
    """One ScoreRequest per option, as LLaDA evaluates multiple choice: question and option encoded
    jointly (pipeline.data.prompts.encode_continuation), the option's tokens the masked continuation, no EOS."""
    requests = []
    for j, option in enumerate(item["options"]):
        context, continuation = encode_continuation(tokenizer, item["question"], str(option),
                                                    chat_template=chat_template, where=where)
        if not continuation:
            raise UserError(f"{where}: option {j} encodes to no token")
        requests.append(masked_request(context, continuation, samples,
                                       mask_seed(seed, f"choice-{index}", f"option-{j}", 0))[0])
    return requests


def choice_credits(model, tokenizer, items: list[dict], cfg, chat_template: bool | None = None,
                   seed: int | None = None) -> list[int]:
    """Per item 1 when the option with the highest ELBO given the question (per token with normalize=length) is
    the answer, else 0; masks drawn from ``seed`` (default ``cfg.seed``)."""
    # Imported here: eval's config reads NORMALIZE when the command is parsed, and metrics brings pyarrow.
    from pipeline.evaluation.metrics import mean_terms

    chat_template = resolve_chat_template(tokenizer, chat_template)
    seed = cfg.seed if seed is None else seed
    credits = []
    with progress_bar(f"eval: multiple choice (seed {seed})", len(items), cfg.progress, unit="items") as bar:
        for i, item in enumerate(items):
            options = list(item["options"])
            if not options:
                raise UserError(f"{cfg.choices} item {i}: field 'options' is empty")
            requests = choice_requests(tokenizer, item, i, samples=cfg.samples, seed=seed,
                                       chat_template=chat_template, where=f"{cfg.choices} item {i}")
            scores = [m / (len(r.response_ids) if cfg.normalize == "length" else 1)
                      for m, r in zip(mean_terms(model, tokenizer, requests, cfg.batch_tokens), requests)]
            credits.append(int(max(range(len(options)), key=lambda j: scores[j]) == int(item["answer"])))
            bar.advance(1)
    return credits
