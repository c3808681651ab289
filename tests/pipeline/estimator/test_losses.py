"""DPO-family losses: hand-worked values, closed-form gradients, and the
sequence-by-sequence gradient identity (docs/estimator.md, "The gradient, sample by sample")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import ConfigError
from pipeline.estimator.losses import (
    LOSS_TYPES,
    OF_DELTA,
    loss_weight,
    preference_delta,
    ratio_weights,
    sequence_weights,
    sft_loss,
    sft_loss_weight,
    validate_loss_args,
)
from tests.pipeline.estimator.reference import dpo_loss

D = torch.float64

# Two pairs used by the hand-worked tests.
#   pair 0: policy_chosen -10, ref_chosen -12  -> chosen log-ratio   +2
#           policy_rejected -20, ref_rejected -12 -> rejected log-ratio -8
#           delta = 2 - (-8) = 10
#   pair 1: everything -5 -> delta = 0
PC = torch.tensor([-10.0, -5.0], dtype=D)
PR = torch.tensor([-20.0, -5.0], dtype=D)
RC = torch.tensor([-12.0, -5.0], dtype=D)
RR = torch.tensor([-12.0, -5.0], dtype=D)

# Constants used below, by hand:
#   e^-1 = 0.3678794412, so -log sigmoid(1) = log(1 + e^-1) = log(1.3678794412) = 0.3132616875
#   -log sigmoid(-1) = log(1 + e) = 1 + log(1 + e^-1) = 1.3132616875
#   -log sigmoid(0) = log 2 = 0.6931471806
#   sigmoid(-1) = 1 / (1 + e) = 0.2689414214,  sigmoid(1) = 0.7310585786
SP1 = 0.3132616875
SPM1 = 1.3132616875
LN2 = 0.6931471806


def _losses(loss_type, beta, ls=0.0, **lengths):
    return dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=ls, **lengths)


def test_sigmoid_hand_worked():
    """beta = 0.1: pair 0 has beta*delta = 0.1*10 = 1, loss = log(1 + e^-1) = 0.3132616875;
    pair 1 has delta 0, loss = log 2. Rewards: 0.1*2 = 0.2 and 0.1*(-8) = -0.8; pair 1: 0 and 0."""
    losses, rc, rr = _losses("sigmoid", 0.1)
    torch.testing.assert_close(losses, torch.tensor([SP1, LN2], dtype=D), rtol=0, atol=1e-9)
    torch.testing.assert_close(rc, torch.tensor([0.2, 0.0], dtype=D))
    torch.testing.assert_close(rr, torch.tensor([-0.8, 0.0], dtype=D))


def test_sigmoid_label_smoothing_hand_worked():
    """cDPO with ls = 0.25, beta*delta = 1: 0.75*0.3132616875 + 0.25*1.3132616875
    = 0.2349462656 + 0.3283154219 = 0.5632616875; at delta 0: 0.75 ln2 + 0.25 ln2 = ln2."""
    losses, _, _ = _losses("sigmoid", 0.1, 0.25)
    torch.testing.assert_close(losses, torch.tensor([0.5632616875, LN2], dtype=D), rtol=0, atol=1e-9)


def test_ipo_hand_worked_per_token_as_trl():
    """TRL divides each log-ratio by its response length before IPO's squared loss.
    Lengths 3 (chosen) and 30 (rejected), beta = 0.5 (target 1/(2*0.5) = 1):
    pair 0: 2/3 - (-8/30) = 0.6666666667 + 0.2666666667 = 0.9333333333; (0.9333333333 - 1)^2 = 0.0044444444.
    pair 1: delta 0; (0 - 1)^2 = 1. Rewards: 0.5 * 2/3 = 0.3333333333 and 0.5 * -8/30 = -0.1333333333.
    Summed ELBOs would give (10 - 1)^2 = 81 for pair 0 whatever the lengths."""
    lengths = dict(chosen_len=torch.tensor([3, 3]), rejected_len=torch.tensor([30, 30]))
    losses, rc, rr = _losses("ipo", 0.5, **lengths)
    torch.testing.assert_close(losses, torch.tensor([0.0044444444, 1.0], dtype=D), rtol=0, atol=1e-9)
    torch.testing.assert_close(rc, torch.tensor([0.3333333333, 0.0], dtype=D), rtol=0, atol=1e-9)
    torch.testing.assert_close(rr, torch.tensor([-0.1333333333, 0.0], dtype=D), rtol=0, atol=1e-9)
    # The lengths swapped: 2/30 + 8/3 = 2.7333333333; (2.7333333333 - 1)^2 = 3.0044444444.
    swapped, _, _ = _losses("ipo", 0.5, chosen_len=torch.tensor([30, 30]), rejected_len=torch.tensor([3, 3]))
    assert swapped[0].item() == pytest.approx(3.0044444444, abs=1e-9)
    with pytest.raises(ValueError, match="ipo loss needs chosen_len and rejected_len"):
        _losses("ipo", 0.5)


def test_reward_accuracy_one_tie_rule():
    from pipeline.estimator.losses import reward_accuracy

    ref = torch.tensor([-1000.0, -1000.0, -1000.0], dtype=D)
    # Margins 1e-4 (inside 1e-5 * 0.1 * 2000 = 2e-3: a tie), +0.01 (a win), -0.01 (a loss).
    cr = torch.tensor([1e-4, 0.01, -0.01], dtype=D)
    got = reward_accuracy(cr, torch.zeros(3, dtype=D), ref, ref, beta=0.1)
    assert got.tolist() == [0.5, 1.0, 0.0]
    exact = reward_accuracy(torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), ref[:2], ref[:2], beta=0.1)
    assert exact.tolist() == [0.5, 0.5]  # an exact tie is half, never a win (TRL's strict > gives 0)


def test_hinge_hand_worked():
    """beta = 0.05: pair 0: relu(1 - 0.05*10) = relu(0.5) = 0.5; pair 1: relu(1 - 0) = 1.
    beta = 0.2: pair 0: relu(1 - 2) = 0 (margin satisfied)."""
    losses, _, _ = _losses("hinge", 0.05)
    torch.testing.assert_close(losses, torch.tensor([0.5, 1.0], dtype=D))
    losses, _, _ = _losses("hinge", 0.2)
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.0], dtype=D))


def test_robust_hand_worked():
    """rDPO, ls = 0.25, beta*delta = 1:
    (0.75*0.3132616875 - 0.25*1.3132616875) / (1 - 0.5) = (0.2349462656 - 0.3283154219) / 0.5
    = -0.1867383125; at delta 0: (0.75 ln2 - 0.25 ln2) / 0.5 = ln2. With ls = 0 it is plain sigmoid."""
    losses, _, _ = _losses("robust", 0.1, 0.25)
    torch.testing.assert_close(losses, torch.tensor([-0.1867383125, LN2], dtype=D), rtol=0, atol=1e-9)
    plain, _, _ = _losses("robust", 0.1, 0.0)
    torch.testing.assert_close(plain, torch.tensor([SP1, LN2], dtype=D), rtol=0, atol=1e-9)


def test_loss_weight_hand_worked():
    """delta = 10, beta = 0.1 (beta*delta = 1):
    sigmoid: -beta*sigmoid(-1) = -0.1*0.2689414214 = -0.02689414214
    ipo (beta 0.5): 2*(10 - 1) = 18
    hinge (beta 0.05): -0.05 while 1 - 0.5 > 0; (beta 0.2): 0
    robust ls 0.25: 0.1*(-0.75*0.2689414214 - 0.25*0.7310585786)/0.5
                   = 0.1*(-0.2017060661 - 0.1827646447)/0.5 = -0.07689414214"""
    d = torch.tensor([10.0], dtype=D)
    assert loss_weight(d, beta=0.1, loss_type="sigmoid").item() == pytest.approx(-0.02689414214, abs=1e-11)
    assert loss_weight(d, beta=0.5, loss_type="ipo").item() == pytest.approx(18.0)
    assert loss_weight(d, beta=0.05, loss_type="hinge").item() == pytest.approx(-0.05)
    assert loss_weight(d, beta=0.2, loss_type="hinge").item() == 0.0
    got = loss_weight(d, beta=0.1, loss_type="robust", label_smoothing=0.25).item()
    assert got == pytest.approx(-0.07689414214, abs=1e-11)


def test_rewards_are_detached_and_losses_carry_grad():
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    lengths = dict(chosen_len=torch.tensor([3, 4]), rejected_len=torch.tensor([5, 6]))
    for loss_type in LOSS_TYPES:
        losses, rc, rr = dpo_loss(pc, pr, RC, RR, beta=0.1, loss_type=loss_type,
                                  **(lengths if loss_type == "ipo" else {}))
        assert losses.shape == rc.shape == rr.shape == (2,)
        assert losses.requires_grad
        assert not rc.requires_grad and not rr.requires_grad
        assert rc.grad_fn is None and rr.grad_fn is None


def test_validation_errors():
    with pytest.raises(ConfigError, match="unknown loss type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
    with pytest.raises(ConfigError, match="beta"):
        loss_weight(torch.zeros(1), beta=0.0, loss_type="sigmoid")
    with pytest.raises(ConfigError, match="beta"):
        validate_loss_args(beta=float("nan"), loss_type="sigmoid")
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="sigmoid", label_smoothing=-0.1)
    with pytest.raises(ConfigError, match="only the sigmoid, robust and exo_pair"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1, chosen_len=torch.ones(2),
                 rejected_len=torch.ones(2))
    with pytest.raises(ValueError):
        sft_loss(torch.tensor([-3.0]), torch.tensor([0]))


def test_sft_loss_and_weight():
    """elbo -12 over 4 tokens -> 3 nats per token; elbo -5 over 10 tokens -> 0.5."""
    elbo = torch.tensor([-12.0, -5.0], dtype=D, requires_grad=True)
    lens = torch.tensor([4, 10])
    loss = sft_loss(elbo, lens)
    torch.testing.assert_close(loss.detach(), torch.tensor([3.0, 0.5], dtype=D))
    loss.sum().backward()
    torch.testing.assert_close(elbo.grad, sft_loss_weight(lens))
    torch.testing.assert_close(sft_loss_weight(lens), torch.tensor([-0.25, -0.1], dtype=D))


@settings(max_examples=300, deadline=None)
@given(
    loss_type=st.sampled_from(OF_DELTA),
    delta=st.floats(-60.0, 60.0, allow_nan=False),
    beta=st.floats(0.01, 5.0),
    ls=st.floats(0.0, 0.49),
)
def test_loss_weight_matches_autograd(loss_type, delta, beta, ls):
    if loss_type in ("ipo", "hinge", "discopop"):
        ls = 0.0
    if loss_type == "hinge":
        assume(abs(1.0 - beta * delta) > 1e-9)  # the kink has no derivative
    pc = torch.tensor([delta], dtype=D, requires_grad=True)
    zero = torch.zeros(1, dtype=D)
    ones = dict(chosen_len=torch.ones(1), rejected_len=torch.ones(1)) if loss_type == "ipo" else {}
    losses, _, _ = dpo_loss(pc, zero, zero, zero, beta=beta, loss_type=loss_type, label_smoothing=ls, **ones)
    losses.sum().backward()
    w = loss_weight(torch.tensor([delta], dtype=D), beta=beta, loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(w, pc.grad, rtol=1e-9, atol=1e-12)


def test_loss_weight_accepts_floats_and_keeps_shape():
    w = loss_weight(0.0, beta=1.0, loss_type="sigmoid")
    assert w.shape == () and w.item() == pytest.approx(-0.5)
    d = torch.zeros(3, 2)
    assert loss_weight(d, beta=1.0, loss_type="ipo").shape == (3, 2)


# --- the sequence-by-sequence gradient identity ----------------------------


class _TinyPolicy(torch.nn.Module):
    """A linear 'language model': the k-th term of a sequence is
    weight_k * sum over masked positions of log softmax(W x_i)[y_i]."""

    def __init__(self, d_in=6, vocab=7):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, vocab, dtype=D)

    def terms(self, seq):
        x, y, masks, weights = seq  # [L, d], [L], Bool[n, L], [n]
        logp = torch.log_softmax(self.lin(x), dim=-1).gather(1, y[:, None])[:, 0]  # [L]
        return weights * (masks.to(D) * logp).sum(dim=1)  # [n]


def _make_batch(B=3, n=4, d_in=6, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def seq(L):
        x = torch.randn(L, d_in, generator=g, dtype=D)
        y = torch.randint(0, vocab, (L,), generator=g)
        counts = torch.randint(1, L + 1, (n,), generator=g)
        masks = torch.zeros(n, L, dtype=torch.bool)
        for k in range(n):
            masks[k, torch.randperm(L, generator=g)[: counts[k]]] = True
        return x, y, masks, L / counts.to(D)

    chosen = [seq(int(L)) for L in torch.randint(3, 9, (B,), generator=g)]
    rejected = [seq(int(L)) for L in torch.randint(3, 9, (B,), generator=g)]
    ref_c = torch.randn(B, n, generator=g, dtype=D) * 3 - 12
    ref_r = torch.randn(B, n, generator=g, dtype=D) * 3 - 12
    return chosen, rejected, ref_c, ref_r


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
@pytest.mark.parametrize(
    "loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_sequence_gradient_identity(loss_type, ls, sft_weight):
    torch.manual_seed(0)
    policy = _TinyPolicy()
    chosen, rejected, ref_c, ref_r = _make_batch()
    B, n = ref_c.shape
    # beta 0.2 puts pair 0 (delta ~8.5) past the hinge and the other two before it.
    beta = 0.2 if loss_type == "hinge" else 0.1
    chosen_len = torch.tensor([c[0].shape[0] for c in chosen])
    rejected_len = torch.tensor([r[0].shape[0] for r in rejected])
    lengths = dict(chosen_len=chosen_len, rejected_len=rejected_len) if loss_type == "ipo" else {}

    # One pass over the mean of n terms (what a naive step does: 2n sequences' activations held).
    policy.zero_grad()
    pc = torch.stack([policy.terms(s) for s in chosen]).mean(1)
    pr = torch.stack([policy.terms(s) for s in rejected]).mean(1)
    losses, _, _ = dpo_loss(
        pc, pr, ref_c.mean(1), ref_r.mean(1), beta=beta, loss_type=loss_type, label_smoothing=ls, **lengths
    )
    total = losses + sft_weight * sft_loss(pc, chosen_len)
    total.mean().backward()
    one_pass = [p.grad.clone() for p in policy.parameters()]
    assert all(g.abs().sum() > 0 for g in one_pass)

    # No-grad pass for the per-pair weights, then one backward per sequence.
    policy.zero_grad()
    with torch.no_grad():
        pc0 = torch.stack([policy.terms(s) for s in chosen]).mean(1)
        pr0 = torch.stack([policy.terms(s) for s in rejected]).mean(1)
        delta = preference_delta(pc0, pr0, ref_c.mean(1), ref_r.mean(1), loss_type=loss_type, **lengths)
    w = loss_weight(delta, beta=beta, loss_type=loss_type, label_smoothing=ls)
    if loss_type == "hinge":  # the batch exercises both sides of the hinge
        assert (w == 0).any() and (w != 0).any()
    chosen_w, rejected_w = sequence_weights(
        delta, n, beta=beta, loss_type=loss_type, label_smoothing=ls,
        sft_weight=sft_weight, chosen_len=chosen_len, normalizer=B, rejected_len=rejected_len,
    )
    # The packaged weights are loss_weight/n (chosen, plus the SFT term) and -loss_weight/n, over B
    # (for ipo each log-ratio's weight also carries 1/length).
    lc, lr = (chosen_len.to(D), rejected_len.to(D)) if loss_type == "ipo" else (1.0, 1.0)
    expect_c = (w / lc + sft_weight * sft_loss_weight(chosen_len)) / (n * B)
    torch.testing.assert_close(chosen_w, expect_c)
    torch.testing.assert_close(rejected_w, -w / lr / (n * B))
    for b in range(B):
        (policy.terms(chosen[b]).sum() * chosen_w[b]).backward()
        (policy.terms(rejected[b]).sum() * rejected_w[b]).backward()
    by_sequence = [p.grad.clone() for p in policy.parameters()]

    for a, s in zip(one_pass, by_sequence):
        torch.testing.assert_close(s, a, rtol=1e-10, atol=1e-13)


def test_sequence_weights_needs_lengths_for_sft():
    with pytest.raises(ValueError, match="chosen_len"):
        sequence_weights(torch.zeros(2), 4, beta=0.1, sft_weight=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        sequence_weights(torch.zeros(2), 0, beta=0.1)


def test_sigmoid_loss_is_stable_for_large_margins():
    """No overflow: -log sigmoid(-1000) ~ 1000, -log sigmoid(1000) ~ 0, weights finite."""
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    z = torch.zeros(2)
    for loss_type, ls in (("sigmoid", 0.1), ("robust", 0.1)):
        losses, _, _ = dpo_loss(big, z, z, z, beta=0.1, loss_type=loss_type, label_smoothing=ls)
        assert torch.isfinite(losses).all()
        assert torch.isfinite(loss_weight(big, beta=0.1, loss_type=loss_type, label_smoothing=ls)).all()
    losses, _, _ = dpo_loss(big, z, z, z, beta=0.1, loss_type="sigmoid")
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(1000.0, rel=1e-6)
    assert math.isfinite(loss_weight(big, beta=0.1, loss_type="sigmoid")[1].item())


# The derivatives as they were written by hand before loss_weight became autograd (x = beta * delta).
HAND_CODED = {
    "sigmoid": lambda d, beta, ls: beta * (-(1.0 - ls) * torch.sigmoid(-beta * d) + ls * torch.sigmoid(beta * d)),
    "ipo": lambda d, beta, ls: 2.0 * (d - 1.0 / (2.0 * beta)),
    "hinge": lambda d, beta, ls: torch.where(1.0 - beta * d > 0, torch.full_like(d, -beta), torch.zeros_like(d)),
    "robust": lambda d, beta, ls: beta * (-(1.0 - ls) * torch.sigmoid(-beta * d) - ls * torch.sigmoid(beta * d))
    / (1.0 - 2.0 * ls),
}


@pytest.mark.parametrize("loss_type", sorted(HAND_CODED))
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_autograd_loss_weights_equal_the_hand_coded_derivatives(loss_type, beta):
    """The hinge's kink (beta * delta = 1) included: relu'(0) = 0, as the hand-coded strict > said."""
    ls = 0.2 if loss_type in ("sigmoid", "robust") else 0.0
    d = torch.tensor([-300.0, -7.5, -1.0, 0.0, 0.3, 1.0 / beta, 4.0, 250.0], dtype=D)
    got = loss_weight(d, beta=beta, loss_type=loss_type, label_smoothing=ls)
    torch.testing.assert_close(got, HAND_CODED[loss_type](d, beta, ls), rtol=1e-12, atol=1e-15)
    lens = torch.tensor([1, 3, 8])
    torch.testing.assert_close(sft_loss_weight(lens), -1.0 / lens.to(D), rtol=0, atol=0)


def test_pair_statistics_hand_worked():
    """Pairs of the hand-worked tests (delta 10 and 0), beta 0.1, preference weight 2, SFT weight 0.5 with
    chosen lengths 4 and 5: losses 2 * (0.3132616875, log 2) + 0.5 * (10/4, 5/5) = (1.876523375, 1.886294361);
    rewards (0.2, 0) and (-0.8, 0), margins (1, 0), credits (1, 0.5: the tie), logps the policy's ELBOs."""
    from pipeline.estimator.losses import pair_statistics

    s = pair_statistics(PC, PR, RC, RR, beta=0.1, preference_weight=2.0, sft_weight=0.5,
                        chosen_len=torch.tensor([4, 5]), rejected_len=torch.tensor([1, 1]))
    torch.testing.assert_close(s.losses, torch.tensor([2 * SP1 + 1.25, 2 * LN2 + 0.5], dtype=D), rtol=0, atol=1e-9)
    torch.testing.assert_close(s.chosen_rewards, torch.tensor([0.2, 0.0], dtype=D))
    torch.testing.assert_close(s.rejected_rewards, torch.tensor([-0.8, 0.0], dtype=D))
    torch.testing.assert_close(s.margins, torch.tensor([1.0, 0.0], dtype=D))
    assert s.accuracies.tolist() == [1.0, 0.5]
    assert s.chosen_logps.tolist() == [-10.0, -5.0] and s.rejected_logps.tolist() == [-20.0, -5.0]
    sums = s.sums()
    assert sums["loss"] == pytest.approx(2 * SP1 + 2 * LN2 + 1.75, abs=1e-9)
    assert sums["rewards/accuracies"] == 1.5 and sums["rewards/margins"] == pytest.approx(1.0)
    assert sums["logps/chosen"] == -15.0 and sums["logps/rejected"] == -25.0


