"""Training step: cached reference (the cache's terms) vs online reference (a live reference model).

Both train the same policy on the same batch with the same masks: the masks are
replayed from the seeds a score-ref pass recorded (``pipeline.estimator.replay.replay_requests``),
and one optimizer step is ``pipeline.trainer.dpo_step.micro_step`` (forward, loss, backward)
plus clipping and AdamW, exactly as ``stages.train.run`` does it. Only
``TrainConfig.reference`` differs:

- cached: the reference terms come from the cache, the reference model is never built;
- online: full fine-tuning keeps a second (frozen) model and scores it on the batch's
  masks every step; LoRA scores the base model with the adapters switched off.

Each (mode, reference) configuration runs in a fresh subprocess so its peak
resident memory (``ru_maxrss``) is its own; the RSS after imports (Python, torch,
pairs) is read in the same process before any model exists and reported so the
ratio of the memory the training itself adds can be read off too. Configurations
are interleaved and repeated; the best step time (after a first warm-up step)
and the lowest peak of the repeats are kept.

Sweep cost: one score-ref pass (model build + no-grad scoring of the batch's
masks) plus 4 cached runs, against 4 online runs; a run is model setup plus
``--steps`` optimizer steps (hyperparameters such as learning rate or beta do not
change a run's cost, so one measured run per configuration stands for each of the 4).
Interpreter start-up is excluded from both sides.

Also the shared building blocks of bench/gpu.py (synthetic cache rows, reference
fill, a trainer built through ``pipeline.trainer.dpo_checks.setup_policy``).

CPU:  python bench/train.py            (tiny body, LLaDA's 126,464 vocabulary, as bench/score.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
REPO = BENCH.parent

SWEEP_RUNS = 4


# --- shared building blocks (also imported by bench/gpu.py) --------------------------


def fingerprint(samples: int, draws: int = 1) -> dict:
    """The manifest fields ``replay_requests`` reads, as ``lldm-dpo score-ref`` writes them (l_over_L)."""
    return {"samples": samples, "draws": draws, "scheme": "l_over_L", "eps": None}


def cache_rows(pairs, samples: int, seed: int = 0, draws: int = 1) -> list[dict]:
    """Cache rows (as ``ScoresCache.rows`` yields them) for ``pairs`` = [(pair_id, prompt, chosen, rejected)].

    Seeds and mask counts are what score-ref records; the reference terms are
    filled by ``fill_reference``.
    """
    from pipeline.estimator.diffusion import mask_seed, sample_masks

    rows = []
    for pid, prompt, chosen, rejected in pairs:
        row = {"pair_id": pid, "prompt_ids": list(prompt), "chosen_ids": list(chosen),
               "rejected_ids": list(rejected), "chosen_len": len(chosen), "rejected_len": len(rejected),
               "prompt_len": len(prompt)}
        for side, resp in (("chosen", chosen), ("rejected", rejected)):
            seeds = [mask_seed(seed, pid, side, d) for d in range(draws)]
            row[f"{side}_seeds"] = seeds
            row[f"{side}_mask_counts"] = [sample_masks(len(resp), samples, s).counts.tolist() for s in seeds]
        rows.append(row)
    return rows


def fill_reference(model, rows, fp, *, mask_token_id, pad_token_id, batch_tokens) -> None:
    """The reference's per-sample terms on the replayed masks (what score-ref caches), in place."""
    from pipeline.estimator.diffusion import elbo_terms
    from pipeline.estimator.replay import PairBatch, replay_requests

    for row in rows:
        row["ref_chosen_terms"], row["ref_rejected_terms"] = [], []
    for draw in range(fp["draws"]):
        requests = replay_requests(PairBatch(rows, draw), fp)
        with torch.no_grad():
            terms = elbo_terms(model, requests, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
                               batch_tokens=batch_tokens)
        for i, row in enumerate(rows):
            row["ref_chosen_terms"].append(terms[2 * i].cpu().tolist())
            row["ref_rejected_terms"].append(terms[2 * i + 1].cpu().tolist())


