"""score-ref's FLOPs by layer at LLaDA-8B's shape, against LLaDA's per-pair procedure (no GPU, nothing allocated).

Issue 34, item 1 asks where score-ref's time goes at the LLaDA-8B shape as well as on the CPU comparison
(bench/score.py --end-to-end). Without a GPU, this counts the work: the model is built as plan's tracer builds it
(``pipeline.plan.trace``: on ``meta``, then fake tensors: shapes, no storage), and torch's ``FlopCounterMode``
counts every matmul and attention FLOP of

- ours: ``elbo_terms`` (what score-ref runs) over one pair's requests, n masks per response, score-ref's token
  budget per forward (the GPU default), the LM head on the masked rows only;
- LLaDA's per-pair procedure (``get_log_likelihood`` of LLaDA's repository, as bench/score.py's
  ``llada_log_likelihood``): each response's n masked copies in one batch through the whole model, full-vocabulary
  logits at every position of prompt and response.

Printed per model: one block's FLOPs split into attention projections, attention scores and MLP; all blocks; the
head; the total, the head's share, and the ratio LLaDA / ours, which is the most a faster implementation of the
same estimator can gain on a machine that runs both at the same FLOP rate (the "FLOP ceiling"). The tiny body
under LLaDA's 126,464-word head is the CPU comparison's model (head-heavy); llada-8b-shape is LLaDA-8B.

CPU:  python bench/score_flops.py            (a few seconds: nothing is computed)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from results import publish  # noqa: E402

LLADA_VOCAB = 126464
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out")
MLP = ("ff_proj", "up_proj", "ff_out")
BLOCK = re.compile(r"\.blocks\.(\d+)$")
BLOCK_CHILD = re.compile(r"\.blocks\.(\d+)\.(\w+)$")


def fake_model(preset: str, dtype: str, vocab: int | None):
    """The preset built as plan's tracer builds it: meta, then fake tensors (nothing allocated)."""
    from pipeline.core.devices import torch_dtype
    from pipeline.models.llada import LLaDAModelLM
    from pipeline.models.presets import _default_dtype
    from pipeline.plan.trace import materialize, model_config, new_fake_mode

    config = model_config(preset)
    if vocab:
        config.vocab_size = config.embedding_size = vocab
    with _default_dtype(torch_dtype(dtype)), torch.device("meta"):
        model = LLaDAModelLM(config).eval().requires_grad_(False)
    materialize(model, new_fake_mode())
    return model


def pair_requests(prompt_len: int, response_lens: tuple[int, int], samples: int, token: int, seed: int = 0):
    """One pair's requests as score-ref builds them: n masks per response drawn by LLaDA's l/L scheme."""
    from pipeline.estimator.diffusion import masked_request

    return [masked_request([token] * prompt_len, [token] * length, samples, seed + i)[0]
            for i, length in enumerate(response_lens)]


def ours(model, requests, batch_tokens: int):
    from pipeline.estimator.diffusion import elbo_terms

    config = model.config
    with torch.no_grad():
        elbo_terms(model, requests, mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id,
                   batch_tokens=batch_tokens)


def llada(model, requests):
    """LLaDA's procedure for each response: the n masked copies as one batch, full logits, cross-entropy on the
    masked positions (the FLOPs of bench/score.py's llada_log_likelihood)."""
    config = model.config
    for req in requests:
        seq = torch.tensor(list(req.prompt_ids) + list(req.response_ids))[None].repeat(req.masks.shape[0], 1)
        mask = torch.cat([torch.zeros(req.masks.shape[0], len(req.prompt_ids), dtype=torch.bool),
                          req.masks.bool()], dim=1)
        noisy = torch.where(mask, config.mask_token_id, seq)
        rows, cols = mask.nonzero(as_tuple=True)  # real indices: a boolean index of a fake tensor has no shape
        with torch.no_grad():
            logits = model(noisy).logits
            torch.nn.functional.cross_entropy(logits[rows, cols], seq[rows, cols], reduction="none")


def breakdown(model, fn) -> dict[str, float]:
    """FLOPs of ``fn()`` by part: per block (attention projections, attention scores, MLP), all blocks, head+rest."""
    from torch.utils.flop_counter import sdpa_flop_count

    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # torch counts the CUDA attention kernels; the CPU one (what runs on fake CPU tensors) by the same formula
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    counts = counter.get_flop_counts()
    total = float(sum(counts["Global"].values()))
    blocks, parts = 0.0, defaultdict(float)
    for name, ops in counts.items():
        flops = float(sum(ops.values()))
        if BLOCK.search(name):
            blocks += flops
        elif m := BLOCK_CHILD.search(name):
            child = m.group(2)
            kind = "attention projections" if child in ATTENTION_PROJECTIONS else "MLP" if child in MLP else None
            if kind:
                parts[kind] += flops
    n_blocks = model.config.n_layers
    parts = {k: v / n_blocks for k, v in parts.items()}
    per_block = blocks / n_blocks
    parts["attention scores"] = per_block - parts.get("attention projections", 0.0) - parts.get("MLP", 0.0)
    return {"per block": per_block, **parts, "blocks": blocks, "head and rest": total - blocks, "total": total}


def report(preset: str, vocab: int | None, args) -> list[str]:
    from pipeline.plan.trace import plain_token

    model = fake_model(preset, args.dtype, vocab)
    cfg = model.config
    requests = pair_requests(args.prompt_len, (args.chosen_len, args.rejected_len), args.samples,
                             plain_token(cfg))
    masked = sum(int(r.masks.sum()) for r in requests)
    a = breakdown(model, lambda: ours(model, requests, args.batch_tokens))
    b = breakdown(model, lambda: llada(model, requests))
    params = sum(p.numel() for p in model.parameters())
    lines = [f"{preset}{'' if not vocab else f' (vocab {vocab})'}: {params / 1e9:.3g}e9 parameters, "
             f"{cfg.n_layers} blocks, d_model {cfg.d_model}, vocab {cfg.padded_vocab_size}; one pair, prompt "
             f"{args.prompt_len}, responses {args.chosen_len}/{args.rejected_len}, n = {args.samples} "
             f"({masked} masked tokens); ours at --batch-tokens {args.batch_tokens}",
             f"  {'GFLOP':<24}{'ours':>12}{'LLaDA':>12}"]
    for key in ("per block", "attention projections", "attention scores", "MLP", "blocks", "head and rest",
                "total"):
        lines.append(f"  {key:<24}{a.get(key, 0.0) / 1e9:>12.1f}{b.get(key, 0.0) / 1e9:>12.1f}")
    lines.append(f"  head's share of the total: ours {a['head and rest'] / a['total']:.1%}, LLaDA "
                 f"{b['head and rest'] / b['total']:.1%}; FLOP ceiling (LLaDA / ours): x{b['total'] / a['total']:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=110, help="prompt tokens (GSM8K question in the chat template)")
    p.add_argument("--chosen-len", type=int, default=130, help="chosen response tokens")
    p.add_argument("--rejected-len", type=int, default=150, help="rejected response tokens")
    p.add_argument("--samples", type=int, default=8, help="Monte Carlo samples n per response")
    p.add_argument("--batch-tokens", type=int, default=32768, help="ours: padded tokens per forward (GPU default)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--record", action="store_true", help="append the output to bench/RESULTS.md")
    args = p.parse_args(argv)
    lines = [*report("tiny", LLADA_VOCAB, args), *report("llada-8b-shape", None, args)]
    publish("score_flops.py", sys.argv[1:] if argv is None else argv, lines, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
