"""The control plane's container image (what a CP VM's ``ee-cp-vm`` runs), built locally.

Theory of operation
-------------------
A CP VM runs one container: ``ee-cp`` from an image named by digest on its measured
cmdline. That image is built here with no registry but the loopback one:

1. **rootfs** — ``debootstrap --variant=minbase`` of bookworm with ``python3`` (3.11)
   and ``ca-certificates`` only, through the measured-image build's own cached step
   (:func:`ee.image.build.step_rootfs`, in a ``cp-container`` sub-cache so it never
   evicts the VM images' rootfs).
2. **python** — this checkout's ``ee`` wheel and its dependencies (the VM image's wheel
   cache), installed in the profile's site dir with entry scripts in /usr/local/bin
   (:func:`ee.image.build.step_python`), then normalised (docs, apt lists, logs gone).
3. **import** — ``docker import`` of a sorted, owner-normalised tar of that tree, tagged
   ``ee-cp:<input hash>``; the hash covers the rootfs key, the checkout's ``src/`` and
   ``pyproject.toml`` and this builder's version, so an unchanged checkout is not
   rebuilt.
4. **push** — to the loopback registry (``127.0.0.1:5000``, Debian's docker-registry);
   the manifest digest it returns is the image's name: ``127.0.0.1:5000/ee-cp@sha256:…``
   on the host, ``10.0.2.2:5000/ee-cp@sha256:…`` inside a VM under QEMU user networking.

``python -m ee.vm.cpimage`` (or ``tools/images/build_cp_image.sh``) prints both names,
the guest's last, so ``REF=$(tools/images/build_cp_image.sh | tail -1)`` works.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

from ee.image.build import (
    Progress,
    _apt_mirror,
    _epoch,
    _release_digest,
    _run,
    check_tools,
    default_cache_dir,
    rootfs_key,
    step_normalise,
    step_python,
    step_rootfs,
)
from ee.image.errors import BuildFailed, ToolMissing
from ee.image.profile import Profile, checkout_root, load_profile

__all__ = ["GUEST_REGISTRY", "HOST_REGISTRY", "build_cp_image", "container_profile",
           "guest_ref", "input_hash"]

HOST_REGISTRY = "127.0.0.1:5000"
GUEST_REGISTRY = "10.0.2.2:5000"
REPOSITORY = "ee-cp"
#: bump when what the builder does changes (it is part of the input hash)
BUILDER_VERSION = "1"
PACKAGES = ("python3", "ca-certificates")


def container_profile() -> Profile:
    """The cp profile cut down to what a container needs (no kernel, systemd, Docker)."""
    cp = load_profile("cp")
    return attrs.evolve(cp, name="cp-container", packages=PACKAGES,
                        empty_dirs=("tmp", "var/tmp", "data"), symlinks={})


def _tree_hash(checkout: Path) -> str:
    h = hashlib.sha256()
    paths = [checkout / "pyproject.toml", checkout / "README.md",
             *(p for p in sorted((checkout / "src").rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
               and p.suffix != ".pyc")]
    for path in paths:
        h.update(path.relative_to(checkout).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def input_hash(rootfs: str, checkout: Path) -> str:
    """The image's cache key: the rootfs key, the checkout's source, this builder."""
    doc = {"rootfs": rootfs, "source": _tree_hash(checkout), "builder": BUILDER_VERSION,
           "packages": list(PACKAGES)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def guest_ref(host_ref: str) -> str:
    """The name a VM under user networking pulls *host_ref* by."""
    if not host_ref.startswith(HOST_REGISTRY + "/"):
        raise ValueError(f"{host_ref!r} is not in the loopback registry {HOST_REGISTRY}")
    return GUEST_REGISTRY + host_ref[len(HOST_REGISTRY):]


def _docker(*argv: str, stdin: bytes | None = None) -> str:
    try:
        done = subprocess.run(["docker", *argv], input=stdin, capture_output=True,
                              timeout=900, check=False)
    except FileNotFoundError:
        raise ToolMissing(["docker"], ["docker.io"]) from None
    if done.returncode != 0:
        raise BuildFailed("docker", f"docker {' '.join(argv[:2])}: "
                          f"{done.stderr.decode(errors='replace').strip()[-600:]}")
    return done.stdout.decode()


def _has_image(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                          timeout=60, check=False).returncode == 0


def _import(rootfs: Path, tag: str, epoch: int) -> None:
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "--sort=name", "--numeric-owner", "--owner=0",
         "--group=0", f"--mtime=@{epoch}", "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        done = subprocess.run(
            ["docker", "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV PYTHONDONTWRITEBYTECODE=1",
             "--change", 'CMD ["ee-cp", "--help"]',
             "--message", "easyenclave control plane", "-", tag],
            stdin=tar.stdout, capture_output=True, timeout=900, check=False)
    finally:
        tar.stdout.close()
        tar.wait(timeout=60)
    if done.returncode != 0 or tar.returncode != 0:
        raise BuildFailed("import", done.stderr.decode(errors="replace").strip()[-600:])


def build_cp_image(cache: Path, progress: Progress, *, push: bool = True) -> str:
    """Build (or find) the CP image; returns ``127.0.0.1:5000/ee-cp@sha256:…`` (pushed),
    or the local tag when *push* is False."""
    check_tools({"debootstrap": "debootstrap", "chroot": "coreutils", "tar": "tar",
                 "docker": "docker.io"})
    checkout = checkout_root()
    profile = container_profile()
    epoch = _epoch(checkout)
    sub = cache / "cp-container"
    sub.mkdir(parents=True, exist_ok=True)
    with progress.step("inputs"):
        mirror = _apt_mirror(profile.suite)
        version = _run("rootfs", ["debootstrap", "--version"]).strip()
        key = rootfs_key(profile, mirror, _release_digest(mirror, profile.suite), version)
        tag = f"{REPOSITORY}:{input_hash(key, checkout)}"
    if _has_image(tag):
        progress.note(f"cp image: cached ({tag})")
    else:
        work = Path(tempfile.mkdtemp(dir=sub, prefix=".work-"))
        try:
            rootfs = work / "root"
            step_rootfs(profile, mirror, sub, rootfs, epoch, progress)
            with progress.step("python", "ee wheel + dependencies"):
                step_python(profile, checkout, cache, rootfs, work, epoch)
            step_normalise(profile, rootfs, epoch)
            with progress.step("docker import", tag):
                _import(rootfs, tag, epoch)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not push:
        return tag
    remote = f"{HOST_REGISTRY}/{tag}"
    with progress.step("push", remote):
        _docker("tag", tag, remote)
        _docker("push", remote)
        digests = json.loads(_docker("image", "inspect", "--format",
                                     "{{json .RepoDigests}}", remote))
    prefix = f"{HOST_REGISTRY}/{REPOSITORY}@sha256:"
    found = [d for d in digests or [] if d.startswith(prefix)]
    if not found:
        raise BuildFailed("push", f"the registry returned no digest for {remote}: {digests}")
    return str(found[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_cp_image", description="Build the CP container image and push it to "
        f"the loopback registry ({HOST_REGISTRY}); prints the host's and the guest's name.")
    parser.add_argument("--cache", metavar="DIR", help="default ~/.cache/easyenclave/image")
    parser.add_argument("--no-push", action="store_true", help="build and tag only")
    args = parser.parse_args(argv)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    try:
        ref = build_cp_image(cache, Progress(sys.stderr), push=not args.no_push)
    except (BuildFailed, ToolMissing) as exc:
        print(f"build_cp_image: {exc}", file=sys.stderr)
        return 1
    print(ref)
    if not args.no_push:
        print(guest_ref(ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
