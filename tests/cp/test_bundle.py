"""The production bootstrap bundle: `eectl cp bundle` and what `ee.cp.bootstrap.load`
refuses (unsigned, tampered, other signer, unknown fields, roots that are not pinned
self-signed CAs, a dev bundle without --dev, a CP key the bundle does not name)."""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ee.attestation import load_intel_root
from ee.attestation.providers.sim import SimTD
from ee.attestation.tpm import TpmVerifier
from ee.cp import bootstrap
from ee.cp.bootstrap import BootstrapError, fingerprint, load, load_bundle_pubkey
from ee.ctl import cpbundle
from ee.protocol.signing import (
    generate_signing_key,
    load_private_key,
    save_private_key,
    write_signed,
)

INTEL_FP = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"


def eectl_cp(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="eectl")
    cpbundle.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["cp", *argv])
    code: int = args.handler(args)
    return code


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Path]:
    """(data dir with an Intel-pinned production bundle, offline public key)."""
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    data = tmp_path / "cp"
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(data), "--cluster-id", "c1") == 0
    return data, tmp_path / "offline.pub"


def resign(data: Path, tmp: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the bundle and sign it again with the genuine offline key."""
    doc = json.loads((data / "bootstrap.json").read_text())
    change(doc)
    write_signed(data / "bootstrap.json", doc, load_private_key(tmp / "offline.key"))


def refused(data: Path, pub: Path, text: str, **kw: Any) -> None:
    with pytest.raises(BootstrapError, match=text) as exc:
        load(data, dev=kw.get("dev", False), bundle_pubkey=load_bundle_pubkey(pub))
    assert "\n" not in str(exc.value)


def test_created_bundle_pins_intel_and_loads(made: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data, pub = made
    boot = load(data, dev=False, bundle_pubkey=load_bundle_pubkey(pub))
    assert not boot.dev and boot.environment == "production" and boot.cluster_id == "c1"
    assert [fingerprint(r) for r in boot.roots] == [INTEL_FP]
    assert fingerprint(load_intel_root()) == INTEL_FP
    token = (data / "admin.token").read_text().strip()
    assert boot.admin_token_ok(token) and (data / "admin.token").stat().st_mode & 0o077 == 0
    assert eectl_cp("bundle", "verify", str(data), "--pubkey", str(pub)) == 0
    capsys.readouterr()
    assert eectl_cp("bundle", "show", str(data), "--pubkey", str(pub), "--json") == 0
    view = json.loads(capsys.readouterr().out)
    assert view["roots"][0]["sha256"] == INTEL_FP and view["signature"] == "valid"
    # The public key may also be given as hex.
    hexkey = data.parent / "offline.hex"
    hexkey.write_text(load_bundle_pubkey(pub).public_bytes_raw().hex())
    assert load(data, dev=False, bundle_pubkey=load_bundle_pubkey(hexkey)).cluster_id == "c1"


def test_tampered_unsigned_and_other_signer_are_refused(made: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    data, pub = made
    doc = json.loads((data / "bootstrap.json").read_text())
    doc["trust"]["policy"]["mode"] = "disabled"
    (data / "bootstrap.json").write_text(json.dumps(doc))
    refused(data, pub, "bad signature")
    assert eectl_cp("bundle", "verify", str(data), "--pubkey", str(pub)) == 1
    (data / "bootstrap.json.sig").unlink()
    refused(data, pub, "signature missing")
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "other")) == 0
    resign(data, tmp_path, lambda d: None)
    refused(data, tmp_path / "other.pub", "bad signature")
    with pytest.raises(BootstrapError, match="--bundle-pubkey"):
        load(data, dev=False, bundle_pubkey=None)
    with pytest.raises(BootstrapError, match="--bundle-pubkey"):
        load(data, dev=True, bundle_pubkey=None)  # --dev does not lift the pin


@pytest.mark.parametrize(("change", "text"), [
    (lambda d: d.update(extra=1), "bundle: unknown fields: extra"),
    (lambda d: d["trust"].update(collateral={}), "bundle.trust: unknown fields: collateral"),
    (lambda d: d["trust"]["roots"][0].update(note="x"), r"roots\[0\]: unknown fields: note"),
    (lambda d: d["trust"]["policy"].update(modes="x"), "unknown policy fields"),
    (lambda d: d.update(format="ee/v2/bootstrap/9"), "bundle.format"),
    (lambda d: d.update(environment="dev"), "dev bundle"),
    (lambda d: d["trust"].update(roots=[]), "at least one root"),
    (lambda d: d["trust"]["roots"][0].update(sha256="00" * 32), "is not the pinned"),
    (lambda d: d["admin"].update(token_sha256="abc"), "token_sha256: must be 32 bytes"),
])
def test_malformed_bundles_are_refused(made: tuple[Path, Path], tmp_path: Path,
                                       change: Callable[[dict[str, Any]], None],
                                       text: str) -> None:
    data, pub = made
    resign(data, tmp_path, change)
    refused(data, pub, text)


def test_roots_must_be_pinned_self_signed_cas(made: tuple[Path, Path], tmp_path: Path) -> None:
    data, pub = made
    td = SimTD.create()
    leaf = td.chain.pck_cert  # not a CA
    ca = td.chain.pck_ca_cert  # a CA, but not self-signed

    def put(cert: Any, name: str = "x") -> Callable[[dict[str, Any]], None]:
        entry = {"name": name, "sha256": fingerprint(cert),
                 "pem": cert.public_bytes(Encoding.PEM).decode()}
        return lambda d: d["trust"].update(roots=[entry])

    resign(data, tmp_path, put(leaf))
    refused(data, pub, "is not a CA certificate")
    resign(data, tmp_path, put(ca))
    refused(data, pub, "is not self-signed")
    resign(data, tmp_path, put(td.root_cert, bootstrap.INTEL_ROOT_NAME))
    refused(data, pub, "names the Intel SGX Root CA but is another")
    resign(data, tmp_path, put(td.root_cert, "test-root"))  # a genuine self-signed CA
    boot = load(data, dev=False, bundle_pubkey=load_bundle_pubkey(pub))
    assert [fingerprint(r) for r in boot.roots] == [fingerprint(td.root_cert)]
    # The CLI refuses a non-CA root when creating.
    pem = tmp_path / "leaf.pem"
    pem.write_bytes(leaf.public_bytes(Encoding.PEM))
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(tmp_path / "new"), "--cluster-id", "c2",
                    "--root", str(pem)) == 1


def test_cp_key_must_be_the_one_named(made: tuple[Path, Path]) -> None:
    data, pub = made
    (data / "cp.key").unlink()
    save_private_key(data / "cp.key", generate_signing_key())
    refused(data, pub, "is not the CP key the bundle names")


def test_dev_bundle_only_with_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EE_SIM_DIR", str(tmp_path / "sim"))
    data = tmp_path / "cp"
    bootstrap.create_dev(data)
    with pytest.raises(BootstrapError, match="is a dev bundle"):
        load(data, dev=False)
    boot = load(data, dev=True)
    assert boot.dev and boot.doc["environment"] == "dev" and boot.sim_dir is not None
    # A dev bundle is signed by the CP key: re-signing it as "production" with that key
    # does not make it a production bundle a CP accepts without the offline key.
    doc = json.loads((data / "bootstrap.json").read_text())
    doc["environment"], doc["dev"] = "production", None
    write_signed(data / "bootstrap.json", doc, load_private_key(data / "cp.key"))
    with pytest.raises(BootstrapError, match="--bundle-pubkey"):
        load(data, dev=False)


def test_ek_roots_are_pinned_from_the_cli(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--ek-root PEM`` (repeatable) pins TPM EK CAs into ``trust.ek_roots``; a bundle
    without it trusts none (the CP then refuses vTPM evidence); a non-CA, a CA that is
    not self-signed, or an unreadable file is refused at creation."""
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    key, pub = tmp_path / "offline.key", tmp_path / "offline.pub"
    td, other = SimTD.create(), SimTD.create()
    pems = []
    for name, cert in (("vendor-a", td.root_cert), ("vendor-b", other.root_cert),
                       ("leaf", td.chain.pck_cert), ("intermediate", td.chain.pck_ca_cert)):
        pems.append(tmp_path / f"{name}.pem")
        pems[-1].write_bytes(cert.public_bytes(Encoding.PEM))

    def create(out: str, *extra: str) -> int:
        return eectl_cp("bundle", "create", "--signing-key", str(key), "--out",
                        str(tmp_path / out), "--cluster-id", "c1", *extra)

    assert create("plain") == 0
    assert load(tmp_path / "plain", dev=False, bundle_pubkey=load_bundle_pubkey(pub)
                ).ek_roots == ()
    assert create("tpm", "--ek-root", str(pems[0]), "--ek-root", str(pems[1])) == 0
    boot = load(tmp_path / "tpm", dev=False, bundle_pubkey=load_bundle_pubkey(pub))
    assert [fingerprint(c) for c in boot.ek_roots] == [fingerprint(td.root_cert),
                                                        fingerprint(other.root_cert)]
    assert [fingerprint(r) for r in boot.roots] == [INTEL_FP]  # --root is independent
    entries = json.loads((tmp_path / "tpm" / "bootstrap.json").read_text())["trust"]["ek_roots"]
    assert [e["name"] for e in entries] == ["vendor-a", "vendor-b"]
    capsys.readouterr()
    assert eectl_cp("bundle", "show", str(tmp_path / "tpm"), "--pubkey", str(pub),
                    "--json") == 0
    view = json.loads(capsys.readouterr().out)
    assert [r["sha256"] for r in view["ek_roots"]] == [e["sha256"] for e in entries]
    # A pinned EK root swapped for another CA after signing does not load.
    resign(tmp_path / "tpm", tmp_path,
           lambda d: d["trust"]["ek_roots"][0].update(
               pem=other.root_cert.public_bytes(Encoding.PEM).decode()))
    refused(tmp_path / "tpm", pub, r"ek_roots\[0\] \(vendor-a\): fingerprint")
    assert create("leaf", "--ek-root", str(pems[2])) == 1
    assert create("mid", "--ek-root", str(pems[3])) == 1
    assert not (tmp_path / "leaf" / "bootstrap.json").exists()
    assert create("missing", "--ek-root", str(tmp_path / "nope.pem")) == 2
    capsys.readouterr()
    assert create("garbage", "--ek-root", str(key)) == 2  # a key, not a certificate
    assert "--ek-root" in capsys.readouterr().err


def _self_signed_ca(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *,
                    signer: rsa.RSAPrivateKey | None = None) -> x509.Certificate:
    """A self-signed CA certificate for *key* (signed by *signer* instead: a self-signature
    that does not verify)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EE test EK vendor CA")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(signer or key, hashes.SHA256()))


@pytest.fixture(scope="module")
def rsa_root() -> x509.Certificate:
    return _self_signed_ca(rsa.generate_private_key(65537, 2048))


def test_rsa_ek_root_is_accepted(tmp_path: Path, rsa_root: x509.Certificate) -> None:
    """TPM vendors' EK CAs are often RSA: an RSA EK root (PKCS#1 v1.5 self-signature)
    is pinned by the CLI, loads, and makes a TpmVerifier."""
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    pem = tmp_path / "vendor-rsa.pem"
    pem.write_bytes(rsa_root.public_bytes(Encoding.PEM))
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(tmp_path / "cp"), "--cluster-id", "c1",
                    "--ek-root", str(pem)) == 0
    boot = load(tmp_path / "cp", dev=False,
                bundle_pubkey=load_bundle_pubkey(tmp_path / "offline.pub"))
    assert [fingerprint(c) for c in boot.ek_roots] == [fingerprint(rsa_root)]
    assert TpmVerifier(boot.ek_roots).ek_roots == boot.ek_roots


def test_rsa_attestation_root_is_refused(made: tuple[Path, Path], tmp_path: Path,
                                         rsa_root: x509.Certificate) -> None:
    """Attestation roots stay ECDSA-only (Intel's are P-256): an RSA root in
    ``trust.roots`` (or the federation CA) is refused, from the CLI and in a bundle."""
    data, pub = made
    entry = {"name": "rsa", "sha256": fingerprint(rsa_root),
             "pem": rsa_root.public_bytes(Encoding.PEM).decode()}
    resign(data, tmp_path, lambda d: d.update(federation_ca=entry))
    refused(data, pub, r"federation_ca \(rsa\).*not an ECDSA key")
    resign(data, tmp_path, lambda d: d.update(federation_ca=None))
    resign(data, tmp_path, lambda d: d["trust"].update(roots=[entry]))
    refused(data, pub, r"roots\[0\] \(rsa\).*not an ECDSA key \(attestation roots")
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(rsa_root.public_bytes(Encoding.PEM))
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(tmp_path / "new"), "--cluster-id", "c2",
                    "--root", str(pem)) == 1
    assert not (tmp_path / "new" / "bootstrap.json").exists()


def test_weak_or_forged_rsa_ek_roots_are_refused(made: tuple[Path, Path], tmp_path: Path,
                                                  rsa_root: x509.Certificate) -> None:
    """An RSA EK root must be at least 2048 bits and its self-signature must verify."""
    data, pub = made
    small = _self_signed_ca(rsa.generate_private_key(65537, 1024))
    forged = _self_signed_ca(rsa.generate_private_key(65537, 2048),
                             signer=rsa.generate_private_key(65537, 2048))
    for cert, text in ((small, "an RSA key of 1024 bits"),
                       (forged, "its self-signature does not verify")):
        entry = {"name": "vendor", "sha256": fingerprint(cert),
                 "pem": cert.public_bytes(Encoding.PEM).decode()}
        resign(data, tmp_path, lambda d, e=entry: d["trust"].update(ek_roots=[e]))
        refused(data, pub, rf"ek_roots\[0\] \(vendor\).*{text}")
    entry = {"name": "vendor", "sha256": fingerprint(rsa_root),
             "pem": rsa_root.public_bytes(Encoding.PEM).decode()}
    resign(data, tmp_path, lambda d: d["trust"].update(ek_roots=[entry]))
    boot = load(data, dev=False, bundle_pubkey=load_bundle_pubkey(pub))
    assert boot.ek_roots == (rsa_root,)
