"""Compose validation, build context validation and the compose hash (pure)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import pytest

from ee.protocol.canonical import canonical_json
from ee.protocol.compose import (
    DEFAULT_MAX_UNCOMPRESSED_BYTES,
    BuildContextError,
    ComposeError,
    compose_hash,
    compose_services,
    load_build_context,
    validate_build_context,
    validate_compose,
)

COMPOSE = """\
services:
  web:
    build: .
    environment:
      GREETING: hello
    labels: [a=1, b=2]
  db:
    image: ee-busybox:local
    command: ["sleep", "3600"]
"""

# Same document: other key order, flow style, comments, quoting.
COMPOSE_REORDERED = """\
# a comment
services:
  db: {command: [sleep, "3600"], image: "ee-busybox:local"}
  web:
    labels:
      - a=1
      - b=2
    environment: {GREETING: "hello"}
    build: "."
"""

Entry = tuple[str, str, int, bytes | str | None]  # (name, kind, mode, content/target)

TREE: list[Entry] = [
    ("Dockerfile", "file", 0o644, b"FROM ee-busybox:local\n"),
    ("www", "dir", 0o755, None),
    ("www/health", "file", 0o644, b"ok\n"),
    ("www/cgi-bin/echo", "file", 0o755, b"#!/bin/sh\ncat\n"),
    ("www/alias", "symlink", 0o777, "health"),
]


def make_tar(
    entries: list[Entry],
    *,
    level: int = 9,
    mtime: int = 0,
    prefix: str = "",
    fmt: int = tarfile.PAX_FORMAT,
    uid: int = 0,
) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name, kind, mode, payload in entries:
            info = tarfile.TarInfo(prefix + name)
            info.mode = mode
            info.mtime = mtime
            info.uid = uid
            data = None
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                data = io.BytesIO(payload)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                assert isinstance(payload, str)
                info.linkname = payload
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                assert isinstance(payload, str)
                info.linkname = payload
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, data)
    return gzip.compress(raw.getvalue(), compresslevel=level, mtime=mtime)


# -- compose validation -----------------------------------------------------------


def test_validate_compose_returns_mapping_in_file_order() -> None:
    doc = validate_compose(COMPOSE)
    assert compose_services(doc) == ["web", "db"]
    assert doc["services"]["web"]["environment"] == {"GREETING": "hello"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "got empty"),
        ("- a\n- b\n", "got a list"),
        ("services: [\n", "not valid YAML"),
        ("version: '3'\n", "no 'services'"),
        ("services: {}\n", "non-empty mapping"),
        ("services: [web]\n", "non-empty mapping"),
        ("services:\n  web: nginx\n", "service 'web' must be a mapping"),
        ("services:\n  web:\n    environment:\n      1: x\n", "key 1 at services.web.environment"),
        ("services:\n  web:\n    labels:\n      when: 2024-01-01\n", "type date"),
        ("services:\n  web:\n    cpus: .nan\n", "not a finite number"),
        ("services:\n  web:\n    x: !!binary aGk=\n", "type bytes"),
    ],
)
def test_validate_compose_rejects(text: str, reason: str) -> None:
    with pytest.raises(ComposeError, match=reason):
        validate_compose(text)


def test_validate_compose_refuses_alias_bomb() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines.append("services:\n  web:\n    x: *a8")
    with pytest.raises(ComposeError, match="too large"):
        validate_compose("\n".join(lines))


# -- hash ----------------------------------------------------------------------------


def test_hash_format_and_definition() -> None:
    context = make_tar(TREE)
    digest = compose_hash(COMPOSE, context)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    # Recompute from the documented definition.
    members = sorted(
        [
            {
                "path": name,
                "type": kind,
                "mode": mode,
                "sha256": hashlib.sha256(payload).hexdigest()
                if isinstance(payload, bytes)
                else None,
                "target": payload if isinstance(payload, str) else None,
            }
            for name, kind, mode, payload in TREE
        ],
        key=lambda m: str(m["path"]),
    )
    context_digest = "sha256:" + hashlib.sha256(canonical_json(members)).hexdigest()
    assert validate_build_context(context).digest == context_digest
    import yaml

    expected = hashlib.sha256(
        canonical_json(
            {
                "kind": "ee/v2/compose-hash/1",
                "compose": yaml.safe_load(COMPOSE),
                "build_context": context_digest,
            }
        )
    ).hexdigest()
    assert digest == "sha256:" + expected


def test_hash_ignores_key_order_formatting_and_comments() -> None:
    assert compose_hash(COMPOSE, None) == compose_hash(COMPOSE_REORDERED, None)


def test_hash_stable_across_recompression_and_tar_metadata() -> None:
    reference = compose_hash(COMPOSE, make_tar(TREE))
    variants = [
        make_tar(TREE, level=1),
        make_tar(TREE, mtime=1_700_000_000),
        make_tar(list(reversed(TREE))),
        make_tar(TREE, prefix="./"),
        make_tar(TREE, fmt=tarfile.GNU_FORMAT, uid=1000),
        make_tar([("", "dir", 0o755, None), *TREE], prefix="./"),  # root "./" entry
    ]
    for variant in variants:
        assert compose_hash(COMPOSE, variant) == reference


@pytest.mark.parametrize(
    "change",
    [
        lambda t: [(n, k, m, b"FROM other\n" if n == "Dockerfile" else p) for n, k, m, p in t],
        lambda t: [(n, k, 0o600 if n == "www/health" else m, p) for n, k, m, p in t],
        lambda t: [("www/Health" if n == "www/health" else n, k, m, p) for n, k, m, p in t],
        lambda t: [(n, k, m, "cgi-bin" if k == "symlink" else p) for n, k, m, p in t],
        lambda t: [*t, ("extra", "file", 0o644, b"")],
        lambda t: [*t, ("emptydir", "dir", 0o755, None)],
        lambda t: [e for e in t if e[0] != "www/cgi-bin/echo"],
    ],
)
def test_hash_changes_with_any_context_change(change: object) -> None:
    assert callable(change)
    reference = compose_hash(COMPOSE, make_tar(TREE))
    assert compose_hash(COMPOSE, make_tar(change(TREE))) != reference


def test_hash_changes_with_compose_content_and_context_presence() -> None:
    context = make_tar(TREE)
    reference = compose_hash(COMPOSE, context)
    assert compose_hash(COMPOSE.replace("hello", "hallo"), context) != reference
    assert compose_hash(COMPOSE, None) != reference
    assert compose_hash(COMPOSE, make_tar([])) != compose_hash(COMPOSE, None)


# -- build context validation ---------------------------------------------------------


def test_load_build_context_returns_contents() -> None:
    loaded = load_build_context(make_tar(TREE))
    assert loaded.contents["www/health"] == b"ok\n"
    assert [m.path for m in loaded.context.members] == sorted(name for name, *_ in TREE)
    hardlinked = load_build_context(
        make_tar([*TREE, ("www/health2", "hardlink", 0o644, "./www/health")])
    )
    link = next(m for m in hardlinked.context.members if m.path == "www/health2")
    assert (link.kind, link.target) == ("hardlink", "www/health")


@pytest.mark.parametrize(
    ("entries", "reason", "member"),
    [
        ([("/etc/passwd", "file", 0o644, b"x")], "absolute path", "/etc/passwd"),
        ([("a/../../x", "file", 0o644, b"x")], "'..'", "a/../../x"),
        ([("../x", "file", 0o644, b"x")], "'..'", "../x"),
        ([("l", "symlink", 0o777, "/etc")], "absolute", "l"),
        ([("d/l", "symlink", 0o777, "../../etc")], "escapes", "d/l"),
        ([("l", "symlink", 0o777, "d"), ("l/x", "file", 0o644, b"x")], "below a symlink", "l/x"),
        ([("f", "file", 0o644, b""), ("f/x", "file", 0o644, b"x")], "below a file", "f/x"),
        ([("a/x", "file", 0o644, b""), ("a", "symlink", 0o777, "b")], "need a directory", "a"),
        ([("h", "hardlink", 0o644, "../outside")], "'..'", "../outside"),
        ([("h", "hardlink", 0o644, "missing")], "not an earlier regular file", "h"),
        ([("null", "chr", 0o644, None)], "device file", "null"),
        ([("pipe", "fifo", 0o644, None)], "FIFO", "pipe"),
        ([("x", "file", 0o644, b"1"), ("./x", "file", 0o644, b"2")], "duplicate", "x"),
    ],
)
def test_build_context_refused_naming_member(
    entries: list[Entry], reason: str, member: str
) -> None:
    with pytest.raises(BuildContextError, match=reason) as info:
        validate_build_context(make_tar(entries))
    assert info.value.member == member
    assert repr(member) in str(info.value)


def test_build_context_not_gzip_or_not_tar() -> None:
    with pytest.raises(BuildContextError, match="not a valid gzip"):
        validate_build_context(b"definitely not gzip")
    with pytest.raises(BuildContextError, match="not a valid gzip"):
        validate_build_context(make_tar(TREE)[:40])  # truncated
    with pytest.raises(BuildContextError, match="tar"):
        validate_build_context(gzip.compress(b"hello, not a tar archive" * 40))


def test_build_context_size_caps() -> None:
    data = make_tar([("big", "file", 0o644, b"\0" * 2_000_000)])
    assert len(data) < 10_000  # compresses very well: the uncompressed cap must catch it
    with pytest.raises(BuildContextError, match="compressed, over the 100 byte limit"):
        validate_build_context(data, max_bytes=100)
    with pytest.raises(BuildContextError, match="uncompressed size limit"):
        validate_build_context(data, max_uncompressed_bytes=1_000_000)
    assert validate_build_context(data).uncompressed_size > 2_000_000
    many = make_tar([(f"f{i}", "file", 0o644, b"") for i in range(5)])
    with pytest.raises(BuildContextError, match="more than 4 members"):
        validate_build_context(many, max_members=4)


def test_compose_hash_propagates_validation_errors() -> None:
    with pytest.raises(ComposeError):
        compose_hash("services: {}", None)
    with pytest.raises(BuildContextError):
        compose_hash(COMPOSE, b"junk")


def test_decompression_ratio_cap_stops_a_bomb_early() -> None:
    """250 MiB of zeros (a ~250 KiB gzip): refused by ratio, long before the size cap."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 250 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    del raw
    assert len(bomb) * 500 < 250 << 20
    with pytest.raises(BuildContextError, match="expands more than 100x"):
        validate_build_context(bomb, max_uncompressed_bytes=512 << 20)
    # A context under the floor may compress as well as it likes (small generated files).
    small = make_tar([("z", "file", 0o644, bytes(4 << 20))])
    assert validate_build_context(small, max_ratio=2).uncompressed_size > 4 << 20


