"""GPU proof: LLaDA-8B's real shape, score-ref throughput and MFU, LoRA / 4-bit training memory.

One command writes DIR/gpu_results.json, section by section (a timeout still
leaves every finished section on disk):

- build: the ``llada-8b-shape`` preset built directly on the GPU in bf16;
- score_ref: synthetic pairs (prompts and responses of 128-512 tokens, n = 8)
  through ``pipeline.estimator.diffusion.elbo_terms`` under a token budget, on the masks
  ``score-ref`` would draw: tokens/s, achieved TFLOP/s and MFU. FLOPs: 2 x
  non-embedding parameters per token (body), 4 x seq^2 x d_model per layer per
  sequence (attention), 2 x d_model x vocab per masked position (head);
- faithful: a subset of the same pairs through LLaDA's per-pair procedure
  (bench/score.py), timed, with our estimator timed on the same subset for a
  same-pairs ratio and the faithful time extrapolated to all pairs (marked so);
- sampler: the exact sampler against Fast-dLLM's settings (prefix / dual KV
  cache, threshold 0.9, combined; bench/fast_sampling.py) on synthetic prompts
  at the same shape: tokens/s, speed-up against exact in the same run, forward
  passes and the share of rows identical to exact (random weights: their
  confidences are low, so threshold decoding rarely commits more than its
  quota here; greedy accuracy needs a trained model: bench/sampler.py --mode fast);
- train: LoRA r 16 on LLaDA's projections, bf16, gradient checkpointing, one
  pair of 512 + 512 tokens, n = 8, through ``stages.train`` (setup_policy,
  micro_step with a TrainContext, clipping, AdamW): cached reference with and
  without ``--sequence-microbatch`` K, and the online reference (adapters off)
  at the same settings: step time and ``torch.cuda.max_memory_allocated``;
- reference: cached / online ratios of step time and peak memory;
- fsdp: ``lldm-dpo train`` launched by accelerate with configs/accelerate/fsdp.yaml on one
  GPU (FSDP version 2: every block, the embedding and the head in their own units,
  activation checkpointing; cpu mode: fsdp_cpu.yaml, one process over gloo) against
  the same run without FSDP on a small synthetic cache of the ``tiny`` preset: losses and
  final weights side by side, step time and peak memory of each, and the sharded
  checkpoint's layout;
- train_4bit: the same LoRA steps on an NF4 base (bitsandbytes; block
  projections quantized in place, as a 4-bit load of a folder would) and
  whether the peak stays under 15 GiB.

Every section that measures memory records ``lldm-dpo plan``'s estimate of the
same work beside it (``plan``: the tracked peak that ``max_memory_allocated``
should show, its components, and measured / planned), so the first GPU run
calibrates the plan.

``--mode cpu`` runs the same code paths on the ``micro`` preset with a few short
pairs and n = 2 (well under a minute) so the script cannot rot without a GPU;
its MFU is against this CPU's measured matmul FLOP/s.

GPU:  python bench/gpu.py --out gpu-run
CPU:  python bench/gpu.py --out /tmp/gpu-cpu --mode cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import score as score_bench  # noqa: E402
import train as train_bench  # noqa: E402

GIB = 2**30
BUDGET_15_GIB = 15 * GIB
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment; first match wins.
PEAKS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))

SETTINGS = {
    "gpu": dict(preset="llada-8b-shape", dtype="bfloat16", pairs=256, prompt=(128, 512), response=(128, 512),
                samples=8, batch_tokens=32768, faithful_pairs=16, train_prompt=512, train_response=512,
                sequence_microbatch=2, steps=2, lora_r=16, lora_alpha=32,
                budgets=dict(score_ref=150, faithful=45, train=110, train_4bit=100),
                fsdp=dict(preset="tiny", pairs=32, prompt=64, response=256, steps=4),
                sampler=dict(batch=8, prompt=256, gen_length=128, block_length=32, steps=128)),
    "cpu": dict(preset="micro", dtype="float32", pairs=4, prompt=(8, 24), response=(8, 24),
                samples=2, batch_tokens=512, faithful_pairs=2, train_prompt=16, train_response=16,
                sequence_microbatch=1, steps=2, lora_r=4, lora_alpha=8,
                budgets=dict(score_ref=20, faithful=10, train=30, train_4bit=10),
                fsdp=dict(preset="micro", pairs=16, prompt=8, response=16, steps=4),
                sampler=dict(batch=2, prompt=12, gen_length=16, block_length=8, steps=16)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_results.json")
    p.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of this card (default: detected for H100/H200/A100)")
    p.add_argument("--pairs", type=int, default=None, help="score-ref pairs (default 256; cpu 4)")
    p.add_argument("--samples", type=int, default=None, help="Monte Carlo samples n (default 8; cpu 2)")
    p.add_argument("--batch-tokens", type=int, default=None, help="score-ref token budget per forward pass")
    p.add_argument("--faithful-pairs", type=int, default=None, help="pairs through the per-pair procedure")
    p.add_argument("--sequence-microbatch", type=int, default=None, help="K of the --sequence-microbatch runs")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per train configuration")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time box")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --- results file ----------------------------------------------------------------------


class Results:
    """The JSON on disk, rewritten atomically after every change."""

    def __init__(self, out: Path, data: dict):
        self.path = out / "gpu_results.json"
        self.data = data
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        from pipeline.core.atomic import write_json_atomic

        write_json_atomic(self.path, self.data)

    def section(self, name: str, values: dict) -> None:
        self.data[name] = values
        self.save()


def run_section(results: Results, name: str, fn, *args) -> bool:
    """Run one section; an exception is recorded in the JSON (with its traceback tail), not raised."""
    results.section(name, {"status": "running"})
    t0 = time.perf_counter()
    try:
        fn(results, *args)
        if results.data[name].get("status", "running") == "running":
            results.data[name]["status"] = "ok"
        results.data[name]["section_seconds"] = time.perf_counter() - t0
        results.save()
        return True
    except Exception as exc:  # a failed section must not lose the others
        results.data[name] = {**results.data.get(name, {}), "status": "error",
                              "error": f"{type(exc).__name__}: {exc}"[:2000],
                              "traceback": traceback.format_exc()[-4000:],
                              "section_seconds": time.perf_counter() - t0}
        results.data.setdefault("errors", {})[name] = results.data[name]["error"]
        results.save()
        return False


# --- helpers ---------------------------------------------------------------------------


def sync(device) -> None:
    score_bench.sync(device)


def peak_tflops(device: torch.device, override: float | None, dtype: torch.dtype) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in PEAKS:
            if fragment in name:
                return peak, f"dense bf16 peak of {fragment} (datasheet)"
        return None, f"unknown card '{name}': pass --peak-tflops (dense bf16 TFLOP/s) for an MFU"
    return score_bench.matmul_flops(str(device), dtype) / 1e12, "measured matmul FLOP/s of this CPU"


def _mfu(tflops: float, state: dict):
    return tflops / state["peak_tflops"] if state["peak_tflops"] else None


def synthetic_pairs(count, prompt_range, response_range, vocab: int, specials, seed: int):
    """(pair_id, prompt, chosen, rejected) with uniform lengths and random non-special token ids."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(vocab)) - set(specials)), dtype=torch.long)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi + 1, (), generator=gen))
        return allowed[torch.randint(len(allowed), (length,), generator=gen)].tolist()

    return [(f"synthetic-{i}", ids(*prompt_range), ids(*response_range), ids(*response_range))
            for i in range(count)]


