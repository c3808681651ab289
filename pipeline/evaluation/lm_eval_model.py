"""An lm-evaluation-harness model for masked diffusion LMs: ``--model lldm``.

Benchmarks of LLaDA are run through lm-evaluation-harness (LLaDA's own
repository registers a model class for it); this adapter lets our models and
trained runs be set beside those numbers:

- ``loglikelihood`` (multiple choice, ...): the continuation's ELBO given the
  context by our estimator (``pipeline.estimator.diffusion``): ``mc_samples`` stratified
  mask counts, masks seeded by (seed, the request's text) alone, so a request's
  value depends neither on the batch nor on the order; ``is_greedy`` is
  LLaDA's harness's suffix greedy prediction (``suffix_greedy_prediction``):
  from the context and a fully masked continuation, commit one token per step,
  the most confident masked position's argmax, until none is masked; greedy
  when the result is the continuation.
- ``generate_until``: LLaDA's sampler (``pipeline.sampling.completion.complete``, what
  ``lldm-dpo generate`` runs) with ``gen_length``/``block_length``/``steps``
  from the model arguments; the text is cut at the first ``until`` string.
- ``loglikelihood_rolling``: the ELBO of the whole text after an empty prompt.

Context and continuation are encoded jointly by ``pipeline.data.prompts``
(whitespace at the end of the context moves to the continuation; the whole
text is encoded once and split after the context's own encoding), lm-eval's
and LLaDA's convention. With ``--apply_chat_template`` lm-eval renders the
conversation through ``apply_chat_template`` here, i.e. ``pipeline.data.prompts``'s
renderer (the chat template with a generation prompt), which every other
command uses; the contexts then reach the model as that text.

lm-eval 0.4 discovers models only through its own registry (no plugin entry
points), so ``lm_eval`` must import this module first:
``python -m pipeline.evaluation.lm_eval_model --model lldm --model_args pretrained=RUN/final --tasks ...``
(or the ``lldm-lm-eval`` script) is lm-eval's command line with ``lldm``
registered; ``lldm-dpo eval --lm-eval-tasks ...`` runs it in-process.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from pipeline.core.errors import ConfigError, UserError
from pipeline.data.prompts import default_chat_template, encode_continuation, encode_text, messages_of, render_prompt
from pipeline.estimator.diffusion import BATCH_TOKENS, elbo_terms, mask_seed, masked_request
from pipeline.sampling.args import SamplingArgs
from pipeline.sampling.completion import complete

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise UserError("lm-evaluation-harness is not installed: pip install 'lldm-dpo[eval]'") from exc

MODEL_NAME = "lldm"


def request_key(kind: str, *texts: str) -> str:
    """The masks' seed key of a request: sha256 over its kind and texts, each followed by a unit separator.

    A request's ELBO uses ``mask_seed(seed, request_key(...), "continuation", 0)``.
    """
    return hashlib.sha256("".join(p + "\x1f" for p in (kind, *texts)).encode("utf-8")).hexdigest()


@register_model(MODEL_NAME)
class LLDMEvalModel(LM):
    """lm-eval's LM over a masked diffusion model loaded by ``pipeline.models.load``.

    Model arguments (``--model_args k=v,...``): ``pretrained`` (a model folder,
    a run's ``final`` or checkpoint folder, a LoRA adapter folder, or a preset),
    ``dtype``, ``mc_samples`` (Monte Carlo samples per loglikelihood),
    ``batch_tokens``, ``seed``, ``gen_length``, ``block_length``, ``steps``,
    ``temperature``, ``remasking``, ``cfg_scale``, ``trust_remote_code``. In process (``lldm-dpo eval``),
    ``sampling`` gives the sampler's settings as one ``SamplingArgs`` instead of those keywords.
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, dtype: str = "float32",
                 device: str | None = None, batch_size: Any = None, max_batch_size: Any = None,
                 mc_samples: int = 32, batch_tokens: int = BATCH_TOKENS, seed: int = 0, gen_length: int = 256,
                 block_length: int = 32, steps: int | None = None, temperature: float = 0.0,
                 remasking: str = "low_confidence", cfg_scale: float = 0.0, trust_remote_code: bool = False,
                 sampling: SamplingArgs | None = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            raise UserError(f"--model {MODEL_NAME}: unknown model argument(s) {', '.join(sorted(unused))}")
        try:
            self.sampling = sampling if sampling is not None else SamplingArgs(
                gen_length=int(gen_length), block_length=int(block_length),
                steps=int(steps) if steps is not None else int(gen_length), temperature=float(temperature),
                remasking=str(remasking), cfg_scale=float(cfg_scale), seed=int(seed))
        except ConfigError as exc:
            raise UserError(f"--model {MODEL_NAME}: {exc}") from None
        if model is None:
            if not pretrained:
                raise UserError(f"--model {MODEL_NAME}: give --model_args pretrained=MODEL_OR_RUN_FOLDER")
            from pipeline.models import load
            from pipeline.models.numerics import Numerics

            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load(str(pretrained), Numerics(dtype=dtype), dev,
                                    trust_remote_code=bool(trust_remote_code))
        if tokenizer is None or tokenizer.mask_token_id is None:
            raise UserError(f"--model {MODEL_NAME}: the tokenizer has no mask token")
        if int(mc_samples) < 1:
            raise UserError(f"--model {MODEL_NAME}: mc_samples must be >= 1, got {mc_samples}")
        self.model = model.eval()
        self.tok = tokenizer
        self.name = str(pretrained) if pretrained else getattr(model, "name_or_path", "model")
        self.mc_samples, self.batch_tokens, self.seed = int(mc_samples), int(batch_tokens), int(seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- lm-eval's interface ------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tok, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not default_chat_template(self.tok):
            raise UserError(f"{self.name}: the tokenizer has no chat template (drop --apply_chat_template)")
        if add_generation_prompt:  # the rendering every other command uses
            return render_prompt(self.tok, chat_history, chat_template=True, where="lm-eval chat history")
        # lm-eval prefills an assistant turn: the conversation so far, without a new generation prompt.
        return self.tok.apply_chat_template(messages_of(chat_history, "lm-eval chat history"), tokenize=False,
                                            add_generation_prompt=False)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        # The context is already rendered (lm-eval applied the chat template if asked): raw text here.
        encoded = [encode_continuation(self.tok, c, x, chat_template=False, where="lm-eval request")
                   for c, x in pairs]
        values = self.elbos(encoded, [request_key("loglikelihood", c, x) for c, x in pairs])
        greedy = [self._is_greedy(ctx, cont) for ctx, cont in encoded]
        return list(zip(values, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        return self.elbos([([], encode_text(self.tok, t)) for t in texts], [request_key("rolling", t) for t in texts])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        done = complete(self.model, self.tok, [r.args[0] for r in requests], self.sampling, chat_template=False)
        out = []
        for result, r in zip(done, requests):
            text = result["completion"]
            until = (dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}).get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop, 1)[0] if stop else text
            out.append(text)
        return out

    # --- the estimator -------------------------------------------------------------

    def elbos(self, encoded: Sequence[tuple[list[int], list[int]]], keys: Sequence[str]) -> list[float]:
        """The ELBO of each continuation after its context: the mean of ``mc_samples`` terms."""
        requests = []
        for (ctx, cont), key in zip(encoded, keys):
            if not cont:
                raise UserError(f"{self.name}: a request's continuation encodes to no tokens")
            requests.append(masked_request(ctx, cont, self.mc_samples, mask_seed(self.seed, key, "continuation", 0))[0])
        values: list[float] = []
        for start in range(0, len(requests), 64):  # bounded host memory for the masks of long task lists
            with torch.no_grad():
                terms = elbo_terms(self.model, requests[start:start + 64], mask_token_id=self.tok.mask_token_id,
                                   pad_token_id=self.pad_id, batch_tokens=self.batch_tokens)
            values += [float(t.mean()) for t in terms]
        return values

    def _is_greedy(self, ctx: list[int], cont: list[int]) -> bool:
        """LLaDA's harness's ``is_greedy``: ``suffix_greedy_prediction`` with this model (len(cont) passes)."""
        device = next(self.model.parameters()).device
        shift = bool(getattr(self.model, "logits_shift", False))
        if shift and not ctx:
            return False  # nothing predicts the first token

        def predict(ids: list[int]) -> torch.Tensor:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids], device=device)).logits[0]
            # row i predicts token i (a shifted model's row i - 1 does)
            return torch.cat([logits[:1], logits[:-1]]) if shift else logits

        return suffix_greedy_prediction(predict, ctx, cont, self.tok.mask_token_id)


