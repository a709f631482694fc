"""What travels on the federation link, and the pure decisions about it.

Every frame is a signed envelope ``{"body": {...}, "sig": HEX}``: an Ed25519 signature
over the canonical JSON of the body, by the sender's pinned key (a dc's key is pinned at
the master when it joins; the master's key is pinned at the dc by the join). TLS already
authenticates the peer; the signature additionally binds every payload to a key that
never leaves its CP, so a frame relayed, stored (snapshots are kept signed at the dc) or
injected behind a TLS terminator is still checked.

Bodies are structured with cattrs into the frozen classes below; anything else is a
``WireError`` with a reason code (the caller emits the event and answers ``refused``).
Sequencing is ``judge_sequence``: exactly the next sequence applies, an old one is a
replay (ignored), a later one is a gap (the master asks for a replay from the next).
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Final, Literal

import attrs
import cattrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ee.cp.metrics import ATTESTATION_LE, DEPLOY_QUEUE_LE
from ee.protocol.signing import SignatureError, sign_document, verify_document
from ee.protocol.strict import lower_hex

MAX_FRAME_BYTES: Final = 8 << 20
MAX_EVENTS_PER_FRAME: Final = 1000
MAX_ID_CHARS: Final = 120  # a deployment or agent id
STREAM_PATH: Final = "/api/v2/federation/stream"

# Reason codes (events ``federation.refused`` carry one; ``refused`` frames too).
BAD_FRAME: Final = "bad_frame"
BAD_SIGNATURE: Final = "bad_signature"
UNKNOWN_CERTIFICATE: Final = "unknown_certificate"
DATACENTER_MISMATCH: Final = "datacenter_mismatch"
SEQUENCE_REPLAYED: Final = "sequence_replayed"
SEQUENCE_GAP: Final = "sequence_gap"
SNAPSHOT_STALE: Final = "snapshot_stale"
FOREIGN_AGENTS: Final = "foreign_datacenter_agents"
HELLO_REQUIRED: Final = "hello_required"  # the dc reconnects and says hello again
RESPONSE_UNKNOWN: Final = "response_unknown"  # an id the master never sent to this dc
RESPONSE_LATE: Final = "response_late"  # already answered, or given up on
RESPONSE_TOO_LARGE: Final = "response_too_large"
WRONG_DATACENTER: Final = "WRONG_DATACENTER"  # agent registration refusal at a dc CP


class WireError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


#: The largest sequence, version or count a frame may carry (JSON ints are unbounded:
#: 10**400 structures fine and then breaks a float conversion, e.g. a metric, later).
MAX_COUNT: Final = 2**63 - 1


def _nonneg(_: object, a: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{a.name} must be in 0..{MAX_COUNT}")


def _finite(_: object, a: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{a.name} must be a finite number")


@attrs.frozen
class Event:
    seq: int = attrs.field(validator=_nonneg)
    kind: Literal["agents", "resync", "snapshot_applied", "placement", "stats"]
    at: float = attrs.field(validator=_finite)  # unix time the dc recorded it
    data: dict[str, Any]


@attrs.frozen
class Hello:
    type: Literal["hello"]
    dc: str
    first_unacked: int = attrs.field(validator=_nonneg)
    next_seq: int = attrs.field(validator=_nonneg)
    snapshot_version: int = attrs.field(validator=_nonneg)
    spool_depth: int = attrs.field(validator=_nonneg)


@attrs.frozen
class Events:
    type: Literal["events"]
    dc: str
    events: list[Event]
    spool_depth: int = attrs.field(validator=_nonneg)
    snapshot_version: int = attrs.field(validator=_nonneg)
    sent_at: float = attrs.field(validator=_finite)
    last_seq: int = attrs.field(validator=_nonneg)  # the newest sequence the dc assigned

    def __attrs_post_init__(self) -> None:
        if len(self.events) > MAX_EVENTS_PER_FRAME:
            raise ValueError(f"at most {MAX_EVENTS_PER_FRAME} events per frame")


@attrs.frozen
class Ack:
    type: Literal["ack"]
    upto: int


@attrs.frozen
class Replay:
    type: Literal["replay"]
    start: int
    reason: str


@attrs.frozen
class Refused:
    type: Literal["refused"]
    code: str
    detail: str


@attrs.frozen
class Snapshot:
    type: Literal["snapshot"]
    version: int = attrs.field(validator=_nonneg)
    issued_at: float = attrs.field(validator=_finite)
    desired: dict[str, Any]


REQUEST_ID: Final = r"[0-9a-f]{32}"
MAX_RESPONSE_BYTES: Final = 1 << 20  # a response body, as canonical JSON


@attrs.frozen
class Request:
    """The master asks a dc (ee.federation.rpc): ephemeral, never spooled or sequenced."""

    type: Literal["request"]
    id: str = attrs.field(validator=attrs.validators.matches_re(REQUEST_ID))
    kind: str = attrs.field(validator=attrs.validators.max_len(40))
    deployment_id: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.max_len(MAX_ID_CHARS)))
    agent_id: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.max_len(MAX_ID_CHARS)))
    args: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Response:
    """A dc's answer to one ``Request``: ``error`` None and a ``body``, or an error code."""

    type: Literal["response"]
    dc: str
    id: str = attrs.field(validator=attrs.validators.matches_re(REQUEST_ID))
    error: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.max_len(60)))
    detail: str = attrs.field(default="", validator=attrs.validators.max_len(300))
    body: dict[str, Any] | None = None


