"""Reference computations the estimator tests check the library against, kept with the tests: nothing in the
library calls them (the trainer and eval compute through ``pair_statistics`` and ``sft_loss``)."""

from __future__ import annotations

import math

import torch

from pipeline.estimator.losses import pair_statistics, validate_loss_args
from pipeline.estimator.sft_objective import EPS


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses on (estimated) ELBOs, TRL's ``dpo_loss`` shape: ``(losses, chosen_rewards,
    rejected_rewards)``, each [B], the rewards ``beta * log-ratio`` detached; the settings validated first,
    as a config validates them."""
    validate_loss_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    stats = pair_statistics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len)
    return stats.losses, stats.chosen_rewards, stats.rejected_rewards


def timestep_weight(size: int, length: int, eps: float = EPS) -> float:
    """E over t ~ U(eps, 1] of (1/t) * t^l * (1-t)^(L-l), l = ``size``: the weight of one mask of size l
    in the expected loss times L. Exact: the integrand is a polynomial (l >= 1), integrated term by term."""
    if not 1 <= size <= length:
        raise ValueError(f"timestep_weight: need 1 <= size <= L, got size={size}, L={length}")
    # (1/t) t^l (1-t)^(L-l) = sum_j C(L-l, j) (-1)^j t^(l-1+j)
    total = 0.0
    for j in range(length - size + 1):
        k = size + j  # exponent after integration
        total += math.comb(length - size, j) * (-1) ** j * (1.0 - eps ** k) / k
    return total / (1.0 - eps)


def expected_loss(subset_sums: dict[tuple[int, ...], float], length: int, eps: float = EPS) -> float:
    """E[loss(y)] from S(M) = sum of log p over M for every non-empty mask M (tuples of positions):
    sum over M of P-weight(|M|) * (-S(M)) / L. With eps = 0 it is (1/L) sum_l (1/l) mean_{|M|=l} -S(M)."""
    return sum(timestep_weight(len(m), length, eps) * -s for m, s in subset_sums.items()) / length
