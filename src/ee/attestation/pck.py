"""Intel SGX extensions of a PCK certificate (OID 1.2.840.113741.1.13.1).

The extension is a SEQUENCE OF (OID, value) pairs; TCB matching reads the FMSPC, the
PCE id, the PCE SVN and the sixteen SGX TCB component SVNs (the CPUSVN bytes). Building
(for the sim provider) uses asn1crypto's core types; parsing walks the strict DER TLVs
directly, because it sits on the cold path of every new platform.
"""

from __future__ import annotations

import attrs
from asn1crypto import core  # type: ignore[import-untyped]
from cryptography import x509

from ee.attestation._der import CertInfo, DerError, _element, oid_bytes

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_SGX_EXTENSIONS_OID_BYTES = oid_bytes(SGX_EXTENSIONS_OID)
_PPID = SGX_EXTENSIONS_OID + ".1"
_TCB = SGX_EXTENSIONS_OID + ".2"
_PCEID = SGX_EXTENSIONS_OID + ".3"
_FMSPC = SGX_EXTENSIONS_OID + ".4"
_SGX_TYPE = SGX_EXTENSIONS_OID + ".5"
_PLATFORM_INSTANCE_ID = SGX_EXTENSIONS_OID + ".6"
_CONFIGURATION = SGX_EXTENSIONS_OID + ".7"
_TCB_PCESVN = _TCB + ".17"
_TCB_CPUSVN = _TCB + ".18"
_CONFIG_NAMES = {
    _CONFIGURATION + ".1": "dynamic_platform",
    _CONFIGURATION + ".2": "cached_keys",
    _CONFIGURATION + ".3": "smt_enabled",
}


class PckExtensionError(ValueError):
    """The PCK certificate's SGX extension is missing or malformed."""


class _Entry(core.Sequence):  # type: ignore[misc]
    _fields = [("id", core.ObjectIdentifier), ("value", core.Any)]


