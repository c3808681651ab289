"""SFT training throughput: the LM head on masked rows only vs the full-vocabulary MDLM loss (dllm's way).

Both run the same training steps (forward, backward, AdamW) of LLaDA's SFT objective on the same model,
the same batches and the same masks (pipeline/estimator/sft_objective.py's seeded draws):

- ours: ``pipeline.estimator.sft_objective.sft_loss``: the body once, the head and a float32 log-softmax on the masked rows
  only (``MaskedRowScorer``), per-sequence sums divided by t and the response length;
- full vocabulary (as dllm's MDLM trainer computes it): ``model(noisy).logits`` at every position, then the
  masked positions selected, cross-entropy divided by t, summed and divided by the response length.

Prints tokens/s (prompt + response tokens trained on per second) of both, their ratio, the achieved FLOP/s
against this machine's measured fp32 matmul FLOP/s, and the largest difference between the two losses.

CPU:  python bench/sft.py                       (tiny body; its own 512 vocabulary, then LLaDA's 126,464)
GPU:  python bench/sft.py --preset llada-8b-shape --vocab-sizes 0 --dtype bfloat16 --batch 2
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score import DTYPES, build_model, matmul_flops, sync  # noqa: E402  (bench/score.py's helpers)

from pipeline.estimator.sft_objective import collate, draw_masks, sft_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-sizes", default="0,126464",
                   help="comma-separated vocabularies to measure (0 = the preset's own)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each, alternating")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def full_vocab_losses(model, batch, t, mask, mask_token_id):
    """dllm's way: logits at every position, then the masked ones selected."""
    device = next(model.parameters()).device
    noisy = torch.where(mask, mask_token_id, batch.input_ids).to(device)
    attn = None if bool(batch.attention_mask.all()) else batch.attention_mask.to(device)
    logits = model(noisy, attention_mask=attn).logits
    rows, cols = mask.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows.to(device), cols.to(device)].float(), batch.input_ids[rows, cols].to(device),
                         reduction="none")
    per_seq = torch.zeros(batch.input_ids.shape[0], dtype=torch.float64, device=device)
    per_seq = per_seq.index_add(0, rows.to(device), ce.double())
    return per_seq / (t.to(device) * batch.response_len.to(device).double())


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype, device = DTYPES[args.dtype], args.device
    g = torch.Generator().manual_seed(0)
    lines = []
    peak = matmul_flops(device, dtype)
    for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
        model = build_model(args.preset, vocab, device, dtype).train()
        cfg = model.config
        mask_id = cfg.mask_token_id
        models = {"ours": model, "full": copy.deepcopy(model)}
        # AdamW as the stage builds it (pipeline/trainer/optim.make_optimizer: fused where torch has the kernel).
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}
        vocab_n = cfg.padded_vocab_size
        examples = [(torch.randint(10, min(vocab_n, 500), (args.prompt_len,), generator=g).tolist(),
                     torch.randint(10, min(vocab_n, 500), (args.response_len,), generator=g).tolist())
                    for _ in range(args.batch)]
        batch = collate(examples, cfg.pad_token_id)
        tokens = int(batch.attention_mask.sum())
        times = {"ours": math.inf, "full": math.inf}
        diff, masked = 0.0, 0
        for step in range(args.steps + 1):  # step 0 warms up
            t, mask = draw_masks(batch, list(range(args.batch)), seed=0, epoch=step)
            masked += int(mask.sum()) if step else 0
            losses = {}
            for name in ("ours", "full"):
                m, opt = models[name], opts[name]
                sync(device)
                t0 = time.perf_counter()
                fn = sft_loss if name == "ours" else full_vocab_losses
                loss = fn(m, batch, t, mask, mask_id).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                if step:
                    times[name] = min(times[name], time.perf_counter() - t0)
                losses[name] = float(loss.detach())
            if step == 0:  # both models identical before the first update: the same loss
                diff = abs(losses["ours"] - losses["full"])
        head = cfg.d_model * vocab_n
        body = sum(p.numel() for p in model.parameters() if p.dim() == 2) - 2 * head
        s = args.prompt_len + args.response_len
        attn = 4 * s * s * cfg.d_model * cfg.n_layers * args.batch
        per_masked = masked / args.steps
        f_ours = 3 * (2 * body * tokens + attn + 2 * head * per_masked)  # forward + backward = 3x forward
        f_full = 3 * (2 * body * tokens + attn + 2 * head * tokens)
        lines += [
            f"model: preset {args.preset}, d_model {cfg.d_model}, layers {cfg.n_layers}, vocab {vocab_n}, "
            f"{args.dtype} on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else platform.processor() or 'cpu'}, "
            f"{torch.get_num_threads()} threads); batch {args.batch} x ({args.prompt_len} + {args.response_len}) tokens, "
            f"{per_masked:.0f} masked per step; best of {args.steps} steps",
            f"  ours (head on masked rows): {tokens / times['ours']:9.0f} tokens/s  ({times['ours'] * 1e3:.0f} ms/step)  "
            f"{f_ours / times['ours'] / 1e9:.1f} GFLOP/s",
            f"  full vocabulary (dllm):     {tokens / times['full']:9.0f} tokens/s  ({times['full'] * 1e3:.0f} ms/step)  "
            f"{f_full / times['full'] / 1e9:.1f} GFLOP/s",
            f"  speed ratio (ours / full): {times['full'] / times['ours']:.2f}x;  |loss difference| before any update: {diff:.2e}",
        ]
        print("\n".join(lines[-4:]), flush=True)
    lines.append(f"matmul peak measured {peak / 1e9:.1f} GFLOP/s ({args.dtype})")
    print(lines[-1])
    if not args.no_record:
        from results import record

        record("sft.py", list(argv if argv is not None else sys.argv[1:]), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
