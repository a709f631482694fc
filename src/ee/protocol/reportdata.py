"""REPORTDATA bindings: what a TDX quote's 64-byte REPORTDATA field commits to.

Each binding is SHA-512 over a domain tag and the values it binds, so a quote made
for one purpose cannot be replayed for another:

- registration: ``SHA-512(b"ee/v2/register" || nonce || public_key)``, binding the
  quote to the CP's single-use challenge and the agent's raw 32-byte Ed25519 session
  key;
- workload health (``GET /.ee/health?attest=true``):
  ``SHA-512(b"ee/v2/health" || nonce || compose_hash)`` where ``compose_hash`` is the
  raw digest (pass the bytes, or the hex string as reported, which is decoded) of the
  *workload* hash the agent reports under that name
  (:func:`ee.protocol.compose.workload_hash`: compose, build context, env, exposed
  port and service, health path, secret names);
- CP proof (``registered.cp_proof``): ``SHA-512(b"ee/v2/cp-envelope" || cp_nonce ||
  cp_public_key)``, binding the CP's quote to the nonce the agent chose for this
  session and to the CP's raw 32-byte Ed25519 write key.

The tagged fields have fixed meanings but not all fixed lengths; the nonce and key
lengths are fixed by the protocol (nonce 16..64 bytes is checked by the messages, the
public key is always 32 bytes, and it comes last), so concatenation is unambiguous.

What the CP's write key signs on each write (``envelope.signature``) is not REPORTDATA
but lives here too, beside the proof it hangs from: :func:`cp_write_document`, a JSON
object signed with :func:`ee.protocol.signing.sign_document` (canonical JSON).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "REPORT_DATA_BYTES",
    "cp_envelope_report_data",
    "cp_write_document",
    "health_report_data",
    "registration_report_data",
]

REPORT_DATA_BYTES = 64
_REGISTER_TAG = b"ee/v2/register"
_HEALTH_TAG = b"ee/v2/health"
_ENVELOPE_TAG = b"ee/v2/cp-envelope"
CP_WRITE_DOMAIN = "ee/v2/cp-write"


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


def cp_envelope_report_data(cp_nonce: bytes, cp_public_key: bytes) -> bytes:
    """REPORTDATA for the CP's quote proving its write key to one session (64 bytes)."""
    if len(cp_public_key) != 32:
        raise ValueError(f"public key must be 32 raw bytes, got {len(cp_public_key)}")
    if not cp_nonce:
        raise ValueError("cp_nonce must not be empty")
    return hashlib.sha512(_ENVELOPE_TAG + cp_nonce + cp_public_key).digest()


def cp_write_document(
    type_: str, body: Mapping[str, Any], cp_nonce: bytes, seq: int
) -> dict[str, Any]:
    """What the CP's write key signs for one write: the message type, its body as sent
    (without ``envelope``), the session's ``cp_nonce`` (hex) and the write's ``seq``."""
    unsigned = {k: v for k, v in body.items() if k != "envelope"}
    return {"domain": CP_WRITE_DOMAIN, "type": type_, "body": unsigned,
            "cp_nonce": cp_nonce.hex(), "seq": seq}