@contextlib.contextmanager
def prebuilt_loader(model, tokenizer):
    """Make ``setup_policy``'s ``load_model`` return an already-built model (a preset with LLaDA's
    vocabulary, or an 8B model quantized in place), so the rest of setup_policy (checkpointing,
    k-bit preparation, LoRA targets) runs unchanged."""
    import pipeline.models as models

    original = models.load_model
    models.load_model = lambda *args, **kwargs: (model, tokenizer)
    try:
        yield
    finally:
        models.load_model = original


def make_trainer(cfg, model, tokenizer, fp, ref_model=None):
    """(ctx, optimizer, params) as ``stages.train.run`` builds them for a single process."""
    from pipeline.trainer.accelerator import fresh_accelerator
    from pipeline.trainer.dpo_checks import setup_policy
    from pipeline.trainer.dpo_step import TrainContext
    from pipeline.trainer.optim import make_optimizer
    from pipeline.trainer.placement import Placement

    cpu = next(model.parameters()).device.type != "cuda"
    acc = fresh_accelerator(cfg.mixed_precision, cpu)
    torch.manual_seed(cfg.seed)  # as run(): LoRA's A matrices come from the global RNG
    with prebuilt_loader(model, tokenizer):
        policy, tok = setup_policy(cfg, "prebuilt", acc.device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = acc.prepare(make_optimizer(params, cfg))
    return TrainContext(cfg, Placement(acc, policy), tok, fp, ref_model), optimizer, params


def train_step(ctx, optimizer, params, batch, phases: dict | None = None) -> dict:
    """One optimizer step on one micro-batch, as ``stages.train.run`` does it (grad_accum 1); ``phases`` gets the
    optimizer's seconds (clipping, AdamW, zero_grad) under "optimizer"."""
    from pipeline.trainer.dpo_step import micro_step

    stats = micro_step(ctx, batch, 1.0, sync=True)
    t0 = time.perf_counter()
    clip = ctx.cfg.max_grad_norm if ctx.cfg.max_grad_norm > 0 else float("inf")
    ctx.placed.acc.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if phases is not None:
        phases["optimizer"] = phases.get("optimizer", 0.0) + time.perf_counter() - t0
    ctx.step += 1
    return stats


STEP_PHASES = ("forward and loss", "backward", "optimizer", "reference")
"""Where a step's seconds go: the policy's forward and the loss (the rest of the step), its backward, clipping
and AdamW, and the live reference's no-grad forward (online only)."""


@contextlib.contextmanager
def timed_step_phases(phases: dict):
    """Time dpo_step's backward and live-reference pass into ``phases`` (the module's own functions, wrapped)."""
    import pipeline.trainer.dpo_step as dpo_step

    originals = {"backward": dpo_step._backward, "reference": dpo_step._online_reference}

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return call

    dpo_step._backward = timed("backward", originals["backward"])
    dpo_step._online_reference = timed("reference", originals["reference"])
    try:
        yield
    finally:
        dpo_step._backward, dpo_step._online_reference = originals["backward"], originals["reference"]


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# --- one configuration in a fresh process ----------------------------------------------


def gsm8k_pairs(preset: str, count: int, min_len: int, max_len: int):
    import score as score_bench

    from pipeline.models import preset_tokenizer

    items = score_bench.load_pairs(preset_tokenizer(preset), count, min_len, max_len)
    if len(items) < count:
        sys.exit(f"error: only {len(items)} GSM8K pairs have both responses within {min_len}-{max_len} tokens")
    return [(pid, t.prompt_ids, t.chosen_ids, t.rejected_ids) for pid, t in items]


def score_worker(spec: dict) -> dict:
    """The score-ref side of a sweep: build the reference, score the batch's masks, write the rows."""
    import score as score_bench

    from pipeline.models import preset_tokenizer

    pairs = gsm8k_pairs(spec["preset"], spec["pairs"], spec["min_len"], spec["max_len"])
    t0 = time.perf_counter()
    model = score_bench.build_model(spec["preset"], spec["vocab"], "cpu", torch.float32, spec.get("body"))
    tok = preset_tokenizer(spec["preset"])
    fp = fingerprint(spec["samples"])
    rows = cache_rows(pairs, spec["samples"], seed=spec["seed"])
    fill_reference(model, rows, fp, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                   batch_tokens=spec["batch_tokens"])
    seconds = time.perf_counter() - t0
    Path(spec["rows"]).write_text(json.dumps(rows))
    return {"seconds": seconds}


def train_worker(spec: dict) -> dict:
    import score as score_bench

    from pipeline.estimator.replay import PairBatch
    from stages.train import TrainConfig

    rows = json.loads(Path(spec["rows"]).read_text())
    fp = fingerprint(spec["samples"])
    from pipeline.models import preset_tokenizer

    tokenizer = preset_tokenizer(spec["preset"])
    rss_base = rss_now()  # interpreter + torch + pairs; no model yet
    t0 = time.perf_counter()
    cfg = TrainConfig(reference=spec["reference"], lora_r=spec["lora_r"], batch_size=len(rows),
                      sequence_microbatch=spec["sequence_microbatch"], learning_rate=1e-5,
                      batch_tokens=spec["batch_tokens"], tensorboard=False, progress=False)
    torch.manual_seed(0)
    model = score_bench.build_model(spec["preset"], spec["vocab"], "cpu", torch.float32, spec.get("body"))
    ref_model = None
    if cfg.reference == "online" and cfg.lora_r == 0:
        # run() loads the cache's model a second time, frozen: same preset, same seed, same weights.
        ref_model = score_bench.build_model(spec["preset"], spec["vocab"], "cpu", torch.float32, spec.get("body"))
        ref_model.eval().requires_grad_(False)
    ctx, optimizer, params = make_trainer(cfg, model, tokenizer, fp, ref_model)
    setup = time.perf_counter() - t0
    batch = PairBatch(rows, draw=0)
    times, cpu, losses, phases = [], [], [], []
    for _ in range(spec["steps"]):
        step_phases: dict = {}
        t, c = time.perf_counter(), time.process_time()
        with timed_step_phases(step_phases):
            stats = train_step(ctx, optimizer, params, batch, step_phases)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        losses.append(float(stats.loss))
        step_phases["forward and loss"] = times[-1] - sum(step_phases.values())
        phases.append({k: step_phases.get(k, 0.0) for k in STEP_PHASES})
    return {"setup_s": setup, "step_s": times, "cpu_s": cpu, "run_s": setup + sum(times), "loss": losses,
            "phases": phases,
            "rss_base": rss_base, "rss_peak": rss_peak(),
            "trainable": sum(p.numel() for p in params), "params": sum(p.numel() for p in model.parameters())}


def run_worker(kind: str, spec: dict, exact_rss: bool = False) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is the JSON result.

    ``exact_rss``: a fixed mmap threshold turns off glibc's adaptive one, so every block
    of 128 KiB or more is mapped on allocation and unmapped on free: RSS then follows
    live memory and ru_maxrss is the peak of what was live, not of heap reuse. It slows
    allocation, so those processes are used for memory only, never for time.
    """
    env = dict(os.environ)
    if exact_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {kind} worker failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main ------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model body preset (as bench/score.py)")
    p.add_argument("--vocab-size", type=int, default=126464,
                   help="vocabulary (default LLaDA's 126464, as bench/score.py; 0 keeps the preset's own)")
    p.add_argument("--body", default=None,
                   help="the model's body instead of the preset's, as LLaDAConfig keys: e.g. "
                        "'d_model=512,n_layers=8,n_heads=8,n_kv_heads=8,mlp_hidden_size=1536' (27M parameters with "
                        "--vocab-size 0: a shape where the model, not torch, is most of the process)")
    p.add_argument("--pairs", type=int, default=1, help="GSM8K pairs per batch (micro-batch size)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is a warm-up)")
    p.add_argument("--samples", type=int, default=4, help="Monte Carlo samples n per response")
    p.add_argument("--min-len", type=int, default=64, help="shortest response (tokens) to keep")
    p.add_argument("--max-len", type=int, default=128, help="longest response (tokens) to keep")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--sequence-microbatch", type=int, default=0,
                   help="TrainConfig.sequence_microbatch K (0 = one pass; K: activations follow K, not 2n)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA configurations")
    p.add_argument("--quick", action="store_true", help="smallest settings (n 2, 2 steps, 1 repeat)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.steps, args.repeats, args.max_len = 2, 2, 1, min(args.max_len, 96)
    if args.steps < 1 or args.repeats < 1 or args.pairs < 1 or args.samples < 1:
        p.error("--steps, --repeats, --pairs and --samples must be >= 1")
    return args


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def measure(args) -> tuple[dict, list[dict], dict, dict, tuple, tuple]:
    """Score once, then every configuration's timed runs (interleaved) and one 1-step memory run each, each in a
    fresh process: (score-ref worker's result, the cache rows, timed results, memory results, load before, after)."""
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        body = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.body.split(","))) if args.body else None
        spec = {"preset": args.preset, "vocab": args.vocab_size, "body": body, "pairs": args.pairs,
                "samples": args.samples,
                "min_len": args.min_len, "max_len": args.max_len, "batch_tokens": args.batch_tokens,
                "seed": args.seed, "rows": str(Path(tmp) / "rows.json"), "steps": args.steps,
                "sequence_microbatch": args.sequence_microbatch}
        scored = run_worker("score", spec)
        rows = json.loads(Path(spec["rows"]).read_text())
        results: dict = {c: [] for c in CONFIGS}
        memory: dict = {}
        for _ in range(args.repeats):
            for mode, ref in CONFIGS:  # interleaved: load drift hits every configuration alike
                results[(mode, ref)].append(run_worker("train", {**spec, "reference": ref,
                                                                 "lora_r": 0 if mode == "full" else args.lora_r}))
        for mode, ref in CONFIGS:
            # One step holds every buffer a run ever holds (AdamW's state appears at the first step).
            memory[(mode, ref)] = run_worker("train", {**spec, "reference": ref, "steps": 1,
                                                       "lora_r": 0 if mode == "full" else args.lora_r},
                                             exact_rss=True)
    load1 = os.getloadavg()
    return scored, rows, results, memory, load0, load1


