"""A cache's fingerprint: every setting that changes a reference score, its digest, and what differs between two.

score-ref records it (in ``fingerprint.json`` while scoring, in the manifest when done); a resumed run, train
and eval compare their own settings with it field by field, and name the first field that differs.
"""

from __future__ import annotations

from typing import Any

from pipeline import __version__
from pipeline.core.digest import canonical_json, content_digest
from pipeline.core.errors import UserError
from pipeline.data.prompts import PROMPT_RENDERER

ESTIMATOR_VERSION = "elbo-masked-v1"
"""Bump when the estimator's arithmetic changes: old caches then no longer match."""


def build_fingerprint(cfg, model_identity: Any, tokenizer_identity: str, pairs_sha: str) -> dict[str, Any]:
    """Everything that changes a score (``cfg``: score-ref's config); ``train`` and reruns compare field by field."""
    return {
        "model": model_identity,
        "tokenizer": tokenizer_identity,
        "chat_template": cfg.chat_template,
        "prompt_renderer": PROMPT_RENDERER,
        "max_length": cfg.max_length,
        # absent (None) in caches made before these existed: the same as not given
        "max_prompt_length": cfg.max_prompt_length,
        "max_completion_length": cfg.max_completion_length,
        "pad_to": cfg.pad_to,
        "estimator": ESTIMATOR_VERSION,
        "scheme": cfg.scheme,
        "eps": cfg.eps if cfg.scheme == "one_over_t" else None,
        "samples": cfg.samples,
        "draws": cfg.draws,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "mixed_precision": cfg.mixed_precision,
        "load_in_4bit": cfg.load_in_4bit,
        "pairs_sha256": pairs_sha,
        "limit": cfg.limit,
        "package_version": __version__,
        # only when shared: independent masks are how every cache before the setting was drawn, so their
        # fingerprints (and digests) stay what they were and they are reused as before
        **({"pair_masks": cfg.pair_masks} if cfg.pair_masks != "independent" else {}),
    }


def pair_masks_of(fingerprint: dict[str, Any]) -> str:
    """A cache's ``pair_masks``: recorded only when shared, so absent means independent (every earlier cache)."""
    return fingerprint.get("pair_masks") or "independent"


def fingerprint_digest(fields: dict[str, Any]) -> str:
    """A short hash of the canonical JSON of every field that changes a score."""
    return content_digest(fields, 16)


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Names of the fingerprint fields whose values differ (missing counts as different)."""
    return [k for k in sorted(set(expected) | set(found), key=str)
            if canonical_json(expected.get(k)) != canonical_json(found.get(k))]


def describe_difference(expected: dict[str, Any], found: dict[str, Any], field: str) -> str:
    """``field: cache has X, this run has Y``, pointed at what differs: nested mappings are followed to the first
    differing key (``model.weights.model.safetensors``), values are shown whole (a sha256 is 64 characters)
    or, when long, from just before their first differing character on both sides."""
    a, b, name = found.get(field), expected.get(field), field
    while isinstance(a, dict) and isinstance(b, dict):
        keys = fingerprint_differences(b, a)
        if not keys:
            break
        a, b, name = a.get(keys[0]), b.get(keys[0]), f"{name}.{keys[0]}"
    ta, tb = (canonical_json(v) for v in (a, b))
    if max(len(ta), len(tb)) > 100:
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        lo = max(0, first - 20)
        ta, tb = (("..." if lo else "") + t[lo:lo + 80] + ("..." if len(t) > lo + 80 else "") for t in (ta, tb))
    return f"{name}: cache has {ta}, this run has {tb}"


def check_reference_model(fingerprint: dict[str, Any], model_name: str, where: str) -> None:
    """``model_name``, used as the cache's reference, must still be the model that was scored (its content identity:
    config and weight hashes), or its scores are not the cache's and a "before" figure would mislead."""
    from pipeline.models import model_identity

    expected, actual = {"model": fingerprint.get("model")}, {"model": model_identity(model_name)}
    if fingerprint_differences(actual, expected):
        raise UserError(f"{where}: model '{model_name}' is no longer the model this cache was scored with ("
                        + describe_difference(actual, expected, "model")
                        + "); rescore it with score-ref, or name another --before")