UpFrame = Hello | Events | Response
DownFrame = Ack | Replay | Refused | Snapshot | Request

_conv = cattrs.Converter(forbid_extra_keys=True)


def _structure_union(classes: tuple[type[Any], ...]) -> Any:
    by_type = {c.__name__.lower(): c for c in classes}

    def structure(doc: Any, _: Any) -> Any:
        if not isinstance(doc, dict) or doc.get("type") not in by_type:
            raise ValueError(f"'type' must be one of {sorted(by_type)}")
        return _conv.structure(doc, by_type[doc["type"]])

    return structure


_up = _structure_union((Hello, Events, Response))
_down = _structure_union((Ack, Replay, Refused, Snapshot, Request))


def seal(body: Any, key: Ed25519PrivateKey) -> str:
    """A frame: the body (an attrs frame or a dict) and its signature, as JSON text."""
    doc = _conv.unstructure(body) if attrs.has(type(body)) else body
    return json.dumps({"body": doc, "sig": sign_document(doc, key).hex()},
                      separators=(",", ":"))


def open_envelope(text: str | bytes, key: Ed25519PublicKey) -> dict[str, Any]:
    """The verified body of a frame (``WireError`` bad_frame / bad_signature)."""
    if len(text) > MAX_FRAME_BYTES:
        raise WireError(BAD_FRAME, f"frame over {MAX_FRAME_BYTES} bytes")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise WireError(BAD_FRAME, f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"body", "sig"} \
            or not isinstance(doc["body"], dict) or not isinstance(doc["sig"], str):
        raise WireError(BAD_FRAME, "expected {body: object, sig: hex}")
    try:
        sig = bytes.fromhex(doc["sig"])
    except ValueError:
        raise WireError(BAD_SIGNATURE, "signature is not hex") from None
    try:
        verify_document(doc["body"], sig, key)
    except SignatureError as exc:
        raise WireError(BAD_SIGNATURE, str(exc)) from None
    body: dict[str, Any] = doc["body"]
    return body


def _structure(body: dict[str, Any], fn: Any) -> Any:
    try:
        return fn(body, None)
    except (ValueError, TypeError, KeyError, cattrs.BaseValidationError) as exc:
        detail = "; ".join(cattrs.transform_error(exc)) if isinstance(
            exc, cattrs.BaseValidationError) else str(exc)
        raise WireError(BAD_FRAME, detail[:300]) from None


def up_frame(body: dict[str, Any]) -> UpFrame:
    frame: UpFrame = _structure(body, _up)
    return frame


def down_frame(body: dict[str, Any]) -> DownFrame:
    frame: DownFrame = _structure(body, _down)
    return frame


