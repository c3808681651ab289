"""QLoRA on the CPU: a 4-bit NF4 base against a bfloat16 base, LoRA step time and memory, and the plan's
peak against the measured one.

The model is a LLaDA folder written here (random weights, the tiny tokenizer: vocabulary 512, so the block
projections hold nearly all the weights, as in an 8B model), loaded as ``lldm-dpo train`` loads it
(``pipeline.trainer.dpo_checks.setup_policy``: a 4-bit load quantizes the block projections with bitsandbytes, then peft's
k-bit preparation, checkpointing, LoRA). One optimizer step is ``pipeline.trainer.dpo_step.micro_step`` plus clipping
and AdamW on one synthetic pair, as ``train`` runs it.

- time: each base in fresh processes (default allocator), interleaved, the best step after a warm-up step;
- memory: fresh processes with glibc's mmap threshold fixed at 128 KiB (freed blocks leave RSS, so RSS
  follows live memory); the peak resident set (VmHWM) is reset after the first step (which creates AdamW's
  states) and read after the second, a steady step; "measured" = that peak minus the RSS after imports,
  before any model exists;
- plan: ``lldm-dpo plan train`` of the same settings (fake tensors), tracked peak plus the stated allocator
  slack (the CUDA context it adds for a card is left out on the CPU), and the weights it plans against the
  bytes the loaded model holds (pipeline/models/quant.py: weight_bytes).

CPU:  python bench/quant.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPE = dict(d_model=768, n_heads=12, n_kv_heads=12, n_layers=4, mlp_hidden_size=2048)


def write_model(folder: Path) -> Path:
    from pipeline.models.llada import LLaDAConfig, LLaDAModelLM
    from pipeline.models.presets import preset_config, preset_tokenizer

    tiny = preset_config("tiny").to_dict()
    keep = {k: tiny[k] for k in ("vocab_size", "embedding_size", "eos_token_id", "pad_token_id", "mask_token_id")}
    config = LLaDAConfig(**SHAPE, **keep, max_sequence_length=1024)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LLaDAModelLM(config)
    model.save_pretrained(folder)
    preset_tokenizer("tiny").save_pretrained(folder)
    return folder


def train_config(spec: dict):
    from pipeline.estimator.diffusion import BATCH_TOKENS
    from stages.train import TrainConfig

    return TrainConfig(model=spec["model"], lora_r=16, lora_alpha=32, dtype="bfloat16", mixed_precision="no",
                       load_in_4bit=spec["load_in_4bit"], gradient_checkpointing=spec["checkpointing"],
                       sequence_microbatch=spec["seqmb"], batch_size=1, batch_tokens=BATCH_TOKENS, learning_rate=1e-4,
                       tensorboard=False, progress=False)


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+)", fh.read()).group(1)) * 1024


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    import bitsandbytes  # noqa: F401 - imported before the baseline, as peft imports it in every run
    import peft  # noqa: F401

    from pipeline.estimator.replay import PairBatch
    from pipeline.models.numerics import Numerics
    from pipeline.models.quant import weight_bytes
    from pipeline.plan.trace import plain_token, synthetic_rows
    from pipeline.trainer.accelerator import fresh_accelerator
    from pipeline.trainer.dpo_checks import setup_policy
    from pipeline.trainer.dpo_step import TrainContext, micro_step
    from pipeline.trainer.optim import make_optimizer
    from pipeline.trainer.placement import Placement

    cfg = train_config(spec)
    base = _rss()
    acc = fresh_accelerator("no", True)
    torch.manual_seed(0)
    policy, tok = setup_policy(cfg, spec["model"], acc.device, Numerics("bfloat16", "no", spec["load_in_4bit"]))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = acc.prepare(make_optimizer(params, cfg))
    fp = {"samples": spec["samples"], "draws": 1, "scheme": "l_over_L", "eps": None}
    ctx = TrainContext(cfg, Placement(acc, policy), tok, fp, None)
    rows = synthetic_rows(1, spec["prompt"], spec["length"] - spec["prompt"], spec["samples"],
                          plain_token(policy.config))
    batch = PairBatch(rows, 0)
    times, peaks = [], []
    for step in range(spec["steps"]):
        if step == 1:
            before = _rss()  # the model, adapters, AdamW's states and whatever else the first step left
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM: the peak of the steady steps from here
        t = time.perf_counter()
        micro_step(ctx, batch, 1.0, sync=True)
        acc.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.step += 1
        times.append(time.perf_counter() - t)
        peaks.append(_hwm())
    held = weight_bytes(policy)
    return {"step_s": times, "rss_base": base, "peak": peaks[-1], "weights": held, "before_step": before,
            "trainable": sum(p.numel() * p.element_size() for p in params)}


def run_worker(spec: dict, exact_rss: bool) -> dict:
    env = dict(os.environ)
    if exact_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=REPO, capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: worker failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_of(spec: dict) -> dict:
    from pipeline.plan import Shape, make_plan
    from pipeline.plan.memory import GIB, context_bytes

    cfg, shape = train_config(spec), Shape(spec["samples"], spec["length"], spec["prompt"])
    plan = make_plan("train", cfg, shape, 16 * GIB, "16 GiB")
    c = plan.components
    held = c["weights"] + c["adapters"] + c["optimizer_states"]
    return {"planned": plan.total - context_bytes(), "tracked": plan.tracked_peak,
            "weights": c["weights"] + c["adapters"], "transient": plan.total - context_bytes() - held}


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - t) / 1e9


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--length", type=int, default=128, help="prompt + response tokens of the pair")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps per timed process (the first is a warm-up)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from pipeline.models.quant import require_bitsandbytes

    require_bitsandbytes("cpu")
    import bitsandbytes

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model(Path(tmp) / "model"))
        common = dict(model=model, samples=args.samples, length=args.length, prompt=args.prompt, seqmb=0,
                      checkpointing=True)
        timing = {True: [], False: []}
        for _ in range(args.repeats):  # --repeats 0: memory and plan only  # interleaved: both bases see the same machine load
            for q in (False, True):
                timing[q].append(min(run_worker({**common, "load_in_4bit": q, "steps": args.steps},
                                                False)["step_s"][1:]))
        memory = {q: run_worker({**common, "load_in_4bit": q, "steps": 2}, True) for q in (False, True)}
        configs = [("checkpointing", dict(checkpointing=True, seqmb=0)),
                   ("checkpointing + --sequence-microbatch 2", dict(checkpointing=True, seqmb=2)),
                   ("no checkpointing", dict(checkpointing=False, seqmb=0))]
        planned = []
        for name, kw in configs:
            spec = {**common, **kw, "load_in_4bit": True, "steps": 2}
            measured = memory[True] if kw == dict(checkpointing=True, seqmb=0) else run_worker(spec, True)
            planned.append((name, plan_of(spec), measured))
    gflops_end = matmul_gflops()
    lines = [
        "$ python bench/quant.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv)),
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}; fp32 matmul {gflops:.1f} GFLOP/s at start, {gflops_end:.1f} at end; "
        f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        f"model: LLaDA d_model {SHAPE['d_model']}, {SHAPE['n_layers']} blocks, MLP {SHAPE['mlp_hidden_size']}, "
        f"vocab 512 (random weights); LoRA r 16 on every block projection; one pair, n = {args.samples}, "
        f"{args.length} tokens ({args.prompt} prompt); bfloat16 weights / compute; AdamW",
        "4-bit NF4 (bitsandbytes, double quant, bf16 compute) vs bf16 base, gradient checkpointing:",
    ]
    mq, mb = (memory[q]["peak"] - memory[q]["rss_base"] for q in (True, False))
    if args.repeats:
        tq, tb = min(timing[True]), min(timing[False])
        lines.append(f"  step time   bf16 {tb:.3f} s  4-bit {tq:.3f} s  ratio 4-bit/bf16 {tq / tb:.2f}  "
                     f"(best step after a warm-up, {args.repeats} interleaved processes each)")
    lines += [
        f"  weights     bf16 {_mib(memory[False]['weights'])}  4-bit {_mib(memory[True]['weights'])}  "
        f"ratio {memory[True]['weights'] / memory[False]['weights']:.2f}",
        f"  step peak   bf16 {_mib(mb)}  4-bit {_mib(mq)}  ratio {mq / mb:.2f}  (peak RSS of a steady step "
        "minus RSS after imports)",
        "plan (lldm-dpo plan train: tracked + 5% slack, no CUDA context) vs measured, 4-bit base:",
    ]
    for name, plan, measured in planned:
        got = measured["peak"] - measured["rss_base"]
        step = measured["peak"] - measured["before_step"]
        lines.append(f"  {name:42s} plan {_mib(plan['planned'])}  measured {_mib(got)}  ratio plan/measured "
                     f"{plan['planned'] / got:.3f};  weights + adapters planned {plan['weights']:,} B, loaded "
                     f"{measured['weights']:,} B")
        lines.append(f"  {'':42s} the step's own: plan {_mib(plan['transient'])} above weights, adapters and "
                     f"AdamW states, measured {_mib(step)} above the RSS before the step, ratio "
                     f"{plan['transient'] / step:.3f}; RSS before the step minus after imports "
                     f"{_mib(measured['before_step'] - measured['rss_base'])}")
    lines.append(f"bench wall time {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
