"""``lldm-dpo train``: DPO against the reference-score cache, one model in memory.

Recipe shape: ``setup`` (cache, policy, optimizer), ``train`` (the loop),
``save`` (checkpoints and the final model). Each batch replays the masks the
cache recorded (draw = epoch mod draws) on the policy, so policy and reference
terms share their noise (VRPO's antithetic sampling) and the reference model
is never loaded (unless ``--reference online``, the baseline).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pipeline.cache import describe_difference, fingerprint_differences, open_cache
from pipeline.devices import DTYPE_NAMES, PRECISION_NAMES
from pipeline.errors import ConfigError, UserError
from pipeline.layout import CONFIG_FILE, FINAL_DIR, METRICS_FILE, run_outputs_in
from pipeline.losses import (
    LOSS_TYPES,
    dpo_loss,
    preference_delta,
    reward_accuracy,
    sequence_weights,
    sft_loss,
    validate_loss_args,
)
from pipeline.models import LORA_TARGET_NAMES
from pipeline.numerics import Numerics
from pipeline.replay import PairBatch, cache_part_paths, replay_requests  # noqa: F401  (PairBatch: the batch type)
from pipeline.stagecli import stage_command
from pipeline.training import (  # noqa: F401  (shared with sft; importable from here as before)
    StepBar,
    _micro_batch_span,
    adapt_policy,
    check_optim,
    check_resume_layout,
    check_run_outputs,
    check_scheduler,
    epoch_order,
    fresh_accelerator,
    make_optimizer,
    make_scheduler,
    micro_batch_rows,
    peak_memory_bytes,
    remove_run_outputs,
    reset_peak_memory,
    step_pair_count,
)

PRECISIONS = PRECISION_NAMES  # (pipeline.devices' names)


RESUME_FREE = ("scores", "model", "out", "resume", "overwrite", "progress", "plan", "save_every", "keep_checkpoints",
               "log_every", "report_to", "tensorboard", "device", "batch_tokens", "sequence_microbatch",
               "gradient_checkpointing", "trust_remote_code", "eval_every", "save_best", "gap_threshold",
               "allow_different_init", "allow_numerics_mismatch", "reuse_masks", "run_name",
               "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_private_repo")
"""Settings a resume may change (speed, memory, logging, where things are): every other one shapes the run and
must equal the recorded config.yaml (the cache goes by its fingerprint digest in the checkpoint's layout)."""

RANGES = {"beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "sft_weight": "[0, inf)", "learning_rate": "(0, inf)",
          "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)",
          "adam_beta2": "[0, 1)", "adam_epsilon": "[0, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "epochs": "[1, inf)",
          "max_steps": "[0, inf)", "warmup_ratio": "[0, 1)", "warmup_steps": "[0, inf)", "max_grad_norm": "[0, inf)", "lora_r": "[0, inf)",
          "lora_alpha": "[1, inf)", "lora_dropout": "[0, 1)", "sequence_microbatch": "[0, inf)",
          "batch_tokens": "[1, inf)", "save_every": "[0, inf)", "keep_checkpoints": "[0, inf)", "seed": "[0, inf)",
          "log_every": "[1, inf)", "gap_threshold": "[0, inf)", "max_length": "[1, inf)",
          "eval_every": "[0, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class TrainConfig:
    scores: Path = Path("cache/ref-scores")
    """Reference-score cache folder written by ``lldm-dpo score-ref``."""
    model: Optional[str] = None
    """The policy's starting point; default: the model the cache was scored with."""
    out: Path = Path("runs/dpo")
    """Run folder: checkpoints, final model, metrics.parquet, TensorBoard events, config.yaml."""
    allow_different_init: bool = False
    """Accept a starting model other than the cache's reference model."""
    loss: str = "sigmoid"
    """Loss: sigmoid, ipo, hinge or robust, optionally with sft, comma-separated (TRL's loss_type list), e.g. sigmoid,sft."""
    loss_weights: Optional[list[float]] = None
    """Weight of each loss named in `loss`, in order (TRL's loss_weights); default 1.0 each."""
    beta: float = 0.1
    """DPO temperature beta."""
    label_smoothing: float = 0.0
    """Label noise rate for sigmoid (conservative DPO) and robust losses."""
    sft_weight: float = 0.0
    """Weight of an SFT term (chosen response's per-token negative ELBO), as TRL's rpo_alpha; adds to an sft loss's weight."""
    learning_rate: float = 1e-5
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
    batch_size: int = 4
    """Pairs per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    epochs: int = 1
    """Passes over the training pairs (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derived from epochs."""
    warmup_ratio: float = 0.1
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
    mixed_precision: Optional[str] = None
    """accelerate's mixed precision: no, bf16 or fp16 (fp16 uses loss scaling and needs CUDA). Default: the cache's."""
    dtype: Optional[str] = None
    """dtype the policy's weights are loaded in (float32, bfloat16, float16; LoRA keeps adapters in float32).
    Default: the cache's, so the policy reproduces the cached reference terms."""
    allow_numerics_mismatch: bool = False
    """Accept a dtype, mixed precision or 4-bit setting other than the cache's (the policy then starts off the
    cached reference: see gap_threshold)."""
    gap_threshold: float = 0.05
    """Start check: when the policy starts from the cache's model, step 1 compares its ELBOs with the cached ones
    on the same masks (metric ref/gap_max, nats) and stops before the first optimizer step if beta * gap exceeds
    this (0 = no check)."""
    reuse_masks: bool = False
    """Accept more epochs than the cache has mask draws (epoch e replays draw e mod draws; a warning, and the
    metric masks/reused = 1 on those steps). Without it such a run is refused: rescore with --draws."""
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
    load_in_4bit: Optional[bool] = None
    """Quantize the frozen base to 4-bit NF4 with bitsandbytes (CPU or CUDA; needs lora_r > 0). Default: the cache's."""
    sequence_microbatch: int = 0
    """Backpropagate this many sequences at a time after a no-grad pass (0 = one pass); memory follows K, not n."""
    reference: str = "cached"
    """cached (the cache's terms) or online (a live reference scored on the same masks: the baseline)."""
    batch_tokens: int = 16384
    """Token budget of one forward pass."""
    max_length: Optional[int] = None
    """Longest prompt + response (TRL's max_length). Truncation happens in score-ref: when set, it must equal the cache's."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in the run folder."""
    resume_from_checkpoint: Optional[Union[bool, str]] = None
    """transformers' resume_from_checkpoint: true continues from the newest checkpoint-N in the run folder (as
    --resume); a path continues from that checkpoint-N folder (its recorded settings and data fingerprint must
    be this run's)."""
    overwrite: bool = False
    """Start afresh in a run folder that holds an earlier run (its files are removed)."""
    seed: int = 0
    """Seed of the data order and of torch's RNG."""
    log_every: int = 1
    """Log metrics every N steps."""
    device: str = "auto"
    """cpu, cuda or auto (accelerate's device)."""
    tensorboard: bool = True
    """Write TensorBoard events under RUN_DIR/tensorboard (false drops tensorboard from report_to)."""
    report_to: str = "tensorboard"
    """Comma-separated trackers the metrics also go to (tensorboard, wandb, mlflow, comet_ml, aim, dvclive, ...: any
    accelerate knows and this environment has installed), 'all' for every installed one, or 'none'; metrics.parquet
    is always written."""
    eval_every: int = 0
    """Measure held-out preference metrics (eval/... : accuracy, margin, loss) on the cache's eval split every N
    steps (0 = never); one no-grad policy pass over the eval pairs on draw 0's cached masks."""
    save_best: bool = False
    """Keep the checkpoint with the best eval/rewards/accuracies (needs eval_every); never rotated away."""
    trust_remote_code: bool = False
    """Allow a non-LLaDA checkpoint to run its own modeling code."""
    progress: bool = True
    """A progress bar with ETA on stderr when it is a terminal (tqdm's, as transformers shows it), and one
    metrics line per logged step; --no-progress (TrainingArguments' disable_tqdm: true) turns both off."""
    plan: bool = True
    """On CUDA, plan the peak memory first and stop with the largest settings that fit (lldm-dpo plan)."""
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
        self.scores, self.out = Path(self.scores), Path(self.out)
        from pipeline.config import check_device, check_ranges

        check_ranges(self, RANGES)
        check_device(self.device)
        from pipeline.hub import check_hub_args
        from pipeline.resume import resume_setting

        self.resume, self.resume_from_checkpoint = resume_setting(self.resume, self.resume_from_checkpoint)
        check_hub_args(self.push_to_hub, self.hub_model_id)
        self._check_losses()
        validate_loss_args(beta=self.beta, loss_type=self.preference_loss or "sigmoid",
                           label_smoothing=self.label_smoothing)
        check_scheduler(self.scheduler, self.lr_scheduler_kwargs)
        check_optim(self.optim)
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got '{self.mixed_precision}'")
        if self.reference not in ("cached", "online"):
            raise ConfigError(f"reference must be cached or online, got '{self.reference}'")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got '{self.dtype}'")
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "lora_r", "sequence_microbatch", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.sequence_microbatch and self.lora_dropout > 0:
            # The weights come from a no-grad pass; with dropout the backward passes would
            # see other masks of the network, and the gradient would no longer be the loss's.
            raise ConfigError("sequence_microbatch needs lora_dropout = 0 (dropout differs between the two passes)")
        if self.load_in_4bit and self.lora_r == 0:
            raise ConfigError("load_in_4bit trains adapters only: set lora_r > 0")
        if self.save_best and not self.eval_every:
            raise ConfigError("save_best keeps the best checkpoint by held-out accuracy: set eval_every > 0")
        from pipeline.trackers import parse_report_to

        parse_report_to(self.report_to)  # syntax here; installed or not is checked when the run starts


    def _check_losses(self) -> None:
        names = self.loss_names
        known = (*LOSS_TYPES, "sft")
        for name in names:
            if name not in known:
                raise ConfigError(f"loss: unknown loss type '{name}'; expected one of {', '.join(known)}")
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"loss must name each loss once, got '{self.loss}'")
        preference = [n for n in names if n != "sft"]
        if len(preference) > 1:
            raise ConfigError(f"loss: one preference loss at a time (got {', '.join(preference)}); combine one of "
                              f"{', '.join(LOSS_TYPES)} with sft")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(names):
                raise ConfigError(f"loss_weights has {len(self.loss_weights)} value(s) for {len(names)} loss(es) "
                                  f"({', '.join(names)})")
            if not all(math.isfinite(w) and w >= 0 for w in self.loss_weights):
                raise ConfigError(f"loss_weights must be finite and >= 0, got {self.loss_weights}")
        if self.sft_weight < 0 or not math.isfinite(self.sft_weight):
            raise ConfigError(f"sft_weight must be finite and >= 0, got {self.sft_weight}")

    @property
    def loss_names(self) -> list[str]:
        return [n.strip() for n in str(self.loss).split(",") if n.strip()]

    def _weight_of(self, name: str) -> float:
        names = self.loss_names
        if name not in names:
            return 0.0
        return 1.0 if self.loss_weights is None else float(self.loss_weights[names.index(name)])

    @property
    def preference_loss(self) -> Optional[str]:
        """The DPO-family loss in `loss`, or None when only sft is trained."""
        return next((n for n in self.loss_names if n != "sft"), None)

    @property
    def preference_weight(self) -> float:
        return self._weight_of(self.preference_loss) if self.preference_loss else 0.0

    @property
    def sft_total_weight(self) -> float:
        """The SFT term's weight: an sft entry's loss weight plus sft_weight (rpo_alpha), as TRL adds both."""
        return self._weight_of("sft") + self.sft_weight


@dataclass
class TrainResult:
    steps: int
    epochs_seen: float
    final_loss: float
    final_reward_accuracy: float
    seconds: float
    out: str
    final_model: str
    metrics: str
    resumed_from: Optional[int] = None
    best_checkpoint: Optional[str] = None
    """The checkpoint with the best eval/rewards/accuracies (with --save-best)."""
    best_metric: Optional[float] = None
    """Its eval/rewards/accuracies."""
    intervals: dict[str, Any] = field(default_factory=dict)
    """The last step's rewards/accuracies (over its pairs) and the last eval/rewards/accuracies (over the held-out
    pairs) with their counts and 95% Wilson intervals (pipeline.intervals; a tie counts one half)."""


# --- setup --------------------------------------------------------------------


def setup_policy(cfg: TrainConfig, model_name: str, device: torch.device, numerics: Optional[Numerics] = None):
    """Load the policy in ``numerics`` (optionally 4-bit), apply LoRA or unfreeze all, enable checkpointing."""
    from pipeline.numerics import load

    numerics = numerics or Numerics(dtype=cfg.dtype or "float32", mixed_precision=cfg.mixed_precision or "no",
                                    load_in_4bit=bool(cfg.load_in_4bit))
    model, tokenizer = load(model_name, numerics, device, trust_remote_code=cfg.trust_remote_code)
    return adapt_policy(model, cfg, numerics), tokenizer


def check_tokenizer(cfg: TrainConfig, cache, tokenizer) -> None:
    """Cached token ids only mean something under the tokenizer that produced them."""
    from pipeline.models import tokenizer_identity

    if tokenizer_identity(tokenizer) != cache.fingerprint.get("tokenizer"):
        raise UserError(f"{cfg.scores}: the policy's tokenizer differs from the one the cache was scored with "
                        "(fingerprint field 'tokenizer'); cached token ids would be read in another vocabulary")


def _identity(model_name: str):
    from pipeline.models import model_identity

    return model_identity(model_name)


def check_init(cfg: TrainConfig, cache, model_name: str) -> None:
    """The policy must start from the cache's reference model unless the user says otherwise."""
    from pipeline.models import model_identity

    expected = cache.fingerprint.get("model")
    actual = model_identity(model_name)
    diffs = fingerprint_differences({"model": actual}, {"model": expected})
    if diffs and not cfg.allow_different_init:
        raise UserError(f"{cfg.scores}: policy init '{model_name}' is not the cache's reference model ("
                        + describe_difference({"model": actual}, {"model": expected}, "model")
                        + "); pass --allow-different-init to train from it anyway")


# --- the batch: replayed masks, policy terms, loss ----------------------------


def policy_terms(model, requests, tokenizer, cfg: TrainConfig) -> list[torch.Tensor]:
    from pipeline.diffusion import elbo_terms

    return elbo_terms(model, requests, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                      batch_tokens=cfg.batch_tokens)


def reference_means(batch: PairBatch, device, ref_terms: list[torch.Tensor] | None = None):
    """Reference ELBOs of the batch: cached means of this draw, or the online terms' means."""
    if ref_terms is not None:
        means = torch.stack([t.mean() for t in ref_terms]).detach()
        return means[0::2], means[1::2]
    c = [sum(r["ref_chosen_terms"][batch.draw]) / len(r["ref_chosen_terms"][batch.draw]) for r in batch.rows]
    r_ = [sum(r["ref_rejected_terms"][batch.draw]) / len(r["ref_rejected_terms"][batch.draw]) for r in batch.rows]
    return (torch.tensor(c, dtype=torch.float64, device=device), torch.tensor(r_, dtype=torch.float64, device=device))


def batch_loss(cfg: TrainConfig, terms: list[torch.Tensor], ref_c, ref_r, chosen_len, rejected_len):
    """Mean DPO (+ SFT) loss of a batch from its per-request terms; returns (loss, stats)."""
    means = torch.stack([t.mean() for t in terms])
    pi_c, pi_r = means[0::2], means[1::2]
    loss_type = cfg.preference_loss or "sigmoid"
    losses, cr, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, loss_type=loss_type,
                              label_smoothing=cfg.label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len)
    loss = cfg.preference_weight * losses.mean()
    if cfg.sft_total_weight:
        loss = loss + cfg.sft_total_weight * sft_loss(pi_c, chosen_len).mean()
    acc = reward_accuracy(cr, rr, ref_c, ref_r, beta=cfg.beta, loss_type=loss_type, chosen_len=chosen_len,
                          rejected_len=rejected_len)
    return loss, {"losses": losses.detach(), "cr": cr, "rr": rr, "pi_c": pi_c.detach(), "pi_r": pi_r.detach(),
                  "acc": acc}


def micro_step(ctx: "TrainContext", batch: PairBatch, scale: float, sync: bool) -> dict[str, Any] | None:
    """Forward and backward of one micro-batch; returns its detached statistics (None when this process
    has no rows: the end of an epoch left it nothing, and it only joins the others' collectives)."""
    from pipeline.diffusion import ScoreRequest

    cfg, model, acc = ctx.cfg, ctx.scorer, ctx.accelerator
    requests = replay_requests(batch, ctx.fingerprint) if batch.rows else []
    ref_terms = None
    if cfg.reference == "online":
        with torch.no_grad(), acc.autocast():
            if ctx.ref_model is not None:
                ref_terms, _ = lockstep_terms(ctx, ctx.ref_model, requests)
            else:  # LoRA: the base model with adapters switched off is the reference
                with ctx.model.disable_adapter():
                    ref_terms, _ = lockstep_terms(ctx, model, requests)
    if not batch.rows:
        _idle_micro_step(ctx, sync)
        return None
    ref_c, ref_r = reference_means(batch, acc.device, ref_terms)
    chosen_len = torch.tensor([r["chosen_len"] for r in batch.rows], device=acc.device)
    rejected_len = torch.tensor([r["rejected_len"] for r in batch.rows], device=acc.device)
    n = ctx.fingerprint["samples"]

    if cfg.sequence_microbatch == 0:
        with ctx.sync_context(sync):  # forward and backward both inside, as DDP requires
            with acc.autocast():
                terms, pad = lockstep_terms(ctx, model, requests)
                loss, st = batch_loss(cfg, terms, ref_c, ref_r, chosen_len, rejected_len)
            _check_finite(ctx, loss, batch)
            _backward(ctx, _with_pad(loss * scale, pad))
    else:
        # One no-grad pass gives each pair's dL/d(delta); then every sequence's
        # term is backpropagated on its own with that weight (estimator-math.md),
        # K sequences at a time, so activations follow K rather than 2n.
        with torch.no_grad(), acc.autocast():
            terms, _ = lockstep_terms(ctx, model, requests)
            loss, st = batch_loss(cfg, terms, ref_c, ref_r, chosen_len, rejected_len)
        _check_finite(ctx, loss, batch)
        delta = preference_delta(st["pi_c"], st["pi_r"], ref_c, ref_r, loss_type=cfg.preference_loss or "sigmoid",
                                 chosen_len=chosen_len, rejected_len=rejected_len)
        chosen_w, rejected_w = sequence_weights(
            delta, n, beta=cfg.beta, loss_type=cfg.preference_loss or "sigmoid", label_smoothing=cfg.label_smoothing,
            sft_weight=cfg.sft_total_weight, chosen_len=chosen_len, normalizer=len(batch.rows),
            rejected_len=rejected_len, dpo_weight=cfg.preference_weight)
        seqs = [(j, k) for j, req in enumerate(requests) for k in range(req.masks.shape[0])]
        K = cfg.sequence_microbatch
        # Empty masks (possible under the 1/t scheme) have a constant term 0: no forward needed.
        seqs = [(j, k) for j, k in seqs if bool(requests[j].masks[k].any())]
        groups = [seqs[g:g + K] for g in range(0, len(seqs), K)]
        n_groups = ctx.most(len(groups)) if ctx.fsdp else len(groups)  # FSDP: a backward per group, everywhere
        if n_groups == 0:
            with ctx.sync_context(sync):
                _backward(ctx, torch.zeros((), device=acc.device))
        for g in range(n_groups):
            group = groups[g] if g < len(groups) else []
            sub = [ScoreRequest(requests[j].prompt_ids, requests[j].response_ids, requests[j].masks[k:k + 1],
                                requests[j].weights[k:k + 1]) for j, k in group]
            weights = [(chosen_w if j % 2 == 0 else rejected_w)[j // 2] for j, _ in group]
            with ctx.sync_context(sync and g + 1 >= n_groups):
                with acc.autocast():
                    sub_terms, pad = lockstep_terms(ctx, model, sub)
                surrogate = sum((w.to(t.dtype) * t.sum() for w, t in zip(weights, sub_terms)),
                                torch.zeros((), device=acc.device))
                _backward(ctx, _with_pad(surrogate * scale, pad))
    tokens = sum(req.masks.shape[0] * (len(req.prompt_ids) + len(req.response_ids)) for req in requests)
    return {"loss": loss.detach().float(), "cr": st["cr"].float(), "rr": st["rr"].float(),
            "pi_c": st["pi_c"].float(), "pi_r": st["pi_r"].float(), "acc": st["acc"].float(),
            "tokens": tokens, "pairs": len(batch.rows)}


def _probe(ctx: "TrainContext", scorer) -> torch.Tensor:
    """One forward of a two-token pad row through ``scorer``: the sum to weight by 0. Under data parallel or
    FSDP it joins a forward (and, in the loss, a backward) the other processes make on real rows."""
    device = ctx.accelerator.device
    probe = torch.full((1, 2), int(ctx.tokenizer.pad_token_id), device=device)
    index = torch.tensor([[0, 1]], device=device)  # position 1: shifted models predict it from 0
    return scorer(probe, None, index, probe[0, :1], 1).sum()


def lockstep_terms(ctx: "TrainContext", scorer, requests) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """``policy_terms`` of ``requests`` (none on a process the epoch's end left idle), and under FSDP the sum of
    the pad forwards that bring this process to the most forward passes any process makes here (None when
    there are none). Every FSDP forward is a collective (the sharded weights are gathered), so every process
    must make as many; the count is agreed first, before any of them. Add ``0 * pad`` to a loss that is
    backpropagated, so the pad passes join the backward too."""
    local = 0
    if ctx.fsdp:
        from pipeline.diffusion import forward_calls

        local = forward_calls(requests, ctx.cfg.batch_tokens) if requests else 0
        most = ctx.most(local)
    terms = policy_terms(scorer, requests, ctx.tokenizer, ctx.cfg) if requests else []
    pad = None
    if ctx.fsdp:
        for _ in range(most - local):
            p = _probe(ctx, scorer)
            pad = p if pad is None else pad + p
    return terms, pad


def _with_pad(loss: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    return loss if pad is None else loss + 0.0 * pad.to(loss.dtype)


def _idle_micro_step(ctx: "TrainContext", sync: bool) -> None:
    """A process with no rows makes the collectives ``micro_step`` makes on the others: under FSDP as many
    forward passes (and backward passes) as the busiest process, the finite-loss flag, and the gradient sync."""
    acc, zero = ctx.accelerator, torch.zeros((), device=ctx.accelerator.device)
    if ctx.cfg.sequence_microbatch == 0:
        with ctx.sync_context(sync):
            with acc.autocast():
                _, pad = lockstep_terms(ctx, ctx.scorer, [])
                if pad is None and ctx.wrapped is not None:  # DDP may sync in a forward: make it where the others do
                    pad = _probe(ctx, ctx.scorer)
            _check_finite(ctx, zero, PairBatch([], 0))
            _backward(ctx, _with_pad(zero, pad))
        return
    with torch.no_grad(), acc.autocast():
        lockstep_terms(ctx, ctx.scorer, [])
    _check_finite(ctx, zero, PairBatch([], 0))
    n_groups = ctx.most(0) if ctx.fsdp else 0
    if n_groups == 0:
        with ctx.sync_context(sync):
            _backward(ctx, zero)
    for g in range(n_groups):
        with ctx.sync_context(sync and g + 1 >= n_groups):
            with acc.autocast():
                _, pad = lockstep_terms(ctx, ctx.scorer, [])
            _backward(ctx, _with_pad(zero, pad))


def _backward(ctx: "TrainContext", loss: torch.Tensor) -> None:
    """Backward, also when the loss does not depend on the weights (every mask empty under
    the 1/t scheme, or no rows left for this process): alone that adds nothing; under data
    parallel the other processes wait for this one's gradients, so a zero-weighted pass
    through the body and head joins them."""
    if not loss.requires_grad:
        if ctx.wrapped is None:
            return
        # Through the wrapped scorer, so DDP/FSDP see the same one forward as on a real batch.
        loss = loss + 0.0 * _probe(ctx, ctx.scorer)
    ctx.accelerator.backward(loss)


def _check_finite(ctx: "TrainContext", loss: torch.Tensor, batch: PairBatch) -> None:
    """Stop on a non-finite loss, naming the step and pairs; under data parallel every
    process learns of it (one flag all-reduced, also by a process with no rows), so none
    waits for the others forever."""
    bad = not bool(torch.isfinite(loss).all())
    if ctx.wrapped is not None:
        flag = torch.tensor([1.0 if bad else 0.0], device=ctx.accelerator.device)
        if ctx.accelerator.reduce(flag, reduction="sum").item() > 0 and not bad:
            raise UserError(f"step {ctx.step + 1}: loss is not finite on another process; stopping with it")
    if bad:
        raise UserError(f"step {ctx.step + 1}: loss is not finite ({loss.item()}) on pairs "
                        f"{', '.join(batch.pair_ids)}; nothing was saved for this step "
                        "(try a lower --learning-rate or --mixed-precision no)")


@dataclass
class TrainContext:
    cfg: TrainConfig
    model: Any
    """The policy itself (peft-wrapped under LoRA), never a data-parallel wrapper."""
    tokenizer: Any
    accelerator: Any
    fingerprint: dict[str, Any]
    ref_model: Any = None
    step: int = 0
    wrapped: Any = None
    """What accelerate prepared (DDP or FSDP around a MaskedRowScorer) when distributed, else None."""
    cache_batch_tokens: int = 16384
    """score-ref's token budget per forward pass: the cache's batch layout, in which the start check and the
    held-out evaluation score (exact reproduction of the cached terms)."""
    fsdp: bool = False
    """Sharded by FSDP. Decided once at setup: on CPU the FSDP mode is attached to accelerate's state by hand
    (fresh_accelerator), and any later AcceleratorState() copies the process state's MULTI_CPU back over it."""

    @property
    def scorer(self):
        """What elbo_terms calls: the wrapped MaskedRowScorer when distributed, else the policy."""
        return self.model if self.wrapped is None else self.wrapped

    def most(self, count: int) -> int:
        """The largest ``count`` over processes (a collective: every process calls it at the same point)."""
        if self.wrapped is None:
            return count
        import torch.distributed as dist

        t = torch.tensor([count], dtype=torch.long, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sync_context(self, last: bool):
        """Gradients are all-reduced only on the last backward of an optimizer step."""
        import contextlib

        if self.wrapped is None or last or self.fsdp:
            # FSDP reduce-scatters every backward: without sync each process would keep
            # whole unsharded gradients, the memory FSDP exists to save.
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.wrapped)


def epochs_needed(n_rows: int, cfg: TrainConfig, world: int = 1) -> int:
    """Epochs a run starts (a partial last one counts): each needs its own mask draw."""
    steps_per_epoch = max(1, math.ceil(n_rows / (cfg.batch_size * cfg.grad_accum * world)))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    return math.ceil(total_steps / steps_per_epoch)


def check_draws(cfg: TrainConfig, epochs: int, draws: int) -> bool:
    """Refuse more epochs than mask draws unless reuse_masks; returns whether draws are reused."""
    if epochs <= draws:
        return False
    if not cfg.reuse_masks:
        raise UserError(f"{cfg.scores}: this run trains {epochs} epochs but the cache holds {draws} mask draw(s), "
                        "one per epoch (replaying masks fits the policy to them and overstates rewards/*); rerun "
                        f"score-ref with --draws {epochs}, or pass --reuse-masks to replay draw epoch mod {draws}")
    import sys

    print(f"warning: {epochs} epochs on {draws} mask draw(s): epochs past {draws} replay masks already trained "
          f"on (metric masks/reused = 1); rerun score-ref with --draws {epochs} to avoid it", file=sys.stderr)
    return True


def gap_error(cfg: TrainConfig, gap: float, numerics: Numerics, cached: Numerics) -> UserError:
    """What differs and what to do, when the policy does not start at the cached reference."""
    if numerics != cached:
        what = (f"the policy runs in {numerics.describe()} and the cache was scored in {cached.describe()}; "
                "drop the explicit --dtype/--mixed-precision/--load-in-4bit (train follows the cache) or rescore "
                "with score-ref in the policy's numerics")
    else:
        what = ("numerics match the cache's, so the weights or the scoring differ (another checkpoint under the "
                "same name, another device, or a cache from another version): rescore with score-ref")
    return UserError(f"step 1: the policy starts {gap:.4g} nats away from the cached reference terms on the same "
                     f"masks (ref/gap_max), beta * gap = {cfg.beta * gap:.4g} > gap_threshold {cfg.gap_threshold}; "
                     f"{what}; --gap-threshold 0 skips this check")


def save_final(ctx: TrainContext, model_name: str, path: Path, card: Optional[str] = None) -> None:
    """The final model in Hugging Face format (full weights, or the LoRA adapter) with its model card, renamed
    into place; under FSDP the shards are gathered first (every process calls this)."""
    from pipeline.checkpoint import save_model_dir

    save_model_dir(path, ctx.model, ctx.tokenizer, ctx.accelerator, base_name=model_name, card=card)


def train_card(cfg: TrainConfig, model_name: str, fp: dict[str, Any], n_pairs: int, last: dict[str, Any],
               last_eval: dict[str, Any], eval_pairs: int) -> str:
    from pipeline.cache import fingerprint_digest
    from pipeline.config import config_to_dict
    from pipeline.model_card import model_card

    data = {"reference-score cache": str(cfg.scores), "cache fingerprint": fingerprint_digest(fp),
            "training pairs": n_pairs, "samples per response": fp.get("samples"), "mask draws": fp.get("draws")}
    return model_card(stage="dpo", base_model=model_name, lora=cfg.lora_r > 0, data=data,
                      settings=config_to_dict(cfg), metrics=last, eval_metrics=last_eval.get("metrics"),
                      eval_pairs=eval_pairs, eval_step=last_eval.get("step"))


def run(cfg: TrainConfig) -> TrainResult:
    """The stage, holding the run folder's lock (a second train into it refuses, naming the first)."""
    from pipeline.lock import output_lock

    with output_lock(cfg.out, "train", folder=True):
        return _run(cfg)


def _run(cfg: TrainConfig) -> TrainResult:
    from pipeline.atomic import check_writable, sweep_stale, write_text_atomic
    from pipeline.checkpoint import check_world, load_checkpoint, read_state, save_checkpoint
    from pipeline.config import config_to_yaml
    from pipeline.metrics import MetricsWriter

    start_time = time.perf_counter()
    check_writable(cfg.out, "run folder")
    from pipeline.devices import resolve_device

    resolve_device(cfg.device)  # an unavailable --device is an error here too, never a silent CPU run
    for folder in (cfg.out, cfg.out / "checkpoints"):
        sweep_stale(folder)  # temporary files a killed run left (provably its own, its process gone)
    if not cfg.resume:  # refuse before the model loads, not after
        earlier = run_outputs_in(cfg.out)
        if earlier and not cfg.overwrite:
            raise UserError(f"{cfg.out}: run folder already holds a run ({', '.join(earlier)}); pass --resume to "
                            "continue it, --overwrite to start afresh, or choose another --out")
        check_run_outputs(cfg.out)
    cache = open_cache(cfg.scores)
    fp = cache.fingerprint
    model_name = cfg.model or cache.manifest["config"]["model"]
    check_init(cfg, cache, model_name)
    if cfg.max_length is not None and cfg.max_length != fp.get("max_length"):
        raise UserError(f"{cfg.scores}: max_length {cfg.max_length} differs from the cache's {fp.get('max_length')} "
                        "(sequences were truncated when scored; rescore with score-ref --max-length to change it)")
    # Read in slices: each process decodes only the row groups of its own micro-batches.
    # Truncation can make both responses the same ids: such a pair carries no preference, only noise.
    rows = cache.split_rows("train", skip_identical=True)
    identical = rows.identical
    if identical:
        import sys

        print(f"warning: skipping {len(identical)} pair(s) whose responses are identical after truncation "
              f"(e.g. {identical[0]}); raise score-ref's --max-length to keep them", file=sys.stderr)
    if not len(rows):
        raise UserError(f"{cfg.scores}: the cache holds no pairs of the train split")
    eval_rows = []
    if cfg.eval_every:
        eval_rows = cache.split_rows("eval", skip_identical=True)  # read on demand, as the train split
        if not eval_rows:
            raise UserError(f"{cfg.scores}: --eval-every needs held-out pairs, but the cache holds none of the eval "
                            "split (ingest with --eval-fraction and score them)")
    from pipeline.trackers import TENSORBOARD, accelerator_trackers, parse_report_to, resolve_trackers

    requested = parse_report_to(cfg.report_to)
    if not cfg.tensorboard:
        requested = [n for n in requested if n != TENSORBOARD]
    trackers = resolve_trackers(requested)

    from dataclasses import replace

    from pipeline.numerics import follow, of_fingerprint

    cached_numerics = of_fingerprint(fp)
    numerics = follow(cached_numerics, dtype=cfg.dtype, mixed_precision=cfg.mixed_precision,
                      load_in_4bit=cfg.load_in_4bit, allow_mismatch=cfg.allow_numerics_mismatch,
                      where=str(cfg.scores))
    if numerics.load_in_4bit and cfg.lora_r == 0:
        raise UserError(f"{cfg.scores}: the cache was scored with a 4-bit base (load_in_4bit), which trains "
                        "adapters only: set --lora-r > 0, or rescore without --load-in-4bit")
    cfg = replace(cfg, dtype=numerics.dtype, mixed_precision=numerics.mixed_precision,
                  load_in_4bit=numerics.load_in_4bit)
    if cfg.resume:  # the run's recorded settings (config.yaml, as resolved here when it started) must hold
        from pipeline.config import config_to_dict
        from pipeline.resume import check_resume_source

        ckpt = check_resume_source(cfg.out, cfg.resume_from_checkpoint, config_to_dict(cfg), RESUME_FREE)
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs CUDA (loss scaling on CPU is not supported); use bf16 or no")
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    acc = fresh_accelerator(cfg.mixed_precision, cpu, log_with=accelerator_trackers(trackers), run_dir=cfg.out)
    import sys

    from pipeline.numerics import accelerate_override_note

    if (note := accelerate_override_note(cfg.mixed_precision, str(cfg.scores))) and acc.is_main_process:
        print(note, file=sys.stderr, flush=True)
    fsdp = acc.distributed_type.name == "FSDP"
    world = acc.num_processes
    reused_draws = check_draws(cfg, epochs_needed(len(rows), cfg, world), fp["draws"])
    if cfg.plan and not fsdp:  # on the longest cached pair; data parallel keeps a whole model per process
        # (under FSDP the plan's one-model-per-process shape does not apply: no check)
        from pipeline.plan import Shape, check_start

        # Three length columns, not the rows: the cache stays on disk.
        prompt_lens, chosen_lens, rejected_lens = (rows.column(c) for c in ("prompt_len", "chosen_len",
                                                                             "rejected_len"))
        i = max(range(len(prompt_lens)), key=lambda k: prompt_lens[k] + max(chosen_lens[k], rejected_lens[k]))
        length = prompt_lens[i] + max(chosen_lens[i], rejected_lens[i])
        check_start("train", dataclasses.replace(cfg, model=model_name),
                    Shape(fp["samples"], length, prompt_lens[i]), acc.device, step=sys.modules[__name__])
    torch.manual_seed(cfg.seed)
    model, tokenizer = setup_policy(cfg, model_name, acc.device, numerics)
    check_tokenizer(cfg, cache, tokenizer)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise UserError(f"model '{model_name}': tokenizer needs mask and pad tokens")
    ref_model = None
    ref_name = cache.manifest["config"]["model"]
    # Under LoRA the base with adapters off is the reference, unless the policy started elsewhere.
    if cfg.reference == "online" and (cfg.lora_r == 0 or model_name != ref_name):
        from pipeline.numerics import load

        ref_model, _ = load(ref_name, numerics, acc.device, trust_remote_code=cfg.trust_remote_code)
        ref_model.eval().requires_grad_(False)
        if fsdp:  # sharded like the policy, so the baseline keeps the same memory shape
            ref_model = shard_frozen(acc, ref_model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = max(1, math.ceil(len(rows) / (cfg.batch_size * cfg.grad_accum * world)))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    # The scheduler is stepped by hand once per optimizer step: accelerate's
    # wrapper would step it once per process and change the schedule with the world size.
    wrapped = None
    if world > 1 or fsdp:
        # DDP syncs gradients and FSDP gathers weights in forward(): the scorer does
        # body, masked-row head and row sums in one forward, so both see every use.
        from pipeline.models.scoring import MaskedRowScorer

        wrapped, optimizer = acc.prepare(MaskedRowScorer(model), optimizer)
        params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP swapped them for DTensors
    else:
        optimizer = acc.prepare(optimizer)

    ctx = TrainContext(cfg, model, tokenizer, acc, fp, ref_model, wrapped=wrapped, fsdp=fsdp,
                       cache_batch_tokens=int(cache.manifest.get("config", {}).get("batch_tokens", 16384)))

    def step_batches(step: int) -> list[PairBatch]:
        out = []
        for micro in range(cfg.grad_accum):
            epoch, batch_rows = micro_batch_rows(rows, cfg, step, micro, steps_per_epoch, world, acc.process_index)
            out.append(PairBatch(batch_rows, draw=epoch % fp["draws"]))
        return out

    gap = float("nan")
    same_init = model_name == ref_name or not fingerprint_differences(
        {"model": _identity(model_name)}, {"model": fp.get("model")})
    start_stats: dict[str, float] = {}
    if not cfg.resume and same_init and cfg.reference == "cached":
        # The policy IS the cache's model: it must reproduce the cached terms before it learns anything.
        # Scored in the cache's batch layout, so the cache's model gives gap 0 and accuracy 0.5 exactly.
        gap, start_stats = start_check(ctx, cache, step_pair_ids(rows, cfg, 0, steps_per_epoch, world))
        if cfg.gap_threshold > 0 and cfg.beta * gap > cfg.gap_threshold:
            raise gap_error(cfg, gap, numerics, cached_numerics)

    layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": world,
              "total_steps": total_steps, "seed": cfg.seed, "lora_r": cfg.lora_r, "optim": cfg.optim,
              "scores_digest": cache.manifest.get("fingerprint_digest")}  # the cache by content, not by path
    resumed_from = None
    start_step = 0
    best: dict[str, Any] = {"best_metric": None, "best_model_checkpoint": None}
    if cfg.resume:  # ckpt: check_resume_source's, above
        saved = read_state(ckpt)
        check_world(ckpt, saved, world)  # before the layout: its message says what to do instead
        check_resume_layout(ckpt, saved, layout)
        state = load_checkpoint(ckpt, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                                accelerator=acc)
        start_step = resumed_from = int(state["step"])
        best = {k: state.get(k) for k in best}
    elif acc.is_main_process:
        earlier = run_outputs_in(cfg.out)
        if earlier and not cfg.overwrite:
            raise UserError(f"{cfg.out}: run folder already holds a run ({', '.join(earlier)}); pass --resume to "
                            "continue it, --overwrite to start afresh, or choose another --out")
        remove_run_outputs(cfg.out)
    if acc.is_main_process and not (cfg.resume and (cfg.out / CONFIG_FILE).is_file()):
        # Written once, when the run starts: a resume never rewrites the run's recorded settings.
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.out / CONFIG_FILE, config_to_yaml(cfg), record=True)
    writer, sinks = None, []
    if acc.is_main_process:
        if accelerator_trackers(trackers):
            from pipeline.metrics import TB_TAGS
            from pipeline.trackers import AccelerateSink

            sinks.append(AccelerateSink(acc, dataclasses.asdict(cfg), TB_TAGS,
                                        run_name=cfg.run_name or cfg.out.name))
    bar = StepBar(total_steps, start_step, cfg.progress and acc.is_main_process, "train")
    if acc.is_main_process:
        writer = MetricsWriter(cfg.out, tensorboard=TENSORBOARD in trackers, resume_step=resumed_from,
                               console=bar.stream or cfg.progress, sinks=tuple(sinks))
    # Each process scores its share of the held-out pairs; the sums are all-reduced.
    # Data parallel: each process scores its share and the sums are all-reduced. FSDP: every forward is a
    # collective (the weights are gathered block by block), so every process must make the same calls;
    # each scores the whole held-out split in the same batches (the same sums on every process).
    # Held-out pairs are scored in the cache's layout, whole parts: under data parallel each process scores
    # its share of the parts; under FSDP (every forward a collective) every process scores them all.
    eval_parts = [] if not eval_rows else part_loaders(cache, cache_part_paths(cache, split="eval"))
    eval_share = eval_parts if fsdp else eval_parts[acc.process_index::world]

    last: dict[str, float] = {}
    intervals: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    reset_peak_memory(acc.device)
    try:
        for step in range(start_step, total_steps):
            ctx.step = step
            t0 = time.perf_counter()
            stats = []
            batches = step_batches(step)
            # Each pair weighs the same within a step, also when the epoch's end leaves short (or no) micro-batches
            # on some processes: DDP and FSDP average gradients over processes, hence the factor world.
            step_pairs = max(1, step_pair_count(len(rows), cfg, step, steps_per_epoch, world))
            for micro, batch in enumerate(batches):
                stats.append(micro_step(ctx, batch, len(batch.rows) * world / step_pairs,
                                        sync=micro == cfg.grad_accum - 1))
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(params, clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = _step_metrics(acc, stats, step, steps_per_epoch, lr, grad_norm, time.perf_counter() - t0)
            if step == 0:
                row["ref/gap_max"] = gap
                row.update(start_stats)  # step 1's statistics of the policy before its update, in the cache's layout
            if reused_draws:
                row["masks/reused"] = float(step // steps_per_epoch >= fp["draws"])
            evaluated = bool(cfg.eval_every) and (step + 1) % cfg.eval_every == 0
            new_best = False
            if evaluated:
                row.update(evaluate_heldout(ctx, eval_share))
                last_eval = {"step": step + 1, "metrics": {k: v for k, v in row.items() if k.startswith("eval/")}}
                score = row["eval/rewards/accuracies"]
                # The first best is kept on ties: a later checkpoint must do strictly better.
                new_best = cfg.save_best and (best["best_metric"] is None or score > best["best_metric"])
                if new_best:
                    best = {"best_metric": score, "best_model_checkpoint": str(checkpoint_path(cfg.out, step + 1))}
            last = row
            intervals["rewards/accuracies"] = _accuracy_of(row["rewards/accuracies"], step_pairs)
            if evaluated:
                intervals["eval/rewards/accuracies"] = _accuracy_of(row["eval/rewards/accuracies"], len(eval_rows))
            bar.step(row["loss"])
            if writer is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps or evaluated):
                writer.log(row)
            if new_best or (cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps):
                acc.wait_for_everyone()
                if acc.is_main_process:
                    writer.flush()
                protect = [Path(best["best_model_checkpoint"])] if best["best_model_checkpoint"] else []
                save_checkpoint(cfg.out, step + 1, model=model, wrapped=wrapped, optimizer=optimizer,
                                scheduler=scheduler, tokenizer=tokenizer, accelerator=acc, base_name=model_name,
                                state={"epoch": (step + 1) / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                                       "layout": layout, **best}, keep=cfg.keep_checkpoints, protect=protect,
                                cfg=cfg)
        acc.wait_for_everyone()
        final = cfg.out / FINAL_DIR
        if acc.is_main_process:
            writer.flush()
        save_final(ctx, model_name, final, train_card(cfg, model_name, fp, len(rows), last, last_eval, len(eval_rows)))
        if acc.is_main_process:
            from pipeline.hub import push_folder

            push_folder(final, cfg, stage="train")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        for sink in sinks:
            sink.close()
    return TrainResult(
        steps=total_steps, epochs_seen=total_steps / steps_per_epoch,
        final_loss=float(last.get("loss", float("nan"))),
        final_reward_accuracy=float(last.get("rewards/accuracies", float("nan"))),
        seconds=time.perf_counter() - start_time, out=str(cfg.out), final_model=str(cfg.out / FINAL_DIR),
        metrics=str(cfg.out / METRICS_FILE), resumed_from=resumed_from,
        best_checkpoint=best["best_model_checkpoint"], best_metric=best["best_metric"], intervals=intervals,
    )


def _accuracy_of(share: float, n: int) -> dict[str, Any]:
    """An accuracy (a mean of credits 0, 1/2, 1 over ``n`` pairs) as a count with its Wilson interval."""
    from pipeline.intervals import accuracy_record

    count = min(max(round(share * n * 2) / 2, 0.0), float(n)) if math.isfinite(share) else 0.0
    return accuracy_record(count, n)


def step_pair_ids(rows, cfg: TrainConfig, step: int, steps_per_epoch: int, world: int) -> list[str]:
    """The pair_ids a step trains on, over every micro-batch and process (no row is read)."""
    order = epoch_order(len(rows), cfg.seed, step // steps_per_epoch)
    spans = (_micro_batch_span(len(rows), cfg, step, micro, steps_per_epoch, world, rank)
             for micro in range(cfg.grad_accum) for rank in range(world))
    return [rows.pair_ids[order[i]] for start, stop in spans for i in range(start, stop)]


def part_loaders(cache, paths) -> list:
    """One zero-argument reader per cache part (read when scored, not held)."""
    import functools

    from pipeline.replay import read_whole_part

    return [functools.partial(read_whole_part, cache, p) for p in paths]


def _cache_layout_sums(ctx: "TrainContext", loaders, keep, draw: int = 0):
    """``pipeline.preference.cache_layout_sums`` of the policy (eval mode, no dropout) on the cache's parts
    (``loaders``), in the cache's numerics and token budget; under FSDP through the wrapped scorer."""
    from pipeline.numerics import autocast
    from pipeline.preference import cache_layout_sums

    cfg, acc, model = ctx.cfg, ctx.accelerator, ctx.model
    was_training = model.training
    model.eval()
    try:
        return cache_layout_sums(ctx.scorer if ctx.fsdp else model, ctx.tokenizer,
                                 (load() for load in loaders), ctx.fingerprint, keep, beta=cfg.beta,
                                 batch_tokens=ctx.cache_batch_tokens,
                                 autocast=lambda: autocast(acc.device, cfg.mixed_precision),
                                 loss_type=cfg.preference_loss or "sigmoid", label_smoothing=cfg.label_smoothing,
                                 preference_weight=cfg.preference_weight, sft_weight=cfg.sft_total_weight, draw=draw)
    finally:
        model.train(was_training)  # no dropout above: the numbers measure the model, not a noisy copy of it
        if ctx.fsdp:
            # FSDP keeps the root's weights gathered after a forward, for the backward that follows; a no-grad
            # forward has none, so they are resharded here (else the next save or step sees them gathered).
            from torch.distributed.fsdp import FSDPModule

            for module in ctx.scorer.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def start_check(ctx: "TrainContext", cache, pair_ids: list[str]) -> tuple[float, dict[str, float]]:
    """Step 1's check of a policy that is the cache's model: ref/gap_max (largest |B_pi - B_ref|, nats) and
    step 1's rewards/... and logps/... statistics, from a no-grad pass over step 1's pairs (every process's)
    in the cache's own batch layout (the whole parts that hold them, every draw, as score-ref scored them),
    so the cache's model gives gap 0 and rewards/accuracies 0.5 exactly, in any dtype. Every process scores
    the same parts (the same calls under FSDP) and gets the same numbers."""
    from pipeline.preference import heldout_metrics

    wanted = set(pair_ids)
    if not wanted:
        return 0.0, {}
    sums, gap = _cache_layout_sums(ctx, part_loaders(cache, cache_part_paths(cache, pair_ids=wanted)),
                                   lambda r: r["pair_id"] in wanted, draw=0)
    stats = heldout_metrics(sums)
    return gap, {k[len("eval/"):]: v for k, v in stats.items() if k != "eval/loss"}


def evaluate_heldout(ctx: "TrainContext", loaders) -> dict[str, float]:
    """eval/... metrics of the policy on this process's share of the held-out parts (``loaders``), scored in
    the cache's batch layout (so the cache's model scores accuracy 0.5 exactly), reduced over processes."""
    from pipeline.preference import heldout_metrics

    acc, fsdp = ctx.accelerator, ctx.fsdp
    sums, _ = _cache_layout_sums(ctx, loaders, lambda r: (r.get("split") or "train") == "eval"
                                 and list(r["chosen_ids"]) != list(r["rejected_ids"]), draw=0)
    if acc.num_processes > 1 and not fsdp:  # under FSDP every process scored the whole split
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
    return heldout_metrics(sums)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    from pipeline.checkpoint import checkpoint_dir

    return checkpoint_dir(run_dir, step)


def shard_frozen(acc, model):
    """A frozen model (the online reference) sharded by FSDP like the policy, inside its own scorer."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from pipeline.models.scoring import MaskedRowScorer

    return fsdp2_prepare_model(acc, MaskedRowScorer(model))


def _step_metrics(acc, stats, step, steps_per_epoch, lr, grad_norm, seconds) -> dict[str, float]:
    """Means over the step's pairs (all micro-batches and processes), with TRL's names."""
    stats = [s for s in stats if s is not None]
    sums = [0.0] * 9
    for s in stats:
        sums[0] += float(s["loss"]) * s["pairs"]
        sums[1] += float(s["cr"].sum())
        sums[2] += float(s["rr"].sum())
        sums[3] += float(s["acc"].sum())
        sums[4] += float((s["cr"] - s["rr"]).sum())
        sums[5] += float(s["pi_c"].sum())
        sums[6] += float(s["pi_r"].sum())
        sums[7] += s["pairs"]
        sums[8] += s["tokens"]
    local = torch.tensor(sums, dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        local = acc.reduce(local, reduction="sum")
    v = local.tolist()
    pairs = max(v[7], 1.0)
    return {
        "step": step + 1, "epoch": (step + 1) / steps_per_epoch, "loss": v[0] / pairs,
        "rewards/chosen": v[1] / pairs, "rewards/rejected": v[2] / pairs, "rewards/accuracies": v[3] / pairs,
        "rewards/margins": v[4] / pairs, "logps/chosen": v[5] / pairs, "logps/rejected": v[6] / pairs,
        "learning_rate": lr, "grad_norm": float(grad_norm),
        "tokens_per_second": v[8] / max(seconds, 1e-9), "peak_memory_bytes": peak_memory_bytes(acc.device),
    }



def _train_action(cfg: TrainConfig, as_json: bool) -> None:
    from accelerate import PartialState

    from pipeline.stagecli import print_summary, summary_dict

    result = run(cfg)
    if PartialState().is_main_process:
        data = summary_dict(result)
        if not as_json:
            from pipeline.intervals import format_accuracy

            data.update({name: format_accuracy(rec) for name, rec in data.pop("intervals", {}).items()})
        print_summary("train", data, as_json)


command = stage_command(TrainConfig, _train_action, positional={"scores": True},
                        doc="Train the policy with DPO against the cached reference scores.")