def specials_of(tokenizer, model) -> set[int]:
    out = set(tokenizer.all_special_ids)
    out.update(i for i in (model.config.mask_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id)
               if i is not None)
    return out


def as_items(pairs):
    """bench/score.py's (pair_id, tokenized) items."""
    return [(pid, SimpleNamespace(prompt_ids=p, chosen_ids=c, rejected_ids=r)) for pid, p, c, r in pairs]


def memory_peak(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "memory_source": "torch.cuda.max_memory_allocated since the configuration's first timed step"}
    return {"peak_bytes": train_bench.rss_peak(),
            "memory_source": "process ru_maxrss (CPU mode: monotone over the whole run, not per configuration)"}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_record(stage: str, cfg, samples: int, max_length: int, prompt_length: int, measured: int | None) -> dict:
    """``lldm-dpo plan``'s estimate of this section's work, next to what was measured (None on CPU: RSS is not
    comparable). A planning failure is recorded, not raised: it must not cost the measurement."""
    from pipeline.plan import Shape, make_plan
    from pipeline.plan.memory import GIB as _GIB

    try:
        plan = make_plan(stage, cfg, Shape(samples, max_length, prompt_length), 10**6 * _GIB, "unbounded")
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"tracked_bytes": plan.tracked_peak, "total_bytes": plan.total, "components": plan.components,
            "method": plan.method, "seconds": plan.seconds,
            "measured_over_planned": measured / plan.tracked_peak if measured and plan.tracked_peak else None}