def unstructure(value: Any) -> Any:
    return _conv.unstructure(value)


class SeqVerdict(enum.Enum):
    APPLY = "apply"
    REPLAYED = "replayed"
    GAP = "gap"


def judge_sequence(applied: int, seq: int) -> SeqVerdict:
    """*applied*: the highest sequence applied (every one below it too)."""
    if seq == applied + 1:
        return SeqVerdict.APPLY
    if seq <= applied:
        return SeqVerdict.REPLAYED
    return SeqVerdict.GAP


def judge_snapshot(running: int, offered: int) -> bool:
    """Apply a snapshot only when it is newer than the one running."""
    return offered > running


AGENT_STATUSES: Final = ("online", "stale", "offline", "quarantined")
#: The fields of an agent's view the master keeps (others are dropped: kept, a dc could
#: fill the master's memory through them).
VIEW_FIELDS: Final = ("status", "verdict", "datacenter", "node_size", "free", "mrtd",
                      "proof_sha256", "session_key_sha256", "deployments")
MAX_VIEW_DEPLOYMENTS: Final = 32  # 20,000 agents x 32 x ~170 bytes: ~100 MiB at most
VERDICTS: Final = ("pass", "warn", "fail", None)


def _check_view(agent_id: str, view: Any) -> None:
    """One agent's view as a dc reports it, or ``WireError`` bad_frame."""
    def bad(why: str) -> WireError:
        return WireError(BAD_FRAME, f"agent {agent_id[:80]!r}: {why}")

    if not isinstance(view, dict):
        raise bad("expected an object or null")
    if view.get("status") not in AGENT_STATUSES:
        raise bad(f"status must be one of {', '.join(AGENT_STATUSES)}")
    if view.get("verdict") not in VERDICTS:
        raise bad("verdict must be pass, warn, fail or null")
    for field in ("datacenter", "node_size"):
        if not isinstance(view.get(field), str) or len(view[field]) > MAX_ID_CHARS:
            raise bad(f"{field} must be a string")
    if not isinstance(view.get("free"), bool):
        raise bad("free must be a boolean")
    mrtd = view.get("mrtd")  # the measured image (digest) its attestation verified
    if mrtd is not None and not (lower_hex(mrtd) and len(mrtd) <= 192):
        raise bad("mrtd must be lowercase hex")
    # ee.federation.rpc.proof_digest of its proof; the SHA-256 of its admitted key
    for field in ("proof_sha256", "session_key_sha256"):
        digest = view.get(field)
        if digest is not None and not lower_hex(digest, 64):
            raise bad(f"{field} must be 64 lowercase hex digits")
    deployments = view.get("deployments")
    if isinstance(deployments, dict) and len(deployments) > MAX_VIEW_DEPLOYMENTS:
        raise bad(f"at most {MAX_VIEW_DEPLOYMENTS} deployments per agent")
    if not isinstance(deployments, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_ID_CHARS
            and len(v) <= 40 for k, v in deployments.items()):
        raise bad("deployments must map deployment ids to states")


def kept_view(view: dict[str, Any]) -> dict[str, Any]:
    """A checked view (``foreign_agents`` passed) with only ``VIEW_FIELDS``."""
    return {k: view[k] for k in VIEW_FIELDS if k in view}


def foreign_agents(label: str, data: dict[str, Any]) -> list[str]:
    """Agent ids an ``agents``/``resync`` event claims for a datacenter not *label*
    (``WireError`` bad_frame when the event is malformed)."""
    agents = data.get("agents")
    if not isinstance(agents, dict):
        raise WireError(BAD_FRAME, "event data needs an 'agents' object")
    out = []
    for agent_id, view in agents.items():
        if len(agent_id) > MAX_ID_CHARS:
            raise WireError(BAD_FRAME, "agent id too long")
        if view is None:
            continue
        _check_view(agent_id, view)
        if view["datacenter"] != label:
            out.append(agent_id[:80])
    return out


# ---- a dc's own metrics (``stats`` events) ---------------------------------------------

