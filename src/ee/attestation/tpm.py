"""vTPM evidence: parse and verify a TPM 2.0 quote, its AK, EK certificate and event log.

Theory of operation
-------------------
The ``tpm`` provider gives real evidence on VMs without TDX (OVMF + a vTPM measures the
kernel into PCR4 and the initrd and cmdline into PCR9). What a CP can believe, and why::

    configured EK CA --signs--> EK certificate (public EK of a genuine TPM)
    EK <--credential activation (round trip)--> AK name  (AK is in that same TPM)
    AK public: restricted, sign, fixedTPM  (so it signs only TPM-made TPMS_ATTEST)
    AK --signs--> TPMS_ATTEST {magic, ATTEST_QUOTE, extraData, PCR selection, pcrDigest}
    extraData == SHA-256(registration_report_data(nonce, session key))
    pcrDigest == SHA-256(PCR values, in selection order)
    event log replayed (SHA-256 bank) == every quoted PCR

A restricted signing key refuses to sign data that starts with ``TPM_GENERATED_VALUE``
unless the TPM made it (TPM2_Quote), so a quote signed by it reports the TPM's real PCRs.
An unrestricted key in the same TPM could sign a forged TPMS_ATTEST, hence the attribute
check. The EK's public key comes from the certificate only; the agent's claims about its
EK are never used. Credential activation (`ee.attestation.tpm_credential`) needs one
more round trip than TDX (``credential`` / ``activation``); `TpmVerifier.verify` checks
everything else and `TpmVerifier.credential` makes the challenge for a verified result.

Wire form. The ``quote`` of an ``attestation`` whose provider is ``tpm`` is a
`TpmEvidence` blob: ``b"EETPM\\x00\\x01\\x00"`` then tagged fields, each ``tag (u8) ||
length (u32 BE) || bytes``, in this order, each exactly once except ``ek_chain`` (0..4):
ek_cert (1, DER), ek_chain (2, DER intermediates), ak_public (3, TPM2B_PUBLIC),
attest (4, TPMS_ATTEST), signature (5, TPMT_SIGNATURE), pcr_values (6, the SHA-256
values of the quoted PCRs in selection order, 32 bytes each), event_log (7, the TCG2
crypto-agile binary log, may be empty). Every size is capped; nothing may trail.

Exception boundary (as `ee.attestation.verify`): decoding raises `TpmFormatError` (a
`QuoteFormatError`, so registration answers ``BAD_QUOTE``) and nothing else; once the
bytes decode, every outcome, an unforeseen exception included, is a `TpmResult` with
reasons. Blocking and CPU-bound (RSA/ECDSA, hashing the log): call from a worker thread.

The event log is parsed and replayed (SHA-256 bank) by `ee.attestation.eventlog`; every
quoted PCR must equal its replayed value (zeros when the log never extends it), so a
log that is missing, partial or altered refuses. The measurement policy (PCR4/PCR9
allowlists, accepted providers) is applied by the caller to `TpmResult.pcrs`
(`ee.attestation.policy.evaluate_tpm`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation._der import CertInfo
from ee.attestation.collateral import TrustAnchors, cert_window, check_chain
from ee.attestation.errors import UNEXPECTED, QuoteFormatError, describe, quote_format_boundary
from ee.attestation.eventlog import EventLogFormatError, parse_event_log, replay_pcrs
from ee.attestation.tpm_credential import Credential, UnsupportedEk, ek_template, make_credential
from ee.protocol.reportdata import registration_report_data

__all__ = [
    "AkPublic",
    "Attest",
    "PcrSelection",
    "TpmEvidence",
    "TpmFormatError",
    "TpmResult",
    "TpmSignature",
    "TpmVerifier",
    "parse_attest",
    "parse_public",
    "parse_signature",
    "qualifying_data",
    "replay_event_log",
]

log = logging.getLogger(__name__)

# --- TPM 2.0 constants (Part 2) -------------------------------------------------------
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
ALG_RSA, ALG_ECC, ALG_NULL = 0x0001, 0x0023, 0x0010
ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512 = 0x0004, 0x000B, 0x000C, 0x000D
ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA = 0x0014, 0x0016, 0x0018
ECC_CURVES: Mapping[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1()}
DIGEST_SIZES: Mapping[int, int] = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64}
# TPMA_OBJECT bits
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 0x2, 0x10, 0x20
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
AK_REQUIRED = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN
PCR_COUNT = 24

# --- caps (bytes) ---------------------------------------------------------------------
MAX_NAME = 2 + 64
MAX_DATA = 64
MAX_DIGEST = 64
MAX_SELECTIONS = 4
MAX_SIZEOF_SELECT = 4
MAX_KEY_BYTES = 512  # RSA-4096 modulus
MAX_CERT = 4096
MAX_CHAIN = 4
MAX_PUBLIC = 1024
MAX_ATTEST = 1024
MAX_SIGNATURE = 1024
MAX_EVENT_LOG = 256 * 1024
EVIDENCE_MAGIC = b"EETPM\x00\x01\x00"
_QUALIFYING_TAG = "sha256"



class TpmFormatError(QuoteFormatError):
    """The TPM evidence is truncated or malformed at *field* (byte *offset*)."""


def qualifying_data(nonce: bytes, public_key: bytes) -> bytes:
    """The quote's qualifying data (extraData) for a registration: SHA-256 of the
    TDX REPORTDATA binding (`registration_report_data`). 32 bytes fit every TPM's
    TPM2B_DATA (a TPM with only SHA-256 caps it at 34 bytes)."""
    return hashlib.sha256(registration_report_data(nonce, public_key)).digest()


class _Reader:
    """A bounds-checked big-endian cursor; every failure names the field and offset."""

    def __init__(self, data: bytes, what: str, order: str = ">") -> None:
        self.data = data
        self.pos = 0
        self.what = what
        self.order = order  # TPM structures are big-endian, TCG event logs little-endian

    def fail(self, field: str, message: str) -> TpmFormatError:
        return TpmFormatError(f"{self.what}.{field}", self.pos, message)

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(field, f"truncated (need {n} bytes, {len(self.data) - self.pos} left)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(self.order + "H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(self.order + "I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(self.order + "Q", self.take(8, field))[0])

    def tpm2b(self, field: str, cap: int) -> bytes:
        size = self.u16(f"{field}.size")
        if size > cap:
            raise self.fail(field, f"size {size} exceeds {cap}")
        return self.take(size, field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("end", f"{len(self.data) - self.pos} trailing bytes")


# --- TPMS_ATTEST ------------------------------------------------------------------------


@attrs.frozen
class PcrSelection:
    hash_alg: int
    pcrs: tuple[int, ...]  # ascending


@attrs.frozen
class Attest:
    """A TPMS_ATTEST of type ATTEST_QUOTE (see TPM 2.0 Part 2 §10.12)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: int
    firmware_version: int
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes
    raw: bytes = attrs.field(repr=False)

    @property
    def quoted_pcrs(self) -> tuple[tuple[int, int], ...]:
        """(hash alg, PCR index) in the order their values enter the digest."""
        return tuple((s.hash_alg, i) for s in self.selections for i in s.pcrs)


