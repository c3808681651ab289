"""TRL's loss_type list and loss_weights: one preference loss and an SFT term, each weighted."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.estimator.losses import OF_DELTA, log_ratios, preference_delta, sequence_weights, sft_loss
from pipeline.trainer.dpo_step import batch_loss
from stages.train import TrainConfig
from tests.pipeline.estimator.reference import dpo_loss


def _terms(seed: int = 0, pairs: int = 3, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    terms = [(-5.0 - torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(2 * pairs)]
    ref_c = -5.5 + 0.1 * torch.rand(pairs, generator=g, dtype=torch.float64)
    ref_r = -5.5 + 0.1 * torch.rand(pairs, generator=g, dtype=torch.float64)
    chosen_len = torch.tensor([3, 5, 7][:pairs])
    rejected_len = torch.tensor([4, 2, 6][:pairs])
    return terms, ref_c, ref_r, chosen_len, rejected_len


def test_weighted_preference_and_sft_terms_add_up():
    cfg = TrainConfig(loss="sigmoid,sft", loss_weights=[0.5, 2.0], sft_weight=0.25, beta=0.2)
    terms, ref_c, ref_r, chosen_len, rejected_len = _terms()
    loss, _ = batch_loss(cfg, terms, ref_c, ref_r, chosen_len, rejected_len)
    means = torch.stack([t.mean() for t in terms])
    pi_c, pi_r = means[0::2], means[1::2]
    dpo, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.2, loss_type="sigmoid", chosen_len=chosen_len,
                         rejected_len=rejected_len)
    expected = 0.5 * dpo.mean() + 2.25 * sft_loss(pi_c, chosen_len).mean()
    assert torch.allclose(loss, expected)


def test_sft_alone_trains_only_the_sft_term():
    cfg = TrainConfig(loss="sft")
    terms, ref_c, ref_r, chosen_len, rejected_len = _terms(1)
    loss, _ = batch_loss(cfg, terms, ref_c, ref_r, chosen_len, rejected_len)
    pi_c = torch.stack([t.mean() for t in terms])[0::2]
    assert cfg.preference_loss is None and torch.allclose(loss, sft_loss(pi_c, chosen_len).mean())


@pytest.mark.parametrize("loss,weights", [("ipo,sft", [1.5, 0.5]), ("sft,hinge", [0.3, 2.0]), ("robust", None),
                                          ("apo_zero,sft", [1.0, 0.5]), ("sppo_hard", None), ("nca_pair", None),
                                          ("apo_down", None), ("exo_pair", None), ("discopop", None)])
def test_per_sequence_weights_give_the_combined_gradient(loss, weights):
    """The --sequence-microbatch path weights each term so the gradients sum to the one-pass gradient."""
    cfg = TrainConfig(loss=loss, loss_weights=weights, label_smoothing=0.1 if loss == "robust" else 0.0)
    terms, ref_c, ref_r, chosen_len, rejected_len = _terms(2)
    loss_value, st = batch_loss(cfg, terms, ref_c, ref_r, chosen_len, rejected_len)
    grads = torch.autograd.grad(loss_value, terms)
    loss_type = cfg.loss_type
    ratios = log_ratios(st.chosen_logps, st.rejected_logps, ref_c, ref_r, loss_type=loss_type, chosen_len=chosen_len,
                        rejected_len=rejected_len)
    cw, rw = sequence_weights(ratios, 4, beta=cfg.beta, loss_type=loss_type,
                              label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_total_weight,
                              chosen_len=chosen_len, normalizer=len(ref_c), dpo_weight=cfg.preference_weight,
                              rejected_len=rejected_len)
    for j, g in enumerate(grads):
        w = (cw if j % 2 == 0 else rw)[j // 2]
        assert torch.allclose(g, torch.full_like(g, float(w))), (loss, j)
    if loss_type in OF_DELTA:  # delta alone gives the same weights
        by_delta = sequence_weights(ratios[0] - ratios[1], 4, beta=cfg.beta, loss_type=loss_type,
                                    label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_total_weight,
                                    chosen_len=chosen_len, normalizer=len(ref_c), dpo_weight=cfg.preference_weight,
                                    rejected_len=rejected_len)
        assert torch.allclose(by_delta[0], cw) and torch.allclose(by_delta[1], rw)
        assert torch.allclose(preference_delta(st.chosen_logps, st.rejected_logps, ref_c, ref_r, loss_type=loss_type,
                                               chosen_len=chosen_len, rejected_len=rejected_len),
                              ratios[0] - ratios[1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss="sigmoid,ipo"), "one preference loss at a time"),
    (dict(loss="sigmoid,sft", loss_weights=[1.0]), "loss_weights has 1 value"),
    (dict(loss="sigmoid,dpo"), "unknown loss type 'dpo'"),
    (dict(loss="sft,sft"), "each loss once"),
    (dict(loss="sigmoid", loss_weights=[-1.0]), "finite and >= 0"),
])
def test_bad_loss_combinations_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
