"""The federation's cluster CA and link certificates (``cryptography``).

The master keeps a cluster CA (``DATA_DIR/federation/ca.key`` + ``ca.pem``, created once)
and signs with it: its own server certificate for the federation listener (made at each
start for the hosts it advertises) and one client certificate per datacenter CP, issued
at join time for a public key the dc generated itself (the private key never leaves the
dc). A dc certificate's subject CN is its datacenter label; the master additionally pins
the SHA-256 of each issued certificate, so a CA-signed certificate it did not issue to
that dc (or issued before a re-join) is still an unknown certificate.

The master pin (``master_pin``, like kubeadm's discovery hash): SHA-256 over a domain
tag, the cluster CA certificate (DER) and the master's Ed25519 key. Everything a dc
trusts forever comes from one join answer (or offline bundle): the CA it dials and the
key its snapshots must verify with. The pin travels with the join token
(``eej_SECRET.PIN``, ``join_token_text``) or is given on the command line, so a dc checks
the answer against it (``check_answer``) before it writes anything: whoever answers at
the upstream URL cannot substitute its own CA or key. The pin is public.

The join proof (``join_body``): the secret never travels. The master keeps only
``h = SHA-256(secret)`` per token (``join_secret_hash``); the dc computes the same ``h`` and
sends a public id of it (``join_token_id``: a tagged hash, 16 bytes, by which the master
finds the token) and an HMAC-SHA256 keyed by ``h`` over a tagged, length-prefixed
transcript of exactly what the master binds to the token: the datacenter label as the
dc sends it (the master checks the proof over the raw field, before normalising it), the
dc's TLS public key (PEM) and its Ed25519 signing key (hex) (``join_proof``). Whoever
answers at ``--upstream`` (a man in the middle, a mistyped or hijacked name) learns an
id and a MAC over the dc's public keys: it cannot join with keys of its own, and
relaying the body to the real master only enrols the keys the dc holds.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ee.protocol.signing import write_atomic
from ee.protocol.strict import lower_hex

CA_DAYS = 3650
CERT_DAYS = 365


class PkiError(Exception):
    """A certificate or key cannot be used; the message says which and why."""


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode)  # (ee.protocol.signing: exclusive tmp, fsync, rename)


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def save_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(path, key_pem(key))


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ClusterCa:
    """The CA key and certificate (load, or create once)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def load_or_create(cls, directory: Path, cluster_id: str) -> ClusterCa:
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), None)
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except ValueError as exc:
                raise PkiError(f"{directory}: cluster CA unreadable: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{key_path}: not an EC key")
            return cls(key, cert)
        key = new_key()
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(_name(f"ee cluster CA {cluster_id}"))
                .issuer_name(_name(f"ee cluster CA {cluster_id}"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        save_key(key_path, key)
        write_public(cert_path, cert_pem(cert).encode())
        return cls(key, cert)

    def issue(self, cn: str, public_key_pem: str, *, server_hosts: tuple[str, ...] = (),
              days: int = CERT_DAYS) -> x509.Certificate:
        """A leaf certificate for *public_key_pem*: a client certificate (CN = the dc
        label), or with *server_hosts* a server certificate naming them."""
        try:
            public = serialization.load_pem_public_key(public_key_pem.encode())
        except ValueError as exc:
            raise PkiError(f"not a PEM public key: {exc}") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) \
                or not isinstance(public.curve, ec.SECP256R1):
            raise PkiError("the TLS key must be an EC P-256 public key")
        now = _now()
        usage = (ExtendedKeyUsageOID.SERVER_AUTH if server_hosts
                 else ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(self.cert.subject).public_key(public)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server_hosts:
            names: list[x509.GeneralName] = []
            for host in server_hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())


PIN_TAG = b"ee/v2/federation-master-pin/1\x00"
TOKEN_PREFIX = "eej_"


def master_pin(ca_pem: str, master_key_hex: str) -> str:
    """The pin of a master: hex SHA-256 over the tag, the CA (DER) and its signing key."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        key = bytes.fromhex(master_key_hex)
    except ValueError as exc:
        raise PkiError(f"cannot compute the master pin: {exc}") from None
    if len(key) != 32:
        raise PkiError("the master key must be 32 bytes (Ed25519)")
    return hashlib.sha256(PIN_TAG + ca.public_bytes(serialization.Encoding.DER)
                          + key).hexdigest()


def join_token_text(secret: str, pin: str) -> str:
    return f"{secret}.{pin}"


def split_join_token(token: str) -> tuple[str, str | None]:
    """``eej_SECRET.PIN`` → (secret, pin); a token without a pin → (token, None)."""
    secret, sep, pin = token.partition(".")
    if not sep:
        return token, None
    if not lower_hex(pin, 64):
        raise PkiError("the join token's pin is not 64 lower-case hex characters")
    return secret, pin


JOIN_ID_TAG = b"ee/v2/federation-join-id/1\x00"
JOIN_PROOF_TAG = b"ee/v2/federation-join-proof/1\x00"


def join_secret_hash(secret: str) -> str:
    """What the master keeps of a join token's secret: hex SHA-256 (the proof's key)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def join_token_id(secret_hash: str) -> str:
    """The public id of a token: 32 hex characters, derived from (not revealing) *h*."""
    return hashlib.sha256(JOIN_ID_TAG + bytes.fromhex(secret_hash)).hexdigest()[:32]


