"""The data order: which rows each process trains on at each micro-batch, an epoch being one shuffled pass.

The order of epoch e is a shuffle seeded by (seed, e); step s of an epoch takes the next
``batch_size * grad_accum * world`` positions, micro-batch by micro-batch, process by process. A resumed run
recomputes the same positions, so it trains on the rows the uninterrupted run would have.
"""

from __future__ import annotations

import functools
import math
import random


def step_counts(n_rows: int, cfg, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): an epoch is one pass over the rows at cfg's global batch."""
    steps_per_epoch = max(1, math.ceil(n_rows / (cfg.batch_size * cfg.grad_accum * world)))
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


@functools.lru_cache(maxsize=4)  # every micro-batch of an epoch reads the same order: shuffled once
def epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_rows))
    random.Random(f"{seed}:{epoch}").shuffle(order)  # string seeds are stable across Python runs
    return tuple(order)


def micro_batch_rows(rows, cfg, step: int, micro: int, steps_per_epoch: int, world: int, rank: int):
    """The rows this process trains on at (step, micro). An epoch is one pass over its own shuffled order:
    its last micro-batches hold what is left (fewer rows, or none), never a pair already seen in the epoch."""
    epoch = step // steps_per_epoch
    order = epoch_order(len(rows), cfg.seed, epoch)
    start, stop = micro_batch_span(len(rows), cfg, step, micro, steps_per_epoch, world, rank)
    return epoch, [rows[order[i]] for i in range(start, stop)]


def micro_batch_span(n_rows: int, cfg, step: int, micro: int, steps_per_epoch: int, world: int,
                     rank: int) -> tuple[int, int]:
    """Positions [start, stop) in the epoch's order of the rows process ``rank`` trains on at (step, micro)."""
    pos = step % steps_per_epoch
    start = (pos * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
    return start, max(start, min(start + cfg.batch_size, n_rows))


def step_spans(n_rows: int, cfg, step: int, steps_per_epoch: int, world: int) -> list[tuple[int, int]]:
    """Every micro-batch's and process's span of the step (``micro_batch_span``), micro-batch by micro-batch."""
    return [micro_batch_span(n_rows, cfg, step, micro, steps_per_epoch, world, rank)
            for micro in range(cfg.grad_accum) for rank in range(world)]


def step_pair_count(n_rows: int, cfg, step: int, steps_per_epoch: int, world: int) -> int:
    """Pairs the whole step trains on, over every micro-batch and process (``micro_batch_rows``' arithmetic)."""
    return sum(stop - start for start, stop in step_spans(n_rows, cfg, step, steps_per_epoch, world))


def step_rows(n_rows: int, cfg, step: int, steps_per_epoch: int, world: int) -> list[int]:
    """The indices of the rows the whole step trains on, over every micro-batch and process, in that order."""
    order = epoch_order(n_rows, cfg.seed, step // steps_per_epoch)
    return [order[i] for start, stop in step_spans(n_rows, cfg, step, steps_per_epoch, world)
            for i in range(start, stop)]
