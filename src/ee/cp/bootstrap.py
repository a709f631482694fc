"""The bootstrap bundle: what a CP must trust before it can trust anything else.

Theory of operation
-------------------
``<data-dir>/bootstrap.json`` + ``bootstrap.json.sig`` (a detached Ed25519 signature
over the canonical JSON, ``ee.protocol.signing``). Format ``ee/v2/bootstrap/2``::

    {"format": "ee/v2/bootstrap/2",
     "cluster_id": "prod-eu-1", "environment": "production",   # or "staging" / "dev"
     "created_at": "2026-11-30T23:00:00Z",
     "cp_key": {"file": "cp.key", "public_key": "<32-byte Ed25519 key, hex>"},
     "admin": {"token_sha256": "<hex>"},
     "trust": {"roots": [{"name": "intel-sgx-root-ca", "sha256": "<fingerprint>",
                          "pem": "-----BEGIN CERTIFICATE-----..."}],
               "policy": {<ee.attestation.Policy JSON: mode, allowlists, node_sizes,...>},
               "ek_roots": [<pinned like roots: the EK CAs the tpm provider trusts>],
               "release_keys": [{"name": "release-2026", "public_key": "<Ed25519, hex>"}]},
     "federation_ca": null | {"name": ..., "sha256": ..., "pem": ...},
     "dev": null | {"sim_dir": "..."}}

Who signs it decides what it is:

* a **production** bundle (any environment but ``dev``) is signed offline with a key
  that never touches the CP host (``eectl cp bundle create --signing-key``). The CP is
  given the public half to pin (``--bundle-pubkey FILE``); it verifies the signature
  with that key and nothing else, then checks that its own signing key
  (``cp_key.file`` in the data dir) is the one the bundle names.
* a **dev** bundle (``environment: dev``, created by ``ee-cp --dev``) is signed with the
  CP's own key and trusts the sim provider's root. A CP refuses it unless started
  with ``--dev``; a ``--dev`` CP also refuses a production bundle whose signer it was
  not told to pin.

``trust.release_keys`` pins the public halves of the keys that sign releases
(``eectl release sign``): a CP admits a signed release's expected measurements into its
policy (``POST /api/v2/admin/releases``, ``ee.cp.releases``) only when the signature
verifies under one of them; with none pinned it admits no release.

Every root is pinned twice: by its PEM and by its SHA-256 fingerprint, and each must
be a self-signed CA certificate (basicConstraints CA, keyCertSign, a signature that
verifies with its own key). Attestation roots (and the federation CA) must be ECDSA;
EK roots may also be RSA (TPM vendors' EK CAs often are). The Intel SGX Root CA ships
in the package and is named ``intel`` on the command line; the bundle records its
fingerprint, which must be Intel's. Unknown fields at any level are refused (a field
this code does not know cannot be honoured, so it must not be ignored). Every refusal
is one line (`BootstrapError`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ee.attestation import Policy, PolicyFormatError, load_intel_root
from ee.protocol.canonical import strict_json_loads
from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    read_signed,
    save_private_key,
    write_signed,
)

BUNDLE = "bootstrap.json"
CP_KEY = "cp.key"
ADMIN_TOKEN = "admin.token"
FORMAT = "ee/v2/bootstrap/2"
LEGACY_DEV_VERSION = 1  # the first dev bundles: {"version": 1, ...}, still read under --dev
ENVIRONMENTS = ("production", "staging", "dev")
INTEL_ROOT_NAME = "intel-sgx-root-ca"

_TOP = {"format", "cluster_id", "environment", "created_at", "cp_key", "admin", "trust",
        "federation_ca", "dev"}
_CP_KEY = {"file", "public_key"}
_ADMIN = {"token_sha256"}
_TRUST = {"roots", "policy", "ek_roots", "release_keys"}
_RELEASE_KEY = {"name", "public_key"}
_ROOT = {"name", "sha256", "pem"}
_DEV = {"sim_dir"}


class BootstrapError(Exception):
    """A bundle that cannot be used; the message is the one-line reason."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (how roots are pinned)."""
    return cert.fingerprint(hashes.SHA256()).hex()


