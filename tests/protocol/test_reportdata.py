"""REPORTDATA bindings are 64 bytes, domain-separated, and bind every input."""

from __future__ import annotations

import hashlib

import pytest

from ee.protocol.reportdata import (
    cp_envelope_report_data,
    cp_write_document,
    health_report_data,
    registration_report_data,
)

NONCE = bytes(range(32))
KEY = bytes(range(32, 64))
DIGEST = hashlib.sha256(b"compose").digest()


def test_registration_binding() -> None:
    expected = hashlib.sha512(b"ee/v2/register" + NONCE + KEY).digest()
    value = registration_report_data(NONCE, KEY)
    assert value == expected and len(value) == 64
    assert registration_report_data(NONCE[:-1] + b"\x00", KEY) != value
    assert registration_report_data(NONCE, KEY[:-1] + b"\x00") != value
    with pytest.raises(ValueError, match="32 raw bytes"):
        registration_report_data(NONCE, KEY[:16])


def test_health_binding_accepts_raw_or_hex_digest() -> None:
    expected = hashlib.sha512(b"ee/v2/health" + NONCE + DIGEST).digest()
    assert health_report_data(NONCE, DIGEST) == expected
    assert health_report_data(NONCE, DIGEST.hex()) == expected
    assert health_report_data(NONCE, hashlib.sha256(b"other").digest()) != expected
    # the same bytes under the other tag differ: a health quote is no registration quote
    assert health_report_data(NONCE, KEY) != registration_report_data(NONCE, KEY)


def test_cp_envelope_binding_is_tagged_and_binds_nonce_and_key() -> None:
    value = cp_envelope_report_data(NONCE, KEY)
    assert value == hashlib.sha512(b"ee/v2/cp-envelope" + NONCE + KEY).digest()
    assert cp_envelope_report_data(NONCE[:-1] + b"\x00", KEY) != value
    assert cp_envelope_report_data(NONCE, KEY[:-1] + b"\x00") != value
    assert registration_report_data(NONCE, KEY) != value  # another domain tag
    with pytest.raises(ValueError):
        cp_envelope_report_data(NONCE, KEY[:16])


def test_cp_write_document_leaves_the_envelope_out() -> None:
    body = {"deployment_id": "d", "app": "a"}
    doc = cp_write_document("undeploy", body | {"envelope": {"seq": 1}}, NONCE, 3)
    assert doc == {"domain": "ee/v2/cp-write", "type": "undeploy", "body": body,
                   "cp_nonce": NONCE.hex(), "seq": 3}
