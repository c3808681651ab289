"""DPO-family losses on estimated ELBOs, their gradients, and the one function of a pair's DPO statistics.

All functions are pure and work per pair (no reduction): the caller averages.

With ``delta = (B_pi(c) - B_ref(c)) - (B_pi(r) - B_ref(r))`` most losses here
depend on a pair only through ``delta`` (``OF_DELTA``); the others (apo_zero,
apo_down, sppo_hard, nca_pair) through its two log-ratios apart. A loss is one
function of ``(chosen, rejected, beta, label_smoothing)`` in ``PREFERENCE_LOSSES``,
on sequence scores, as TRL's ``DPOTrainer.dpo_loss`` writes it. Its gradient with
respect to the policy is ``w_c * d(chosen)/d(theta) + w_r * d(rejected)/d(theta)``, where
``(w_c, w_r)`` is autograd of that function at the detached log-ratios (no
derivative is written by hand, so adding one of TRL's losses is one function).
Because each ELBO is a mean over n sampled terms, ``d(chosen)/dT_k(c) = 1/n``
and ``d(rejected)/dT_k(r) = 1/n``: one no-grad pass gives the weights per
pair, after which each sequence's terms can be backpropagated on their own
with a fixed scalar weight and the accumulated gradient equals the one-pass
gradient (docs/estimator.md, "The gradient, sample by sample").
``sequence_weights`` packages that bookkeeping for the trainer.

``pair_statistics`` is the one place a pair's loss, rewards, margin, credit
and log-probabilities are computed: train's batch loss, the held-out sums of
``pipeline.evaluation.preference`` and eval's margin summary all read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from pipeline.core.errors import ConfigError
from pipeline.core.lazy import deferred

torch = deferred("torch")  # the configs read LOSS_TYPES; the CLI's help and flag errors skip torch
F = deferred("torch.nn.functional")


def sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """DPO's loss; with label smoothing ls, conservative DPO (cDPO: the label is flipped with probability ls)."""
    x = beta * (chosen - rejected)
    loss = -F.logsigmoid(x)
    return (1.0 - ls) * loss - ls * F.logsigmoid(-x) if ls else loss


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """IPO regresses delta (of per-token log-ratios, see ``log_ratios``) onto 1/(2 beta), as TRL does."""
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """SLiC's hinge on beta * delta (relu'(0) = 0 in torch: the kink itself counts as flat)."""
    return torch.relu(1.0 - beta * (chosen - rejected))


def robust_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024): unbiased under label noise rate ls."""
    x = beta * (chosen - rejected)
    return ((1.0 - ls) * -F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1.0 - 2.0 * ls)


EXO_EPSILON = 1e-3
"""EXO's epsilon when label_smoothing is 0 (TRL's choice)."""


def exo_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16): the reverse KL from the label distribution (1 - eps, eps) to
    sigmoid(beta * delta); eps is label_smoothing, EXO_EPSILON when that is 0."""
    eps = ls or EXO_EPSILON
    x = beta * (chosen - rejected)
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1.0 - eps)) \
        + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))


DISCOPOP_TAU = 0.05
"""DiscoPOP's temperature (TRL's discopop_tau default; other values are refused in a config)."""


def discopop_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """DiscoPOP (Chan et al. 2024, eq. 5): the logistic and exponential losses of beta * delta, blended by
    sigmoid(beta * delta / tau)."""
    x = beta * (chosen - rejected)
    blend = torch.sigmoid(x / DISCOPOP_TAU)
    return -F.logsigmoid(x) * (1.0 - blend) + torch.exp(-x) * blend


def apo_zero_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise the chosen log-ratio, lower the rejected one, each
    against zero (chosen answers better than the model's own)."""
    return 1.0 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


def apo_down_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """APO-down (eq. 8): lower the chosen log-ratio, and the rejected one more (chosen answers worse than
    the model's own)."""
    return torch.sigmoid(beta * chosen) + 1.0 - torch.sigmoid(beta * (chosen - rejected))


def sppo_hard_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """SPPO with hard probabilities (Wu et al. 2024): each log-ratio regressed onto +-1/(2 beta)."""
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def nca_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, ls: float) -> torch.Tensor:
    """NCA (Chen et al. 2024) on a pair: the chosen reward pushed up absolutely, both rewards pulled down."""
    c, r = beta * chosen, beta * rejected
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


PREFERENCE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_loss,
    "exo_pair": exo_pair_loss, "discopop": discopop_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss,
    "sppo_hard": sppo_hard_loss, "nca_pair": nca_pair_loss}
