"""Compose documents, build contexts and the compose hash (pure; shared by CP and agent).

A tenant's app version is a Docker Compose document plus an optional build context
(a gzip-compressed tar). The CP validates and hashes both at upload; the agent
validates and hashes them again before it runs anything, and reports the hash with
every deployment (and binds it into attested health quotes). Both sides call
:func:`workload_hash` from this module, so they agree byte for byte.

Compose document
----------------
``validate_compose`` parses the text with ``yaml.safe_load``. The result must be a
mapping with a non-empty ``services`` mapping whose values are mappings, and it must be
plain JSON data: string mapping keys only (quote ``1:`` or ``yes:`` keys), no
timestamps, binary, sets or NaN/Infinity, and at most :data:`MAX_COMPOSE_NODES` nodes
after YAML alias expansion (so an alias bomb is refused, not expanded). The parser is
pure Python (~30 µs a node), so its work is bounded before and while it runs: a count
of structural characters first, then at most :data:`MAX_YAML_NODES` composed nodes.

Build context
-------------
``validate_build_context`` accepts a gzip tar (``.tar.gz``) within size caps on the
compressed bytes, the uncompressed tar stream, the decompression ratio and the member
count, in one streaming pass. Sparse members (GNU ``S`` or
pax ``GNU.sparse.*``) are refused and the member bytes read are capped as well: tarfile
fills a sparse file's holes itself, past the capped gunzip. Member names are
normalised (``./a//b`` → ``a/b``; a root ``.`` directory entry is ignored). Refused,
naming the member: absolute names, ``..`` components, duplicate names, members below a
symlink or a non-directory, symlinks whose target is absolute or resolves outside the
root, hardlinks to anything but an earlier regular file member, and device files,
FIFOs and other special types.

Hash definition (version 1)
---------------------------
With ``canonical_json`` from :mod:`ee.protocol.canonical` (sorted keys, no whitespace,
UTF-8) and ``H(b) = "sha256:" + lowercase hex SHA-256 of b``::

    context_digest = H(canonical_json([
        {"path": p,            # normalised member name
         "type": t,            # "file" | "dir" | "symlink" | "hardlink"
         "mode": m,            # tar mode & 0o7777, as an integer
         "sha256": s,          # lowercase hex SHA-256 of the content for "file", else null
         "target": g},         # symlink: link text as stored; hardlink: normalised
                               # target path; else null
        ...                    # one per member, sorted by path (Unicode code points)
    ]))

    compose_hash = H(canonical_json({
        "kind": "ee/v2/compose-hash/1",
        "compose": yaml.safe_load(compose_text),
        "build_context": context_digest,   # null when there is no build context
    }))

Only the member tree counts: compression level, gzip header, tar format, member order,
mtimes and owners do not, so re-compressing the same tree gives the same hash, while
any change to the compose document (other than formatting, comments and key order),
to a file's bytes, name or mode, or to a link, changes it.

Workload hash (what is attested)
--------------------------------
The compose hash covers the files; a workload is more than its files. The hash an app
version gets (``compose_hash`` in the API, for continuity), the one the agent reports
with every deployment and binds into attested health quotes, is::

    workload_hash = H(canonical_json({
        "kind": "ee/v2/workload-hash/1",
        "compose_hash": compose_hash,          # as above
        "env": {NAME: VALUE, ...},             # the version's env, names and values
        "expose_port": N,                      # the container port the agent exposes
        "expose_service": S,                   # the compose service it belongs to
        "health_path": P,                      # the path the health check fetches
        "secret_names": [NAME, ...],           # the secrets the version receives,
                                               # sorted, unique (names only)
        "secret_env": {VAR: NAME, ...},        # which variable each env secret feeds
    }))

So changing an env value, the exposed port or service, the health path, which
secrets a version receives, or which variable an env secret feeds gives another hash;
a secret's *value* (released after the replica attests, and rotated) does not. Env
values are in the hash but write-only in the API (a version shows ``env_names``): a
verifier who knows them (the tenant) can
recompute the hash, nobody can read them back. To recompute it from a directory, hash
the compose file and the build context as above, then the object above with the
version's fields (the tenant CLI's ``eectl compose-hash`` does so).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs
import yaml

from ee.protocol.canonical import canonical_json

__all__ = [
    "DEFAULT_MAX_CONTEXT_BYTES",
    "DEFAULT_MAX_CONTEXT_MEMBERS",
    "DEFAULT_MAX_RATIO",
    "DEFAULT_MAX_UNCOMPRESSED_BYTES",
    "HASH_KIND",
    "MAX_COMPOSE_BYTES",
    "MAX_COMPOSE_NODES",
    "MAX_YAML_INDICATORS",
    "MAX_YAML_NODES",
    "BuildContext",
    "BuildContextError",
    "ComposeError",
    "ContextMember",
    "LoadedBuildContext",
    "compose_hash",
    "compose_services",
    "hash_compose_document",
    "load_build_context",
    "validate_build_context",
    "validate_compose",
    "workload_hash",
]

HASH_KIND = "ee/v2/compose-hash/1"
WORKLOAD_HASH_KIND = "ee/v2/workload-hash/1"
MAX_COMPOSE_BYTES = 1024 * 1024
MAX_COMPOSE_NODES = 100_000
DEFAULT_MAX_CONTEXT_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_UNCOMPRESSED_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_CONTEXT_MEMBERS = 20_000
#: Largest uncompressed/compressed ratio accepted (past RATIO_FLOOR bytes): source trees
#: compress 3-10x, a decompression bomb 1000x.
DEFAULT_MAX_RATIO = 100
RATIO_FLOOR = 8 * 1024 * 1024

MemberKind = Literal["file", "dir", "symlink", "hardlink"]


class ComposeError(ValueError):
    """The compose document is not acceptable (the message says why)."""


class BuildContextError(ValueError):
    """The build context is not acceptable; ``member`` names the offending entry."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message if member is None else f"{message}: {member!r}")
        self.member = member


