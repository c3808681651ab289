"""Train the shipped ``skill`` preset: a small LLaDA that gets some short arithmetic word problems right.

Seeded and deterministic (same seed, same thread count: same losses and the
same stopping step). The data is the project's own generator
(``scripts/make_skill_data.py``): SFT on the ``sft`` split's worked solutions,
the stopping rule on the ``dev`` split, and a final report on the held-out
benchmark (``data/benchmarks/skill_heldout.jsonl``), which neither training
nor the stopping rule ever reads.

Masked-diffusion SFT as LLaDA's guidelines give it: per sequence t ~ U(eps, 1],
each response token (the assistant turn, ``<|eot_id|>`` and the EOS padding up
to ``--response-length``) masked with probability t, cross-entropy on the
masked positions divided by t, summed and divided by the response length; the
prompt is never masked. AdamW, linear warmup then cosine decay, clip 1.0.

Every ``--eval-every`` steps the model answers the dev questions greedily with
the project's sampler (semi-autoregressive blocks, one token per step); the
run stops at the first evaluation whose dev accuracy is at least
``--stop-at`` (or at ``--max-steps``), saves the model (bfloat16 safetensors)
and prints its held-out accuracy, wall time and the command.

The loop is this script's own (the same loss as ``lldm-dpo sft``, which
arrived after this model had started training; porting the script to it is
left to do). The shipped ``pipeline/models/weights/skill.safetensors`` is the
final model of this command (1.18M parameters, 900 steps, 1,360 s of training on a shared
2-core CPU; dev accuracy by step in ``weights/skill.json``; it stopped at
``--max-steps``, the dev accuracy never reached ``--stop-at``)::

    OMP_NUM_THREADS=1 python scripts/train_skilled_model.py --out runs/skill-model --keep-checkpoints

Its held-out greedy accuracy, measured by ``lldm-dpo run``'s eval (dual KV
cache): 108/1000.

``--record`` writes the first steps' losses and the checkpoint's sha256 to
``pipeline/models/weights/skill.json`` (the test of this script replays the
first steps against it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from make_skill_data import generate  # noqa: E402

from pipeline.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402
from pipeline.models.presets import preset_config  # noqa: E402
from pipeline.models.tokenizer import build_tokenizer  # noqa: E402
from pipeline.prompts import encode_prompt, encode_text, render_response  # noqa: E402

GEN = dict(gen_length=24, block_length=4, steps=24)
"""Greedy decoding of the stopping rule and of the embedded default's eval."""


def model_config() -> LLaDAConfig:
    """The ``skill`` preset's architecture (pipeline/models/presets.py), the one source of it."""
    return preset_config("skill")


def encode_examples(tokenizer, rows, response_length: int):
    """(prompt id lists, response Long[N, response_length]): response = assistant turn + EOS padding."""
    prompts, responses = [], []
    eos = tokenizer.eos_token_id
    for r in rows:
        prompts.append(encode_prompt(tokenizer, r["question"], chat_template=True))
        resp = encode_text(tokenizer, render_response(tokenizer, r["question"], r["solution"], chat_template=True))
        if len(resp) > response_length:
            raise ValueError(f"response of {len(resp)} tokens exceeds --response-length {response_length}")
        responses.append(resp + [eos] * (response_length - len(resp)))
    return prompts, torch.tensor(responses, dtype=torch.long)


def sft_loss(model, prompt_ids, prompt_attn, response, mask_id: int, gen: torch.Generator, eps: float = 1e-3):
    """LLaDA's SFT loss for one batch (see the module docstring)."""
    b, length = response.shape
    t = eps + (1 - eps) * torch.rand(b, generator=gen)
    masked = torch.rand(b, length, generator=gen) < t[:, None]
    noisy = torch.where(masked, torch.full_like(response, mask_id), response)
    ids = torch.cat([prompt_ids, noisy], 1)
    attn = torch.cat([prompt_attn, torch.ones_like(response)], 1)
    logits = model(ids, attention_mask=attn).logits[:, prompt_ids.shape[1]:].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), response.reshape(-1), reduction="none").view(b, length)
    return ((ce * masked / t[:, None]).sum(1) / length).mean()


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def greedy_accuracy(model, tokenizer, rows, batch_size: int = 64) -> tuple[int, list[dict]]:
    from pipeline.answers import is_correct
    from pipeline.completion import complete

    model.eval()
    done = complete(model, tokenizer, [r["question"] for r in rows], chat_template=True, batch_size=batch_size, **GEN)
    model.train()
    graded = [{"question": r["question"], "completion": d["completion"],
               "correct": bool(is_correct(d["completion"], str(r["answer"])))} for r, d in zip(rows, done)]
    return sum(g["correct"] for g in graded), graded


