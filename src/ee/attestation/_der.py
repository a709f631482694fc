"""Minimal DER slicing for the verifier's hot path.

`cryptography` rebuilds Python `Name` objects on every `.issuer` / `.subject` access
and re-encodes a CRL's TBS on every `tbs_certlist_bytes` access; on the cold path
(a new platform or collateral) that costs more than the signatures. These helpers cut
the exact encoded bytes out of certificates and CRLs instead: the signed TBS, and the
raw issuer and subject Names (compared byte for byte, as most verifiers do). They
only slice; the documents were already parsed and validated by `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import re

import attrs
from cryptography import x509


class DerError(ValueError):
    """The bytes are not the DER structure expected."""


def _element(data: bytes, pos: int, end: int, *, strict: bool = False) -> tuple[int, int, int]:
    """(identifier octet, content start, content end) of the element at *pos*.

    *strict* also refuses non-minimal length encodings (for data we parse ourselves
    rather than bytes `cryptography` already validated).
    """
    if pos + 2 > end:
        raise DerError("truncated DER element")
    ident, first = data[pos], data[pos + 1]
    if ident & 0x1F == 0x1F:
        raise DerError("high-tag-number form is not used here")
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise DerError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        if strict and (length < 0x80 or data[pos] == 0):
            raise DerError("non-minimal DER length")
        pos += n
    if pos + length > end:
        raise DerError("truncated DER element")
    return ident, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(identifier, element start, content start, end) for each child in [start, end)."""
    out = []
    pos = start
    while pos < end:
        ident, cstart, cend = _element(data, pos, end)
        out.append((ident, pos, cstart, cend))
        pos = cend
    return out


def _signed_parts(der: bytes) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """The TBS bytes of a SIGNED{...} structure and the TBS's children."""
    ident, start, end = _element(der, 0, len(der))
    if ident != 0x30 or end != len(der):
        raise DerError("not a single DER SEQUENCE")
    parts = _children(der, start, end)
    if len(parts) != 3 or parts[0][0] != 0x30:
        raise DerError("not a signed structure (TBS, algorithm, signature)")
    _, tbs_start, tbs_cstart, tbs_end = parts[0]
    return der[tbs_start:tbs_end], _children(der, tbs_cstart, tbs_end)


