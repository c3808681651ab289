"""The optimizer and its learning-rate schedule, in TrainingArguments' names (``optim``, ``lr_scheduler_type``,
``warmup_*``), with the checks a config runs on them before any model loads.

Functions taking ``cfg`` read only the fields they name (``learning_rate``, ``weight_decay``, ``warmup_ratio``,
``warmup_steps``, ``scheduler``, ``lr_scheduler_kwargs``, ``optim``, ``adam_*``), which train's and sft's configs
both have (``TrainingArgs``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch

from pipeline.core.errors import ConfigError, UserError

REFUSED_SCHEDULERS = {
    "reduce_lr_on_plateau": "it steps on an eval metric, and lldm-dpo steps the schedule once per optimizer step",
    "greedy": "it steps on a training metric, and lldm-dpo steps the schedule once per optimizer step",
}
"""transformers' scheduler names that cannot apply here, with why."""


def scheduler_names() -> tuple[str, ...]:
    """Every ``transformers.SchedulerType`` name that applies here (lr_scheduler_type's choices)."""
    from transformers import SchedulerType  # lazy here and below: it loads transformers' trainer_utils and peft

    return tuple(t.value for t in SchedulerType if t.value not in REFUSED_SCHEDULERS)


def check_scheduler(name: str, kwargs: Optional[dict] = None) -> None:
    """A one-line ConfigError unless ``name`` is a transformers scheduler that applies here and takes
    ``kwargs`` (tried on a one-parameter optimizer, so a config fails before any model loads)."""
    if name in REFUSED_SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type {name} cannot apply here: {REFUSED_SCHEDULERS[name]}")
    names = scheduler_names()
    if name not in names:
        raise ConfigError(f"scheduler (lr_scheduler_type) must be one of {', '.join(names)}, got '{name}'")
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(name, probe, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=dict(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lr_scheduler_kwargs {dict(kwargs or {})}: not accepted by the {name} scheduler: "
                          f"{str(exc).splitlines()[0]}") from None


def warmup_steps_of(cfg, total_steps: int) -> int:
    """TrainingArguments' rule: warmup_steps >= 1 is a count, in (0, 1) a share of the steps; 0 = warmup_ratio."""
    steps = float(getattr(cfg, "warmup_steps", 0) or 0)
    if steps >= 1:
        return int(steps)
    share = steps if steps > 0 else float(cfg.warmup_ratio)
    return math.ceil(total_steps * share)


TORCH_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
BNB_OPTIMS = {"adamw_8bit": (8, False), "adamw_bnb_8bit": (8, False), "paged_adamw_8bit": (8, True),
              "paged_adamw_32bit": (32, True)}
"""bitsandbytes' AdamW names: (optimizer state bits, paged)."""


def check_optim(name: str) -> None:
    """A one-line ConfigError unless ``name`` is an optim built here (bitsandbytes' only where it is installed)."""
    built = TORCH_OPTIMS + tuple(BNB_OPTIMS)
    if name in BNB_OPTIMS and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim {name} needs bitsandbytes, which is not installed (pip install bitsandbytes), "
                          "or use adamw_torch")
    if name not in built:
        from transformers.training_args import OptimizerNames

        what = "a transformers optim not built here" if name in {o.value for o in OptimizerNames} else "unknown"
        raise ConfigError(f"optim {name}: {what}; choose from {', '.join(built)}")


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """``cfg.optim`` (TrainingArguments' names) over ``params``. adamw_torch is torch's AdamW with the fused
    kernel where it runs (CPU and CUDA: about 10x faster than the per-tensor loop on CPU, which matters
    when the embedding and head are trained); adamw_torch_fused insists on it."""
    name = getattr(cfg, "optim", "adamw_torch")
    check_optim(name)
    lr, wd = cfg.learning_rate, cfg.weight_decay
    betas = (getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999))  # torch's defaults unless set
    eps = getattr(cfg, "adam_epsilon", 1e-8)
    if name in ("adamw_torch", "adamw_torch_fused"):
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in params)
        if name == "adamw_torch_fused" and not fused:
            raise UserError("optim adamw_torch_fused: torch's fused AdamW does not run on these parameters' "
                            "device or dtype; use adamw_torch")
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, eps=eps, fused=fused or None)
    if name == "adafactor":  # as Trainer builds it: the given learning rate, no relative step
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    if name in ("sgd", "adagrad", "rmsprop"):
        kind = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[name]
        return kind(params, lr=lr, weight_decay=wd, **({} if name == "sgd" else {"eps": eps}))
    bits, paged = BNB_OPTIMS[name]
    import bitsandbytes as bnb

    return bnb.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, optim_bits=bits, is_paged=paged)


def make_scheduler(optimizer, cfg, total_steps: int):
    """``transformers.get_scheduler(cfg.scheduler, ...)``: HF's schedules and warmup (from 0 to the peak over the
    warmup steps), with ``lr_scheduler_kwargs`` passed on (cosine_with_min_lr's min_lr or min_lr_rate, ...)."""
    from transformers import get_scheduler

    kwargs = dict(getattr(cfg, "lr_scheduler_kwargs", None) or {})
    check_scheduler(cfg.scheduler, kwargs)
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup_steps_of(cfg, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