@quote_format_boundary
def parse_attest(data: bytes) -> Attest:
    """Parse a TPMS_ATTEST of a quote; `TpmFormatError` for malformed bytes."""
    if len(data) > MAX_ATTEST:
        raise TpmFormatError("attest", 0, f"longer than {MAX_ATTEST} bytes")
    r = _Reader(data, "attest")
    magic = r.u32("magic")
    type_ = r.u16("type")
    if type_ != TPM_ST_ATTEST_QUOTE:
        # Other attestation types carry another union member: nothing below would parse.
        raise r.fail("type", f"0x{type_:04x} is not TPM_ST_ATTEST_QUOTE")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock, reset, restart = r.u64("clock"), r.u32("resetCount"), r.u32("restartCount")
    safe = r.u8("safe")
    if safe > 1:
        raise r.fail("safe", f"TPMI_YES_NO is {safe}")
    firmware = r.u64("firmwareVersion")
    count = r.u32("pcrSelect.count")
    if count > MAX_SELECTIONS:
        raise r.fail("pcrSelect.count", f"{count} selections (at most {MAX_SELECTIONS})")
    selections = []
    for k in range(count):
        alg = r.u16(f"pcrSelect[{k}].hash")
        size = r.u8(f"pcrSelect[{k}].sizeofSelect")
        if size > MAX_SIZEOF_SELECT:
            raise r.fail(f"pcrSelect[{k}].sizeofSelect", f"{size} > {MAX_SIZEOF_SELECT}")
        bitmap = r.take(size, f"pcrSelect[{k}].pcrSelect")
        pcrs = tuple(8 * j + b for j in range(size) for b in range(8) if bitmap[j] >> b & 1)
        selections.append(PcrSelection(alg, pcrs))
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.end()
    return Attest(magic, type_, signer, extra, clock, reset, restart, safe, firmware,
                  tuple(selections), digest, data)


