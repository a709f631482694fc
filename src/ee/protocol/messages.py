"""Message bodies of the agent session, as frozen attrs values.

Every frame of the agent session (API.md, "Agent session") carries a ``type`` and a
``body`` object. Each ``(sender, type)`` pair has exactly one body class here, with
``TYPE`` (the wire name) and ``SENDER`` (``"cp"``, ``"agent"`` or ``"any"``) as class
variables. Three request/reply pairs share a wire name: the CP sends ``snapshot``,
``logs`` and ``stats`` as requests (:class:`SnapshotRequest`, :class:`LogsRequest`,
:class:`StatsRequest`) and the agent answers with the same type (:class:`Snapshot`,
:class:`LogsReply`, :class:`StatsReply`). Which one a body is follows from who sent it,
so :func:`parse_body` takes the ``sender``; a receiver always knows its peer.

Schema rules:

- an unknown message *type* is an error; unknown *fields* in a body are ignored, so
  either side may add fields without breaking older peers;
- required fields must be present and every value must have its JSON type (no
  coercion: ``"5"`` is not an int); values are checked by the classes' validators
  (ports in range, non-negative sequence numbers, 32-byte public keys, ...);
- a violation raises :class:`~ee.protocol.errors.FrameError` naming the message type
  and the field path, e.g. ``register: body.snapshot.seq: expected int, got 'x'``.

Byte encodings on the wire: quotes and build contexts (large blobs) are standard
base64 (with padding); public keys, nonces and hashes are lowercase hex. Timestamps
are RFC 3339 UTC strings. Local code builds messages with keyword arguments; building
one with an invalid value raises ``ValueError``/``TypeError`` at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal, TypeAlias

import attrs

from ee.protocol.errors import FrameError
from ee.protocol.strict import check, make_converter, problems

__all__ = [
    "MAX_EVENT_LOG_BYTES",
    "MAX_RUNTIME_LOG_CHARS",
    "MESSAGE_TYPES",
    "SECRET_NAME",
    "SECRET_REFUSAL_CODES",
    "WRITE_REFUSAL_CODES",
    "Attest",
    "Attestation",
    "ContainerStats",
    "CpEnvelope",
    "CpProof",
    "CredentialAnswer",
    "CredentialChallenge",
    "Deploy",
    "DeployStatus",
    "DeploymentSnapshot",
    "ErrorMessage",
    "Health",
    "HealthStatus",
    "Heartbeat",
    "LogLine",
    "LogsReply",
    "LogsRequest",
    "Message",
    "NodeInfo",
    "NodeStats",
    "Provider",
    "Reconnect",
    "Register",
    "Registered",
    "Rejected",
    "ReplicaState",
    "SecretAck",
    "SecretRelease",
    "SecretRevoke",
    "SecretsKey",
    "SecretsKeyRequest",
    "Sender",
    "Snapshot",
    "SnapshotRequest",
    "StatsReply",
    "StatsRequest",
    "TunnelGrant",
    "Undeploy",
    "body_to_dict",
    "converter",
    "message_class",
    "parse_body",
]

Sender: TypeAlias = Literal["cp", "agent"]
Provider: TypeAlias = Literal["tsm", "sim", "tpm"]
HealthStatus: TypeAlias = Literal["healthy", "unhealthy", "starting", "unknown"]
ReplicaState: TypeAlias = Literal[
    "pending", "pulling", "building", "starting", "running", "failed", "stopping", "stopped"
]

#: Caps of the event logs an ``attestation`` carries: together with the quote and the
#: snapshot they must fit the CP's 1 MiB frame (base64 grows the CCEL by 4/3).
MAX_EVENT_LOG_BYTES = 384 * 1024
MAX_RUNTIME_LOG_CHARS = 256 * 1024
NONCE_MIN_BYTES = 16
NONCE_MAX_BYTES = 64
PUBLIC_KEY_BYTES = 32  # raw Ed25519
SIGNATURE_BYTES = 64  # Ed25519
MAX_PATH_CHARS = 120  # of a field path in a FrameError (mapping keys are the peer's)

#: Why an agent refused a CP write (``deploy_status.error`` starts with "<CODE>: ";
#: an ``error`` frame carries it as its ``code``). See ``ee.agent.cptrust``.
WRITE_REFUSAL_CODES: frozenset[str] = frozenset({
    "ENVELOPE_MISSING",
    "ENVELOPE_REPLAYED",
    "ENVELOPE_BAD_SIGNATURE",
    "CP_QUOTE_INVALID",
    "CP_MRTD_NOT_ALLOWED",
    "CP_PIN_MISMATCH",
})

#: Why an agent refused a ``secret_release`` (``secret_ack.code``). See ``ee.agent.secrets``.
SECRET_REFUSAL_CODES: frozenset[str] = frozenset({
    "SECRET_NOT_FOR_ME",  # encrypted to another key than this agent process's
    "SECRET_UNSEALABLE",  # does not open with this agent's key and the release's fields
    "SECRET_REPLAYED",  # a release nonce this agent already saw
    "SECRET_STALE",  # an older secret version than the one it holds
    "SECRET_UNKNOWN_DEPLOYMENT",  # for a deployment this agent does not run
    "SECRET_WRITE_FAILED",  # the secrets tmpfs could not be written
})
#: Tenant secret names (also file names under /run/secrets).
SECRET_NAME = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,62}\Z")
MAX_SECRET_BYTES = 64 * 1024
MAX_SEALED_BYTES = MAX_SECRET_BYTES + 64

_HEX_DIGEST = re.compile(r"\A(?:sha256:)?(?:[0-9a-f]{2})+\Z")  # compose hashes: "sha256:<hex>"

_nonempty = check(lambda v: len(v) > 0, "must not be empty")
_non_negative = check(lambda v: v >= 0, "must be >= 0")
_positive = check(lambda v: v > 0, "must be > 0")
_port = check(lambda v: 1 <= v <= 65535, "must be a port number 1..65535")
_nonce = check(
    lambda v: NONCE_MIN_BYTES <= len(v) <= NONCE_MAX_BYTES,
    f"must be {NONCE_MIN_BYTES}..{NONCE_MAX_BYTES} bytes",
)
_public_key = check(lambda v: len(v) == PUBLIC_KEY_BYTES, "must be a 32-byte Ed25519 key")
_x25519 = check(lambda v: len(v) == PUBLIC_KEY_BYTES, "must be a 32-byte X25519 key")
_secret_name = check(lambda v: bool(SECRET_NAME.match(v)),
                     "must match [a-z0-9][a-z0-9_.-]{0,62}")
_sealed = check(lambda v: 28 <= len(v) <= MAX_SEALED_BYTES,
                f"must be 28..{MAX_SEALED_BYTES} bytes")
_credential_secret = check(lambda v: 1 <= len(v) <= 64, "must be 1..64 bytes")
_signature = check(lambda v: len(v) == SIGNATURE_BYTES, "must be a 64-byte Ed25519 signature")
_hex_digest = check(lambda v: bool(_HEX_DIGEST.match(v)), "must be a lowercase hex digest")
_abs_path = check(lambda v: v.startswith("/"), "must start with '/'")
_RFC3339 = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z\Z")


def _is_rfc3339(value: str) -> bool:
    """An RFC 3339 UTC timestamp (``...Z``) naming a real instant (no month 13)."""
    if not isinstance(value, str) or not _RFC3339.match(value):
        return False
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return True


_SERVICE = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}\Z")
#: the phases a deployment can fail in (``DeployStatus.phase``)
FAILURE_PHASES = ("pull", "build", "start", "health", "secrets", "timeout")
_aware = check(lambda v: v.tzinfo is not None, "must be timezone-aware")
_B64 = {"wire": "base64"}
_event_log = check(lambda v: 0 < len(v) <= MAX_EVENT_LOG_BYTES,
                   f"must be 1..{MAX_EVENT_LOG_BYTES} bytes")
MAX_RELEASE_MANIFEST_CHARS = 64 * 1024
_release_manifest = check(lambda v: 0 < len(v) <= MAX_RELEASE_MANIFEST_CHARS,
                          f"must be 1..{MAX_RELEASE_MANIFEST_CHARS} characters")
_runtime_log = check(lambda v: len(v) <= MAX_RUNTIME_LOG_CHARS,
                     f"must be at most {MAX_RUNTIME_LOG_CHARS} characters")


# --- shared parts -------------------------------------------------------------------


@attrs.frozen
class Health:
    """Workload health as the agent sees it."""

    status: HealthStatus = "unknown"
    detail: str = ""


@attrs.frozen
class NodeInfo:
    """What the node is: its size preset, datacenter label and capacity."""

    node_size: str = attrs.field(validator=_nonempty)
    datacenter: str = attrs.field(validator=_nonempty)
    gpu: bool
    vcpus: int = attrs.field(validator=_positive)
    memory_mb: int = attrs.field(validator=_positive)


@attrs.frozen
class NodeStats:
    """Node resource usage, sent with every heartbeat."""

    cpu_percent: float = attrs.field(default=0.0, validator=_non_negative)
    memory_used_mb: int = attrs.field(default=0, validator=_non_negative)
    memory_total_mb: int = attrs.field(default=0, validator=_non_negative)
    disk_used_mb: int = attrs.field(default=0, validator=_non_negative)
    disk_total_mb: int = attrs.field(default=0, validator=_non_negative)
    uptime_s: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen
class DeploymentSnapshot:
    """One deployment the agent runs (or is starting, or failed to run)."""

    deployment_id: str = attrs.field(validator=_nonempty)
    app: str = attrs.field(validator=_nonempty)
    version: str = attrs.field(validator=_nonempty)
    state: ReplicaState
    compose_hash: str | None = attrs.field(default=None, validator=_hex_digest)
    image_digests: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class TunnelGrant:
    """Tunnel assignment the CP hands an agent at registration (cloudflared)."""

    hostname: str = attrs.field(validator=_nonempty)
    token: str = attrs.field(validator=_nonempty)


@attrs.frozen
class CpProof:
    """The CP's proof of its session key, sent once per session in ``registered``.

    ``public_key`` is the CP's Ed25519 write key (one per CP process, born inside the
    CP's TD); ``quote`` is the CP's own TD quote whose REPORTDATA is
    :func:`ee.protocol.reportdata.cp_envelope_report_data` of the ``cp_nonce`` the
    agent sent in ``register`` and ``public_key``. So the quote is fresh for this
    session and vouches for the key that signs every write of it.

    ``release_manifest`` / ``release_signature`` (optional): the manifest.json text of the
    release the CP runs (``ee-cp --release DIR``) and its Ed25519 release signature, so
    an agent that pins release keys (``trusted_release_keys``) accepts the CP's MRTD
    when a pinned key vouches for it (the manifest's ``image.measurements.mrtd``).
    """

    provider: Provider
    public_key: bytes = attrs.field(validator=_public_key)
    quote: bytes = attrs.field(validator=_nonempty, metadata=_B64)
    release_manifest: str | None = attrs.field(default=None, validator=_release_manifest)
    release_signature: bytes | None = attrs.field(default=None, validator=_signature)


@attrs.frozen
class CpEnvelope:
    """The CP's signature on one write (``deploy``, ``undeploy``).

    ``signature`` is Ed25519 by the key of the session's :class:`CpProof` over
    :func:`ee.protocol.reportdata.cp_write_document` of the type, the body as sent
    (without ``envelope``), the session's ``cp_nonce`` and ``seq``. ``seq`` starts at
    1 and grows by at least one per write on a session: a write recorded on another
    session fails the signature (other nonce), one re-sent on this session fails the
    sequence.
    """

    seq: int = attrs.field(validator=_positive)
    signature: bytes = attrs.field(validator=_signature)


@attrs.frozen
class LogLine:
    service: str
    text: str
    #: when Docker received the line (RFC 3339, UTC), if the agent asked for timestamps
    at: str | None = None


@attrs.frozen
class ContainerStats:
    name: str
    cpu_percent: float = attrs.field(default=0.0, validator=_non_negative)
    memory_mb: int = attrs.field(default=0, validator=_non_negative)


# --- messages -----------------------------------------------------------------------


@attrs.frozen
class Challenge:
    """CP → agent, first frame: a single-use nonce for the registration quote."""

    TYPE: ClassVar[str] = "challenge"
    SENDER: ClassVar[str] = "cp"
    nonce: bytes = attrs.field(validator=_nonce)
    expires_at: datetime = attrs.field(validator=_aware)


@attrs.frozen
class Attestation:
    """Agent → CP: a quote (answer to ``attest``; also nested in ``register``) and the
    event logs that explain its registers, so the CP can replay them
    (:mod:`ee.attestation.eventlog`):

    - ``event_log``: the firmware's CC event log (binary CCEL, base64; RTMR0..2), sent
      by a TD (provider ``tsm``) that has one, without its padding;
    - ``runtime_log``: the agent's RTMR3 runtime log, the exact canonical JSON lines
      (one ``deploy`` event per deployment it measured; "" when it measured none).

    Either is None when the agent has none to send. The CP refuses a log that does not
    parse (``BAD_EVENT_LOG``) or does not replay to the quote (``ATTESTATION_FAILED``).
    """

    TYPE: ClassVar[str] = "attestation"
    SENDER: ClassVar[str] = "agent"
    provider: Provider
    quote: bytes = attrs.field(validator=_nonempty, metadata=_B64)
    event_log: bytes | None = attrs.field(default=None, validator=_event_log, metadata=_B64)
    runtime_log: str | None = attrs.field(default=None, validator=_runtime_log)


@attrs.frozen
class CredentialChallenge:
    """CP → agent, between ``register`` and ``registered`` when the provider is ``tpm``:
    TPM2_MakeCredential for the AK in the evidence, sealed to the EK of the evidence's
    EK certificate (:mod:`ee.attestation.tpm_credential`). The agent answers
    ``activation`` with what TPM2_ActivateCredential releases."""

    TYPE: ClassVar[str] = "credential"
    SENDER: ClassVar[str] = "cp"
    credential_blob: bytes = attrs.field(validator=_nonempty, metadata=_B64)  # TPM2B_ID_OBJECT
    encrypted_secret: bytes = attrs.field(validator=_nonempty, metadata=_B64)


@attrs.frozen
class CredentialAnswer:
    """Agent → CP: the secret TPM2_ActivateCredential released (hex)."""

    TYPE: ClassVar[str] = "activation"
    SENDER: ClassVar[str] = "agent"
    secret: bytes = attrs.field(validator=_credential_secret)


@attrs.frozen
class Snapshot:
    """Agent → CP: everything the CP needs to rebuild its picture of this agent."""

    TYPE: ClassVar[str] = "snapshot"
    SENDER: ClassVar[str] = "agent"
    deployments: tuple[DeploymentSnapshot, ...]
    health: Health
    node: NodeInfo
    seq: int = attrs.field(validator=_non_negative)


@attrs.frozen
class Register:
    """Agent → CP: identity, session key, registration quote and current snapshot.

    The quote's REPORTDATA is
    :func:`ee.protocol.reportdata.registration_report_data` of the challenge nonce and
    ``public_key``. ``bootstrap_token`` is presented by VMs launched for a capacity
    launch order.
    """

    TYPE: ClassVar[str] = "register"
    SENDER: ClassVar[str] = "agent"
    vm_name: str = attrs.field(validator=_nonempty)
    node_size: str = attrs.field(validator=_nonempty)
    datacenter: str = attrs.field(validator=_nonempty)
    agent_version: str = attrs.field(validator=_nonempty)
    public_key: bytes = attrs.field(validator=_public_key)
    attestation: Attestation
    snapshot: Snapshot
    bootstrap_token: str | None = None
    #: Where the agent's HTTP API (health, attested health, workload proxy) answers.
    url: str | None = None
    #: Fresh per session, chosen by the agent: the CP's quote in ``registered.cp_proof``
    #: must bind it, so a proof (and the writes signed under it) cannot be replayed.
    cp_nonce: bytes | None = attrs.field(default=None, validator=_nonce)


@attrs.frozen
class Registered:
    """CP → agent: admitted."""

    TYPE: ClassVar[str] = "registered"
    SENDER: ClassVar[str] = "cp"
    agent_id: str = attrs.field(validator=_nonempty)
    heartbeat_interval_s: float = attrs.field(validator=_positive)
    attest_interval_s: float = attrs.field(validator=_positive)
    tunnel: TunnelGrant | None = None
    #: The CP's quote over ``register.cp_nonce`` and its write key (absent when the CP
    #: does not run in a TD, or the agent sent no ``cp_nonce``).
    cp_proof: CpProof | None = None


@attrs.frozen
class Rejected:
    """CP → agent: refused; the CP closes the session after sending it."""

    TYPE: ClassVar[str] = "rejected"
    SENDER: ClassVar[str] = "cp"
    code: str = attrs.field(validator=_nonempty)
    reasons: tuple[str, ...] = ()


@attrs.frozen
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    SENDER: ClassVar[str] = "agent"
    seq: int = attrs.field(validator=_non_negative)
    health: Health
    stats: NodeStats


@attrs.frozen
class Deploy:
    """CP → agent: run this app version (``build_context``: base64 tar.gz)."""

    TYPE: ClassVar[str] = "deploy"
    SENDER: ClassVar[str] = "cp"
    deployment_id: str = attrs.field(validator=_nonempty)
    app: str = attrs.field(validator=_nonempty)
    version: str = attrs.field(validator=_nonempty)
    compose: str = attrs.field(validator=_nonempty)
    expose_port: int = attrs.field(validator=_port)
    health_path: str = attrs.field(validator=_abs_path)
    env: Mapping[str, str] = attrs.field(factory=dict)
    build_context: bytes | None = attrs.field(default=None, metadata=_B64)
    expose_service: str | None = None
    envelope: CpEnvelope | None = None
    #: environment variables fed from released secrets (VAR -> secret name): the agent
    #: reports ``starting`` with the compose hash, waits for these releases, then starts
    #: the services with them (its env file is on tmpfs; Docker itself keeps a
    #: container's environment in its configuration, on the agent's data disk)
    secret_env: Mapping[str, str] = attrs.field(factory=dict)
    #: every secret name the version receives (files and env), sorted: part of the
    #: workload hash (``ee.protocol.compose.workload_hash``)
    secret_names: tuple[str, ...] = ()


@attrs.frozen
class DeployStatus:
    """Agent → CP: progress of a deployment, sent at each state change."""

    TYPE: ClassVar[str] = "deploy_status"
    SENDER: ClassVar[str] = "agent"
    deployment_id: str = attrs.field(validator=_nonempty)
    state: ReplicaState
    compose_hash: str | None = attrs.field(default=None, validator=_hex_digest)
    image_digests: Mapping[str, str] | None = None
    error: str | None = None
    #: where a failure happened: pull | build | start | health | secrets | timeout
    phase: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_(FAILURE_PHASES)))
    #: the failed container's (or compose command's) exit code, when there is one
    exit_code: int | None = None
    #: the last lines of the failed step's output (at most 20, each at most 500 chars)
    log_tail: tuple[str, ...] = attrs.field(default=(), validator=check(
        lambda v: len(v) <= 20 and all(len(x) <= 500 for x in v),
        "at most 20 lines of at most 500 characters"))


@attrs.frozen
class Undeploy:
    TYPE: ClassVar[str] = "undeploy"
    SENDER: ClassVar[str] = "cp"
    deployment_id: str = attrs.field(validator=_nonempty)
    envelope: CpEnvelope | None = None


@attrs.frozen
class SecretsKeyRequest:
    """CP → agent: prove your X25519 secrets key for this *nonce* (``ee.protocol.sealing``)."""

    TYPE: ClassVar[str] = "secrets_key"
    SENDER: ClassVar[str] = "cp"
    nonce: bytes = attrs.field(validator=_nonce)


@attrs.frozen
class SecretsKey:
    """Agent → CP: its X25519 public key for secret releases, and an Ed25519 signature
    by its session key (the one its attestation binds) over
    :func:`ee.protocol.sealing.secrets_key_document` of the request's nonce and the key."""

    TYPE: ClassVar[str] = "secrets_key"
    SENDER: ClassVar[str] = "agent"
    public_key: bytes = attrs.field(validator=_x25519)
    signature: bytes = attrs.field(validator=_signature)


@attrs.frozen
class SecretRelease:
    """CP → agent (a signed write): one secret version for one deployment's workload.

    ``sealed`` is IV || AES-GCM ciphertext under HKDF(X25519(ephemeral_key, recipient)),
    with :func:`ee.protocol.sealing.release_aad` of the deployment id, name, version,
    ``nonce`` and ``recipient`` as associated data. The agent answers ``secret_ack``.
    """

    TYPE: ClassVar[str] = "secret_release"
    SENDER: ClassVar[str] = "cp"
    deployment_id: str = attrs.field(validator=_nonempty)
    name: str = attrs.field(validator=_secret_name)
    version: int = attrs.field(validator=_positive)
    nonce: bytes = attrs.field(validator=_nonce)
    recipient: bytes = attrs.field(validator=_x25519)
    ephemeral_key: bytes = attrs.field(validator=_x25519)
    sealed: bytes = attrs.field(validator=_sealed, metadata=_B64)
    envelope: CpEnvelope | None = None
    #: what the agent does when this replaces an older version it holds (a rotation):
    #: nothing (the file is replaced; the workload rereads it), send ``signal`` to the
    #: services, or restart them (the CP releases to one replica at a time, so a
    #: deployment restarts replica by replica)
    on_rotate: Literal["none", "signal", "restart"] = "none"
    signal: Literal["SIGHUP", "SIGUSR1", "SIGUSR2"] | None = None


@attrs.frozen
class SecretRevoke:
    """CP → agent (a signed write): remove a deployment's secret (``name`` None: all of
    them) from the workload and wipe it. The agent answers ``secret_ack``."""

    TYPE: ClassVar[str] = "secret_revoke"
    SENDER: ClassVar[str] = "cp"
    deployment_id: str = attrs.field(validator=_nonempty)
    name: str | None = attrs.field(default=None, validator=_secret_name)
    reason: str = ""
    envelope: CpEnvelope | None = None


@attrs.frozen
class SecretAck:
    """Agent → CP, the reply to ``secret_release``/``secret_revoke``: ``applied``,
    ``revoked`` or ``refused`` (``code`` from ``SECRET_REFUSAL_CODES`` or
    ``WRITE_REFUSAL_CODES``)."""

    TYPE: ClassVar[str] = "secret_ack"
    SENDER: ClassVar[str] = "agent"
    deployment_id: str = attrs.field(validator=_nonempty)
    state: Literal["applied", "revoked", "refused"]
    name: str | None = None
    version: int | None = None
    code: str | None = None
    reason: str = ""


@attrs.frozen
class Attest:
    """CP → agent: re-attest; the agent answers with ``attestation``."""

    TYPE: ClassVar[str] = "attest"
    SENDER: ClassVar[str] = "cp"
    nonce: bytes = attrs.field(validator=_nonce)


@attrs.frozen
class SnapshotRequest:
    TYPE: ClassVar[str] = "snapshot"
    SENDER: ClassVar[str] = "cp"


@attrs.frozen
class LogsRequest:
    TYPE: ClassVar[str] = "logs"
    SENDER: ClassVar[str] = "cp"
    deployment_id: str | None = None
    tail: int = attrs.field(
        default=200, validator=check(lambda v: 1 <= v <= 10_000, "must be 1..10000")
    )
    #: only lines Docker received at or after this instant (RFC 3339, UTC)
    since: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        check(_is_rfc3339, "must be an RFC 3339 UTC timestamp")))
    #: only this compose service's lines
    service: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        check(lambda v: bool(_SERVICE.match(v)), "must be a compose service name")))


