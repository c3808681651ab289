"""The variance of the preference-score estimator, from the per-sample terms train already computes (pure).

A pair's preference score is ``delta = (B_pi(c) - B_ref(c)) - (B_pi(r) - B_ref(r))``, each ELBO estimated by the
mean of n Monte Carlo terms on shared masks (policy and reference on the same masks: VRPO's antithetic
sampling). With the per-sample differences

    d_k = (T_pi,k(c) - T_ref,k(c)) - (T_pi,k(r) - T_ref,k(r)),   k = 1..n,

the estimate is ``mean_k d_k`` and the variance of that estimate is estimated by ``s^2 / n``, s^2 the sample
variance of the d_k (denominator n - 1). It shrinks as 1/n, and shared masks make it small because the policy's
and the reference's terms on one mask move together (their difference cancels most of the mask's noise).

Caveat: the n counts of one draw are stratified (one uniform offset, evenly spaced: ``pipeline.estimator.diffusion``), so
the d_k are not independent; ``s^2 / n`` treats them as if they were. Stratification lowers the true variance,
so the figure is an upper estimate of the estimator's variance at this budget (bench/vrpo.py measures the true
one across independent draws). With n = 1 there is no estimate (NaN).
"""

from __future__ import annotations

import torch


def per_sample_scores(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, chosen_len=None, rejected_len=None) -> torch.Tensor:
    """[B, n] per-sample differences d_k (float64) from [B, n] terms; with lengths ([B]) each side's log-ratio
    is per token (ipo's delta, ``pipeline.estimator.losses.log_ratios``)."""
    c = policy_chosen.detach().double() - ref_chosen.detach().double().to(policy_chosen.device)
    r = policy_rejected.detach().double() - ref_rejected.detach().double().to(policy_chosen.device)
    if chosen_len is not None and rejected_len is not None:
        c = c / torch.as_tensor(chosen_len, dtype=torch.float64, device=c.device).reshape(-1, 1)
        r = r / torch.as_tensor(rejected_len, dtype=torch.float64, device=c.device).reshape(-1, 1)
    return c - r


def score_variance(d: torch.Tensor) -> torch.Tensor:
    """[B] estimated variance of each pair's score ``mean_k d_k``: the sample variance of its d_k over n.
    NaN where n < 2."""
    if d.dim() != 2:
        raise ValueError(f"score_variance: expected [pairs, samples], got shape {list(d.shape)}")
    n = d.shape[1]
    if n < 2:
        return torch.full((d.shape[0],), float("nan"), dtype=torch.float64, device=d.device)
    return d.double().var(dim=1, unbiased=True) / n
