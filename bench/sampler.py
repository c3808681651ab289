"""Sampler speed: pipeline.sampling.sampler.generate against the published procedure, same model, same run.

The baseline follows LLaDA's published sampling loop as described in
shared/reference/llada.md: full-vocabulary logits at every position each
step, softmax over every position, Gumbel noise in float64 on the whole
[batch, sequence, vocab] tensor when temperature > 0. Ours applies the head
to the current block only and draws noise for the block only. At
temperature 0 both must produce the same tokens (checked).

    /work/venv/bin/python bench/sampler.py [--vocab 126464] [--gen-length 64] ...

``--mode fast``: the exact sampler against Fast-dLLM's settings (prefix and
dual KV cache, threshold 0.9, and the two combined) on a model's greedy
answers to held-out questions, through ``pipeline.sampling.completion.complete`` (the
path eval takes): tokens/s, speed-up against exact, forward passes, share of
completions identical to exact, and task accuracy k/n with its Wilson 95%
interval. ``--model`` takes a preset or a model folder (a skilled model).

    python bench/sampler.py --mode fast --model tiny --questions data/benchmarks/arithmetic_heldout.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.llada import LLaDAConfig, LLaDAModelLM
from pipeline.sampling.sampler import generate, num_transfer_tokens


@torch.no_grad()
def published_generate(model, prompt, *, mask_id, gen_length, block_length, steps, temperature, generator):
    """The reference loop (one prompt length for the batch, no padding), written from the description."""
    batch, width = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id, dtype=torch.long)], 1)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = width + b * block_length, width + (b + 1) * block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(1), per_block)
        for i in range(per_block):
            masked = x == mask_id
            logits = model(x).logits
            if temperature > 0:
                u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
                scores = logits.double().exp() / (-torch.log(u)) ** temperature
            else:
                scores = logits
            pred = scores.argmax(-1)
            p = torch.softmax(logits.float(), -1)
            conf = p.gather(-1, pred[..., None]).squeeze(-1)
            conf[:, hi:] = float("-inf")
            pred = torch.where(masked, pred, x)
            conf = torch.where(masked, conf, torch.tensor(float("-inf")))
            for r in range(batch):
                idx = torch.topk(conf[r], int(schedule[r, i])).indices
                x[r, idx] = pred[r, idx]
    return x[:, width:]


def fast_mode(args) -> None:
    import json
    import platform
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fast_sampling import best, compare, count_passes, format_rows
    from score import matmul_flops

    from pipeline.data.readers import jsonl_objects
    from pipeline.grading.answers import is_correct
    from pipeline.models import load_model
    from pipeline.sampling.completion import complete

    torch.set_num_threads(args.threads) if args.threads else None
    items = [row for _, row in jsonl_objects(Path(args.questions))][: args.limit]
    model, tokenizer = load_model(args.model, device=args.device)
    model.eval()
    passes = count_passes(model)
    prompts = [it["question"] for it in items]

    def sample(cache, threshold):
        done = complete(model, tokenizer, prompts, gen_length=args.gen_length, block_length=args.block_length,
                        steps=args.steps, batch_size=args.batch, kv_cache=cache, threshold=threshold)
        return [d["completion"] for d in done]

    def grade(completions):
        return [bool(is_correct(c, str(it["answer"]))) for c, it in zip(completions, items)]

    peak = matmul_flops(args.device, torch.float32)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"{len(items)} questions of {args.questions}, greedy, gen {args.gen_length}, block {args.block_length}, "
          f"steps {args.steps}, batch {args.batch}, best of {args.fast_repeats}; {platform.machine()} {torch.get_num_threads()} threads, "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    rows = compare(sample, args.gen_length, len(items), grade=grade, passes=passes, repeats=args.fast_repeats)
    for line in format_rows(rows):
        print(line)
    top = best(rows)
    print("best inside exact's 95% interval:", f"{top['label']} x{top['speedup']:.2f}" if top else "none")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peak_gflops": peak / 1e9}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("published", "fast"), default="published",
                    help="published: ours vs the published loop; fast: exact vs KV cache / threshold decoding")
    ap.add_argument("--model", default="tiny", help="fast mode: preset name or model folder")
    ap.add_argument("--questions", default="data/benchmarks/arithmetic_heldout.jsonl", help="fast mode")
    ap.add_argument("--limit", type=int, default=64, help="fast mode: questions used")
    ap.add_argument("--device", default="cpu", help="fast mode")
    ap.add_argument("--threads", type=int, default=0, help="fast mode: torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="fast mode: also write the rows here")
    ap.add_argument("--fast-repeats", type=int, default=1, help="fast mode: interleaved rounds, best time kept")
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.mode == "fast":
        return fast_mode(args)

    torch.manual_seed(0)
    mask_id = args.vocab - 1
    config = LLaDAConfig(
        d_model=args.d_model, n_heads=4, n_kv_heads=4, n_layers=args.layers, mlp_hidden_size=3 * args.d_model,
        vocab_size=args.vocab, embedding_size=args.vocab, max_sequence_length=4096,
        mask_token_id=mask_id, eos_token_id=0, pad_token_id=0,
    )
    model = LLaDAModelLM(config).eval()
    prompt = torch.randint(1, args.vocab - 2, (args.batch, args.prompt_length))
    common = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)

    def ours(temperature):
        return generate(model, prompt.tolist(), mask_token_id=mask_id, pad_token_id=0, temperature=temperature,
                        generator=torch.Generator().manual_seed(0), **common)

    def baseline(temperature):
        return published_generate(model, prompt, mask_id=mask_id, temperature=temperature,
                                  generator=torch.Generator().manual_seed(0), **common)

    assert torch.equal(ours(0.0), baseline(0.0)), "temperature 0: ours and the published loop disagree"
    print(f"model d_model={args.d_model} layers={args.layers} vocab={args.vocab}; batch {args.batch}, "
          f"prompt {args.prompt_length}, gen {args.gen_length}, block {args.block_length}, steps {args.steps}")
    print("temperature 0: identical tokens to the published loop")
    for temperature in (0.0, 1.0):
        timings = {}
        for name, fn in (("published", baseline), ("ours", ours)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(temperature)
                best = min(best, time.perf_counter() - t0)
            timings[name] = best
        print(f"temperature {temperature}: published {timings['published']:.3f}s  ours {timings['ours']:.3f}s  "
              f"speed-up x{timings['published'] / timings['ours']:.2f}")


if __name__ == "__main__":
    main()