CONFIGS = [(mode, ref) for mode in ("full", "lora") for ref in ("cached", "online")]


def best(results: dict, mode: str, ref: str, key: str) -> float:
    """The best value of ``key`` over a configuration's repeats (step and CPU times: after the warm-up step)."""
    rs = results[(mode, ref)]
    if key in ("step_s", "cpu_s"):
        return min(min(r[key][1:] or r[key]) for r in rs)
    return min(r[key] for r in rs)


def best_step_phases(results: dict, mode: str, ref: str) -> dict:
    """The phases of a configuration's fastest step after the warm-up (over its repeats)."""
    runs = results[(mode, ref)]
    _, run, i = min((t, k, i) for k, r in enumerate(runs) for i, t in enumerate(r["step_s"]) if i > 0
                    or len(r["step_s"]) == 1)
    return runs[run]["phases"][i]


def setting_lines(args, rows: list[dict], results: dict, load0: tuple, load1: tuple) -> list[str]:
    """What was measured: the model, the batch, how times and memory were taken."""
    resp = [len(r[f"{s}_ids"]) for r in rows for s in ("chosen", "rejected")]
    tokens = args.samples * sum(2 * r["prompt_len"] + r["chosen_len"] + r["rejected_len"] for r in rows)
    first = results[("full", "cached")][0]
    return [
        f"model: preset {args.preset} body{f' with {args.body}' if args.body else ''}, vocab "
        f"{args.vocab_size or 'preset'}, {first['params']:,} parameters, float32 on cpu "
        f"({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; load average "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end)",
        f"batch: {len(rows)} GSM8K pair(s), n = {args.samples}, prompt {rows[0]['prompt_len']} tokens, responses "
        f"{min(resp)}-{max(resp)}; {tokens} tokens per step per model pass; LoRA r {args.lora_r} on LLaDA's "
        f"projections; sequence_microbatch {args.sequence_microbatch or 'off (one pass)'}; AdamW, clip 1.0; "
        f"{args.steps} steps per run (first = warm-up), best of {args.repeats} "
        f"interleaved repeats, each configuration in a fresh process",
        "time: best step (after the warm-up step) over the repeats, default allocator; memory: peak RSS "
        "(ru_maxrss) of one more 1-step process per configuration with glibc's mmap threshold fixed at 128 KiB "
        "(freed tensors leave RSS, so the peak is of live memory); 'added' = peak minus that process's RSS "
        f"after imports, before any model exists (about {_mib(first['rss_base'])})",
    ]


