"""ee.protocol.sealing: at-rest sealing, the key proof document, release sealing."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ee.protocol import sealing
from ee.protocol.sealing import SealError


def test_at_rest_round_trip_and_context_binding() -> None:
    data_key = sealing.new_data_key()
    sealed = sealing.seal_at_rest(data_key, b"hunter2", app="a.app", name="db", version=1)
    assert b"hunter2" not in sealed
    assert sealing.open_at_rest(data_key, sealed, app="a.app", name="db", version=1) == b"hunter2"
    for ctx in ({"app": "b.app", "name": "db", "version": 1},
                {"app": "a.app", "name": "other", "version": 1},
                {"app": "a.app", "name": "db", "version": 2}):
        with pytest.raises(SealError):
            sealing.open_at_rest(data_key, sealed, **ctx)  # type: ignore[arg-type]
    with pytest.raises(SealError):
        sealing.open_at_rest(sealing.new_data_key(), sealed, app="a.app", name="db", version=1)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        sealing.open_at_rest(data_key, tampered, app="a.app", name="db", version=1)


def test_data_key_wrapping() -> None:
    wrapping, data_key = sealing.new_data_key(), sealing.new_data_key()
    wrapped = sealing.wrap_data_key(wrapping, data_key)
    assert data_key not in wrapped
    assert sealing.unwrap_data_key(wrapping, wrapped) == data_key
    with pytest.raises(SealError):
        sealing.unwrap_data_key(sealing.new_data_key(), wrapped)
    with pytest.raises(SealError):
        sealing.unwrap_data_key(wrapping, wrapped[:10])


def _aad(**overrides: object) -> bytes:
    fields: dict[str, object] = {"deployment_id": "dep-1", "name": "db", "version": 3,
                                 "nonce": b"n" * 16, "recipient": b"r" * 32}
    fields.update(overrides)
    return sealing.release_aad(**fields)  # type: ignore[arg-type]


def test_release_opens_only_for_its_recipient_and_context() -> None:
    agent = X25519PrivateKey.generate()
    other = X25519PrivateKey.generate()
    recipient = sealing.x25519_public_bytes(agent)
    aad = _aad(recipient=recipient)
    ephemeral, sealed = sealing.seal_release(recipient, b"s3cret", aad)
    assert b"s3cret" not in sealed
    assert sealing.open_release(agent, ephemeral, sealed, aad) == b"s3cret"
    with pytest.raises(SealError):  # another agent's key
        sealing.open_release(other, ephemeral, sealed, aad)
    for change in ({"deployment_id": "dep-2"}, {"name": "x"}, {"version": 4},
                   {"nonce": b"m" * 16}, {"recipient": b"q" * 32}):
        with pytest.raises(SealError):
            sealing.open_release(agent, ephemeral, sealed,
                                 _aad(**{"recipient": recipient, **change}))
    with pytest.raises(SealError):
        sealing.open_release(agent, bytes(32), sealed, aad)  # low-order ephemeral point
    with pytest.raises(SealError):
        sealing.seal_release(b"short", b"v", aad)


def test_key_proof_document_names_nonce_and_key() -> None:
    doc = sealing.secrets_key_document(b"\x01" * 16, b"\x02" * 32)
    assert doc == {"domain": "ee/v2/secrets-key", "nonce": "01" * 16,
                   "secrets_key": "02" * 32}