@attrs.frozen
class LogsReply:
    TYPE: ClassVar[str] = "logs"
    SENDER: ClassVar[str] = "agent"
    lines: tuple[LogLine, ...] = ()
    truncated: bool = False


@attrs.frozen
class StatsRequest:
    TYPE: ClassVar[str] = "stats"
    SENDER: ClassVar[str] = "cp"


@attrs.frozen
class StatsReply:
    TYPE: ClassVar[str] = "stats"
    SENDER: ClassVar[str] = "agent"
    node: NodeStats
    containers: tuple[ContainerStats, ...] = ()


@attrs.frozen
class ErrorMessage:
    """Either side: a frame was refused (``re`` names it when it had an ``id``).

    As a reply (``re`` set) it answers the request it names. An ``error`` frame that
    answers nothing is itself a bad frame for the CP (it counts toward the sender's
    bad-frame budget); it is never answered with another ``error``.
    """

    TYPE: ClassVar[str] = "error"
    SENDER: ClassVar[str] = "any"
    code: str = attrs.field(validator=_nonempty)
    message: str = ""


@attrs.frozen
class Reconnect:
    """CP → agent: the CP is shutting down gracefully; reconnect after ``after_s``."""

    TYPE: ClassVar[str] = "reconnect"
    SENDER: ClassVar[str] = "cp"
    reason: str
    after_s: float = attrs.field(validator=_non_negative)


