"""Mask sampling and the ELBO estimator: exactness, stratification, seeding, batch invariance, gradients."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from pipeline.estimator.diffusion import MaskSet, ScoreRequest, elbo_terms, mask_seed, plan_batches, sample_masks
from pipeline.models import LLaDAConfig, LLaDAModelLM, score_tokens, scoring

MASK_ID = 1
PAD_ID = 0
VOCAB = 24  # ids 0 pad, 1 mask, 2 eos

# --- tiny models ---------------------------------------------------------------


def _make_model(seed: int = 0, sharpen: float = 30.0):
    """A tiny native LLaDA (2 layers, d_model 32), head sharpened so S(M) depends on which positions are masked."""
    config = LLaDAConfig(
        d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=VOCAB,
        embedding_size=VOCAB, max_sequence_length=128, mask_token_id=MASK_ID, eos_token_id=2, pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
    with torch.no_grad():
        # Random init gives near-uniform predictions (S(M) ~ -|M| log V whatever the
        # positions); a larger head makes S(M) position- and context-dependent.
        model.get_output_embeddings().weight.mul_(sharpen)
    return model.eval()


class _ShiftedToy(torch.nn.Module):
    """A Dream-style model (position i predicts token i+1): bidirectional attention, key-padding mask."""

    logits_shift = True

    def __init__(self, vocab: int = VOCAB, hidden: int = 32, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.config = type("Cfg", (), {"mask_token_id": MASK_ID})()
        self.heads = heads
        self.wte = torch.nn.Embedding(vocab, hidden)
        self.wpe = torch.nn.Embedding(max_len, hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.ln_f = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head

    def final_hidden(self, input_ids, attention_mask=None):
        b, s = input_ids.shape
        x = self.wte(input_ids) + self.wpe(torch.arange(s))[None]
        keep = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.ln_f(x + self.out(a.transpose(1, 2).reshape(b, s, -1)))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.head(self.final_hidden(input_ids, attention_mask))})()


@pytest.fixture(scope="module")
def model():
    return _make_model()


def _naive_term(model, prompt, response, mask, weight):
    """Full logits at every position, no batching: the reference the estimator must equal."""
    resp = torch.tensor(response)
    ids = torch.cat([torch.tensor(prompt, dtype=torch.long), torch.where(mask, MASK_ID, resp)])
    logits = model(ids[None]).logits[0].float()
    start = len(prompt) - (1 if getattr(model, "logits_shift", False) else 0)
    lp = torch.log_softmax(logits, dim=-1)[start : start + len(response)]
    picked = lp.gather(1, resp[:, None]).squeeze(1)
    return float(weight) * picked[mask].double().sum()


def _all_masks(length: int) -> torch.Tensor:
    """Every non-empty mask of a length-L response; row c is the binary code c + 1."""
    codes = torch.arange(1, 2**length)
    return (codes[:, None] >> torch.arange(length)[None]) & 1 == 1


def _codes(masks: torch.Tensor) -> torch.Tensor:
    return (masks.long() * (2 ** torch.arange(masks.shape[1]))[None]).sum(1)


# --- seeds -------------------------------------------------------------------


def test_mask_seed_is_stable_63_bit_and_separates_every_field():
    assert mask_seed(0, "a", "chosen", 0) == 1949629943790245499  # golden: caches depend on it
    seeds = {
        mask_seed(0, "a", "chosen", 0),
        mask_seed(1, "a", "chosen", 0),
        mask_seed(0, "b", "chosen", 0),
        mask_seed(0, "a", "rejected", 0),
        mask_seed(0, "a", "chosen", 1),
        mask_seed(0, "a\x1fchosen", "", 0),
    }
    assert len(seeds) == 6
    assert all(0 <= s < 2**63 for s in seeds)


def test_masks_depend_on_seed_only_not_on_global_rng():
    seed = mask_seed(7, "pair-1", "chosen", 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample_masks(37, 8, seed)
    assert torch.equal(torch.get_rng_state(), before), "sample_masks consumed the global RNG"
    torch.manual_seed(999)
    torch.rand(5)
    b = sample_masks(37, 8, seed)
    for field in ("masks", "counts", "timesteps", "weights"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    c = sample_masks(37, 8, mask_seed(7, "pair-1", "chosen", 3))
    assert not torch.equal(a.masks, c.masks)
    t1 = sample_masks(37, 8, seed, scheme="one_over_t")
    torch.manual_seed(5)
    t2 = sample_masks(37, 8, seed, scheme="one_over_t")
    assert torch.equal(t1.masks, t2.masks) and torch.equal(t1.weights, t2.weights)


def test_fresh_process_regenerates_bit_identical_masks():
    code = (
        "import torch, hashlib\n"
        "from pipeline.estimator.diffusion import sample_masks, mask_seed\n"
        "torch.manual_seed(31337)\n"
        "h = hashlib.sha256()\n"
        "for scheme in ('l_over_L', 'one_over_t'):\n"
        "    m = sample_masks(50, 8, mask_seed(3, 'pid', 'rejected', 1), scheme=scheme)\n"
        "    for t in (m.masks, m.counts, m.timesteps, m.weights):\n"
        "        h.update(t.numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    h = hashlib.sha256()
    for scheme in ("l_over_L", "one_over_t"):
        m = sample_masks(50, 8, mask_seed(3, "pid", "rejected", 1), scheme=scheme)
        for t in (m.masks, m.counts, m.timesteps, m.weights):
            h.update(t.numpy().tobytes())
    assert out == h.hexdigest()


# --- the l/L sampler ---------------------------------------------------------


@pytest.mark.parametrize("length,n", [(1, 1), (1, 4), (5, 3), (5, 5), (7, 20), (16, 8), (300, 8), (3, 64)])
def test_stratified_counts_cover_range_evenly(length, n):
    for s in range(20):
        m = sample_masks(length, n, seed=s)
        assert m.masks.shape == (n, length) and m.masks.dtype == torch.bool
        assert m.counts.dtype == torch.long and m.weights.dtype == torch.float64
        assert torch.equal(m.masks.sum(1), m.counts)
        assert int(m.counts.min()) >= 1 and int(m.counts.max()) <= length
        assert torch.allclose(m.timesteps, m.counts.float() / length)
        assert torch.equal(m.weights, length / m.counts.double())
        hist = torch.bincount(m.counts - 1, minlength=length)
        # Evenly spaced points: every count in 1..L appears floor(n/L) or ceil(n/L) times.
        assert int(hist.max()) - int(hist.min()) <= 1, (s, hist.tolist())
        assert int(hist.max()) == -(-n // length)


_CHI2_999 = {4: 18.467, 5: 20.515, 14: 36.123}  # chi-square critical values at p = 0.001


def _chi2(observed: torch.Tensor) -> float:
    expected = observed.sum() / observed.numel()
    return float(((observed.double() - expected) ** 2 / expected).sum())


def test_each_stratified_count_is_marginally_uniform():
    length, n, draws = 5, 3, 4000
    counts = torch.stack([sample_masks(length, n, seed=10_000 + s).counts for s in range(draws)])
    for k in range(n):
        hist = torch.bincount(counts[:, k] - 1, minlength=length)
        assert _chi2(hist) < _CHI2_999[4], (k, hist.tolist())
    # Negative control: stratification WITHOUT wrapping (sample k in [k/n, (k+1)/n))
    # is not marginally uniform, and this test statistic sees it.
    g = torch.Generator().manual_seed(0)
    u = torch.rand(draws, generator=g, dtype=torch.float64)
    unwrapped = torch.floor((u / n) * length).long()  # sample k = 0
    assert _chi2(torch.bincount(unwrapped, minlength=length)) > _CHI2_999[4]


def test_positions_are_uniform_given_the_count():
    # With L = 6 and n = 6 every sample has a distinct count; among count-2 masks
    # all 15 subsets must be equally likely, and each position masked at rate l/L.
    length = 6
    subsets: dict[int, int] = {}
    per_position = torch.zeros(length)
    rows = 0
    for s in range(3000):
        m = sample_masks(length, 6, seed=50_000 + s)
        sel = m.masks[m.counts == 2]
        for row in sel:
            code = int(_codes(row[None])[0])
            subsets[code] = subsets.get(code, 0) + 1
        per_position += m.masks[m.counts == 4].sum(0).float()
        rows += int((m.counts == 4).sum())
    assert len(subsets) == 15
    assert _chi2(torch.tensor(list(subsets.values()))) < _CHI2_999[14]
    assert _chi2(per_position) < _CHI2_999[5]
    assert torch.allclose(per_position / rows, torch.full((length,), 4 / 6), atol=0.03)


# --- the 1/t sampler ---------------------------------------------------------


def test_one_over_t_timesteps_uniform_bernoulli_masks_and_empty_masks_kept():
    eps = 1e-3
    ts, fracs, empty = [], [], 0
    for s in range(2000):
        m = sample_masks(8, 4, seed=s, scheme="one_over_t", eps=eps)
        assert torch.equal(m.masks.sum(1), m.counts)
        assert torch.allclose(m.weights, 1.0 / m.timesteps.double(), rtol=1e-6)
        assert m.weights.dtype == torch.float64
        assert bool((m.timesteps > eps).all()) and bool((m.timesteps <= 1).all())
        ts.append(m.timesteps)
        fracs.append(m.masks.double().mean(1))
        empty += int((m.counts == 0).sum())
    t = torch.cat(ts).double()
    frac = torch.cat(fracs)
    # t uniform on (eps, 1]: ten equal bins.
    hist = torch.histc(t, bins=10, min=eps, max=1.0)
    assert _chi2(hist) < 27.877  # df = 9, p = 0.001
    # Masking rate given t is t: regress the masked fraction on t.
    assert abs(float((frac - t).mean())) < 0.01
    lo = t < 0.2
    assert abs(float(frac[lo].mean() - t[lo].mean())) < 0.01
    # Empty masks happen (P = (1-t)^8) and are kept with count 0, not resampled.
    assert empty > 50


def test_empty_masks_give_exact_zero_and_no_model_rows(model, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[1].shape[0])
        return score_tokens(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_tokens", spy)
    masks = torch.tensor([[False, False, False], [True, False, True], [False, False, False]])
    req = ScoreRequest([5, 6], [7, 8, 9], masks, torch.tensor([40.0, 2.0, 3.0], dtype=torch.float64))
    (terms,) = elbo_terms(model, [req], mask_token_id=MASK_ID, pad_token_id=PAD_ID)
    assert terms[0].item() == 0.0 and terms[2].item() == 0.0
    assert terms[1].item() < 0
    assert seen == [1]  # one row sent: the non-empty mask
    seen.clear()
    (terms,) = elbo_terms(model, [ScoreRequest([5], [7], torch.zeros(2, 1, dtype=torch.bool), torch.ones(2))],
                          mask_token_id=MASK_ID, pad_token_id=PAD_ID)
    assert terms.tolist() == [0.0, 0.0] and seen == []


# --- exactness: enumeration vs Monte Carlo -----------------------------------


def _one_over_t_weights(length: int, eps: float, power: int) -> list[float]:
    """E-weights of the 1/t scheme per |M| = l: C(L,l)/(1-eps) * int_eps^1 t^(l-power) (1-t)^(L-l) dt."""
    out = []
    for l in range(1, length + 1):
        total = 0.0
        for j in range(length - l + 1):
            e = l - power + j  # integrate t^e
            coef = math.comb(length - l, j) * (-1) ** j
            total += coef * (-math.log(eps) if e == -1 else (1 - eps ** (e + 1)) / (e + 1))
        out.append(math.comb(length, l) * total / (1 - eps))
    return out


@pytest.fixture(scope="module")
def enumeration(model):
    prompt, response = [5, 9, 3], [11, 4, 17, 2, 8, 13]
    length = len(response)
    masks = _all_masks(length)
    req = ScoreRequest(prompt, response, masks, torch.ones(masks.shape[0], dtype=torch.float64))
    with torch.no_grad():
        (s,) = elbo_terms(model, [req], mask_token_id=MASK_ID, pad_token_id=PAD_ID)  # one batched pass
    s = s.detach()
    table = torch.zeros(2**length, dtype=torch.float64)
    table[_codes(masks)] = s
    sizes = masks.sum(1)
    mean_by_l = torch.stack([s[sizes == l].mean() for l in range(1, length + 1)])
    mean_sq_by_l = torch.stack([(s[sizes == l] ** 2).mean() for l in range(1, length + 1)])
    return dict(prompt=prompt, response=response, length=length, table=table, s=s, sizes=sizes,
                mean=mean_by_l, mean_sq=mean_sq_by_l)


def test_enumerated_values_equal_naive_full_logits(model, enumeration):
    e = enumeration
    masks = _all_masks(e["length"])
    for c in (0, 5, 20, 62):
        with torch.no_grad():
            expect = _naive_term(model, e["prompt"], e["response"], masks[c], 1.0)
        assert abs(float(e["s"][c]) - float(expect)) < 1e-5


def test_monte_carlo_mean_converges_to_exact_elbo_l_over_L(enumeration):
    e = enumeration
    L = e["length"]
    ls = torch.arange(1, L + 1, dtype=torch.float64)
    elbo = float((e["mean"] / ls).sum())  # B = sum_l (1/l) mean_{|M|=l} S(M)
    # The scheme's exact expectation (1/L) sum_l (L/l) mean S = B, and its second moment.
    assert abs(float((e["mean"] * (L / ls)).sum() / L) - elbo) < 1e-9
    second = float((e["mean_sq"] * (L / ls) ** 2).sum() / L)
    var = second - elbo**2
    assert var > 0.05, "the toy model must make the estimator noisy enough to test"
    terms, wrong = [], []
    for s in range(4000):
        m = sample_masks(L, 4, seed=mask_seed(0, f"p{s}", "chosen", 0))
        sm = e["table"][_codes(m.masks)]
        terms.append(m.weights * sm)
        wrong.append(sm * m.counts.double() / L)  # negative control: weight l/L instead of L/l
    terms, wrong = torch.cat(terms), torch.cat(wrong)
    se = math.sqrt(var / terms.numel())  # conservative: stratification only lowers the variance
    assert abs(float(terms.mean()) - elbo) < 4 * se, (float(terms.mean()), elbo, se)
    assert abs(float(wrong.mean()) - elbo) > 4 * se
    # Stratification never raises the variance of the n-sample mean above var / n
    # (it removes only the between-count part; 10% allows for the sample variance's noise).
    per_draw = terms.view(-1, 4).mean(1)
    assert float(per_draw.var()) < 1.1 * var / 4


def test_monte_carlo_mean_converges_to_exact_elbo_one_over_t(enumeration):
    e = enumeration
    L, eps = e["length"], 1e-3
    ls = torch.arange(1, L + 1, dtype=torch.float64)
    elbo = float((e["mean"] / ls).sum())
    w1 = torch.tensor(_one_over_t_weights(L, eps, 1), dtype=torch.float64)
    w2 = torch.tensor(_one_over_t_weights(L, eps, 2), dtype=torch.float64)
    assert torch.allclose(torch.tensor(_one_over_t_weights(L, 1e-12, 1), dtype=torch.float64), 1 / ls, rtol=1e-6)
    expect = float((e["mean"] * w1).sum())  # exact for t ~ U(eps, 1], empty masks counted as 0
    assert abs(expect - elbo) < 2e-3 * abs(elbo)
    var = float((e["mean_sq"] * w2).sum()) - expect**2
    table = torch.cat([torch.zeros(1, dtype=torch.float64), e["table"][1:]])  # code 0 (empty) -> 0
    terms, wrong = [], []
    for s in range(5000):
        m = sample_masks(L, 4, seed=mask_seed(1, f"p{s}", "rejected", 0), scheme="one_over_t", eps=eps)
        sm = table[_codes(m.masks)]
        terms.append(m.weights * sm)
        wrong.append(sm)  # negative control: the 1/t weight missing
    terms, wrong = torch.cat(terms), torch.cat(wrong)
    se = math.sqrt(var / terms.numel())
    assert abs(float(terms.mean()) - expect) < 4 * se, (float(terms.mean()), expect, se)
    assert abs(float(wrong.mean()) - expect) > 4 * se


def test_estimator_terms_equal_weight_times_enumerated_score(model, enumeration):
    e = enumeration
    for scheme in ("l_over_L", "one_over_t"):
        m = sample_masks(e["length"], 8, seed=77, scheme=scheme)
        req = ScoreRequest(e["prompt"], e["response"], m.masks, m.weights)
        with torch.no_grad():
            (terms,) = elbo_terms(model, [req], mask_token_id=MASK_ID, pad_token_id=PAD_ID)
        table = torch.cat([torch.zeros(1, dtype=torch.float64), e["table"][1:]])
        assert torch.allclose(terms, m.weights * table[_codes(m.masks)], atol=1e-5)


# --- the estimator's rows ----------------------------------------------------


def test_prompt_never_masked_and_padding_excluded(model, monkeypatch):
    calls = []

    def spy(model_, input_ids, attention_mask, index, targets, chunk_size=4096):
        calls.append((input_ids.clone(), attention_mask.clone(), index.clone(), targets.clone()))
        return score_tokens(model_, input_ids, attention_mask, index, targets, chunk_size)

    monkeypatch.setattr(scoring, "score_tokens", spy)
    prompt = [MASK_ID + 2, 3, 4]
    reqs = [
        ScoreRequest(prompt, [7, 8, 9, 10], sample_masks(4, 4, seed=1).masks, torch.ones(4)),
        ScoreRequest([3], [11, 12], sample_masks(2, 3, seed=2).masks, torch.ones(3)),
    ]
    with torch.no_grad():
        elbo_terms(model, reqs, mask_token_id=MASK_ID, pad_token_id=PAD_ID)
    (input_ids, attn, index, targets), = calls
    assert input_ids.shape == (7, 7)
    n_masked = 0
    for row in range(7):
        real = int(attn[row].sum())
        assert bool(attn[row, :real].all()) and not bool(attn[row, real:].any())
        assert bool((input_ids[row, real:] == PAD_ID).all())
        plen = 3 if real == 7 else 1
        assert input_ids[row, :plen].tolist() == (prompt if plen == 3 else [3])
        masked_pos = (input_ids[row, :real] == MASK_ID).nonzero().squeeze(1)
        assert bool((masked_pos >= plen).all())
        scored = index[index[:, 0] == row, 1]
        assert scored.tolist() == masked_pos.tolist()  # only masked positions are scored
        n_masked += len(scored)
    assert n_masked == int(reqs[0].masks.sum() + reqs[1].masks.sum()) == len(targets)


def test_batch_composition_invariance(model):
    def req(plen, rlen, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, VOCAB, (plen + rlen,), generator=g).tolist()
        m = sample_masks(rlen, 5, seed=seed)
        return ScoreRequest(ids[:plen], ids[plen:], m.masks, m.weights)

    target = req(4, 9, 1)
    short, longer, longest = req(1, 2, 2), req(10, 15, 3), req(20, 20, 4)
    with torch.no_grad():
        (alone,) = elbo_terms(model, [target], mask_token_id=MASK_ID, pad_token_id=PAD_ID)
        variants = [
            elbo_terms(model, [short, target, longer], mask_token_id=MASK_ID, pad_token_id=PAD_ID)[1],
            elbo_terms(model, [longest, longer, short, target], mask_token_id=MASK_ID, pad_token_id=PAD_ID)[3],
            elbo_terms(model, [target, longest], mask_token_id=MASK_ID, pad_token_id=PAD_ID, batch_tokens=1)[0],
            elbo_terms(model, [longer, target, short], mask_token_id=MASK_ID, pad_token_id=PAD_ID, batch_tokens=60)[1],
            elbo_terms(model, [short, target], mask_token_id=MASK_ID, pad_token_id=PAD_ID, batch_tokens=40,
                       chunk_size=3)[1],
        ]
    for v in variants:
        assert torch.allclose(v, alone, atol=1e-5, rtol=0), (v - alone).abs().max()
    with torch.no_grad():
        naive = [_naive_term(model, target.prompt_ids, target.response_ids, m, w)
                 for m, w in zip(target.masks, target.weights)]
    assert torch.allclose(alone, torch.stack(naive), atol=1e-4, rtol=0)


def test_wanted_requests_run_only_their_batches_and_get_the_full_pass_terms_bit_for_bit(model, monkeypatch):
    """``wanted`` skips the planned batches that hold no wanted request's row; the batches it runs are the full
    pass's own inputs, so a wanted request's terms equal the full pass's exactly (the start check's guarantee)."""
    import pipeline.estimator.diffusion as diffusion

    def req(plen, rlen, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, VOCAB, (plen + rlen,), generator=g).tolist()
        m = sample_masks(rlen, 4, seed=seed)
        return ScoreRequest(ids[:plen], ids[plen:], m.masks, m.weights)

    # the last request has request 2's length, so rows of both share a batch (and it can be covered whole)
    requests = [req(3 + i, 5 + 2 * i, i) for i in range(6)] + [req(5, 9, 6)]
    batched = []
    real_plan = diffusion.plan_batches
    monkeypatch.setattr(diffusion, "plan_batches", lambda *a: batched.append(real_plan(*a)) or batched[-1])
    kw = dict(mask_token_id=MASK_ID, pad_token_id=PAD_ID, batch_tokens=112)
    calls = []
    scorer = scoring.MaskedRowScorer(model)
    monkeypatch.setattr(scoring, "as_row_scorer", lambda m, c: lambda *a: calls.append(a[0].shape) or scorer(*a))
    with torch.no_grad():
        full = elbo_terms(model, requests, **kw)
        n_full = len(calls)
        wanted = [False, False, True, False, False, False, False]
        some = elbo_terms(model, requests, **kw, wanted=wanted)
    assert batched[0] == batched[1] and n_full == len(batched[0]) > 2
    assert 0 < len(calls) - n_full < n_full  # only the batches holding request 2's rows
    assert torch.equal(some[2], full[2])
    # every request the run batches covered whole comes back, the full pass's terms bit for bit; the others None
    covered = [_covered(requests, batched[1], wanted, i) for i in range(len(requests))]
    assert [t is not None for t in some] == covered
    assert not all(covered) and any(c and not w for c, w in zip(covered, wanted))  # both cases occur here
    for t, f in zip(some, full):
        assert t is None or torch.equal(t, f)


def _rows_of(requests, batch):
    """The (request, sample) rows of a planned batch (elbo_terms' row order: non-empty masks, request by request)."""
    rows = [(r, k) for r, req in enumerate(requests) for k, keep in enumerate(req.masks.any(dim=1).tolist()) if keep]
    return [rows[i] for i in batch]


def _covered(requests, plan, wanted, r):
    """Request r's rows all lie in batches that hold a wanted request's row."""
    ran = {row for b in plan if any(wanted[q] for q, _ in _rows_of(requests, b)) for row in _rows_of(requests, b)}
    return all(row in ran for b in plan for row in _rows_of(requests, b) if row[0] == r)


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 17, 3, 17, 9, 40, 1]
    for budget in (1, 20, 34, 50, 1000, None):
        batches = plan_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            widths = [lengths[i] for i in b]
            assert widths == sorted(widths, reverse=True)
            if budget is not None and len(b) > 1:
                assert max(widths) * len(b) <= budget
    assert len(plan_batches(lengths, None)) == 1
    assert plan_batches([], 10) == []