def oid_bytes(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


_BASIC_CONSTRAINTS = oid_bytes("2.5.29.19")
_VERSION_V3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2


@attrs.frozen
class CertInfo:
    """A certificate with its DER, signed TBS, raw issuer/subject Name bytes, and (read
    on first use) its raw extension values (OID content octets -> extnValue content)."""

    cert: x509.Certificate
    der: bytes
    tbs: bytes
    issuer: bytes
    subject: bytes
    _tail: tuple[int, int] = attrs.field(eq=False, repr=False)
    _extensions: dict[bytes, bytes] = attrs.field(factory=dict, eq=False, repr=False)

    @classmethod
    def from_der(cls, der: bytes) -> CertInfo:
        """Read a certificate; raises `DerError` (a ValueError) unless it is X.509 v3.

        Before `cryptography` sees the bytes, the outer structure is checked here: the
        version must be v3, the serial number a positive INTEGER (RFC 5280; negative
        serials break CRL lookups) and the signature BIT STRING must have no unused
        bits (otherwise the same signature has several encodings, so a flipped bit in
        a quote's chain could go unnoticed). Any error `cryptography` then raises
        while loading is a `DerError` too.
        """
        n = len(der)
        ident, start, end = _element(der, 0, n)
        if ident != 0x30 or end != n:
            raise DerError("not a single DER SEQUENCE")
        parts = _children(der, start, end)
        if [p[0] for p in parts] != [0x30, 0x30, 0x03]:
            raise DerError("not a certificate (TBS, algorithm, signature BIT STRING)")
        _, _, sig_cstart, sig_end = parts[2]
        if sig_end - sig_cstart < 2 or der[sig_cstart] != 0:
            raise DerError("signature BIT STRING has unused bits")
        _, tbs_start, tbs_cstart, tbs_end = parts[0]
        # Walk only up to the key: version, serial, signature, issuer, validity, subject,
        # key; the rest (optional unique ids, [3] extensions) is read lazily.
        fields: list[tuple[int, int, int, int]] = []
        pos = tbs_cstart
        while len(fields) < 7 and pos < tbs_end:
            ident, cstart, cend = _element(der, pos, tbs_end)
            fields.append((ident, pos, cstart, cend))
            pos = cend
        if len(fields) < 7 or der[fields[0][1] : fields[0][3]] != _VERSION_V3:
            raise DerError("not an X.509 v3 certificate")
        ident, _, serial_start, serial_end = fields[1]
        serial = der[serial_start:serial_end]
        if ident != 0x02 or not serial or serial[0] & 0x80 or not any(serial):
            raise DerError("serial number is not a positive INTEGER")
        if fields[3][0] != 0x30 or fields[5][0] != 0x30:
            raise DerError("unexpected TBSCertificate layout")
        try:
            cert = x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion) as exc:
            raise DerError(f"unreadable certificate: {exc}") from None
        return cls(
            cert=cert,
            der=der,
            tbs=der[tbs_start:tbs_end],
            issuer=der[fields[3][1] : fields[3][3]],
            subject=der[fields[5][1] : fields[5][3]],
            tail=(pos, tbs_end),
        )

    @property
    def extensions(self) -> dict[bytes, bytes]:
        """Raw extension values by OID (parsed from the DER on first use)."""
        if not self._extensions and self._tail[0] < self._tail[1]:
            self._extensions.update(self._read_extensions())
        return self._extensions

    def _read_extensions(self) -> dict[bytes, bytes]:
        der = self.der
        extensions: dict[bytes, bytes] = {}
        for ident, _start, cstart, cend in _children(der, *self._tail):
            if ident != 0xA3:  # [3] EXPLICIT Extensions
                continue
            seq = _children(der, cstart, cend)
            if len(seq) != 1 or seq[0][0] != 0x30:
                raise DerError("bad Extensions")
            for ext_ident, _s, ext_cstart, ext_cend in _children(der, seq[0][2], seq[0][3]):
                parts = _children(der, ext_cstart, ext_cend)
                if ext_ident != 0x30 or len(parts) not in (2, 3) or parts[0][0] != 0x06:
                    raise DerError("bad Extension")
                if parts[-1][0] != 0x04:
                    raise DerError("bad extnValue")
                oid = der[parts[0][2] : parts[0][3]]
                if oid in extensions:
                    raise DerError("duplicate extension")
                extensions[oid] = der[parts[-1][2] : parts[-1][3]]
        return extensions

    @property
    def is_ca(self) -> bool:
        """basicConstraints cA (a strict read of the DER: SEQUENCE { BOOLEAN TRUE, ... })."""
        value = self.extensions.get(_BASIC_CONSTRAINTS)
        if value is None:
            return False
        ident, start, end = _element(value, 0, len(value))
        if ident != 0x30 or end != len(value) or start == end:
            return False
        ident, bstart, bend = _element(value, start, end)
        return ident == 0x01 and bend - bstart == 1 and value[bstart] == 0xFF

    @property
    def label(self) -> str:
        """The certificate's common name (for messages; decodes the Name, which in a
        corrupt certificate may not decode: then a digest names it)."""
        try:
            cns = self.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            return str(cns[0].value) if cns else self.cert.subject.rfc4514_string()
        except (ValueError, KeyError, TypeError):
            return f"certificate sha256:{hashlib.sha256(self.der).hexdigest()[:16]}"


@attrs.frozen
class CrlInfo:
    """A CRL with its signed TBS and raw issuer Name bytes."""

    crl: x509.CertificateRevocationList
    tbs: bytes
    issuer: bytes

    @classmethod
    def from_der(cls, der: bytes) -> CrlInfo:
        crl = x509.load_der_x509_crl(der)
        tbs, fields = _signed_parts(der)
        if fields and fields[0][0] == 0x02:  # optional version INTEGER
            fields = fields[1:]
        # signature AlgorithmIdentifier, issuer, thisUpdate, ...
        if len(fields) < 2 or fields[1][0] != 0x30:
            raise DerError("unexpected TBSCertList layout")
        return cls(crl=crl, tbs=tbs, issuer=der[fields[1][1] : fields[1][3]])


_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")


def pem_certificates(text: str) -> list[bytes]:
    """DER bytes of each PEM certificate block in *text* (collateral issuer chains)."""
    try:
        return [base64.b64decode(m.group(1)) for m in _PEM_CERT.finditer(text)]
    except ValueError as exc:
        raise DerError(f"bad base64 in PEM certificate: {exc}") from None
