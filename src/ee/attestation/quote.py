"""TDX quote parser (DCAP quote format v4 and v5, TDX 1.0 and 1.5 report bodies).

Theory of operation
-------------------
A quote is a little-endian byte string in three parts::

    header (48)  |  body  |  signature data (u32 length + content)  |  [zero padding]

* v4: the body is a TDX 1.0 TD report (584 bytes) right after the header.
* v5: a body descriptor ``body_type u16, body_size u32`` precedes the body; type 2 is
  a TDX 1.0 report (584), type 3 a TDX 1.5 report (648: + TEE_TCB_SVN2, MRSERVICETD).
* The *signed region* is every byte before the signature-data length: header and body
  (and, for v5, the descriptor). The attestation key signs exactly that.
* Signature data: ECDSA-P256 signature r||s (64), attestation key x||y (64), then
  certification data type 6 (QE report certification data) whose content is the QE's
  SGX report (384), the PCK's signature over it (64), QE authentication data (u16 length
  + bytes) and nested certification data type 5: the PEM PCK certificate chain.

Invariants the parser keeps, so that the verifier can trust the structure:

* Every nested length must match exactly what it encloses: a size field that claims a
  byte more or less than its content is a `QuoteFormatError`, never a silent skip. So
  any single flipped byte of the signature data is either caught here or changes bytes
  that a signature or digest covers.
* The PEM chain must be nothing but certificate blocks, each line ending in exactly
  one newline, then optional NUL padding, in canonical base64 -- whitespace or text
  that a lax PEM reader would skip is refused, so no byte of it is malleable.
* Bytes after the signature data are not part of any structure and are not signed.
  Quote buffers from real platforms carry zero padding there, which is tolerated and
  counted in `Quote.trailing`. A non-zero byte there is refused: nothing vouches for
  it, so accepting it would let anyone relaying a quote append data to it (and make
  the quote's bytes malleable while it still verifies). `allow_trailer=True` accepts
  any tail; it exists for one public test corpus (go-tdx-guest) that appends a text
  note, and no production path sets it.
* Size caps: a quote is at most `MAX_QUOTE_BYTES` (real ones are ~5 KB) and its PCK
  chain at most `MAX_PCK_CHAIN_CERTS` certificates (Intel's is 3: leaf, PCK CA,
  root), so the work one quote can cause is bounded before any certificate is read.
* Every failure is a `QuoteFormatError` naming the field and its offset: the parser
  raises it for every malformation it knows, and `parse_quote` is a boundary that
  turns any other exception into one (`errors.quote_format_boundary`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import struct

import attrs

from ee.attestation.errors import QuoteFormatError, quote_format_boundary

HEADER_SIZE = 48
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
QE_REPORT_SIZE = 384
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TD_ATTRIBUTES_DEBUG = 0x01  # bit 0 of TDATTRIBUTES (TUD.DEBUG)
MAX_QUOTE_BYTES = 64 * 1024
MAX_PCK_CHAIN_CERTS = 4

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<HHIHH16s20s")


@attrs.frozen
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@attrs.frozen
class TdReport:
    """A TD report body (TDX 1.0; TDX 1.5 adds `tee_tcb_svn2` and `mr_service_td`)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        """True when the TD runs in debug mode (its memory is readable by the host)."""
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_DEBUG)


