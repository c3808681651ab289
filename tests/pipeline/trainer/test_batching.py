"""The data order (pipeline/trainer/batching.py): an epoch is one shuffled pass, split by micro-batch and process."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipeline.trainer.batching import micro_batch_rows, step_counts, step_pair_count, step_rows


@pytest.mark.parametrize("batch_size,grad_accum,world", [(4, 1, 1), (3, 2, 2)])
def test_an_epoch_uses_every_pair_once_and_never_wraps_round(batch_size, grad_accum, world):
    rows = [{"pair_id": f"p{i}"} for i in range(10)]
    cfg = SimpleNamespace(batch_size=batch_size, grad_accum=grad_accum, seed=0)
    steps = math.ceil(len(rows) / (batch_size * grad_accum * world))
    for epoch in range(2):
        seen, sizes = [], []
        for step in range(epoch * steps, (epoch + 1) * steps):
            for micro in range(grad_accum):
                for rank in range(world):
                    e, batch = micro_batch_rows(rows, cfg, step, micro, steps, world, rank)
                    assert e == epoch
                    seen += [r["pair_id"] for r in batch]
                    sizes.append(len(batch))
        assert sorted(seen) == sorted(r["pair_id"] for r in rows)  # every pair exactly once in the epoch
        assert sizes[-1] < batch_size  # the end of the epoch is short, not filled with pairs seen before


def test_step_pair_count_is_what_the_micro_batches_hold_and_step_counts_cover_the_epochs():
    rows = list(range(10))
    cfg = SimpleNamespace(batch_size=3, grad_accum=2, seed=1, max_steps=0, epochs=2)
    per_epoch, total = step_counts(len(rows), cfg, 2)
    assert (per_epoch, total) == (1, 2)
    held = sum(len(micro_batch_rows(rows, cfg, 0, micro, per_epoch, 2, rank)[1]) for micro in range(2)
               for rank in range(2))
    assert step_pair_count(len(rows), cfg, 0, per_epoch, 2) == held == 10
    assert step_counts(len(rows), SimpleNamespace(batch_size=3, grad_accum=2, max_steps=5, epochs=2), 2) == (1, 5)


def test_step_rows_are_the_micro_batches_rows_in_order():
    rows = list(range(11))
    cfg = SimpleNamespace(batch_size=2, grad_accum=2, seed=3)
    per_epoch, _ = step_counts(len(rows), SimpleNamespace(batch_size=2, grad_accum=2, max_steps=0, epochs=1), 2)
    for step in range(2 * per_epoch):
        held = [r for micro in range(2) for rank in range(2)
                for r in micro_batch_rows(rows, cfg, step, micro, per_epoch, 2, rank)[1]]
        assert step_rows(len(rows), cfg, step, per_epoch, 2) == held

