"""Canonical JSON: the one byte form used wherever JSON is hashed or signed.

Keys sorted, no insignificant whitespace, UTF-8, no NaN/Infinity. Two parties that
agree on a value agree on its canonical bytes, so hashes and signatures over it match.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: object) -> bytes:
    """Serialise *value* to canonical JSON bytes (raises ValueError on NaN/Infinity)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def strict_json_loads(text: str) -> Any:
    """Parse JSON refusing duplicate keys and NaN/Infinity (ValueError), for documents
    that are signed or that configure a node: what is read is exactly what was meant."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
