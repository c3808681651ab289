"""What train's and sft's configurations share (TrainingArguments' words): the optimizer, schedule, numerics,
LoRA, checkpoint, logging and hub fields, each declared once with its docstring and range; TrainConfig and
SFTConfig extend it and redeclare the fields whose default (or help) is their own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from pipeline.core.config import check_device, check_ranges, field_types, require, require_choice, unwrap_optional
from pipeline.core.devices import DTYPE_NAMES, PRECISION_NAMES
from pipeline.models.lora_targets import LORA_TARGET_NAMES
from pipeline.trainer.hub import check_hub_args
from pipeline.trainer.resume import resume_setting
from pipeline.trainer.trackers import parse_report_to

RANGES = {"learning_rate": "(0, inf)", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
          "adam_epsilon": "[0, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "epochs": "[1, inf)",
          "max_steps": "[0, inf)", "warmup_ratio": "[0, 1)", "warmup_steps": "[0, inf)", "max_grad_norm": "[0, inf)",
          "lora_r": "[0, inf)", "lora_alpha": "[1, inf)", "lora_dropout": "[0, 1)", "save_every": "[0, inf)",
          "keep_checkpoints": "[0, inf)", "seed": "[0, inf)", "log_every": "[1, inf)"}
"""The valid interval of every shared numeric field; each stage's RANGES adds its own fields'."""

RESUME_FREE = ("model", "out", "resume", "resume_from_checkpoint", "overwrite", "progress", "save_every",
               "save_each_epoch", "keep_checkpoints", "log_every", "log_each_epoch", "report_to", "tensorboard", "device", "gradient_checkpointing",
               "trust_remote_code", "run_name", "push_to_hub", "hub_model_id", "hub_private_repo")
"""Shared settings a resume may change (speed, memory, logging, where things are); each stage adds its own."""


@dataclass
class TrainingArgs:
    model: str = "tiny"
    """Starting model: a folder, a LoRA adapter folder, a hub id, or a preset name (tiny, micro, ...): a preset
    is a randomly initialised model seeded by --seed (training from scratch)."""
    out: Path = Path("runs/sft")
    """Run folder: checkpoints, final model, metrics.parquet, TensorBoard events, config.yaml."""
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
    save_each_epoch: bool = False
    """Checkpoint at the end of each epoch instead of every save_every steps (TRL's save_strategy: epoch)."""
    keep_checkpoints: int = 2
    """How many newest checkpoints to keep (0 = all, as TrainingArguments' save_total_limit: null)."""
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
    log_each_epoch: bool = False
    """Log metrics at the end of each epoch instead of every log_every steps (TRL's logging_strategy: epoch)."""
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

    def __post_init__(self, ranges: Mapping[str, str] = RANGES):
        self.out = Path(self.out)
        check_ranges(self, ranges)  # every numeric field's interval, from its one declaration
        check_device(self.device)
        self.resume, self.resume_from_checkpoint = resume_setting(self.resume, self.resume_from_checkpoint)
        check_hub_args(self.push_to_hub, self.hub_model_id)
        from pipeline.trainer.optim import check_optim, check_scheduler  # torch: after the cheap checks

        check_scheduler(self.scheduler, self.lr_scheduler_kwargs)
        check_optim(self.optim)
        types = field_types(type(self))
        for name, choices in (("mixed_precision", PRECISION_NAMES), ("dtype", tuple(DTYPE_NAMES))):
            if getattr(self, name) is not None or not unwrap_optional(types[name])[1]:  # None: where Optional
                require_choice(name, getattr(self, name), choices)
        require(not (self.load_in_4bit and self.lora_r == 0), "load_in_4bit trains adapters only: set lora_r > 0")
        parse_report_to(self.report_to)  # syntax here; installed or not is checked when the run starts