def ratio_lines(args, scored: dict, results: dict, memory: dict) -> list[str]:
    """Cached against online per mode: step time, CPU time, peak memory, step-1 loss; then a sweep's total."""
    out = []
    for mode in ("full", "lora"):
        tc, to = best(results, mode, "cached", "step_s"), best(results, mode, "online", "step_s")
        cc, co = best(results, mode, "cached", "cpu_s"), best(results, mode, "online", "cpu_s")
        mc, mo = memory[(mode, "cached")], memory[(mode, "online")]
        pc, po = mc["rss_peak"], mo["rss_peak"]
        nc, no = pc - mc["rss_base"], po - mo["rss_base"]
        lc = results[(mode, "cached")][0]["loss"][0]
        lo = results[(mode, "online")][0]["loss"][0]
        goal = "  (issue 34's goals: <= 0.60 time, <= 0.60 memory)" if mode == "full" else ""
        name = "full fine-tuning" if mode == "full" else f"LoRA r {args.lora_r}"
        bc, bo = best_step_phases(results, mode, "cached"), best_step_phases(results, mode, "online")
        out += [
            f"{name}: trainable {results[(mode, 'cached')][0]['trainable']:,} parameters{goal}",
            f"  step time  cached {tc:.3f} s  online {to:.3f} s  ratio cached/online {tc / to:.2f};  process CPU "
            f"time per step cached {cc:.3f} s  online {co:.3f} s  ratio {cc / co:.2f}",
            f"  peak RSS   cached {_mib(pc)}  online {_mib(po)}  ratio {pc / po:.2f};  added by training: "
            f"cached {_mib(nc)}  online {_mib(no)}  ratio {nc / no:.2f}",
            f"  step-1 loss cached {lc:.6f}  online {lo:.6f} (same batch, same masks: equal up to float noise)",
            "  the best steps, by phase: " + ";  ".join(
                f"{ref} " + ", ".join(f"{k} {v:.3f} s" for k, v in b.items() if ref == "online" or k != "reference")
                for ref, b in (("cached", bc), ("online", bo))),
            f"  the live reference's forward is {bo['reference'] / sum(bo.values()):.0%} of the online step: all "
            "that the cache can remove from it (x0.60 would need 40%)",
        ]
    out.append(f"sweep of {SWEEP_RUNS} runs ({args.steps} steps each; setup + steps, interpreter start excluded):")
    for mode in ("full", "lora"):
        rc, ro = best(results, mode, "cached", "run_s"), best(results, mode, "online", "run_s")
        cached = scored["seconds"] + SWEEP_RUNS * rc
        online = SWEEP_RUNS * ro
        out.append(f"  {mode:4s}: 1 score-ref ({scored['seconds']:.2f} s) + {SWEEP_RUNS} cached runs "
                   f"({rc:.2f} s each) = {cached:.2f} s  vs  {SWEEP_RUNS} online runs ({ro:.2f} s each) = "
                   f"{online:.2f} s;  ratio {cached / online:.2f}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        torch.manual_seed(0)
        result = score_worker(spec) if kind == "score" else train_worker(spec)
        print(json.dumps(result))
        return 0

    wall0 = time.perf_counter()
    scored, rows, results, memory, load0, load1 = measure(args)
    lines = setting_lines(args, rows, results, load0, load1)
    out = ratio_lines(args, scored, results, memory) + [f"bench wall time {time.perf_counter() - wall0:.0f} s"]
    print("\n".join(lines + out), flush=True)

    if not args.no_record:
        from results import record

        record("train.py", list(argv if argv is not None else sys.argv[1:]), lines + out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