"""TRL's loss_type names -> the per-pair loss of the (chosen, rejected) log-ratios: the only place a loss is
written."""

LOSS_TYPES = tuple(PREFERENCE_LOSSES)
"""Accepted ``loss_type`` values (``--loss``)."""

OF_DELTA = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop")
"""Losses that see a pair only through delta = chosen - rejected log-ratio (``loss_weight`` applies)."""

NOT_BUILT: dict[str, str] = {
    "bco_pair": "its reward baseline is a running mean over the batches seen so far (state outside the pair's "
                "scores, which a resume would have to replay); use sigmoid or apo_zero",
    "aot": "it sorts the log-ratios across the batch, so a pair's loss depends on its batch-mates; use sigmoid",
    "aot_pair": "it sorts the log-ratios across the batch, so a pair's loss depends on its batch-mates; use sigmoid",
    "sigmoid_norm": "it needs per-token log-probabilities, not the ELBO per sequence; use ipo (per token)",
}
"""TRL's loss types not built here, with why (a one-line error names it)."""

PER_TOKEN = ("ipo",)
"""Losses whose log-ratios are per token (divided by the response length), as TRL computes them."""

# Loss types for which label smoothing has a meaning; the others refuse a
# non-zero value rather than silently ignoring it.
_SMOOTHED = ("sigmoid", "robust", "exo_pair")


def validate_loss_args(*, beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise ConfigError when the loss settings are unusable."""
    if loss_type in NOT_BUILT:
        raise ConfigError(f"loss: {loss_type!r} is not built here: {NOT_BUILT[loss_type]}")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss: unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta: must be a finite number > 0, got {beta!r}")
    if not (isinstance(label_smoothing, (int, float)) and math.isfinite(label_smoothing)):
        raise ConfigError(f"label_smoothing: must be a number, got {label_smoothing!r}")
    if label_smoothing != 0.0 and loss_type not in _SMOOTHED:
        raise ConfigError(f"label_smoothing: only the sigmoid, robust and exo_pair losses use it; got {label_smoothing} with "
                          f"loss {loss_type!r}")
    # At 0.5 the sigmoid loss no longer prefers either side and the robust
    # loss divides by zero, so both require [0, 0.5).
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing: must be in [0, 0.5) for loss {loss_type!r}, got {label_smoothing}")


def _per_token(loss_type: str, chosen: torch.Tensor, rejected: torch.Tensor, chosen_len, rejected_len):
    """(chosen, rejected) per pair divided by their responses' lengths for IPO (in chosen's dtype), else as given."""
    if loss_type not in PER_TOKEN:
        return chosen, rejected
    if chosen_len is None or rejected_len is None:
        raise ValueError("the ipo loss needs chosen_len and rejected_len (response lengths in tokens)")
    lc, lr = torch.as_tensor(chosen_len), torch.as_tensor(rejected_len)
    if bool((lc <= 0).any()) or bool((lr <= 0).any()):
        raise ValueError("ipo: response lengths must be > 0")
    return chosen / lc.to(chosen.device, chosen.dtype), rejected / lr.to(chosen.device, chosen.dtype)


def log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, loss_type: str = "sigmoid",
               chosen_len=None, rejected_len=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-ratios B_pi - B_ref as the loss sees them.

    For ``ipo`` each is divided by its response's length in tokens, as TRL's
    DPOTrainer does (it averages log-probabilities over the completion before
    IPO's squared loss), so IPO's target margin 1/(2 beta) is per token and a
    beta from a TRL config means the same here. The other losses use the summed ELBOs.
    """
    return _per_token(loss_type, policy_chosen - ref_chosen, policy_rejected - ref_rejected, chosen_len, rejected_len)


def preference_delta(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, loss_type: str = "sigmoid",
                     chosen_len=None, rejected_len=None) -> torch.Tensor:
    """The loss's argument delta: chosen log-ratio minus rejected log-ratio (per token for ipo)."""
    c, r = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_type=loss_type,
                      chosen_len=chosen_len, rejected_len=rejected_len)
    return c - r


