"""The schedule and optimizer settings train and sft share (pipeline/trainer/optim.py), in transformers' terms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.trainer.optim import (
    check_optim,
    check_scheduler,
    make_optimizer,
    make_scheduler,
    scheduler_names,
    warmup_steps_of,
)


def _cfg(**kw):
    base = dict(scheduler="linear", warmup_ratio=0.0, warmup_steps=0, lr_scheduler_kwargs=None, learning_rate=1.0)
    return SimpleNamespace(**{**base, **kw})


def _lrs(cfg, total):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    sched = make_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_every_transformers_scheduler_name_applies_but_the_metric_driven_ones():
    from transformers import SchedulerType

    names = set(scheduler_names())
    assert {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
            "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"} <= names
    assert names | {"reduce_lr_on_plateau", "greedy"} == {t.value for t in SchedulerType}
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau cannot apply here: it steps on an eval metric"):
        check_scheduler("reduce_lr_on_plateau")
    with pytest.raises(ConfigError, match="must be one of .*got 'cosin'"):
        check_scheduler("cosin")


def test_warmup_starts_at_zero_as_in_transformers():
    # 4 warmup steps of 10: 0, 1/4, 2/4, 3/4, then linear decay from the peak over the last 6.
    lrs = _lrs(_cfg(warmup_steps=4), 10)
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_warmup_steps_wins_over_warmup_ratio_when_positive():
    assert warmup_steps_of(_cfg(warmup_ratio=0.5), 10) == 5
    assert warmup_steps_of(_cfg(warmup_ratio=0.5, warmup_steps=2), 10) == 2
    assert warmup_steps_of(_cfg(warmup_ratio=0.05), 10) == 1  # ceil, as TrainingArguments
    assert warmup_steps_of(_cfg(warmup_steps=0.25), 10) == 3  # a share below 1, as transformers 5 reads it


def test_cosine_with_min_lr_ends_at_its_floor_and_needs_its_argument():
    lrs = _lrs(_cfg(scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}), 101)
    assert lrs[0] == pytest.approx(1.0)
    # transformers: min_lr_rate + (1 - min_lr_rate) * cos-half-wave over step / total (no warmup here)
    assert lrs[50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 101)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 100 / 101)))
    assert min(lrs) > 0.1
    with pytest.raises(ConfigError, match="not accepted by the cosine_with_min_lr scheduler"):
        check_scheduler("cosine_with_min_lr", {})
    with pytest.raises(ConfigError, match="not accepted by the cosine scheduler"):
        check_scheduler("cosine", {"no_such_argument": 1})


def test_constant_is_flat_and_constant_with_warmup_warms_up():
    assert _lrs(_cfg(scheduler="constant", warmup_steps=2), 4) == [1.0] * 4
    assert _lrs(_cfg(scheduler="constant_with_warmup", warmup_steps=2), 4) == pytest.approx([0, 0.5, 1, 1])


def test_warmup_stable_decay_and_polynomial_run():
    wsd = _lrs(_cfg(scheduler="warmup_stable_decay", warmup_steps=2,
                    lr_scheduler_kwargs={"num_decay_steps": 2}), 8)
    assert wsd[:2] == pytest.approx([0.0, 0.5]) and wsd[2:6] == pytest.approx([1.0] * 4) and wsd[7] < 1.0
    poly = _lrs(_cfg(scheduler="polynomial", lr_scheduler_kwargs={"power": 2.0, "lr_end": 0.0}), 4)
    assert poly == pytest.approx([1.0, 0.5625, 0.25, 0.0625])


@pytest.mark.parametrize("name, kind", [("adamw_torch", torch.optim.AdamW), ("adamw_torch_fused", torch.optim.AdamW),
                                        ("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad),
                                        ("rmsprop", torch.optim.RMSprop), ("adafactor", None)])
def test_each_optim_name_builds_its_optimizer_and_steps(name, kind):

    w = torch.nn.Parameter(torch.ones(4, 3))
    opt = make_optimizer([w], SimpleNamespace(optim=name, learning_rate=0.1, weight_decay=0.0))
    if kind is None:
        from transformers.optimization import Adafactor

        kind = Adafactor
    assert type(opt) is kind
    assert opt.param_groups[0]["lr"] == 0.1
    if name == "adamw_torch_fused":
        assert opt.param_groups[0]["fused"]
    (w ** 2).sum().backward()
    opt.step()
    assert bool((w < 1).all())


def test_sgd_takes_one_plain_gradient_step():

    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = make_optimizer([w], SimpleNamespace(optim="sgd", learning_rate=0.25, weight_decay=0.0))
    (w ** 2).sum().backward()  # gradient 4
    opt.step()
    assert w.item() == pytest.approx(1.0)


def test_bitsandbytes_optims_need_bitsandbytes_and_other_names_are_refused():
    import importlib.util


    if importlib.util.find_spec("bitsandbytes") is None:
        for name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
            with pytest.raises(ConfigError, match=f"optim {name} needs bitsandbytes, which is not installed"):
                check_optim(name)
    else:
        check_optim("paged_adamw_8bit")
    with pytest.raises(ConfigError, match="optim lion_32bit: a transformers optim not built here; choose from"):
        check_optim("lion_32bit")
    with pytest.raises(ConfigError, match="optim adamw_fast: unknown"):
        check_optim("adamw_fast")
