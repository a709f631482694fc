"""TLS on both CP listeners: the HTTP API (--tls-cert/--tls-key) and the agent plane
(--agent-tls-cert/--agent-tls-key, agents connect with wss://)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import trio
from cpkit import running_cp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_api_and_wss_agent_plane(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", tls_cert=str(cert), tls_key=str(key),
                              agent_tls_cert=str(cert), agent_tls_key=str(key)) as env:
            https = env.http.replace("http://", "https://")
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as c:
                r = await c.get(f"{https}/api/v2/health")
                assert r.status_code == 200 and r.json()["status"] == "ok"
            agent = env.agent("vm-tls")
            agent.url = agent.url.replace("ws://", "wss://")
            agent.ssl_context = ssl.create_default_context(cafile=cert)
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                assert agent.registered is not None
                nursery.cancel_scope.cancel()