TIE_RTOL = 1e-5
"""A reward margin within this fraction of the rewards' scale is a tie (float noise of ELBO sums)."""


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
                    chosen_len=None, rejected_len=None) -> torch.Tensor:
    """Per-pair credit of ``rewards/accuracies``, the one tie rule of train and eval: 1 when the chosen
    reward beats the rejected one, 0 when it loses, 0.5 on a tie. A tie is a margin within TIE_RTOL of
    beta * (|B_ref(c)| + |B_ref(r)|) (per token for ipo): the rounding noise of a policy equal to the
    reference, which is neither a win nor a loss."""
    ref_c, ref_r = _per_token(loss_type, ref_chosen.abs().to(torch.float64), ref_rejected.abs().to(torch.float64),
                              chosen_len, rejected_len)
    tol = TIE_RTOL * float(beta) * (ref_c + ref_r)
    margin = (chosen_rewards - rejected_rewards).to(torch.float64)
    return torch.where(margin > tol, 1.0, torch.where(margin >= -tol, 0.5, 0.0)).to(torch.float64)


METRICS = {"losses": "loss", "chosen_rewards": "rewards/chosen", "rejected_rewards": "rewards/rejected",
           "accuracies": "rewards/accuracies", "margins": "rewards/margins", "chosen_logps": "logps/chosen",
           "rejected_logps": "logps/rejected", "preference_losses": "preference_loss", "sft_losses": "nll_loss"}
"""PairStatistics' fields -> TRL's metric names (train's ``loss``, ``rewards/...``, ``logps/...``, ``nll_loss``;
``eval/`` + these)."""


@dataclass(frozen=True)
class PairStatistics:
    """A batch's per-pair DPO statistics ([B] tensors); only ``losses`` keeps the graph."""

    losses: torch.Tensor
    """The objective per pair: preference_weight x the preference loss + sft_weight x the SFT term."""
    chosen_rewards: torch.Tensor
    """beta x the chosen log-ratio (per token for ipo)."""
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    """chosen_rewards - rejected_rewards."""
    accuracies: torch.Tensor
    """The credit of rewards/accuracies: 1 won, 0 lost, 0.5 a tie (``reward_accuracy``'s one tie rule)."""
    chosen_logps: torch.Tensor
    """The policy's ELBO of the chosen response (TRL's logps/chosen)."""
    rejected_logps: torch.Tensor
    preference_losses: torch.Tensor | None = None
    """The loss's preference term per pair (weighted; None, summed as 0, when the loss has none)."""
    sft_losses: torch.Tensor | None = None
    """The SFT term per pair before its weight (TRL's nll_loss with rpo_alpha); None, summed as 0, when the loss
    has none."""

    def sums(self) -> dict[str, float]:
        """Each statistic summed over the pairs, under its TRL name (additive: reduce by summing)."""
        return {name: float(getattr(self, field).double().sum()) if getattr(self, field) is not None else 0.0
                for field, name in METRICS.items()}


def pair_statistics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, chosen_len=None, rejected_len=None, preference_weight: float = 1.0,
                    sft_weight: float = 0.0) -> PairStatistics:
    """The one computation of a batch's DPO statistics from its ELBOs (policy's and reference's, [B] each).

    ``losses`` is train's objective per pair (the gradient flows through ``policy_*``; a term of weight 0 is
    left out, so eval's margins, ``preference_weight=0``, take any beta); the credit compares
    the log-ratios themselves (their sign before beta scales them) with the tie rule of ``reward_accuracy``."""
    chosen, rejected = log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_type=loss_type,
                                  chosen_len=chosen_len, rejected_len=rejected_len)
    losses = torch.zeros_like(chosen)
    preference = sft = None
    if preference_weight:  # a loss of weight 0 is not computed (eval's margins take any beta, 0 included)
        validate_loss_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        losses = preference_weight * PREFERENCE_LOSSES[loss_type](chosen, rejected, float(beta), float(label_smoothing))
        preference = losses.detach()
    if sft_weight:
        sft = sft_loss(policy_chosen, chosen_len)
        losses = losses + sft_weight * sft
        sft = sft.detach()
    chosen, rejected = chosen.detach(), rejected.detach()
    credit = reward_accuracy(chosen, rejected, ref_chosen, ref_rejected, beta=1.0, loss_type=loss_type,
                             chosen_len=chosen_len, rejected_len=rejected_len)
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    return PairStatistics(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                          margins=chosen_rewards - rejected_rewards, accuracies=credit,
                          chosen_logps=policy_chosen.detach(), rejected_logps=policy_rejected.detach(),
                          preference_losses=preference, sft_losses=sft)


