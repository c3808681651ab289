"""LLaDA's sampler against stub models whose logits are known exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.sampling.args import check_schedule
from pipeline.sampling.sampler import (
    commit_counts,
    generate,
    left_pad,
    num_transfer_tokens,
    trim_at_stop,
)

V = 12  # vocabulary of the stubs
MASK = 11
PAD = 10


def _ones_if_none(input_ids, attention_mask):
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def _offsets(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each position's offset from the row's first real token (left padding)."""
    pads = (attention_mask == 0).sum(1)
    return torch.arange(attention_mask.shape[1])[None, :] - pads[:, None]


class TableModel:
    """Predicts ``tokens[offset]`` with logit ``values[offset]`` (all else 0); records every call.

    The softmax probability of the prediction grows with its value, so the
    value table is the confidence order.
    """

    def __init__(self, tokens, values):
        self.tokens = torch.as_tensor(tokens)
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, attention_mask=None):
        attention_mask = _ones_if_none(input_ids, attention_mask)
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        off = _offsets(attention_mask).clamp(min=0) % len(self.tokens)
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(-1, self.tokens[off][..., None], self.values[off][..., None])
        return logits


class ContentModel:
    """Predictions that depend on the real (non-pad, non-mask) content, never on padding."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        attention_mask = _ones_if_none(input_ids, attention_mask)
        real = (attention_mask == 1) & (input_ids != MASK)
        total = (input_ids * real).sum(1, keepdim=True)
        off = _offsets(attention_mask).clamp(min=0)
        tok = (total + 3 * off) % 7
        val = ((7 * off + total) % 11).float() / 3.0 + 0.5
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(-1, tok[..., None], val[..., None])
        # Padding must never be looked at: poison it.
        assert torch.all(input_ids[attention_mask == 0] == PAD)
        return logits


def masked_count_per_call(model: TableModel, width: int) -> list[int]:
    return [int((ids[0, width:] == MASK).sum()) for ids, _ in model.calls]


def test_num_transfer_tokens_spreads_remainder_over_first_steps():
    out = num_transfer_tokens(torch.tensor([10, 3, 8]), 4)
    assert out.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [2, 2, 2, 2]]
    assert out.sum(1).tolist() == [10, 3, 8]


def test_unmasking_follows_confidence_inside_blocks():
    # Generation positions 0..7, two blocks of 4, two steps per block (2 tokens each).
    # Block 2 holds the highest confidence (0.95) but must wait for block 1.
    prompt = [1, 2, 3]
    conf = [0.1, 0.9, 0.5, 0.3, 0.95, 0.2, 0.6, 0.4]
    tokens = [0, 0, 0] + [1, 2, 3, 4, 5, 6, 7, 8]
    model = TableModel(tokens, [0.0] * 3 + [8 * c for c in conf])
    out = generate(model, [prompt], mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=4, steps=4)
    assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert len(model.calls) == 4  # one forward pass per step

    def committed(call_index):  # positions already filled when the call was made
        ids = model.calls[call_index][0][0, 3:]
        return {i for i in range(8) if ids[i] != MASK}

    assert committed(0) == set()
    assert committed(1) == {1, 2}  # the two most confident of block 1
    assert committed(2) == {0, 1, 2, 3}  # block 1 done; 4 (0.95) was never committed early
    assert committed(3) == {0, 1, 2, 3, 4, 6}
    # The prompt is passed unchanged and never masked.
    assert all(call[0][0, :3].tolist() == prompt for call in model.calls)


def test_exact_number_of_tokens_per_step_and_nothing_left_masked():
    model = TableModel([4] * 16, [float(i % 5) for i in range(16)])
    out = generate(model, [[1, 2]], mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=8, steps=3)
    # 8 tokens over 3 steps: 3, 3, 2.
    assert masked_count_per_call(model, 2) == [8, 5, 2]
    assert not (out == MASK).any()


def test_steps_beyond_block_length_skip_empty_steps():
    model = TableModel([4] * 16, [1.0] * 16)
    out = generate(model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=4, block_length=2, steps=8)
    # 4 steps per block of 2 tokens: 1, 1, 0, 0 -> two passes per block.
    assert masked_count_per_call(model, 1) == [4, 3, 2, 1]
    assert out.tolist() == [[4, 4, 4, 4]]


def test_mask_token_is_never_committed_even_if_predicted():
    model = TableModel([MASK] * 8, [5.0] * 8)
    out = generate(model, [[1, 2]], mask_token_id=MASK, pad_token_id=PAD, gen_length=6, block_length=3, steps=6)
    assert not (out == MASK).any()
    assert len(model.calls) == 6


def test_left_padding_gives_each_prompt_its_solo_result():
    prompts = [[1, 2], [3, 4, 5, 6, 7], [8], [2, 2, 2]]
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=12, block_length=4, steps=6)
    batched = generate(ContentModel(), prompts, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = generate(ContentModel(), [prompt], **kwargs)
        assert batched[row].tolist() == alone[0].tolist()
    # The batch is not trivially uniform: rows differ.
    assert len({tuple(r) for r in batched.tolist()}) > 1


def test_left_pad_layout():
    ids, attn = left_pad([[5, 6], [7]], PAD)
    assert ids.tolist() == [[5, 6], [PAD, 7]]
    assert attn.tolist() == [[1, 1], [0, 1]]


def test_temperature_zero_is_deterministic_and_ignores_seed():
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=4, steps=8)
    a = generate(ContentModel(), [[1, 2, 3]], generator=torch.Generator().manual_seed(1), **kwargs)
    b = generate(ContentModel(), [[1, 2, 3]], generator=torch.Generator().manual_seed(2), **kwargs)
    assert a.tolist() == b.tolist()


def flat_model(input_ids, attention_mask=None):
    """Uniform logits over the 10 ordinary tokens: any token choice is noise."""
    logits = torch.zeros(*input_ids.shape, V)
    logits[..., PAD:] = -1e9
    return logits


def test_seeded_noise_is_reproducible_and_per_row_independent_of_batch():
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=16, block_length=8, steps=8, temperature=1.0)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    a = generate(flat_model, [[1], [2, 3]], generator=gens([7, 8]), **kwargs)
    b = generate(flat_model, [[1], [2, 3]], generator=gens([7, 8]), **kwargs)
    c = generate(flat_model, [[1], [2, 3]], generator=gens([9, 8]), **kwargs)
    assert a.tolist() == b.tolist()
    assert a[0].tolist() != c[0].tolist() and a[1].tolist() == c[1].tolist()
    # Row 1 alone, same seed: same tokens as inside the batch.
    alone = generate(flat_model, [[2, 3]], generator=gens([8]), **kwargs)
    assert alone[0].tolist() == a[1].tolist()
    # The global RNG is untouched.
    state = torch.get_rng_state()
    generate(flat_model, [[1]], generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(state, torch.get_rng_state())


def test_gumbel_noise_samples_the_softmax_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])

    def model(input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, V), -1e9)
        logits[..., :3] = probs.log()
        return logits

    n = 3000
    out = generate(
        model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=n, block_length=n, steps=1,
        temperature=1.0, generator=torch.Generator().manual_seed(0),
    )
    freq = torch.bincount(out[0], minlength=3)[:3].double() / n
    assert torch.allclose(freq, probs.double(), atol=0.03), freq
    # Low temperature sharpens towards the argmax.
    cold = generate(
        model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=n, block_length=n, steps=1,
        temperature=0.1, generator=torch.Generator().manual_seed(0),
    )
    assert (cold[0] == 0).double().mean() > 0.99


def test_gumbel_noise_has_no_overflow_for_large_logits():
    def model(input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., 3] = 2000.0  # exp(2000) overflows float64
        return logits

    out = generate(
        model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=4, block_length=4, steps=4, temperature=0.7
    )
    assert out.tolist() == [[3, 3, 3, 3]]


def test_random_remasking_keeps_the_schedule_and_is_seeded():
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=4, steps=4, remasking="random")
    conf = [0.1, 0.9, 0.5, 0.3, 0.95, 0.2, 0.6, 0.4]
    orders = []
    for seed in (0, 0, 1, 2, 3):
        model = TableModel([0] + list(range(1, 9)), [0.0] + [8 * c for c in conf])
        out = generate(model, [[1]], generator=torch.Generator().manual_seed(seed), **kwargs)
        assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
        assert masked_count_per_call(model, 1) == [8, 6, 4, 2]
        # Block 2 untouched while block 1 is filled.
        assert all((ids[0, 5:] == MASK).all() for ids, _ in model.calls[:2])
        orders.append(tuple(tuple((ids[0, 1:] == MASK).tolist()) for ids, _ in model.calls))
    assert orders[0] == orders[1]
    assert len(set(orders)) > 1  # the order is not the confidence order every time


def test_classifier_free_guidance_combines_conditional_and_unconditional():
    seen = []

    def model(input_ids, attention_mask=None):
        seen.append((input_ids.clone(), attention_mask.clone()))  # padded batch: the mask is passed
        logits = torch.zeros(*input_ids.shape, V)
        real = attention_mask[:, :3] == 1
        prompt_masked = ((input_ids[:, :3] == MASK) | ~real).all(1)
        # Conditional: token 1 barely ahead of 2. Unconditional: token 1 far ahead.
        logits[~prompt_masked, :, 1] = 1.0
        logits[~prompt_masked, :, 2] = 0.9
        logits[prompt_masked, :, 1] = 2.0
        return logits

    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=2, block_length=2, steps=2)
    plain = generate(model, [[4, 5, 6], [7, 8]], **kwargs)
    assert plain.tolist() == [[1, 1], [1, 1]]
    seen.clear()
    guided = generate(model, [[4, 5, 6], [7, 8]], cfg_scale=1.0, **kwargs)
    # un + 2 * (cond - un): token 1 -> 0, token 2 -> 1.8.
    assert guided.tolist() == [[2, 2], [2, 2]]
    ids, attn = seen[0]
    assert ids.shape[0] == 4  # one pass for both halves
    assert ids[2, :3].tolist() == [MASK, MASK, MASK]
    assert ids[3, :3].tolist() == [PAD, MASK, MASK]  # padding stays padding
    assert torch.equal(attn[:2], attn[2:])


def test_shifted_logits_read_the_previous_position():
    class Shifted:
        logits_shift = True

        def __call__(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, V)
            pos = torch.arange(input_ids.shape[1])
            # Position i predicts token (i + 1) % 10 for position i + 1.
            logits[:, pos, (pos + 1) % 10] = 5.0
            return logits

    out = generate(Shifted(), [[1, 2]], mask_token_id=MASK, pad_token_id=PAD, gen_length=4, block_length=4, steps=4)
    assert out.tolist() == [[2, 3, 4, 5]]


class HeadModel(torch.nn.Module):
    """A module with ``final_hidden`` + head; ``forward`` gives the same logits the long way."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, V)
        self.head_rows: list[int] = []
        self.head.register_forward_hook(lambda m, i, o: self.head_rows.append(i[0].shape[1]))

    def final_hidden(self, input_ids, attention_mask=None):
        attention_mask = _ones_if_none(input_ids, attention_mask)
        h = self.emb(input_ids)
        w = attention_mask[..., None].float()
        pooled = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        return torch.tanh(self.mix(h + pooled))

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.final_hidden(input_ids, attention_mask))


