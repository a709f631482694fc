"""A client of Intel's PCS / a PCCS (API v4): TDX verification collateral for one FMSPC.

What is fetched (``BASE`` is e.g. ``https://api.trustedservices.intel.com`` or a
PCCS such as ``https://pccs.example:8081``; a trailing ``/sgx|tdx/certification/v4``
is tolerated)::

    GET BASE/sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der
        body: the PCK CRL (DER; PEM accepted too)
        header SGX-PCK-CRL-Issuer-Chain: URL-encoded PEM chain (PCK CA, root)
    GET BASE/tdx/certification/v4/tcb?fmspc=HEX
        body: {"tcbInfo": {...}, "signature": "<hex r||s>"}
        header TCB-Info-Issuer-Chain (SGX-TCB-Info-Issuer-Chain accepted): URL-encoded PEM
    GET BASE/tdx/certification/v4/qe/identity
        body: {"enclaveIdentity": {...}, "signature": "<hex r||s>"}
        header SGX-Enclave-Identity-Issuer-Chain: URL-encoded PEM
    GET BASE/sgx/certification/v4/rootcacrl       (PCCS: hex-encoded DER; DER / PEM accepted)
        or, where that route does not exist (Intel's PCS answers 404), the root CA's
        CRL distribution point (https://certificates.trustedservices.intel.com/IntelSGXRootCA.der)

Intel signs the exact bytes of the ``tcbInfo`` / ``enclaveIdentity`` member, so those
are cut out of the body as the text that was sent (`raw_member`), never re-serialised.

Every failure is a `PccsError` with a one-line reason and a short ``kind`` (for
metrics): ``unreachable``, ``timeout``, ``http`` (non-2xx), ``too_large``, ``format``
(garbage), ``mismatch`` (collateral for another FMSPC than asked). Bodies are read up
to a cap. Nothing here judges the signatures: the caller checks the result against its
trusted roots (`ee.attestation.collateral.check_collateral`) before using it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation._der import pem_certificates
from ee.attestation.collateral import Collateral, parse_tcb_info
from ee.attestation.errors import CollateralFormatError

if TYPE_CHECKING:  # httpx is imported where a client is made (start-up time)
    import httpx

PCK_CAS = ("platform", "processor")
MAX_BODY_BYTES = 1 << 20
TCB_CHAIN_HEADERS = ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
QE_CHAIN_HEADER = "SGX-Enclave-Identity-Issuer-Chain"
CRL_CHAIN_HEADER = "SGX-PCK-CRL-Issuer-Chain"


class PccsError(Exception):
    """Collateral could not be fetched; ``kind`` names the failure class."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