# --- sections --------------------------------------------------------------------------


def section_build(results: Results, state: dict) -> None:
    from pipeline.models import build_preset, preset_tokenizer

    s = state["settings"]
    device = state["device"]
    sync(device)
    t0 = time.perf_counter()
    model = build_preset(s["preset"], device=str(device), dtype=s["dtype"])
    sync(device)
    seconds = time.perf_counter() - t0
    state["model"], state["tokenizer"] = model, preset_tokenizer(s["preset"])
    cfg = model.config
    results.section("build", {
        "preset": s["preset"], "dtype": s["dtype"], "device": str(device), "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab": cfg.padded_vocab_size,
        "memory_allocated_bytes": int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None,
        "host_copy": False,
    })


def section_score_ref(results: Results, state: dict) -> None:
    from pipeline.estimator.diffusion import elbo_terms
    from pipeline.estimator.replay import PairBatch, replay_requests

    s, device, model, tok = state["settings"], state["device"], state["model"], state["tokenizer"]
    n, budget = s["samples"], s["budgets"]["score_ref"]
    pairs = synthetic_pairs(s["pairs"], s["prompt"], s["response"], model.config.vocab_size,
                            specials_of(tok, model), state["seed"])
    state["pairs"] = pairs
    fp = train_bench.fingerprint(n)
    rows = train_bench.cache_rows(pairs, n, seed=state["seed"])
    kw = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tok.pad_token_id, batch_tokens=s["batch_tokens"])

    def score(chunk):
        requests = replay_requests(PairBatch(chunk, 0), fp)
        with torch.no_grad():
            terms = elbo_terms(model, requests, **kw)
        return terms, sum(int(r.masks.sum()) for r in requests)

    score(rows[:2])  # warm-up: kernels, allocator
    reset_peak(device)
    chunk_pairs = max(1, min(len(rows), 32))
    done, seconds, masked = 0, 0.0, 0
    finite = True
    deadline = time.perf_counter() + budget
    while done < len(rows) and time.perf_counter() < deadline:
        chunk = rows[done:done + chunk_pairs]
        (terms, m), dt = score_bench.timed(lambda chunk=chunk: score(chunk), str(device))
        finite &= all(bool(torch.isfinite(t).all()) for t in terms)
        done, seconds, masked = done + len(chunk), seconds + dt, masked + m
    scored = pairs[:done]
    mem = memory_peak(device)
    from stages.score_ref import ScoreRefConfig

    longest = s["prompt"][1] + s["response"][1]
    mem["plan"] = plan_record("score-ref", ScoreRefConfig(model=s["preset"], samples=n, dtype=s["dtype"],
                                                          batch_tokens=s["batch_tokens"], max_length=longest),
                              n, longest, s["prompt"][1], mem["peak_bytes"] if device.type == "cuda" else None)
    tokens = n * sum(2 * len(p) + len(c) + len(r) for _, p, c, r in scored)
    flops = score_bench.model_flops(model, as_items(scored), n, masked)
    tflops = flops / seconds / 1e12
    state["ours_seconds_per_pair"] = seconds / done
    results.section("score_ref", {
        "pairs_requested": len(pairs), "pairs_scored": done, "time_boxed": done < len(pairs),
        "samples": n, "batch_tokens": s["batch_tokens"], "chunk_pairs": chunk_pairs,
        "prompt_range": list(s["prompt"]), "response_range": list(s["response"]),
        "tokens": tokens, "masked_tokens": masked, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "pairs_per_s": done / seconds,
        "flops": flops, "tflops": tflops, "peak_tflops": state["peak_tflops"], "mfu": _mfu(tflops, state),
        "terms_finite": finite, **mem,
        "flop_count": "2 x non-embedding params x tokens + 4 x seq^2 x d_model x layers per sequence + "
                      "2 x d_model x vocab x masked positions",
    })


