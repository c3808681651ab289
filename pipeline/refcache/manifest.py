"""A finished cache's ``manifest.json`` by name: what score-ref writes last, and what train, eval and plan read.

The manifest is a JSON object (its keys as ``build_manifest`` writes them, in that order); ``CacheManifest`` reads
it through named accessors, so a reader never spells a key (``config``'s ``model``, ``batch_tokens``) itself and an
older manifest without a later key reads as its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.schemas import SCORES_SCHEMA
from pipeline.estimator.diffusion import BATCH_TOKENS


def build_manifest(*, fingerprint: dict[str, Any], digest: str, totals: dict[str, int], part_sha256: dict[str, str],
                   padding_fraction: float, config: dict[str, Any], processes: int) -> dict[str, Any]:
    """The manifest of a finished cache (``part_sha256``: each part's checksum by name, in part order)."""
    return {
        "fingerprint": fingerprint,
        "fingerprint_digest": digest,
        "pairs": totals["pairs"],
        "tokens": totals["tokens"],
        "parts": list(part_sha256),
        # Checked on every read: an altered or cut part is named instead of trained on.
        "part_sha256": part_sha256,
        "truncated": totals["truncated"],
        "padding_fraction": padding_fraction,
        "identical_after_truncation": totals["identical_after_truncation"],
        "schema": [f.name for f in SCORES_SCHEMA],
        "config": config,
        "processes": processes,
    }


@dataclass(frozen=True)
class CacheManifest:
    """Named accessors over a manifest's JSON object (``raw``, as read)."""

    raw: dict[str, Any]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.raw["fingerprint"]

    @property
    def digest(self) -> str | None:
        """The fingerprint's digest, as score-ref recorded it (a run folder names its cache by it)."""
        return self.raw.get("fingerprint_digest")

    @property
    def samples(self) -> int:
        """Monte Carlo samples per response and draw (the fingerprint's)."""
        return self.fingerprint["samples"]

    @property
    def draws(self) -> int:
        """Independent mask draws per response (the fingerprint's): epoch e replays draw e mod draws."""
        return self.fingerprint["draws"]

    @property
    def numerics(self):
        """The numerics the reference was scored in (dtype, mixed precision, 4-bit): models.numerics.Numerics."""
        from pipeline.models.numerics import of_fingerprint

        return of_fingerprint(self.fingerprint)

    @property
    def config(self) -> dict[str, Any]:
        """score-ref's settings as run (its config as a dict; empty in a manifest without one)."""
        return self.raw.get("config") or {}

    @property
    def reference_model(self) -> str:
        """The reference model as score-ref was given it (a preset name or a folder)."""
        return self.config["model"]

    @property
    def batch_tokens(self) -> int:
        """score-ref's token budget per forward pass: the cache's batch layout, in which eval and train's start
        check rescore the cached terms exactly."""
        return int(self.config.get("batch_tokens", BATCH_TOKENS))

    @property
    def pairs(self) -> int:
        return self.raw["pairs"]

    @property
    def tokens(self) -> int:
        return self.raw["tokens"]

    @property
    def parts(self) -> list[str] | None:
        """The part files' names, in order (None in a manifest written before they were listed)."""
        return self.raw.get("parts")

    @property
    def part_sha256(self) -> dict[str, str]:
        """Each listed part's checksum by name (empty in a manifest written before they were recorded)."""
        return self.raw.get("part_sha256") or {}

    @property
    def padding_fraction(self) -> float:
        return self.raw["padding_fraction"]

    @property
    def truncated(self) -> int:
        return self.raw.get("truncated", 0)

    @property
    def identical_after_truncation(self) -> int:
        return self.raw.get("identical_after_truncation", 0)
