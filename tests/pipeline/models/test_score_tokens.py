"""score_tokens: the masked-only head equals full logits, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import build_preset, score_tokens


@pytest.fixture(scope="module")
def model():
    return build_preset("micro")


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 512, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    index = torch.tensor([[0, 0], [0, 13], [1, 2], [1, 8], [2, 3], [0, 5], [2, 1]])
    targets = torch.randint(0, 512, (7,), generator=gen)
    return ids, mask, index, targets


def test_equals_full_log_softmax(model):
    ids, mask, index, targets = _inputs()
    with torch.no_grad():
        got = score_tokens(model, ids, mask, index, targets)
        full = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got, full[index[:, 0], index[:, 1], targets], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_chunking_does_not_change_values(model, chunk_size):
    ids, mask, index, targets = _inputs(1)
    with torch.no_grad():
        ref = score_tokens(model, ids, mask, index, targets, chunk_size=4096)
        got = score_tokens(model, ids, mask, index, targets, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_gradients_equal_full_logits_path():
    ids, mask, index, targets = _inputs(2)
    grads = []
    for path in ("score", "full"):
        model = build_preset("micro").train()
        if path == "score":
            value = score_tokens(model, ids, mask, index, targets, chunk_size=2)
        else:
            logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
            value = logp[index[:, 0], index[:, 1], targets]
        (value * torch.arange(1.0, 8.0)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        scale = grads[1][name].abs().max().item()
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6 * max(scale, 1.0), rtol=1e-5, msg=name)


def test_bf16_model_scores_in_float32():
    model = build_preset("micro", dtype="bfloat16")
    ids, mask, index, targets = _inputs(3)
    with torch.no_grad():
        got = score_tokens(model, ids, mask, index, targets)
        full = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full[index[:, 0], index[:, 1], targets], atol=1e-4, rtol=1e-4)


def test_empty_and_bad_shapes(model):
    ids, mask, _, _ = _inputs()
    with torch.no_grad():
        empty = score_tokens(model, ids, mask, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="index"):
        score_tokens(model, ids, mask, torch.tensor([1, 2]), torch.tensor([3, 4]))


class _ForwardOnlyWrapper(torch.nn.Module):
    """Like DDP: exposes .module and forward, none of the model's other attributes."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_goes_through_the_wrappers_forward(model):
    ids, mask, index, targets = _inputs(4)
    wrapped = _ForwardOnlyWrapper(model)
    with torch.no_grad():
        got = score_tokens(wrapped, ids, mask, index, targets)
        ref = score_tokens(model, ids, mask, index, targets)
    assert wrapped.calls == 1  # the body ran inside the wrapper's forward
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    out = model(ids, attention_mask=mask, hidden_only=True)
    assert out.logits is None and out.hidden_states.shape == (3, 14, 64)


@pytest.mark.parametrize("workspace", [512 * 2, 1 << 26])
def test_no_grad_head_in_reused_buffers_equals_the_grad_path(model, monkeypatch, workspace):
    """Without grad on the CPU the head runs in two reused buffers (a chunk of rows of the 512-word vocabulary
    at a time, here 2 rows or all 7); the values are the cross-entropy path's, bit for bit when the chunk holds
    the same rows (a float32 matmul's bits may depend on how many rows one call holds), and the same on a rerun."""
    import pipeline.models.scoring as scoring

    ids, mask, index, targets = _inputs(2)
    with torch.no_grad():
        with torch.enable_grad():  # the grad path: cross_entropy on fresh logits
            expected = score_tokens(model, ids, mask, index, targets).detach()
        monkeypatch.setattr(scoring, "ROWS_PER_WORKSPACE", workspace)
        calls = []
        monkeypatch.setattr(scoring, "_scored_in_place",
                            lambda *a, _f=scoring._scored_in_place: calls.append(1) or _f(*a))
        got = score_tokens(model, ids, mask, index, targets)
    assert calls, "the no-grad CPU float32 head did not take the reused-buffer path"
    assert got.dtype == torch.float32
    if workspace == 1 << 26:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(score_tokens(model, ids, mask, index, targets), got)


def test_a_pass_reuses_one_pair_of_head_buffers_and_gives_the_same_bits(model, monkeypatch):
    """Inside ``reused_head_buffers`` (what elbo_terms holds over its batches) the no-grad CPU head makes its two
    buffers again only when a call needs more rows than they hold, and every call's values are those of a call
    alone."""
    import pipeline.models.scoring as scoring

    made = []
    real_empty = torch.empty
    monkeypatch.setattr(scoring.torch, "empty", lambda *a, **k: made.append(a) or real_empty(*a, **k))
    # 7, 4 and 2 selected rows: the largest first, as elbo_terms' length-sorted batches tend to come
    batches = [(ids, mask, index[:k], targets[:k]) for k, (ids, mask, index, targets) in
               zip((7, 4, 2), (_inputs(s) for s in range(3)))]
    with torch.no_grad():
        alone = [score_tokens(model, *b) for b in batches]
        made.clear()
        with scoring.reused_head_buffers():
            together = [score_tokens(model, *b) for b in batches]
    vocab = model.get_output_embeddings().weight.shape[0]
    assert [a for a in made if a[-1:] == (vocab,)] == [made[0], made[1]]  # one pair, made at the first call
    with torch.no_grad(), scoring.reused_head_buffers():
        made.clear()
        [score_tokens(model, *b) for b in reversed(batches)]
    assert [a for a in made if a[-1:] == (vocab,)] == [(2, vocab)] * 2 + [(4, vocab)] * 2 + [(7, vocab)] * 2
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
