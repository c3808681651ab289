"""Train the shipped ``skill`` preset with ``lldm-dpo sft``: a small LLaDA that gets some short arithmetic right.

Seeded and deterministic (same seed, same thread count: same losses, the same
checkpoint chosen). The data is the project's own generator
(``scripts/make_skill_data.py``): SFT on the ``sft`` split's worked solutions,
the stopping rule on the ``dev`` split, and a final report on the held-out
benchmark (``data/benchmarks/skill_heldout.jsonl``), which neither training nor
the stopping rule ever reads.

The steps:

1. a randomly initialised model of the ``skill`` architecture
   (pipeline/models/presets.py), seeded, is written as a model folder
   (``save_pretrained`` + the compact tokenizer): the SFT stage loads it through
   the path a real checkpoint takes;
2. the ``sft`` split is written as TRL prompt-completion JSONL;
3. ``lldm-dpo sft`` (``stages.sft.run``) trains it: LLaDA's masked-diffusion SFT
   (t ~ U(1e-3, 1] per sequence, the prompt never masked, CE/t over the masked
   response tokens divided by the response length; responses padded with EOS to
   ``--response-length`` so the model learns to stop), AdamW, warmup then cosine
   to 10% of the peak rate, clip 1.0, a checkpoint (a model folder) every
   ``--save-every`` steps;
4. the stopping rule: every checkpoint, in step order, answers the dev
   questions greedily with the embedded default's eval settings; the first whose
   dev accuracy is at least ``--stop-at`` is the model (if none reaches it, the
   best one). Choosing a checkpoint afterwards is the same as stopping there:
   the checkpoints of one run do not depend on its length (the learning-rate
   schedule is fixed by ``--max-steps`` before training starts);
5. that checkpoint is written in bfloat16 to ``--out`` and its held-out
   accuracy printed, with the wall time and the command.

The shipped ``pipeline/models/weights/skill.safetensors`` is the model this
command chose (its record, ``weights/skill.json``, holds the dev accuracy of
every checkpoint, the chosen step, the first losses and the sha256)::

    OMP_NUM_THREADS=1 python scripts/train_skilled_model.py --out runs/skill-model --record

``--record`` writes that record (the test of this script replays the first
steps against it).

``--family skill-hard --init-from skill`` trains on the harder family of
``make_skill_data.py`` starting from the shipped model (a warm start) instead of
a seeded random one: the model of bench/RESULTS.md, "Harder templates".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from make_skill_data import FAMILIES, generate, write_jsonl  # noqa: E402

from pipeline.models.llada import LLaDAModelLM  # noqa: E402
from pipeline.models.presets import preset_config  # noqa: E402
from pipeline.models.tokenizer import build_tokenizer  # noqa: E402

GEN = dict(gen_length=24, block_length=4, steps=24, kv_cache="dual")
"""Greedy decoding of the stopping rule: the embedded default's eval settings (stages/run.yaml)."""

RECORD = REPO / "pipeline" / "models" / "weights" / "skill.json"


def write_init_model(folder: Path, seed: int, init_from: str | None = None) -> int:
    """The initial model as a model folder: a seeded random model of the ``skill`` architecture, or ``init_from``
    (a preset name or a model folder, in float32: a warm start); returns its parameter count."""
    if init_from:
        from pipeline.models import load_model

        model, tokenizer = load_model(init_from)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LLaDAModelLM(preset_config("skill"))
        tokenizer = build_tokenizer(layout="compact")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_sft_data(path: Path, rows: list[dict]) -> None:
    """The SFT split as TRL's prompt-completion JSONL (the worked solution is the completion)."""
    write_jsonl(path, [{"prompt": r["question"], "completion": r["solution"]} for r in rows])