def section_sampler(results: Results, state: dict) -> None:
    from fast_sampling import compare, count_passes, token_lists

    from pipeline.sampling.sampler import generate

    s, device, model, tok = state["settings"], state["device"], state["model"], state["tokenizer"]
    cfg = s["sampler"]
    gen = torch.Generator().manual_seed(state["seed"])
    specials = specials_of(tok, model)
    prompts = []
    for _ in range(cfg["batch"]):
        ids = torch.randint(0, model.config.vocab_size, (cfg["prompt"],), generator=gen).tolist()
        prompts.append([t if t not in specials else 0 for t in ids])
    kw = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tok.pad_token_id, gen_length=cfg["gen_length"],
              block_length=cfg["block_length"], steps=cfg["steps"], device=device)
    generate(model, prompts[:1], **{**kw, "gen_length": cfg["block_length"], "steps": 1})  # warm-up
    passes = count_passes(model)
    try:
        rows = compare(lambda cache, threshold: token_lists(generate(model, prompts, kv_cache=cache, threshold=threshold,
                                                                     **kw)),
                       cfg["gen_length"], len(prompts), passes=passes, sync=lambda: sync(device))
    finally:
        for name in ("final_hidden", "hidden_with_kv"):
            model.__dict__.pop(name, None)  # the counting wrappers
    results.section("sampler", {**cfg, "dtype": s["dtype"], "rows": rows,
                                "greedy": True, "note": "random weights: accuracy not measured here"})


def section_faithful(results: Results, state: dict) -> None:
    s, device, model = state["settings"], state["device"], state["model"]
    n, budget = s["samples"], s["budgets"]["faithful"]
    pairs = state["pairs"]
    subset = pairs[:max(1, min(s["faithful_pairs"], len(pairs)))]
    items = as_items(subset)
    score_bench.baseline(model, items[:1], n, state["seed"] + 1)  # warm-up (its full-vocabulary logits)
    done, seconds = 0, 0.0
    deadline = time.perf_counter() + budget
    while done < len(items) and time.perf_counter() < deadline:
        _, dt = score_bench.timed(lambda done=done: score_bench.baseline(model, items[done:done + 1], n, state["seed"]),
                                  str(device))
        done, seconds = done + 1, seconds + dt
    measured = items[:done]
    # Ours on exactly the same pairs and n, for a same-pairs ratio.
    (_, masked), ours_s = score_bench.timed(
        lambda: score_bench.ours(model, measured, n, state["seed"], 0, s["batch_tokens"], 4096), str(device))
    tokens = n * sum(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for _, t in measured)
    flops = score_bench.model_flops(model, measured, n, tokens)  # head on every position
    total = results.data.get("score_ref", {}).get("pairs_scored") or len(pairs)
    results.section("faithful", {
        "pairs_measured": done, "extrapolated_to_pairs": total, "extrapolated": done < total,
        "seconds_measured": seconds, "seconds_extrapolated": seconds / done * total,
        "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
        "mfu": _mfu(flops / seconds / 1e12, state),
        "ours_seconds_same_pairs": ours_s,
        "speed_ratio_same_pairs": seconds / ours_s,
        "speed_ratio_extrapolated": (seconds / done * total) / (results.data.get("score_ref", {}).get("seconds")
                                                                or ours_s / done * total),
        "note": "faithful = LLaDA's per-pair procedure (bench/score.py: one response per call, n copies, "
                "full-vocabulary logits, no attention mask); ratio = faithful time / ours time",
    })


def _train_configs(K: int):
    return [("cached", "cached", 0), (f"cached_seqmb{K}", "cached", K),
            ("online", "online", 0), (f"online_seqmb{K}", "online", K)]