class _Entries(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _Entry


class _SgxType(core.Enumerated):  # type: ignore[misc]
    _map = {0: "standard", 1: "scalable", 2: "scalable_with_integrity"}


@attrs.frozen
class PckExtension:
    """The fields of a PCK certificate's SGX extension that verification uses."""

    fmspc: bytes
    pce_id: bytes
    pce_svn: int
    cpu_svn: bytes
    sgx_tcb_components: tuple[int, ...]
    ppid: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


def parse_sgx_extension(der: bytes) -> PckExtension:
    """Parse the DER value of the SGX extension (strict DER TLVs via asn1crypto's parser)."""
    try:
        return _parse(der)
    except PckExtensionError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise PckExtensionError(f"malformed SGX extension: {exc}") from None


# Universal tags.
_T_BOOLEAN, _T_INTEGER, _T_OCTET_STRING, _T_OID, _T_ENUMERATED, _T_SEQUENCE = 1, 2, 4, 6, 10, 16


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Split *data* into (universal tag, contents) pairs of strict DER.

    Only low-tag-number universal elements with definite, minimally encoded lengths
    are accepted. (asn1crypto's parser does the same job at ~10x the cost per element;
    this runs on the cold path of every new platform, so it is inlined here.)
    """
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] & 0xC0:
            raise PckExtensionError("unexpected non-universal element")
        try:
            ident, start, stop = _element(data, pos, end, strict=True)
        except DerError as exc:
            raise PckExtensionError(str(exc)) from None
        out.append((ident & 0x1F, data[start:stop]))
        pos = stop
    return out


def _one(data: bytes, tag: int, what: str) -> bytes:
    items = _tlvs(data)
    if len(items) != 1 or items[0][0] != tag:
        raise PckExtensionError(f"{what}: expected one element with tag {tag}")
    return items[0][1]


def _pairs(data: bytes, what: str) -> dict[bytes, tuple[int, bytes]]:
    """The contents of a SEQUENCE OF SEQUENCE {OID, value}, as {OID: (tag, contents)}."""
    out: dict[bytes, tuple[int, bytes]] = {}
    for tag, contents in _tlvs(data):
        if tag != _T_SEQUENCE:
            raise PckExtensionError(f"{what}: entry is not a SEQUENCE")
        inner = _tlvs(contents)
        if len(inner) != 2 or inner[0][0] != _T_OID:
            raise PckExtensionError(f"{what}: entry is not (OID, value)")
        if inner[0][1] in out:
            raise PckExtensionError(f"{what}: duplicate entry")
        out[inner[0][1]] = inner[1]
    return out


def _oid(dotted: str) -> bytes:
    return bytes(core.ObjectIdentifier(dotted).contents)


def _value(entry: tuple[int, bytes] | None, tag: int, what: str) -> bytes:
    if entry is None:
        raise PckExtensionError(f"SGX extension lacks {what}")
    if entry[0] != tag:
        raise PckExtensionError(f"SGX extension {what} has tag {entry[0]}, expected {tag}")
    return entry[1]


def _uint(contents: bytes, what: str) -> int:
    if not contents or contents[0] & 0x80:
        raise PckExtensionError(f"{what} must be a non-negative INTEGER")
    return int.from_bytes(contents, "big")


_O_PPID, _O_TCB, _O_PCEID, _O_FMSPC = _oid(_PPID), _oid(_TCB), _oid(_PCEID), _oid(_FMSPC)
_O_SGX_TYPE, _O_PID, _O_CONFIG = _oid(_SGX_TYPE), _oid(_PLATFORM_INSTANCE_ID), _oid(_CONFIGURATION)
_O_PCESVN, _O_CPUSVN = _oid(_TCB_PCESVN), _oid(_TCB_CPUSVN)
_O_COMPONENTS = [_oid(f"{_TCB}.{i}") for i in range(1, 17)]
_O_CONFIG_NAMES = {_oid(k): v for k, v in _CONFIG_NAMES.items()}


def _parse(der: bytes) -> PckExtension:
    top = _pairs(_one(der, _T_SEQUENCE, "SGX extension"), "SGX extension")
    tcb = _pairs(_value(top.get(_O_TCB), _T_SEQUENCE, "TCB"), "SGX TCB")
    comps = tuple(
        _uint(_value(tcb.get(o), _T_INTEGER, f"TCB component {i + 1}"), "TCB component")
        for i, o in enumerate(_O_COMPONENTS)
    )
    if any(c > 255 for c in comps):
        raise PckExtensionError("TCB component SVN out of range")
    pce_svn = _uint(_value(tcb.get(_O_PCESVN), _T_INTEGER, "PCESVN"), "PCESVN")
    cpu_svn = _value(tcb.get(_O_CPUSVN), _T_OCTET_STRING, "CPUSVN")
    fmspc = _value(top.get(_O_FMSPC), _T_OCTET_STRING, "FMSPC")
    pce_id = _value(top.get(_O_PCEID), _T_OCTET_STRING, "PCE-ID")
    if len(cpu_svn) != 16 or len(fmspc) != 6 or len(pce_id) != 2:
        raise PckExtensionError("CPUSVN must be 16 bytes, FMSPC 6 and PCE-ID 2")
    config: dict[str, bool] = {}
    if _O_CONFIG in top:
        for oid, (tag, contents) in _pairs(
            _value(top[_O_CONFIG], _T_SEQUENCE, "configuration"), "configuration"
        ).items():
            name = _O_CONFIG_NAMES.get(oid)
            if name is not None and tag == _T_BOOLEAN and len(contents) == 1:
                config[name] = contents != b"\x00"
    pid = top.get(_O_PID)
    return PckExtension(
        fmspc=fmspc,
        pce_id=pce_id,
        pce_svn=pce_svn,
        cpu_svn=cpu_svn,
        sgx_tcb_components=comps,
        ppid=_value(top.get(_O_PPID), _T_OCTET_STRING, "PPID"),
        sgx_type=_uint(_value(top.get(_O_SGX_TYPE), _T_ENUMERATED, "SGX type"), "SGX type"),
        platform_instance_id=_value(pid, _T_OCTET_STRING, "platform instance id")
        if pid is not None
        else None,
        dynamic_platform=config.get("dynamic_platform"),
        cached_keys=config.get("cached_keys"),
        smt_enabled=config.get("smt_enabled"),
    )


def pck_extension_of(info: CertInfo) -> PckExtension:
    """Read the SGX extension of a PCK certificate (from its raw DER extensions)."""
    value = info.extensions.get(_SGX_EXTENSIONS_OID_BYTES)
    if value is None:
        raise PckExtensionError("certificate has no SGX extension")
    return parse_sgx_extension(value)


def pck_extension(cert: x509.Certificate) -> PckExtension:
    """Read the SGX extension of a PCK certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID))
    except x509.ExtensionNotFound:
        raise PckExtensionError("certificate has no SGX extension") from None
    except ValueError as exc:
        raise PckExtensionError(f"certificate extensions are malformed: {exc}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise PckExtensionError("unexpected SGX extension type")
    return parse_sgx_extension(value.value)


def build_sgx_extension(
    *,
    fmspc: bytes,
    pce_id: bytes,
    pce_svn: int,
    cpu_svn: bytes,
    ppid: bytes,
    sgx_type: int = 0,
) -> bytes:
    """Encode an SGX extension value (DER) with asn1crypto; used by the sim provider.

    The sixteen SGX TCB component SVNs are the CPUSVN bytes, as on real PCK certs.
    """
    if len(fmspc) != 6 or len(pce_id) != 2 or len(cpu_svn) != 16 or len(ppid) != 16:
        raise ValueError("fmspc is 6 bytes, pce_id 2, cpu_svn 16, ppid 16")
    tcb = [_Entry({"id": f"{_TCB}.{i + 1}", "value": core.Integer(cpu_svn[i])}) for i in range(16)]
    tcb.append(_Entry({"id": _TCB_PCESVN, "value": core.Integer(pce_svn)}))
    tcb.append(_Entry({"id": _TCB_CPUSVN, "value": core.OctetString(cpu_svn)}))
    entries = _Entries(
        [
            _Entry({"id": _PPID, "value": core.OctetString(ppid)}),
            _Entry({"id": _TCB, "value": _Entries(tcb)}),
            _Entry({"id": _PCEID, "value": core.OctetString(pce_id)}),
            _Entry({"id": _FMSPC, "value": core.OctetString(fmspc)}),
            _Entry({"id": _SGX_TYPE, "value": _SgxType(sgx_type)}),
        ]
    )
    return bytes(entries.dump())
