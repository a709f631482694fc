"""Verification collateral in Intel PCS shape, and TCB / QE identity matching.

The JSON document (as written by dcap-qvl and PCCS clients) holds: the PCK CRL and its
issuer chain, the root CA CRL, the TCB info JSON with its signature and issuer chain,
and the QE identity JSON with its signature and issuer chain. CRLs and signatures are
hex (PEM CRLs are accepted too); the signed JSON documents are kept as the exact text
that was signed.

`check_collateral` does the time-independent work once (chains to a trusted root, the
four signatures, CRL parsing) and returns a `CollateralCheck` that the verifier caches
by the collateral's digest; `CollateralCheck.time_problems(now)` re-evaluates only the
validity windows on every call. Windows are half-open for CRLs, TCB info and QE
identity (valid from issue date up to, not including, next update -- at next update
the document is due to be replaced) and closed for certificates (RFC 5280).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation._der import CertInfo, CrlInfo, DerError, pem_certificates
from ee.attestation.errors import CollateralFormatError, describe
from ee.attestation.pck import PckExtension
from ee.attestation.quote import QeReport, TdReport

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)

_COLLATERAL_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


def _digest(c: Collateral) -> bytes:
    h = hashlib.sha256()
    for part in (
        c.pck_crl_issuer_chain.encode(),
        c.root_ca_crl,
        c.pck_crl,
        c.tcb_info_issuer_chain.encode(),
        c.tcb_info.encode(),
        c.tcb_info_signature,
        c.qe_identity_issuer_chain.encode(),
        c.qe_identity.encode(),
        c.qe_identity_signature,
    ):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


@attrs.frozen
class Collateral:
    """PCS collateral for one FMSPC; `digest` identifies it for caching."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes
    digest: bytes = attrs.field(
        default=attrs.Factory(_digest, takes_self=True), eq=False, repr=False
    )

    @classmethod
    def from_json(cls, doc: str | bytes | Mapping[str, Any]) -> Collateral:
        """Load the PCS JSON shape; raises `CollateralFormatError`."""
        if isinstance(doc, str | bytes):
            try:
                doc = json.loads(doc)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CollateralFormatError("document", f"not JSON: {exc}") from None
        if not isinstance(doc, Mapping):
            raise CollateralFormatError("document", "must be a JSON object")
        for key in _COLLATERAL_KEYS:
            if not isinstance(doc.get(key), str):
                raise CollateralFormatError(key, "missing or not a string")
        return cls(
            pck_crl_issuer_chain=doc["pck_crl_issuer_chain"],
            root_ca_crl=_crl_bytes("root_ca_crl", doc["root_ca_crl"]),
            pck_crl=_crl_bytes("pck_crl", doc["pck_crl"]),
            tcb_info_issuer_chain=doc["tcb_info_issuer_chain"],
            tcb_info=doc["tcb_info"],
            tcb_info_signature=_hex("tcb_info_signature", doc["tcb_info_signature"]),
            qe_identity_issuer_chain=doc["qe_identity_issuer_chain"],
            qe_identity=doc["qe_identity"],
            qe_identity_signature=_hex("qe_identity_signature", doc["qe_identity_signature"]),
        )

    def to_json(self) -> dict[str, str]:
        """The PCS JSON shape (byte fields hex), loadable by `from_json` and dcap-qvl."""
        return {
            "pck_crl_issuer_chain": self.pck_crl_issuer_chain,
            "root_ca_crl": self.root_ca_crl.hex(),
            "pck_crl": self.pck_crl.hex(),
            "tcb_info_issuer_chain": self.tcb_info_issuer_chain,
            "tcb_info": self.tcb_info,
            "tcb_info_signature": self.tcb_info_signature.hex(),
            "qe_identity_issuer_chain": self.qe_identity_issuer_chain,
            "qe_identity": self.qe_identity,
            "qe_identity_signature": self.qe_identity_signature.hex(),
        }


