"""Secret sealing: the crypto of tenant secrets, at rest on the CP and in transit to
an attested agent. Pure (no I/O, no Trio); every primitive is ``cryptography``'s.

Theory of operation
-------------------
**At rest (CP).** Each secret value is AES-256-GCM under the CP's *data key* with a
fresh 96-bit IV and the associated data ``ee/v2/secret-at-rest || app || name ||
version`` (canonical JSON), so a sealed row moved to another app, name or version does
not open. The data key is random, stored only *wrapped*: AES-256-GCM under the
*wrapping key* (kept outside the record store: a 0600 file beside the CP's bootstrap
key), AAD ``ee/v2/secret-data-key``. A copy of the database alone opens nothing.

**Key proof (agent → CP).** Each agent process makes an X25519 key pair in memory and
never writes the private half anywhere. The CP asks for the public half with a fresh
nonce; the agent answers with the key and an Ed25519 signature by its *session key*
over :func:`secrets_key_document` (domain, nonce, key). The session key is the one the
agent's registration quote binds (REPORTDATA = SHA-512("ee/v2/register" || nonce ||
session key)) and every re-attestation binds again, so the chain is: the TD's quote
vouches for the session key, the session key vouches for this X25519 key, for this
nonce. A key recorded from another agent or another request does not verify.

**Release (CP → agent).** :func:`seal_release` does X25519 with a fresh ephemeral key
against the agent's proven key, HKDF-SHA256 (salt = ephemeral || recipient, info
``ee/v2/secret-release``) into an AES-256-GCM key, and encrypts with AAD =
:func:`release_aad` (deployment id, secret name, secret version, the CP's release
nonce, the recipient key). :func:`open_release` is the agent's inverse; any change to
those fields, another recipient, or a flipped bit raises :class:`SealError`.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ee.protocol.canonical import canonical_json

__all__ = [
    "IV_BYTES",
    "KEY_BYTES",
    "SealError",
    "new_data_key",
    "open_at_rest",
    "open_release",
    "release_aad",
    "seal_at_rest",
    "seal_release",
    "secrets_key_document",
    "unwrap_data_key",
    "wrap_data_key",
    "x25519_public_bytes",
]

KEY_BYTES = 32
IV_BYTES = 12
_AT_REST = "ee/v2/secret-at-rest"
_DATA_KEY = b"ee/v2/secret-data-key"
_RELEASE = "ee/v2/secret-release"
_KEY_PROOF = "ee/v2/secrets-key"


class SealError(Exception):
    """A sealed value does not open (wrong key, wrong associated data, tampered)."""


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    iv = os.urandom(IV_BYTES)
    return iv + AESGCM(key).encrypt(iv, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise SealError(f"key must be {KEY_BYTES} bytes")
    if len(sealed) < IV_BYTES + 16:
        raise SealError("sealed value is too short")
    try:
        return AESGCM(key).decrypt(sealed[:IV_BYTES], sealed[IV_BYTES:], aad)
    except InvalidTag:
        raise SealError("the sealed value does not open with this key and context") from None


# ---- at rest -------------------------------------------------------------------------

def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def wrap_data_key(wrapping_key: bytes, data_key: bytes) -> bytes:
    return _seal(wrapping_key, data_key, _DATA_KEY)


def unwrap_data_key(wrapping_key: bytes, wrapped: bytes) -> bytes:
    return _open(wrapping_key, wrapped, _DATA_KEY)


def _at_rest_aad(app: str, name: str, version: int) -> bytes:
    return canonical_json({"domain": _AT_REST, "app": app, "name": name, "version": version})


def seal_at_rest(data_key: bytes, value: bytes, *, app: str, name: str, version: int) -> bytes:
    return _seal(data_key, value, _at_rest_aad(app, name, version))


def open_at_rest(data_key: bytes, sealed: bytes, *, app: str, name: str, version: int) -> bytes:
    return _open(data_key, sealed, _at_rest_aad(app, name, version))


# ---- key proof -----------------------------------------------------------------------

def x25519_public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def secrets_key_document(nonce: bytes, secrets_key: bytes) -> dict[str, str]:
    """What the agent's session key signs to vouch for its X25519 *secrets_key*."""
    return {"domain": _KEY_PROOF, "nonce": nonce.hex(), "secrets_key": secrets_key.hex()}


# ---- release -------------------------------------------------------------------------

def release_aad(*, deployment_id: str, name: str, version: int, nonce: bytes,
                recipient: bytes) -> bytes:
    return canonical_json({"domain": _RELEASE, "deployment_id": deployment_id, "name": name,
                           "version": version, "nonce": nonce.hex(),
                           "recipient": recipient.hex()})


def _release_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral + recipient,
                info=_RELEASE.encode()).derive(shared)


def seal_release(recipient: bytes, value: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(ephemeral public key, IV || ciphertext) of *value* for the X25519 *recipient*."""
    if len(recipient) != KEY_BYTES:
        raise SealError("recipient must be a 32-byte X25519 public key")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = x25519_public_bytes(ephemeral)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    return ephemeral_pub, _seal(_release_key(shared, ephemeral_pub, recipient), value, aad)


def open_release(key: X25519PrivateKey, ephemeral: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The agent's side of :func:`seal_release`; :class:`SealError` when it does not open."""
    if len(ephemeral) != KEY_BYTES:
        raise SealError("ephemeral key must be 32 bytes")
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    except ValueError:  # an all-zero shared secret (low-order point)
        raise SealError("ephemeral key is not a usable X25519 key") from None
    return _open(_release_key(shared, ephemeral, x25519_public_bytes(key)), sealed, aad)