def suffix_greedy_prediction(predict, ctx: Sequence[int], cont: Sequence[int], mask_id: int) -> bool:
    """Whether the continuation is what greedy diffusion decoding gives, as LLaDA's lm-eval harness checks
    ``is_greedy`` (its ``suffix_greedy_prediction``): start from the context and ``len(cont)`` mask tokens;
    at each of ``len(cont)`` steps ``predict(ids)`` gives per-position logits, every still-masked position's
    argmax and its probability (softmax in float32) are taken, and only the most confident one is committed
    (the leftmost on a tie); greedy when the committed tokens equal ``cont``. Positions are tracked, so a
    committed token that happens to be the mask id stays committed."""
    seq = list(ctx) + [int(mask_id)] * len(cont)
    masked = list(range(len(ctx), len(seq)))
    while masked:
        logits = predict(seq)[masked].float()
        conf, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
        j = int(torch.argmax(conf))  # the first maximum: the leftmost on a tie
        seq[masked[j]] = int(tokens[j])
        del masked[j]
    return seq[len(ctx):] == list(cont)


def main() -> None:
    """lm-eval's command line with ``--model lldm`` registered (this module is imported first)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()


# --- lldm-dpo eval --lm-eval-tasks ---------------------------------------------------


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's TaskManager for these tasks: only ``include_path`` when it defines all of them (indexing
    lm-eval's few thousand built-in task files takes a while), else the built-in tasks too."""
    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in {include_path}" if include_path else ""
        raise UserError(f"--lm-eval-tasks: no lm-eval task named {', '.join(missing)} (not among lm-eval's "
                        f"tasks{where})")
    return manager


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` as ``{"task/metric": value}`` (``metric,filter`` keeps a non-default filter)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            flat[f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"] = float(value)
    return flat


def run_tasks(model, tokenizer, tasks: Sequence[str], *, include_path: str | None = None, limit: int = 0,
              num_fewshot: int | None = None, apply_chat_template: bool = False,
              per_document: dict[str, list[float]] | None = None, **model_args: Any) -> dict[str, float]:
    """Run lm-eval ``tasks`` on an already loaded model through ``LLDMEvalModel``; flat ``task/metric`` results.

    With ``per_document`` (a dict), it also receives each 0..1-valued metric's per-document values in document
    order (``document_credits``), the items behind an accuracy's count, interval and paired difference."""
    manager = task_manager(tasks, include_path)
    lm = LLDMEvalModel(model=model, tokenizer=tokenizer, **model_args)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit or None,
                          num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                          log_samples=per_document is not None, bootstrap_iters=0)
    if per_document is not None:
        per_document.update(document_credits(out.get("samples") or {}))
    return flatten_results(out["results"])


def document_credits(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """``{"task/metric[/filter]": per-document values}`` of lm-eval's logged samples, ordered by doc_id, for
    every metric whose values all lie in [0, 1] (acc, acc_norm, exact_match, ...: accuracies)."""
    out: dict[str, dict[int, float]] = {}
    bad: set[str] = set()
    for task, rows in samples.items():
        for row in rows:
            filt = row.get("filter") or "none"
            for metric in row.get("metrics") or []:
                name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
                value = row.get(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    bad.add(name)
                    continue
                out.setdefault(name, {})[int(row.get("doc_id", len(out.get(name, {}))))] = float(value)
    return {name: [v for _, v in sorted(by_doc.items())] for name, by_doc in out.items() if name not in bad}
