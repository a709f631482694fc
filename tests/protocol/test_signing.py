"""Ed25519 over canonical JSON; signed files and key files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    SignedDocument,
    generate_signing_key,
    load_private_key,
    load_public_key,
    public_key_bytes,
    public_key_from_bytes,
    read_signed,
    save_private_key,
    save_public_key,
    sign_document,
    verify_document,
    write_signed,
)

KEY = generate_signing_key()
PUB = KEY.public_key()
DOC = {"cluster_id": "c-1", "roots": ["a", "b"], "nested": {"z": 1, "a": [True, None, 1.5]}}


def test_signature_is_independent_of_key_order() -> None:
    reordered = {
        "nested": {"a": [True, None, 1.5], "z": 1},
        "roots": ["a", "b"],
        "cluster_id": "c-1",
    }
    assert list(reordered) != list(DOC)
    signature = sign_document(DOC, KEY)
    assert len(signature) == 64
    verify_document(reordered, signature, PUB)
    assert sign_document(reordered, KEY) == signature  # Ed25519 is deterministic


def test_changed_document_or_wrong_key_fails() -> None:
    signature = sign_document(DOC, KEY)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_document(DOC | {"cluster_id": "c-2"}, signature, PUB)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_document(DOC, signature, generate_signing_key().public_key())
    signed = SignedDocument.sign(DOC, KEY)
    signed.verify(PUB)
    with pytest.raises(SignatureError):
        SignedDocument(document=DOC, signature=b"\x00" * 64).verify(PUB)


def test_write_and_read_signed(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.json"
    write_signed(path, DOC, KEY)
    assert read_signed(path, PUB) == DOC
    assert (tmp_path / "bootstrap.json.sig").read_text().strip() == sign_document(DOC, KEY).hex()
    # a pretty-printed copy of the same document still verifies
    path.write_text(json.dumps(DOC, indent=4))
    assert read_signed(path, PUB) == DOC


@pytest.mark.parametrize("which", ["document", "signature"])
def test_flipping_any_bit_pattern_of_any_byte_fails(tmp_path: Path, which: str) -> None:
    path = tmp_path / "manifest.json"
    write_signed(path, DOC, KEY)
    target = path if which == "document" else Path(f"{path}.sig")
    original = target.read_bytes()
    for index in range(len(original) - 1):  # the last byte is the newline
        for mask in (0x01, 0x20, 0x80, 0xFF):
            raw = bytearray(original)
            raw[index] ^= mask
            target.write_bytes(bytes(raw))
            with pytest.raises(SignatureError) as info:
                read_signed(path, PUB)
            assert "\n" not in str(info.value)
    target.write_bytes(original)
    assert read_signed(path, PUB) == DOC


@pytest.mark.parametrize(
    ("doc_text", "sig_text", "reason"),
    [
        (None, "00" * 64, "document missing"),
        ('{"a": 1}', None, "signature missing"),
        ('{"a": ', "00" * 64, "malformed JSON"),
        ('{"a": 1, "a": 2}', "00" * 64, "malformed JSON (duplicate key 'a')"),
        ('{"a": NaN}', "00" * 64, "malformed JSON (NaN is not allowed)"),
        ("[1]", "00" * 64, "not a JSON object"),
        ('{"a": 1}', "zz", "malformed signature"),
        ('{"a": 1}', "00" * 63, "malformed signature"),
        ('{"a": 1}', "00" * 64, "bad signature"),
    ],
)
def test_read_signed_reasons(
    tmp_path: Path, doc_text: str | None, sig_text: str | None, reason: str
) -> None:
    path = tmp_path / "doc.json"
    if doc_text is not None:
        path.write_text(doc_text)
    if sig_text is not None:
        Path(f"{path}.sig").write_text(sig_text)
    with pytest.raises(SignatureError) as info:
        read_signed(path, PUB)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_key_files(tmp_path: Path) -> None:
    private = tmp_path / "cp.key"
    public = tmp_path / "cp.pub"
    save_private_key(private, KEY)
    save_public_key(public, PUB)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    loaded = load_private_key(private)
    assert public_key_bytes(loaded) == public_key_bytes(KEY)
    assert public_key_bytes(load_public_key(public)) == public_key_bytes(PUB)
    assert public_key_bytes(public_key_from_bytes(public_key_bytes(PUB))) == public_key_bytes(PUB)
    with pytest.raises(FileExistsError):
        save_private_key(private, generate_signing_key())
    save_private_key(private, generate_signing_key(), overwrite=True)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert public_key_bytes(load_private_key(private)) != public_key_bytes(KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp.key", "cp.pub"]  # no temp files


def test_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="key file missing"):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "junk.key")
    save_public_key(tmp_path / "cp.pub", PUB)
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "cp.pub")


def test_enveloped_round_trip_and_tamper(tmp_path: Path) -> None:
    from ee.protocol.signing import read_enveloped, write_enveloped

    key = generate_signing_key()
    path = tmp_path / "m.json"
    write_enveloped(path, {"b": 1, "a": [1, 2]}, key)
    assert read_enveloped(path, key.public_key()) == {"a": [1, 2], "b": 1}
    envelope = json.loads(path.read_text())
    envelope["document"]["b"] = 2
    path.write_text(json.dumps(envelope))
    with pytest.raises(SignatureError, match="bad signature"):
        read_enveloped(path, key.public_key())
    path.write_text('{"document": {}, "signature": "zz"}')
    with pytest.raises(SignatureError, match="not hex"):
        read_enveloped(path, key.public_key())
    path.write_text("[]")
    with pytest.raises(SignatureError, match="not a signed document"):
        read_enveloped(path, key.public_key())
    other = generate_signing_key()
    write_enveloped(path, {"x": 1}, other)
    with pytest.raises(SignatureError):
        read_enveloped(path, key.public_key())
