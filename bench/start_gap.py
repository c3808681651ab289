"""Step-1 gap: how far a policy that IS the cache's model starts from the cached reference terms.

A `tiny` model is sharpened by a few steps of SFT on GSM8K answers (sharper
logits make rounding visible), saved, and scored by ``lldm-dpo score-ref`` in
float32 and in bfloat16. For each cache, the step-1 ``|delta|`` of every pair
(delta = (B_pi(c) - B_ref(c)) - (B_pi(r) - B_ref(r)), policy = the same model)
is measured on the cached masks in train's batch layout, for

- matched numerics: what train does by default after this change (it follows the cache);
- mismatched numerics: what train did by default before (a float32 policy whatever the
  cache's dtype; the README's recipe: float32 weights with bf16 autocast), and now only with
  ``--allow-numerics-mismatch``.

It also prints eval's "before" preference accuracy of the cache's own model: before
this change (float32, eval's own batches) and after (the cache's numerics and layout).

CPU:  python bench/start_gap.py   (needs ../shared/data/gsm8k; writes only to a temp folder)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--min-len", type=int, default=120, help="shortest response in tokens")
    p.add_argument("--max-len", type=int, default=260, help="longest response in tokens")
    p.add_argument("--sharpen-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4, help="train's pairs per micro-batch")
    p.add_argument("--beta", type=float, default=0.1)
    return p.parse_args(argv)


def write_pairs(tmp: Path, tokenizer, count: int, min_len: int, max_len: int) -> Path:
    from results import gsm8k_pairs

    from pipeline.data.tokenize import tokenize_pair
    from stages.ingest import IngestConfig
    from stages.ingest import run as ingest

    rows = []
    for _, row in gsm8k_pairs():
        tok = tokenize_pair(tokenizer, row, max_length=4096)
        if all(min_len <= len(r) <= max_len for r in (tok.chosen_ids, tok.rejected_ids)):
            rows.append(row)
        if len(rows) == count:
            break
    src = tmp / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(IngestConfig(inputs=[str(src)], out=str(tmp / "pairs.arrow"), eval_fraction=0.0, progress=False))
    return tmp / "pairs.arrow"


def sharpen(tmp: Path, pairs: Path, steps: int, samples: int) -> Path:
    """A few AdamW steps on the chosen responses' negative ELBO: the model's logits grow sharper."""
    from pipeline.data.pairsfile import read_pairs
    from pipeline.data.tokenize import tokenize_pair
    from pipeline.estimator.diffusion import ScoreRequest, elbo_terms, mask_seed, sample_masks
    from pipeline.models import load_model

    model, tok = load_model("tiny")
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = read_pairs(pairs).to_pylist()
    for step in range(steps):
        reqs = []
        for row in rows:
            t = tokenize_pair(tok, row, 4096)
            ms = sample_masks(len(t.chosen_ids), 2, mask_seed(1000 + step, row["pair_id"], "chosen", 0))
            reqs.append(ScoreRequest(t.prompt_ids, t.chosen_ids, ms.masks, ms.weights))
        terms = elbo_terms(model, reqs, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                           batch_tokens=8192)
        loss = -sum(t.mean() / len(r.response_ids) for t, r in zip(terms, reqs)) / len(reqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp / "sharp"
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"sharpened tiny: {steps} steps, final per-token NLL bound {loss.item():.3f}")
    return out


def step1_deltas(model_dir: Path, cache: Path, dtype: str, mixed_precision: str, batch_size: int) -> list[float]:
    """|delta| of every pair at step 1: the policy (the cache's model) on the cached masks, train's batches."""
    from pipeline.estimator.diffusion import BATCH_TOKENS, elbo_terms
    from pipeline.estimator.replay import PairBatch, replay_requests
    from pipeline.models import load_model
    from pipeline.models.numerics import autocast
    from pipeline.refcache.reader import open_cache
    from pipeline.refcache.rows import reference_mean

    opened = open_cache(cache)
    rows = list(opened.rows(split="train"))
    model, tok = load_model(str(model_dir), dtype=dtype)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        requests = replay_requests(PairBatch(chunk, 0), opened.fingerprint)
        with torch.no_grad(), autocast("cpu", mixed_precision):
            terms = elbo_terms(model, requests, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                               batch_tokens=BATCH_TOKENS)
        means = [t.double().mean().item() for t in terms]
        for i, row in enumerate(chunk):
            pc, pr = reference_mean(row, "chosen", 0), reference_mean(row, "rejected", 0)
            out.append(abs((means[2 * i] - pc) - (means[2 * i + 1] - pr)))
    return out


def eval_before(model_dir: Path, cache: Path, old: bool) -> float:
    """Preference accuracy of the cache's own model: old = float32 in eval's own 8-pair batches."""
    from pipeline.estimator.diffusion import BATCH_TOKENS
    from pipeline.estimator.losses import reward_accuracy
    from pipeline.estimator.replay import rescore_part
    from pipeline.models import load_model
    from pipeline.models.numerics import autocast, of_fingerprint
    from pipeline.refcache.reader import open_cache
    from pipeline.refcache.rows import reference_elbo

    opened = open_cache(cache)
    fp = opened.fingerprint
    numerics = of_fingerprint(fp)
    model, tok = load_model(str(model_dir), dtype="float32" if old else numerics.dtype)
    credits = []
    import pyarrow.parquet as pq

    for part in opened.parts:
        rows = pq.read_table(part).to_pylist()
        if old:
            chunks = [rows[i:i + 8] for i in range(0, len(rows), 8)]
            scores = []
            for chunk in chunks:
                scores += rescore_part(model, tok, chunk, fp, batch_tokens=BATCH_TOKENS, autocast=autocast("cpu", "no"))
        else:
            scores = rescore_part(model, tok, rows, fp, batch_tokens=opened.manifest.batch_tokens,
                                  autocast=autocast("cpu", numerics.mixed_precision))
        for row, s in zip(rows, scores):
            rc, rr = torch.tensor([reference_elbo(row, "chosen")]), torch.tensor([reference_elbo(row, "rejected")])
            credit = reward_accuracy(0.1 * (torch.tensor([s["chosen"]]) - rc), 0.1 * (torch.tensor([s["rejected"]]) - rr),
                                     rc, rr, beta=0.1)
            credits.append(float(credit))
    return sum(credits) / len(credits)


def describe(values: list[float], beta: float) -> str:
    v = sorted(values)
    p90 = v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]
    return (f"median {statistics.median(v):8.4f}  p90 {p90:8.4f}  max {v[-1]:8.4f}  "
            f"beta*max {beta * v[-1]:7.4f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    from score import matmul_flops  # bench/score.py

    from pipeline.models import preset_tokenizer
    from stages.score_ref import ScoreRefConfig
    from stages.score_ref import run as score_ref

    torch.manual_seed(0)
    peak = matmul_flops("cpu", torch.float32)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        pairs = write_pairs(tmp, preset_tokenizer("tiny"), args.pairs, args.min_len, args.max_len)
        model = sharpen(tmp, pairs, args.sharpen_steps, args.samples)
        caches = {}
        for dtype in ("float32", "bfloat16"):
            caches[dtype] = tmp / f"cache-{dtype}"
            score_ref(ScoreRefConfig(pairs=pairs, model=str(model), out=caches[dtype], samples=args.samples,
                                     dtype=dtype, max_length=4096, device="cpu", progress=False))
        print(f"data: {args.pairs} GSM8K pairs, responses {args.min_len}-{args.max_len} tokens, n = {args.samples}, "
              f"beta {args.beta}, train micro-batch {args.batch_size}")
        scenarios = [
            # (cache, policy dtype, autocast, label)
            ("float32", "float32", "no", "matched (before and after: default)"),
            ("float32", "bfloat16", "no", "mismatched: --dtype bfloat16 (after: refused)"),
            ("bfloat16", "bfloat16", "no", "matched (after: default, follows the cache)"),
            ("bfloat16", "float32", "no", "mismatched (before: default float32 policy)"),
            ("bfloat16", "float32", "bf16", "mismatched: README recipe fp32 + bf16 autocast"),
        ]
        baseline = {}
        for cache_dtype, dtype, mp, label in scenarios:
            d = step1_deltas(model, caches[cache_dtype], dtype, mp, args.batch_size)
            baseline.setdefault(cache_dtype, max(d))
            ratio = max(d) / baseline[cache_dtype] if baseline[cache_dtype] else float("inf")
            print(f"cache {cache_dtype:8} policy {dtype:8} autocast {mp:4}: |delta| {describe(d, args.beta)}  "
                  f"max/matched {ratio:8.1f}x  {label}")
        for cache_dtype in ("float32", "bfloat16"):
            old, new = eval_before(model, caches[cache_dtype], True), eval_before(model, caches[cache_dtype], False)
            print(f"eval 'before' (the cache's own model), {cache_dtype} cache: preference accuracy "
                  f"before this change {old:.3f}, after {new:.3f}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
