"""Build the measured VM image: vmlinuz, initrd.img, root.img (squashfs + verity), cmdline.

Theory of operation
-------------------

A build is a straight line of small steps over one work directory; every step is a
function of its inputs, so two builds of the same checkout and profile give the same
bytes (``eectl trust reproducibility-check`` proves it):

1. **rootfs** — ``debootstrap`` of the profile's suite and packages from the mirror the
   machine's apt uses. This is the slow step, so its result is cached under
   ``<cache>/rootfs-<key>``, the key a hash of everything it depends on (suite, variant,
   components, packages, mirror, debootstrap version).
2. **kernel** — the newest Debian kernel package matching the profile (6.12 backport:
   TDX guest support), fetched with ``apt-get download`` and checked against the sha256
   apt knows; vmlinuz is taken as is and a subset of its modules goes to the root.
3. **python** — a wheel of the ``ee`` package built from this checkout and its
   dependencies as binary wheels (cached per requirement set), installed with
   ``--target`` into the profile's site directory, compiled in the chroot to
   unchecked-hash pycs (no timestamps), with small entry scripts in /usr/local/bin.
4. **configure** — the ``image/rootfs`` overlay (units, scripts), Docker's daemon.json
   (``ee/agent/dockerd.json`` + data root on /data), the ``dockremap`` user, units
   enabled/masked as symlinks, symlinks into /data.
5. **normalise** — logs, caches and docs removed, machine-id emptied, shadow's
   last-change days set from SOURCE_DATE_EPOCH.
6. **root.img** — ``mksquashfs`` with every time set to SOURCE_DATE_EPOCH, padded to
   4 KiB, then ``veritysetup format --no-superblock`` with a fixed salt appends the hash
   tree; the root hash, salt, data block count and hash start go on the cmdline.
7. **initrd.img** — busybox, dmsetup and its libraries, the modules dm-verity needs and
   ``image/initramfs/init``, as a sorted cpio.
8. **manifest.json** — root hash, each artefact's sha256 and size, the epoch, the
   packages; ``rootfs.files`` lists every file of the root (hash, mode, owner, path) so
   a reproducibility failure can name the files that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import attrs

from ee.image.errors import BuildFailed, ToolMissing
from ee.image.initramfs import (
    CpioEntry,
    module_closure,
    parse_modules_dep,
    read_module,
    resolve_in_root,
    write_cpio,
)
from ee.image.manifest import Artefact, Manifest, diff_file_lists, sha256_file
from ee.image.profile import Profile, checkout_root

__all__ = [
    "BUILD_TOOLS",
    "BuildOptions",
    "BuildResult",
    "Progress",
    "build_image",
    "check_tools",
    "default_cache_dir",
    "mirror_from_sources",
    "reproducibility_check",
]

#: host tool -> Debian package that provides it
BUILD_TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "mksquashfs": "squashfs-tools",
    "veritysetup": "cryptsetup-bin",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "chroot": "coreutils",
}
ARTEFACTS = ("vmlinuz", "initrd.img", "root.img", "cmdline", "rootfs.files")
BLOCK = 4096


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "easyenclave" / "image"


def check_tools(tools: dict[str, str] = BUILD_TOOLS) -> None:
    """ToolMissing naming every absent tool and the packages that provide them."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ToolMissing(missing, [tools[t] for t in missing])