def test_head_only_on_current_block_matches_full_logits():
    model = HeadModel()
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=4, steps=4)
    fast = generate(model, [[1, 2, 3], [4]], **kwargs)
    assert model.head_rows and all(rows == 4 for rows in model.head_rows)
    slow = generate(lambda ids, attention_mask=None: model.forward(ids, attention_mask), [[1, 2, 3], [4]], **kwargs)
    assert fast.tolist() == slow.tolist()


def test_trim_at_stop():
    assert trim_at_stop([5, 6, 9, 7, 9], [9]) == [5, 6]
    assert trim_at_stop(torch.tensor([5, 8, 6]), [9, 8]) == [5]
    assert trim_at_stop([5, 6], [9]) == [5, 6]


@pytest.mark.parametrize(
    "gen,block,steps,msg",
    [(10, 4, 10, "multiple of block_length"), (8, 4, 3, "multiple of the number of blocks"), (8, 4, 0, "positive")],
)
def test_schedule_errors(gen, block, steps, msg):
    with pytest.raises(ValueError, match=msg):
        check_schedule(gen, block, steps)


def test_bad_remasking_name():
    with pytest.raises(ValueError, match="remasking"):
        generate(flat_model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=2, block_length=2, steps=2,
                 remasking="entropy")


def test_empty_batch():
    out = generate(flat_model, [], mask_token_id=MASK, pad_token_id=PAD, gen_length=4, block_length=4, steps=4)
    assert out.shape == (0, 4)


