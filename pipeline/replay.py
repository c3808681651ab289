"""Replaying the cache's masks: the policy is scored on exactly the masks the reference was.

``train`` and ``eval`` both rebuild, from a cached row's seeds, the masks
score-ref drew (draw = epoch mod draws), so policy and reference terms share
their noise (VRPO's antithetic sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError


@dataclass
class PairBatch:
    rows: list[dict[str, Any]]
    draw: int

    @property
    def pair_ids(self) -> list[str]:
        return [r["pair_id"] for r in self.rows]


def replay_requests(batch: PairBatch, manifest_fp: dict[str, Any]) -> list:
    """ScoreRequests on exactly the cached masks: [pair0 chosen, pair0 rejected, pair1 chosen, ...]."""
    from pipeline.diffusion import ScoreRequest, sample_masks

    n, scheme = manifest_fp["samples"], manifest_fp["scheme"]
    eps = manifest_fp.get("eps") or 1e-3
    requests = []
    for row in batch.rows:
        for side in ("chosen", "rejected"):
            response = row[f"{side}_ids"]
            ms = sample_masks(len(response), n, row[f"{side}_seeds"][batch.draw], scheme=scheme, eps=eps)
            if ms.counts.tolist() != list(row[f"{side}_mask_counts"][batch.draw]):
                raise UserError(f"pair {row['pair_id']} ({side}): masks replayed from the cached seed differ from "
                                "the cached mask counts; the cache was written by an incompatible version")
            requests.append(ScoreRequest(row["prompt_ids"], response, ms.masks, ms.weights))
    return requests
