"""The SFT objective: hand-worked values, a naive full-vocabulary reference, the exact expectation over
every mask and timestep, the prompt never masked, padding ignored, seeded draws."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.estimator.sft_objective import (
    EPS,
    collate,
    draw_mask,
    draw_masks,
    masked_inputs,
    sft_loss,
)
from tests.pipeline.estimator.reference import expected_loss, timestep_weight

MASK = 2


class LookupModel(torch.nn.Module):
    """Hidden state = one-hot of the input token; the head's column for [MASK] fixes the logits there."""

    logits_shift = False

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            # Logits at a masked position: [0, ln 3, ln 4] -> p = [1/8, 3/8, 4/8].
            self.head.weight[:, MASK] = torch.tensor([0.0, math.log(3.0), math.log(4.0)])

    def final_hidden(self, input_ids, attention_mask=None):
        return torch.nn.functional.one_hot(input_ids, 3).float()

    def get_output_embeddings(self):
        return self.head


def test_loss_equals_the_hand_worked_value():
    # Row 0: prompt [0], response [1, 0, 1]; positions 1 and 3 (both token 1) masked at t = 0.5.
    # Row 1: prompt [0, 0], response [0, 1, 1]; position 2 (token 0) masked at t = 0.25 (padded by 1).
    batch = collate([([0], [1, 0, 1]), ([0, 0], [0, 1, 1])], pad_token_id=1)
    assert batch.input_ids.shape == (2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[0, 3] = True
    mask[1, 2] = True
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    losses = sft_loss(LookupModel(), batch, t, mask, MASK)
    # -(1/(t L)) * sum log p:  (1/(0.5*3)) * 2 ln(8/3)  and  (1/(0.25*3)) * ln 8
    expected = [(4.0 / 3.0) * math.log(8.0 / 3.0), (4.0 / 3.0) * math.log(8.0)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(losses.detach().mean()) == pytest.approx(sum(expected) / 2, rel=1e-6)


@pytest.fixture(scope="module")
def micro():
    from pipeline.models import build_preset

    return build_preset("micro", seed=3).eval()


def _naive_losses(model, batch, t, mask, mask_token_id):
    """dllm's way: full-vocabulary logits at every position, then the masked ones selected."""
    inputs = torch.where(mask, mask_token_id, batch.input_ids)
    logits = model(inputs, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[..., None])[..., 0]
    sums = (logp * mask).sum(dim=1)
    return -sums / (t * batch.response_len.double())


def test_loss_equals_a_naive_full_vocabulary_computation(micro):
    mask_id = micro.config.mask_token_id
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(10, 500, (p,), generator=g).tolist(), torch.randint(10, 500, (r,), generator=g).tolist())
                for p, r in [(3, 5), (6, 2), (1, 9)]]
    batch = collate(examples, pad_token_id=micro.config.pad_token_id)
    t, mask = draw_masks(batch, [0, 1, 2], seed=11, epoch=0)
    mask[:, :] = mask | (batch.response_positions() & (torch.arange(mask.shape[1]) % 2 == 0))  # a few more
    with torch.no_grad():
        ours = sft_loss(micro, batch, t, mask, mask_id)
        naive = _naive_losses(micro, batch, t, mask, mask_id)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-6)


def test_padding_is_ignored(micro):
    """A sequence's loss is the same alone, next to a longer one, and whatever the pad tokens are."""
    mask_id = micro.config.mask_token_id
    short, long_ = ([5, 6], [7, 8, 9]), ([5] * 4, [9, 8, 7, 6, 5, 4])
    alone = collate([short], pad_token_id=1)
    t, mask = draw_masks(alone, [0], seed=1, epoch=0, eps=0.9)  # t near 1: several tokens masked
    mixed = collate([short, long_], pad_token_id=1)
    t2, mask2 = draw_masks(mixed, [0, 5], seed=1, epoch=0, eps=0.9)
    assert t2[0] == t[0] and torch.equal(mask2[0, :5], mask[0]) and not mask2[0, 5:].any()
    other_pad = collate([short, long_], pad_token_id=300)
    with torch.no_grad():
        a = sft_loss(micro, alone, t, mask, mask_id)[0]
        b = sft_loss(micro, mixed, t2, mask2, mask_id)[0]
        c = sft_loss(micro, other_pad, t2, mask2, mask_id)[0]
    assert float(a) > 0
    assert float(b) == pytest.approx(float(a), rel=1e-5)
    assert float(c) == pytest.approx(float(a), rel=1e-5)


def test_the_prompt_is_never_masked_and_t_lies_in_eps_to_one():
    batch = collate([([1, 2, 3, 4], [5, 6]), ([1], [5, 6, 7, 8, 9, 10, 11]), ([], [7, 8, 9])], pad_token_id=0)
    response = batch.response_positions()
    for epoch in range(200):
        t, mask = draw_masks(batch, [3, 4, 5], seed=0, epoch=epoch)
        assert not (mask & ~response).any()
        assert bool(((t > EPS) & (t <= 1.0)).all())
    bad = torch.zeros_like(response)
    bad[0, 0] = True  # a prompt position
    with pytest.raises(ValueError, match="prompt or padding"):
        masked_inputs(batch, bad, 99)


