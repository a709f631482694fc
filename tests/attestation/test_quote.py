"""Parser: every field of the real quotes, agreement with dcap-qvl, malformed input."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import dcap_qvl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ee.attestation.errors import QuoteFormatError
from ee.attestation.quote import (
    BODY_TYPE_TD10,
    BODY_TYPE_TD15,
    Quote,
    parse_quote,
    split_pem_chain,
)

from .conftest import ALL_QUOTES, DEBUG, OUTDATED, SPR_E4, UPTODATE

REPORT_FIELDS = (
    "tee_tcb_svn",
    "mr_seam",
    "mr_signer_seam",
    "seam_attributes",
    "td_attributes",
    "xfam",
    "mr_td",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
    "report_data",
)


@pytest.mark.parametrize("name", ALL_QUOTES)
def test_fields_agree_with_dcap_qvl(
    name: str, sample_bytes: Callable[[str], bytes], sample_quote: Callable[[str], Quote]
) -> None:
    raw = sample_bytes(name)
    ours = sample_quote(name)
    theirs = dcap_qvl.parse_quote(raw)
    h = theirs.header
    assert ours.header.version == h.version
    assert ours.header.attestation_key_type == h.attestation_key_type
    assert ours.header.tee_type == h.tee_type == 0x81
    assert ours.header.qe_svn == h.qe_svn
    assert ours.header.pce_svn == h.pce_svn
    assert ours.header.qe_vendor_id == h.qe_vendor_id
    assert ours.header.user_data == h.user_data
    report = theirs.report
    for field in REPORT_FIELDS:
        assert getattr(ours.report, field) == getattr(report, field), field
    for i in range(4):
        assert getattr(ours.report, f"rtmr{i}") == getattr(report, f"rt_mr{i}")
    if ours.body_type == BODY_TYPE_TD15:
        assert ours.report.tee_tcb_svn2 == report.tee_tcb_svn2
        assert ours.report.mr_service_td == report.mr_service_td
    assert ours.signature.pck_chain_pem.rstrip(b"\0") == theirs.cert_chain_pem_bytes().rstrip(b"\0")
    assert theirs.fmspc() is not None


def test_v4_quote_with_zero_padding(sample_bytes: Callable[[str], bytes]) -> None:
    raw = sample_bytes(UPTODATE)
    q = parse_quote(raw)
    assert (len(raw), q.size, q.trailing) == (5006, 4936, 70)
    assert q.version == 4 and q.body_type == BODY_TYPE_TD10
    assert q.report.tee_tcb_svn2 is None and not q.report.debug
    assert len(q.signed_region) == 48 + 584
    assert len(q.signature.pck_chain_der) == 3
    assert q.signature.qe_report.isv_prod_id == 2
    assert len(q.signature.qe_auth_data) == 32


def test_v5_quote_td15_body(sample_bytes: Callable[[str], bytes]) -> None:
    q = parse_quote(sample_bytes(OUTDATED))
    assert q.version == 5 and q.body_type == BODY_TYPE_TD15
    assert len(q.signed_region) == 48 + 6 + 648
    assert q.report.tee_tcb_svn2 is not None and q.report.mr_service_td is not None
    assert q.trailing == 0


def test_debug_attribute(sample_quote: Callable[[str], Quote]) -> None:
    assert sample_quote(DEBUG).report.debug
    assert not sample_quote(SPR_E4).report.debug


def test_text_trailer_is_refused_unless_allowed(
    sample_bytes: Callable[[str], bytes], sample_quote: Callable[[str], Quote]
) -> None:
    """Issue 14: the go-tdx sample's note after the quote is unsigned: refused by
    default (at its first byte), accepted and counted only with `allow_trailer`."""
    raw = sample_bytes(SPR_E4)
    q = sample_quote(SPR_E4)
    assert q.trailing == len(b"\nextra bytes(only for testing purpose)\n")
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(raw)
    assert (info.value.field, info.value.offset) == ("trailer", q.size)


@pytest.mark.parametrize("name", ALL_QUOTES)
def test_every_truncation_is_a_format_error(
    name: str, sample_bytes: Callable[[str], bytes]
) -> None:
    raw = sample_bytes(name)
    q = parse_quote(raw, allow_trailer=True)
    for cut in range(q.size):
        with pytest.raises(QuoteFormatError) as info:
            parse_quote(raw[:cut], allow_trailer=True)
        assert info.value.field and 0 <= info.value.offset <= q.size


def test_format_errors_name_field_and_offset(sample_bytes: Callable[[str], bytes]) -> None:
    raw = bytearray(sample_bytes(UPTODATE))
    with pytest.raises(QuoteFormatError, match=r"header.version at offset 0"):
        parse_quote(b"\x07\x00" + bytes(raw[2:]))
    bad = bytearray(raw)
    bad[4] = 0  # tee_type SGX
    with pytest.raises(QuoteFormatError, match=r"header\.tee_type"):
        parse_quote(bytes(bad))
    bad = bytearray(raw)
    struct.pack_into("<I", bad, 632, 4301)  # signature data one byte longer
    with pytest.raises(QuoteFormatError, match=r"certification_data\.size"):
        parse_quote(bytes(bad))
    with pytest.raises(QuoteFormatError, match="header"):
        parse_quote(b"")


def test_pem_chain_is_strict() -> None:
    with pytest.raises(QuoteFormatError, match="no PEM"):
        split_pem_chain(b"\x00\x00")
    block = b"-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n"
    assert split_pem_chain(block) == (b"\x00\x01\x02",)
    assert split_pem_chain(block + block + b"\0") == (b"\x00\x01\x02",) * 2
    for lax in (block + b"junk", block + b"\n", block.replace(b"\n", b"\r\n"), block[:-1]):
        with pytest.raises(QuoteFormatError, match="PEM certificate block"):
            split_pem_chain(lax)
    short = block.replace(b"AAEC", b"AAE=")
    assert split_pem_chain(short) == (b"\x00\x01",)
    with pytest.raises(QuoteFormatError, match="canonical"):
        split_pem_chain(short.replace(b"AAE=", b"AAF="))  # same bytes, stray low bits


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=700))
def test_garbage_never_crashes(junk: bytes) -> None:
    with contextlib.suppress(QuoteFormatError):
        parse_quote(junk)


def test_der_slicing_agrees_with_cryptography(sample_bytes: Callable[[str], bytes]) -> None:
    from cryptography import x509

    from ee.attestation._der import CertInfo
    from ee.attestation.pck import pck_extension, pck_extension_of
    from ee.attestation.providers.sim import SimTD

    ders = [
        d
        for name in ALL_QUOTES
        for d in parse_quote(sample_bytes(name), allow_trailer=True).signature.pck_chain_der
    ]
    ders += list(parse_quote(SimTD.create().quote(bytes(64))).signature.pck_chain_der)
    for der in ders:
        info = CertInfo.from_der(der)
        cert = x509.load_der_x509_certificate(der)
        assert info.issuer == cert.issuer.public_bytes()
        assert info.subject == cert.subject.public_bytes()
        assert info.tbs == cert.tbs_certificate_bytes
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert info.is_ca is bc.ca
        if not bc.ca:
            assert pck_extension_of(info) == pck_extension(cert)
