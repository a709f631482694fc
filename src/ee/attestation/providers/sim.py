"""`sim`: a software TD that emits real-format v4 TDX quotes, for development and tests.

The sim owns a complete, locally generated Intel-shaped PKI::

    sim root CA --+-- sim PCK platform CA -- sim PCK leaf (SGX extension: FMSPC, TCB)
                  +-- sim TCB signing (signs TCB info and QE identity)

plus an attestation key and a fixed QE identity. `SimTD.quote(report_data)` builds the
same bytes a real TDX quoting enclave would (header, TD report, ECDSA signature, QE
report signed by the PCK key, QE auth data, PEM PCK chain), and `SimTD.collateral(...)`
issues matching signed collateral (TCB info, QE identity, CRLs) in the PCS JSON shape,
so the whole verifier path -- including TCB level matching -- runs without TDX.

Nothing here is trusted by default: a verifier accepts sim quotes only when the sim
root certificate is configured as a trust anchor, which a production policy never does.
`SimTD.load_or_create(directory)` shares one sim chain between a dev CP (which trusts
its root) and dev agents (which sign with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ee.attestation.collateral import Collateral
from ee.attestation.pck import SGX_EXTENSIONS_OID, build_sgx_extension
from ee.attestation.quote import INTEL_QE_VENDOR_ID

SIM_FILE = "sim-td.json"
SIM_FMSPC = bytes.fromhex("EE0051000000")
SIM_PCE_ID = b"\x00\x00"
SIM_CPU_SVN = bytes([3, 3, 2, 2, 4, 1, 0, 5] + [0] * 8)
SIM_PCE_SVN = 11
SIM_TEE_TCB_SVN = bytes([6, 1, 3] + [0] * 13)
SIM_QE_MR_SIGNER = hashlib.sha256(b"ee/v2/sim/qe-signer").digest()
SIM_QE_MR_ENCLAVE = hashlib.sha256(b"ee/v2/sim/qe").digest()
SIM_QE_ISV_PROD_ID = 2
SIM_QE_ISV_SVN = 4
SIM_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
SIM_XFAM = bytes.fromhex("e702060000000000")
TD_ATTRIBUTES_PRODUCTION = bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE
TD_ATTRIBUTES_DEBUG = bytes.fromhex("0100001000000000")
_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
_NOT_AFTER = datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
_ZERO48 = bytes(48)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EasyEnclave development (sim)"),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("sim keys must be EC P-256")
    return key


def _sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    serial: int,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
        critical=False,
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@attrs.frozen
class SimChain:
    """The sim PKI: keys and certificates (persisted by `SimTD.save`)."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck_ca_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    tcb_signing_key: ec.EllipticCurvePrivateKey
    tcb_signing_cert: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> SimChain:
        serial = x509.random_serial_number
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name("EasyEnclave Sim SGX Root CA")
        root = _cert(root_name, root_key, root_name, root_key, ca=True, serial=serial())
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("EasyEnclave Sim PCK Platform CA")
        ca = _cert(ca_name, ca_key, root_name, root_key, ca=True, serial=serial())
        tcb_key = ec.generate_private_key(ec.SECP256R1())
        tcb = _cert(
            _name("EasyEnclave Sim TCB Signing"),
            tcb_key,
            root_name,
            root_key,
            ca=False,
            serial=serial(),
        )
        pck_key = ec.generate_private_key(ec.SECP256R1())
        ext = build_sgx_extension(
            fmspc=SIM_FMSPC,
            pce_id=SIM_PCE_ID,
            pce_svn=SIM_PCE_SVN,
            cpu_svn=SIM_CPU_SVN,
            ppid=os.urandom(16),
        )
        pck = _cert(
            _name("EasyEnclave Sim PCK Certificate"),
            pck_key,
            ca_name,
            ca_key,
            ca=False,
            serial=serial(),
            extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSIONS_OID), ext)],
        )
        return cls(
            root_key,
            root,
            ca_key,
            ca,
            pck_key,
            pck,
            tcb_key,
            tcb,
            ec.generate_private_key(ec.SECP256R1()),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "format": "ee/v2/sim-td/1",
            "root_key": _key_pem(self.root_key),
            "root_cert": _pem(self.root_cert).decode(),
            "pck_ca_key": _key_pem(self.pck_ca_key),
            "pck_ca_cert": _pem(self.pck_ca_cert).decode(),
            "pck_key": _key_pem(self.pck_key),
            "pck_cert": _pem(self.pck_cert).decode(),
            "tcb_signing_key": _key_pem(self.tcb_signing_key),
            "tcb_signing_cert": _pem(self.tcb_signing_cert).decode(),
            "attestation_key": _key_pem(self.attestation_key),
        }

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> SimChain:
        if doc.get("format") != "ee/v2/sim-td/1":
            raise ValueError("not a sim TD file (format ee/v2/sim-td/1)")

        def text(key: str) -> str:
            value = doc.get(key)
            if not isinstance(value, str):
                raise ValueError(f"sim TD file lacks {key}")
            return value

        def cert(key: str) -> x509.Certificate:
            return x509.load_pem_x509_certificate(text(key).encode())

        return cls(
            root_key=_load_key(text("root_key")),
            root_cert=cert("root_cert"),
            pck_ca_key=_load_key(text("pck_ca_key")),
            pck_ca_cert=cert("pck_ca_cert"),
            pck_key=_load_key(text("pck_key")),
            pck_cert=cert("pck_cert"),
            tcb_signing_key=_load_key(text("tcb_signing_key")),
            tcb_signing_cert=cert("tcb_signing_cert"),
            attestation_key=_load_key(text("attestation_key")),
        )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _svn_components(svns: bytes) -> list[dict[str, int]]:
    return [{"svn": v} for v in svns]