def normalise_fmspc(text: str) -> bytes:
    """An FMSPC from 12 hex characters (ValueError otherwise)."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"FMSPC {text!r} is not 6 bytes of hex")
    return raw


def base_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"PCCS URL {url!r} must be http(s)://")
    return url


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def raw_member(body: str, key: str) -> str:
    """The exact source text of top-level member *key* of the JSON object *body*."""
    decoder = json.JSONDecoder()
    i = _skip(body, 0)
    if body[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _skip(body, i + 1)
    while body[i : i + 1] != "}":
        name, i = decoder.raw_decode(body, i)
        i = _skip(body, i)
        if not isinstance(name, str) or body[i : i + 1] != ":":
            raise ValueError("expected a string key and ':'")
        start = _skip(body, i + 1)
        _, i = decoder.raw_decode(body, start)
        if name == key:
            return body[start:i]
        i = _skip(body, i)
        if body[i : i + 1] == ",":
            i = _skip(body, i + 1)
        elif body[i : i + 1] != "}":
            raise ValueError("expected ',' or '}'")
    raise ValueError(f"no member {key!r}")


def _signed_document(what: str, body: bytes, member: str) -> tuple[str, bytes]:
    """(exact text of *member*, signature bytes) from a PCS JSON answer."""
    try:
        text = body.decode("utf-8")
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get(member), dict):
            raise ValueError(f"no {member!r} object")
        signature = doc.get("signature")
        if not isinstance(signature, str):
            raise ValueError("no 'signature' string")
        raw_sig = bytes.fromhex(signature)
        if len(raw_sig) != 64:
            raise ValueError("signature is not 64 bytes")
        return raw_member(text, member), raw_sig
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise PccsError("format", f"{what}: not a PCS answer ({exc})") from None
    except RecursionError:
        raise PccsError("format", f"{what}: not a PCS answer (nested too deeply)") from None


def _crl_der(what: str, body: bytes) -> bytes:
    """A CRL as DER from DER, PEM or hex-encoded DER (what PCCS and PCS send)."""
    try:
        if body[:1] == b"\x30":  # DER (never stripped: its last byte may be 0x20)
            data = body
        elif body.strip().startswith(b"-----BEGIN X509 CRL-----"):
            return x509.load_pem_x509_crl(body.strip()).public_bytes(Encoding.DER)
        else:
            data = bytes.fromhex(body.strip().decode("ascii"))
        x509.load_der_x509_crl(data)
        return bytes(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PccsError("format", f"{what}: not a CRL ({exc})") from None


def _chain(what: str, headers: Mapping[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        value = headers.get(name)
        if value:
            pem = unquote(value)
            try:
                if not pem_certificates(pem):
                    raise ValueError("no certificate")
            except ValueError as exc:
                raise PccsError("format", f"{what}: header {name} is not a PEM chain "
                                f"({exc})") from None
            return pem
    raise PccsError("format", f"{what}: no {names[0]} header")


@attrs.frozen
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


@attrs.frozen
class PccsClient:
    """Fetches collateral from one PCS / PCCS (see the module docstring)."""

    url: str = attrs.field(converter=base_url)
    timeout_s: float = 10.0
    max_body_bytes: int = MAX_BODY_BYTES
    api_key: str | None = attrs.field(default=None, repr=False)
    verify_tls: bool = True

    def _client(self) -> httpx.AsyncClient:
        import httpx

        headers = {"Ocp-Apim-Subscription-Key": self.api_key} if self.api_key else {}
        return httpx.AsyncClient(timeout=self.timeout_s, headers=headers,
                                 verify=self.verify_tls, follow_redirects=True)

    async def _get(self, client: httpx.AsyncClient, what: str, url: str) -> Answer:
        import httpx

        try:
            async with client.stream("GET", url) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise PccsError("too_large", f"{what}: answer larger than "
                                        f"{self.max_body_bytes} bytes")
                    chunks.append(chunk)
                return Answer(response.status_code, response.headers, b"".join(chunks))
        except httpx.TimeoutException:
            raise PccsError("timeout", f"{what}: {url} did not answer within "
                            f"{self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise PccsError("unreachable", f"{what}: {url}: {type(exc).__name__}: "
                            f"{exc}") from None

    async def _ok(self, client: httpx.AsyncClient, what: str, url: str) -> Answer:
        answer = await self._get(client, what, url)
        if not 200 <= answer.status < 300:
            raise PccsError("http", f"{what}: {url} answered HTTP {answer.status}")
        return answer

    async def fetch(self, fmspc: bytes, *, ca: str = "platform") -> Collateral:
        """Collateral for TDX platforms of *fmspc* whose PCK certificates *ca* issued."""
        if ca not in PCK_CAS:
            raise ValueError(f"ca must be one of {', '.join(PCK_CAS)}")
        fmspc_hex = fmspc.hex().upper()
        sgx = f"{self.url}/sgx/certification/v4"
        tdx = f"{self.url}/tdx/certification/v4"
        async with self._client() as client:
            crl = await self._ok(client, "PCK CRL", f"{sgx}/pckcrl?ca={ca}&encoding=der")
            tcb = await self._ok(client, "TCB info", f"{tdx}/tcb?fmspc={fmspc_hex}")
            qe = await self._ok(client, "QE identity", f"{tdx}/qe/identity")
            tcb_info, tcb_sig = _signed_document("TCB info", tcb.body, "tcbInfo")
            tcb_chain = _chain("TCB info", tcb.headers, TCB_CHAIN_HEADERS)
            try:
                served = parse_tcb_info(tcb_info).fmspc
            except CollateralFormatError as exc:
                raise PccsError("format", f"TCB info: {exc}") from None
            if served != fmspc:
                raise PccsError("mismatch", f"TCB info: asked for FMSPC {fmspc_hex}, the "
                                f"PCCS answered with FMSPC {served.hex().upper()}")
            qe_identity, qe_sig = _signed_document("QE identity", qe.body, "enclaveIdentity")
            root_crl = await self._root_crl(client, sgx, tcb_chain)
            return Collateral(
                pck_crl_issuer_chain=_chain("PCK CRL", crl.headers, (CRL_CHAIN_HEADER,)),
                root_ca_crl=root_crl,
                pck_crl=_crl_der("PCK CRL", crl.body),
                tcb_info_issuer_chain=tcb_chain,
                tcb_info=tcb_info,
                tcb_info_signature=tcb_sig,
                qe_identity_issuer_chain=_chain("QE identity", qe.headers, (QE_CHAIN_HEADER,)),
                qe_identity=qe_identity,
                qe_identity_signature=qe_sig,
            )

    async def _root_crl(self, client: httpx.AsyncClient, sgx: str, chain_pem: str) -> bytes:
        answer = await self._get(client, "root CA CRL", f"{sgx}/rootcacrl")
        if 200 <= answer.status < 300:
            return _crl_der("root CA CRL", answer.body)
        if answer.status != 404:
            raise PccsError("http", f"root CA CRL: {sgx}/rootcacrl answered HTTP "
                            f"{answer.status}")
        # Intel's PCS has no rootcacrl route: follow the root's CRL distribution point.
        try:
            url = crl_distribution_point(chain_pem)
        except ValueError as exc:  # the served chain is not checked yet: it may be garbage
            raise PccsError("format", f"root CA CRL: the issuer chain does not decode "
                            f"({exc})") from None
        if url is None:
            raise PccsError("format", "root CA CRL: no rootcacrl route and no CRL "
                            "distribution point in the root certificate")
        return _crl_der("root CA CRL", (await self._ok(client, "root CA CRL", url)).body)


def crl_distribution_point(chain_pem: str) -> str | None:
    """The first http(s) CRL distribution point of the chain's last certificate."""
    ders = pem_certificates(chain_pem)
    if not ders:
        return None
    cert = x509.load_der_x509_certificate(ders[-1])
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(
                    ("http://", "https://")):
                return str(name.value)
    return None
