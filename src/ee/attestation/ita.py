"""Intel Trust Authority (ITA) appraisal client and attestation token verification.

Flow (ITA v1 API): `GET /appraisal/v1/nonce` gives a signed verifier nonce; `POST
/appraisal/v1/attest` with ``{"quote", "verifier_nonce", "runtime_data", "policy_ids"}``
(bytes base64) answers ``{"token": JWT}``. The token is trusted only after
`verify_token`: its header names a key (``kid``) in ITA's JWKS, that key's ``x5c``
chain must verify (to a configured root when given) and hold the same public key, the
JWS signature must verify, and ``exp`` / ``iat`` / ``nbf`` must hold at ``now``.

`verify_token` is pure; `ItaClient` does the HTTP (httpx, async; it runs under Trio).
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation.errors import ItaError

DEFAULT_API_URL = "https://api.trustauthority.intel.com"
DEFAULT_JWKS_URL = "https://portal.trustauthority.intel.com/certs"

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def _b64url(data: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (ValueError, TypeError):
        raise ItaError("token: bad base64url") from None


@attrs.frozen
class ItaNonce:
    """A verifier nonce as ITA issues it (base64 strings, passed back verbatim)."""

    val: str
    iat: str
    signature: str

    def to_json(self) -> dict[str, str]:
        return {"val": self.val, "iat": self.iat, "signature": self.signature}


@attrs.frozen
class ItaToken:
    """A verified ITA attestation token."""

    raw: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


def _jws_verify(alg: str, key: object, signature: bytes, signed: bytes) -> None:
    family, bits = alg[:2], alg[2:]
    if bits not in _HASHES:
        raise ItaError(f"token: unsupported algorithm {alg}")
    h = _HASHES[bits]()
    try:
        if family == "PS" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PSS(padding.MGF1(h), h.digest_size), h)
        elif family == "RS" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), h)
        elif family == "ES" and isinstance(key, ec.EllipticCurvePublicKey):
            half = len(signature) // 2
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            key.verify(der, signed, ec.ECDSA(h))
        else:
            raise ItaError(f"token: algorithm {alg} does not fit the signing key")
    except InvalidSignature:
        raise ItaError("token: signature does not verify") from None


def _same_key(jwk: Mapping[str, Any], cert_key: object) -> bool:
    kty = jwk.get("kty")
    if kty == "RSA" and isinstance(cert_key, rsa.RSAPublicKey):
        nums = cert_key.public_numbers()
        return (
            int.from_bytes(_b64url(str(jwk.get("n", ""))), "big") == nums.n
            and int.from_bytes(_b64url(str(jwk.get("e", ""))), "big") == nums.e
        )
    if kty == "EC" and isinstance(cert_key, ec.EllipticCurvePublicKey):
        point = cert_key.public_numbers()
        return (
            int.from_bytes(_b64url(str(jwk.get("x", ""))), "big") == point.x
            and int.from_bytes(_b64url(str(jwk.get("y", ""))), "big") == point.y
        )
    return False


def _check_x5c(
    jwk: Mapping[str, Any], now: float, trusted_roots: Sequence[x509.Certificate] | None
) -> x509.Certificate:
    x5c = jwk.get("x5c")
    if not isinstance(x5c, list) or not x5c:
        raise ItaError("JWKS key has no x5c certificate chain")
    try:
        certs = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in x5c]
    except (ValueError, TypeError) as exc:
        raise ItaError(f"JWKS x5c is not a certificate chain: {exc}") from None
    for cert, issuer in itertools.pairwise(certs):
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise ItaError(f"JWKS x5c chain is broken: {exc or 'bad signature'}") from None
    for cert in certs:
        if not (
            cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp()
        ):
            raise ItaError(f"JWKS x5c certificate {cert.subject.rfc4514_string()} is not valid")
    top = certs[-1]
    if trusted_roots is not None:
        ders = {r.public_bytes(Encoding.DER) for r in trusted_roots}
        if top.public_bytes(Encoding.DER) not in ders:
            anchor = next((r for r in trusted_roots if r.subject == top.issuer), None)
            if anchor is None:
                raise ItaError("JWKS x5c chain does not end at a trusted ITA root")
            try:
                top.verify_directly_issued_by(anchor)
            except (InvalidSignature, ValueError, TypeError):
                raise ItaError("JWKS x5c chain does not verify to the trusted ITA root") from None
    if not _same_key(jwk, certs[0].public_key()):
        raise ItaError("JWKS key does not match its x5c certificate")
    return certs[0]


def verify_token(
    token: str,
    jwks: Mapping[str, Any],
    *,
    now: float,
    trusted_roots: Sequence[x509.Certificate] | None = None,
    leeway_s: float = 60,
) -> ItaToken:
    """Verify an ITA JWT against the JWKS at unix time *now*; raises `ItaError`."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ItaError("token: not a JWS compact serialisation")
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
    except ValueError:
        raise ItaError("token: header or claims are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ItaError("token: header and claims must be JSON objects")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg == "none" or not isinstance(kid, str):
        raise ItaError("token: header needs alg and kid")
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise ItaError("JWKS has no keys")
    jwk = next((k for k in keys if isinstance(k, dict) and k.get("kid") == kid), None)
    if jwk is None:
        raise ItaError(f"token: key {kid!r} is not in the JWKS")
    if "alg" in jwk and jwk["alg"] != alg:
        raise ItaError(f"token: algorithm {alg} differs from the key's {jwk['alg']}")
    leaf = _check_x5c(jwk, now, trusted_roots)
    _jws_verify(alg, leaf.public_key(), _b64url(parts[2]), f"{parts[0]}.{parts[1]}".encode())
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not isinstance(exp, int | float) or now > exp + leeway_s:
        raise ItaError("token: expired (or has no exp)")
    if isinstance(iat, int | float) and iat > now + leeway_s:
        raise ItaError("token: issued in the future")
    if isinstance(nbf, int | float) and nbf > now + leeway_s:
        raise ItaError("token: not yet valid")
    return ItaToken(raw=token, header=header, claims=claims)


class ItaClient:
    """Appraises quotes with Intel Trust Authority (async; httpx under Trio)."""

    def __init__(
        self,
        api_key: str,
        *,
        api_url: str = DEFAULT_API_URL,
        jwks_url: str = DEFAULT_JWKS_URL,
        trusted_roots: Sequence[x509.Certificate] | None = None,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self._api_url = api_url.rstrip("/")
        self._jwks_url = jwks_url
        self._trusted_roots = trusted_roots
        self._timeout = timeout_s
        self._transport = transport

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self._timeout,
            transport=self._transport,
            headers={"x-api-key": self._api_key, "Accept": "application/json"},
        )

    async def _json(self, client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> Any:
        try:
            response = await client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise ItaError(f"ITA request to {url} failed: {exc}") from None
        if response.status_code != 200:
            raise ItaError(f"ITA {method} {url}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise ItaError(f"ITA {method} {url}: response is not JSON") from None

    async def get_nonce(self) -> ItaNonce:
        async with self._client() as client:
            doc = await self._json(client, "GET", f"{self._api_url}/appraisal/v1/nonce")
        if not isinstance(doc, dict) or not all(
            isinstance(doc.get(k), str) for k in ("val", "iat", "signature")
        ):
            raise ItaError("ITA nonce response lacks val / iat / signature")
        return ItaNonce(doc["val"], doc["iat"], doc["signature"])

    async def appraise(
        self,
        quote: bytes,
        *,
        now: float,
        runtime_data: bytes = b"",
        nonce: ItaNonce | None = None,
        policy_ids: Sequence[str] = (),
    ) -> ItaToken:
        """Send *quote* for appraisal and return the verified token."""
        body: dict[str, Any] = {
            "quote": base64.b64encode(quote).decode(),
            "runtime_data": base64.b64encode(runtime_data).decode(),
        }
        if nonce is not None:
            body["verifier_nonce"] = nonce.to_json()
        if policy_ids:
            body["policy_ids"] = list(policy_ids)
        async with self._client() as client:
            doc = await self._json(
                client, "POST", f"{self._api_url}/appraisal/v1/attest", json=body
            )
            token = doc.get("token") if isinstance(doc, dict) else None
            if not isinstance(token, str):
                raise ItaError("ITA attest response has no token")
            jwks = await self._json(client, "GET", self._jwks_url)
        if not isinstance(jwks, dict):
            raise ItaError("ITA JWKS is not a JSON object")
        return verify_token(token, jwks, now=now, trusted_roots=self._trusted_roots)