@attrs.frozen
class QeReport:
    """The quoting enclave's SGX report (384 bytes), signed by the PCK key."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@attrs.frozen
class QuoteSignature:
    """The signature data: attestation key, QE report, QE auth data, PCK chain."""

    signature: bytes
    attestation_key: bytes
    certification_data_type: int
    qe_report: QeReport
    qe_report_raw: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_type: int
    pck_chain_pem: bytes
    pck_chain_der: tuple[bytes, ...]


@attrs.frozen
class Quote:
    """A parsed TDX quote; `signed_region` is exactly what the attestation key signs."""

    header: QuoteHeader
    body_type: int
    report: TdReport
    signature: QuoteSignature
    signed_region: bytes
    size: int
    trailing: int

    @property
    def version(self) -> int:
        return self.header.version


class _Reader:
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, field: str, n: int) -> bytes:
        end = self.offset + n
        if end > len(self.data):
            raise QuoteFormatError(
                field,
                self.offset,
                f"needs {n} bytes, only {max(0, len(self.data) - self.offset)} left",
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u16(self, field: str) -> int:
        value: int = _U16.unpack(self.take(field, 2))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = _U32.unpack(self.take(field, 4))[0]
        return value


def _parse_header(r: _Reader) -> QuoteHeader:
    raw = r.take("header", HEADER_SIZE)
    version, ak_type, tee_type, qe_svn, pce_svn, vendor, user_data = _HEADER.unpack(raw)
    if version not in (4, 5):
        raise QuoteFormatError("header.version", 0, f"unsupported quote version {version}")
    if ak_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError(
            "header.attestation_key_type", 2, f"unsupported attestation key type {ak_type}"
        )
    if tee_type != TEE_TYPE_TDX:
        raise QuoteFormatError("header.tee_type", 4, f"not a TDX quote (tee_type {tee_type:#x})")
    return QuoteHeader(version, ak_type, tee_type, qe_svn, pce_svn, vendor, user_data)


def _parse_td_report(r: _Reader, body_type: int) -> TdReport:
    size = TD_REPORT15_SIZE if body_type == BODY_TYPE_TD15 else TD_REPORT10_SIZE
    raw = r.take("body", size)
    extra_svn2 = raw[584:600] if body_type == BODY_TYPE_TD15 else None
    extra_mst = raw[600:648] if body_type == BODY_TYPE_TD15 else None
    return TdReport(
        tee_tcb_svn=raw[0:16],
        mr_seam=raw[16:64],
        mr_signer_seam=raw[64:112],
        seam_attributes=raw[112:120],
        td_attributes=raw[120:128],
        xfam=raw[128:136],
        mr_td=raw[136:184],
        mr_config_id=raw[184:232],
        mr_owner=raw[232:280],
        mr_owner_config=raw[280:328],
        rtmr0=raw[328:376],
        rtmr1=raw[376:424],
        rtmr2=raw[424:472],
        rtmr3=raw[472:520],
        report_data=raw[520:584],
        tee_tcb_svn2=extra_svn2,
        mr_service_td=extra_mst,
    )


def parse_qe_report(raw: bytes) -> QeReport:
    """Parse a 384-byte SGX report (the QE report)."""
    if len(raw) != QE_REPORT_SIZE:
        raise QuoteFormatError("qe_report", 0, f"must be {QE_REPORT_SIZE} bytes, got {len(raw)}")
    return QeReport(
        cpu_svn=raw[0:16],
        misc_select=_U32.unpack_from(raw, 16)[0],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        isv_prod_id=_U16.unpack_from(raw, 256)[0],
        isv_svn=_U16.unpack_from(raw, 258)[0],
        report_data=raw[320:384],
    )


_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\n((?:[A-Za-z0-9+/=]+\n)+)-----END CERTIFICATE-----\n"
)


def split_pem_chain(pem: bytes, offset: int = 0) -> tuple[bytes, ...]:
    """Split a PEM certificate chain strictly into DER certificates.

    Only back-to-back certificate blocks (lines ending in "\\n") and trailing NUL bytes
    are allowed, at most `MAX_PCK_CHAIN_CERTS` of them, and each block must be
    canonical base64 of its DER bytes. Error offsets
    are reported relative to *offset*. Results are memoised (a pure function of the
    bytes): in steady state every quote from a platform carries the same chain.
    """
    try:
        return _split_pem_chain(pem)
    except QuoteFormatError as exc:
        raise QuoteFormatError(exc.field, offset + exc.offset, exc.message) from None


@functools.lru_cache(maxsize=512)
def _split_pem_chain(pem: bytes) -> tuple[bytes, ...]:
    text = pem.rstrip(b"\x00")
    ders: list[bytes] = []
    pos = 0
    while pos < len(text):
        if len(ders) == MAX_PCK_CHAIN_CERTS:
            raise QuoteFormatError(
                "pck_cert_chain", pos, f"more than {MAX_PCK_CHAIN_CERTS} certificates"
            )
        m = _PEM_BLOCK.match(text, pos)
        if m is None:
            raise QuoteFormatError(
                "pck_cert_chain", pos, "expected a PEM certificate block ending in a newline"
            )
        b64 = m.group(1).replace(b"\n", b"")
        try:
            der = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise QuoteFormatError("pck_cert_chain", m.start(1), f"bad base64: {exc}") from None
        if base64.b64encode(der) != b64:
            raise QuoteFormatError("pck_cert_chain", m.start(1), "non-canonical base64")
        ders.append(der)
        pos = m.end()
    if not ders:
        raise QuoteFormatError("pck_cert_chain", 0, "no PEM certificate found")
    return tuple(ders)


def _parse_signature(r: _Reader) -> QuoteSignature:
    sig_len_at = r.offset
    sig_len = r.u32("signature_data_len")
    sig_start = r.offset
    sig_end = sig_start + sig_len
    if sig_end > len(r.data):
        raise QuoteFormatError(
            "signature_data_len",
            sig_len_at,
            f"declares {sig_len} bytes, only {len(r.data) - sig_start} present",
        )
    sub = _Reader(r.data[:sig_end])
    sub.offset = sig_start
    signature = sub.take("signature", 64)
    attestation_key = sub.take("attestation_key", 64)
    cd_type_at = sub.offset
    cd_type = sub.u16("certification_data.type")
    if cd_type != CERT_DATA_QE_REPORT:
        raise QuoteFormatError(
            "certification_data.type",
            cd_type_at,
            f"unsupported certification data type {cd_type} (need 6, QE report)",
        )
    cd_size_at = sub.offset
    cd_size = sub.u32("certification_data.size")
    if sub.offset + cd_size != sig_end:
        raise QuoteFormatError(
            "certification_data.size",
            cd_size_at,
            f"declares {cd_size} bytes, signature data leaves {sig_end - sub.offset}",
        )
    qe_report_raw = sub.take("qe_report", QE_REPORT_SIZE)
    qe_report = parse_qe_report(qe_report_raw)
    qe_report_signature = sub.take("qe_report_signature", 64)
    auth_len = sub.u16("qe_auth_data.size")
    qe_auth_data = sub.take("qe_auth_data", auth_len)
    inner_type_at = sub.offset
    inner_type = sub.u16("pck_cert_chain.type")
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise QuoteFormatError(
            "pck_cert_chain.type",
            inner_type_at,
            f"unsupported certification data type {inner_type} (need 5, PCK chain)",
        )
    inner_size_at = sub.offset
    inner_size = sub.u32("pck_cert_chain.size")
    if sub.offset + inner_size != sig_end:
        raise QuoteFormatError(
            "pck_cert_chain.size",
            inner_size_at,
            f"declares {inner_size} bytes, certification data leaves {sig_end - sub.offset}",
        )
    pem_at = sub.offset
    pem = sub.take("pck_cert_chain", inner_size)
    ders = split_pem_chain(pem, pem_at)
    r.offset = sig_end
    return QuoteSignature(
        signature=signature,
        attestation_key=attestation_key,
        certification_data_type=cd_type,
        qe_report=qe_report,
        qe_report_raw=qe_report_raw,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_type=inner_type,
        pck_chain_pem=pem,
        pck_chain_der=ders,
    )


@quote_format_boundary
def parse_quote(data: bytes | bytearray | memoryview, *, allow_trailer: bool = False) -> Quote:
    """Parse a TDX quote (v4 or v5); raises `QuoteFormatError` on any malformation.

    Bytes after the signature data must be zero unless *allow_trailer* (test corpora
    only; see the module docstring).
    """
    raw = bytes(data)
    if len(raw) > MAX_QUOTE_BYTES:
        raise QuoteFormatError(
            "quote", MAX_QUOTE_BYTES, f"{len(raw)} bytes, more than the {MAX_QUOTE_BYTES} allowed"
        )
    quote = _parse_quote(raw)
    if quote.trailing and not allow_trailer:
        tail = raw[quote.size :]
        if tail.count(0) != len(tail):
            at = quote.size + next(i for i, b in enumerate(tail) if b)
            raise QuoteFormatError(
                "trailer", at, "non-zero byte after the signature data (unsigned, refused)"
            )
    return quote


def _parse_quote(raw: bytes) -> Quote:
    r = _Reader(raw)
    header = _parse_header(r)
    if header.version == 4:
        body_type = BODY_TYPE_TD10
    else:
        bt_at = r.offset
        body_type = r.u16("body_type")
        if body_type not in (BODY_TYPE_TD10, BODY_TYPE_TD15):
            raise QuoteFormatError("body_type", bt_at, f"unsupported body type {body_type}")
        size_at = r.offset
        body_size = r.u32("body_size")
        want = TD_REPORT15_SIZE if body_type == BODY_TYPE_TD15 else TD_REPORT10_SIZE
        if body_size != want:
            raise QuoteFormatError(
                "body_size", size_at, f"body type {body_type} needs {want} bytes, got {body_size}"
            )
    report = _parse_td_report(r, body_type)
    signed_end = r.offset
    signature = _parse_signature(r)
    return Quote(
        header=header,
        body_type=body_type,
        report=report,
        signature=signature,
        signed_region=raw[:signed_end],
        size=r.offset,
        trailing=len(raw) - r.offset,
    )