def join_proof(secret_hash: str, datacenter: str, tls_public_key: str,
               signing_key: str) -> str:
    """HMAC-SHA256 keyed by *secret_hash* over the tag and the three fields, each
    length-prefixed (4 bytes, big endian): no two field lists make the same transcript."""
    transcript = JOIN_PROOF_TAG + b"".join(
        len(data).to_bytes(4, "big") + data
        for data in (field.encode("utf-8", "surrogatepass")
                     for field in (datacenter, tls_public_key, signing_key)))
    return hmac.new(bytes.fromhex(secret_hash), transcript, hashlib.sha256).hexdigest()


def join_body(token: str, datacenter: str, tls_public_key: str,
              signing_key: str) -> dict[str, str]:
    """The body of ``POST /api/v2/federation/join`` for *token* (``eej_SECRET[.PIN]``):
    the token's id and a proof bound to these keys; never the secret. Raises PkiError
    for a malformed pin."""
    secret, _pin = split_join_token(token)
    h = join_secret_hash(secret)
    return {"token_id": join_token_id(h),
            "proof": join_proof(h, datacenter, tls_public_key, signing_key),
            "datacenter": datacenter, "tls_public_key": tls_public_key,
            "signing_key": signing_key}


def normal_pin(text: str) -> str:
    """A pin given on a command line: 64 hex characters, optionally ``sha256:``-prefixed."""
    pin = text.strip().lower().removeprefix("sha256:")
    if not lower_hex(pin, 64):
        raise PkiError("a master pin is 64 hex characters (eectl federation issue prints it)")
    return pin


def check_answer(*, pin: str | None, label: str, ca_pem: str, master_key_hex: str,
                 cert_pem_text: str, tls_public_pem: str) -> None:
    """What a dc checks before it keeps a join answer or an offline bundle: the CA and
    master key match *pin* (when given), and the certificate is the CA's, for *label*,
    and for the dc's own TLS key. Raises PkiError."""
    for what, text in (("CA", ca_pem), ("certificate", cert_pem_text)):
        # Exactly one PEM block each: the pin covers the first certificate only, and
        # OpenSSL would trust every certificate of a CA file (a man in the middle's
        # CA appended after the real one would be trusted for the master's link).
        if text.count("-----BEGIN") != 1:
            raise PkiError(f"the {what} must be exactly one PEM certificate")
    if pin is not None and not hmac.compare_digest(master_pin(ca_pem, master_key_hex), pin):
        raise PkiError("the master's CA certificate and signing key do not match the pin: "
                       "whoever answered is not the master the pin names")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert = x509.load_pem_x509_certificate(cert_pem_text.encode())
    except ValueError as exc:
        raise PkiError(f"unreadable certificate: {exc}") from None
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise PkiError("the cluster CA key must be EC")
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes,
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PkiError("the certificate is not signed by the cluster CA") from None
    if cert.issuer != ca.subject:
        raise PkiError("the certificate's issuer is not the cluster CA")
    if common_name(cert.public_bytes(serialization.Encoding.DER)) != label:
        raise PkiError(f"the certificate is not for datacenter {label}")
    ours = serialization.load_pem_public_key(tls_public_pem.encode())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != ours.public_bytes(*spki):
        raise PkiError("the certificate is not for this dc's TLS key")


def server_context(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.SSLContext:
    """The master's federation listener: TLS 1.3, a client certificate from the CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.SSLContext:
    """A dc's side of the link: the master's certificate from the cluster CA only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def common_name(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    attrs_ = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs_) != 1:
        raise PkiError("the certificate must name exactly one CN")
    value = attrs_[0].value
    return value if isinstance(value, str) else value.decode()


def canonical_pem(text: str) -> str:
    """The one certificate in *text*, re-encoded (what ``check_answer`` checked)."""
    return cert_pem(x509.load_pem_x509_certificate(text.encode()))
