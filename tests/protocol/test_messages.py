"""Message bodies: every type round-trips through the wire; schema violations name the field."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

import attrs
import pytest

from ee.protocol import FrameError, decode_message, encode_message
from ee.protocol.messages import (
    MAX_EVENT_LOG_BYTES,
    MAX_RUNTIME_LOG_CHARS,
    MESSAGE_TYPES,
    Attest,
    Attestation,
    Challenge,
    ContainerStats,
    CpEnvelope,
    CpProof,
    CredentialAnswer,
    CredentialChallenge,
    Deploy,
    DeploymentSnapshot,
    DeployStatus,
    ErrorMessage,
    Health,
    Heartbeat,
    LogLine,
    LogsReply,
    LogsRequest,
    Message,
    NodeInfo,
    NodeStats,
    Reconnect,
    Register,
    Registered,
    Rejected,
    SecretAck,
    SecretRelease,
    SecretRevoke,
    SecretsKey,
    SecretsKeyRequest,
    Snapshot,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
    TunnelGrant,
    Undeploy,
    body_to_dict,
    message_class,
    parse_body,
)

NONCE = bytes(range(32))
KEY = bytes(range(100, 132))
HASH = "ab" * 32

SNAPSHOT = Snapshot(
    deployments=(
        DeploymentSnapshot(
            deployment_id="dep-1",
            app="web",
            version="v1",
            state="running",
            compose_hash=HASH,
            image_digests={"web": "sha256:" + "cd" * 32},
        ),
    ),
    health=Health(status="healthy", detail="200 OK"),
    node=NodeInfo(node_size="standard", datacenter="local:dev", gpu=False, vcpus=4, memory_mb=8192),
    seq=17,
)

SAMPLES: list[tuple[Message, str]] = [
    (Challenge(nonce=NONCE, expires_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)), "cp"),
    (
        Register(
            vm_name="vm-1",
            node_size="standard",
            datacenter="local:dev",
            agent_version="2.0.0",
            public_key=KEY,
            attestation=Attestation(provider="sim", quote=b"\x04\x00quote\xff"),
            snapshot=SNAPSHOT,
            bootstrap_token="tok",
            cp_nonce=NONCE,
        ),
        "agent",
    ),
    (
        Registered(
            agent_id="a-1",
            heartbeat_interval_s=5.0,
            attest_interval_s=3600.0,
            tunnel=TunnelGrant(hostname="x.example.com", token="t"),
            cp_proof=CpProof(provider="tsm", public_key=KEY, quote=b"\x04\x00q"),
        ),
        "cp",
    ),
    (Registered(agent_id="a-1", heartbeat_interval_s=5.0, attest_interval_s=60.0), "cp"),
    (Rejected(code="attestation_failed", reasons=("mrtd not allowed", "debug TD")), "cp"),
    (
        Heartbeat(seq=3, health=Health(), stats=NodeStats(cpu_percent=12.5, memory_used_mb=100)),
        "agent",
    ),
    (
        Deploy(
            deployment_id="dep-1",
            app="web",
            version="v1",
            compose="services:\n  web:\n    image: nginx\n",
            expose_port=80,
            health_path="/healthz",
            env={"A": "1"},
            build_context=b"\x1f\x8b tarball",
            expose_service="web",
            envelope=CpEnvelope(seq=7, signature=b"s" * 64),
        ),
        "cp",
    ),
    (
        DeployStatus(
            deployment_id="dep-1",
            state="running",
            compose_hash=HASH,
            image_digests={"web": "sha256:00"},
        ),
        "agent",
    ),
    (DeployStatus(deployment_id="dep-1", state="failed", error="pull failed"), "agent"),
    (Undeploy(deployment_id="dep-1"), "cp"),
    (Undeploy(deployment_id="dep-1", envelope=CpEnvelope(seq=1, signature=b"\x00" * 64)), "cp"),
    (Attest(nonce=NONCE), "cp"),
    (Attestation(provider="tsm", quote=b"\x00" * 100), "agent"),
    (Attestation(provider="tsm", quote=b"\x00" * 100, event_log=b"\x00\x01ccel",
                 runtime_log='{"type":"deploy"}\n'), "agent"),
    (SnapshotRequest(), "cp"),
    (SNAPSHOT, "agent"),
    (LogsRequest(deployment_id="dep-1", tail=50), "cp"),
    (LogsRequest(deployment_id="dep-1", tail=50, since="2026-12-01T08:00:00.123456789Z",
                 service="web"), "cp"),
    (LogsReply(lines=(LogLine(service="web", text="hello"),), truncated=True), "agent"),
    (LogsReply(lines=(LogLine(service="web", text="hi", at="2026-12-01T08:00:00.5Z"),)),
     "agent"),
    (DeployStatus(deployment_id="dep-1", state="failed", error="build failed (exit code 3): x",
                  phase="build", exit_code=3, log_tail=("step 1", "x")), "agent"),
    (Deploy(deployment_id="dep-1", app="a", version="1", compose="services: {}",
            expose_port=80, health_path="/", secret_names=("api_key", "db")), "cp"),
    (StatsRequest(), "cp"),
    (
        StatsReply(node=NodeStats(disk_total_mb=10), containers=(ContainerStats(name="web-1"),)),
        "agent",
    ),
    (ErrorMessage(code="bad_frame", message="nope"), "cp"),
    (ErrorMessage(code="bad_frame", message="nope"), "agent"),
    (Reconnect(reason="cp shutting down", after_s=2.5), "cp"),
]


SAMPLES += [
    (CredentialChallenge(credential_blob=b"\x00\x44blob", encrypted_secret=b"\x01\x00es"), "cp"),
    (CredentialAnswer(secret=b"\x5a" * 32), "agent"),
    (SecretsKeyRequest(nonce=b"\x01" * 32), "cp"),
    (SecretsKey(public_key=b"\x02" * 32, signature=b"\x03" * 64), "agent"),
    (SecretRelease(deployment_id="dep-1", name="db_password", version=2, nonce=b"\x04" * 32,
                   recipient=b"\x05" * 32, ephemeral_key=b"\x06" * 32, sealed=b"\x07" * 40),
     "cp"),
    (SecretRevoke(deployment_id="dep-1", name="db_password", reason="AGENT_QUARANTINED"), "cp"),
    (SecretAck(deployment_id="dep-1", state="refused", name="db_password", version=2,
               code="SECRET_REPLAYED", reason="seen"), "agent"),
]


def test_logs_request_since_is_a_real_utc_instant() -> None:
    for bad in ("2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-12-01T25:00:00Z",
                "2026-12-01T00:00:00+01:00", "2026-12-01 00:00:00Z", "yesterday",
                "0000-01-01T00:00:00Z"):
        with pytest.raises(ValueError):
            LogsRequest(since=bad)
    for bad_service in ("../x", "", "a b", "x" * 64):
        with pytest.raises(ValueError):
            LogsRequest(service=bad_service)


def test_samples_cover_every_message_type() -> None:
    assert {msg.TYPE for msg, _ in SAMPLES} == MESSAGE_TYPES
    classes = {type(msg) for msg, _ in SAMPLES}
    assert len(classes) == 25


@pytest.mark.parametrize(("msg", "sender"), SAMPLES, ids=lambda v: type(v).__name__)
def test_round_trip_through_the_wire(msg: Message, sender: str) -> None:
    text = encode_message(msg, id=9)
    frame, back = decode_message(text, max_bytes=1 << 20, sender=sender)  # type: ignore[arg-type]
    assert frame.type == msg.TYPE
    assert frame.id == 9
    assert back == msg
    # and the body is plain JSON data
    assert json.loads(json.dumps(body_to_dict(msg))) == body_to_dict(msg)


def test_byte_encodings() -> None:
    register = SAMPLES[1][0]
    body = body_to_dict(register)
    assert body["public_key"] == KEY.hex()
    assert body["attestation"]["quote"] == base64.b64encode(b"\x04\x00quote\xff").decode()
    assert body["cp_nonce"] == NONCE.hex()
    registered = body_to_dict(SAMPLES[2][0])
    assert registered["cp_proof"] == {"provider": "tsm", "public_key": KEY.hex(),
                                      "quote": base64.b64encode(b"\x04\x00q").decode(),
                                      "release_manifest": None, "release_signature": None}
    deploy = next(m for m, _ in SAMPLES if isinstance(m, Deploy))
    assert body_to_dict(deploy)["envelope"] == {"seq": 7, "signature": (b"s" * 64).hex()}
    challenge = body_to_dict(SAMPLES[0][0])
    assert challenge == {"nonce": NONCE.hex(), "expires_at": "2025-01-02T03:04:05Z"}


def test_event_logs_travel_with_the_quote() -> None:
    """``attestation`` (alone and in ``register``) carries the CCEL as base64 and the
    runtime log as text; both are optional (older agents send neither) and capped so
    that a register still fits the CP's 1 MiB frame."""
    body = body_to_dict(Attestation(provider="tsm", quote=b"q", event_log=b"\x00\xffccel",
                                    runtime_log="line\n"))
    assert body["event_log"] == base64.b64encode(b"\x00\xffccel").decode()
    assert body["runtime_log"] == "line\n"
    old = {"provider": "sim", "quote": base64.b64encode(b"q").decode()}
    assert parse_body("attestation", old, sender="agent") == Attestation(provider="sim",
                                                                          quote=b"q")
    for field, value, reason in [
        ("event_log", "not base64!", "body.event_log: expected base64 string"),
        ("event_log", "", "body.event_log: must be 1..393216 bytes"),
        ("event_log", base64.b64encode(b"\x00" * (MAX_EVENT_LOG_BYTES + 1)).decode(),
         "body.event_log: must be 1..393216 bytes"),
        ("runtime_log", ["line"], "body.runtime_log: expected string"),
        ("runtime_log", "x" * (MAX_RUNTIME_LOG_CHARS + 1),
         "body.runtime_log: must be at most 262144 characters"),
    ]:
        with pytest.raises(FrameError, match=re.escape(f"attestation: {reason}")):
            parse_body("attestation", old | {field: value}, sender="agent")
    register = _register_body()
    register["attestation"] = register["attestation"] | {"event_log": ""}  # type: ignore[operator]
    with pytest.raises(FrameError, match=re.escape("register: body.attestation.event_log")):
        parse_body("register", register, sender="agent")
    # At their caps, both logs, a large quote and the snapshot fit one 1 MiB frame.
    full = attrs.evolve(SAMPLES[1][0], attestation=Attestation(
        provider="tsm", quote=b"q" * 16384, event_log=b"\xee" * MAX_EVENT_LOG_BYTES,
        runtime_log="r" * MAX_RUNTIME_LOG_CHARS))
    assert len(encode_message(full)) < 1 << 20