def _autograd_weight(fn: Callable[..., torch.Tensor], *at: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d(sum fn(x, ...))/dx for each argument at ``at`` by autograd (each entry's own derivative: fn works per
    entry), detached."""
    xs = [a.detach().clone().requires_grad_(True) for a in at]
    with torch.enable_grad(), torch.autocast(xs[0].device.type, enabled=False):
        grads = torch.autograd.grad(fn(*xs).sum(), xs)
    return tuple(g.detach() for g in grads)


def _floating(x: torch.Tensor | float) -> torch.Tensor:
    d = torch.as_tensor(x).detach()
    return d if d.is_floating_point() else d.to(torch.float64)


def loss_weight(delta: torch.Tensor | float, *, beta: float, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0) -> torch.Tensor:
    """dLoss/d(delta) per pair: autograd of the loss (``PREFERENCE_LOSSES``) at the detached ``delta``, for the
    losses of delta alone (``OF_DELTA``; the others: ``ratio_weights``).

    The result is detached and has ``delta``'s shape; multiply it by 1/n for
    each of the n chosen terms and by -1/n for each rejected term (and, for
    ``ipo``, by 1/length of that response: ``sequence_weights`` does both).
    """
    validate_loss_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    if loss_type not in OF_DELTA:
        raise ValueError(f"loss_weight: {loss_type} depends on the two log-ratios apart; use ratio_weights")
    d = _floating(delta)
    fn = PREFERENCE_LOSSES[loss_type]
    return _autograd_weight(lambda x: fn(x, torch.zeros_like(x), float(beta), float(label_smoothing)), d)[0]


def ratio_weights(chosen: torch.Tensor | float, rejected: torch.Tensor | float, *, beta: float,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(dLoss/d(chosen log-ratio), dLoss/d(rejected log-ratio)) per pair, by autograd at the detached values;
    for a loss of delta alone the second is minus the first."""
    validate_loss_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    fn = PREFERENCE_LOSSES[loss_type]
    c, r = _floating(chosen), _floating(rejected)
    return _autograd_weight(lambda x, y: fn(x, y, float(beta), float(label_smoothing)), c, r.to(c.dtype))


def sft_loss(policy_chosen_elbo: torch.Tensor, chosen_len: torch.Tensor | int) -> torch.Tensor:
    """Per-pair SFT term: ``-elbo / len``, a bound on the chosen response's per-token NLL.

    Scaled by ``--sft-weight`` (alpha) and added to the DPO loss as TRL's
    ``rpo_alpha`` does.
    """
    length = torch.as_tensor(chosen_len)
    if bool((length <= 0).any()):
        raise ValueError("sft_loss: chosen_len must be > 0 for every pair")
    return -policy_chosen_elbo / length.to(policy_chosen_elbo.dtype)


def sft_loss_weight(chosen_len: torch.Tensor | int) -> torch.Tensor:
    """d(sft_loss)/d(elbo) per pair by autograd (``-1/len``; float64, detached)."""
    shape = torch.as_tensor(chosen_len).shape
    return _autograd_weight(lambda elbo: sft_loss(elbo, chosen_len), torch.zeros(shape, dtype=torch.float64))[0]


def sequence_weights(delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor], n_samples: int, *, beta: float,
                     loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0,
                     chosen_len: torch.Tensor | None = None, normalizer: float = 1.0, dpo_weight: float = 1.0,
                     rejected_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar weights for backpropagating each sampled term on its own.

    For the objective ``sum_b [dpo_weight * dpo_b + sft_weight * sft_b] / normalizer`` (use
    ``normalizer=B`` for a batch mean) with each ELBO the mean of
    ``n_samples`` terms, returns ``(chosen_w, rejected_w)``, each [B]: call
    ``(terms_chosen[b].sum() * chosen_w[b]).backward()`` (and likewise for
    the rejected terms) per sequence and the summed gradients equal the
    gradient of the objective computed in one pass. ``delta`` is the loss's
    argument (``preference_delta``), or the pair of (chosen, rejected) log-ratios (``log_ratios``), which the
    losses of the two apart (apo_zero, sppo_hard, ...) need; for ``ipo`` the weights carry the
    1/length of each log-ratio, so both lengths are needed.
    """
    if n_samples <= 0:
        raise ValueError("sequence_weights: n_samples must be > 0")
    if isinstance(delta, tuple):
        w_c, w_r = ratio_weights(*delta, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    else:
        w_c = loss_weight(delta, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        w_r = -w_c
    chosen_w, rejected_w = _per_token(loss_type, dpo_weight * w_c, dpo_weight * w_r, chosen_len, rejected_len)
    if sft_weight:
        if chosen_len is None:
            raise ValueError("sequence_weights: chosen_len is required when sft_weight != 0")
        chosen_w = chosen_w + sft_weight * sft_loss_weight(chosen_len).to(chosen_w.dtype)
    scale = 1.0 / (n_samples * normalizer)
    return chosen_w * scale, rejected_w * scale