def test_unpadded_batches_pass_no_attention_mask():
    masks = []

    def model(input_ids, attention_mask=None):
        masks.append(attention_mask)
        return flat_model(input_ids)

    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=2, block_length=2, steps=1)
    generate(model, [[1, 2], [3, 4]], **kwargs)
    generate(model, [[1, 2], [3]], **kwargs)
    assert masks[0] is None and masks[1].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


# --- the real (micro) LLaDA ----------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    from pipeline.models import load_model

    return load_model("micro")


def test_real_model_batch_equals_solo_and_head_path_equals_forward(micro):
    model, tokenizer = micro
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ["What is 12 plus 30?", "Hi", "Please write a short poem about the sea."]]
    assert len({len(p) for p in prompts}) == 3
    kwargs = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  gen_length=8, block_length=4, steps=8)
    batched = generate(model, prompts, **kwargs)
    for row, prompt in enumerate(prompts):
        assert generate(model, [prompt], **kwargs)[0].tolist() == batched[row].tolist()
    full = generate(lambda ids, attention_mask=None: model(ids, attention_mask=attention_mask).logits, prompts, **kwargs)
    assert full.tolist() == batched.tolist()
    assert not (batched == model.config.mask_token_id).any()


def test_real_model_guidance_and_sampling_run(micro):
    model, tokenizer = micro
    prompt = [tokenizer("What is 12 plus 30?", add_special_tokens=False)["input_ids"]]
    kwargs = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  gen_length=8, block_length=8, steps=4)
    greedy = generate(model, prompt, **kwargs)
    guided = generate(model, prompt, cfg_scale=2.0, **kwargs)
    hot = [generate(model, prompt, temperature=5.0, generator=torch.Generator().manual_seed(s), **kwargs) for s in range(3)]
    for out in [greedy, guided, *hot]:
        assert out.shape == (1, 8) and not (out == model.config.mask_token_id).any()
    assert len({tuple(h[0].tolist()) for h in hot}) > 1


