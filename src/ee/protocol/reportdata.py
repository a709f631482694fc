"""REPORTDATA bindings: what a TDX quote's 64-byte REPORTDATA field commits to.

Each binding is SHA-512 over a domain tag and the values it binds, so a quote made
for one purpose cannot be replayed for another:

- registration: ``SHA-512(b"ee/v2/register" || nonce || public_key)``, binding the
  quote to the CP's single-use challenge and the agent's raw 32-byte Ed25519 session
  key;
- workload health (``GET /api/health?attest=true``):
  ``SHA-512(b"ee/v2/health" || nonce || compose_hash)`` where ``compose_hash`` is the
  raw digest (pass the bytes, or the hex string as reported, which is decoded);
- CP envelope on writes: ``SHA-512(b"ee/v2/cp-envelope" || type || 0x00 ||
  canonical_json(body without "envelope"))``.

The tagged fields have fixed meanings but not all fixed lengths; the nonce and key
lengths are fixed by the protocol (nonce 16..64 bytes is checked by the messages, the
public key is always 32 bytes), so concatenation is unambiguous for registration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ee.protocol.canonical import canonical_json

__all__ = [
    "REPORT_DATA_BYTES",
    "cp_envelope_report_data",
    "health_report_data",
    "registration_report_data",
]

REPORT_DATA_BYTES = 64
_REGISTER_TAG = b"ee/v2/register"
_HEALTH_TAG = b"ee/v2/health"
_ENVELOPE_TAG = b"ee/v2/cp-envelope"


def registration_report_data(nonce: bytes, public_key: bytes) -> bytes:
    """REPORTDATA for a registration quote (64 bytes)."""
    if len(public_key) != 32:
        raise ValueError(f"public key must be 32 raw bytes, got {len(public_key)}")
    return hashlib.sha512(_REGISTER_TAG + nonce + public_key).digest()


def health_report_data(nonce: bytes, compose_hash: bytes | str) -> bytes:
    """REPORTDATA for a workload health quote (64 bytes)."""
    if isinstance(compose_hash, str):
        # Accept the "sha256:<hex>" form that ee.protocol.compose.compose_hash returns.
        digest = bytes.fromhex(compose_hash.removeprefix("sha256:"))
    else:
        digest = compose_hash
    if not digest:
        raise ValueError("compose hash must not be empty")
    return hashlib.sha512(_HEALTH_TAG + nonce + digest).digest()


def cp_envelope_report_data(type_: str, body: Mapping[str, Any]) -> bytes:
    """REPORTDATA for the CP's quote on a write message (64 bytes)."""
    unsigned = {k: v for k, v in body.items() if k != "envelope"}
    return hashlib.sha512(
        _ENVELOPE_TAG + type_.encode("utf-8") + b"\x00" + canonical_json(unsigned)
    ).digest()
