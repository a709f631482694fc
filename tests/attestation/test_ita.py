"""ITA client against a local HTTP server standing in for Intel Trust Authority."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ee.attestation import ItaError
from ee.attestation.ita import ItaClient, verify_token

NOW = 1_760_000_000
API_KEY = "test-api-key"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _cert(cn: str, key: rsa.RSAPrivateKey, issuer_cn: str, issuer_key: rsa.RSAPrivateKey,
          ca: bool) -> x509.Certificate:  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


class ItaSigner:
    """The token-signing PKI of the stand-in ITA: root CA -> signing cert, JWKS."""

    def __init__(self) -> None:
        self.root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.root = _cert(
            "Stand-in ITA Root", self.root_key, "Stand-in ITA Root", self.root_key, True
        )
        self.cert = _cert(
            "Stand-in ITA Signing", self.key, "Stand-in ITA Root", self.root_key, False
        )
        nums = self.key.public_key().public_numbers()
        self.jwks = {
            "keys": [
                {
                    "kty": "RSA",
                    "alg": "PS384",
                    "kid": "k1",
                    "n": _b64url(nums.n.to_bytes(256, "big")),
                    "e": _b64url(nums.e.to_bytes(3, "big")),
                    "x5c": [
                        base64.b64encode(c.public_bytes(Encoding.DER)).decode()
                        for c in (self.cert, self.root)
                    ],
                }
            ]
        }

    def token(self, claims: dict[str, Any], kid: str = "k1") -> str:
        header = _b64url(json.dumps({"alg": "PS384", "kid": kid, "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        signed = f"{header}.{payload}".encode()
        sig = self.key.sign(signed, padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())
        return f"{header}.{payload}.{_b64url(sig)}"


class LocalItaStandIn:
    """A real HTTP server on 127.0.0.1 (port 0) standing in for ITA's appraisal API."""

    def __init__(self, signer: ItaSigner) -> None:
        self.signer = signer
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, doc: object, status: int = 200) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                stand_in.requests.append(("GET", self.path, dict(self.headers), None))
                if self.path == "/appraisal/v1/nonce":
                    self._reply({"val": "dmFs", "iat": "aWF0", "signature": "c2ln"})
                elif self.path == "/certs":
                    self._reply(stand_in.signer.jwks)
                else:
                    self._reply({"error": "not found"}, 404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(("POST", self.path, dict(self.headers), body))
                if self.path != "/appraisal/v1/attest":
                    self._reply({"error": "not found"}, 404)
                    return
                if self.headers.get("x-api-key") != API_KEY:
                    self._reply({"error": "unauthorized"}, 401)
                    return
                claims = {
                    "iat": NOW - 5,
                    "exp": NOW + 300,
                    "attester_type": "TDX",
                    "attester_runtime_data": body["runtime_data"],
                    "tdx_mrtd": base64.b64decode(body["quote"])[184:232].hex(),
                    "verifier_nonce": body.get("verifier_nonce"),
                }
                self._reply({"token": stand_in.signer.token(claims)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def signer() -> ItaSigner:
    return ItaSigner()


@pytest.fixture
def ita(signer: ItaSigner) -> Iterator[LocalItaStandIn]:
    server = LocalItaStandIn(signer)
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(timeout=5)


async def test_appraisal_round_trip(ita: LocalItaStandIn, signer: ItaSigner) -> None:
    quote = bytes(48) + bytes(136) + bytes([0x42]) * 48 + bytes(400)
    client = ItaClient(
        API_KEY, api_url=ita.url, jwks_url=f"{ita.url}/certs", trusted_roots=[signer.root]
    )
    with trio.fail_after(10):
        nonce = await client.get_nonce()
        token = await client.appraise(
            quote, now=NOW, runtime_data=b"agent-key", nonce=nonce, policy_ids=["p1"]
        )
    assert token.claims["tdx_mrtd"] == "42" * 48
    assert token.claims["attester_runtime_data"] == base64.b64encode(b"agent-key").decode()
    method, path, headers, body = ita.requests[1]
    assert (method, path) == ("POST", "/appraisal/v1/attest")
    assert headers["x-api-key"] == API_KEY
    assert body == {
        "quote": base64.b64encode(quote).decode(),
        "runtime_data": base64.b64encode(b"agent-key").decode(),
        "verifier_nonce": {"val": "dmFs", "iat": "aWF0", "signature": "c2ln"},
        "policy_ids": ["p1"],
    }


async def test_wrong_api_key_is_an_ita_error(ita: LocalItaStandIn) -> None:
    client = ItaClient("wrong", api_url=ita.url, jwks_url=f"{ita.url}/certs")
    with trio.fail_after(10), pytest.raises(ItaError, match="HTTP 401"):
        await client.appraise(b"q", now=NOW)


def test_token_checks(signer: ItaSigner) -> None:
    good = signer.token({"iat": NOW, "exp": NOW + 60})
    assert verify_token(good, signer.jwks, now=NOW, trusted_roots=[signer.root]).claims["exp"]
    head, _body, sig = good.split(".")
    forged_body = _b64url(json.dumps({"iat": NOW, "exp": NOW + 6000}).encode())
    cases = {
        "signature does not verify": f"{head}.{forged_body}.{sig}",
        "expired": signer.token({"iat": NOW - 900, "exp": NOW - 300}),
        "issued in the future": signer.token({"iat": NOW + 900, "exp": NOW + 1200}),
        "not in the JWKS": signer.token({"iat": NOW, "exp": NOW + 60}, kid="k2"),
        "not a JWS": "abc",
    }
    for message, token in cases.items():
        with pytest.raises(ItaError, match=message):
            verify_token(token, signer.jwks, now=NOW, trusted_roots=[signer.root])
    other = ItaSigner()
    with pytest.raises(ItaError, match="trusted ITA root"):
        verify_token(good, signer.jwks, now=NOW, trusted_roots=[other.root])
    swapped = json.loads(json.dumps(signer.jwks))
    swapped["keys"][0]["n"] = other.jwks["keys"][0]["n"]
    with pytest.raises(ItaError, match="does not match its x5c"):
        verify_token(good, swapped, now=NOW, trusted_roots=[signer.root])