# --- Fast-dLLM: threshold (parallel) decoding and the approximate KV cache ------------------------


def test_commit_counts_hand_worked():
    # ceil(masked / steps left) at least, every confident one, never more than is masked.
    got = commit_counts(torch.tensor([10, 3, 0, 5, 4]), 4, torch.tensor([0, 3, 0, 1, 4]))
    assert got.tolist() == [3, 3, 0, 2, 4]
    assert commit_counts(torch.tensor([7, 2]), 1, torch.tensor([0, 0])).tolist() == [7, 2]


def test_commit_counts_with_nothing_confident_is_the_fixed_schedule():
    for n in range(0, 13):
        for steps in range(1, 6):
            left, got = n, []
            for step in range(steps):
                k = int(commit_counts(torch.tensor([left]), steps - step, torch.tensor([0]))[0])
                got.append(k)
                left -= k
            assert got == num_transfer_tokens(torch.tensor([n]), steps)[0].tolist()


def _p(v):  # softmax probability of the TableModel's prediction with logit v (all 11 others 0)
    return torch.softmax(torch.tensor([v] + [0.0] * (V - 1)), 0)[0].item()


def test_threshold_commits_every_confident_position_and_at_least_one_per_step():
    values = [8.0, 1.0, 8.0, 1.0, 1.0, 8.0, 1.0, 1.0]
    assert _p(8.0) > 0.9 > _p(1.0)
    model = TableModel([0, 0] + [4] * 8, [0.0, 0.0] + values)
    out = generate(model, [[1, 2]], mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=8, steps=8,
                   threshold=0.9)
    # Step 1 commits the three confident ones, then one a step; the block stops once full (6 of 8 passes).
    assert masked_count_per_call(model, 2) == [8, 5, 4, 3, 2, 1]
    assert out.tolist() == [[4] * 8]


def test_threshold_block_finishes_within_its_steps():
    # Two steps for a block of 8: at least ceil(8/2) = 4 at the first step, everything at the last.
    model = TableModel([0] + [5] * 16, [0.0] + [1.0] * 16)
    generate(model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=16, block_length=8, steps=4,
             threshold=0.99)
    assert masked_count_per_call(model, 1) == [16, 12, 8, 4]
    model = TableModel([0] + [5] * 8, [0.0] + [8.0] * 5 + [1.0] * 3)
    generate(model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=8, steps=2,
             threshold=0.9)
    assert masked_count_per_call(model, 1) == [8, 3]  # five above the threshold beat the quota of four


def test_threshold_above_one_equals_the_exact_sampler_on_stubs():
    prompts = [[1, 2], [3, 4, 5, 6, 7], [8]]
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=12, block_length=4, steps=6)
    exact = generate(ContentModel(), prompts, **kwargs)
    assert generate(ContentModel(), prompts, threshold=1.5, **kwargs).tolist() == exact.tolist()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    hot = generate(flat_model, prompts, temperature=1.0, generator=gens(), **kwargs)
    assert generate(flat_model, prompts, temperature=1.0, generator=gens(), threshold=2.0, **kwargs).tolist() == \
        hot.tolist()