def test_validate_keeps_no_contents_and_agrees_with_load() -> None:
    data = make_tar(TREE)
    loaded = load_build_context(data, keep_contents=False)
    assert loaded.contents == {}
    assert loaded.context == load_build_context(data).context == validate_build_context(data)


def _itn(n: int) -> bytes:
    return (b"%011o" % n) + b"\0"


def sparse_context(realsize: int) -> bytes:
    """A GNU sparse member (type 'S'): 512 stored bytes, ``realsize`` once tarfile fills
    the holes with zeros (the reviewer's reproduction)."""
    info = tarfile.TarInfo("big.bin")
    info.size, info.mode = 512, 0o644
    h = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    h[156:157] = b"S"
    h[386:398], h[398:410] = _itn(realsize - 512), _itn(512)
    h[483:495] = _itn(realsize)
    h[148:156] = b"        "
    h[148:156] = b"%06o\0 " % sum(h[:512])
    return gzip.compress(bytes(h[:512]) + b"A" * 512 + b"\0" * 1024)


def pax_sparse_context(headers: dict[str, str], payload: bytes = b"AAAA") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = len(payload)
        info.pax_headers = headers
        tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(raw.getvalue())


PAX_01 = {"GNU.sparse.size": str(1 << 30), "GNU.sparse.numblocks": "1",
          "GNU.sparse.map": "0,4", "GNU.sparse.name": "big.bin"}