def _measure(results, name, state, ctx, optimizer, params, batch, configs, budget, extra=None):
    """Run each configuration: one warm-up step, then up to `steps` timed steps inside the time box."""
    device, steps = state["device"], state["settings"]["steps"]
    base_cfg = ctx.cfg
    section = {"configs": {}, **(extra or {})}
    results.section(name, {**section, "status": "running"})
    deadline = time.perf_counter() + budget
    planned = []
    for label, reference, K in configs:
        if time.perf_counter() > deadline:
            section["configs"][label] = {"skipped": "section time box reached"}
            continue
        ctx.cfg = dataclasses.replace(base_cfg, reference=reference, sequence_microbatch=K)
        train_bench.train_step(ctx, optimizer, params, batch)  # warm-up
        sync(device)
        reset_peak(device)
        times, losses = [], []
        for _ in range(steps):
            (stats, dt) = score_bench.timed(lambda: train_bench.train_step(ctx, optimizer, params, batch),
                                            str(device))
            times.append(dt)
            losses.append(float(stats.loss))
            if time.perf_counter() > deadline:
                break
        mem = memory_peak(device)
        planned.append((label, ctx.cfg, mem["peak_bytes"] if device.type == "cuda" else None))
        section["configs"][label] = {"reference": reference, "sequence_microbatch": K, "step_s": min(times),
                                     "step_s_all": times, "loss": losses, **mem,
                                     "peak_gib": mem["peak_bytes"] / GIB}
        results.section(name, {**section, "status": "running"})
    ctx.cfg = base_cfg
    # The plans are made after the time box, so planning never costs a measurement.
    prompt, response = state["settings"]["train_prompt"], state["settings"]["train_response"]
    for label, cfg, measured in planned:
        section["configs"][label]["plan"] = plan_record(
            "train", dataclasses.replace(cfg, model=state["settings"]["preset"]), state["settings"]["samples"],
            prompt + response, prompt, measured)
    results.section(name, section)
    return section


def _train_batch(state: dict):
    """One pair of train_prompt + train_response tokens with its cached reference terms (bare model)."""
    from pipeline.estimator.diffusion import BATCH_TOKENS
    from pipeline.estimator.replay import PairBatch

    s, model, tok = state["settings"], state["model"], state["tokenizer"]
    if "train_batch" not in state:
        pair = synthetic_pairs(1, (s["train_prompt"],) * 2, (s["train_response"],) * 2, model.config.vocab_size,
                               specials_of(tok, model), state["seed"] + 7)
        fp = train_bench.fingerprint(s["samples"])
        rows = train_bench.cache_rows(pair, s["samples"], seed=state["seed"])
        train_bench.fill_reference(model, rows, fp, mask_token_id=model.config.mask_token_id,
                                   pad_token_id=tok.pad_token_id, batch_tokens=BATCH_TOKENS)
        state["train_batch"] = (PairBatch(rows, 0), fp)
    return state["train_batch"]


def _train_config(state: dict, **kw):
    from pipeline.estimator.diffusion import BATCH_TOKENS
    from stages.train import TrainConfig

    s = state["settings"]
    bf16 = s["dtype"] == "bfloat16"
    return TrainConfig(lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], dtype=s["dtype"],
                       mixed_precision="bf16" if bf16 else "no", gradient_checkpointing=True, batch_size=1,
                       learning_rate=1e-5, batch_tokens=BATCH_TOKENS, tensorboard=False, progress=False, **kw)


def section_train(results: Results, state: dict) -> None:
    s = state["settings"]
    batch, fp = _train_batch(state)
    cfg = _train_config(state)
    ctx, optimizer, params = train_bench.make_trainer(cfg, state["model"], state["tokenizer"], fp)
    state["model"] = None  # now LoRA-wrapped; nothing later needs the bare model
    K = s["sequence_microbatch"]
    extra = {"lora_r": cfg.lora_r, "lora_targets": cfg.lora_targets, "dtype": cfg.dtype,
             "mixed_precision": cfg.mixed_precision, "gradient_checkpointing": True, "pairs_per_step": 1,
             "prompt_tokens": s["train_prompt"], "response_tokens": s["train_response"], "samples": s["samples"],
             "trainable_parameters": sum(p.numel() for p in params),
             "driver": "pipeline.trainer.dpo_checks.setup_policy + dpo_step.micro_step (TrainContext) + clip + AdamW per step"}
    section = _measure(results, "train", state, ctx, optimizer, params, batch, _train_configs(K),
                       s["budgets"]["train"], extra)
    del ctx, optimizer, params
    free_cuda()
    c = section["configs"]
    ref = {}
    for suffix in ("", f"_seqmb{K}"):
        cached, online = c.get("cached" + suffix, {}), c.get("online" + suffix, {})
        if "step_s" in cached and "step_s" in online:
            ref["sequence_microbatch" if suffix else "one_pass"] = {
                "cached_step_s": cached["step_s"], "online_step_s": online["step_s"],
                "step_time_ratio": cached["step_s"] / online["step_s"],
                "cached_peak_bytes": cached["peak_bytes"], "online_peak_bytes": online["peak_bytes"],
                "memory_ratio": cached["peak_bytes"] / online["peak_bytes"]}
    if state["device"].type != "cuda":
        ref["memory_note"] = "CPU mode: peaks are the process ru_maxrss, so the memory ratio is not per configuration"
    ref["settings"] = "LoRA: the online reference is the base model with adapters disabled, same masks"
    results.section("reference", ref)