def test_cache_on_a_model_without_one_falls_back_to_the_exact_path():
    prompts = [[1, 2], [3]]
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, gen_length=8, block_length=4, steps=4)
    exact = generate(ContentModel(), prompts, **kwargs)
    with pytest.warns(UserWarning, match="falls back to the exact path"):
        got = generate(ContentModel(), prompts, cache="dual", **kwargs)
    assert got.tolist() == exact.tolist()


@pytest.mark.parametrize("kw, msg", [({"cache": "full"}, "cache must be one of"), ({"threshold": 0.0}, "> 0"),
                                     ({"threshold": 0.5, "remasking": "random"}, "low_confidence")])
def test_bad_fast_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(flat_model, [[1]], mask_token_id=MASK, pad_token_id=PAD, gen_length=4, block_length=4, steps=4, **kw)


def _prompts(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in ["What is 12 plus 30?", "Hi", "Please write a short poem about the sea."]]


def test_real_model_threshold_above_one_equals_exact(micro):
    model, tokenizer = micro
    prompts = _prompts(tokenizer)
    kwargs = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  gen_length=8, block_length=4, steps=8, temperature=1.0)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(3)]  # noqa: E731
    exact = generate(model, prompts, generator=gens(), **kwargs)
    assert generate(model, prompts, generator=gens(), threshold=1.01, **kwargs).tolist() == exact.tolist()


def test_one_layer_model_cache_is_exact_so_cached_sampling_equals_exact():
    # One layer: the cached keys and values depend on their own tokens only, so never go stale.
    from pipeline.models import load_model
    from pipeline.models.llada import LLaDAModelLM

    base, tokenizer = load_model("micro")
    config = base.config.__class__(**{**base.config.to_dict(), "n_layers": 1})
    torch.manual_seed(0)
    model = LLaDAModelLM(config).eval()
    prompts = _prompts(tokenizer)
    kwargs = dict(mask_token_id=config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  gen_length=12, block_length=4, steps=12)
    exact = generate(model, prompts, **kwargs)
    for cache in ("prefix", "dual"):
        assert generate(model, prompts, cache=cache, **kwargs).tolist() == exact.tolist()


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_real_model_fast_sampling_does_not_depend_on_batch(micro, cache, monkeypatch):
    model, tokenizer = micro
    prompts = _prompts(tokenizer)
    # threshold 0.002 (about 1/vocab): the rows need different numbers of passes, so inside a batch a
    # finished row sits through its neighbours' extra steps.
    kwargs = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  gen_length=12, block_length=4, steps=12, temperature=1.0, cache=cache, threshold=0.002)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    passes = []
    for name in ("final_hidden", "hidden_with_kv"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _f=original, **k: passes.append(1) or _f(*a, **k))
    batched = generate(model, prompts, generator=gens([0, 1, 2]), **kwargs)
    assert not (batched == model.config.mask_token_id).any()
    solo_passes = []
    for row, prompt in enumerate(prompts):
        passes.clear()
        assert generate(model, [prompt], generator=gens([row]), **kwargs)[0].tolist() == batched[row].tolist()
        solo_passes.append(len(passes))
    assert len(set(solo_passes)) > 1 and max(solo_passes) < 12
    pair = generate(model, [prompts[2], prompts[0]], generator=gens([2, 0]), **kwargs)
    assert pair.tolist() == [batched[2].tolist(), batched[0].tolist()]


def test_lora_wrapped_model_takes_the_cache_with_its_adapters(recwarn):
    # A peft model (what eval and make-pairs load from a LoRA folder) reaches hidden_with_kv through peft's
    # attribute forwarding, with the adapters applied: on a one-layer model cached equals exact.
    from peft import LoraConfig, get_peft_model

    from pipeline.models import LORA_TARGET_MODULES, load_model
    from pipeline.models.llada import LLaDAModelLM
    from pipeline.sampling.sampler import supports_kv_cache

    base, tokenizer = load_model("micro")
    config = base.config.__class__(**{**base.config.to_dict(), "n_layers": 1})
    torch.manual_seed(1)
    model = get_peft_model(LLaDAModelLM(config).eval(), LoraConfig(r=4, lora_alpha=8,
                                                                   target_modules=LORA_TARGET_MODULES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the outputs
    model.eval()
    assert supports_kv_cache(model)
    prompts = _prompts(tokenizer)
    kwargs = dict(mask_token_id=config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  gen_length=8, block_length=4, steps=8)
    exact = generate(model, prompts, **kwargs)
    with model.disable_adapter():
        assert generate(model, prompts, **kwargs).tolist() != exact.tolist()
    assert generate(model, prompts, cache="dual", **kwargs).tolist() == exact.tolist()
    assert not [w for w in recwarn if "falls back" in str(w.message)]
