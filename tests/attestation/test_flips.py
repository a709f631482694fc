"""Untrusted quote bytes, with sim quotes made here (no shared sample files needed).

Every single-bit flip, truncation or forgery of a sim quote must end as one of the
verifier's two typed outcomes -- `QuoteFormatError`, or a result with reasons -- and
never as another exception or an acceptance. Each signature check is shown necessary
by a forgery that only that check catches.
"""

from __future__ import annotations

import base64
import struct
import time
from collections import Counter
from collections.abc import Iterator

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ee.attestation import Collateral, Policy, Quote, QuoteFormatError, Verifier, parse_quote
from ee.attestation.providers.sim import SimTD
from ee.attestation.quote import MAX_PCK_CHAIN_CERTS, MAX_QUOTE_BYTES
from ee.cp.nodes import Vocabulary
from ee.cp.registration import Judge
from ee.protocol.frames import decode_message, encode_message
from ee.protocol.messages import Attestation, Health, NodeInfo, Register, Snapshot
from ee.protocol.reportdata import registration_report_data

NOW = 1_760_000_000
NONCE = bytes(range(32))
AGENT_KEY = bytes(range(100, 132))
# `cryptography` warns when it decodes a Name attribute a flip made invalid (reasons
# name the certificate); the flip is refused all the same.
CORRUPT_NAMES = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


@pytest.fixture(scope="module")
def collateral(sim: SimTD) -> Collateral:
    return sim.collateral(issued_at=NOW - 60)


@pytest.fixture(scope="module")
def verifier(sim: SimTD) -> Verifier:
    return Verifier([sim.root_cert])


@pytest.fixture(scope="module")
def raw(sim: SimTD) -> bytes:
    return sim.quote(registration_report_data(NONCE, AGENT_KEY))


def _pem_span(raw: bytes) -> tuple[int, int]:
    pem = parse_quote(raw).signature.pck_chain_pem
    start = raw.index(pem)
    return start, start + len(pem)


def _outcome(verifier: Verifier, data: bytes, collateral: Collateral | None) -> str:
    """'format' or 'refused'; anything else (accepted, another exception) fails."""
    try:
        result = verifier.verify(data, now=NOW, collateral=collateral)
    except QuoteFormatError:
        return "format"
    assert result.reasons and not result.ok
    return "refused"