class Progress:
    """One line per step on the terminal, with how long it took."""

    def __init__(self, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.timings: dict[str, float] = {}

    def note(self, message: str) -> None:
        print(f"image: {message}", file=self.out, flush=True)

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        self.note(f"{name}{' (' + detail + ')' if detail else ''} ...")
        start = self.clock()
        yield
        took = self.clock() - start
        self.timings[name] = took
        self.note(f"{name} done in {took:.1f}s")


@attrs.frozen
class BuildOptions:
    out: Path
    cache: Path
    source_date_epoch: int | None = None
    keep_rootfs: bool = False


@attrs.frozen
class BuildResult:
    out: Path
    manifest: Manifest
    timings: dict[str, float]
    rootfs: Path | None


# --- subprocesses -------------------------------------------------------------------


def _run(step: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, env=env, cwd=cwd, check=False)
    except OSError as exc:
        raise BuildFailed(step, f"{argv[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise BuildFailed(step, f"{' '.join(argv[:3])} ... exited {result.returncode}: {tail}")
    return result.stdout


def _clean_env(epoch: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C.UTF-8", TZ="UTC", SOURCE_DATE_EPOCH=str(epoch), PYTHONHASHSEED="0",
               DEBIAN_FRONTEND="noninteractive")
    return env


# --- inputs -------------------------------------------------------------------------


def mirror_from_sources(texts: Sequence[str], suite: str) -> str | None:
    """The first ``deb`` URI that serves *suite* with ``main`` (deb822 or one-line form)."""
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if ("deb" in fields.get("types", "").split() and suite in
                    fields.get("suites", "").split() and "main" in
                    fields.get("components", "").split() and fields.get("uris")):
                return fields["uris"].split()[0].rstrip("/")
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == suite and \
                    "main" in words[3:]:
                return words[1].rstrip("/")
    return None


def _apt_mirror(suite: str) -> str:
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    texts = [p.read_text(errors="replace") for p in paths
             if p.is_file() and p.suffix in (".list", ".sources")]
    mirror = mirror_from_sources(texts, suite)
    if mirror is None:
        raise BuildFailed("inputs", f"no apt source for {suite} main in /etc/apt")
    return mirror


@attrs.frozen
class DebRef:
    name: str
    version: str
    sha256: str


def _apt_show(name: str) -> DebRef:
    text = _run("inputs", ["apt-cache", "show", "--no-all-versions", name])
    fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", text, re.M))
    if "Version" not in fields or "SHA256" not in fields:
        raise BuildFailed("inputs", f"apt knows no downloadable {name}")
    return DebRef(name, fields["Version"], fields["SHA256"])


def _resolve_kernel(regex: str) -> DebRef:
    pattern = re.compile(regex)
    names = [n for n in _run("inputs", ["apt-cache", "pkgnames", "linux-image-"]).split()
             if pattern.match(n)]
    if not names:
        raise BuildFailed("inputs", f"no kernel package matches {regex} (apt-get update?)")

    def version_key(name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", name))

    return _apt_show(max(names, key=version_key))


def _fetch_deb(ref: DebRef, cache: Path) -> Path:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for path in debs.glob(f"{ref.name}_*.deb"):
        if sha256_file(path) == ref.sha256:
            return path
    _run("fetch", ["apt-get", "download", f"{ref.name}={ref.version}"], cwd=debs)
    for path in debs.glob(f"{ref.name}_*.deb"):
        if sha256_file(path) == ref.sha256:
            return path
    raise BuildFailed("fetch", f"{ref.name} {ref.version}: no file with sha256 {ref.sha256}")


def _extract_deb(deb: Path, cache: Path, sha256: str) -> Path:
    dest = cache / f"deb-{sha256[:24]}"
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".deb-"))
        _run("fetch", ["dpkg-deb", "-x", str(deb), str(tmp)])
        tmp.rename(dest)
    return dest


def _epoch(root: Path) -> int:
    try:
        out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%ct"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 1_700_000_000


# --- steps --------------------------------------------------------------------------


def _release_digest(mirror: str, suite: str) -> str:
    """sha256 of the suite's InRelease: the package versions debootstrap will get."""
    url = f"{mirror}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return hashlib.sha256(response.read(4 << 20)).hexdigest()
    except (OSError, ValueError) as exc:
        raise BuildFailed("inputs", f"cannot read {url} ({exc})") from None


def rootfs_key(profile: Profile, mirror: str, release: str, debootstrap_version: str) -> str:
    """The debootstrap stage's cache key: a hash of everything its output depends on."""
    doc = {"suite": profile.suite, "variant": profile.variant,
           "components": sorted(profile.components), "packages": sorted(profile.packages),
           "mirror": mirror, "release": release, "debootstrap": debootstrap_version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _prune(cache: Path, prefix: str, keep: Path, limit: int = 2) -> None:
    """Keep the cache bounded: at most *limit* entries of a kind, the newest used."""
    entries = sorted((p for p in cache.glob(f"{prefix}*") if p != keep and p.is_dir()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[limit - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def step_rootfs(profile: Profile, mirror: str, cache: Path, dest: Path, epoch: int,
                progress: Progress) -> None:
    version = _run("rootfs", ["debootstrap", "--version"]).strip()
    key = rootfs_key(profile, mirror, _release_digest(mirror, profile.suite), version)
    cached = cache / f"rootfs-{key}"
    if not cached.is_dir():
        with progress.step("debootstrap", f"{profile.suite}, {len(profile.packages)} packages, "
                           f"{mirror}; minutes"):
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".rootfs-"))
            try:
                _run("debootstrap", [
                    "debootstrap", f"--variant={profile.variant}",
                    f"--components={','.join(profile.components)}",
                    f"--include={','.join(profile.packages)}",
                    profile.suite, str(tmp / "root"), mirror], env=_clean_env(epoch))
                (tmp / "root").rename(cached)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        progress.note(f"debootstrap: cached ({cached.name})")
        os.utime(cached)
    _prune(cache, "rootfs-", cached)
    with progress.step("copy rootfs"):
        _run("rootfs", ["cp", "-a", str(cached), str(dest)])


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def step_kernel(profile: Profile, ref: DebRef, cache: Path, rootfs: Path) -> tuple[Path, Path]:
    """(vmlinuz, module tree) of the kernel; the profile's modules copied into the root."""
    tree = _extract_deb(_fetch_deb(ref, cache), cache, ref.sha256)
    boot = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(boot) != 1:
        raise BuildFailed("kernel", f"{ref.name}: expected one vmlinuz, found {len(boot)}")
    release = boot[0].name.removeprefix("vmlinuz-")
    modules = tree / "lib" / "modules" / release
    if not (modules / "modules.dep").exists():
        _run("kernel", ["depmod", "-b", str(tree), release])
    target = rootfs / "usr" / "lib" / "modules" / release
    for top in profile.kernel.rootfs_modules:
        # an exclusion wider than *top* does not apply to it: "kernel/drivers/net/ethernet"
        # excluded, "kernel/drivers/net/ethernet/google" listed -> gve is copied
        excluded = tuple(e for e in profile.kernel.rootfs_modules_exclude
                         if not _under(top, e))
        for src in sorted((modules / top).rglob("*")):
            rel = src.relative_to(modules).as_posix()
            if src.is_dir() or any(_under(rel, e) for e in excluded):
                continue
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copyfile(modules / name, target / name)
    _run("kernel", ["depmod", "-b", str(rootfs), release])
    return boot[0], modules


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return sorted(line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("Requires-Dist:") and "extra ==" not in line)


def step_python(profile: Profile, checkout: Path, cache: Path, rootfs: Path, work: Path,
                epoch: int) -> list[tuple[str, str]]:
    env = _clean_env(epoch)
    src = work / "ee-src"
    shutil.copytree(checkout / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(checkout / name, src / name)
    wheels = work / "ee-wheel"
    _run("python", [sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(src)], env=env)
    wheel = next(wheels.glob("*.whl"))
    reqs = _requirements(wheel)
    key = hashlib.sha256("\n".join([*reqs, "cp311-manylinux-x86_64"]).encode()).hexdigest()[:24]
    deps = cache / f"wheels-{key}"
    if not deps.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".wheels-"))
        (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
        _run("python", [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                        "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
                        "--platform", "manylinux_2_28_x86_64", "--implementation", "cp",
                        "-d", str(tmp), "-r", str(tmp / "requirements.txt")])
        tmp.rename(deps)
    site = rootfs / profile.python_site.lstrip("/")
    _run("python", [sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "-q",
                    "--find-links", str(deps), "--find-links", str(wheels), "--no-compile",
                    "--no-warn-script-location", "--target", str(site), str(wheel)], env=env)
    shutil.rmtree(site / "bin", ignore_errors=True)
    installed: list[tuple[str, str]] = []
    scripts: dict[str, str] = {}
    for info in sorted(site.glob("*.dist-info")):
        meta = dict(re.findall(r"^(Name|Version): (.*)$", (info / "METADATA").read_text(), re.M))
        installed.append((meta["Name"], meta["Version"]))
        # RECORD lists the removed host-shebang scripts; direct_url.json the wheel's temp path
        (info / "RECORD").unlink(missing_ok=True)
        (info / "direct_url.json").unlink(missing_ok=True)
        if info.name.startswith("easyenclave-"):
            ep = (info / "entry_points.txt").read_text()
            section = ep.split("[console_scripts]", 1)[1].split("[", 1)[0]
            scripts = dict(re.findall(r"^(\S+)\s*=\s*(\S+)$", section, re.M))
    for name, target in sorted(scripts.items()):
        module, func = target.split(":")
        path = rootfs / "usr/local/bin" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"#!/usr/bin/python3\nimport sys\nsys.path.insert(0, {profile.python_site!r})\n"
            f"from {module} import {func}\nsys.exit({func}())\n")
        path.chmod(0o755)
    _run("python", ["chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q", "-f",
                    "-j", "0", "--invalidation-mode", "unchecked-hash", profile.python_site],
         env=env)
    return sorted(installed, key=lambda nv: nv[0].lower())


def _install_links(rootfs: Path, unit: str, seen: set[str]) -> None:
    if unit in seen:
        return
    seen.add(unit)
    for base in ("etc/systemd/system", "usr/lib/systemd/system"):
        path = rootfs / base / unit
        if path.is_file():
            break
    else:
        raise BuildFailed("configure", f"no unit {unit} in the root")
    text = path.read_text()
    section = text.split("[Install]", 1)[1] if "[Install]" in text else ""
    for key, value in re.findall(r"^(WantedBy|RequiredBy|Alias|Also)=(.*)$", section, re.M):
        for item in value.split():
            if key == "Also":
                _install_links(rootfs, item, seen)
                continue
            kind = "wants" if key == "WantedBy" else "requires"
            name = item if key == "Alias" else f"{item}.{kind}/{unit}"
            link = rootfs / "etc/systemd/system" / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(f"/{base}/{unit}")


def step_configure(profile: Profile, checkout: Path, rootfs: Path) -> None:
    overlay = checkout / "image" / "rootfs"
    for src in sorted(overlay.rglob("*")):
        dst = rootfs / src.relative_to(overlay)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.unlink(missing_ok=True)
            shutil.copyfile(src, dst)
            dst.chmod(0o755 if os.access(src, os.X_OK) else 0o644)
    daemon = json.loads((checkout / "src/ee/agent/dockerd.json").read_text())
    daemon["data-root"] = "/data/docker"
    docker_etc = rootfs / "etc/docker"
    docker_etc.mkdir(parents=True, exist_ok=True)
    (docker_etc / "daemon.json").write_text(json.dumps(daemon, indent=2, sort_keys=True) + "\n")
    passwd = (rootfs / "etc/passwd").read_text()
    if not re.search(r"^dockremap:", passwd, re.M):
        _run("configure", ["chroot", str(rootfs), "useradd", "--system", "--user-group",
                           "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", "dockremap"])
    for name in ("subuid", "subgid"):
        (rootfs / "etc" / name).write_text("dockremap:100000:65536\n")
    (rootfs / "etc/hostname").write_text(profile.hostname + "\n")
    (rootfs / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{profile.hostname}\n::1\tlocalhost ip6-localhost\n")
    for link, target in sorted(profile.symlinks.items()):
        path = rootfs / link
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        path.symlink_to(target)
    seen: set[str] = set()
    for unit in profile.enable_units:
        _install_links(rootfs, unit, seen)
    for unit in profile.mask_units:
        path = rootfs / "etc/systemd/system" / unit
        path.unlink(missing_ok=True)
        path.symlink_to("/dev/null")


def step_normalise(profile: Profile, rootfs: Path, epoch: int) -> None:
    for rel in profile.remove_paths:
        path = rootfs / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    for rel in profile.empty_dirs:
        (rootfs / rel).mkdir(parents=True, exist_ok=True)
    for tmp in ("tmp", "var/tmp"):
        (rootfs / tmp).chmod(0o1777)
    (rootfs / "etc/machine-id").write_text("")
    day = str(epoch // 86400)
    for name in ("shadow", "gshadow"):
        path = rootfs / "etc" / name
        if name == "shadow" and path.exists():
            lines = []
            for line in path.read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2]:
                    fields[2] = day
                lines.append(":".join(fields))
            path.write_text("\n".join(lines) + "\n")


def file_list(rootfs: Path) -> list[str]:
    """One line per path: sha256 (or link target), mode, uid:gid, path; sorted."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = sha256_file(path)
            else:
                what = "-"
            rel = "/" + path.relative_to(rootfs).as_posix()
            lines.append(f"{what}\t{st.st_mode:o}\t{st.st_uid}:{st.st_gid}\t{rel}")
    return sorted(lines, key=lambda line: line.rsplit("\t", 1)[-1])


def _dpkg_packages(rootfs: Path) -> list[tuple[str, str]]:
    out = _run("manifest", ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
                            "-f", "${Package}\t${Version}\n"])
    return sorted(tuple(line.split("\t", 1)) for line in out.splitlines() if line)  # type: ignore[misc]


def step_root_image(rootfs: Path, out: Path, epoch: int, salt: str) -> dict[str, object]:
    squash = out / "root.img"
    squash.unlink(missing_ok=True)
    _run("squashfs", ["mksquashfs", str(rootfs), str(squash), "-noappend", "-comp", "zstd",
                      "-Xcompression-level", "6",
                      "-no-xattrs", "-all-time", str(epoch), "-mkfs-time", str(epoch),
                      "-quiet", "-no-progress"])
    size = squash.stat().st_size
    padded = -(-size // BLOCK) * BLOCK
    with squash.open("ab") as f:
        f.write(b"\0" * (padded - size))
    text = _run("verity", ["veritysetup", "format", "--no-superblock",
                           f"--hash-offset={padded}", "--data-block-size", str(BLOCK),
                           "--hash-block-size", str(BLOCK), "--salt", salt,
                           "--data-blocks", str(padded // BLOCK), str(squash), str(squash)])
    found = re.search(r"Root hash:\s*([0-9a-f]{64})", text)
    if found is None:
        raise BuildFailed("verity", "veritysetup printed no root hash")
    return {"root_hash": found.group(1), "salt": salt, "data_blocks": padded // BLOCK,
            "hash_start": padded // BLOCK, "hash_offset": padded, "block_size": BLOCK,
            "squashfs_size": size}


def step_initramfs(profile: Profile, checkout: Path, cache: Path, rootfs: Path,
                   modules: Path, out: Path, epoch: int) -> None:
    entries: dict[str, CpioEntry] = {}

    def add_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            entries.setdefault(d, CpioEntry(d, stat.S_IFDIR | 0o755))

    def add_file(path: str, data: bytes, mode: int = 0o755) -> None:
        path = path.strip("/")
        if "/" in path:
            add_dir(path.rsplit("/", 1)[0])
        entries[path] = CpioEntry(path, stat.S_IFREG | mode, data)

    for d in ("proc", "sys", "dev", "newroot", "bin", "sbin", "etc", "run", "tmp"):
        add_dir(d)
    entries["dev/console"] = CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    add_file("init", (checkout / "image/initramfs/init").read_bytes())
    for deb in profile.initramfs_debs:
        ref = _apt_show(deb)
        tree = _extract_deb(_fetch_deb(ref, cache), cache, ref.sha256)
        add_file("bin/busybox", (tree / "bin/busybox").read_bytes())
    for binary in profile.initramfs_binaries:
        real = resolve_in_root(rootfs, binary)
        add_file(binary, (rootfs / real.lstrip("/")).read_bytes())
        ldd = _run("initramfs", ["chroot", str(rootfs), "/usr/bin/ldd", binary])
        for lib in sorted(set(re.findall(r"(/\S+) \(0x", ldd))):
            add_file(lib, (rootfs / resolve_in_root(rootfs, lib).lstrip("/")).read_bytes())
    deps = parse_modules_dep((modules / "modules.dep").read_text())
    builtin = (modules / "modules.builtin").read_text().split()
    order = module_closure(profile.kernel.initramfs_modules, deps, builtin)
    names = []
    for rel in order:
        plain = rel.removesuffix(".xz")
        add_file(f"lib/modules/{plain}", read_module(modules / rel), 0o644)
        names.append(plain)
    add_file("etc/ee-modules", ("\n".join(names) + "\n").encode(), 0o644)
    (out / "initrd.img").write_bytes(write_cpio(entries.values(), epoch))


def build_image(profile: Profile, options: BuildOptions,
                progress: Progress | None = None) -> BuildResult:
    """Build *profile* into ``options.out``; returns the manifest (BuildFailed on errors)."""
    progress = progress if progress is not None else Progress()
    check_tools()
    checkout = checkout_root()
    epoch = options.source_date_epoch if options.source_date_epoch is not None \
        else _epoch(checkout)
    out, cache = options.out, options.cache
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".work-"))
    rootfs = work / "root"
    try:
        with progress.step("inputs"):
            mirror = _apt_mirror(profile.suite)
            kernel = _resolve_kernel(profile.kernel.package_regex)
        step_rootfs(profile, mirror, cache, rootfs, epoch, progress)
        with progress.step("kernel", kernel.name):
            vmlinuz, modules = step_kernel(profile, kernel, cache, rootfs)
            shutil.copyfile(vmlinuz, out / "vmlinuz")
        with progress.step("python", "ee wheel + dependencies"):
            python_packages = step_python(profile, checkout, cache, rootfs, work, epoch)
        with progress.step("configure"):
            step_configure(profile, checkout, rootfs)
            packages = _dpkg_packages(rootfs)
            step_normalise(profile, rootfs, epoch)
            (out / "rootfs.files").write_text("\n".join(file_list(rootfs)) + "\n")
        salt = hashlib.sha256(f"easyenclave/verity/{profile.name}".encode()).hexdigest()
        with progress.step("root.img", "squashfs + dm-verity"):
            verity = step_root_image(rootfs, out, epoch, salt)
        with progress.step("initrd.img"):
            step_initramfs(profile, checkout, cache, rootfs, modules, out, epoch)
        cmdline = " ".join([
            profile.cmdline, "ee.root=/dev/vda",
            f"ee.verity.roothash={verity['root_hash']}", f"ee.verity.salt={salt}",
            f"ee.verity.data_blocks={verity['data_blocks']}",
            f"ee.verity.hash_start={verity['hash_start']}"])
        (out / "cmdline").write_text(cmdline + "\n")
        manifest = Manifest(
            profile=profile.name, root_hash=str(verity["root_hash"]), verity=verity,
            kernel={"package": kernel.name, "version": kernel.version,
                    "deb_sha256": kernel.sha256},
            source_date_epoch=epoch,
            artefacts=tuple(Artefact.of(out / name) for name in ARTEFACTS),
            packages=tuple(packages), python_packages=tuple(python_packages))
        (out / "manifest.json").write_text(manifest.to_json())
        kept = None
        if options.keep_rootfs:
            kept = out.parent / f".{out.name}.rootfs"
            shutil.rmtree(kept, ignore_errors=True)
            rootfs.rename(kept)
        return BuildResult(out, manifest, dict(progress.timings), kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reproducibility_check(profile: Profile, work: Path, *, reference: Path | None = None,
                          progress: Progress | None = None) -> int:
    """Build from scratch twice (separate caches); 0 when the manifests are identical.

    *reference* is an existing build output made from scratch (saves one build). On a
    difference, prints which artefacts and which files inside the root differ; returns 1.
    """
    progress = progress if progress is not None else Progress()
    outs: list[Path] = []
    if reference is not None:
        outs.append(reference)
    for n in range(len(outs), 2):
        out = work / f"build-{n}"
        progress.note(f"reproducibility: build {n + 1} of 2 from scratch")
        build_image(profile, BuildOptions(out=out, cache=work / f"cache-{n}"), progress)
        shutil.rmtree(work / f"cache-{n}", ignore_errors=True)
        outs.append(out)
    return compare_builds(outs[0], outs[1], progress)


def compare_builds(first: Path, second: Path, progress: Progress) -> int:
    """0 when two build outputs have identical manifests; else name what differs, 1."""
    if (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes():
        root_hash = json.loads((first / "manifest.json").read_text())["root_hash"]
        progress.note(f"reproducible: root_hash {root_hash}")
        return 0
    a, b = (json.loads((o / "manifest.json").read_text()) for o in (first, second))
    for name in sorted(set(a["artefacts"]) | set(b["artefacts"])):
        if a["artefacts"].get(name) != b["artefacts"].get(name):
            progress.note(f"differs: {name}")
    for key in sorted(set(a) | set(b)):
        if key != "artefacts" and a.get(key) != b.get(key):
            progress.note(f"differs: manifest field {key}")
    files = diff_file_lists(*((o / "rootfs.files").read_text().splitlines()
                              for o in (first, second)))
    for path in files[:200]:
        progress.note(f"differs in root: {path}")
    if len(files) > 200:
        progress.note(f"... and {len(files) - 200} more files")
    return 1
