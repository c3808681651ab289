"""The one canonical JSON of a value and its sha256: how fingerprints, model identities and sample identities are
compared by content."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Keys sorted, no spaces, anything JSON cannot hold as its ``str``: equal content, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_digest(value: Any, length: int = 64) -> str:
    """The sha256 (hex, its first ``length`` digits) of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]
