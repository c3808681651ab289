"""``lldm-dpo sft``: masked-diffusion supervised fine-tuning, LLaDA's objective (pipeline/sft.py).

Each sequence draws t ~ U(eps, 1] and masks its response tokens independently with probability t (the
prompt never); the loss is the cross-entropy of the masked tokens divided by t, summed and divided by the
response length, averaged over the step's sequences. The LM head runs on the masked rows only. Masks are
seeded by (seed, example, epoch), the data order by (seed, epoch): a run is deterministic and a resumed
run is the uninterrupted one, bit for bit. Numerics, LoRA, checkpoints (models), metrics.parquet,
trackers and data parallelism are train's (pipeline/training.py, checkpoint.py, metrics.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pipeline.errors import ConfigError, UserError
from pipeline.layout import CONFIG_FILE, FINAL_DIR, METRICS_FILE, run_outputs_in
from pipeline.models import LORA_TARGET_NAMES
from pipeline.stagecli import stage_command
from pipeline.training import StepBar, check_optim, check_scheduler

RANGES = {"learning_rate": "(0, inf)", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_epsilon": "[0, inf)",
          "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "epochs": "[1, inf)", "max_steps": "[0, inf)",
          "warmup_ratio": "[0, 1)", "warmup_steps": "[0, inf)", "max_grad_norm": "[0, inf)", "lora_r": "[0, inf)", "lora_alpha": "[1, inf)",
          "lora_dropout": "[0, 1)", "save_every": "[0, inf)", "keep_checkpoints": "[0, inf)", "seed": "[0, inf)",
          "log_every": "[1, inf)", "max_length": "[2, inf)", "mask_eps": "[0, 1)", "pad_response_to": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


RESUME_FREE = ("data", "model", "out", "resume", "resume_from_checkpoint", "overwrite", "progress", "save_every",
               "keep_checkpoints", "log_every", "report_to", "tensorboard", "device", "gradient_checkpointing",
               "trust_remote_code", "run_name", "push_to_hub", "hub_model_id", "hub_private_repo")
"""Settings a resume may change (speed, memory, logging, where things are; the data goes by its sha256 in the
checkpoint's layout): every other one must equal the checkpoint's recorded config.yaml."""


@dataclass
class SFTConfig:
    data: Path = Path("data/sft.jsonl")
    """Training data: JSONL/JSON/Parquet/datasets folder in TRL's prompt-completion (prompt, completion),
    conversational (messages, or prompt and completion as message lists) or text format, or a pairs .arrow
    file from lldm-dpo ingest (its chosen side)."""
    model: str = "tiny"
    """Starting model: a folder, a LoRA adapter folder, a hub id, or a preset name (tiny, micro, ...): a preset
    is a randomly initialised model seeded by --seed (training from scratch)."""
    out: Path = Path("runs/sft")
    """Run folder: checkpoints, final model, metrics.parquet, TensorBoard events, config.yaml."""
    chat_template: Optional[bool] = None
    """Render prompts with the tokenizer's chat template (default: when it has one), as score-ref, eval and
    generate do."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer examples lose prompt tokens from the left (score-ref's rule)."""
    pad_response_to: int = 0
    """Pad every response with EOS to this many tokens, the padding counted as response (LLaDA's released SFT:
    the model learns to fill a fixed-length generation's tail with EOS); 0 = no padding."""
    mask_eps: float = 1e-3
    """The timestep floor eps: t ~ U(eps, 1] per sequence (LLaDA's 1e-3)."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    optim: str = "adamw_torch"
    """TrainingArguments' optim: adamw_torch (torch's AdamW, fused kernel where it runs), adamw_torch_fused,
    adafactor, sgd, adagrad, rmsprop, or bitsandbytes' adamw_8bit, adamw_bnb_8bit, paged_adamw_8bit,
    paged_adamw_32bit (where bitsandbytes is installed)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    run_name: Optional[str] = None
    """The run's name in trackers (TrainingArguments' run_name); default: the run folder's name."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    epochs: int = 1
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derived from epochs."""
    warmup_ratio: float = 0.0
    """Share of steps with linear warmup."""
    warmup_steps: float = 0
    """Warmup steps (TrainingArguments' warmup_steps: >= 1 a count, in (0, 1) a share of the steps); when > 0 it
    wins over warmup_ratio. The learning rate rises from 0 to its peak over them, as in transformers."""
    scheduler: str = "cosine"
    """transformers' lr_scheduler_type: linear, cosine, cosine_with_restarts, polynomial, constant,
    constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay
    (transformers.get_scheduler; constant has no warmup, as there)."""
    lr_scheduler_kwargs: Optional[dict] = None
    """Extra arguments of the scheduler (TrainingArguments' lr_scheduler_kwargs), e.g. {min_lr_rate: 0.1} for
    cosine_with_min_lr, {num_cycles: 2} for cosine_with_restarts."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    dtype: str = "float32"
    """dtype the weights are loaded in (float32, bfloat16, float16)."""
    mixed_precision: str = "no"
    """accelerate's mixed precision: no, bf16 or fp16 (fp16 needs CUDA)."""
    load_in_4bit: bool = False
    """Quantize the frozen base to 4-bit NF4 with bitsandbytes (CUDA only; needs lora_r > 0)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora_r: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: str = ",".join(LORA_TARGET_NAMES)
    """Comma-separated module names to adapt (LLaDA's attention and MLP projections by default; never the head)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only the final model)."""
    keep_checkpoints: int = 2
    """How many newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in the run folder."""
    resume_from_checkpoint: Optional[Union[bool, str]] = None
    """transformers' resume_from_checkpoint: true continues from the newest checkpoint-N in the run folder (as
    --resume); a path continues from that checkpoint-N folder (its recorded settings and data fingerprint must
    be this run's)."""
    overwrite: bool = False
    """Start afresh in a run folder that holds an earlier run (only the files runs wrote are removed)."""
    seed: int = 0
    """Seed of the data order, the masks and (for a preset) the initial weights."""
    log_every: int = 10
    """Log metrics every N steps (and the last step)."""
    device: str = "auto"
    """cpu, cuda or auto (accelerate's device)."""
    tensorboard: bool = True
    """Write TensorBoard events under RUN_DIR/tensorboard (false drops tensorboard from report_to)."""
    report_to: str = "tensorboard"
    """Comma-separated trackers the metrics also go to (tensorboard, wandb, mlflow, ...: any accelerate knows and
    this environment has installed), 'all' or 'none'; metrics.parquet is always written."""
    trust_remote_code: bool = False
    """Allow a non-LLaDA checkpoint to run its own modeling code."""
    progress: bool = True
    """A progress bar with ETA on stderr when it is a terminal (tqdm's, as transformers shows it), and one
    metrics line per logged step; --no-progress (TrainingArguments' disable_tqdm: true) turns both off."""
    push_to_hub: bool = False
    """Upload the final model folder (with its README.md model card) to the Hugging Face Hub at the end of the
    run (huggingface_hub's create_repo + upload_folder); needs hub_model_id."""
    hub_model_id: Optional[str] = None
    """The Hub repository push_to_hub uploads to (name or user/name)."""
    hub_token: Optional[str] = field(default=None, repr=False, metadata={"secret": True})
    """Hub token for push_to_hub (default: HF_TOKEN or the saved login, as huggingface_hub finds them); never
    written to config.yaml, checkpoints, the model card or trackers."""
    hub_private_repo: Optional[bool] = None
    """Create the Hub repository private (default: the Hub's, public)."""

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        from pipeline.config import check_device, check_ranges, require_choice

        check_ranges(self, RANGES)
        check_device(self.device)
        from pipeline.hub import check_hub_args
        from pipeline.resume import resume_setting

        self.resume, self.resume_from_checkpoint = resume_setting(self.resume, self.resume_from_checkpoint)
        check_hub_args(self.push_to_hub, self.hub_model_id)
        check_scheduler(self.scheduler, self.lr_scheduler_kwargs)
        check_optim(self.optim)
        from pipeline.devices import DTYPE_NAMES, PRECISION_NAMES

        require_choice("mixed_precision", self.mixed_precision, PRECISION_NAMES)
        require_choice("dtype", self.dtype, DTYPE_NAMES)
        if self.load_in_4bit and self.lora_r == 0:
            raise ConfigError("load_in_4bit trains adapters only: set lora_r > 0")
        if self.pad_response_to > self.max_length:
            raise ConfigError(f"pad_response_to ({self.pad_response_to}) exceeds max_length ({self.max_length})")
        from pipeline.trackers import parse_report_to

        parse_report_to(self.report_to)


@dataclass
class SFTResult:
    steps: int
    epochs_seen: float
    examples: int
    truncated: int
    final_loss: float
    """The mean loss of the last logged step."""
    num_tokens: int
    """Tokens (prompt + response) the run trained on."""
    seconds: float
    out: str
    final_model: str
    metrics: str
    resumed_from: Optional[int] = None


def load_start(cfg: SFTConfig, device):
    """(model, tokenizer, base name): a preset name is a fresh model seeded by cfg.seed, anything else loads."""
    from pipeline.models.presets import PRESETS

    if cfg.model in PRESETS and not Path(cfg.model).is_dir():
        if cfg.lora_r > 0 or cfg.load_in_4bit:
            raise UserError(f"--model {cfg.model}: a preset name is a randomly initialised model (training from "
                            "scratch); LoRA adapts a trained one: pass a model folder (lldm-dpo init-model writes one)")
        from pipeline.models import build_preset, preset_tokenizer

        return build_preset(cfg.model, device=device, dtype=cfg.dtype, seed=cfg.seed), preset_tokenizer(cfg.model)
    from pipeline.numerics import Numerics, load

    return load(cfg.model, Numerics(cfg.dtype, cfg.mixed_precision, cfg.load_in_4bit), device,
                trust_remote_code=cfg.trust_remote_code)


@dataclass
class _Loop:
    """What every micro-step needs."""

    cfg: SFTConfig
    model: Any
    wrapped: Any
    tokenizer: Any
    acc: Any
    examples: list
    steps_per_epoch: int
    _order: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        """The epoch's data order (train's: a pure function of seed and epoch), computed once per epoch."""
        from pipeline.training import epoch_order

        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), self.cfg.seed, epoch))
        return self._order[1]

    @property
    def scorer(self):
        return self.model if self.wrapped is None else self.wrapped