@attrs.frozen
class ContextMember:
    """One normalised build-context entry, as it enters the context digest."""

    path: str
    kind: MemberKind
    mode: int
    size: int
    sha256: str | None = None
    target: str | None = None

    def digest_entry(self) -> dict[str, object]:
        return {
            "path": self.path,
            "type": self.kind,
            "mode": self.mode,
            "sha256": self.sha256,
            "target": self.target,
        }


@attrs.frozen
class BuildContext:
    """A validated build context: its members (sorted by path) and their digest."""

    members: tuple[ContextMember, ...]
    digest: str
    compressed_size: int
    uncompressed_size: int


@attrs.frozen
class LoadedBuildContext:
    """A validated build context together with the bytes of its regular files."""

    context: BuildContext
    contents: Mapping[str, bytes]


def _h(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Compose document


def _check_json_data(doc: object) -> None:
    """Refuse non-JSON YAML values and alias bombs (iterative, bounded walk)."""
    budget = MAX_COMPOSE_NODES
    stack: list[tuple[object, str]] = [(doc, "")]
    while stack:
        value, where = stack.pop()
        budget -= 1
        if budget < 0:
            raise ComposeError(
                f"compose document too large: more than {MAX_COMPOSE_NODES} nodes "
                "after alias expansion"
            )
        at = where or "<root>"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ComposeError(f"mapping key {key!r} at {at} is not a string (quote it)")
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                stack.append((item, f"{at}[{index}]"))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ComposeError(f"value at {at} is not a finite number")
        elif value is not None and not isinstance(value, str | int | bool):
            raise ComposeError(
                f"value at {at} has YAML type {type(value).__name__}, "
                "which has no JSON form (quote it)"
            )


#: Characters every YAML node but the root needs one of nearby (``-`` block entries,
#: ``,``/``[`` flow entries, ``:``/``?`` mapping pairs, ``{`` flow mappings): a cheap
#: C-speed upper bound on the node count, checked before the pure-Python parser runs.
_INDICATORS = "-,[:?{"
#: Nodes the parser may compose (aliases count once: expansion is bounded separately by
#: :data:`MAX_COMPOSE_NODES`). A large real compose file has a few thousand.
MAX_YAML_NODES = 20_000
MAX_YAML_INDICATORS = 4 * MAX_YAML_NODES


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops composing after :data:`MAX_YAML_NODES` nodes, so a
    pathological document costs a bounded parse, not one proportional to its size."""

    _nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise ComposeError(f"compose document has too many YAML nodes "
                               f"(more than {MAX_YAML_NODES})")
        return super().compose_node(parent, index)


def validate_compose(text: str) -> dict[str, Any]:
    """Parse and check a compose document; return the parsed mapping.

    Raises :class:`ComposeError` with a human-readable reason.
    """
    if not isinstance(text, str):
        raise ComposeError(f"compose must be text, not {type(text).__name__}")
    if len(text.encode("utf-8")) > MAX_COMPOSE_BYTES:
        raise ComposeError(f"compose document larger than {MAX_COMPOSE_BYTES} bytes")
    indicators = sum(text.count(c) for c in _INDICATORS)
    if indicators > MAX_YAML_INDICATORS:
        raise ComposeError(
            f"compose document has too many YAML nodes ({indicators} structural "
            f"characters, at most {MAX_YAML_INDICATORS})"
        )
    try:
        doc = yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
    except ComposeError:
        raise
    except yaml.YAMLError as exc:
        raise ComposeError(f"compose is not valid YAML: {exc}") from None
    except RecursionError:
        raise ComposeError("compose is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise ComposeError(f"compose has a value that cannot be read: {exc}") from None
    if not isinstance(doc, dict):
        kind = "empty" if doc is None else f"a {type(doc).__name__}"
        raise ComposeError(f"compose must be a YAML mapping, got {kind}")
    try:
        _check_json_data(doc)
    except RecursionError:
        raise ComposeError("compose is nested too deeply") from None
    services = doc.get("services")
    if services is None:
        raise ComposeError("compose has no 'services' section")
    if not isinstance(services, dict) or not services:
        raise ComposeError("compose 'services' must be a non-empty mapping")
    for name, service in services.items():
        if not isinstance(service, dict):
            raise ComposeError(f"compose service {name!r} must be a mapping")
    return doc


def compose_services(doc: Mapping[str, Any]) -> list[str]:
    """Service names of a validated compose document, in file order."""
    return list(doc["services"])


# ---------------------------------------------------------------------------
# Build context


def _normalise_name(name: str) -> str:
    if name.startswith("/"):
        raise BuildContextError("absolute path in build context", name)
    if "\x00" in name:
        raise BuildContextError("NUL byte in build context member name", name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BuildContextError("'..' in build context member name", name)
    return "/".join(parts)


class _CappedGunzip(io.RawIOBase):
    """The gunzipped stream of ``data``, refusing more than the caps allow.

    Caps: ``max_uncompressed`` bytes in total, and a decompression ratio of at most
    ``max_ratio`` once past :data:`RATIO_FLOOR` bytes (a 250 MiB run of zeros is a
    250 KiB gzip: refused after a few MiB of work instead of a full pass).
    """

    def __init__(self, data: bytes, max_uncompressed: int, max_ratio: int) -> None:
        super().__init__()
        self._gzip = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        self._limit = min(max_uncompressed, max(RATIO_FLOOR, max_ratio * len(data)))
        self._ratio_bound = self._limit < max_uncompressed
        self._max_uncompressed = max_uncompressed
        self._max_ratio = max_ratio
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            chunk = self._gzip.read(min(len(buffer), 1024 * 1024))
        except (OSError, EOFError, zlib.error) as exc:
            raise BuildContextError(f"build context is not a valid gzip file ({exc})") from None
        self.total += len(chunk)
        if self.total > self._limit:
            if self._ratio_bound:
                raise BuildContextError(
                    f"build context expands more than {self._max_ratio}x when decompressed"
                )
            raise BuildContextError(
                "build context is over the uncompressed size limit "
                f"of {self._max_uncompressed} bytes"
            )
        buffer[: len(chunk)] = chunk
        return len(chunk)


def load_build_context(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
    max_members: int = DEFAULT_MAX_CONTEXT_MEMBERS,
    max_ratio: int = DEFAULT_MAX_RATIO,
    keep_contents: bool = True,
    keep_paths: frozenset[str] = frozenset(),
) -> LoadedBuildContext:
    """Validate a gzip tar build context and return its members and file contents.

    One streaming pass: gunzip, tar parsing and hashing happen together, under the
    caps, without holding the uncompressed tar in memory (``keep_contents=False``
    keeps no file bytes either, except for the members named in ``keep_paths``).
    Raises :class:`BuildContextError` naming the offending member. CPU-heavy for large
    contexts: call it from a worker thread on an event loop.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"build context must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise BuildContextError(
            f"build context is {len(data)} bytes compressed, over the {max_bytes} byte limit"
        )
    stream = _CappedGunzip(data, max_uncompressed_bytes, max_ratio)
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|") as archive:
            members, contents = _scan(
                archive, max_members, keep_contents, max_uncompressed_bytes, keep_paths
            )
    except BuildContextError:
        raise
    except (tarfile.TarError, ValueError, EOFError) as exc:
        # tarfile raises plain ValueError for some malformed headers (pax sparse maps).
        raise BuildContextError(f"build context is not a readable tar archive ({exc})") from None
    ordered = tuple(sorted(members.values(), key=lambda m: m.path))
    digest = _h(canonical_json([m.digest_entry() for m in ordered]))
    context = BuildContext(
        members=ordered,
        digest=digest,
        compressed_size=len(data),
        uncompressed_size=stream.total,
    )
    return LoadedBuildContext(context=context, contents=contents)


