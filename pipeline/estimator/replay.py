"""Replaying the cache's masks on another model: per training batch, or in the cache's own layout.

``replay_requests`` builds a training batch's requests on the cached masks
(train, eval's training-pair sample). ``part_requests`` and ``rescore_part``
rebuild one cache part exactly as score-ref scored it: the same rows in the
same order, the same requests in the same order, the same token budget per
forward pass, so the forward passes have the same shapes and padding and the
cache's own model, in the cache's numerics, reproduces the cached terms bit
for bit (eval's "before" of the reference is exactly 0.5, in any dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import UserError
from pipeline.core.lazy import deferred
from pipeline.core.schemas import IDS_COLUMNS, MASK_COUNT_COLUMNS, PAIR_ID_COLUMN, SEED_COLUMNS, SIDES
from pipeline.estimator import (
    diffusion,  # by module, so that a stand-in for diffusion.elbo_terms (the tests') is called
)

torch = deferred("torch")  # eval's config reads this module: its --help and flag errors skip torch


@dataclass
class PairBatch:
    rows: list[dict[str, Any]]
    draw: int

    @property
    def pair_ids(self) -> list[str]:
        return [r[PAIR_ID_COLUMN] for r in self.rows]


def seeded_request(row: dict, side: str, seed: int, fingerprint: dict[str, Any]):
    """The request of one (pair, side) of a cache row on the masks ``seed`` draws under the cache's estimator
    settings (samples, scheme, eps); with its MaskSet."""
    return diffusion.masked_request(row[IDS_COLUMNS["prompt"]], row[IDS_COLUMNS[side]], fingerprint["samples"], seed,
                                    scheme=fingerprint["scheme"], eps=fingerprint.get("eps") or 1e-3)


def cached_request(row: dict, side: str, draw: int, fingerprint: dict[str, Any]):
    """The request of one (pair, side) on the cached masks of ``draw``, checked against the cached counts."""
    request, ms = seeded_request(row, side, row[SEED_COLUMNS[side]][draw], fingerprint)
    if ms.counts.tolist() != list(row[MASK_COUNT_COLUMNS[side]][draw]):
        raise UserError(f"pair {row['pair_id']} ({side}): masks replayed from the cached seed differ from "
                        "the cached mask counts; the cache was written by an incompatible version")
    return request


def replay_requests(batch: PairBatch, fingerprint: dict[str, Any]) -> list:
    """ScoreRequests on exactly the cached masks: [pair0 chosen, pair0 rejected, pair1 chosen, ...]."""
    return [cached_request(row, side, batch.draw, fingerprint) for row in batch.rows for side in SIDES]


def part_requests(rows: list[dict], fingerprint: dict[str, Any]) -> tuple[list, list[tuple[int, str]]]:
    """A part's requests in score-ref's order (row, then side, then draw) and their (row, side) layout."""
    keys = [(i, side, draw) for i in range(len(rows)) for side in SIDES for draw in range(fingerprint["draws"])]
    return [cached_request(rows[i], side, draw, fingerprint) for i, side, draw in keys], [k[:2] for k in keys]


def elbo_pass(model, tokenizer, requests: list, *, batch_tokens: int, autocast, wanted=None) -> list:
    """One no-grad ``elbo_terms`` pass over ``requests`` under ``autocast``, with the tokenizer's mask and pad ids
    (``wanted``: only the batches of those requests; the entry of a request with a row outside them None)."""
    with torch.no_grad(), autocast:
        return diffusion.elbo_terms(model, requests, mask_token_id=tokenizer.mask_token_id,
                                    pad_token_id=tokenizer.pad_token_id, batch_tokens=batch_tokens,
                                    **({} if wanted is None else {"wanted": wanted}))


def terms_by_row(model, tokenizer, requests: list, layout: list[tuple[int, str]], rows: int, *, batch_tokens: int,
                 autocast, wanted=None) -> list[dict[str, list[list[float]]]]:
    """``elbo_pass`` over ``requests`` (laid out as ``layout``'s (row, side), score-ref's order); for each of the
    ``rows`` {"chosen", "rejected"} -> one list of float64 terms per draw (None for a request that ``wanted``'s
    batches did not cover)."""
    terms = elbo_pass(model, tokenizer, requests, batch_tokens=batch_tokens, autocast=autocast, wanted=wanted)
    values: list[dict[str, list[list[float]]]] = [{side: [] for side in SIDES} for _ in range(rows)]
    for (i, side), t in zip(layout, terms):
        values[i][side].append(None if t is None else t.double().cpu().tolist())
    return values


def mean_of_draws(draws: list[list[float]]) -> float:
    """A response's ELBO from its cached terms: the mean over every draw's terms, summed in their order."""
    flat = [v for draw in draws for v in draw]
    return sum(flat) / len(flat)


def rescore_part(model, tokenizer, rows: list[dict], fingerprint: dict[str, Any], *, batch_tokens: int,
                 autocast) -> list[dict[str, float]]:
    """ELBOs of every row of one cache part under ``model``, computed as score-ref computed the cached
    ones (same requests, order and token budget; mean of the float64 terms in the same order).
    Returns one {"chosen", "rejected"} dict per row."""
    values = rescore_part_draws(model, tokenizer, rows, fingerprint, batch_tokens=batch_tokens, autocast=autocast)
    return [{side: mean_of_draws(v[side]) for side in SIDES} for v in values]


def rescore_part_draws(model, tokenizer, rows: list[dict], fingerprint: dict[str, Any], *, batch_tokens: int,
                       autocast, only_rows=None, draw: int | None = None) -> list[dict[str, list[list[float]]]]:
    """``rescore_part``'s pass, kept per draw: for each row {"chosen", "rejected"} -> one list of float64 terms
    per draw, as score-ref wrote ``ref_{side}_terms`` (so the cache's model gives the cached lists exactly).
    ``only_rows`` (row indices) and ``draw``: only the forward batches that hold those rows' requests of that
    draw run (the part's batch plan unchanged, so their terms are the full pass's, as are those of any other
    request those batches cover); the lists of requests left out are None."""
    requests, layout = part_requests(rows, fingerprint)
    wanted = None
    if only_rows is not None or draw is not None:
        keep = set(range(len(rows)) if only_rows is None else only_rows)
        draws = fingerprint["draws"]
        wanted = [i in keep and (draw is None or k % draws == draw) for k, (i, _) in enumerate(layout)]
    return terms_by_row(model, tokenizer, requests, layout, len(rows), batch_tokens=batch_tokens, autocast=autocast,
                        wanted=wanted)