@attrs.frozen
class Bootstrap:
    cluster_id: str
    environment: str
    admin_token_sha256: str
    roots: tuple[x509.Certificate, ...]
    policy: Policy
    signing_key: Ed25519PrivateKey
    dev: bool
    sim_dir: str | None
    doc: dict[str, Any]
    federation_ca: x509.Certificate | None = None
    #: EK certificate authorities for the ``tpm`` provider (TPM vendors' CAs; none: the
    #: CP refuses vTPM evidence)
    ek_roots: tuple[x509.Certificate, ...] = ()
    #: the release signing keys this cluster trusts, by name (Ed25519 public keys)
    release_keys: tuple[tuple[str, Ed25519PublicKey], ...] = ()

    def admin_token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token_hash(token), self.admin_token_sha256)


# --- roots ------------------------------------------------------------------------------


#: the smallest RSA modulus an EK root may have
MIN_RSA_BITS = 2048


def check_root(cert: x509.Certificate, what: str, *, rsa_allowed: bool = False) -> None:
    """Refuse anything but a self-signed CA certificate (`BootstrapError`).

    Attestation roots must be ECDSA (Intel's are P-256). *rsa_allowed* (EK roots only:
    many TPM vendors' EK CAs are RSA) also accepts an RSA key of at least
    `MIN_RSA_BITS` bits whose self-signature is PKCS#1 v1.5 with the cert's hash.
    """
    label = f"{what} ({cert.subject.rfc4514_string()})"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise BootstrapError(f"{label} is not a CA certificate (no basicConstraints)") from None
    if not bc.ca:
        raise BootstrapError(f"{label} is not a CA certificate (basicConstraints CA is false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise BootstrapError(f"{label} may not sign certificates (keyUsage)")
    except x509.ExtensionNotFound:
        pass
    if cert.issuer != cert.subject:
        raise BootstrapError(f"{label} is not self-signed (a trust root must be)")
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and rsa_allowed:
        if key.key_size < MIN_RSA_BITS:
            raise BootstrapError(f"{label}: an RSA key of {key.key_size} bits (at least "
                                 f"{MIN_RSA_BITS})")
    elif not isinstance(key, ec.EllipticCurvePublicKey):
        raise BootstrapError(f"{label}: not an ECDSA key " + (
            "or an RSA key" if rsa_allowed else "(attestation roots are ECDSA: Intel's "
            "are P-256)"))
    try:
        hash_alg = cert.signature_hash_algorithm
        if hash_alg is None:
            raise InvalidSignature
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                       hash_alg)
        else:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        raise BootstrapError(f"{label}: its self-signature does not verify") from None


def root_entry(cert: x509.Certificate, name: str, *,
               rsa_allowed: bool = False) -> dict[str, str]:
    check_root(cert, f"root {name}", rsa_allowed=rsa_allowed)
    return {"name": name, "sha256": fingerprint(cert),
            "pem": cert.public_bytes(serialization.Encoding.PEM).decode()}


def _pinned_cert(entry: object, where: str, *, rsa_allowed: bool = False) -> x509.Certificate:
    doc = _object(entry, where, _ROOT)
    pem, pinned, name = doc.get("pem"), doc.get("sha256"), doc.get("name")
    if not isinstance(pem, str) or not isinstance(pinned, str) or not isinstance(name, str):
        raise BootstrapError(f"{where}: name, sha256 and pem must be strings")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise BootstrapError(f"{where}: not a PEM certificate ({exc})") from None
    actual = fingerprint(cert)
    if not hmac.compare_digest(actual, pinned.replace(":", "").lower()):
        raise BootstrapError(f"{where} ({name}): fingerprint {actual} is not the pinned "
                             f"{pinned}")
    if name == INTEL_ROOT_NAME and actual != fingerprint(load_intel_root()):
        raise BootstrapError(f"{where}: names the Intel SGX Root CA but is another "
                             "certificate")
    check_root(cert, f"{where} ({name})", rsa_allowed=rsa_allowed)
    return cert


# --- the document -----------------------------------------------------------------------