def test_draws_are_seeded_by_seed_example_and_epoch_only():
    t1, m1 = draw_mask(40, 123)
    t2, m2 = draw_mask(40, 123)
    assert t1 == t2 and torch.equal(m1, m2)
    batch = collate([([1], [2] * 30), ([1], [2] * 30)], pad_token_id=0)
    t, m = draw_masks(batch, [7, 8], seed=0, epoch=0)
    assert not torch.equal(m[0], m[1])  # two examples, two draws
    t_next, m_next = draw_masks(batch, [7, 8], seed=0, epoch=1)
    assert not torch.equal(m[0], m_next[0])  # a new draw per epoch
    t_other, m_other = draw_masks(batch, [7, 8], seed=1, epoch=0)
    assert not torch.equal(m[0], m_other[0])
    torch.manual_seed(0)
    a = draw_masks(batch, [7, 8], seed=0, epoch=0)
    torch.manual_seed(99)  # the global RNG plays no part
    b = draw_masks(batch, [7, 8], seed=0, epoch=0)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_timestep_weight_is_one_over_l_times_binomial_at_eps_zero():
    for length in range(1, 8):
        for size in range(1, length + 1):
            assert timestep_weight(size, length, 0.0) * math.comb(length, size) == pytest.approx(1.0 / size, rel=1e-9)
    # eps > 0: the integral over (eps, 1] renormalised by 1 / (1 - eps), checked by quadrature
    x, w = np.polynomial.legendre.leggauss(20)
    t = EPS + (1 - EPS) * (x + 1) / 2
    for size, length in [(1, 5), (3, 5), (5, 5)]:
        quad = float(np.sum(w * t ** (size - 1) * (1 - t) ** (length - size)) / 2)
        assert timestep_weight(size, length) == pytest.approx(quad, rel=1e-9)


def _subset_sums(model, prompt, response):
    """S(M) for every non-empty mask M, from one batched full-vocabulary forward."""
    length = len(response)
    subsets = [m for k in range(1, length + 1) for m in itertools.combinations(range(length), k)]
    mask_id = model.config.mask_token_id
    rows = []
    for m in subsets:
        r = list(response)
        for i in m:
            r[i] = mask_id
        rows.append(list(prompt) + r)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(rows)).logits.double(), dim=-1)
    target = torch.tensor(list(prompt) + list(response))
    out = {}
    for row, m in enumerate(subsets):
        out[m] = float(sum(logp[row, len(prompt) + i, target[len(prompt) + i]] for i in m))
    return out


@pytest.fixture(scope="module")
def tiny_case(micro):
    prompt, response = [40, 41, 42], [50, 61, 72, 83]
    return prompt, response, _subset_sums(micro, prompt, response)


def test_expectation_over_every_mask_and_timestep_matches_the_exact_sum(micro, tiny_case):
    """E[loss] as the drawing distribution defines it (Bernoulli(t) masks, t ~ U(eps, 1]), computed
    exactly: every mask pattern (the empty one included) at every node of a Gauss-Legendre rule on
    (eps, 1] (exact: the integrand is a polynomial in t), each through ``sft_loss``; it must equal the
    exact ELBO sum -(1/L) sum_l (1/l) mean_{|M|=l} S(M) at eps = 0, and ``expected_loss`` at eps."""
    prompt, response, sums = tiny_case
    length = len(response)
    patterns = [m for k in range(0, length + 1) for m in itertools.combinations(range(length), k)]
    for eps in (0.0, EPS):
        x, w = np.polynomial.legendre.leggauss(8)
        nodes = eps + (1 - eps) * (x + 1) / 2
        examples, ts, probs = [], [], []
        for node, weight in zip(nodes, w):
            for m in patterns:
                examples.append((prompt, response))
                ts.append(float(node))
                # the density of t on (eps, 1] is 1/(1-eps); the rule's weights sum to 2 over [-1, 1]
                probs.append(weight / 2 * node ** len(m) * (1 - node) ** (length - len(m)))
        batch = collate(examples, pad_token_id=micro.config.pad_token_id)
        mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for row, m in enumerate(patterns * len(nodes)):
            for i in m:
                mask[row, len(prompt) + i] = True
        with torch.no_grad():
            losses = sft_loss(micro, batch, torch.tensor(ts, dtype=torch.float64), mask,
                              micro.config.mask_token_id)
        expectation = float((losses * torch.tensor(probs, dtype=torch.float64)).sum())
        assert expectation == pytest.approx(expected_loss(sums, length, eps), rel=1e-5)
        if eps == 0.0:
            exact = -sum(sum(s for m, s in sums.items() if len(m) == size) / math.comb(length, size) / size
                         for size in range(1, length + 1)) / length
            assert expectation == pytest.approx(exact, rel=1e-5)


def test_the_seeded_draws_are_unbiased_for_the_exact_expectation(micro, tiny_case):
    """Monte Carlo over epochs: the mean of the drawn losses is within 4 standard errors of the exact value
    (a missing 1/t, a 1/|M| normalisation or a prompt-masking draw would miss by far more)."""
    prompt, response, sums = tiny_case
    n = 2000
    batch = collate([(prompt, response)] * n, pad_token_id=micro.config.pad_token_id)
    ts, masks = [], []
    for epoch in range(n):
        one = collate([(prompt, response)], pad_token_id=0)
        t, m = draw_masks(one, [0], seed=5, epoch=epoch)
        ts.append(t)
        masks.append(m)
    t, mask = torch.cat(ts), torch.cat(masks)
    with torch.no_grad():
        losses = sft_loss(micro, batch, t, mask, micro.config.mask_token_id)
    exact = expected_loss(sums, len(response))
    se = float(losses.std()) / math.sqrt(n)
    assert abs(float(losses.mean()) - exact) < 4 * se
    assert se < 0.1 * exact  # the test has power