PAX_10 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
          "GNU.sparse.realsize": str(1 << 30), "GNU.sparse.name": "big.bin"}


def test_a_malformed_pax_sparse_map_is_a_refusal_not_a_crash() -> None:
    with pytest.raises(BuildContextError, match="not a readable tar"):
        validate_build_context(pax_sparse_context(PAX_10, b"AAAA"))


@pytest.mark.parametrize("data", [
    sparse_context(4096), sparse_context(DEFAULT_MAX_UNCOMPRESSED_BYTES + (1 << 20)),
    pax_sparse_context(PAX_01),
    pax_sparse_context(PAX_10, b"1\n0\n4\n".ljust(512, b"\0") + b"AAAA")],
    ids=["gnu_small", "gnu_huge", "pax_0.1", "pax_1.0"])
def test_sparse_members_are_refused(data: bytes) -> None:
    with pytest.raises(BuildContextError, match="sparse") as info:
        validate_build_context(data)
    assert info.value.member == "big.bin"


def test_member_bytes_are_capped_even_past_the_gunzip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a sparse member let through, its synthesised zeros still count."""
    import ee.protocol.compose as compose_module

    monkeypatch.setattr(compose_module, "_is_sparse", lambda info: False)
    data = sparse_context((4 << 20) + 4096)
    assert len(data) < 200
    with pytest.raises(BuildContextError, match="over the uncompressed size limit"):
        validate_build_context(data, max_uncompressed_bytes=4 << 20)


@pytest.mark.parametrize(
    "text",
    [
        # A 1 MB flow list: refused by the structural-character count, before parsing.
        "services:\n  web: {image: x}\nx-pad: [" + ",".join(["1"] * 500_000) + "]\n",
        # Under that count, the loader stops composing at MAX_YAML_NODES.
        "services:\n  web: {image: x}\nx-pad:\n" + "- 1\n" * 25_000,
        "services:\n  web: {image: x}\nx-pad: [" + " ".join(["'1',"] * 25_000) + "]\n",
    ],
    ids=["flow_list_1mb", "block_list", "flow_list_quoted"],
)
def test_yaml_work_is_bounded_before_and_while_parsing(text: str) -> None:
    with pytest.raises(ComposeError, match="too many YAML nodes"):
        validate_compose(text)


def test_a_large_real_compose_is_within_the_yaml_bounds() -> None:
    services = "".join(
        f"  s{i}:\n    image: 'registry.example:5000/app-{i}:1.2.3'\n"
        f"    command: [sh, -c, 'echo a:b-c, d; sleep 1']\n"
        f"    environment: {{A: '1', B: 'http://x:80/-'}}\n"
        f"    depends_on: [s0]\n" for i in range(300))
    doc = validate_compose("services:\n" + services)
    assert len(doc["services"]) == 300


def test_the_workload_hash_binds_which_variable_an_env_secret_feeds() -> None:
    """Swapping which variable two env secrets feed changes what runs: the hash moves."""
    from ee.protocol.compose import workload_hash

    doc = validate_compose("services:\n  web:\n    image: nginx\n")

    def h(secret_env: dict[str, str]) -> str:
        return workload_hash(doc, None, env={}, expose_port=80, expose_service="web",
                             health_path="/", secret_names=["a", "b"], secret_env=secret_env)

    assert h({"X": "a", "Y": "b"}) != h({"X": "b", "Y": "a"})
    assert h({"X": "a", "Y": "b"}) != h({})
    assert h({"Y": "b", "X": "a"}) == h({"X": "a", "Y": "b"})  # order does not count