def _object(value: object, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BootstrapError(f"{where}: must be a JSON object")
    unknown = set(value) - allowed
    if unknown:
        raise BootstrapError(f"{where}: unknown fields: {', '.join(sorted(unknown))}")
    return value


def _string(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise BootstrapError(f"{where}.{key}: missing or not a string")
    return value


def _hex(doc: Mapping[str, Any], key: str, where: str, size: int) -> bytes:
    text = _string(doc, key, where)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise BootstrapError(f"{where}.{key}: must be {size} bytes of hex")
    return raw


@attrs.frozen
class BundleDoc:
    """A parsed, structurally valid bundle (its signature is checked separately)."""

    cluster_id: str
    environment: str
    cp_key_file: str
    cp_public_key: bytes
    admin_token_sha256: str
    roots: tuple[x509.Certificate, ...]
    policy: Policy
    federation_ca: x509.Certificate | None
    sim_dir: str | None
    doc: dict[str, Any]
    ek_roots: tuple[x509.Certificate, ...] = ()
    release_keys: tuple[tuple[str, Ed25519PublicKey], ...] = ()

    @property
    def dev(self) -> bool:
        return self.environment == "dev"


def parse_bundle(doc: object) -> BundleDoc:
    """Check a bundle document's shape and every pinned certificate (pure)."""
    top = _object(doc, "bundle", _TOP)
    if top.get("format") != FORMAT:
        raise BootstrapError(f"bundle.format: {top.get('format')!r} is not {FORMAT!r}")
    environment = _string(top, "environment", "bundle")
    if environment not in ENVIRONMENTS:
        raise BootstrapError(f"bundle.environment must be one of {', '.join(ENVIRONMENTS)}")
    cluster_id = _string(top, "cluster_id", "bundle")
    cp_key = _object(top.get("cp_key"), "bundle.cp_key", _CP_KEY)
    key_file = _string(cp_key, "file", "bundle.cp_key")
    if "/" in key_file or key_file.startswith("."):
        raise BootstrapError("bundle.cp_key.file: a file name inside the data dir")
    admin = _object(top.get("admin"), "bundle.admin", _ADMIN)
    token_sha = _hex(admin, "token_sha256", "bundle.admin", 32).hex()
    trust = _object(top.get("trust"), "bundle.trust", _TRUST)
    entries = trust.get("roots")
    if not isinstance(entries, list) or not entries:
        raise BootstrapError("bundle.trust.roots: must list at least one root")
    roots = tuple(_pinned_cert(e, f"bundle.trust.roots[{i}]") for i, e in enumerate(entries))
    try:
        policy = Policy.from_json(trust.get("policy", {}))
    except PolicyFormatError as exc:
        raise BootstrapError(f"bundle.trust.policy: {exc}") from None
    ek_entries = trust.get("ek_roots", [])
    if not isinstance(ek_entries, list):
        raise BootstrapError("bundle.trust.ek_roots: must be a list")
    ek_roots = tuple(_pinned_cert(e, f"bundle.trust.ek_roots[{i}]", rsa_allowed=True)
                     for i, e in enumerate(ek_entries))
    release_keys = _release_keys(trust.get("release_keys", []))
    fed = top.get("federation_ca")
    federation_ca = None if fed is None else _pinned_cert(fed, "bundle.federation_ca")
    dev = top.get("dev")
    sim_dir = None
    if dev is not None:
        sim_dir = _string(_object(dev, "bundle.dev", _DEV), "sim_dir", "bundle.dev")
    if (dev is not None) != (environment == "dev"):
        raise BootstrapError("bundle.dev: present exactly when the environment is dev")
    return BundleDoc(cluster_id, environment, key_file, _hex(cp_key, "public_key",
                     "bundle.cp_key", 32), token_sha, roots, policy, federation_ca, sim_dir,
                     top, ek_roots, release_keys)


def _release_keys(entries: object) -> tuple[tuple[str, Ed25519PublicKey], ...]:
    if not isinstance(entries, list):
        raise BootstrapError("bundle.trust.release_keys: must be a list")
    out: list[tuple[str, Ed25519PublicKey]] = []
    for i, entry in enumerate(entries):
        where = f"bundle.trust.release_keys[{i}]"
        doc = _object(entry, where, _RELEASE_KEY)
        name = _string(doc, "name", where)
        if name in {n for n, _ in out}:
            raise BootstrapError(f"{where}.name: {name!r} is pinned twice")
        out.append((name, Ed25519PublicKey.from_public_bytes(_hex(doc, "public_key",
                                                                   where, 32))))
    return tuple(out)


def release_key_entry(name: str, key: Ed25519PublicKey) -> dict[str, str]:
    return {"name": name, "public_key": public_key_bytes(key).hex()}


def make_bundle(*, cluster_id: str, environment: str, cp_public_key: Ed25519PublicKey,
                admin_token_sha256: str, roots: Sequence[tuple[str, x509.Certificate]],
                policy: Mapping[str, Any], federation_ca: x509.Certificate | None = None,
                sim_dir: str | None = None, cp_key_file: str = CP_KEY,
                ek_roots: Sequence[tuple[str, x509.Certificate]] = (),
                release_keys: Sequence[tuple[str, Ed25519PublicKey]] = ()) -> dict[str, Any]:
    """A bundle document (checked by `parse_bundle` before it is returned)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "cluster_id": cluster_id,
        "environment": environment,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cp_key": {"file": cp_key_file, "public_key": public_key_bytes(cp_public_key).hex()},
        "admin": {"token_sha256": admin_token_sha256},
        "trust": {"roots": [root_entry(cert, name) for name, cert in roots],
                  "policy": dict(policy),
                  **({"ek_roots": [root_entry(cert, name, rsa_allowed=True)
                                  for name, cert in ek_roots]}
                     if ek_roots else {}),
                  **({"release_keys": [release_key_entry(name, key)
                                       for name, key in release_keys]}
                     if release_keys else {})},
        "federation_ca": (root_entry(federation_ca, "federation-ca")
                          if federation_ca is not None else None),
        "dev": {"sim_dir": sim_dir} if sim_dir is not None else None,
    }
    parse_bundle(doc)
    return doc


# --- dev --------------------------------------------------------------------------------


def _dev_policy() -> dict[str, Any]:
    # Dev admits the sim TD: any measurement, collateral from the sim chain.
    return {"mode": "strict", "allowed_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
            "require_collateral": True}


def create_dev(data_dir: Path) -> str:
    """Create key, bundle and admin token for a dev CP; returns the admin token."""
    from ee.attestation.providers.sim import SimTD, shared_sim_dir

    data_dir.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    save_private_key(data_dir / CP_KEY, key)
    sim_dir = shared_sim_dir()
    td = SimTD.load_or_create(sim_dir)
    token = "ee-admin-" + secrets.token_urlsafe(32)
    doc = make_bundle(cluster_id=f"dev-{uuid.uuid4().hex[:12]}", environment="dev",
                      cp_public_key=key.public_key(), admin_token_sha256=token_hash(token),
                      roots=[("sim-root", td.root_cert)], policy=_dev_policy(),
                      sim_dir=str(sim_dir))
    write_signed(data_dir / BUNDLE, doc, key)
    token_path = data_dir / ADMIN_TOKEN
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    return token


def _legacy_dev(doc: dict[str, Any], key: Ed25519PrivateKey) -> Bootstrap:
    """A version-1 dev bundle (written before the production format existed)."""
    try:
        trust = doc["trust"]
        roots = tuple(x509.load_pem_x509_certificate(p.encode()) for p in trust["roots"])
        return Bootstrap(cluster_id=str(doc["cluster_id"]), environment="dev",
                         admin_token_sha256=str(doc["admin_token_sha256"]), roots=roots,
                         policy=Policy.from_json(trust.get("policy", {})), signing_key=key,
                         dev=True, sim_dir=trust.get("sim_dir"), doc=doc)
    except (KeyError, TypeError, ValueError, PolicyFormatError) as exc:
        raise BootstrapError(f"bootstrap bundle is malformed: {exc!r}") from None


# --- loading ----------------------------------------------------------------------------


def read_unverified(bundle: Path) -> dict[str, Any]:
    """The unverified document, only to learn which key must have signed it."""
    try:
        doc = strict_json_loads(bundle.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BootstrapError(f"bootstrap bundle refused: {bundle}: unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise BootstrapError(f"bootstrap bundle refused: {bundle}: not a JSON object")
    return doc


def load_bundle_pubkey(path: str | Path) -> Ed25519PublicKey:
    """The offline bundle key's public half: a PEM file, or 64 hex characters."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BootstrapError(f"--bundle-pubkey {path}: unreadable ({exc.strerror})") from None
    text = data.strip()
    try:
        if len(text) == 64:
            return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BootstrapError(f"--bundle-pubkey {path}: not an Ed25519 public key "
                             f"({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BootstrapError(f"--bundle-pubkey {path}: not an Ed25519 public key")
    return key


def verify_bundle(bundle: Path, signer: Ed25519PublicKey) -> BundleDoc:
    """Verify *bundle*'s signature with *signer*, then its content (`BootstrapError`)."""
    try:
        doc = read_signed(bundle, signer)
    except SignatureError as exc:
        raise BootstrapError(f"bootstrap bundle refused: {exc}") from None
    return parse_bundle(doc)


def load(data_dir: Path, *, dev: bool = True,
         bundle_pubkey: Ed25519PublicKey | None = None) -> Bootstrap:
    """Load and verify the bundle in *data_dir*; ``BootstrapError`` with the reason.

    *dev*: whether the CP runs with ``--dev`` (only then is a dev bundle acceptable).
    *bundle_pubkey*: the offline key a production bundle must be signed by.
    """
    bundle = data_dir / BUNDLE
    if not bundle.exists():
        raise BootstrapError(f"no bootstrap bundle at {bundle} (create one with "
                             "`eectl cp bundle create`, or run with --dev)")
    peek = read_unverified(bundle)
    is_dev = peek.get("environment") == "dev"
    if is_dev and not dev:
        raise BootstrapError(f"bootstrap bundle refused: {bundle} is a dev bundle (it trusts "
                             "the sim provider); run with --dev, or create a production "
                             "bundle with `eectl cp bundle create`")
    if not is_dev and bundle_pubkey is None:
        raise BootstrapError(f"bootstrap bundle refused: {bundle} is a production bundle; "
                             "give the public key it was signed with (--bundle-pubkey)")
    key_name = CP_KEY
    if isinstance(peek.get("cp_key"), dict) and isinstance(peek["cp_key"].get("file"), str):
        key_name = peek["cp_key"]["file"]
    if "/" in key_name or key_name.startswith("."):
        raise BootstrapError("bootstrap bundle refused: cp_key.file must name a file in the "
                             "data dir")
    try:
        key = load_private_key(data_dir / key_name)
    except KeyFileError as exc:
        raise BootstrapError(f"cannot load the CP key: {exc}") from None
    if is_dev and peek.get("version") == LEGACY_DEV_VERSION:
        try:
            read_signed(bundle, key.public_key())
        except SignatureError as exc:
            raise BootstrapError(f"bootstrap bundle refused: {exc}") from None
        return _legacy_dev(peek, key)
    signer = key.public_key() if is_dev else bundle_pubkey
    assert signer is not None
    parsed = verify_bundle(bundle, signer)
    if parsed.dev != is_dev:  # cannot happen: the signed document is the peeked one
        raise BootstrapError("bootstrap bundle refused: changed while being read")
    if not hmac.compare_digest(public_key_bytes(key), parsed.cp_public_key):
        raise BootstrapError(f"bootstrap bundle refused: {data_dir / key_name} is not the CP "
                             "key the bundle names (cp_key.public_key)")
    return Bootstrap(
        cluster_id=parsed.cluster_id,
        environment=parsed.environment,
        admin_token_sha256=parsed.admin_token_sha256,
        roots=parsed.roots,
        policy=parsed.policy,
        signing_key=key,
        dev=parsed.dev,
        sim_dir=parsed.sim_dir,
        doc=parsed.doc,
        federation_ca=parsed.federation_ca,
        ek_roots=parsed.ek_roots,
        release_keys=parsed.release_keys,
    )
