"""The initramfs: a reproducible newc cpio (gzip) holding busybox, dmsetup, modules, /init.

The pieces are pure where they can be: :func:`module_closure` orders kernel modules from
``modules.dep`` (dependencies first, built-ins skipped), :func:`resolve_in_root` follows
symlinks as a chroot would, and :func:`write_cpio` writes entries in sorted order with
uid/gid 0 and one fixed mtime, so equal inputs give equal bytes.
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import attrs

from ee.image.errors import BuildFailed

__all__ = [
    "CpioEntry",
    "module_closure",
    "parse_modules_dep",
    "read_module",
    "resolve_in_root",
    "write_cpio",
]


@attrs.frozen
class CpioEntry:
    """One initramfs member: a directory, a file (with bytes), a symlink or a char device."""

    path: str  # no leading slash
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, entry: CpioEntry, nlink: int, size: int, mtime: int) -> bytes:
    name = entry.path.encode() + b"\0"
    fields = (ino, entry.mode, 0, 0, nlink, mtime, size, 0, 0, entry.rdev[0], entry.rdev[1],
              len(name), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name
    return head + b"\0" * (-len(head) % 4)


def write_cpio(entries: Iterable[CpioEntry], mtime: int) -> bytes:
    """A gzip'd newc archive of *entries* sorted by path (gzip header without a time)."""
    out = bytearray()
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _header(ino, entry, nlink, len(entry.data), mtime)
        out += entry.data + b"\0" * (-len(entry.data) % 4)
    out += _header(0, CpioEntry("TRAILER!!!", 0), 1, 0, 0)
    return gzip.compress(bytes(out), compresslevel=9, mtime=0)


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    base = PurePosixPath(path).name
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return _norm(base.removesuffix(".ko"))


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``modules.dep`` as {module name: (path, dependency paths)}."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            found[_module_name(path)] = (path, tuple(rest.split()))
    return found


def module_closure(
    wanted: Iterable[str], deps: Mapping[str, tuple[str, tuple[str, ...]]], builtin: Iterable[str]
) -> list[str]:
    """Paths of *wanted* modules and their dependencies, each after what it needs."""
    builtins = {_module_name(b) for b in builtin}
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtins:
            return
        if name not in deps:
            raise BuildFailed("initramfs", f"kernel module {name} not found (via {chain})")
        seen.add(name)
        path, needs = deps[name]
        for dep in needs:
            visit(by_path.get(dep, _module_name(dep)), (*chain, name))
        order.append(path)

    for name in wanted:
        visit(_norm(name), ())
    return order


def read_module(path: Path) -> bytes:
    """A module's bytes, decompressed (busybox insmod loads plain .ko files)."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def resolve_in_root(root: Path, path: str, limit: int = 40) -> str:
    """*path* inside *root* with every symlink followed as if *root* were ``/``."""
    parts = list(PurePosixPath(path).parts[1:])
    current = PurePosixPath("/")
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        host = root / str(candidate).lstrip("/")
        if host.is_symlink():
            hops += 1
            if hops > limit:
                raise BuildFailed("initramfs", f"symlink loop at {path}")
            target = PurePosixPath(os.readlink(host))
            if target.is_absolute():
                current = PurePosixPath("/")
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        current = candidate
    return str(current)