def _hex(field: str, text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CollateralFormatError(field, "not hex") from None


def _crl_bytes(field: str, text: str) -> bytes:
    if "-----BEGIN X509 CRL-----" in text:
        try:
            return x509.load_pem_x509_crl(text.encode()).public_bytes(encoding=Encoding.DER)
        except ValueError as exc:
            raise CollateralFormatError(field, f"bad PEM CRL: {exc}") from None
    return _hex(field, text)


# --- TCB info and QE identity documents ------------------------------------------------


def _ts(where: str, value: object) -> int:
    if not isinstance(value, str):
        raise CollateralFormatError(where, "expected an RFC 3339 timestamp")
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise CollateralFormatError(where, f"bad timestamp {value!r}") from None


def _req(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CollateralFormatError(f"{where}.{key}", "missing or of the wrong type")
    return value


def _hexfield(obj: Mapping[str, Any], key: str, where: str, size: int | None = None) -> bytes:
    raw = _hex(f"{where}.{key}", _req(obj, key, str, where))
    if size is not None and len(raw) != size:
        raise CollateralFormatError(f"{where}.{key}", f"must be {size} bytes")
    return raw


def _advisories(obj: Mapping[str, Any], where: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CollateralFormatError(f"{where}.advisoryIDs", "must be a list of strings")
    return tuple(ids)


def _status(obj: Mapping[str, Any], where: str) -> str:
    status = _req(obj, "tcbStatus", str, where)
    if status not in TCB_STATUSES:
        raise CollateralFormatError(f"{where}.tcbStatus", f"unknown status {status!r}")
    return str(status)


def _components(obj: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    comps = obj.get(key)
    try:
        svns = tuple([c["svn"] for c in comps])  # type: ignore[union-attr]
    except (TypeError, KeyError):
        raise CollateralFormatError(f"{where}.{key}", "must list objects with an svn") from None
    try:
        if len(svns) != 16 or set(map(type, svns)) != {int} or len(bytes(svns)) != 16:
            raise ValueError
    except ValueError:
        raise CollateralFormatError(f"{where}.{key}", "must list 16 SVNs in 0..255") from None
    return svns


@attrs.frozen
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...] | None
    tcb_date: int
    status: str
    advisory_ids: tuple[str, ...]


@attrs.frozen
class IsvLevel:
    isv_svn: int
    tcb_date: int
    status: str
    advisory_ids: tuple[str, ...]


@attrs.frozen
class TdxModuleIdentity:
    id: str
    mr_signer: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvLevel, ...]


@attrs.frozen
class TcbInfo:
    id: str
    version: int
    issue_date: int
    next_update: int
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


@attrs.frozen
class QeIdentity:
    id: str
    version: int
    issue_date: int
    next_update: int
    misc_select: int
    misc_select_mask: int
    attributes: bytes
    attributes_mask: bytes
    mr_signer: bytes
    isv_prod_id: int
    tcb_evaluation_data_number: int
    tcb_levels: tuple[IsvLevel, ...]


def _isv_levels(levels: object, where: str) -> tuple[IsvLevel, ...]:
    if not isinstance(levels, list):
        raise CollateralFormatError(where, "must be a list")
    out = []
    for i, lv in enumerate(levels):
        w = f"{where}[{i}]"
        if not isinstance(lv, dict):
            raise CollateralFormatError(w, "must be an object")
        tcb = _req(lv, "tcb", dict, w)
        out.append(
            IsvLevel(
                isv_svn=int(_req(tcb, "isvsvn", int, f"{w}.tcb")),
                tcb_date=_ts(f"{w}.tcbDate", lv.get("tcbDate")),
                status=_status(lv, w),
                advisory_ids=_advisories(lv, w),
            )
        )
    return tuple(out)


def _module_identity(obj: object, where: str, with_levels: bool) -> TdxModuleIdentity:
    if not isinstance(obj, dict):
        raise CollateralFormatError(where, "must be an object")
    return TdxModuleIdentity(
        id=str(obj.get("id", "")),
        mr_signer=_hexfield(obj, "mrsigner", where, 48),
        attributes=_hexfield(obj, "attributes", where, 8),
        attributes_mask=_hexfield(obj, "attributesMask", where, 8),
        tcb_levels=_isv_levels(obj.get("tcbLevels"), f"{where}.tcbLevels") if with_levels else (),
    )


def _load_json(field: str, text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CollateralFormatError(field, f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CollateralFormatError(field, "must be a JSON object")
    return doc


def parse_tcb_info(text: str) -> TcbInfo:
    """Parse a TCB info JSON body (version 3, TDX)."""
    w = "tcb_info"
    doc = _load_json(w, text)
    levels = []
    for i, lv in enumerate(_req(doc, "tcbLevels", list, w)):
        lw = f"{w}.tcbLevels[{i}]"
        if not isinstance(lv, dict):
            raise CollateralFormatError(lw, "must be an object")
        tcb = _req(lv, "tcb", dict, lw)
        tdx = (
            _components(tcb, "tdxtcbcomponents", f"{lw}.tcb") if "tdxtcbcomponents" in tcb else None
        )
        levels.append(
            TcbLevel(
                sgx_components=_components(tcb, "sgxtcbcomponents", f"{lw}.tcb"),
                pce_svn=int(_req(tcb, "pcesvn", int, f"{lw}.tcb")),
                tdx_components=tdx,
                tcb_date=_ts(f"{lw}.tcbDate", lv.get("tcbDate")),
                status=_status(lv, lw),
                advisory_ids=_advisories(lv, lw),
            )
        )
    module = doc.get("tdxModule")
    identities = doc.get("tdxModuleIdentities", [])
    if not isinstance(identities, list):
        raise CollateralFormatError(f"{w}.tdxModuleIdentities", "must be a list")
    return TcbInfo(
        id=str(_req(doc, "id", str, w)),
        version=int(_req(doc, "version", int, w)),
        issue_date=_ts(f"{w}.issueDate", doc.get("issueDate")),
        next_update=_ts(f"{w}.nextUpdate", doc.get("nextUpdate")),
        fmspc=_hexfield(doc, "fmspc", w, 6),
        pce_id=_hexfield(doc, "pceId", w, 2),
        tcb_type=int(_req(doc, "tcbType", int, w)),
        tcb_evaluation_data_number=int(_req(doc, "tcbEvaluationDataNumber", int, w)),
        tdx_module=(
            _module_identity(module, f"{w}.tdxModule", False) if module is not None else None
        ),
        tdx_module_identities=tuple(
            _module_identity(m, f"{w}.tdxModuleIdentities[{i}]", True)
            for i, m in enumerate(identities)
        ),
        tcb_levels=tuple(levels),
    )


def parse_qe_identity(text: str) -> QeIdentity:
    """Parse a QE identity JSON body (version 2)."""
    w = "qe_identity"
    doc = _load_json(w, text)
    return QeIdentity(
        id=str(_req(doc, "id", str, w)),
        version=int(_req(doc, "version", int, w)),
        issue_date=_ts(f"{w}.issueDate", doc.get("issueDate")),
        next_update=_ts(f"{w}.nextUpdate", doc.get("nextUpdate")),
        misc_select=int.from_bytes(_hexfield(doc, "miscselect", w, 4), "big"),
        misc_select_mask=int.from_bytes(_hexfield(doc, "miscselectMask", w, 4), "big"),
        attributes=_hexfield(doc, "attributes", w, 16),
        attributes_mask=_hexfield(doc, "attributesMask", w, 16),
        mr_signer=_hexfield(doc, "mrsigner", w, 32),
        isv_prod_id=int(_req(doc, "isvprodid", int, w)),
        tcb_evaluation_data_number=int(_req(doc, "tcbEvaluationDataNumber", int, w)),
        tcb_levels=_isv_levels(doc.get("tcbLevels"), f"{w}.tcbLevels"),
    )


# --- signatures and chains ---------------------------------------------------------------


@attrs.frozen
class Window:
    """A validity window: [start, end) when `end_inclusive` is False, else [start, end].

    For a certificate window, `cert` names the certificate in messages (decoded only
    when there is something to report).
    """

    name: str
    start: float
    end: float
    end_inclusive: bool
    cert: CertInfo | None = attrs.field(default=None, eq=False, repr=False)

    def problem(self, now: float) -> str | None:
        if self.start <= now < self.end or (now == self.end and self.end_inclusive):
            return None
        what = f"{self.name} {self.cert.label}" if self.cert is not None else self.name
        if now < self.start:
            return f"{what} not yet valid (valid from {_iso(self.start)})"
        return f"{what} expired (next update / not after {_iso(self.end)})"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cert_window(name: str, info: CertInfo) -> Window:
    cert = info.cert
    return Window(
        name,
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
        end_inclusive=True,
        cert=info,
    )


def raw_to_der_signature(raw: bytes) -> bytes:
    """ECDSA r||s (32+32 bytes) to the DER form `cryptography` verifies."""
    if len(raw) != 64:
        raise ValueError("ECDSA-P256 signature must be 64 bytes")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def verify_p256(key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    """Verify an ECDSA-P256/SHA-256 raw r||s signature."""
    try:
        key.verify(raw_to_der_signature(raw_sig), data, _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True


@attrs.frozen
class ChainCheck:
    """An issuer chain checked against the trusted roots (time-independent part)."""

    certs: tuple[CertInfo, ...]
    problems: tuple[str, ...]
    windows: tuple[Window, ...]


class TrustAnchors:
    """Trusted root certificates, decoded once."""

    __slots__ = ("certs", "infos")

    def __init__(self, roots: Iterable[x509.Certificate]) -> None:
        self.infos: tuple[CertInfo, ...] = tuple(
            CertInfo.from_der(r.public_bytes(Encoding.DER)) for r in roots
        )
        self.certs: tuple[x509.Certificate, ...] = tuple(i.cert for i in self.infos)

    def named(self, subject: bytes) -> CertInfo | None:
        for info in self.infos:
            if info.subject == subject:
                return info
        return None

    def __contains__(self, info: CertInfo) -> bool:
        return any(info.der == a.der for a in self.infos)


LinkCheck = Callable[[CertInfo, CertInfo], "str | None"]


def link_problem(cert: CertInfo, issuer: CertInfo) -> str | None:
    """Why *issuer* did not issue *cert* (ECDSA-SHA256 signature, CA flag), or None."""
    if cert.issuer != issuer.subject:
        return f"{cert.label} is not issued by {issuer.label}"
    if not issuer.is_ca:
        return f"issuer {issuer.label} is not a CA"
    key = issuer.cert.public_key()
    if (
        not isinstance(key, ec.EllipticCurvePublicKey)
        or cert.cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    ):
        return f"{cert.label}: unsupported signature algorithm (need ECDSA with SHA-256)"
    try:
        key.verify(cert.cert.signature, cert.tbs, _ECDSA_SHA256)
    except InvalidSignature:
        return f"{cert.label} is not signed by {issuer.label}"
    return None


def check_chain(
    name: str,
    certs: Sequence[CertInfo],
    anchors: TrustAnchors,
    link: LinkCheck = link_problem,
) -> ChainCheck:
    """Check that *certs* (leaf first) chains to one of the trusted *anchors*.

    An included self-signed top certificate must be identical to a trusted root; every
    issuer must be a CA; every link's signature must verify (*link* may memoise).
    """
    problems: list[str] = []
    chain = list(certs)
    if not chain:
        return ChainCheck((), (f"{name}: empty certificate chain",), ())
    top = chain[-1]
    if len(chain) > 1 and top.issuer == top.subject:
        if top not in anchors:
            problems.append(f"{name}: chain root {top.label} is not trusted")
        chain.pop()
    anchor = anchors.named(chain[-1].issuer)
    if anchor is None:
        problems.append(
            f"{name}: no trusted root issued {chain[-1].label} "
            f"({chain[-1].cert.issuer.rfc4514_string()})"
        )
        return ChainCheck(tuple(certs), tuple(problems), ())
    full = [*chain, anchor]
    for i, cert in enumerate(chain):
        problem = link(cert, full[i + 1])
        if problem is not None:
            problems.append(f"{name}: {problem}")
    windows = tuple(cert_window(f"{name}: certificate", c) for c in full)
    return ChainCheck(tuple(full), tuple(problems), windows)


def load_pem_chain(field: str, pem: str) -> list[CertInfo]:
    try:
        ders = pem_certificates(pem)
        if not ders:
            raise DerError("no PEM certificate")
        return [CertInfo.from_der(d) for d in ders]
    except ValueError as exc:
        raise CollateralFormatError(field, f"bad PEM chain: {exc}") from None


@attrs.frozen
class CrlCheck:
    issuer: bytes
    crl: x509.CertificateRevocationList
    window: Window

    def revokes(self, serial: int) -> bool:
        return self.crl.get_revoked_certificate_by_serial_number(serial) is not None


@attrs.frozen
class CollateralCheck:
    """Everything about a collateral document that does not depend on `now`."""

    problems: tuple[str, ...]
    windows: tuple[Window, ...]
    tcb_info: TcbInfo | None
    qe_identity: QeIdentity | None
    pck_crl: CrlCheck | None
    root_crl: CrlCheck | None

    def time_problems(self, now: float) -> list[str]:
        return [p for w in self.windows if (p := w.problem(now)) is not None]

    @property
    def not_before(self) -> float | None:
        return max((w.start for w in self.windows), default=None)

    @property
    def next_update(self) -> float | None:
        return min((w.end for w in self.windows), default=None)


def _check_crl(name: str, info: CrlInfo, issuer: CertInfo | None, problems: list[str]) -> CrlCheck:
    crl = info.crl
    if issuer is None:
        problems.append(f"{name}: issued by {crl.issuer.rfc4514_string()}, which is not trusted")
    elif info.issuer != issuer.subject:
        problems.append(f"{name}: issued by {crl.issuer.rfc4514_string()}, not {issuer.label}")
    else:
        key = issuer.cert.public_key()
        try:
            if (
                not isinstance(key, ec.EllipticCurvePublicKey)
                or crl.signature_algorithm_oid != x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
            ):
                raise InvalidSignature
            key.verify(crl.signature, info.tbs, _ECDSA_SHA256)
        except InvalidSignature:
            problems.append(f"{name}: signature invalid")
    next_update = crl.next_update_utc
    if next_update is None:
        problems.append(f"{name}: has no next update")
    window = Window(
        name,
        crl.last_update_utc.timestamp(),
        next_update.timestamp() if next_update is not None else float("-inf"),
        end_inclusive=False,
    )
    return CrlCheck(info.issuer, crl, window)


def _load_crl(name: str, der: bytes, problems: list[str]) -> CrlInfo | None:
    try:
        return CrlInfo.from_der(der)
    except ValueError as exc:
        problems.append(f"{name}: not a DER CRL ({exc})")
        return None


def check_collateral(
    collateral: Collateral,
    anchors: TrustAnchors,
    link: LinkCheck = link_problem,
) -> CollateralCheck:
    """Check the collateral's chains, signatures and CRLs (not its time windows).

    Total: whatever a corrupt certificate or CRL makes a decoder raise (lazily decoded
    names, extensions, keys) is a problem of the (cached) check, never an exception.
    """
    try:
        return _check_collateral(collateral, anchors, link)
    except Exception as exc:
        return CollateralCheck(
            (f"collateral: malformed ({describe(exc)})",), (), None, None, None, None
        )


def _check_collateral(
    collateral: Collateral, anchors: TrustAnchors, link: LinkCheck
) -> CollateralCheck:
    problems: list[str] = []
    windows: list[Window] = []
    tcb_info: TcbInfo | None = None
    qe_identity: QeIdentity | None = None
    try:
        tcb_info = parse_tcb_info(collateral.tcb_info)
        windows.append(Window("TCB info", tcb_info.issue_date, tcb_info.next_update, False))
    except CollateralFormatError as exc:
        problems.append(str(exc))
    try:
        qe_identity = parse_qe_identity(collateral.qe_identity)
        windows.append(
            Window("QE identity", qe_identity.issue_date, qe_identity.next_update, False)
        )
    except CollateralFormatError as exc:
        problems.append(str(exc))

    loaded: dict[str, list[CertInfo] | None] = {}

    def chain_of(name: str, pem: str) -> ChainCheck | None:
        if pem not in loaded:
            try:
                loaded[pem] = load_pem_chain(name, pem)
            except CollateralFormatError as exc:
                problems.append(str(exc))
                loaded[pem] = None
        certs = loaded[pem]
        if certs is None:
            return None
        chain = check_chain(name, certs, anchors, link)
        problems.extend(chain.problems)
        windows.extend(chain.windows)
        return chain

    for name, body, signature, pem in (
        (
            "TCB info",
            collateral.tcb_info,
            collateral.tcb_info_signature,
            collateral.tcb_info_issuer_chain,
        ),
        (
            "QE identity",
            collateral.qe_identity,
            collateral.qe_identity_signature,
            collateral.qe_identity_issuer_chain,
        ),
    ):
        chain = chain_of(f"{name} issuer chain", pem)
        if chain is not None and chain.certs:
            key = chain.certs[0].cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey) or not verify_p256(
                key, signature, body.encode()
            ):
                problems.append(f"{name}: signature invalid")

    pck_chain = chain_of("PCK CRL issuer chain", collateral.pck_crl_issuer_chain)
    pck_issuer = pck_chain.certs[0] if pck_chain is not None and pck_chain.certs else None
    pck_crl: CrlCheck | None = None
    raw = _load_crl("PCK CRL", collateral.pck_crl, problems)
    if raw is not None:
        pck_crl = _check_crl("PCK CRL", raw, pck_issuer, problems)
        windows.append(pck_crl.window)
    root_crl: CrlCheck | None = None
    raw = _load_crl("root CA CRL", collateral.root_ca_crl, problems)
    if raw is not None:
        root_crl = _check_crl("root CA CRL", raw, anchors.named(raw.issuer), problems)
        windows.append(root_crl.window)
        # Intermediate certificates of the collateral chains must not be revoked.
        for certs in loaded.values():
            for info in certs or ():
                if info.issuer == root_crl.issuer and root_crl.revokes(info.cert.serial_number):
                    problems.append(f"certificate {info.label} is revoked by the root CA CRL")
    return CollateralCheck(
        problems=tuple(dict.fromkeys(problems)),
        windows=tuple(windows),
        tcb_info=tcb_info,
        qe_identity=qe_identity,
        pck_crl=pck_crl,
        root_crl=root_crl,
    )


# --- TCB level matching ------------------------------------------------------------------


@attrs.frozen
class TcbMatch:
    """Outcome of matching a platform against TCB info and QE identity."""

    status: str | None
    advisory_ids: tuple[str, ...]
    problems: tuple[str, ...]
    tcb_date: int | None = None
    platform_status: str | None = None
    module_status: str | None = None
    qe_status: str | None = None


def _converge(status: str, other: str | None) -> str:
    """Intel's convergence of the platform status with a QE / TDX module status."""
    if other == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return status


def _masked_eq(a: bytes, b: bytes, mask: bytes) -> bool:
    return all((x & m) == (y & m) for x, y, m in zip(a, b, mask, strict=True))


def match_tcb(
    tcb_info: TcbInfo,
    qe_identity: QeIdentity,
    pck: PckExtension,
    report: TdReport,
    qe_report: QeReport,
) -> TcbMatch:
    """Match the platform (PCK SGX TCB + PCESVN, TD TEE_TCB_SVN) and QE to TCB levels."""
    problems: list[str] = []
    if tcb_info.id != "TDX":
        problems.append(f"TCB info is for {tcb_info.id!r}, not TDX")
    if tcb_info.version < 3:
        problems.append(f"TCB info version {tcb_info.version} does not describe TDX")
    if tcb_info.fmspc != pck.fmspc:
        problems.append(
            f"TCB info FMSPC {tcb_info.fmspc.hex().upper()} does not match PCK FMSPC "
            f"{pck.fmspc.hex().upper()}"
        )
    if tcb_info.pce_id != pck.pce_id:
        problems.append("TCB info PCE-ID does not match the PCK certificate")
    # QE identity
    qe_status: str | None = None
    qe_adv: tuple[str, ...] = ()
    if qe_identity.id != "TD_QE":
        problems.append(f"QE identity is for {qe_identity.id!r}, not TD_QE")
    if qe_report.mr_signer != qe_identity.mr_signer:
        problems.append("QE MRSIGNER does not match the QE identity")
    if qe_report.isv_prod_id != qe_identity.isv_prod_id:
        problems.append("QE ISVPRODID does not match the QE identity")
    if (qe_report.misc_select & qe_identity.misc_select_mask) != (
        qe_identity.misc_select & qe_identity.misc_select_mask
    ):
        problems.append("QE MISCSELECT does not match the QE identity")
    if not _masked_eq(qe_report.attributes, qe_identity.attributes, qe_identity.attributes_mask):
        problems.append("QE ATTRIBUTES do not match the QE identity")
    for lv in qe_identity.tcb_levels:
        if qe_report.isv_svn >= lv.isv_svn:
            qe_status, qe_adv = lv.status, lv.advisory_ids
            break
    if qe_status is None:
        qe_status = "Revoked"
        problems.append(f"QE ISVSVN {qe_report.isv_svn} is below every QE identity TCB level")
    if problems:
        return TcbMatch(None, (), tuple(problems), qe_status=qe_status)
    # TDX module identity (TDX 1.5: TEE_TCB_SVN[1] is the module's major version)
    svn = report.tee_tcb_svn
    module_version = svn[1]
    module_status: str | None = None
    module_adv: tuple[str, ...] = ()
    tdx_start = 0
    if module_version > 0 and tcb_info.tdx_module_identities:
        tdx_start = 2
        wanted = f"TDX_{module_version:02d}"
        ident = next((m for m in tcb_info.tdx_module_identities if m.id == wanted), None)
        if ident is None:
            problems.append(f"TCB info has no TDX module identity {wanted}")
        else:
            if ident.mr_signer != report.mr_signer_seam:
                problems.append(f"MRSIGNERSEAM does not match TDX module identity {wanted}")
            if not _masked_eq(report.seam_attributes, ident.attributes, ident.attributes_mask):
                problems.append(f"SEAMATTRIBUTES do not match TDX module identity {wanted}")
            for lv in ident.tcb_levels:
                if svn[0] >= lv.isv_svn:
                    module_status, module_adv = lv.status, lv.advisory_ids
                    break
            if module_status is None:
                problems.append(f"TDX module SVN {svn[0]} is below every {wanted} TCB level")
    elif tcb_info.tdx_module is not None:
        m = tcb_info.tdx_module
        if m.mr_signer != report.mr_signer_seam:
            problems.append("MRSIGNERSEAM does not match the TDX module")
        if not _masked_eq(report.seam_attributes, m.attributes, m.attributes_mask):
            problems.append("SEAMATTRIBUTES do not match the TDX module")
    if problems:
        return TcbMatch(None, (), tuple(problems), qe_status=qe_status)
    # Platform TCB level: first level that every component meets.
    sgx = pck.sgx_tcb_components
    level = None
    for tl in tcb_info.tcb_levels:
        if pck.pce_svn < tl.pce_svn:
            continue
        if any(a < b for a, b in zip(sgx, tl.sgx_components, strict=True)):
            continue
        if tl.tdx_components is None:
            continue
        if any(a < b for a, b in zip(svn[tdx_start:], tl.tdx_components[tdx_start:], strict=True)):
            continue
        level = tl
        break
    if level is None:
        return TcbMatch(
            None, (), ("no matching TCB level",), qe_status=qe_status, module_status=module_status
        )
    status = _converge(_converge(level.status, module_status), qe_status)
    advisories = tuple(sorted(set(level.advisory_ids) | set(module_adv) | set(qe_adv)))
    return TcbMatch(
        status=status,
        advisory_ids=advisories,
        problems=(),
        tcb_date=level.tcb_date,
        platform_status=level.status,
        module_status=module_status,
        qe_status=qe_status,
    )