def _scan(
    archive: tarfile.TarFile,
    max_members: int,
    keep_contents: bool,
    max_uncompressed: int,
    keep_paths: frozenset[str],
) -> tuple[dict[str, ContextMember], dict[str, bytes]]:
    members: dict[str, ContextMember] = {}
    read = 0  # bytes of member content read, whatever tarfile synthesised
    parents: set[str] = set()  # directories implied by member names
    contents: dict[str, bytes] = {}
    while (info := archive.next()) is not None:
        if len(members) >= max_members:
            raise BuildContextError(f"build context has more than {max_members} members")
        member = _check_member(info, members, parents)
        if member is None:
            continue
        parent = posixpath.dirname(member.path)
        while parent and parent not in parents:
            parents.add(parent)
            parent = posixpath.dirname(parent)
        if member.kind == "file":
            extracted = archive.extractfile(info)
            assert extracted is not None  # regular files always have a stream
            digest = hashlib.sha256()
            keep = keep_contents or member.path in keep_paths
            parts = []
            while chunk := extracted.read(1024 * 1024):
                read += len(chunk)
                if read > max_uncompressed:  # belt and braces: members are capped too
                    raise BuildContextError(
                        "build context members are over the uncompressed size limit "
                        f"of {max_uncompressed} bytes", member.path)
                digest.update(chunk)
                if keep:
                    parts.append(chunk)
            if keep:
                contents[member.path] = b"".join(parts)
            member = attrs.evolve(member, sha256=digest.hexdigest())
        members[member.path] = member
    return members, contents


