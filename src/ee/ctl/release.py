"""`eectl release`: build, sign and verify a release.

    eectl release build --out DIR [--source REPO] [--ref REF] [--image IMAGE_DIR]
    eectl release sign DIR (--key FILE | --key-env NAME)
    eectl release verify DIR (--pubkey FILE | --bundle B --bundle-pubkey FILE) [--commit SHA]
    eectl release admit DIR --node-size SIZE --cp URL --token T
    eectl release keygen --out PREFIX          (PREFIX.key, mode 0600, and PREFIX.pub)

A release directory holds the artefacts under ``dist/`` (the wheel and the sdist) and,
when a measured image was given, ``image/`` (its files and its ``manifest.json``); then
``manifest.json``: the package name and version, the git commit, ``source_date_epoch``,
every artefact's SHA-256 and size, and the image's verity root hash and expected
measurements (``image: null`` when there is no image); ``SHA256SUMS`` in
``sha256sum -c`` form; and, after ``sign``, ``manifest.json.sig``: an Ed25519
signature over the canonical JSON of the manifest (``ee.protocol.signing``). The
public half of the signing key is what a verifier pins: given by hand (``--pubkey``), or
the keys a CP bootstrap bundle pins (``trust.release_keys``; ``--bundle`` with the
bundle's own signer, ``--bundle-pubkey``, so the pin itself is verified first). ``admit``
sends a signed release to a CP, which checks it against those same pinned keys and adds
the image's expected measurements to a node size's policy entry (``ee.cp.releases``).

Reproducibility: ``build`` exports the commit with ``git archive`` (so nothing
uncommitted leaks in and every source file carries the commit time) and builds with
``SOURCE_DATE_EPOCH`` set to the commit time. The wheel then comes out byte-identical;
setuptools' sdist does not (its generated ``PKG-INFO``, ``setup.cfg`` and
``*.egg-info`` and the directories it touches carry the build time, and so does the
gzip header), so ``build`` rewrites the sdist with every member's mtime and the gzip
header's set to ``SOURCE_DATE_EPOCH`` — the same bytes in, the same order, only the
timestamps changed. Two builds of one commit with one build backend give the same
manifest.

``verify`` trusts nothing in the directory: artefact names must stay under ``dist/`` or
``image/``, every listed file must exist with its size and hash, no unlisted file may
sit beside them, ``SHA256SUMS`` must say exactly what the manifest says, and the
signature must verify under the pinned key. It prints every difference, one line
each, and exits 1 if there is any. The checks are pure functions of the manifest, the
sums text and the files found (:func:`check_release`).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ee.ctl.client import CtlError, add_cp_options, client_from_args
from ee.protocol.canonical import canonical_json, strict_json_loads
from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    generate_signing_key,
    load_private_key,
    load_public_key,
    public_key_bytes,
    read_signed,
    save_private_key,
    save_public_key,
    write_signed,
)

SCHEMA = "easyenclave-release/1"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
SIGNATURE = MANIFEST + ".sig"
AREAS = ("dist", "image")
EXIT_OK, EXIT_DIFFERS, EXIT_USAGE = 0, 1, 2
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_CHUNK = 1 << 20


class ReleaseError(Exception):
    """A release step cannot go on; ``str`` is one line for the operator."""

    exit_code = EXIT_DIFFERS


class ReleaseUsage(ReleaseError):
    exit_code = EXIT_USAGE


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    release = groups.add_parser(
        "release", help="build, sign and verify a release",
        description="Build a release (wheel, sdist, optional VM image) with a manifest "
                    "and SHA256SUMS, sign the manifest with Ed25519, verify all of it.")
    commands = release.add_subparsers(dest="command", metavar="COMMAND", required=True)

    build = commands.add_parser(
        "build", help="build the artefacts, manifest.json and SHA256SUMS",
        description="Export REF of the git repository with git archive, build the wheel "
                    "and sdist with SOURCE_DATE_EPOCH = the commit time, add the image's "
                    "files when --image is given, and write manifest.json and SHA256SUMS "
                    "into --out (which must not exist or be empty).")
    build.add_argument("--out", required=True, metavar="DIR", help="release directory")
    build.add_argument("--source", default=".", metavar="REPO",
                       help="git repository to build (default: .)")
    build.add_argument("--ref", default="HEAD", metavar="REF",
                       help="commit to build (default: HEAD)")
    build.add_argument("--image", metavar="DIR",
                       help="a measured image directory (its manifest.json: root_hash, "
                            "artifacts; expected measurements from measurements.json)")
    build.add_argument("--no-isolation", action="store_true",
                       help="build with the installed backend (python -m build "
                            "--no-isolation) instead of a fresh one")
    build.set_defaults(handler=build_command)

    sign = commands.add_parser(
        "sign", help="sign manifest.json (Ed25519)",
        description="Check the release directory, then write manifest.json.sig: an "
                    "Ed25519 signature over the manifest's canonical JSON. Prints the "
                    "public key (hex) that verifiers pin.")
    sign.add_argument("dir", metavar="DIR", help="release directory")
    key = sign.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", metavar="FILE", help="PKCS#8 PEM Ed25519 private key")
    key.add_argument("--key-env", metavar="NAME",
                     help="read the PEM private key from environment variable NAME")
    sign.set_defaults(handler=sign_command)

    verify = commands.add_parser(
        "verify", help="check signature, manifest, SHA256SUMS and artefacts",
        description="Verify the signature under the pinned public key, every artefact's "
                    "size and SHA-256, SHA256SUMS and that nothing unlisted is present. "
                    "Exit 0 when all holds, 1 naming each difference, 2 on bad usage.")
    verify.add_argument("dir", metavar="DIR", help="release directory")
    pin = verify.add_mutually_exclusive_group(required=True)
    pin.add_argument("--pubkey", metavar="FILE", help="the pinned Ed25519 public key (PEM)")
    pin.add_argument("--bundle", metavar="DATA_DIR|BUNDLE",
                     help="accept any release key this CP bootstrap bundle pins "
                          "(trust.release_keys); needs --bundle-pubkey")
    verify.add_argument("--bundle-pubkey", metavar="FILE",
                        help="the offline key the bundle is signed with (PEM)")
    verify.add_argument("--commit", metavar="SHA", help="also require this git commit")
    verify.set_defaults(handler=verify_command)

    admit = commands.add_parser(
        "admit", help="admit a signed release's image measurements on a CP",
        description="Send DIR's manifest.json and its signature to the CP (admin "
                    "token). The CP verifies the signature under the release keys its "
                    "bootstrap bundle pins, then adds the image's expected measurements to "
                    "NODE_SIZE's policy entry, so agents booted from that image are "
                    "admitted. Idempotent. Exit 0 admitted (or already), 1 refused.")
    admit.add_argument("dir", metavar="DIR", help="a signed release directory")
    admit.add_argument("--node-size", required=True, metavar="SIZE",
                       help="the node size whose policy entry gains the measurements")
    add_cp_options(admit)
    admit.set_defaults(handler=admit_command)

    keygen = commands.add_parser(
        "keygen", help="make a release signing key pair",
        description="Write PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (PEM); "
                    "refuses to overwrite.")
    keygen.add_argument("--out", required=True, metavar="PREFIX", help="path prefix")
    keygen.set_defaults(handler=keygen_command)


# --- pure: manifest, sums, checks --------------------------------------------------


@attrs.frozen
class FileFacts:
    sha256: str
    size: int


def make_manifest(*, name: str, version: str, commit: str, source_date_epoch: int,
                  artifacts: Mapping[str, FileFacts], image: Mapping[str, Any] | None
                  ) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "git_commit": commit,
        "source_date_epoch": source_date_epoch,
        "artifacts": {path: {"sha256": f.sha256, "size": f.size}
                      for path, f in sorted(artifacts.items())},
        "image": dict(image) if image is not None else None,
    }


def sums_text(artifacts: Mapping[str, FileFacts]) -> str:
    """``sha256sum`` output for the artefacts, sorted by path."""
    return "".join(f"{f.sha256}  {path}\n" for path, f in sorted(artifacts.items()))


def parse_sums(text: str) -> tuple[dict[str, str], list[str]]:
    """``SHA256SUMS`` → (path → hex digest, problems)."""
    sums: dict[str, str] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, path = line.partition("  ")
        if not sep or not _HEX64.match(digest) or not path:
            problems.append(f"{SUMS} line {number}: not '<sha256>  <path>'")
        elif path in sums:
            problems.append(f"{SUMS} line {number}: {path} listed twice")
        else:
            sums[path] = digest
    return sums, problems


def safe_artifact_path(path: str) -> bool:
    """A relative POSIX path under dist/ or image/, with no '..', '.', or empty part."""
    if not path or "\\" in path or "\x00" in path:
        return False
    parts = PurePosixPath(path).parts
    return (len(parts) >= 2 and parts[0] in AREAS and not path.startswith("/")
            and all(p not in ("", ".", "..") for p in parts)
            and "/".join(parts) == path)


def manifest_artifacts(manifest: Mapping[str, Any]) -> tuple[dict[str, FileFacts], list[str]]:
    """The manifest's artefact table, checked for shape; (facts, problems)."""
    problems: list[str] = []
    if manifest.get("schema") != SCHEMA:
        problems.append(f"{MANIFEST}: schema is {manifest.get('schema')!r}, not {SCHEMA!r}")
    for key in ("name", "version", "git_commit"):
        if not isinstance(manifest.get(key), str) or not manifest.get(key):
            problems.append(f"{MANIFEST}: {key} missing or not a string")
    table = manifest.get("artifacts")
    if not isinstance(table, Mapping) or not table:
        return {}, [*problems, f"{MANIFEST}: no artifacts"]
    facts: dict[str, FileFacts] = {}
    for path, entry in table.items():
        if not safe_artifact_path(path):
            problems.append(f"{MANIFEST}: artifact path {path!r} is not under dist/ or image/")
            continue
        sha, size = (entry.get("sha256"), entry.get("size")) if isinstance(
            entry, Mapping) else (None, None)
        if not isinstance(sha, str) or not _HEX64.match(sha) or not isinstance(
                size, int) or isinstance(size, bool) or size < 0:
            problems.append(f"{MANIFEST}: {path}: needs sha256 (64 hex) and size")
            continue
        facts[path] = FileFacts(sha, size)
    return facts, problems