def save(model, out: Path) -> str:
    """bfloat16 safetensors + config in ``out``; returns the weights' sha256."""
    out.mkdir(parents=True, exist_ok=True)
    # A bfloat16 copy: the training weights stay float32 (a checkpoint never perturbs the run).
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    build_tokenizer(layout="compact").save_pretrained(out)  # a complete model folder: --model DIR loads it
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def train(args, log=print) -> dict:
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(layout="compact")
    splits = generate(args.data_seed, sft=args.sft_examples)
    prompts, responses = encode_examples(tokenizer, splits["sft"], args.response_length)
    model = LLaDAModelLM(model_config()).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; {len(prompts)} SFT examples; dev {len(splits['dev'])}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    order_gen = torch.Generator().manual_seed(args.seed + 1)
    mask_id, pad_id = model.config.mask_token_id, tokenizer.eos_token_id
    from pipeline.sampler import left_pad

    losses, history, order, pos = [], [], torch.randperm(len(prompts), generator=order_gen), 0
    start = time.perf_counter()
    step, stopped = 0, "max_steps"
    while step < args.max_steps:
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(prompts), generator=order_gen), 0
        idx = order[pos : pos + args.batch_size].tolist()
        pos += args.batch_size
        p_ids, p_attn = left_pad([prompts[i] for i in idx], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.learning_rate, args.warmup_steps, args.max_steps)
        loss = sft_loss(model, p_ids, p_attn, responses[idx], mask_id, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(round(loss.item(), 6))
        if step % args.log_every == 0:
            recent = losses[-args.log_every:]
            log(f"step {step}: loss {sum(recent) / len(recent):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({time.perf_counter() - start:.0f}s)")
        if args.eval_every and step % args.eval_every == 0:
            right, graded = greedy_accuracy(model, tokenizer, splits["dev"])
            history.append({"step": step, "dev_correct": right, "dev_total": len(graded),
                            "seconds": round(time.perf_counter() - start, 1)})
            log(f"step {step}: dev accuracy {right}/{len(graded)} ({time.perf_counter() - start:.0f}s); "
                f"e.g. {graded[0]['completion']!r}")
            if args.out and args.keep_checkpoints:
                save(model, Path(args.out) / "checkpoints" / f"step-{step}")
            if right >= args.stop_at * len(graded):
                stopped = "stop_at"
                break
    seconds = time.perf_counter() - start
    result = {"steps": step, "stopped": stopped, "train_seconds": round(seconds, 1), "first_losses": losses[:5],
              "parameters": n_params, "history": history}
    if args.out:
        result["sha256"] = save(model, Path(args.out))
        right, _ = greedy_accuracy(model.to(torch.bfloat16).to(torch.float32), tokenizer, splits["heldout"])
        result["heldout_correct"], result["heldout_total"] = right, len(splits["heldout"])
        log(f"held-out accuracy {right}/{len(splits['heldout'])}")
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the final model (none: train only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=20261201)
    ap.add_argument("--sft-examples", type=int, default=20000)
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=900)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--stop-at", type=float, default=0.3, help="stop at the first dev accuracy >= this")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="save the model at every dev evaluation too")
    ap.add_argument("--record", action="store_true", help="write pipeline/models/weights/skill.json")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = train(args, log=lambda m: print(m, flush=True))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = "python scripts/train_skilled_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(json.dumps(result, indent=1))
    if args.record and args.out:
        record = REPO / "pipeline" / "models" / "weights" / "skill.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall time {result['wall_seconds']:.0f}s; command: {result['command']}")


if __name__ == "__main__":
    main()