def test_gradients_flow_and_match_naive_full_logits(model):
    m = sample_masks(6, 4, seed=3)
    req = ScoreRequest([5, 6, 7], [8, 9, 10, 11, 12, 13], m.masks, m.weights)
    other = ScoreRequest([4], [9, 9, 2], sample_masks(3, 4, seed=4).masks, torch.ones(4, dtype=torch.float64))
    model.zero_grad()
    terms = elbo_terms(model, [req, other], mask_token_id=MASK_ID, pad_token_id=PAD_ID, batch_tokens=20)
    assert terms[0].requires_grad
    terms[0].sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert ours and any(float(g.abs().sum()) > 0 for g in ours.values())
    model.zero_grad()
    sum(_naive_term(model, req.prompt_ids, req.response_ids, mk, w) for mk, w in zip(m.masks, m.weights)).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ours[n], p.grad, atol=1e-5, rtol=1e-4), n
    model.zero_grad()


def test_validation_errors():
    with pytest.raises(ValueError):
        ScoreRequest([1], [2, 3], torch.zeros(2, 3, dtype=torch.bool), torch.ones(2))
    with pytest.raises(ValueError):
        ScoreRequest([1], [2, 3], torch.zeros(2, 2, dtype=torch.bool), torch.ones(3))
    with pytest.raises(ValueError):
        sample_masks(0, 4, seed=1)
    with pytest.raises(ValueError):
        sample_masks(4, 0, seed=1)
    with pytest.raises(ValueError):
        sample_masks(4, 2, seed=1, scheme="l/L")
    assert isinstance(sample_masks(3, 2, seed=1), MaskSet) and len(sample_masks(3, 2, seed=1)) == 2