# --- TPM2B_PUBLIC (the AK) ------------------------------------------------------------------


@attrs.frozen
class AkPublic:
    """An attestation key's public area (TPMT_PUBLIC) and its TPM name."""

    type: int
    name_alg: int
    attributes: int
    scheme: int
    scheme_hash: int
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = attrs.field(eq=False, repr=False)
    tpmt: bytes = attrs.field(repr=False)

    @property
    def name(self) -> bytes:
        """nameAlg (u16) || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hashlib.new(
            _HASH_NAMES[self.name_alg], self.tpmt).digest()


_HASH_NAMES: Mapping[int, str] = {ALG_SHA1: "sha1", ALG_SHA256: "sha256",
                                  ALG_SHA384: "sha384", ALG_SHA512: "sha512"}


def _scheme(r: _Reader, field: str) -> tuple[int, int]:
    alg = r.u16(f"{field}.scheme")
    return (alg, ALG_NULL) if alg == ALG_NULL else (alg, r.u16(f"{field}.hashAlg"))


@quote_format_boundary
def parse_public(data: bytes) -> AkPublic:
    """Parse a TPM2B_PUBLIC holding an RSA or ECC key; `TpmFormatError` if malformed."""
    if len(data) > MAX_PUBLIC:
        raise TpmFormatError("ak_public", 0, f"longer than {MAX_PUBLIC} bytes")
    outer = _Reader(data, "ak_public")
    tpmt = outer.tpm2b("publicArea", MAX_PUBLIC)
    outer.end()
    r = _Reader(tpmt, "ak_public.publicArea")
    type_ = r.u16("type")
    name_alg = r.u16("nameAlg")
    if name_alg not in _HASH_NAMES:
        raise r.fail("nameAlg", f"unknown hash 0x{name_alg:04x}")
    attributes = r.u32("objectAttributes")
    r.tpm2b("authPolicy", MAX_DIGEST)
    sym = r.u16("symmetric.algorithm")
    if sym != ALG_NULL:
        r.u16("symmetric.keyBits")
        r.u16("symmetric.mode")
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if type_ == ALG_RSA:
        scheme, scheme_hash = _scheme(r, "rsa")
        bits = r.u16("keyBits")
        exponent = r.u32("exponent") or 65537
        modulus = r.tpm2b("unique", MAX_KEY_BYTES)
        n = int.from_bytes(modulus, "big")
        if bits not in (2048, 3072, 4096) or n.bit_length() != bits:
            raise r.fail("unique", f"modulus of {n.bit_length()} bits, keyBits {bits}")
        key = rsa.RSAPublicNumbers(exponent, n).public_key()
    elif type_ == ALG_ECC:
        scheme, scheme_hash = _scheme(r, "ecc")
        curve_id = r.u16("curveID")
        kdf = r.u16("kdf.scheme")
        if kdf != ALG_NULL:
            r.u16("kdf.hashAlg")
        x = r.tpm2b("unique.x", 66)
        y = r.tpm2b("unique.y", 66)
        curve = ECC_CURVES.get(curve_id)
        if curve is None:
            raise r.fail("curveID", f"unsupported curve 0x{curve_id:04x}")
        size = (curve.key_size + 7) // 8
        if len(x) != size or len(y) != size:
            raise r.fail("unique", f"point coordinates are not {size} bytes")
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
        except ValueError:
            raise r.fail("unique", "not a point on the curve") from None
    else:
        raise r.fail("type", f"0x{type_:04x} is neither RSA nor ECC")
    r.end()
    return AkPublic(type_, name_alg, attributes, scheme, scheme_hash, key, tpmt)


# --- TPMT_SIGNATURE -------------------------------------------------------------------------


@attrs.frozen
class TpmSignature:
    alg: int
    hash_alg: int
    signature: bytes  # RSA: the signature; ECDSA: DER of (r, s)


@quote_format_boundary
def parse_signature(data: bytes) -> TpmSignature:
    """Parse a TPMT_SIGNATURE (RSASSA, RSAPSS, ECDSA); `TpmFormatError` if malformed."""
    if len(data) > MAX_SIGNATURE:
        raise TpmFormatError("signature", 0, f"longer than {MAX_SIGNATURE} bytes")
    r = _Reader(data, "signature")
    alg = r.u16("sigAlg")
    hash_alg = r.u16("hash")
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        sig = r.tpm2b("sig", MAX_KEY_BYTES)
    elif alg == ALG_ECDSA:
        rr = r.tpm2b("signatureR", 66)
        ss = r.tpm2b("signatureS", 66)
        sig = encode_dss_signature(int.from_bytes(rr, "big"), int.from_bytes(ss, "big"))
    else:
        raise r.fail("sigAlg", f"unsupported signature scheme 0x{alg:04x}")
    r.end()
    return TpmSignature(alg, hash_alg, sig)


def _verify_signature(ak: AkPublic, sig: TpmSignature, message: bytes) -> str | None:
    """Why *sig* is not the AK's SHA-256 signature over *message*, or None."""
    if sig.hash_alg != ALG_SHA256:
        return f"quote signature hash 0x{sig.hash_alg:04x} is not SHA-256"
    if ak.scheme != ALG_NULL and (ak.scheme, ak.scheme_hash) != (sig.alg, sig.hash_alg):
        return "quote signature scheme differs from the AK's scheme"
    try:
        if isinstance(ak.key, rsa.RSAPublicKey):
            if sig.alg == ALG_RSASSA:
                ak.key.verify(sig.signature, message, padding.PKCS1v15(), hashes.SHA256())
            elif sig.alg == ALG_RSAPSS:
                pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
                ak.key.verify(sig.signature, message, pss, hashes.SHA256())
            else:
                return "ECDSA signature from an RSA AK"
        elif sig.alg == ALG_ECDSA:
            ak.key.verify(sig.signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            return "RSA signature from an ECC AK"
    except InvalidSignature:
        return "quote signature does not verify with the AK"
    return None


# --- the event log ------------------------------------------------------------------------


def replay_event_log(data: bytes) -> dict[int, bytes]:
    """Replay a TCG2 crypto-agile event log's SHA-256 bank (`ee.attestation.eventlog`):
    PCR index -> final value (PCRs without events are absent). Empty log: no PCRs.
    `TpmFormatError` if malformed."""
    if len(data) > MAX_EVENT_LOG:
        raise TpmFormatError("event_log", 0, f"longer than {MAX_EVENT_LOG} bytes")
    if not data:
        return {}
    try:
        return replay_pcrs(parse_event_log(data), ALG_SHA256)
    except EventLogFormatError as exc:
        raise TpmFormatError(f"event_log.{exc.field}", exc.offset, exc.message) from None


# --- the evidence blob --------------------------------------------------------------------

_FIELDS: tuple[tuple[int, str, int], ...] = (
    (1, "ek_cert", MAX_CERT),
    (2, "ek_chain", MAX_CERT),
    (3, "ak_public", MAX_PUBLIC),
    (4, "attest", MAX_ATTEST),
    (5, "signature", MAX_SIGNATURE),
    (6, "pcr_values", PCR_COUNT * 32),
    (7, "event_log", MAX_EVENT_LOG),
)
MAX_EVIDENCE = len(EVIDENCE_MAGIC) + sum(5 + cap for _, _, cap in _FIELDS) + 5 * MAX_CERT * (
    MAX_CHAIN - 1)


@attrs.frozen
class TpmEvidence:
    """What the agent sends for the ``tpm`` provider (see the module docstring)."""

    ek_cert: bytes
    ak_public: bytes
    attest: bytes
    signature: bytes
    pcr_values: tuple[bytes, ...]
    event_log: bytes = b""
    ek_chain: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        def field(tag: int, value: bytes) -> bytes:
            return struct.pack(">BI", tag, len(value)) + value

        parts = [EVIDENCE_MAGIC, field(1, self.ek_cert)]
        parts += [field(2, c) for c in self.ek_chain]
        parts += [field(3, self.ak_public), field(4, self.attest), field(5, self.signature),
                  field(6, b"".join(self.pcr_values)), field(7, self.event_log)]
        return b"".join(parts)

    @classmethod
    @quote_format_boundary
    def decode(cls, data: bytes) -> TpmEvidence:
        """Strictly decode an evidence blob; `TpmFormatError` names what is wrong."""
        if len(data) > MAX_EVIDENCE:
            raise TpmFormatError("evidence", 0, f"longer than {MAX_EVIDENCE} bytes")
        r = _Reader(data, "evidence")
        if r.take(len(EVIDENCE_MAGIC), "magic") != EVIDENCE_MAGIC:
            raise TpmFormatError("evidence.magic", 0, "not TPM evidence (EETPM v1)")
        got: dict[str, list[bytes]] = {name: [] for _, name, _ in _FIELDS}
        order = 0
        while r.pos < len(data):
            tag, size = r.u8("tag"), r.u32("length")
            while order < len(_FIELDS) and _FIELDS[order][0] < tag:
                order += 1
            if order == len(_FIELDS) or _FIELDS[order][0] != tag:
                raise r.fail("tag", f"unexpected field tag {tag} (out of order or unknown)")
            _, name, cap = _FIELDS[order]
            if size > cap:
                raise r.fail(name, f"{size} bytes exceed {cap}")
            limit = MAX_CHAIN if name == "ek_chain" else 1
            if len(got[name]) == limit:
                raise r.fail(name, "repeated field")
            got[name].append(r.take(size, name))
        missing = [name for _, name, _ in _FIELDS if name != "ek_chain" and not got[name]]
        if missing:
            raise r.fail("fields", f"missing {', '.join(missing)}")
        pcr_blob = got["pcr_values"][0]
        if len(pcr_blob) % 32:
            raise r.fail("pcr_values", "not a whole number of SHA-256 values")
        return cls(
            ek_cert=got["ek_cert"][0],
            ak_public=got["ak_public"][0],
            attest=got["attest"][0],
            signature=got["signature"][0],
            pcr_values=tuple(pcr_blob[i : i + 32] for i in range(0, len(pcr_blob), 32)),
            event_log=got["event_log"][0],
            ek_chain=tuple(got["ek_chain"]),
        )


# --- verification -------------------------------------------------------------------------


@attrs.frozen
class TpmResult:
    """What verifying TPM evidence found; `ok` when no reason to refuse was found.

    `pcrs` are the quoted SHA-256 PCR values (trustworthy only when `ok`); `ak_name`
    and `ek_fingerprint` identify the keys (the registration keeps them to check that a
    re-attestation uses the same activated AK).
    """

    reasons: tuple[str, ...]
    pcrs: Mapping[int, bytes] = attrs.field(factory=dict)
    attest: Attest | None = None
    ak: AkPublic | None = None
    ek_public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None = attrs.field(
        default=None, eq=False, repr=False)
    ek_fingerprint: str | None = None
    event_count: int = 0
    #: the quote's extraData equals the expected qualifying data (also a reason if not)
    qualifying_ok: bool = False

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def measurement(self) -> str:
        """The boot measurement as one comparable value (the registration records it
        where a TDX agent has its MRTD, and a change is drift): ``tpm:`` + SHA-256 of
        PCR4 || PCR9 (zeros for a PCR the quote left out)."""
        both = self.pcrs.get(4, bytes(32)) + self.pcrs.get(9, bytes(32))
        return "tpm:" + hashlib.sha256(both).hexdigest()

    @property
    def ak_name(self) -> bytes | None:
        return self.ak.name if self.ak is not None else None


class _Parsed(NamedTuple):
    evidence: TpmEvidence
    ak: AkPublic
    attest: Attest
    signature: TpmSignature
    events: dict[int, bytes]


_Check = Callable[["TpmVerifier", _Parsed, bytes, float], TpmResult]


def _refusing_unexpected(check: _Check) -> _Check:
    """The boundary around checking decoded evidence: an exception is a refusal."""

    @functools.wraps(check)
    def guarded(verifier: TpmVerifier, parsed: _Parsed, expected: bytes,
                now: float) -> TpmResult:
        try:
            return check(verifier, parsed, expected, now)
        except Exception as exc:
            log.debug("unexpected error verifying TPM evidence", exc_info=True)
            return TpmResult((f"{UNEXPECTED}: {describe(exc)}",))

    return guarded


def _link(cert: CertInfo, issuer: CertInfo) -> str | None:
    """Why *issuer* did not issue *cert* (RSA PKCS#1 v1.5 / ECDSA, SHA-256/384)."""
    if cert.issuer != issuer.subject:
        return f"{cert.label} is not issued by {issuer.label}"
    if not issuer.is_ca:
        return f"issuer {issuer.label} is not a CA"
    algorithm = cert.cert.signature_hash_algorithm
    if not isinstance(algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
        return f"{cert.label}: unsupported signature hash"
    key = issuer.cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if cert.cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS:
                return f"{cert.label}: RSA-PSS certificate signatures are not supported"
            key.verify(cert.cert.signature, cert.tbs, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.cert.signature, cert.tbs, ec.ECDSA(algorithm))
        else:
            return f"issuer {issuer.label}: unsupported key type"
    except InvalidSignature:
        return f"{cert.label} is not signed by {issuer.label}"
    return None


class TpmVerifier:
    """Verifies TPM evidence against the configured EK certificate authorities.

    *ek_roots* are the CA certificates an EK certificate must chain to (the TPM
    vendors' roots in production; swtpm's local CA in tests). A root may be an
    intermediate: chains stop at the first configured certificate that issued them.
    """

    def __init__(self, ek_roots: Iterable[x509.Certificate]) -> None:
        self._roots = TrustAnchors(ek_roots)
        if not self._roots.certs:
            raise ValueError("a TpmVerifier needs at least one EK CA certificate")

    @property
    def ek_roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots.certs

    def verify(self, evidence: TpmEvidence | bytes, *, expected_qualifying_data: bytes,
               now: float) -> TpmResult:
        """Verify *evidence* at unix time *now*, expecting the quote's extraData to be
        *expected_qualifying_data* (`qualifying_data`). Raises `TpmFormatError` for
        malformed bytes and nothing else; every other failure is in the `reasons`.
        The AK is bound to the EK only after `credential` round trip succeeds."""
        if not isinstance(evidence, TpmEvidence):
            evidence = TpmEvidence.decode(evidence)
        parsed = _Parsed(
            evidence,
            parse_public(evidence.ak_public),
            parse_attest(evidence.attest),
            parse_signature(evidence.signature),
            replay_event_log(evidence.event_log),
        )
        return self._verify_parsed(parsed, expected_qualifying_data, now)

    def credential(self, result: TpmResult, secret: bytes | None = None) -> Credential:
        """The activation challenge for a verified *result* (raises ValueError if the
        result has no EK key or AK: a refused result gets no challenge)."""
        if result.ek_public_key is None or result.ak is None or not result.ok:
            raise ValueError("no credential for evidence that did not verify")
        return make_credential(result.ek_public_key, result.ak.name, secret)

    def _ek(self, ev: TpmEvidence, now: float) -> tuple[list[str], object | None, str | None]:
        """(problems, EK public key, EK certificate fingerprint)."""
        infos = []
        for i, der in enumerate((ev.ek_cert, *ev.ek_chain)):
            try:
                infos.append(CertInfo.from_der(der))
            except ValueError as exc:
                what = "EK certificate" if i == 0 else f"EK chain certificate {i}"
                return [f"EK_CERT_INVALID: {what}: {describe(exc, typed=False)}"], None, None
        chain = check_chain("EK certificate", infos, self._roots, _link)
        problems = list(chain.problems)
        windows = [*chain.windows] or [cert_window("EK certificate", infos[0])]
        problems += [p for w in windows if (p := w.problem(now)) is not None]
        key: object = infos[0].cert.public_key()
        try:
            ek_template(key)
        except UnsupportedEk as exc:
            problems.append(f"EK certificate: {exc}")
            key = None
        return problems, key, hashlib.sha256(ev.ek_cert).hexdigest()

    @_refusing_unexpected
    def _verify_parsed(self, parsed: _Parsed, expected: bytes, now: float) -> TpmResult:
        ev, ak, attest, sig, events = parsed
        reasons, ek_key, ek_fp = self._ek(ev, now)

        if ak.attributes & AK_REQUIRED != AK_REQUIRED or ak.attributes & DECRYPT:
            reasons.append(f"AK attributes 0x{ak.attributes:08x} are not those of a "
                           "restricted, fixedTPM signing key made in the TPM")
        if ak.name_alg != ALG_SHA256:
            reasons.append("AK name algorithm is not SHA-256")
        if (problem := _verify_signature(ak, sig, ev.attest)) is not None:
            reasons.append(problem)
        if attest.magic != TPM_GENERATED_VALUE:
            reasons.append("attest magic is not TPM_GENERATED_VALUE")
        qualifying_ok = hmac.compare_digest(attest.extra_data, expected)
        if not qualifying_ok:
            reasons.append("QUALIFYING_DATA_MISMATCH: the quote does not bind this "
                           "challenge's nonce and the registration's public key")

        quoted = attest.quoted_pcrs
        pcrs: dict[int, bytes] = {}
        if any(alg != ALG_SHA256 for alg, _ in quoted):
            reasons.append("the quote selects a PCR bank other than SHA-256")
        elif len({i for _, i in quoted}) != len(quoted) or any(i >= PCR_COUNT for _, i in quoted):
            reasons.append("the quote's PCR selection is invalid")
        elif len(quoted) != len(ev.pcr_values):
            reasons.append(f"{len(ev.pcr_values)} PCR values for {len(quoted)} quoted PCRs")
        else:
            pcrs = {i: v for (_, i), v in zip(quoted, ev.pcr_values, strict=True)}
            digest = hashlib.sha256(b"".join(ev.pcr_values)).digest()
            if not hmac.compare_digest(digest, attest.pcr_digest):
                reasons.append("PCR values do not match the quote's PCR digest")
            bad = [i for i in sorted(pcrs) if events.get(i, bytes(32)) != pcrs[i]]
            if bad:
                reasons.append("event log replay does not give the quoted value of PCR "
                               + ", ".join(map(str, bad)))
        ek_public = ek_key if isinstance(ek_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) \
            else None
        return TpmResult(tuple(reasons), pcrs, attest, ak, ek_public, ek_fp, len(events),
                         qualifying_ok)


def load_ek_roots(pem: bytes) -> list[x509.Certificate]:
    """The EK CA certificates in a PEM bundle (configuration)."""
    return list(x509.load_pem_x509_certificates(pem))


def certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def pcr_selection_arg(pcrs: Sequence[int]) -> str:
    """``sha256:0,1,...`` for tpm2-tools."""
    return "sha256:" + ",".join(str(i) for i in sorted(set(pcrs)))