def test_pair_statistics_ipo_is_per_token():
    """IPO, beta 0.5, chosen lengths (2, 5), rejected (4, 5): log-ratios 2/2 = 1 and -8/4 = -2, delta 3, loss
    (3 - 1/(2*0.5))^2 = 4; pair 1 delta 0, loss 1. Rewards 0.5 * 1 = 0.5 and 0.5 * -2 = -1, margin 1.5."""
    from pipeline.estimator.losses import pair_statistics

    s = pair_statistics(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_len=torch.tensor([2, 5]),
                        rejected_len=torch.tensor([4, 5]))
    torch.testing.assert_close(s.losses, torch.tensor([4.0, 1.0], dtype=D))
    assert s.chosen_rewards.tolist() == [0.5, 0.0] and s.rejected_rewards.tolist() == [-1.0, 0.0]
    assert s.margins.tolist() == [1.5, 0.0] and s.accuracies.tolist() == [1.0, 0.5]


# TRL's losses of sequence scores beyond sigmoid/ipo/hinge/robust, by hand (trl/trainer/dpo_trainer.py dpo_loss).
# Log-ratios chosen c = 2, rejected r = -1, beta = 0.5: beta*c = 1, beta*r = -0.5, beta*delta = 1.5, with
#   sigmoid(1) = 0.7310585786, sigmoid(-0.5) = 0.3775406688, sigmoid(1.5) = 0.8175744762,
#   log sigmoid(1) = -0.3132616875, log sigmoid(-1) = -1.3132616875, log sigmoid(0.5) = -0.4740769842,
#   log sigmoid(1.5) = -0.2014132779, log sigmoid(-1.5) = -1.7014132779.
TRL_LOSSES_BY_HAND = {
    # 1 - sigmoid(beta c) + sigmoid(beta r) = 1 - 0.7310585786 + 0.3775406688
    "apo_zero": 0.6464820902,
    # sigmoid(beta c) + 1 - sigmoid(beta delta) = 0.7310585786 + 1 - 0.8175744762
    "apo_down": 0.9134841024,
    # (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2 = (2 - 1)^2 + (-1 + 1)^2
    "sppo_hard": 1.0,
    # -log sig(1) - 0.5 log sig(-1) - 0.5 log sig(0.5) = 0.3132616875 + 0.6566308438 + 0.2370384921
    "nca_pair": 1.2069310234,
    # eps = 1e-3 (label_smoothing 0): sig(1.5) (log sig(1.5) - log 0.999) + sig(-1.5) (log sig(-1.5) - log 0.001)
    #   = 0.8175744762 * (-0.2014132779 + 0.0010005003) + 0.1824255238 * (-1.7014132779 + 6.9077552790)
    "exo_pair": 0.7859172949,
}