def check_release(manifest: Mapping[str, Any], sums: str | None,
                  found: Mapping[str, FileFacts], *, commit: str | None = None) -> list[str]:
    """Every way the release directory differs from its manifest (empty: it matches).

    *found* is every regular file under dist/ and image/ with its facts; *sums* the
    text of SHA256SUMS (None when missing)."""
    listed, problems = manifest_artifacts(manifest)
    if commit is not None and manifest.get("git_commit") != commit:
        problems.append(f"{MANIFEST}: git_commit is {manifest.get('git_commit')!r}, "
                        f"expected {commit!r}")
    for path, want in sorted(listed.items()):
        have = found.get(path)
        if have is None:
            problems.append(f"{path}: missing")
        elif have.size != want.size:
            problems.append(f"{path}: size {have.size}, manifest says {want.size}")
        elif have.sha256 != want.sha256:
            problems.append(f"{path}: sha256 {have.sha256}, manifest says {want.sha256}")
    for path in sorted(set(found) - set(listed)):
        problems.append(f"{path}: present but not in the manifest")
    if sums is None:
        problems.append(f"{SUMS}: missing")
        return problems
    parsed, sum_problems = parse_sums(sums)
    problems.extend(sum_problems)
    for path, want in sorted(listed.items()):
        if path not in parsed:
            problems.append(f"{SUMS}: {path} not listed")
        elif parsed[path] != want.sha256:
            problems.append(f"{SUMS}: {path} is {parsed[path]}, manifest says {want.sha256}")
    for path in sorted(set(parsed) - set(listed)):
        problems.append(f"{SUMS}: lists {path}, which the manifest does not")
    return problems