def _is_sparse(info: tarfile.TarInfo) -> bool:
    return (info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE
            or any(key.startswith("GNU.sparse.") for key in info.pax_headers))


def _check_member(
    info: tarfile.TarInfo, seen: Mapping[str, ContextMember], parents: set[str]
) -> ContextMember | None:
    path = _normalise_name(info.name)
    if not path:
        if info.isdir():
            return None  # the root directory entry ("." or "./")
        raise BuildContextError("non-directory entry for the context root", info.name)
    if path in seen:
        raise BuildContextError("duplicate build context member", path)
    parent = posixpath.dirname(path)
    while parent:
        above = seen.get(parent)
        if above is not None and above.kind != "dir":
            raise BuildContextError(f"member is below a {above.kind} ({parent!r})", path)
        parent = posixpath.dirname(parent)
    if path in parents and not info.isdir():
        raise BuildContextError("non-directory member where earlier members need a directory", path)
    mode = info.mode & 0o7777
    if _is_sparse(info):
        # tarfile synthesises a sparse member's holes as zeros that never pass through
        # the capped gunzip: 96 compressed bytes could become gigabytes to hash.
        raise BuildContextError("sparse file in build context", path)
    if info.isreg():
        return ContextMember(path=path, kind="file", mode=mode, size=info.size)
    if info.isdir():
        return ContextMember(path=path, kind="dir", mode=mode, size=0)
    if info.issym():
        target = info.linkname
        if not target or target.startswith("/"):
            raise BuildContextError("symlink with an absolute or empty target", path)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if resolved == ".." or resolved.startswith("../"):
            raise BuildContextError(f"symlink escapes the context root (-> {target!r})", path)
        return ContextMember(path=path, kind="symlink", mode=mode, size=0, target=target)
    if info.islnk():
        target = _normalise_name(info.linkname)
        linked = seen.get(target)
        if linked is None or linked.kind != "file":
            raise BuildContextError(
                f"hardlink target {info.linkname!r} is not an earlier regular file", path
            )
        return ContextMember(path=path, kind="hardlink", mode=mode, size=0, target=target)
    if info.ischr() or info.isblk():
        raise BuildContextError("device file in build context", path)
    if info.isfifo():
        raise BuildContextError("FIFO in build context", path)
    raise BuildContextError(f"unsupported tar member type {info.type!r}", path)


