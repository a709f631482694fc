"""Ed25519 signatures over canonical JSON, and signed document files.

A signature always covers ``canonical_json(document)`` (sorted keys, no whitespace,
UTF-8), so it does not depend on key order or formatting: a document may be re-read,
re-serialised or pretty-printed and still verify.

Signed files (the CP's ``bootstrap.json`` and desired-state manifests) are one JSON
object in ``PATH`` (written in canonical form plus a newline) and a detached signature
in ``PATH.sig`` (the 64-byte signature as exactly 128 lowercase hex characters and a
newline). Reading
refuses duplicate keys and NaN/Infinity, because two parsers might disagree on what
such a document means. The signature file is written after the document, so a crash
between the two leaves a pair that fails verification rather than one that passes
with stale content.

Keys are PEM files: private keys PKCS#8 (unencrypted; the file is created mode 0600),
public keys SubjectPublicKeyInfo. On the wire a public key is its raw 32 bytes
(:func:`public_key_bytes`).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ee.protocol.canonical import canonical_json, strict_json_loads

__all__ = [
    "SIGNATURE_BYTES",
    "KeyFileError",
    "SignatureError",
    "SignedDocument",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "public_key_bytes",
    "public_key_from_bytes",
    "read_signed",
    "save_private_key",
    "save_public_key",
    "sign_document",
    "verify_document",
    "write_signed",
]

SIGNATURE_BYTES = 64
StrPath = str | os.PathLike[str]
_SIG_HEX = re.compile(rb"\A[0-9a-f]{128}\Z")


class SignatureError(Exception):
    """A signed document cannot be trusted; the message is a one-line reason."""


class KeyFileError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key of the expected kind."""


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def sign_document(doc: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The Ed25519 signature (64 bytes) over ``canonical_json(doc)``."""
    return key.sign(canonical_json(doc))


def verify_document(doc: Mapping[str, Any], signature: bytes, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` unless *signature* is valid for *doc*."""
    try:
        payload = canonical_json(doc)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"document is not JSON-serialisable: {exc}") from None
    try:
        public_key.verify(signature, payload)
    except InvalidSignature:
        raise SignatureError("bad signature") from None


@attrs.frozen
class SignedDocument:
    """A JSON object with its detached signature (the unit of :func:`write_signed`)."""

    document: Mapping[str, Any]
    signature: bytes

    @classmethod
    def sign(cls, doc: Mapping[str, Any], key: Ed25519PrivateKey) -> SignedDocument:
        return cls(document=doc, signature=sign_document(doc, key))

    def verify(self, public_key: Ed25519PublicKey) -> None:
        verify_document(self.document, self.signature, public_key)


# --- keys ---------------------------------------------------------------------------


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (of a private key: its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its raw 32 bytes (ValueError otherwise)."""
    return Ed25519PublicKey.from_public_bytes(raw)


def write_atomic(path: StrPath, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write *path* whole or not at all with *mode*: a fresh, exclusive temporary file of
    its own (concurrent writers never share one; a crash leftover lends no mode),
    fsynced, then renamed over it."""
    target = Path(path)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target}: already exists")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_private_key(path: StrPath, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write *key* as an unencrypted PKCS#8 PEM file with mode 0600 (atomically)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem, 0o600, overwrite=overwrite)


def save_public_key(path: StrPath, key: Ed25519PublicKey, *, overwrite: bool = False) -> None:
    """Write *key* as a SubjectPublicKeyInfo PEM file (mode 0644, atomically)."""
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomic(path, pem, 0o644, overwrite=overwrite)


def _read_key_file(path: StrPath) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file missing") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: unreadable ({exc.strerror})") from None


def load_private_key(path: StrPath) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: StrPath) -> Ed25519PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


# --- signed files -------------------------------------------------------------------


def _signature_path(path: StrPath) -> Path:
    return Path(os.fspath(path) + ".sig")


def write_signed(path: StrPath, doc: Mapping[str, Any], key: Ed25519PrivateKey) -> None:
    """Write *doc* to *path* and its signature to ``path + ".sig"`` (each atomically)."""
    payload = canonical_json(doc)
    signature = key.sign(payload)
    write_atomic(path, payload + b"\n", 0o644, overwrite=True)
    write_atomic(_signature_path(path), signature.hex().encode() + b"\n", 0o644, overwrite=True)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{path}: {what} missing") from None
    except OSError as exc:
        raise SignatureError(f"{path}: {what} unreadable ({exc.strerror})") from None


def read_signed(path: StrPath, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Read and verify a signed file; :class:`SignatureError` with a one-line reason."""
    doc_path = Path(path)
    sig_path = _signature_path(path)
    data = _read(doc_path, "document")
    sig_text = _read(sig_path, "signature").strip()
    try:
        doc = strict_json_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SignatureError(f"{doc_path}: malformed JSON ({reason})") from None
    if not isinstance(doc, dict):
        raise SignatureError(f"{doc_path}: not a JSON object")
    if not _SIG_HEX.match(sig_text):
        raise SignatureError(f"{sig_path}: malformed signature (expected 128 hex characters)")
    signature = bytes.fromhex(sig_text.decode("ascii"))
    try:
        verify_document(doc, signature, public_key)
    except SignatureError as exc:
        raise SignatureError(f"{doc_path}: {exc}") from None
    return doc


# --- one-file form: document and signature replaced together -------------------------


def write_enveloped(path: StrPath, doc: Mapping[str, Any], key: Ed25519PrivateKey) -> None:
    """Write ``{"document": doc, "signature": hex}`` to *path* in one atomic rename, so a
    crash can never leave a document paired with another version's signature (the
    detached form of :func:`write_signed` takes two renames)."""
    envelope = {"document": dict(doc), "signature": sign_document(doc, key).hex()}
    write_atomic(path, canonical_json(envelope) + b"\n", 0o644, overwrite=True)


def read_enveloped(path: StrPath, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Read and verify a :func:`write_enveloped` file; :class:`SignatureError` says why."""
    file = Path(path)
    data = _read(file, "document")
    try:
        envelope = strict_json_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SignatureError(f"{file}: malformed JSON ({reason})") from None
    if (not isinstance(envelope, dict) or not isinstance(envelope.get("document"), dict)
            or not isinstance(envelope.get("signature"), str)):
        raise SignatureError(f"{file}: not a signed document (document + signature)")
    try:
        signature = bytes.fromhex(envelope["signature"])
    except ValueError:
        raise SignatureError(f"{file}: signature is not hex") from None
    try:
        verify_document(envelope["document"], signature, public_key)
    except SignatureError as exc:
        raise SignatureError(f"{file}: {exc}") from None
    document: dict[str, Any] = envelope["document"]
    return document
