"""`eectl cp bundle`: create, verify and show a CP bootstrap bundle.

    eectl cp bundle keygen --out PREFIX       PREFIX.key (0600) + PREFIX.pub: the offline
                                              bundle signing key, or the CP's own key
    eectl cp bundle create --signing-key FILE --out DATA_DIR --cluster-id ID
          [--environment production|staging] [--root intel|PEM]... [--policy FILE]
          [--ek-root PEM]... [--release-pubkey FILE]... [--federation-ca PEM]
          [--cp-pubkey FILE]
          [--admin-token-sha256 HEX]
    eectl cp bundle verify DATA_DIR|BUNDLE --pubkey FILE
    eectl cp bundle show DATA_DIR|BUNDLE [--pubkey FILE]

``create`` runs where the offline key lives. The CP's own signing key is named by its
public half (``--cp-pubkey``, from ``keygen`` run on the CP host); without it a new
``cp.key`` is created in the output directory. Without ``--admin-token-sha256`` a
fresh admin token is written to ``admin.token`` (mode 0600) and printed once. The CP
then runs with ``ee-cp --data-dir DATA_DIR --bundle-pubkey OFFLINE.pub``.
Exit codes: 0 done / valid, 1 the bundle is refused, 2 usage or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ee.attestation import PolicyFormatError, load_intel_root
from ee.cp import bootstrap
from ee.cp.bootstrap import BootstrapError
from ee.protocol.signing import (
    KeyFileError,
    generate_signing_key,
    load_private_key,
    load_public_key,
    public_key_bytes,
    save_private_key,
    write_signed,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class _Usage(Exception):
    pass


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = groups.add_parser("cp", help="control plane setup",
                           description="Control plane setup: the bootstrap bundle.")
    cp_commands = cp.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bundle = cp_commands.add_parser(
        "bundle", help="create, verify and show a bootstrap bundle",
        description="The signed bootstrap bundle a production CP starts from: cluster id, "
                    "environment, the CP key, pinned attestation roots, the measurement "
                    "policy and the admin token hash.")
    commands = bundle.add_subparsers(dest="bundle_command", metavar="COMMAND", required=True)

    keygen = commands.add_parser(
        "keygen", help="make an Ed25519 key pair (offline bundle key, or the CP key)",
        description="Write PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (PEM); "
                    "refuses to overwrite.")
    keygen.add_argument("--out", required=True, metavar="PREFIX")
    keygen.set_defaults(handler=keygen_command)

    create = commands.add_parser(
        "create", help="write DATA_DIR/bootstrap.json signed with the offline key",
        description="Write bootstrap.json and bootstrap.json.sig into --out, signed with "
                    "--signing-key. Roots: 'intel' is the Intel SGX Root CA shipped in the "
                    "package (the default); a PEM file names another self-signed CA.")
    create.add_argument("--signing-key", required=True, metavar="FILE",
                        help="the offline Ed25519 private key (PEM)")
    create.add_argument("--out", required=True, metavar="DATA_DIR")
    create.add_argument("--cluster-id", required=True, metavar="ID")
    create.add_argument("--environment", default="production",
                        choices=("production", "staging"))
    create.add_argument("--root", action="append", metavar="intel|PEM",
                        help="a trusted attestation root; repeat (default: intel)")
    create.add_argument("--ek-root", action="append", metavar="PEM",
                        help="a TPM endorsement key CA (self-signed) the tpm provider's "
                             "EK certificates must chain to; repeat (default: none, vTPM "
                             "evidence is refused)")
    create.add_argument("--release-pubkey", action="append", metavar="FILE",
                        help="public half of a release signing key (eectl release keygen): "
                             "the CP admits a release's measurements only when it is signed "
                             "by a pinned key; repeat; named by the file's stem")
    create.add_argument("--policy", metavar="FILE",
                        help="measurement policy JSON (mode, allowlists, node_sizes, "
                             "allowed_tcb_statuses, ...); default: strict, any measurement")
    create.add_argument("--federation-ca", metavar="PEM", help="the cluster's federation CA")
    create.add_argument("--cp-pubkey", metavar="FILE",
                        help="public half of the CP's key (default: create DATA_DIR/cp.key)")
    create.add_argument("--admin-token-sha256", metavar="HEX",
                        help="SHA-256 of the admin token (default: make a token)")
    create.add_argument("--force", action="store_true", help="replace an existing bundle")
    create.set_defaults(handler=create_command)

    verify = commands.add_parser(
        "verify", help="check a bundle's signature and content",
        description="Exit 0 when the bundle is signed by --pubkey and well formed, 1 "
                    "(with the reason) when it is refused, 2 on unreadable input.")
    verify.add_argument("bundle", metavar="DATA_DIR|BUNDLE")
    verify.add_argument("--pubkey", required=True, metavar="FILE",
                        help="the offline key's public half (PEM or hex)")
    verify.set_defaults(handler=verify_command)

    show = commands.add_parser("show", help="print a bundle's content",
                               description="Print what a bundle says; with --pubkey, "
                                           "verify it first.")
    show.add_argument("bundle", metavar="DATA_DIR|BUNDLE")
    show.add_argument("--pubkey", metavar="FILE")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=show_command)


def _bundle_path(text: str) -> Path:
    path = Path(text)
    return path / bootstrap.BUNDLE if path.is_dir() else path


def _roots(specs: list[str] | None) -> list[tuple[str, x509.Certificate]]:
    out = []
    for spec in specs or ["intel"]:
        if spec == "intel":
            out.append((bootstrap.INTEL_ROOT_NAME, load_intel_root()))
            continue
        try:
            cert = x509.load_pem_x509_certificate(Path(spec).read_bytes())
        except (OSError, ValueError) as exc:
            raise _Usage(f"--root {spec}: not a readable PEM certificate ({exc})") from None
        out.append((Path(spec).stem, cert))
    return out


def _ek_roots(paths: list[str] | None) -> list[tuple[str, x509.Certificate]]:
    return [(Path(p).stem, _cert(p, "--ek-root")) for p in paths or []]


def _release_keys(paths: list[str] | None) -> list[tuple[str, Ed25519PublicKey]]:
    return [(Path(p).stem, load_public_key(p)) for p in paths or []]


def _cert(path: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise _Usage(f"{what} {path}: not a readable PEM certificate ({exc})") from None


def _policy(path: str | None) -> dict[str, Any]:
    if path is None:
        return {"mode": "strict"}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise _Usage(f"--policy {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise _Usage(f"--policy {path}: not a JSON object")
    return doc


def _fail(code: int, message: str) -> int:
    print(f"eectl cp bundle: {message}", file=sys.stderr)
    return code


def keygen_command(args: argparse.Namespace) -> int:
    """The release signing key format (PKCS#8 PEM + SubjectPublicKeyInfo PEM)."""
    from ee.ctl.release import keygen_command as release_keygen

    return release_keygen(args)


def create_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    target = out / bootstrap.BUNDLE
    try:
        if target.exists() and not args.force:
            raise _Usage(f"{target} exists (--force replaces it)")
        signer = load_private_key(args.signing_key)
        roots = _roots(args.root)
        ek_roots = _ek_roots(args.ek_root)
        release_keys = _release_keys(args.release_pubkey)
        policy = _policy(args.policy)
        fed = _cert(args.federation_ca, "--federation-ca") if args.federation_ca else None
        out.mkdir(parents=True, exist_ok=True)
        cp_pub: Ed25519PublicKey
        if args.cp_pubkey:
            cp_pub = load_public_key(args.cp_pubkey)
        elif (out / bootstrap.CP_KEY).exists():
            cp_pub = load_private_key(out / bootstrap.CP_KEY).public_key()
        else:
            cp_key = generate_signing_key()
            save_private_key(out / bootstrap.CP_KEY, cp_key)
            cp_pub = cp_key.public_key()
        if public_key_bytes(cp_pub) == public_key_bytes(signer):
            raise _Usage("the CP key must not be the offline bundle signing key")
        token = None
        token_sha = args.admin_token_sha256
        if token_sha is None:
            token = "ee-admin-" + secrets.token_urlsafe(32)
            token_sha = bootstrap.token_hash(token)
        doc = bootstrap.make_bundle(
            cluster_id=args.cluster_id, environment=args.environment, cp_public_key=cp_pub,
            admin_token_sha256=token_sha.lower(), roots=roots, policy=policy,
            federation_ca=fed, ek_roots=ek_roots, release_keys=release_keys)
    except (_Usage, KeyFileError, OSError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except (BootstrapError, PolicyFormatError) as exc:
        return _fail(EXIT_REFUSED, str(exc))
    write_signed(target, doc, signer)
    if token is not None:
        path = out / bootstrap.ADMIN_TOKEN
        path.write_text(token + "\n")
        path.chmod(0o600)
        print(f"admin token (kept in {path}, mode 0600): {token}")
    print(f"wrote {target} (+ .sig): cluster {args.cluster_id}, {args.environment}, "
          f"{len(roots)} root(s), {len(ek_roots)} EK root(s), "
          f"{len(release_keys)} release key(s), "
          f"signer {public_key_bytes(signer).hex()}")
    return EXIT_OK


def verify_command(args: argparse.Namespace) -> int:
    path = _bundle_path(args.bundle)
    try:
        key = bootstrap.load_bundle_pubkey(args.pubkey)
    except BootstrapError as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:
        parsed = bootstrap.verify_bundle(path, key)
    except BootstrapError as exc:
        return _fail(EXIT_REFUSED, str(exc))
    print(f"{path}: signature valid; cluster {parsed.cluster_id}, {parsed.environment}, "
          f"{len(parsed.roots)} root(s)")
    return EXIT_OK


def describe(parsed: bootstrap.BundleDoc) -> dict[str, Any]:
    return {
        "cluster_id": parsed.cluster_id,
        "environment": parsed.environment,
        "created_at": parsed.doc.get("created_at"),
        "cp_public_key": parsed.cp_public_key.hex(),
        "roots": [{"name": e["name"], "sha256": e["sha256"],
                   "subject": c.subject.rfc4514_string()}
                  for e, c in zip(parsed.doc["trust"]["roots"], parsed.roots, strict=True)],
        "ek_roots": [{"name": e["name"], "sha256": e["sha256"],
                      "subject": c.subject.rfc4514_string()}
                     for e, c in zip(parsed.doc["trust"].get("ek_roots", []),
                                     parsed.ek_roots, strict=True)],
        "release_keys": parsed.doc["trust"].get("release_keys", []),
        "policy": parsed.doc["trust"].get("policy", {}),
        "federation_ca": (parsed.federation_ca.subject.rfc4514_string()
                          if parsed.federation_ca is not None else None),
    }


def show_command(args: argparse.Namespace) -> int:
    path = _bundle_path(args.bundle)
    try:
        if args.pubkey:
            parsed = bootstrap.verify_bundle(path, bootstrap.load_bundle_pubkey(args.pubkey))
        else:
            parsed = bootstrap.parse_bundle(bootstrap.read_unverified(path))
    except BootstrapError as exc:
        return _fail(EXIT_REFUSED, str(exc))
    view = describe(parsed)
    view["signature"] = "valid" if args.pubkey else "not checked (give --pubkey)"
    if args.json:
        print(json.dumps(view, indent=1))
        return EXIT_OK
    for key in ("cluster_id", "environment", "created_at", "cp_public_key", "signature"):
        print(f"{key:>14}: {view[key]}")
    for root in view["roots"]:
        print(f"{'root':>14}: {root['name']} sha256 {root['sha256']} ({root['subject']})")
    for root in view["ek_roots"]:
        print(f"{'ek root':>14}: {root['name']} sha256 {root['sha256']} ({root['subject']})")
    print(f"{'policy':>14}: {json.dumps(view['policy'], sort_keys=True)}")
    if view["federation_ca"]:
        print(f"{'federation ca':>14}: {view['federation_ca']}")
    return EXIT_OK