def _train_run(cmd: list[str], out: Path, device: torch.device) -> dict:
    """One `train` subprocess; its metrics, final weights and the wall time."""
    import os
    import subprocess

    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {proc.stderr[-1500:]}")
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    return {"metrics": metrics, "weights": load_file(str(out / "final" / "model.safetensors")),
            "wall_s": time.perf_counter() - t0}


def section_fsdp(results: Results, state: dict) -> None:
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="fsdp-bench-"))
    try:
        _section_fsdp(results, state, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # our own temporary folder (caches, two runs)


def _section_fsdp(results: Results, state: dict, work: Path) -> None:
    import json

    import cache_memory

    f = state["settings"]["fsdp"]
    device = state["device"]
    manifest = cache_memory.real_manifest(work, model=f["preset"])
    shape = SimpleNamespace(prompt=f["prompt"], response=f["response"])
    cache = cache_memory.build_cache(work / "cache", f["pairs"], manifest, shape)
    common = ["train", str(cache), "--max-steps", str(f["steps"]), "--batch-size", "4", "--save-every", "2",
              "--learning-rate", "1e-3", "--warmup-ratio", "0", "--no-progress", "--no-tensorboard",
              # The cache's reference terms are synthetic (cache_memory.build_cache), so the start check
              # would rightly refuse them: this section compares FSDP with one process, not the start gap.
              "--gap-threshold", "0"]
    base = _train_run([sys.executable, "-m", "stages.cli", *common, "--out", str(work / "base"), "--device",
                       device.type], work / "base", device)
    config = REPO / "configs" / "accelerate" / ("fsdp.yaml" if device.type == "cuda" else "fsdp_cpu.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
              "1", "--mixed_precision", "no", "-m", "stages.cli", *common, "--out", str(work / "fsdp"),
              "--device", "auto"]
    fsdp = _train_run(launch, work / "fsdp", device)

    def step_s(metrics):
        tokens = 4 * 2 * manifest["fingerprint"]["samples"] * (f["prompt"] + f["response"])
        return sorted(tokens / m["tokens_per_second"] for m in metrics[1:])[len(metrics[1:]) // 2]

    ckpt = work / "fsdp" / "checkpoint-2"
    record = json.loads((ckpt / "lldm-dpo-state.json").read_text())  # the resume record (trainer_state.json: HF's)
    wa, wb = base["weights"], fsdp["weights"]
    results.section("fsdp", {
        "config": config.name, "preset": f["preset"], "processes": 1, "pairs": f["pairs"], "steps": f["steps"],
        "prompt_tokens": f["prompt"], "response_tokens": f["response"], "mixed_precision": "no",
        "loss_plain": [m["loss"] for m in base["metrics"]], "loss_fsdp": [m["loss"] for m in fsdp["metrics"]],
        "max_loss_difference": max(abs(a["loss"] - b["loss"]) for a, b in zip(base["metrics"], fsdp["metrics"])),
        "max_weight_difference": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
        "step_s_plain": step_s(base["metrics"]), "step_s_fsdp": step_s(fsdp["metrics"]),
        "peak_bytes_plain": max(m["peak_memory_bytes"] for m in base["metrics"]),
        "peak_bytes_fsdp": max(m["peak_memory_bytes"] for m in fsdp["metrics"]),
        "wall_s_plain": base["wall_s"], "wall_s_fsdp": fsdp["wall_s"],
        "checkpoint_sharded": bool(record.get("sharded")),
        "checkpoint_optimizer_shards": len(list((ckpt / "optimizer").glob("*.distcp"))),
        "checkpoint_is_model": (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file(),
    })


def quantize_blocks_4bit(model, compute_dtype) -> int:
    """Replace every block projection with a bitsandbytes NF4 Linear4bit (double-quantized), in place.

    What ``load_model(folder, load_in_4bit=True)`` gives (the head and embeddings stay
    unquantized), without writing 16 GB to disk and reading it back.
    """
    import bitsandbytes as bnb

    from pipeline.models import LORA_TARGET_MODULES

    pattern = re.compile(LORA_TARGET_MODULES)
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        kwargs = dict(requires_grad=False, compress_statistics=True, quant_type="nf4")
        try:
            weight = bnb.nn.Params4bit(lin.weight.data, module=q, **kwargs)
        except TypeError:  # older bitsandbytes: no module argument
            weight = bnb.nn.Params4bit(lin.weight.data, **kwargs)
        q.weight = weight.to(lin.weight.device)  # .to(cuda) quantizes
        if lin.bias is not None:
            q.bias = lin.bias
        setattr(parent, child, q)
        del lin, weight
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft reads it
    return len(names)


def section_train_4bit(results: Results, state: dict) -> None:
    from pipeline.models import build_preset

    s, device = state["settings"], state["device"]
    if device.type != "cuda":
        results.section("train_4bit", {"status": "skipped",
                                       "skipped": "CPU mode: this section measures CUDA (the 4-bit path on the "
                                                  "CPU: bench/quant.py, tests/stages/test_quant.py)"})
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        results.section("train_4bit", {"status": "skipped", "skipped": "bitsandbytes not installed"})
        return
    batch, fp = state["train_batch"]  # reference terms of the bf16 model: the cache a QLoRA run trains against
    free_cuda()
    # Whatever the bf16 sections left alive would count in this section's peak: record it.
    leftover = int(torch.cuda.memory_allocated(device))
    model = build_preset(s["preset"], device=str(device), dtype=s["dtype"])
    quantized = quantize_blocks_4bit(model, torch.bfloat16)
    free_cuda()
    cfg = _train_config(state, load_in_4bit=True)
    ctx, optimizer, params = train_bench.make_trainer(cfg, model, state["tokenizer"], fp)
    K = s["sequence_microbatch"]
    extra = {"quantized_linears": quantized, "quantization": "bitsandbytes NF4, double quant, bf16 compute; "
             "block projections only (head and embeddings unquantized; prepare_model_for_kbit_training "
             "upcasts them to float32)", "budget_bytes": BUDGET_15_GIB,
             "weights_allocated_bytes": int(torch.cuda.memory_allocated(device)),
             "allocated_before_build_bytes": leftover}
    section = _measure(results, "train_4bit", state, ctx, optimizer, params, batch,
                       [("cached", "cached", 0), (f"cached_seqmb{K}", "cached", K)], s["budgets"]["train_4bit"],
                       extra)
    for c in section["configs"].values():
        if "peak_bytes" in c:
            c["under_15_gib"] = c["peak_bytes"] < BUDGET_15_GIB
    section["any_under_15_gib"] = any(c.get("under_15_gib") for c in section["configs"].values())
    results.section("train_4bit", section)


# --- main --------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --mode gpu needs a CUDA device (none visible); use --mode cpu for the small-shape check")
    s = dict(SETTINGS[args.mode])
    for key in ("pairs", "samples", "batch_tokens", "faithful_pairs", "sequence_microbatch", "steps"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["budgets"] = {k: v * args.time_scale for k, v in s["budgets"].items()}
    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    dtype = score_bench.DTYPES[s["dtype"]]
    t0 = time.perf_counter()
    results = Results(args.out, {
        "mode": args.mode, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "complete": False,
    })
    peak, source = peak_tflops(device, args.peak_tflops, dtype)
    bnb_version = None
    try:
        import bitsandbytes

        bnb_version = getattr(bitsandbytes, "__version__", "unknown")
    except ImportError:
        pass
    results.section("environment", {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                           or "cpu"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "bitsandbytes": bnb_version or "bitsandbytes not installed",
        "peak_tflops": peak, "peak_source": source,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
    })
    state = {"settings": s, "device": device, "seed": args.seed, "peak_tflops": peak}
    if run_section(results, "build", section_build, state):
        run_section(results, "score_ref", section_score_ref, state)
        run_section(results, "sampler", section_sampler, state)
        if "pairs" in state:
            run_section(results, "faithful", section_faithful, state)
        run_section(results, "train", section_train, state)
        state["model"] = None
        free_cuda()
        if "train_batch" in state:
            run_section(results, "train_4bit", section_train_4bit, state)
        run_section(results, "fsdp", section_fsdp, state)
    results.data["total_seconds"] = time.perf_counter() - t0
    results.data["complete"] = not results.data.get("errors")
    results.save()
    print(f"wrote {results.path} ({results.data['total_seconds']:.0f} s; "
          f"{'complete' if results.data['complete'] else 'errors in: ' + ', '.join(results.data['errors'])})")
    return 0 if results.data["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
