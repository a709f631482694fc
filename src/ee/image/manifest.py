"""The build manifest: what an image is made of, compared byte for byte across builds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Artefact", "Manifest", "diff_file_lists", "sha256_file"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@attrs.frozen
class Artefact:
    name: str
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> Artefact:
        return cls(path.name, sha256_file(path), path.stat().st_size)


@attrs.frozen
class Manifest:
    """``manifest.json``: the root hash, every artefact, the epoch and the package list."""

    profile: str
    root_hash: str
    verity: dict[str, Any]
    kernel: dict[str, str]
    source_date_epoch: int
    artefacts: tuple[Artefact, ...]
    packages: tuple[tuple[str, str], ...]
    python_packages: tuple[tuple[str, str], ...]

    def to_json(self) -> str:
        doc = {
            "profile": self.profile,
            "root_hash": self.root_hash,
            "verity": self.verity,
            "kernel": self.kernel,
            "source_date_epoch": self.source_date_epoch,
            "artefacts": {a.name: {"sha256": a.sha256, "size": a.size} for a in self.artefacts},
            "packages": [{"name": n, "version": v} for n, v in self.packages],
            "python_packages": [{"name": n, "version": v} for n, v in self.python_packages],
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def diff_file_lists(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Paths whose line differs between two ``rootfs.files`` listings (sorted)."""

    def index(lines: Sequence[str]) -> dict[str, str]:
        return {line.rsplit("\t", 1)[-1]: line for line in lines if line}

    ia, ib = index(a), index(b)
    return sorted(p for p in ia.keys() | ib.keys() if ia.get(p) != ib.get(p))