def manifest_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What differs between two manifests, by key (artefacts one by one)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if key == "artifacts":
            left, right = dict(a.get(key) or {}), dict(b.get(key) or {})
            for path in sorted(set(left) | set(right)):
                if left.get(path) != right.get(path):
                    out.append(f"artifacts[{path}]: {left.get(path)} != {right.get(path)}")
        elif a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    return out


def image_entry(image_manifest: Mapping[str, Any],
                measurements: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``image`` entry from the image's own manifest.json."""
    root_hash = image_manifest.get("root_hash")
    if not isinstance(root_hash, str) or not root_hash:
        raise ReleaseUsage("image manifest.json has no root_hash")
    if measurements is None:
        embedded = image_manifest.get("measurements")
        measurements = embedded if isinstance(embedded, Mapping) else None
    return {"root_hash": root_hash,
            "measurements": dict(measurements) if measurements is not None else None,
            "source_date_epoch": image_manifest.get("source_date_epoch")}


# --- I/O: hashing, the build, the directory ----------------------------------------


def file_facts(path: Path) -> FileFacts:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileFacts(digest.hexdigest(), size)


def scan(directory: Path) -> dict[str, FileFacts]:
    """Every file under dist/ and image/ (a symlink or other non-regular file is listed
    with an impossible size, so it never matches a manifest entry)."""
    found: dict[str, FileFacts] = {}
    for area in AREAS:
        root = directory / area
        if not root.is_dir() or root.is_symlink():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink() or (not path.is_file() and not path.is_dir()):
                found[rel] = FileFacts("not-a-regular-file", -1)
            elif path.is_file():
                found[rel] = file_facts(path)
    return found


def _run(cmd: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
         what: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, env=dict(env) if env is not None else None,
                              capture_output=True, check=False)
    except OSError as exc:
        raise ReleaseError(f"{what}: cannot run {cmd[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise ReleaseError(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")
    return done.stdout.decode(errors="replace")


def normalize_sdist(path: Path, epoch: int) -> None:
    """Rewrite a .tar.gz with every member's mtime and the gzip header's = *epoch*."""
    with tarfile.open(path, "r:gz") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                   for m in src.getmembers()]
        fmt = src.format
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as dst:
        for member, data in members:
            member.mtime = epoch
            member.pax_headers = {k: v for k, v in member.pax_headers.items()
                                  if k not in ("mtime", "atime", "ctime")}
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=epoch) as gz:
        gz.write(raw.getvalue())
    path.write_bytes(out.getvalue())


