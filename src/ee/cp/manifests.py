"""Desired state as signed manifests: one JSON document per object, Ed25519-signed by
the CP key, in ``<data-dir>/manifests/<kind>/``.

Apps, versions and deployment intents live here, not in the record store, so a CP that
lost its database resumes from these files. A manifest whose signature does not verify
(edited by hand, truncated, signed by another key) is refused and reported, never
loaded. Each manifest is one file holding the document and its signature, replaced
in one atomic rename, so a crash never pairs a document with another version's
signature; callers run writes in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.protocol.signing import SignatureError, read_enveloped, write_enveloped

log = logging.getLogger("ee.cp.manifests")

KINDS = ("apps", "versions", "deployments", "pools", "bindings", "drains", "releases")


@attrs.frozen
class Refused:
    path: str
    reason: str


def _filename(ident: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ident)[:80]
    return f"{safe}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.json"


def ident_of(path: str | Path) -> str | None:
    """The id a manifest file is named for, when its name gives it back exactly (ids of
    at most 80 characters of ``[A-Za-z0-9_.-]``); None otherwise. Lets the CP tell
    *which* object a refused (unverifiable) manifest was about without trusting it."""
    safe, _, _ = Path(path).name.removesuffix(".json").rpartition("-")
    if safe and _filename(safe) == Path(path).name:
        return safe
    return None


class ManifestStore:
    def __init__(self, root: Path, key: Ed25519PrivateKey) -> None:
        self.root = root
        self.key = key

    def path(self, kind: str, ident: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown manifest kind {kind!r}")
        return self.root / kind / _filename(ident)

    def write(self, kind: str, ident: str, doc: dict[str, Any]) -> None:
        path = self.path(kind, ident)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_enveloped(path, {"kind": kind, "id": ident, "spec": doc}, self.key)

    def delete(self, kind: str, ident: str) -> None:
        self.path(kind, ident).unlink(missing_ok=True)

    def load(self, kind: str) -> tuple[list[dict[str, Any]], list[Refused]]:
        """Every valid manifest of *kind* (its spec), and the ones refused with why."""
        docs: list[dict[str, Any]] = []
        refused: list[Refused] = []
        folder = self.root / kind
        if not folder.is_dir():
            return docs, refused
        public = self.key.public_key()
        for path in sorted(folder.glob("*.json")):
            try:
                doc = read_enveloped(path, public)
            except SignatureError as exc:
                refused.append(Refused(str(path), str(exc)))
                log.error("manifest refused: %s: %s", path, exc)
                continue
            if doc.get("kind") != kind or not isinstance(doc.get("spec"), dict):
                refused.append(Refused(str(path), "not a manifest of this kind"))
                continue
            docs.append(doc["spec"])
        return docs, refused
