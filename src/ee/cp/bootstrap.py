"""The bootstrap bundle: what a CP must trust before it can trust anything else.

``<data-dir>/bootstrap.json`` + ``bootstrap.json.sig`` (detached Ed25519 over the
canonical JSON), signed with the CP key ``<data-dir>/cp.key``. It holds the cluster id,
the CP public key, the trust roots (PEM) that quotes must chain to, the measurement
policy defaults, optional collateral, and the SHA-256 of the admin token (never the
token). A CP refuses to start on a missing, unsigned or tampered bundle, naming which.

``--dev`` creates all of it once (with the sim provider's root trusted, the admin
token written to ``admin.token`` with mode 0600) and reuses it on every restart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.attestation import Policy, PolicyFormatError, load_intel_root
from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    generate_signing_key,
    load_private_key,
    read_signed,
    save_private_key,
    write_signed,
)

BUNDLE = "bootstrap.json"
CP_KEY = "cp.key"
ADMIN_TOKEN = "admin.token"
BUNDLE_VERSION = 1


class BootstrapError(Exception):
    """A bundle that cannot be used; the message is the one-line reason."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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

    def admin_token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token_hash(token), self.admin_token_sha256)


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
    doc = {
        "version": BUNDLE_VERSION,
        "cluster_id": f"dev-{uuid.uuid4().hex[:12]}",
        "environment": "dev",
        "admin_token_sha256": token_hash(token),
        "trust": {
            "roots": [td.root_pem().decode()],
            "policy": _dev_policy(),
            "sim_dir": str(sim_dir),
        },
    }
    write_signed(data_dir / BUNDLE, doc, key)
    token_path = data_dir / ADMIN_TOKEN
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    return token


def load(data_dir: Path) -> Bootstrap:
    """Load and verify the bundle in *data_dir*; ``BootstrapError`` with the reason."""
    bundle = data_dir / BUNDLE
    if not bundle.exists():
        raise BootstrapError(f"no bootstrap bundle at {bundle} (create one with "
                             "`eectl cp bootstrap`, or run with --dev)")
    try:
        key = load_private_key(data_dir / CP_KEY)
    except KeyFileError as exc:
        raise BootstrapError(f"cannot load the CP key: {exc}") from None
    try:
        doc = read_signed(bundle, key.public_key())
    except SignatureError as exc:
        raise BootstrapError(f"bootstrap bundle refused: {exc}") from None
    try:
        if doc.get("version") != BUNDLE_VERSION:
            raise BootstrapError(f"bootstrap bundle version {doc.get('version')!r} is not "
                                 f"{BUNDLE_VERSION}")
        trust = doc["trust"]
        roots = []
        for pem in trust.get("roots") or []:
            roots.append(x509.load_pem_x509_certificate(pem.encode()))
        if trust.get("intel_root", not roots):
            roots.append(load_intel_root())
        policy = Policy.from_json(trust.get("policy", {}))
        return Bootstrap(
            cluster_id=str(doc["cluster_id"]),
            environment=str(doc.get("environment", "production")),
            admin_token_sha256=str(doc["admin_token_sha256"]),
            roots=tuple(roots),
            policy=policy,
            signing_key=key,
            dev=doc.get("environment") == "dev",
            sim_dir=trust.get("sim_dir"),
            doc=doc,
        )
    except BootstrapError:
        raise
    except (KeyError, TypeError, ValueError, PolicyFormatError) as exc:
        raise BootstrapError(f"bootstrap bundle is malformed: {exc!r}") from None
