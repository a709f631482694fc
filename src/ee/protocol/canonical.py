"""Canonical JSON: the one byte form used wherever JSON is hashed or signed.

Keys sorted, no insignificant whitespace, UTF-8, no NaN/Infinity. Two parties that
agree on a value agree on its canonical bytes, so hashes and signatures over it match.
"""

from __future__ import annotations

import json


def canonical_json(value: object) -> bytes:
    """Serialise *value* to canonical JSON bytes (raises ValueError on NaN/Infinity)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