Message: TypeAlias = (
    Challenge
    | Register
    | CredentialChallenge
    | CredentialAnswer
    | Registered
    | Rejected
    | Heartbeat
    | Deploy
    | DeployStatus
    | Undeploy
    | Attest
    | Attestation
    | SnapshotRequest
    | Snapshot
    | LogsRequest
    | LogsReply
    | StatsRequest
    | StatsReply
    | ErrorMessage
    | Reconnect
    | SecretsKeyRequest
    | SecretsKey
    | SecretRelease
    | SecretRevoke
    | SecretAck
)

_ALL: tuple[type[Message], ...] = (
    Challenge,
    Register,
    CredentialChallenge,
    CredentialAnswer,
    Registered,
    Rejected,
    Heartbeat,
    Deploy,
    DeployStatus,
    Undeploy,
    Attest,
    Attestation,
    SnapshotRequest,
    Snapshot,
    LogsRequest,
    LogsReply,
    StatsRequest,
    StatsReply,
    ErrorMessage,
    Reconnect,
    SecretsKeyRequest,
    SecretsKey,
    SecretRelease,
    SecretRevoke,
    SecretAck,
)

_BY_SENDER: dict[str, dict[str, type[Message]]] = {"cp": {}, "agent": {}}
for _cls in _ALL:
    for _sender in ("cp", "agent") if _cls.SENDER == "any" else (_cls.SENDER,):
        assert _cls.TYPE not in _BY_SENDER[_sender], _cls
        _BY_SENDER[_sender][_cls.TYPE] = _cls