@pytest.mark.parametrize("loss_type", sorted(TRL_LOSSES_BY_HAND))
def test_trl_pair_losses_hand_worked(loss_type):
    # policy - reference: chosen 2, rejected -1
    losses, rc, rr = dpo_loss(torch.tensor([-8.0], dtype=D), torch.tensor([-11.0], dtype=D),
                              torch.tensor([-10.0], dtype=D), torch.tensor([-10.0], dtype=D), beta=0.5,
                              loss_type=loss_type)
    assert losses.item() == pytest.approx(TRL_LOSSES_BY_HAND[loss_type], abs=1e-9)
    assert (rc.item(), rr.item()) == pytest.approx((1.0, -0.5))  # rewards are TRL's: beta * log-ratio


def test_discopop_and_smoothed_exo_hand_worked():
    """discopop, beta*delta = 0.02 (tau 0.05): blend = sigmoid(0.4) = 0.5986876601,
    -log sigmoid(0.02) = 0.6831971797, exp(-0.02) = 0.9801986733:
    0.6831971797 * 0.4013123399 + 0.9801986733 * 0.5986876601 = 0.8610083090.
    exo_pair with label_smoothing 0.1 at beta*delta = 1.5: eps = 0.1,
    0.8175744762 * (-0.2014132779 + 0.1053605157) + 0.1824255238 * (-1.7014132779 + 2.3025850930) = 0.0311387964."""
    zero = torch.zeros(1, dtype=D)
    got, _, _ = dpo_loss(torch.tensor([0.02], dtype=D), zero, zero, zero, beta=1.0, loss_type="discopop")
    assert got.item() == pytest.approx(0.8610083090, abs=1e-9)
    got, _, _ = dpo_loss(torch.tensor([3.0], dtype=D), zero, zero, zero, beta=0.5, loss_type="exo_pair",
                         label_smoothing=0.1)
    assert got.item() == pytest.approx(0.0311387964, abs=1e-9)


