"""DPO's configuration (TRL's DPOConfig words where they exist): the shared training fields
(pipeline/trainer/args.py) and DPO's own, every field documented, every range declared once in ``RANGES`` and
checked from there (``pipeline.core.config.check_ranges``); defaults that depend on other fields (the preference loss,
its weights) are resolved here, once, as properties."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.core.config import require, require_choice
from pipeline.estimator.diffusion import BATCH_TOKENS
from pipeline.estimator.losses import LOSS_TYPES, validate_loss_args
from pipeline.trainer import args
from pipeline.trainer.args import TrainingArgs

RESUME_FREE = (*args.RESUME_FREE, "scores", "plan", "batch_tokens", "sequence_microbatch", "eval_every", "eval_each_epoch",
               "save_best", "gap_threshold", "allow_different_init", "allow_numerics_mismatch", "reuse_masks")
"""Settings a resume may change (speed, memory, logging, where things are): every other one shapes the run and
must equal the recorded config.yaml (the cache goes by its fingerprint digest in the checkpoint's layout)."""

RANGES = {**args.RANGES, "beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "sft_weight": "[0, inf)",
          "sequence_microbatch": "[0, inf)", "batch_tokens": "[1, inf)", "gap_threshold": "[0, inf)",
          "max_length": "[1, inf)", "pad_to": "[0, inf)", "eval_every": "[0, inf)", "max_prompt_length": "[0, inf)",
          "max_completion_length": "[2, inf)"}
"""The valid interval of every numeric field (checked first in __post_init__)."""


@dataclass
class TrainConfig(TrainingArgs):
    # train's own defaults (and help) of shared fields: the policy follows the cache it is trained against
    model: Optional[str] = None
    """The policy's starting point; default: the model the cache was scored with."""
    out: Path = Path("runs/dpo")
    learning_rate: float = 1e-5
    batch_size: int = 4
    """Pairs per micro-batch per process."""
    epochs: int = 1
    """Passes over the training pairs (ignored when max_steps > 0)."""
    warmup_ratio: float = 0.1
    mixed_precision: Optional[str] = None
    """accelerate's mixed precision: no, bf16 or fp16 (fp16 uses loss scaling and needs CUDA). Default: the cache's."""
    dtype: Optional[str] = None
    """dtype the policy's weights are loaded in (float32, bfloat16, float16; LoRA keeps adapters in float32).
    Default: the cache's, so the policy reproduces the cached reference terms."""
    load_in_4bit: Optional[bool] = None
    """Quantize the frozen base to 4-bit NF4 with bitsandbytes (CPU or CUDA; needs lora_r > 0). Default: the cache's."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    overwrite: bool = False
    """Start afresh in a run folder that holds an earlier run (its files are removed)."""
    seed: int = 0
    """Seed of the data order and of torch's RNG."""
    log_every: int = 1
    """Log metrics every N steps."""
    report_to: str = "tensorboard"
    """Comma-separated trackers the metrics also go to (tensorboard, wandb, mlflow, comet_ml, aim, dvclive, ...: any
    accelerate knows and this environment has installed), 'all' for every installed one, or 'none'; metrics.parquet
    is always written."""
    # DPO's own fields
    scores: Path = Path("cache/ref-scores")
    """Reference-score cache folder written by ``lldm-dpo score-ref``."""
    allow_different_init: bool = False
    """Accept a starting model other than the cache's reference model."""
    loss: str = "sigmoid"
    """Loss: one of TRL's sigmoid, ipo, hinge, robust, exo_pair, discopop, apo_zero, apo_down, sppo_hard, nca_pair,
    optionally with sft, comma-separated (TRL's loss_type list), e.g. sigmoid,sft."""
    loss_weights: Optional[list[float]] = None
    """Weight of each loss named in `loss`, in order (TRL's loss_weights); default 1.0 each."""
    beta: float = 0.1
    """DPO temperature beta."""
    label_smoothing: float = 0.0
    """Label noise rate for sigmoid (conservative DPO) and robust losses; exo_pair's epsilon."""
    sft_weight: float = 0.0
    """Weight of an SFT term (chosen response's per-token negative ELBO), as TRL's rpo_alpha; adds to an sft loss's weight."""
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
    sequence_microbatch: int = 0
    """Backpropagate this many sequences at a time after a no-grad pass (0 = one pass); memory follows K, not n."""
    reference: str = "cached"
    """cached (the cache's terms) or online (a live reference scored on the same masks: the baseline)."""
    batch_tokens: int = BATCH_TOKENS
    """Token budget of one forward pass."""
    max_length: Optional[int] = None
    """Longest prompt + response (TRL's max_length). Truncation happens in score-ref: when set, it must equal the cache's."""
    max_prompt_length: Optional[int] = None
    """TRL's max_prompt_length. Truncation happens in score-ref: when set, it must equal the cache's."""
    max_completion_length: Optional[int] = None
    """TRL's max_completion_length. Truncation happens in score-ref: when set, it must equal the cache's."""
    pad_to: Optional[int] = None
    """The responses' EOS padding length (score-ref's pad_to; 0 = none). Padding happens in score-ref, and train
    (DPO and NLL terms) scores the cached, padded ids: when set, it must equal the cache's."""
    eval_every: int = 0
    """Measure held-out preference metrics (eval/... : accuracy, margin, loss) on the cache's eval split every N
    steps (0 = never); one no-grad policy pass over the eval pairs on draw 0's cached masks."""
    eval_each_epoch: bool = False
    """Measure the held-out metrics at the end of each epoch instead of every eval_every steps (TRL's
    eval_strategy: epoch)."""
    save_best: bool = False
    """Keep the checkpoint with the best eval/rewards/accuracies (needs eval_every); never rotated away."""
    plan: bool = True
    """On CUDA, plan the peak memory first and stop with the largest settings that fit (lldm-dpo plan)."""

    def __post_init__(self):
        self.scores = Path(self.scores)
        super().__post_init__(RANGES)
        cache, out = self.scores.absolute(), Path(self.out).absolute()
        require(not (out == cache or cache in out.parents),
                f"out {self.out} is {'the' if out == cache else 'inside the'} reference cache folder (scores "
                f"{self.scores}): the run's files would mix into the cache; choose another --out")
        self._check_losses()
        validate_loss_args(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        require_choice("reference", self.reference, ("cached", "online"))
        # The weights come from a no-grad pass; with dropout the backward passes would
        # see other masks of the network, and the gradient would no longer be the loss's.
        require(not (self.sequence_microbatch and self.lora_dropout > 0),
                "sequence_microbatch needs lora_dropout = 0 (dropout differs between the two passes)")
        require(not (self.save_best and not (self.eval_every or self.eval_each_epoch)),
                "save_best keeps the best checkpoint by held-out accuracy: set eval_every > 0 or eval_each_epoch")

    def _check_losses(self) -> None:
        names, known, weights = self.loss_names, (*LOSS_TYPES, "sft"), self.loss_weights
        for name in names:
            require(name in known, f"loss: unknown loss type '{name}'; expected one of {', '.join(known)}")
        require(bool(names) and len(set(names)) == len(names), f"loss must name each loss once, got '{self.loss}'")
        preference = [n for n in names if n != "sft"]
        require(len(preference) <= 1, f"loss: one preference loss at a time (got {', '.join(preference)}); combine "
                                      f"one of {', '.join(LOSS_TYPES)} with sft")
        if weights is not None:
            require(len(weights) == len(names),
                    f"loss_weights has {len(weights)} value(s) for {len(names)} loss(es) ({', '.join(names)})")
            require(all(math.isfinite(w) and w >= 0 for w in weights),
                    f"loss_weights must be finite and >= 0, got {weights}")

    @property
    def loss_names(self) -> list[str]:
        return [n.strip() for n in str(self.loss).split(",") if n.strip()]

    def _weight_of(self, name: Optional[str]) -> float:
        names = self.loss_names
        if name not in names:
            return 0.0
        return 1.0 if self.loss_weights is None else float(self.loss_weights[names.index(name)])

    @property
    def preference_loss(self) -> Optional[str]:
        """The DPO-family loss in `loss`, or None when only sft is trained."""
        return next((n for n in self.loss_names if n != "sft"), None)

    @property
    def loss_type(self) -> str:
        """The preference loss the statistics use: ``preference_loss``, or sigmoid (weight 0) when only sft
        is trained, so rewards/... are still DPO's."""
        return self.preference_loss or "sigmoid"

    @property
    def preference_weight(self) -> float:
        return self._weight_of(self.preference_loss)

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
    pairs) with their counts and 95% Wilson intervals (pipeline.evaluation.intervals; a tie counts one half)."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Where ``seconds`` went: setup (cache, model, optimizer), start_check (train's exact check of the
    cache's model on step 1's pairs; 0 when a run has none), train (the steps, with eval and checkpoints), save."""