#: Every wire type name, from either side.
MESSAGE_TYPES: frozenset[str] = frozenset(c.TYPE for c in _ALL)

#: The wire converter (lenient about unknown fields, strict about types).
converter = make_converter(forbid_extra_keys=False)


def message_class(type_: str, *, sender: Sender) -> type[Message]:
    """The body class for *type_* sent by *sender*; :class:`FrameError` if none."""
    try:
        return _BY_SENDER[sender][type_]
    except KeyError:
        if type_ in MESSAGE_TYPES:
            raise FrameError(f"message type {type_!r} is not sent by the {sender}") from None
        raise FrameError(f"unknown message type {type_!r}") from None


def parse_body(type_: str, body: Mapping[str, Any], *, sender: Sender) -> Message:
    """Structure and validate a frame body; :class:`FrameError` names the field path."""
    cls = message_class(type_, sender=sender)
    try:
        msg: Message = converter.structure(body, cls)
    except Exception as exc:  # cattrs raises exception groups of any builtin kind
        found = problems(exc, "body")
        path, reason = found[0]
        if len(path) > MAX_PATH_CHARS:  # a path names mapping keys, which peers choose
            path = path[:MAX_PATH_CHARS] + "..."
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise FrameError(f"{type_}: {path}: {reason}{more}") from None
    return msg


def body_to_dict(msg: Message) -> dict[str, Any]:
    """The JSON-ready body of *msg* (bytes as hex/base64, timestamps as strings)."""
    result: dict[str, Any] = converter.unstructure(msg)
    return result