def _micro_step(loop: _Loop, step: int, micro: int, scale_rows: int) -> tuple[float, int, int]:
    """Forward and backward of one micro-batch; returns (sum of sequence losses, sequences, tokens)."""
    import contextlib

    from pipeline.sft import collate, draw_masks, sft_loss
    from pipeline.training import micro_batch_rows

    cfg, acc = loop.cfg, loop.acc
    world = acc.num_processes
    epoch, rows = micro_batch_rows(range(len(loop.examples)), cfg, step, micro, loop.steps_per_epoch, world,
                                   acc.process_index, order=loop.order(step // loop.steps_per_epoch))
    last = micro == cfg.grad_accum - 1
    sync = contextlib.nullcontext() if loop.wrapped is None or last else acc.no_sync(loop.wrapped)
    with sync:
        if not rows:  # the epoch's end left this process nothing: a zero-weighted pass joins the others' sync
            probe = torch.full((1, 2), int(loop.tokenizer.pad_token_id), device=acc.device)
            with acc.autocast():
                zero = loop.scorer(probe, None, torch.tensor([[0, 1]], device=acc.device), probe[0, :1], 1).sum()
            if world > 1 and float(acc.reduce(torch.zeros(1, device=acc.device), reduction="sum")) > 0:
                raise UserError(f"step {step + 1}: loss is not finite on another process; stopping with it")
            acc.backward(0.0 * zero)
            return 0.0, 0, 0
        batch = collate([(loop.examples[i].prompt_ids, loop.examples[i].response_ids) for i in rows],
                        loop.tokenizer.pad_token_id)
        t, mask = draw_masks(batch, rows, seed=cfg.seed, epoch=epoch, eps=cfg.mask_eps)
        with acc.autocast():
            losses = sft_loss(loop.scorer, batch, t, mask, loop.tokenizer.mask_token_id)
        total = losses.sum()
        bad = not bool(torch.isfinite(total))
        if world > 1:  # every process learns of it, so none waits for the others forever
            flag = acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum")
            if float(flag) > 0 and not bad:
                raise UserError(f"step {step + 1}: loss is not finite on another process; stopping with it")
        if bad:
            raise UserError(f"step {step + 1}: loss is not finite ({float(total)}) on "
                            f"{', '.join(loop.examples[i].source for i in rows[:3])}; nothing was saved for this "
                            "step (try a lower --learning-rate or --mixed-precision no)")
        # Each sequence weighs the same in a step: DDP averages over processes, hence the factor world.
        acc.backward(total * (world / scale_rows))
    return float(total.detach()), len(rows), int(batch.attention_mask.sum())


def run(cfg: SFTConfig) -> SFTResult:
    from pipeline.atomic import check_writable, sweep_stale, write_text_atomic
    from pipeline.checkpoint import load_checkpoint, read_state, save_checkpoint, save_model_dir
    from pipeline.config import config_to_yaml
    from pipeline.metrics import MetricsWriter
    from pipeline.prompts import resolve_chat_template
    from pipeline.sftdata import examples_digest, load_examples
    from pipeline.trackers import TENSORBOARD, accelerator_trackers, parse_report_to, resolve_trackers
    from pipeline.training import (
        adapt_policy,
        check_resume_layout,
        check_run_outputs,
        fresh_accelerator,
        make_optimizer,
        make_scheduler,
        peak_memory_bytes,
        remove_run_outputs,
        reset_peak_memory,
        step_pair_count,
    )

    start_time = time.perf_counter()
    check_writable(cfg.out, "run folder")
    for folder in (cfg.out, cfg.out / "checkpoints"):
        sweep_stale(folder)
    if not cfg.resume:  # refuse before the model loads
        earlier = run_outputs_in(cfg.out)
        if earlier and not cfg.overwrite:
            raise UserError(f"{cfg.out}: run folder already holds a run ({', '.join(earlier)}); pass --resume to "
                            "continue it, --overwrite to start afresh, or choose another --out")
        check_run_outputs(cfg.out)
    requested = parse_report_to(cfg.report_to)
    if not cfg.tensorboard:
        requested = [n for n in requested if n != TENSORBOARD]
    trackers = resolve_trackers(requested)
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs CUDA (loss scaling on CPU is not supported); use bf16 or no")
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    acc = fresh_accelerator(cfg.mixed_precision, cpu, log_with=accelerator_trackers(trackers), run_dir=cfg.out,
                            command="sft")
    if acc.distributed_type.name == "FSDP":
        raise UserError("sft under FSDP is not supported yet; use data parallel (accelerate launch --multi_gpu)")
    world = acc.num_processes

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_start(cfg, acc.device)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise UserError(f"model '{cfg.model}': tokenizer needs mask and pad tokens")
    longest = getattr(model.config, "max_sequence_length", None)
    if longest is not None and cfg.max_length > longest:
        raise UserError(f"--max-length {cfg.max_length} exceeds the model's max_sequence_length {longest}")
    chat = resolve_chat_template(tokenizer, cfg.chat_template)
    examples = load_examples(cfg.data, tokenizer, max_length=cfg.max_length, chat_template=chat,
                             pad_to=cfg.pad_response_to)
    model = adapt_policy(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = max(1, math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum * world)))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)  # stepped by hand: once per optimizer step
    wrapped = None
    if world > 1:
        from pipeline.models.scoring import MaskedRowScorer

        wrapped, optimizer = acc.prepare(MaskedRowScorer(model), optimizer)
        params = [p for p in wrapped.parameters() if p.requires_grad]
    else:
        optimizer = acc.prepare(optimizer)
    loop = _Loop(cfg, model, wrapped, tokenizer, acc, examples, steps_per_epoch)

    layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": world,
              "total_steps": total_steps, "seed": cfg.seed, "lora_r": cfg.lora_r, "optim": cfg.optim, "mask_eps": cfg.mask_eps,
              "data_sha256": examples_digest(examples)}
    resumed_from, start_step, num_tokens = None, 0, 0
    if cfg.resume:
        from pipeline.config import config_to_dict
        from pipeline.resume import check_resume_source

        ckpt = check_resume_source(cfg.out, cfg.resume_from_checkpoint, config_to_dict(cfg), RESUME_FREE)
        saved = read_state(ckpt)
        check_resume_layout(ckpt, saved, layout)
        state = load_checkpoint(ckpt, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                                accelerator=acc)
        start_step = resumed_from = int(state["step"])
        num_tokens = int(state.get("num_tokens", 0))
    elif acc.is_main_process:
        remove_run_outputs(cfg.out)
    writer, sinks = None, []
    if acc.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.out / CONFIG_FILE, config_to_yaml(cfg), record=True)
        if accelerator_trackers(trackers):
            from pipeline.metrics import TB_TAGS
            from pipeline.trackers import AccelerateSink

            sinks.append(AccelerateSink(acc, dataclasses.asdict(cfg), TB_TAGS,
                                        run_name=cfg.run_name or cfg.out.name))
    bar = StepBar(total_steps, start_step, cfg.progress and acc.is_main_process, "sft")
    if acc.is_main_process:
        writer = MetricsWriter(cfg.out, tensorboard=TENSORBOARD in trackers, resume_step=resumed_from,
                               console=bar.stream or cfg.progress, sinks=tuple(sinks))

    last: dict[str, float] = {}
    reset_peak_memory(acc.device)
    window = [0.0, 0, 0, time.perf_counter()]  # loss sum, sequences, tokens since the last log; its start
    try:
        for step in range(start_step, total_steps):
            rows = max(1, step_pair_count(len(examples), cfg, step, steps_per_epoch, world))
            for micro in range(cfg.grad_accum):
                loss_sum, n, tokens = _micro_step(loop, step, micro, rows)
                window[0] += loss_sum
                window[1] += n
                window[2] += tokens
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(params, clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.step()
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
            saving = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps
            if logged or saving:
                # The loss is the mean over the window's sequences; reduced over processes at log time only.
                sums = torch.tensor(window[:3], dtype=torch.float64, device=acc.device)
                if world > 1:
                    sums = acc.reduce(sums, reduction="sum")
                loss_sum, n, tokens = sums.tolist()
                num_tokens += int(tokens)
                seconds = time.perf_counter() - window[3]
                window = [0.0, 0, 0, time.perf_counter()]
                last = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "loss": loss_sum / max(n, 1),
                        "learning_rate": lr, "grad_norm": float(grad_norm), "num_tokens": num_tokens,
                        "tokens_per_second": tokens / max(seconds, 1e-9),
                        "peak_memory_bytes": peak_memory_bytes(acc.device)}
                if writer is not None:
                    writer.log(last)
            if saving:
                acc.wait_for_everyone()
                if writer is not None:
                    writer.flush()
                save_checkpoint(cfg.out, step + 1, model=model, wrapped=wrapped, optimizer=optimizer,
                                scheduler=scheduler, tokenizer=tokenizer, accelerator=acc, base_name=cfg.model,
                                state={"epoch": (step + 1) / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                                       "layout": layout, "num_tokens": num_tokens}, keep=cfg.keep_checkpoints,
                                cfg=cfg)
                window[3] = time.perf_counter()  # the save is not training time
        acc.wait_for_everyone()
        if writer is not None:
            writer.flush()
        save_model_dir(cfg.out / FINAL_DIR, model, tokenizer, acc, base_name=cfg.model,
                       card=sft_card(cfg, layout["data_sha256"], len(examples), last))
        if acc.is_main_process:
            from pipeline.hub import push_folder

            push_folder(cfg.out / FINAL_DIR, cfg, stage="sft")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        for sink in sinks:
            sink.close()
    return SFTResult(
        steps=total_steps, epochs_seen=total_steps / steps_per_epoch, examples=len(examples),
        truncated=sum(ex.truncated for ex in examples), final_loss=float(last.get("loss", float("nan"))),
        num_tokens=num_tokens, seconds=time.perf_counter() - start_time, out=str(cfg.out),
        final_model=str(cfg.out / FINAL_DIR), metrics=str(cfg.out / METRICS_FILE), resumed_from=resumed_from,
    )


def sft_card(cfg: SFTConfig, data_sha256: str, n_examples: int, last: dict[str, Any]) -> str:
    from pipeline.config import config_to_dict
    from pipeline.model_card import model_card

    data = {"training data": str(cfg.data), "examples sha256": data_sha256, "examples": n_examples}
    return model_card(stage="sft", base_model=cfg.model, lora=cfg.lora_r > 0, data=data,
                      settings=config_to_dict(cfg), metrics=last)


def _sft_action(cfg: SFTConfig, as_json: bool) -> None:
    from accelerate import PartialState

    from pipeline.stagecli import print_summary, summary_dict

    result = run(cfg)
    if PartialState().is_main_process:
        print_summary("sft", summary_dict(result), as_json)


command = stage_command(SFTConfig, _sft_action, positional={"data": True},
                        doc="Supervised fine-tuning with LLaDA's masked-diffusion objective.")