#: Histogram bounds of the dc CP's ``ee_attestation_seconds`` and ``ee_deploy_queue_seconds``
#: (ee.cp.metrics; a test holds them equal): a ``stats`` event must carry exactly these.
REGISTRATION_OUTCOMES: Final = ("admitted", "rejected")
DEPLOYMENT_OUTCOMES: Final = ("healthy", "failed")
#: (outcome, detail) pairs of registrations one ``stats`` event may carry; a dc folds the
#: rest into detail ``other`` (``ee.federation.metrics.dc_stats``).
MAX_STATS_LABELS: Final = 32
STATS_DETAIL: Final = r"[A-Za-z0-9_.:\-]{1,80}"  # a datacenter label or a refusal code


def _strict_int(value: Any, _: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"expected an integer in 0..{MAX_COUNT}")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError("expected a finite number >= 0")
    return float(value)


@attrs.frozen
class Histo:
    """A cumulative histogram: ``buckets[i]`` observations <= ``le[i]``, the last (one
    more than ``le``) is +Inf and equals ``count``."""

    le: tuple[float, ...]
    buckets: tuple[int, ...]
    sum: float
    count: int

    def __attrs_post_init__(self) -> None:
        if len(self.buckets) != len(self.le) + 1:
            raise ValueError("buckets must have one more entry than le (+Inf)")
        if any(a > b for a, b in zip(self.buckets, self.buckets[1:], strict=False)):
            raise ValueError("buckets must be cumulative (non-decreasing)")
        if self.buckets[-1] != self.count:
            raise ValueError("the +Inf bucket must equal count")


@attrs.frozen
class RegistrationCount:
    outcome: str = attrs.field(validator=attrs.validators.in_(REGISTRATION_OUTCOMES))
    detail: str = attrs.field(validator=attrs.validators.matches_re(STATS_DETAIL))
    count: int


def _known(keys: tuple[str, ...]) -> Any:
    def check(_: object, a: attrs.Attribute[dict[str, int]], value: dict[str, int]) -> None:
        if not set(value) <= set(keys):
            raise ValueError(f"{a.name} keys must be among {', '.join(keys)}")
    return check


@attrs.frozen
class Stats:
    """A dc CP's cumulative figures (its own CpMetrics), as one ``stats`` event carries
    them. Never a datacenter: the master labels them with the link's."""

    registrations: tuple[RegistrationCount, ...]
    attestation: Histo
    deployments: dict[str, int] = attrs.field(validator=_known(DEPLOYMENT_OUTCOMES))
    deploy_queue: Histo
    agents: dict[str, int] = attrs.field(validator=_known(AGENT_STATUSES))

    def __attrs_post_init__(self) -> None:
        if len(self.registrations) > MAX_STATS_LABELS:
            raise ValueError(f"at most {MAX_STATS_LABELS} registration labels")
        pairs = {(r.outcome, r.detail) for r in self.registrations}
        if len(pairs) != len(self.registrations):
            raise ValueError("registration labels must be unique")
        if self.attestation.le != ATTESTATION_LE:
            raise ValueError(f"attestation le must be {list(ATTESTATION_LE)}")
        if self.deploy_queue.le != DEPLOY_QUEUE_LE:
            raise ValueError(f"deploy_queue le must be {list(DEPLOY_QUEUE_LE)}")


_stats_conv = cattrs.Converter(forbid_extra_keys=True)
_stats_conv.register_structure_hook(int, _strict_int)
_stats_conv.register_structure_hook(float, _strict_float)


def check_stats(data: Any) -> Stats:
    """A ``stats`` event's data, structured strictly (``WireError`` bad_frame)."""
    if not isinstance(data, dict):
        raise WireError(BAD_FRAME, "stats: expected an object")
    regs = data.get("registrations")
    if not isinstance(regs, list):
        raise WireError(BAD_FRAME, "stats: registrations must be a list")
    if len(regs) > MAX_STATS_LABELS:  # before structuring all
        raise WireError(BAD_FRAME, f"stats: at most {MAX_STATS_LABELS} registration labels")
    stats: Stats = _structure(data, lambda doc, _: _stats_conv.structure(doc, Stats))
    return stats
