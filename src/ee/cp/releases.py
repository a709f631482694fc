"""Signed releases admitted into the CP's measurement policy.

Theory of operation
-------------------
A release (``eectl release build|sign``) carries a manifest that names the git commit,
every artefact's hash and, when it ships the measured VM image, the image's expected
boot measurements (MRTD, RTMR1/2, PCR4/9 as ``eectl trust measure`` predicts them),
signed with an Ed25519 release key. The bootstrap bundle pins the public halves of the
release keys the cluster trusts (``trust.release_keys``).

An operator moves a node size to a new image without re-signing the bundle:
``POST /api/v2/admin/releases`` with ``{"manifest": {...}, "signature": "<hex>",
"node_size": "tiny"}`` (``eectl release admit DIR``). The CP checks, in this order and
without side effects (:func:`check_admission`, pure): the body's shape; the signature
over the manifest's canonical JSON under one of the pinned keys (none pinned: every
release is refused); that the manifest has an image with the measurements a policy
entry needs. Only then is the release kept as a signed manifest (kind ``releases``,
so a CP restart or a records wipe keeps it) and the node size's policy entry extended
with its measurements (:func:`policy_with`): the values are *added* to that node
size's allowlists; a node size with no entry of its own starts from the global lists,
so agents running a globally allowed image stay admitted. A list that was empty (any
value) becomes the release's values: admitting the first release *pins* an open node
size to released images, and agents of that size running anything else are refused at
their next registration or re-attestation (quarantined) — admit releases before
rolling agents onto them, and on a policy that lists what already runs. An admission is
idempotent: the same manifest for the same node size is one release.

A kept release is only as good as the key that signed it: the kept manifest holds the
release's own manifest and signature, and at every start the CP checks them again
under the keys the bundle pins *now* (:func:`recheck`), so removing a key from the
bundle (a leaked key, a withdrawn image) drops its releases; ``DELETE
/api/v2/admin/releases/{release_id}`` withdraws one by hand.

Refusals: 400 ``bad_release`` (shape, no image measurements, a node size the CP does
not know), 403 ``release_untrusted`` (no pinned key verifies the signature), each with
an event ``release.refused``; success is an event ``release.admitted``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ee.attestation.policy import Measurements, Policy
from ee.protocol.canonical import canonical_json
from ee.protocol.signing import SignatureError, verify_document

_NODE_SIZE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SIG = re.compile(r"^[0-9a-f]{128}$")
_HEX48 = re.compile(r"^[0-9a-f]{96}$")
_HEX32 = re.compile(r"^[0-9a-f]{64}$")
_BODY = {"manifest", "signature", "node_size"}
#: the measurements a release must predict (MRTD is optional: predicting it needs the
#: firmware, which not every build has)
_REQUIRED = {"rtmr1": _HEX48, "rtmr2": _HEX48, "pcr4": _HEX32, "pcr9": _HEX32}
_OPTIONAL = {"mrtd": _HEX48}


class ReleaseRefused(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def _bad(reason: str) -> ReleaseRefused:
    return ReleaseRefused(400, "bad_release", reason)


@attrs.frozen
class AdmittedRelease:
    """One release admitted for one node size (the value kept as a manifest)."""

    manifest_sha256: str
    node_size: str
    name: str
    version: str
    commit: str
    key_name: str
    measurements: Measurements
    #: the admitted body (manifest + signature + node size), checked again at each start
    body: Mapping[str, Any] = attrs.field(eq=False, repr=False, factory=dict)

    @property
    def ident(self) -> str:
        return f"{self.node_size}.{self.manifest_sha256[:32]}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.ident, "manifest_sha256": self.manifest_sha256,
                "node_size": self.node_size,
                "name": self.name, "version": self.version, "commit": self.commit,
                "key_name": self.key_name, "measurements": self.measurements.to_json()}

    def to_manifest(self) -> dict[str, Any]:
        """What the CP keeps: the view, and the body it admitted (to check again)."""
        return {**self.to_json(), "body": dict(self.body)}


def recheck(kept: Mapping[str, Any], keys: Sequence[tuple[str, Ed25519PublicKey]]
            ) -> AdmittedRelease:
    """A kept release, admitted again from its own body under today's pinned *keys*
    (`ReleaseRefused` when no pinned key verifies it any more, or it is malformed)."""
    body = kept.get("body")
    if not isinstance(body, Mapping):
        raise _bad("the kept release has no admitted body")
    return check_admission(body, keys)


def _text(doc: Mapping[str, Any], key: str, *, limit: int = 200) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(f"manifest.{key}: a non-empty string of at most {limit} characters")
    return value


def check_admission(body: object, keys: Sequence[tuple[str, Ed25519PublicKey]],
                    node_sizes: Iterable[str] | None = None) -> AdmittedRelease:
    """The release *body* asks to admit, checked against the pinned *keys* (pure); with
    *node_sizes*, the node size must be one of them."""
    if not isinstance(body, Mapping):
        raise _bad("the body is a JSON object")
    unknown = set(body) - _BODY
    if unknown:
        raise _bad(f"unknown fields: {', '.join(sorted(map(str, unknown)))}")
    manifest, signature, node_size = (body.get("manifest"), body.get("signature"),
                                      body.get("node_size"))
    if not isinstance(node_size, str) or not _NODE_SIZE.match(node_size):
        raise _bad("node_size: 1-32 characters of a-z, 0-9, '_' and '-'")
    if node_sizes is not None and node_size not in set(node_sizes):
        raise _bad(f"node_size: {node_size!r} is not a node size this CP knows "
                   f"({', '.join(sorted(node_sizes))})")
    if not isinstance(manifest, dict):
        raise _bad("manifest: the release's manifest.json object")
    if not isinstance(signature, str) or not _SIG.match(signature):
        raise _bad("signature: the manifest.json.sig text (128 lowercase hex characters)")
    key_name = _signer(manifest, bytes.fromhex(signature), keys)
    image = manifest.get("image")
    if not isinstance(image, Mapping):
        raise _bad("manifest.image: this release ships no measured image")
    predicted = image.get("measurements")
    if not isinstance(predicted, Mapping):
        raise _bad("manifest.image.measurements: the release carries no expected "
                   "measurements (build it with the image's measurements.json)")
    lists: dict[str, list[str]] = {}
    for register, shape in (*_REQUIRED.items(), *_OPTIONAL.items()):
        value = predicted.get(register)
        if value is None and register in _OPTIONAL:
            continue
        if not isinstance(value, str) or not shape.match(value):
            chars = 96 if shape is _HEX48 else 64
            raise _bad(f"manifest.image.measurements.{register}: {chars} lowercase hex "
                       "characters")
        lists[register] = [value]
    return AdmittedRelease(
        manifest_sha256=hashlib.sha256(canonical_json(manifest)).hexdigest(),
        node_size=node_size, name=_text(manifest, "name"), version=_text(manifest, "version"),
        commit=_text(manifest, "git_commit"), key_name=key_name,
        measurements=Measurements(**lists),
        body={"manifest": manifest, "signature": signature, "node_size": node_size})


def _signer(manifest: Mapping[str, Any], signature: bytes,
            keys: Sequence[tuple[str, Ed25519PublicKey]]) -> str:
    if not keys:
        raise ReleaseRefused(403, "release_untrusted",
                             "this cluster pins no release key (trust.release_keys in the "
                             "bootstrap bundle), so it admits no release")
    for name, key in keys:
        try:
            verify_document(manifest, signature, key)
        except SignatureError:
            continue
        return name
    raise ReleaseRefused(403, "release_untrusted",
                         "the signature does not verify under any pinned release key "
                         f"({', '.join(name for name, _ in keys)})")


def policy_with(base: Policy, releases: Iterable[AdmittedRelease]) -> Policy:
    """*base* with every release's measurements added to its node size's entry; a node
    size without an entry of its own starts from the global lists (a non-empty node size
    list replaces the global one, so starting empty would narrow, not add)."""
    sizes = dict(base.node_sizes)
    for release in releases:
        start = sizes.get(release.node_size,
                          attrs.evolve(base.measurements, providers=None))
        sizes[release.node_size] = start.merged(release.measurements)
    if sizes == dict(base.node_sizes):
        return base
    return attrs.evolve(base, node_sizes=sizes)