def _export(source: Path, ref: str, into: Path) -> tuple[str, int]:
    commit = _run(["git", "-C", str(source), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                  what="git rev-parse").strip()
    epoch = int(_run(["git", "-C", str(source), "log", "-1", "--format=%ct", commit],
                     what="git log").strip())
    archive = subprocess.run(["git", "-C", str(source), "archive", "--format=tar", commit],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise ReleaseError(f"git archive failed: {archive.stderr.decode(errors='replace')}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return commit, epoch


def _project(source: Path) -> tuple[str, str]:
    try:
        project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
        return str(project["name"]), str(project["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ReleaseError(f"cannot read name and version from pyproject.toml: {exc}") from None


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = strict_json_loads(path.read_text())
    except OSError as exc:
        raise ReleaseUsage(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ReleaseUsage(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ReleaseUsage(f"{path}: not a JSON object")
    return doc


def _copy_image(image_dir: Path, out: Path) -> dict[str, Any]:
    image_manifest = _read_json_object(image_dir / MANIFEST, "image manifest")
    files = image_manifest.get("artifacts")
    if not isinstance(files, Mapping):
        raise ReleaseUsage(f"{image_dir / MANIFEST}: no artifacts table")
    (out / "image").mkdir(parents=True)
    for name, entry in sorted(files.items()):
        if not safe_artifact_path(f"image/{name}") or not isinstance(entry, Mapping):
            raise ReleaseUsage(f"{image_dir / MANIFEST}: bad artifact entry {name!r}")
        source = image_dir / name
        if not source.is_file() or source.is_symlink():
            raise ReleaseUsage(f"image artifact {source} missing")
        facts = file_facts(source)
        if facts.sha256 != entry.get("sha256") or facts.size != entry.get("size"):
            raise ReleaseError(f"image artifact {name} does not match the image manifest")
        target = out / "image" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    shutil.copyfile(image_dir / MANIFEST, out / "image" / MANIFEST)
    measurements_file = image_dir / "measurements.json"
    measurements = (_read_json_object(measurements_file, "measurements")
                    if measurements_file.exists() else None)
    return image_entry(image_manifest, measurements)


def build_release(out: Path, *, source: Path, ref: str = "HEAD",
                  image: Path | None = None, isolation: bool = True) -> dict[str, Any]:
    """Build the release into *out*; returns the manifest written there."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseUsage(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ee-release-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        commit, epoch = _export(source, ref, tree)
        name, version = _project(tree)
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
        cmd = [sys.executable, "-m", "build", "--sdist", "--wheel",
               "--outdir", str(out / "dist"), str(tree)]
        if not isolation:
            cmd.insert(3, "--no-isolation")
        _run(cmd, env=env, what="python -m build (pip install build)")
    for sdist in (out / "dist").glob("*.tar.gz"):
        normalize_sdist(sdist, epoch)
    image_doc = _copy_image(image, out) if image is not None else None
    artifacts = scan(out)
    manifest = make_manifest(name=name, version=version, commit=commit,
                             source_date_epoch=epoch, artifacts=artifacts, image=image_doc)
    (out / SUMS).write_text(sums_text(artifacts))
    (out / MANIFEST).write_bytes(canonical_json(manifest) + b"\n")
    return manifest


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        doc = strict_json_loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ReleaseError(f"{path}: missing") from None
    except OSError as exc:
        raise ReleaseError(f"{path}: unreadable ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReleaseError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ReleaseError(f"{path}: not a JSON object")
    return doc


def _read_sums(directory: Path) -> str | None:
    try:
        return (directory / SUMS).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def bundle_release_keys(bundle: Path, bundle_pubkey: Path
                        ) -> list[tuple[str, Ed25519PublicKey]]:
    """The release keys a bundle pins, after verifying the bundle with its signer."""
    from ee.cp import bootstrap

    path = bundle / bootstrap.BUNDLE if bundle.is_dir() else bundle
    try:
        parsed = bootstrap.verify_bundle(path, bootstrap.load_bundle_pubkey(bundle_pubkey))
    except bootstrap.BootstrapError as exc:
        raise ReleaseUsage(f"--bundle: {exc}") from None
    if not parsed.release_keys:
        raise ReleaseUsage(f"--bundle: {path} pins no release key (trust.release_keys)")
    return list(parsed.release_keys)


def verify_release(directory: Path, public_key_file: Path | None, *,
                   commit: str | None = None,
                   keys: list[tuple[str, Ed25519PublicKey]] | None = None) -> list[str]:
    """Every problem with the release directory (signature first); empty when good.
    The signature must verify under *public_key_file*'s key or any of *keys*."""
    if not directory.is_dir():
        raise ReleaseUsage(f"{directory}: not a directory")
    problems = []
    manifest = _read_manifest(directory)
    candidates = list(keys or [])
    if public_key_file is not None:
        try:
            candidates.append((str(public_key_file), load_public_key(public_key_file)))
        except KeyFileError as exc:
            raise ReleaseUsage(str(exc)) from None
    if candidates:
        errors = []
        for _, key in candidates:
            try:
                read_signed(directory / MANIFEST, key)
                break
            except SignatureError as exc:
                errors.append(str(exc))
        else:
            problems.append(f"signature: {errors[0]}" if len(candidates) == 1 else
                            f"signature: no pinned key verifies it "
                            f"({', '.join(name for name, _ in candidates)}): {errors[0]}")
    problems += check_release(manifest, _read_sums(directory), scan(directory),
                              commit=commit)
    return problems


def _private_key(args: argparse.Namespace) -> Ed25519PrivateKey:
    if args.key:
        try:
            return load_private_key(args.key)
        except KeyFileError as exc:
            raise ReleaseUsage(str(exc)) from None
    pem = os.environ.get(args.key_env)
    if not pem:
        raise ReleaseUsage(f"environment variable {args.key_env} is empty or unset")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ReleaseUsage(f"${args.key_env}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseUsage(f"${args.key_env}: not an Ed25519 private key")
    return key


def sign_release(directory: Path, key: Ed25519PrivateKey) -> str:
    """Check the directory (no signature yet), sign the manifest; the public key hex."""
    problems = verify_release(directory, None)
    if problems:
        raise ReleaseError("refusing to sign: " + "; ".join(problems))
    write_signed(directory / MANIFEST, _read_manifest(directory), key)
    return public_key_bytes(key).hex()


# --- handlers ----------------------------------------------------------------------


def _fail(command: str, exc: ReleaseError) -> int:
    print(f"eectl release {command}: {exc}", file=sys.stderr)
    return exc.exit_code


def build_command(args: argparse.Namespace) -> int:
    try:
        manifest = build_release(Path(args.out), source=Path(args.source), ref=args.ref,
                                 image=Path(args.image) if args.image else None,
                                 isolation=not args.no_isolation)
    except ReleaseError as exc:
        return _fail("build", exc)
    for path, facts in manifest["artifacts"].items():
        print(f"{facts['sha256']}  {facts['size']:>10}  {path}")
    if manifest["image"] is None:
        print("no image: this release has no VM image (pass --image DIR to add one)")
    print(f"{manifest['name']} {manifest['version']} at {manifest['git_commit']}: "
          f"{Path(args.out) / MANIFEST}")
    return EXIT_OK


def sign_command(args: argparse.Namespace) -> int:
    try:
        public = sign_release(Path(args.dir), _private_key(args))
    except ReleaseError as exc:
        return _fail("sign", exc)
    print(f"signed {Path(args.dir) / MANIFEST}; public key {public}")
    return EXIT_OK


def verify_command(args: argparse.Namespace) -> int:
    try:
        keys = None
        if args.bundle:
            if not args.bundle_pubkey:
                raise ReleaseUsage("--bundle needs --bundle-pubkey (the bundle's signer)")
            keys = bundle_release_keys(Path(args.bundle), Path(args.bundle_pubkey))
        elif args.bundle_pubkey:
            raise ReleaseUsage("--bundle-pubkey goes with --bundle")
        problems = verify_release(Path(args.dir), Path(args.pubkey) if args.pubkey else None,
                                  commit=args.commit, keys=keys)
    except ReleaseError as exc:
        return _fail("verify", exc)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"eectl release verify: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_DIFFERS
    manifest = _read_manifest(Path(args.dir))
    print(f"OK: {manifest['name']} {manifest['version']} at {manifest['git_commit']}, "
          f"{len(manifest['artifacts'])} artifacts, signature valid")
    return EXIT_OK


def admit_command(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        manifest = _read_manifest(directory)
        sig_path = directory / (MANIFEST + ".sig")
        try:
            signature = sig_path.read_text().strip()
        except OSError as exc:
            raise ReleaseUsage(f"{sig_path}: {exc.strerror or exc} (sign the release "
                               "first: eectl release sign)") from None
    except ReleaseError as exc:
        return _fail("admit", exc)
    try:
        with client_from_args(args) as client:
            answer = client.post("/api/v2/admin/releases", {
                "manifest": manifest, "signature": signature, "node_size": args.node_size})
    except CtlError as exc:
        print(f"eectl release admit: {exc}", file=sys.stderr)
        return exc.exit_code
    release = answer.get("release", {})
    verb = "admitted" if answer.get("admitted") else "already admitted"
    print(f"{verb}: {release.get('name')} {release.get('version')} "
          f"({str(release.get('commit'))[:12]}) for node size {release.get('node_size')}, "
          f"signed by {release.get('key_name')}")
    for register, values in sorted(release.get("measurements", {}).items()):
        print(f"{register:>8}: {', '.join(values)}")
    return EXIT_OK


def keygen_command(args: argparse.Namespace) -> int:
    key = generate_signing_key()
    private, public = Path(args.out + ".key"), Path(args.out + ".pub")
    for path in (private, public):
        if path.exists():
            return _fail("keygen", ReleaseUsage(f"{path} exists; refusing to overwrite"))
    try:
        save_private_key(private, key)
        save_public_key(public, key.public_key())
    except (FileExistsError, OSError) as exc:
        return _fail("keygen", ReleaseUsage(str(exc)))
    print(f"wrote {private} (keep it secret) and {public}; "
          f"public key {public_key_bytes(key).hex()}")
    return EXIT_OK


__all__ = [
    "FileFacts",
    "ReleaseError",
    "build_release",
    "check_release",
    "image_entry",
    "make_manifest",
    "manifest_differences",
    "normalize_sdist",
    "parse_sums",
    "register",
    "safe_artifact_path",
    "sign_release",
    "sums_text",
    "verify_release",
]
