"""DPO-family losses on estimated ELBOs, and their closed-form gradients.

All functions are pure and work per pair (no reduction): the caller averages.

With ``delta = (B_pi(c) - B_ref(c)) - (B_pi(r) - B_ref(r))`` every loss here
depends on a pair only through ``delta``, so its gradient with respect to the
policy is ``loss_weight(delta) * d(delta)/d(theta)``. Because ``delta`` is a
mean over n sampled terms, ``d(delta)/dT_k(c) = 1/n`` and
``d(delta)/dT_k(r) = -1/n``: one no-grad pass gives ``loss_weight`` per pair,
after which each sequence's terms can be backpropagated on their own with a
fixed scalar weight and the accumulated gradient equals the one-pass gradient
(shared/reference/estimator-math.md, "The gradient, sample by sample").
``sequence_weights`` packages that bookkeeping for the trainer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
"""Accepted ``loss_type`` values (``--loss``)."""

# Loss types for which label smoothing has a meaning; the others refuse a
# non-zero value rather than silently ignoring it.
_SMOOTHED = ("sigmoid", "robust")


def validate_loss_args(*, beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise ConfigError when the loss settings are unusable."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss: unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta: must be a finite number > 0, got {beta!r}")
    if not (isinstance(label_smoothing, (int, float)) and math.isfinite(label_smoothing)):
        raise ConfigError(f"label_smoothing: must be a number, got {label_smoothing!r}")
    if label_smoothing != 0.0 and loss_type not in _SMOOTHED:
        raise ConfigError(
            f"label_smoothing: only the sigmoid and robust losses use it; got {label_smoothing} with loss {loss_type!r}"
        )
    # At 0.5 the sigmoid loss no longer prefers either side and the robust
    # loss divides by zero, so both require [0, 0.5).
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing: must be in [0, 0.5) for loss {loss_type!r}, got {label_smoothing}")


def _loss_of_delta(delta: torch.Tensor, beta: float, loss_type: str, ls: float) -> torch.Tensor:
    x = beta * delta
    if loss_type == "sigmoid":
        # Conservative DPO (cDPO): the label is flipped with probability ls.
        loss = -F.logsigmoid(x)
        if ls:
            loss = (1.0 - ls) * loss - ls * F.logsigmoid(-x)
        return loss
    if loss_type == "ipo":
        # IPO regresses delta onto 1/(2 beta) (TRL's form).
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - x)
    # robust (rDPO, Chowdhury et al. 2024): unbiased under label noise rate ls.
    return ((1.0 - ls) * -F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1.0 - 2.0 * ls)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses on (estimated) ELBOs.

    Arguments are [B] tensors: the policy's and the reference's ELBO estimates
    of the chosen and rejected responses. Returns ``(losses, chosen_rewards,
    rejected_rewards)``, each [B]; rewards are ``beta * (policy - ref)``,
    detached (they are for logging and accuracy, never for the gradient).
    """
    validate_loss_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    delta = chosen_logratio - rejected_logratio
    losses = _loss_of_delta(delta, float(beta), loss_type, float(label_smoothing))
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def loss_weight(
    delta: torch.Tensor | float,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """dLoss/d(delta) per pair, in closed form (no autograd).

    The result is detached and has ``delta``'s shape; multiply it by 1/n for
    each of the n chosen terms and by -1/n for each rejected term.
    """
    validate_loss_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    d = torch.as_tensor(delta).detach()
    if not d.is_floating_point():
        d = d.to(torch.float64)
    beta = float(beta)
    ls = float(label_smoothing)
    x = beta * d
    # d/dx[-log sigmoid(x)] = -sigmoid(-x);  d/dx[-log sigmoid(-x)] = sigmoid(x).
    if loss_type == "sigmoid":
        return beta * (-(1.0 - ls) * torch.sigmoid(-x) + ls * torch.sigmoid(x))
    if loss_type == "ipo":
        return 2.0 * (d - 1.0 / (2.0 * beta))
    if loss_type == "hinge":
        # relu'(0) = 0 in torch, so the kink itself counts as flat (strict >).
        return torch.where(1.0 - x > 0, torch.full_like(d, -beta), torch.zeros_like(d))
    return beta * (-(1.0 - ls) * torch.sigmoid(-x) - ls * torch.sigmoid(x)) / (1.0 - 2.0 * ls)


def _check_lengths(chosen_len: torch.Tensor | int) -> torch.Tensor:
    length = torch.as_tensor(chosen_len)
    if bool((length <= 0).any()):
        raise ValueError("sft_loss: chosen_len must be > 0 for every pair")
    return length


def sft_loss(policy_chosen_elbo: torch.Tensor, chosen_len: torch.Tensor | int) -> torch.Tensor:
    """Per-pair SFT term: ``-elbo / len``, a bound on the chosen response's per-token NLL.

    Scaled by ``--sft-weight`` (alpha) and added to the DPO loss as TRL's
    ``rpo_alpha`` does.
    """
    length = _check_lengths(chosen_len)
    return -policy_chosen_elbo / length.to(policy_chosen_elbo.dtype)


def sft_loss_weight(chosen_len: torch.Tensor | int) -> torch.Tensor:
    """d(sft_loss)/d(elbo) per pair: ``-1/len`` (float64, detached)."""
    length = _check_lengths(chosen_len)
    return -1.0 / length.to(torch.float64)


def sequence_weights(
    delta: torch.Tensor,
    n_samples: int,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    normalizer: float = 1.0,
    dpo_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar weights for backpropagating each sampled term on its own.

    For the objective ``sum_b [dpo_weight * dpo_b + sft_weight * sft_b] / normalizer`` (use
    ``normalizer=B`` for a batch mean) with each ELBO the mean of
    ``n_samples`` terms, returns ``(chosen_w, rejected_w)``, each [B]: call
    ``(terms_chosen[b].sum() * chosen_w[b]).backward()`` (and likewise for
    the rejected terms) per sequence and the summed gradients equal the
    gradient of the objective computed in one pass.
    """
    if n_samples <= 0:
        raise ValueError("sequence_weights: n_samples must be > 0")
    w = dpo_weight * loss_weight(delta, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    chosen_w = w.clone()
    if sft_weight:
        if chosen_len is None:
            raise ValueError("sequence_weights: chosen_len is required when sft_weight != 0")
        chosen_w = chosen_w + sft_weight * sft_loss_weight(chosen_len).to(w.dtype)
    scale = 1.0 / (n_samples * normalizer)
    return chosen_w * scale, -w * scale