def test_ratio_weights_hand_worked():
    """apo_zero at c = 2, r = -1, beta = 0.5: dL/dc = -beta sig(1) sig(-1) = -0.5 * 0.7310585786 * 0.2689414214
    = -0.0983059666; dL/dr = beta sig(-0.5) sig(0.5) = 0.5 * 0.3775406688 * 0.6224593312 = 0.1175018561.
    sppo_hard: dL/dc = 2 (c - 1) = 2, dL/dr = 2 (r + 1) = 0. sigmoid: the two are opposite."""
    c, r = torch.tensor([2.0], dtype=D), torch.tensor([-1.0], dtype=D)
    wc, wr = ratio_weights(c, r, beta=0.5, loss_type="apo_zero")
    assert (wc.item(), wr.item()) == pytest.approx((-0.0983059666, 0.1175018561), abs=1e-9)
    wc, wr = ratio_weights(c, r, beta=0.5, loss_type="sppo_hard")
    assert (wc.item(), wr.item()) == pytest.approx((2.0, 0.0))
    wc, wr = ratio_weights(c, r, beta=0.5, loss_type="sigmoid")
    assert wc.item() == pytest.approx(-wr.item()) and wc.item() == pytest.approx(loss_weight(3.0, beta=0.5).item())
    with pytest.raises(ValueError, match="two log-ratios"):
        loss_weight(3.0, beta=0.5, loss_type="apo_zero")


@pytest.mark.parametrize("loss_type,why", [("bco_pair", "running mean"), ("aot", "batch-mates"),
                                           ("aot_pair", "batch-mates")])
def test_trl_losses_not_built_say_why(loss_type, why):
    with pytest.raises(ConfigError, match=why):
        validate_loss_args(beta=0.1, loss_type=loss_type)