@attrs.frozen
class SimTD:
    """A simulated TD: the sim PKI plus the measurements its quotes report."""

    chain: SimChain
    mr_td: bytes = _ZERO48
    rtmrs: tuple[bytes, bytes, bytes, bytes] = (_ZERO48, _ZERO48, _ZERO48, _ZERO48)
    debug: bool = False
    mr_config_id: bytes = _ZERO48
    mr_owner: bytes = _ZERO48
    mr_owner_config: bytes = _ZERO48
    tee_tcb_svn: bytes = SIM_TEE_TCB_SVN

    def __attrs_post_init__(self) -> None:
        for value in (self.mr_td, self.mr_config_id, self.mr_owner, self.mr_owner_config):
            if len(value) != 48:
                raise ValueError("measurement registers are 48 bytes")
        if len(self.rtmrs) != 4 or any(len(r) != 48 for r in self.rtmrs):
            raise ValueError("rtmrs must be four 48-byte values")
        if len(self.tee_tcb_svn) != 16:
            raise ValueError("tee_tcb_svn is 16 bytes")

    # -- construction and persistence -------------------------------------------------

    @classmethod
    def create(cls, **measurements: object) -> SimTD:
        """A sim TD with a freshly generated PKI (not persisted)."""
        return cls(SimChain.generate(), **measurements)  # type: ignore[arg-type]

    @classmethod
    def load(cls, directory: str | os.PathLike[str], **measurements: object) -> SimTD:
        path = Path(directory) / SIM_FILE
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a sim TD file")
        return cls(SimChain.from_json(doc), **measurements)  # type: ignore[arg-type]

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], **measurements: object) -> SimTD:
        """Load the sim PKI from *directory*, creating (and saving) it on first use.

        Creation is atomic (temp file + hard link), so concurrent dev agents sharing a
        directory end up with one chain.
        """
        path = Path(directory) / SIM_FILE
        if not path.exists():
            SimTD(SimChain.generate()).save(directory)
        return cls.load(directory, **measurements)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the sim PKI to *directory*/sim-td.json (mode 0600) unless one exists."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / SIM_FILE
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".sim-td-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.chain.to_json(), f, indent=1)
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return path

    def evolve(self, **changes: object) -> SimTD:
        """The same sim PKI reporting other measurements (mr_td, rtmrs, debug, ...)."""
        return attrs.evolve(self, **changes)  # type: ignore[arg-type]

    # -- exports -----------------------------------------------------------------------

    @property
    def root_cert(self) -> x509.Certificate:
        return self.chain.root_cert

    def root_pem(self) -> bytes:
        """The sim root CA certificate (what a dev CP's trust bundle names)."""
        return _pem(self.chain.root_cert)

    def pck_chain_pem(self) -> bytes:
        c = self.chain
        return _pem(c.pck_cert) + _pem(c.pck_ca_cert) + _pem(c.root_cert)

    # -- quotes ------------------------------------------------------------------------

    def td_attributes(self) -> bytes:
        return TD_ATTRIBUTES_DEBUG if self.debug else TD_ATTRIBUTES_PRODUCTION

    def qe_report(self, auth_data: bytes) -> bytes:
        ak = self.chain.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        report_data = hashlib.sha256(ak + auth_data).digest() + bytes(32)
        raw = (
            SIM_CPU_SVN
            + struct.pack("<I", 0)
            + bytes(28)
            + SIM_QE_ATTRIBUTES
            + SIM_QE_MR_ENCLAVE
            + bytes(32)
            + SIM_QE_MR_SIGNER
            + bytes(96)
            + struct.pack("<HH", SIM_QE_ISV_PROD_ID, SIM_QE_ISV_SVN)
            + bytes(60)
            + report_data
        )
        assert len(raw) == 384
        return raw

    def quote(self, report_data: bytes) -> bytes:
        """A v4 TDX quote over *report_data* (exactly 64 bytes)."""
        if len(report_data) != 64:
            raise ValueError("REPORTDATA is exactly 64 bytes")
        header = struct.pack(
            "<HHIHH16s20s", 4, 2, 0x81, 0, SIM_PCE_SVN, INTEL_QE_VENDOR_ID, bytes(20)
        )
        body = b"".join(
            [
                self.tee_tcb_svn,
                _ZERO48,  # MRSEAM
                _ZERO48,  # MRSIGNERSEAM (Intel's TDX module)
                bytes(8),  # SEAMATTRIBUTES
                self.td_attributes(),
                SIM_XFAM,
                self.mr_td,
                self.mr_config_id,
                self.mr_owner,
                self.mr_owner_config,
                *self.rtmrs,
                report_data,
            ]
        )
        c = self.chain
        signature = _sign_raw(c.attestation_key, header + body)
        ak = c.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        auth_data = bytes(range(32))
        qe_report = self.qe_report(auth_data)
        qe_sig = _sign_raw(c.pck_key, qe_report)
        pem = self.pck_chain_pem() + b"\x00"
        content = (
            qe_report
            + qe_sig
            + struct.pack("<H", len(auth_data))
            + auth_data
            + struct.pack("<HI", 5, len(pem))
            + pem
        )
        sig_data = signature + ak + struct.pack("<HI", 6, len(content)) + content
        return header + body + struct.pack("<I", len(sig_data)) + sig_data

    # -- collateral --------------------------------------------------------------------

    def tcb_info_json(
        self,
        *,
        issued_at: float,
        next_update: float,
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
    ) -> str:
        """TCB info: the sim platform sits at a level with *tcb_status*."""
        current: dict[str, object] = {
            "tcb": {
                "sgxtcbcomponents": _svn_components(SIM_CPU_SVN),
                "pcesvn": SIM_PCE_SVN,
                "tdxtcbcomponents": _svn_components(self.tee_tcb_svn),
            },
            "tcbDate": "2024-03-13T00:00:00Z",
            "tcbStatus": tcb_status,
        }
        if advisory_ids:
            current["advisoryIDs"] = list(advisory_ids)
        older = {
            "tcb": {
                "sgxtcbcomponents": _svn_components(bytes(16)),
                "pcesvn": 5,
                "tdxtcbcomponents": _svn_components(bytes(16)),
            },
            "tcbDate": "2018-01-04T00:00:00Z",
            "tcbStatus": "OutOfDate",
            "advisoryIDs": ["EE-SIM-SA-00001"],
        }
        zero_signer = "00" * 48
        doc = {
            "id": "TDX",
            "version": 3,
            "issueDate": _iso(issued_at),
            "nextUpdate": _iso(next_update),
            "fmspc": SIM_FMSPC.hex().upper(),
            "pceId": SIM_PCE_ID.hex(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tdxModule": {
                "mrsigner": zero_signer,
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [
                {
                    "id": f"TDX_{self.tee_tcb_svn[1]:02d}",
                    "mrsigner": zero_signer,
                    "attributes": "0000000000000000",
                    "attributesMask": "FFFFFFFFFFFFFFFF",
                    "tcbLevels": [
                        {
                            "tcb": {"isvsvn": self.tee_tcb_svn[0]},
                            "tcbDate": "2024-03-13T00:00:00Z",
                            "tcbStatus": "UpToDate",
                        }
                    ],
                }
            ],
            "tcbLevels": [current, older],
        }
        return json.dumps(doc, separators=(",", ":"))

    def qe_identity_json(self, *, issued_at: float, next_update: float) -> str:
        doc = {
            "id": "TD_QE",
            "version": 2,
            "issueDate": _iso(issued_at),
            "nextUpdate": _iso(next_update),
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": SIM_QE_ATTRIBUTES.hex().upper(),
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": SIM_QE_MR_SIGNER.hex().upper(),
            "isvprodid": SIM_QE_ISV_PROD_ID,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": SIM_QE_ISV_SVN},
                    "tcbDate": "2024-03-13T00:00:00Z",
                    "tcbStatus": "UpToDate",
                }
            ],
        }
        return json.dumps(doc, separators=(",", ":"))

    def _crl(
        self,
        issuer: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        issued_at: float,
        next_update: float,
        revoked: Sequence[int],
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(datetime.fromtimestamp(int(issued_at), UTC))
            .next_update(datetime.fromtimestamp(int(next_update), UTC))
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(datetime.fromtimestamp(int(issued_at), UTC))
                .build()
            )
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def collateral(
        self,
        *,
        issued_at: float,
        validity_s: float = 30 * 86400,
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] = (),
        revoke_pck: bool = False,
    ) -> Collateral:
        """Signed collateral valid from *issued_at* for *validity_s* seconds."""
        c = self.chain
        next_update = issued_at + validity_s
        tcb_info = self.tcb_info_json(
            issued_at=issued_at,
            next_update=next_update,
            tcb_status=tcb_status,
            advisory_ids=advisory_ids,
        )
        qe_identity = self.qe_identity_json(issued_at=issued_at, next_update=next_update)
        signing_chain = (_pem(c.tcb_signing_cert) + _pem(c.root_cert)).decode()
        return Collateral(
            pck_crl_issuer_chain=(_pem(c.pck_ca_cert) + _pem(c.root_cert)).decode(),
            root_ca_crl=self._crl(c.root_cert, c.root_key, issued_at, next_update, ()),
            pck_crl=self._crl(
                c.pck_ca_cert,
                c.pck_ca_key,
                issued_at,
                next_update,
                (c.pck_cert.serial_number,) if revoke_pck else (),
            ),
            tcb_info_issuer_chain=signing_chain,
            tcb_info=tcb_info,
            tcb_info_signature=_sign_raw(c.tcb_signing_key, tcb_info.encode()),
            qe_identity_issuer_chain=signing_chain,
            qe_identity=qe_identity,
            qe_identity_signature=_sign_raw(c.tcb_signing_key, qe_identity.encode()),
        )


class SimProvider:
    """The `sim` attestation provider: quotes from a `SimTD`.

    With *rtmr3* (the agent passes its software RTMR3 register's ``read``), each quote
    carries that register's value at quoting time as RTMR3, as a TD's quote carries the
    hardware register; RTMR0..2 stay the `SimTD`'s.
    """

    name = "sim"

    def __init__(self, td: SimTD, rtmr3: Callable[[], bytes] | None = None) -> None:
        self.td = td
        self.rtmr3 = rtmr3

    def get_quote(self, report_data: bytes) -> bytes:
        td = self.td
        if self.rtmr3 is not None:
            td = td.evolve(rtmrs=(*td.rtmrs[:3], self.rtmr3()))
        return td.quote(report_data)


def shared_sim_dir() -> Path:
    """Where dev CPs and dev agents on one host share the sim TD's chain.

    ``$EE_SIM_DIR``, else ``~/.local/share/easyenclave/sim``: the sim "hardware" of a
    development machine, so a dev agent's quotes chain to the root a dev CP trusts.
    """
    return Path(os.environ.get("EE_SIM_DIR", Path.home() / ".local/share/easyenclave/sim"))