def test_shifted_logits_model_matches_naive_and_is_batch_invariant():
    # Dream-style models predict token i+1 at position i; score_tokens reads position-1.
    torch.manual_seed(0)
    shifted = _ShiftedToy().eval()
    reqs = []
    for seed, (plen, rlen) in enumerate([(3, 5), (1, 2), (6, 9)]):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (plen + rlen,), generator=g).tolist()
        m = sample_masks(rlen, 4, seed=seed)
        reqs.append(ScoreRequest(ids[:plen], ids[plen:], m.masks, m.weights))
    with torch.no_grad():
        together = elbo_terms(shifted, reqs, mask_token_id=MASK_ID, pad_token_id=PAD_ID)
        for req, terms in zip(reqs, together):
            (alone,) = elbo_terms(shifted, [req], mask_token_id=MASK_ID, pad_token_id=PAD_ID)
            naive = torch.stack([_naive_term(shifted, req.prompt_ids, req.response_ids, mk, w)
                                 for mk, w in zip(req.masks, req.weights)])
            assert torch.allclose(terms, alone, atol=1e-5, rtol=0)
            assert torch.allclose(terms, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["l_over_L", "one_over_t"])
def test_masked_request_is_the_seeded_masks_over_the_response(scheme):
    """The one request builder: the masks and weights of sample_masks(len(response), n, seed) over the
    response, the prompt as given; the same arguments give the same request, another seed other masks."""
    from pipeline.estimator.diffusion import masked_request

    request, ms = masked_request([5, 6, 7], [8, 9, 10, 11], 3, 1234, scheme=scheme, eps=0.1)
    direct = sample_masks(4, 3, 1234, scheme=scheme, eps=0.1)
    assert list(request.prompt_ids) == [5, 6, 7] and list(request.response_ids) == [8, 9, 10, 11]
    assert torch.equal(request.masks, direct.masks) and torch.equal(request.weights, direct.weights)
    assert torch.equal(ms.counts, direct.counts) and request.masks.shape == (3, 4)
    again, _ = masked_request([5, 6, 7], [8, 9, 10, 11], 3, 1234, scheme=scheme, eps=0.1)
    assert torch.equal(again.masks, request.masks)
    other, _ = masked_request([5, 6, 7], [8, 9, 10, 11], 3, 1235, scheme=scheme, eps=0.1)
    assert not torch.equal(other.masks, request.masks) or not torch.equal(other.weights, request.weights)