def test_direction_selects_request_or_reply() -> None:
    assert message_class("snapshot", sender="cp") is SnapshotRequest
    assert message_class("snapshot", sender="agent") is Snapshot
    assert message_class("logs", sender="agent") is LogsReply
    assert message_class("error", sender="agent") is ErrorMessage
    with pytest.raises(FrameError, match="'deploy' is not sent by the agent"):
        message_class("deploy", sender="agent")
    with pytest.raises(FrameError, match="unknown message type 'bogus'"):
        parse_body("bogus", {}, sender="cp")


def test_unknown_fields_are_ignored() -> None:
    body = body_to_dict(SNAPSHOT) | {"future_field": [1, 2]}
    body["node"] = body["node"] | {"tpm": True}
    assert parse_body("snapshot", body, sender="agent") == SNAPSHOT


def _register_body() -> dict[str, object]:
    return body_to_dict(SAMPLES[1][0])


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b.pop("vm_name"), "register: body.vm_name: required field missing"),
        (
            lambda b: b["snapshot"].__setitem__("seq", "x"),
            "register: body.snapshot.seq: expected int, got 'x'",
        ),
        (
            lambda b: b["snapshot"].__setitem__("seq", True),
            "register: body.snapshot.seq: expected int, got True",
        ),
        (
            lambda b: b["snapshot"].__setitem__("seq", -1),
            "register: body.snapshot.seq: must be >= 0, got -1",
        ),
        (
            lambda b: b["snapshot"]["deployments"][0].__setitem__("state", "dancing"),
            "register: body.snapshot.deployments[0].state: expected one of",
        ),
        (
            lambda b: b.__setitem__("public_key", "zz"),
            "register: body.public_key: expected hex string, got 'zz'",
        ),
        (
            lambda b: b.__setitem__("public_key", "ab" * 31),
            "register: body.public_key: must be a 32-byte Ed25519 key",
        ),
        (
            lambda b: b["attestation"].__setitem__("quote", "not base64!"),
            "register: body.attestation.quote: expected base64 string",
        ),
        (
            lambda b: b["attestation"].__setitem__("provider", "sgx"),
            "register: body.attestation.provider: expected one of 'tsm', 'sim', 'tpm', got 'sgx'",
        ),
        (
            lambda b: b["snapshot"].__setitem__("deployments", {"a": 1}),
            "register: body.snapshot.deployments: expected array",
        ),
        (
            lambda b: b.__setitem__("snapshot", "x"),
            "register: body.snapshot: expected object, got 'x'",
        ),
    ],
)
def test_schema_violations_name_the_field(mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    body = _register_body()
    mutate(body)
    with pytest.raises(FrameError) as info:
        parse_body("register", body, sender="agent")
    assert str(info.value).startswith(expected), str(info.value)


def test_value_checks() -> None:
    deploy = body_to_dict(SAMPLES[6][0])
    for field, value, reason in [
        ("expose_port", 0, "must be a port number"),
        ("expose_port", 70000, "must be a port number"),
        ("health_path", "healthz", "must start with '/'"),
        ("env", {"A": 1}, "expected string"),
        ("build_context", 5, "expected base64 string"),
    ]:
        with pytest.raises(FrameError, match=reason):
            parse_body("deploy", deploy | {field: value}, sender="cp")
    with pytest.raises(FrameError, match=re.escape("body.nonce: must be 16..64 bytes")):
        parse_body("attest", {"nonce": "00" * 8}, sender="cp")
    envelope = {"seq": 1, "signature": "00" * 64}
    for bad, reason in [({"seq": 0}, "envelope.seq: must be > 0"),
                        ({"signature": "00" * 63}, "envelope.signature: must be a 64-byte"),
                        ({"seq": "1"}, "envelope.seq: expected int")]:
        with pytest.raises(FrameError, match=re.escape(reason)):
            parse_body("undeploy", {"deployment_id": "d", "envelope": envelope | bad},
                       sender="cp")
    with pytest.raises(FrameError, match=re.escape("body.cp_nonce: must be 16..64 bytes")):
        parse_body("register", _register_body() | {"cp_nonce": "00" * 8}, sender="agent")
    registered = body_to_dict(SAMPLES[2][0])
    with pytest.raises(FrameError, match=re.escape("cp_proof.public_key: must be a 32-byte")):
        parse_body("registered", registered | {"cp_proof": registered["cp_proof"] | {
            "public_key": "00" * 31}}, sender="cp")
    with pytest.raises(FrameError, match=re.escape("body.expires_at: expected RFC 3339")):
        parse_body("challenge", {"nonce": NONCE.hex(), "expires_at": "2025-01-01"}, sender="cp")
    with pytest.raises(FrameError, match=re.escape("body.after_s: must be >= 0")):
        parse_body("reconnect", {"reason": "x", "after_s": -1}, sender="cp")
    with pytest.raises(FrameError, match="compose_hash: must be a lowercase hex digest"):
        parse_body(
            "deploy_status",
            {"deployment_id": "d", "state": "running", "compose_hash": "XYZ"},
            sender="agent",
        )


def test_several_problems_are_counted() -> None:
    with pytest.raises(FrameError, match=r"\(and 2 more\)"):
        parse_body("heartbeat", {"seq": "1", "health": 1, "stats": 2}, sender="agent")


def test_local_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="seq"):
        Heartbeat(seq=-1, health=Health(), stats=NodeStats())
    with pytest.raises(ValueError, match="public_key"):
        Register(
            vm_name="v",
            node_size="s",
            datacenter="d",
            agent_version="1",
            public_key=b"x",
            attestation=Attestation(provider="sim", quote=b"q"),
            snapshot=SNAPSHOT,
        )