def sft_config(args, data: Path, init: Path, run_dir: Path):
    from stages.sft import SFTConfig

    return SFTConfig(
        data=data, model=str(init), out=run_dir, chat_template=True, max_length=128, pad_response_to=args.response_length,
        learning_rate=args.learning_rate, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98,
        batch_size=args.batch_size, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
        scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, max_grad_norm=1.0,
        save_every=args.save_every, keep_checkpoints=max(1, args.max_steps // max(1, args.save_every)) + 1,
        seed=args.seed, log_every=args.log_every, device="cpu", report_to="none", tensorboard=False,
        progress=False, run_name="skill-model",
    )


def greedy_correct(model, tokenizer, rows, batch_size: int = 64) -> int:
    from pipeline.grading.answers import is_correct
    from pipeline.sampling.completion import complete

    model.eval()
    done = complete(model, tokenizer, [r["question"] for r in rows], chat_template=True, batch_size=batch_size,
                    **GEN)
    return sum(bool(is_correct(d["completion"], str(r["answer"]))) for r, d in zip(rows, done))


def load_bf16_rounded(folder: Path):
    """The model as it will ship: weights rounded to bfloat16, computed in float32 (as the preset loads)."""
    from pipeline.models import load_model

    model, tokenizer = load_model(str(folder))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model.eval(), tokenizer


def save_bf16(model, tokenizer, out: Path) -> str:
    """bfloat16 safetensors + config + tokenizer in ``out``; returns the weights' sha256."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def first_losses(run_dir: Path, n: int = 5) -> list[float]:
    import pyarrow.parquet as pq

    from pipeline.core.paths import METRICS_FILE

    table = pq.read_table(run_dir / METRICS_FILE, columns=["step", "loss"]).to_pylist()
    return [round(r["loss"], 6) for r in sorted(table, key=lambda r: r["step"])[:n]]


def choose(history: list[dict], stop_at: float) -> dict:
    """The stopping rule: the first checkpoint with dev accuracy >= stop_at, else the best (earliest on ties)."""
    for h in history:
        if h["dev_correct"] >= stop_at * h["dev_total"]:
            return {**h, "stopped": "stop_at"}
    best = max(history, key=lambda h: (h["dev_correct"], -h["step"]))
    return {**best, "stopped": "best_dev"}


def train(args, log=print) -> dict:
    from pipeline.core.paths import FINAL_DIR
    from pipeline.trainer.checkpoint import list_checkpoints
    from stages.sft import run as sft_run

    splits = generate(args.data_seed, sft=args.sft_examples, family=args.family)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    init, data, run_dir = work / "init", work / "sft.jsonl", work / "sft-run"
    if args.stopped_run:
        # an sft run of this command stopped before --max-steps (time): its checkpoints are the full run's
        # (the schedule is fixed by --max-steps), so the stopping rule can choose among them
        if not list_checkpoints(run_dir):
            raise SystemExit(f"--stopped-run: {run_dir} has no checkpoints")
        n_params = sum(p.numel() for p in load_bf16_rounded(init)[0].parameters())
        finished = (run_dir / FINAL_DIR).is_dir()
        steps = args.max_steps if finished else max(int(p.name.rsplit("-", 1)[-1]) for p in list_checkpoints(run_dir))
        train_seconds = None
        log(f"sft: stopped run, checkpoints up to step {steps} of {args.max_steps}")
    else:
        n_params = write_init_model(init, args.seed, args.init_from)
        write_sft_data(data, splits["sft"])
        log(f"model: {n_params:,} parameters; {len(splits['sft'])} SFT examples; dev {len(splits['dev'])}")
        start = time.perf_counter()
        result = sft_run(sft_config(args, data, init, run_dir))
        steps, train_seconds = result.steps, round(time.perf_counter() - start, 1)
        log(f"sft: {result.steps} steps in {train_seconds:.0f}s, final loss {result.final_loss:.4f}")
    out = {"parameters": n_params, "steps": steps, "max_steps": args.max_steps, "train_seconds": train_seconds,
           "first_losses": first_losses(run_dir)}
    if not args.eval_every_checkpoint:
        return out
    folders = [(int(p.name.rsplit("-", 1)[-1]), p) for p in list_checkpoints(run_dir)]
    if (run_dir / FINAL_DIR).is_dir():
        folders.append((steps, run_dir / FINAL_DIR))
    history = []
    for step, folder in folders:
        model, tokenizer = load_bf16_rounded(folder)
        right = greedy_correct(model, tokenizer, splits["dev"])
        history.append({"step": step, "dev_correct": right, "dev_total": len(splits["dev"]), "folder": str(folder)})
        log(f"step {step}: dev accuracy {right}/{len(splits['dev'])}")
    chosen = choose(history, args.stop_at)
    out.update(history=[{k: h[k] for k in ("step", "dev_correct", "dev_total")} for h in history],
               chosen_step=chosen["step"], stopped=chosen["stopped"])
    if args.out:
        model, tokenizer = load_bf16_rounded(Path(chosen["folder"]))
        out["sha256"] = save_bf16(model, tokenizer, Path(args.out))
        out["size_bytes"] = (Path(args.out) / "model.safetensors").stat().st_size
        right = greedy_correct(model, tokenizer, splits["heldout"])
        out["heldout_correct"], out["heldout_total"] = right, len(splits["heldout"])
        log(f"chosen step {chosen['step']} ({chosen['stopped']}); held-out accuracy {right}/{len(splits['heldout'])}")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the chosen model (none: train only)")
    ap.add_argument("--work", type=Path, default=Path("runs/skill-train"),
                    help="folder for the initial model, the SFT data and the sft run (its checkpoints)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=20261201)
    ap.add_argument("--sft-examples", type=int, default=20000)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="skill",
                    help="the template family of make_skill_data.py")
    ap.add_argument("--init-from", default=None,
                    help="start from this model (a preset name such as skill, or a model folder) instead of a "
                         "seeded random one")
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--stop-at", type=float, default=0.3, help="choose the first checkpoint with dev accuracy >= this")
    ap.add_argument("--log-every", type=int, default=1, help="1: every step's loss in metrics.parquet")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    ap.add_argument("--no-eval", dest="eval_every_checkpoint", action="store_false",
                    help="train only (no dev evaluation, no choice)")
    ap.add_argument("--record", action="store_true", help="write pipeline/models/weights/skill.json")
    ap.add_argument("--stopped-run", action="store_true",
                    help="do not train: choose among the checkpoints of this command's sft run in --work, stopped "
                         "before --max-steps (they are the full run's checkpoints: the schedule is fixed up front)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = train(args, log=lambda m: print(m, flush=True))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    argv = sys.argv[1:] if argv is None else argv
    result["command"] = "python scripts/train_skilled_model.py " + " ".join(shlex.quote(a) for a in argv)
    print(json.dumps(result, indent=1))
    if args.record and args.out:
        RECORD.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall time {result['wall_seconds']:.0f}s; command: {result['command']}")


if __name__ == "__main__":
    main()