def _flips(raw: bytes, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    for i in range(start, end):
        for bit in range(8):
            mutated = bytearray(raw)
            mutated[i] ^= 1 << bit
            yield i, bit, bytes(mutated)


def _sweep(verifier: Verifier, raw: bytes, span: tuple[int, int], collateral: Collateral) -> None:
    assert verifier.verify(raw, now=NOW, collateral=collateral).ok  # the baseline passes
    counts: Counter[str] = Counter()
    started = time.perf_counter()
    for i, bit, mutated in _flips(raw, *span):
        try:
            counts[_outcome(verifier, mutated, collateral)] += 1
        except BaseException as exc:
            raise AssertionError(f"flipping bit {bit} of byte {i}: {exc!r}") from exc
    print(
        f"{sum(counts.values())} flips of bytes {span} in {time.perf_counter() - started:.1f}s:",
        dict(counts),
    )
    assert sum(counts.values()) == 8 * (span[1] - span[0])


@CORRUPT_NAMES
def test_every_bit_of_the_pck_chain_is_refused(
    verifier: Verifier, raw: bytes, collateral: Collateral
) -> None:
    """Each single-bit flip of the PEM chain (with collateral, so CRL lookups run too)
    is refused. None is tolerated: PEM whitespace, padding and stray base64 bits are
    refused by the parser, and a certificate's signature BIT STRING may not declare
    unused bits (the one change `cryptography` would have read as the same signature).
    """
    _sweep(verifier, raw, _pem_span(raw), collateral)


@CORRUPT_NAMES
def test_every_bit_outside_the_chain_is_refused(
    verifier: Verifier, raw: bytes, collateral: Collateral
) -> None:
    """Header, body, signature, attestation key, QE report, its signature and auth data,
    and every length and type field."""
    _sweep(verifier, raw, (0, _pem_span(raw)[0]), collateral)


def test_every_truncation_is_a_format_error(verifier: Verifier, raw: bytes) -> None:
    for cut in range(len(raw)):
        with pytest.raises(QuoteFormatError):
            verifier.verify(raw[:cut], now=NOW)


# --- the two frames the fuzzer found ----------------------------------------------------


def _pem_block(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = b"".join(b64[i : i + 64] + b"\n" for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"-----END CERTIFICATE-----\n"


def _with_leaf(raw: bytes, edit: int, mask: int) -> bytes:
    """*raw* with byte *edit* of the PCK leaf certificate's DER xor *mask*."""
    der = parse_quote(raw).signature.pck_chain_der[0]
    bad = bytearray(der)
    bad[edit] ^= mask
    old, new = _pem_block(der), _pem_block(bytes(bad))
    assert raw.count(old) == 1 and len(new) == len(old)
    return raw.replace(old, new)


def _version_at(der: bytes) -> int:
    at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] { INTEGER 2 }: X.509 v3
    assert at < 10
    return at


def version_18(raw: bytes) -> bytes:
    """The PCK certificate's version INTEGER 2 -> 18 (one bit): `InvalidVersion`."""
    der = parse_quote(raw).signature.pck_chain_der[0]
    return _with_leaf(raw, _version_at(der) + 4, 0x10)


def negative_serial(raw: bytes) -> bytes:
    """The serial's sign bit set (one bit): a `ValueError` in the CRL lookup."""
    der = parse_quote(raw).signature.pck_chain_der[0]
    serial = _version_at(der) + 5
    assert der[serial] == 0x02 and not der[serial + 2] & 0x80
    return _with_leaf(raw, serial + 2, 0x80)


CRAFTED = [
    pytest.param(version_18, "not an X.509 v3 certificate", id="version-18"),
    pytest.param(negative_serial, "serial number is not a positive INTEGER", id="negative-serial"),
]


def _register(quote: bytes) -> Register:
    node = NodeInfo(
        node_size="standard", datacenter="local:dev", gpu=False, vcpus=4, memory_mb=8192
    )
    return Register(
        vm_name="vm-1",
        node_size="standard",
        datacenter="local:dev",
        agent_version="2.0.0",
        public_key=AGENT_KEY,
        attestation=Attestation(provider="sim", quote=quote),
        snapshot=Snapshot(deployments=(), health=Health(), node=node, seq=0),
    )


def test_signature_with_unused_bits_is_refused() -> None:
    """A certificate signature BIT STRING that declares unused bits: `cryptography`
    reads the same signature from it (when those bits are zero), so without the strict
    read this flip of the chain verified. Deterministic: a sim is drawn whose PCK leaf
    signature ends in a zero bit (half of them do)."""
    for _ in range(64):
        sim = SimTD.create()
        leaf = sim.chain.pck_cert
        if not leaf.signature[-1] & 1:
            break
    raw = sim.quote(bytes(64))
    der = parse_quote(raw).signature.pck_chain_der[0]
    at = len(der) - len(leaf.signature) - 1  # BIT STRING: unused-bits octet, signature
    assert der[at] == 0
    bad = _with_leaf(raw, at, 0x01)
    result = Verifier([sim.root_cert]).verify(bad, now=NOW)
    assert not result.ok
    assert "PCK_CERT_INVALID: certificate 0: signature BIT STRING has unused bits" in (
        result.reasons
    )


@pytest.mark.parametrize(("craft", "why"), CRAFTED)
def test_crafted_register_frames_are_refused(
    craft: object, why: str, sim: SimTD, raw: bytes, collateral: Collateral
) -> None:
    """The two frames that once took the agent plane down, end to end through the CP's
    registration and re-attestation decisions: a refusal with a reason."""
    assert callable(craft)
    bad = craft(raw)
    result = Verifier([sim.root_cert]).verify(bad, now=NOW, collateral=collateral)
    assert not result.ok and not result.chain_valid
    assert [r for r in result.reasons if r.startswith("PCK_CERT_INVALID")] == [
        f"PCK_CERT_INVALID: certificate 0: {why}"
    ], result.reasons

    judge = Judge(
        cluster_id="c",
        vocabulary=Vocabulary(),
        verifier=Verifier([sim.root_cert]),
        policy=Policy(),
        collateral=collateral,
    )
    good = judge.admit(_register(raw), NONCE, now=NOW)
    assert good.identity is not None, good.refusal  # the untouched frame is admitted
    _, frame = decode_message(encode_message(_register(bad)), max_bytes=1 << 20, sender="agent")
    assert isinstance(frame, Register)
    admission = judge.admit(frame, NONCE, now=NOW)
    assert admission.identity is None and admission.refusal is not None
    assert admission.refusal.code == "ATTESTATION_FAILED"
    assert any(why in r for r in admission.refusal.reasons)
    refusal = judge.reattest(bad, NONCE, good.identity, now=NOW)
    assert refusal is not None and refusal.code == "ATTESTATION_FAILED"


def test_unforeseen_failure_is_a_refusal(
    sim: SimTD, raw: bytes, collateral: Collateral, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boundary, not the list of known exception types, keeps the caller safe: a
    check that raises something nobody mapped refuses the quote with its name."""
    import ee.attestation.verify as verify_module

    def broken(*_: object) -> None:
        raise LookupError("a decoder bug\nwith a newline")

    monkeypatch.setattr(verify_module, "match_tcb", broken)
    result = Verifier([sim.root_cert]).verify(raw, now=NOW, collateral=collateral)
    assert not result.ok
    assert result.reasons == ("VERIFY_ERROR: the quote could not be checked (the verifier "
                              "logged why)",)


def test_unforeseen_parse_failure_is_a_format_error(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ee.attestation.quote as quote_module

    def broken(*_: object) -> None:
        raise IndexError("index out of range")

    monkeypatch.setattr(quote_module, "_parse_td_report", broken)
    with pytest.raises(QuoteFormatError) as info:
        Verifier.intel().verify(raw, now=NOW)
    assert (info.value.field, info.value.offset) == ("quote", 0)
    assert info.value.message == ("VERIFY_ERROR: the quote could not be checked (the "
                                  "verifier logged why)")


# --- trailer and size caps ---------------------------------------------------------------


def test_zero_padding_is_tolerated_but_other_trailers_refused(
    verifier: Verifier, raw: bytes
) -> None:
    """Issue 14: bytes after the signature data are unsigned. Zero padding (what real
    quote buffers carry) is accepted; anything else is refused unless the caller opts
    in with `allow_trailer` (used only for a test corpus with a text note)."""
    padded = raw + bytes(70)
    assert parse_quote(padded).trailing == 70
    assert verifier.verify(padded, now=NOW).ok
    for i in (0, 35, 69):
        tail = bytearray(70)
        tail[i] = 1
        with pytest.raises(QuoteFormatError) as info:
            verifier.verify(raw + bytes(tail), now=NOW)
        assert (info.value.field, info.value.offset) == ("trailer", len(raw) + i)
    noted = raw + b"\nextra bytes(only for testing purpose)\n"
    quote = parse_quote(noted, allow_trailer=True)
    assert quote.trailing == 39 and verifier.verify(quote, now=NOW).ok


def test_oversized_quote_is_refused_before_parsing(raw: bytes) -> None:
    assert MAX_QUOTE_BYTES >= 16 * 1024  # room for real quotes and zero-padded buffers
    with pytest.raises(QuoteFormatError, match="more than the 65536 allowed") as info:
        parse_quote(raw + bytes(MAX_QUOTE_BYTES + 1 - len(raw)))
    assert info.value.field == "quote"
    assert parse_quote(raw + bytes(MAX_QUOTE_BYTES - len(raw))).trailing > 0  # at the cap


def _with_chain(raw: bytes, pem: bytes) -> bytes:
    """*raw* (a v4 quote) carrying another PEM chain, every length field adjusted."""
    q = parse_quote(raw)
    start, end = _pem_span(raw)
    grow = len(pem) - (end - start)
    out = bytearray(raw[:start] + pem + raw[end:])
    sig_len_at = len(q.signed_region)
    for at in (sig_len_at, sig_len_at + 4 + 128 + 2, start - 4):
        struct.pack_into("<I", out, at, struct.unpack_from("<I", out, at)[0] + grow)
    return bytes(out)


def test_long_chain_is_refused_before_any_certificate_is_read(
    sim: SimTD, verifier: Verifier, raw: bytes
) -> None:
    blocks = [_pem_block(d) for d in parse_quote(raw).signature.pck_chain_der]
    root = blocks[-1]
    assert verifier.verify(_with_chain(raw, b"".join(blocks)), now=NOW).ok  # helper sanity
    at_cap = blocks + [root] * (MAX_PCK_CHAIN_CERTS - len(blocks))
    parse_quote(_with_chain(raw, b"".join(at_cap)))
    with pytest.raises(QuoteFormatError, match=f"more than {MAX_PCK_CHAIN_CERTS} certificates"):
        parse_quote(_with_chain(raw, b"".join([*at_cap, root])))
    with pytest.raises(QuoteFormatError, match="certificates"):
        parse_quote(_with_chain(raw, root * 40))


# --- each signature check is necessary (issue 10) ----------------------------------------
#
# Each forgery below breaks exactly one link of the chain root -> PCK -> QE report ->
# attestation key -> TD report; every other check passes. Were that one check removed,
# the forged quote would verify: each test fails then (tried: see the module docstring).


def _sign(sim: SimTD, **keys: ec.EllipticCurvePrivateKey) -> SimTD:
    return attrs.evolve(sim, chain=attrs.evolve(sim.chain, **keys))


def _only(result: object, reason: str) -> None:
    from ee.attestation import VerificationResult

    assert isinstance(result, VerificationResult)
    assert not result.ok and result.reasons == (reason,), result.reasons


def test_quote_signature_is_necessary(verifier: Verifier, raw: bytes) -> None:
    """Another REPORTDATA (another nonce or key) under the genuine signature."""
    forged = bytearray(raw)
    forged[48 + 520] ^= 1
    result = verifier.verify(bytes(forged), now=NOW)
    assert result.qe_report_valid and result.qe_binding_valid and result.chain_valid
    assert not result.signature_valid
    _only(result, "quote signature does not verify with the attestation key")


def test_qe_report_signature_is_necessary(sim: SimTD, verifier: Verifier) -> None:
    """An attacker's own attestation key, bound by a QE report the attacker signed
    (without the PCK key) -- everything else is self-consistent."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = _sign(sim, attestation_key=attacker, pck_key=attacker).quote(bytes(64))
    result = verifier.verify(forged, now=NOW)
    assert result.signature_valid and result.qe_binding_valid and result.chain_valid
    assert not result.qe_report_valid
    _only(result, "QE report signature does not verify with the PCK key")


def test_qe_binding_is_necessary(sim: SimTD, verifier: Verifier, raw: bytes) -> None:
    """The genuine, PCK-signed QE report, re-used with an attacker's attestation key."""
    attacker = _sign(sim, attestation_key=ec.generate_private_key(ec.SECP256R1()))
    forged = bytearray(attacker.quote(parse_quote(raw).report.report_data))
    qe_at = len(parse_quote(raw).signed_region) + 4 + 128 + 6
    forged[qe_at : qe_at + 384 + 64] = raw[qe_at : qe_at + 384 + 64]
    result = verifier.verify(bytes(forged), now=NOW)
    assert result.signature_valid and result.qe_report_valid and result.chain_valid
    assert not result.qe_binding_valid
    _only(result, "QE report data does not bind the attestation key and QE auth data")


def test_pck_chain_is_necessary(sim: SimTD, verifier: Verifier) -> None:
    """A complete, self-consistent quote from a PKI the verifier does not trust."""
    other = SimTD.create()
    result = verifier.verify(other.quote(bytes(64)), now=NOW)
    assert result.signature_valid and result.qe_report_valid and result.qe_binding_valid
    assert not result.chain_valid and not result.ok
    assert any("not trusted" in r for r in result.reasons), result.reasons


def test_pck_chain_links_are_necessary(sim: SimTD, verifier: Verifier, raw: bytes) -> None:
    """A PCK leaf issued by an attacker's CA, presented with the trusted root."""
    other = SimTD.create()
    ours, theirs = (parse_quote(q).signature.pck_chain_der for q in (raw, other.quote(bytes(64))))
    pem = _pem_block(theirs[0]) + _pem_block(theirs[1]) + _pem_block(ours[2])
    forged = _with_chain(other.quote(bytes(64)), pem)
    result = verifier.verify(forged, now=NOW)
    assert result.signature_valid and result.qe_report_valid and result.qe_binding_valid
    assert not result.chain_valid and not result.ok


def test_parsed_quote_values_are_accepted(verifier: Verifier, raw: bytes) -> None:
    """`verify` takes a parsed `Quote` too (how callers opt into `allow_trailer`)."""
    quote = parse_quote(raw)
    assert isinstance(quote, Quote) and verifier.verify(quote, now=NOW).ok