# ---- strict on every call (issue 11) -------------------------------------------------

_BAD_DIGESTS_SNAPSHOT = {
    "deployments": [{"deployment_id": "d", "app": "a", "version": "v", "state": "running",
                     "image_digests": "xyz"}],
    "health": {}, "seq": 0,
    "node": {"node_size": "s", "datacenter": "d:x", "gpu": False, "vcpus": 1, "memory_mb": 1},
}


@pytest.mark.parametrize("first", ["deploy_status", "snapshot", "deploy"])
def test_mapping_fields_stay_strict_whatever_was_structured_first(first: str) -> None:
    """Structuring one mapping field must not make the next class's mapping lenient
    (cattrs' ``gen_structure_mapping`` registers its lenient hook as a side effect)."""
    from ee.protocol import messages
    from ee.protocol.strict import make_converter

    fresh = make_converter(forbid_extra_keys=False)
    warmups = {
        "deploy_status": (DeployStatus, {"deployment_id": "d", "state": "running",
                                         "image_digests": {"a": "b"}}),
        "snapshot": (Snapshot, json.loads(json.dumps(body_to_dict(SNAPSHOT)))),
        "deploy": (Deploy, {"deployment_id": "d", "app": "a", "version": "v",
                            "compose": "c", "expose_port": 80, "health_path": "/",
                            "env": {"K": "V"}}),
    }
    cls, body = warmups[first]
    fresh.structure(body, cls)
    original = messages.converter
    messages.converter = fresh
    try:
        for _ in range(2):
            with pytest.raises(FrameError) as info:
                parse_body("snapshot", _BAD_DIGESTS_SNAPSHOT, sender="agent")
            assert str(info.value).endswith(
                "body.deployments[0].image_digests: expected object, got 'xyz'")
            with pytest.raises(FrameError, match=re.escape("body.image_digests: expected object")):
                parse_body("deploy_status", {"deployment_id": "d", "state": "running",
                                             "image_digests": "abc"}, sender="agent")
            with pytest.raises(FrameError, match=re.escape("body.env: expected object")):
                parse_body("deploy", {**warmups["deploy"][1], "env": "K=V"}, sender="cp")
    finally:
        messages.converter = original


def test_reasons_never_carry_library_exception_text() -> None:
    from ee.protocol.strict import problems

    for exc in (AttributeError("'str' object has no attribute 'items'"),
                RecursionError("maximum recursion depth exceeded"),
                ValueError("invalid literal for int() with base 10")):
        ((path, reason),) = problems(exc, "body.x")
        assert (path, reason) == ("body.x", "invalid value")


def test_peer_chosen_mapping_keys_do_not_grow_error_messages() -> None:
    body = {"deployment_id": "d", "state": "running", "image_digests": {"k" * 100_000: 5}}
    with pytest.raises(FrameError) as info:
        parse_body("deploy_status", body, sender="agent")
    assert len(str(info.value)) < 300