def validate_build_context(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
    max_members: int = DEFAULT_MAX_CONTEXT_MEMBERS,
    max_ratio: int = DEFAULT_MAX_RATIO,
) -> BuildContext:
    """Validate a gzip tar build context; return its member list and digest (one pass)."""
    return load_build_context(
        data,
        max_bytes=max_bytes,
        max_uncompressed_bytes=max_uncompressed_bytes,
        max_members=max_members,
        max_ratio=max_ratio,
        keep_contents=False,
    ).context


# ---------------------------------------------------------------------------
# Hash


def hash_compose_document(doc: Mapping[str, Any], context: BuildContext | None) -> str:
    """The compose hash of an already validated document and build context."""
    try:
        payload = canonical_json(
            {
                "kind": HASH_KIND,
                "compose": doc,
                "build_context": None if context is None else context.digest,
            }
        )
    except (TypeError, ValueError) as exc:
        raise ComposeError(f"compose document has no canonical JSON form ({exc})") from None
    return _h(payload)


def compose_hash(compose_text: str, build_context: bytes | None) -> str:
    """``"sha256:<hex>"`` over the canonical compose document and build context digest.

    See the module docstring for the exact definition. Raises :class:`ComposeError` or
    :class:`BuildContextError` when either input is not acceptable.
    """
    doc = validate_compose(compose_text)
    context = None if build_context is None else validate_build_context(build_context)
    return hash_compose_document(doc, context)


def workload_hash(doc: Mapping[str, Any], context: BuildContext | None, *,
                  env: Mapping[str, str], expose_port: int, expose_service: str,
                  health_path: str, secret_names: Iterable[str],
                  secret_env: Mapping[str, str]) -> str:
    """The attested hash of everything that determines a workload except secret values.

    ``H(canonical_json({"kind": "ee/v2/workload-hash/1", "compose_hash": <compose hash>,
    "env": {NAME: VALUE, ...}, "expose_port": N, "expose_service": S, "health_path": P,
    "secret_names": [sorted, unique names], "secret_env": {VAR: NAME, ...}}))``: so a
    change to any env value, the exposed port or service, the health path, the set of
    secrets the version receives or which variable an env secret feeds gives another
    hash, while a secret's *value* (released later, rotated) does not.
    """
    try:
        payload = canonical_json({
            "kind": WORKLOAD_HASH_KIND,
            "compose_hash": hash_compose_document(doc, context),
            "env": dict(env),
            "expose_port": expose_port,
            "expose_service": expose_service,
            "health_path": health_path,
            "secret_names": sorted(set(secret_names)),
            "secret_env": dict(secret_env),
        })
    except (TypeError, ValueError) as exc:
        raise ComposeError(f"workload has no canonical JSON form ({exc})") from None
    return _h(payload)
