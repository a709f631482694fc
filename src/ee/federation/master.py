"""The master's side of federation: the cluster CA, join tokens, enrolled dcs, the mTLS
listener, and one ``FederatedDatacenterActor`` per dc CP.

Supervision subtree (a child of the CP's root)::

    federation (one_for_one)
    ├── listener         mTLS TCP listener; one task per dc connection
    └── dc/<label> ...   FederatedDatacenterActor per enrolled dc (repopulated on restart)

A dc connection: TLS 1.3 with a client certificate from the cluster CA (else the
handshake fails: event ``federation.refused`` ``unknown_certificate``); the certificate's
CN names the dc, and its SHA-256 must be the one pinned when that dc joined (same code).
Then a websocket on ``/api/v2/federation/stream``; every frame's signature is checked
against the dc's pinned Ed25519 key (off the event loop) and its body structured; a frame
that fails either is answered ``refused`` with its code and an event, and the link stays
up. Good frames go to the dc's actor, which owns all state of that dc: the highest
sequence applied (``judge_sequence``), the agents it reported, lag, spool depth, the
snapshot version it runs, its latest own metrics (``stats``, exported labelled with the
link's datacenter: ee.federation.metrics), and the degraded flag (no valid frame for
``degraded_after_s``). The master keeps none of it on disk: restarted, it adopts the
dc's first unacknowledged sequence and the dc resends its full picture (``resync``),
exactly as a standalone CP rebuilds from its agents.

What the master keeps on disk is configuration: the CA, its signing key, the enrolled dcs
(label, certificate fingerprint, signing key) and the signed desired-state document.
Join tokens are in memory only (single use, short lived; a restart voids them), by
their public id, each with the SHA-256 of its secret. A join carries no secret but the
token's id and a proof bound to the dc's label and public keys (``pki.join_body``); a
good proof consumes the token even if the join then fails. A wrong proof does not: the
id is public to whoever the dc talked to (a wrong ``--upstream`` included), and must not
let them void the token; the proof is a 256-bit MAC, so trying again gains nothing.

Placement across levels (ee.federation.placement): a master AppActor with no fitting
direct agent calls ``place`` (``AppDeps.remote``); the chosen dc's intent goes into the
signed desired state (``deployments``), the dc's ``placement`` events come back through
its actor (a report on a deployment not placed in that dc: ``foreign_deployment``; one
naming a replica on an agent that dc never reported as its own: ``foreign_agents``,
nothing applied) to ``placement_reported``, which re-routes an ``unsatisfiable`` one.
``view`` shapes the dc's word like a direct deployment's (replicas, failure, update,
history; a replica with another compose hash than the intent's shows failed), and
``update``/``rollback`` (the AppActor's ``RemotePlacer``) change the signed intent,
which the dc applies with its own rolling update. Each dc's actor keeps
its free capacity by node size up to date per event (``capacity``) for ``choose_target``.

Asking a dc (ee.federation.rpc): ``ask`` sends a signed ``request`` on the dc's link and
waits, in Trio time, for its ``response``; responses never reach the dc's actor (they are
not sequenced): the link loop hands them to ``MasterRpc.answered``, which refuses an id
not outstanding for that very dc, a duplicate or a late one.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ee.actors.agent import StatusReport
from ee.actors.datacenter import DescribeDatacenter
from ee.actors.deployment import derive
from ee.agent.http import TokenBucket
from ee.federation import pki
from ee.federation.metrics import DcStatsCollector, FederationMetrics
from ee.federation.placement import (
    FOREIGN_DEPLOYMENT,
    UNPLACED_REPLICAS,
    Datacenter,
    DcCapacity,
    Outcome,
    OutcomeError,
    capacity_of,
    check_outcome,
    choose_target,
    foreign_replicas,
    intent,
    intent_hashes,
    iso,
    ordered,
    shown_replicas,
    sized,
    slimmed,
    updated_intent,
)
from ee.federation.rpc import (
    DEFAULT_TIMEOUT_S,
    MAX_OUTSTANDING_PER_DC,
    MasterRpc,
)
from ee.federation.trust import FederationPolicy, carried_error
from ee.federation.wire import (
    BAD_FRAME,
    DATACENTER_MISMATCH,
    FOREIGN_AGENTS,
    HELLO_REQUIRED,
    MAX_COUNT,
    MAX_FRAME_BYTES,
    SEQUENCE_GAP,
    SEQUENCE_REPLAYED,
    STREAM_PATH,
    UNKNOWN_CERTIFICATE,
    Ack,
    DownFrame,
    Events,
    Hello,
    Refused,
    Replay,
    Response,
    SeqVerdict,
    Snapshot,
    Stats,
    WireError,
    check_stats,
    foreign_agents,
    judge_sequence,
    kept_view,
    open_envelope,
    seal,
    up_frame,
)
from ee.placement import Constraints, Placement, Request
from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    public_key_from_bytes,
    read_signed,
    save_private_key,
    write_signed,
)
from ee.protocol.strict import check, lower_hex, printable
from ee.runtime import Actor, ActorError, Registry, handler
from ee.supervisors import ChildSpec, Restart, Supervisor, actor_spec

log = logging.getLogger("ee.federation")

#: Agents one dc may have reported at once (beyond: ``too_many_agents``, nothing applied):
#: the master keeps every reported view in memory.
MAX_AGENTS_PER_DC = 20_000
TOO_MANY_AGENTS = "too_many_agents"
#: The signed desired state carries every intent's version spec (compose, build context,
#: env), and goes to every dc as one frame: past this size no dc could receive it (the
#: link's message cap) and every link would fail on it. A placement or change that
#: would grow it past this is refused (``SNAPSHOT_FULL``), nothing published.
MAX_SNAPSHOT_BYTES = MAX_FRAME_BYTES - (64 << 10)
MAX_PENDING_HANDSHAKES = 64  # federation listener: TLS handshakes at once (a dc is one)
#: A UTC timestamp as CPs write them (``placement.iso``): the only form of a dc's
#: ``finished_at`` that enters a history.
ISO_UTC: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
STRANGER_EVENT_BURST: Final = 20.0  # refusal events per source (strangers, each dc)
STRANGER_EVENTS_PER_S: Final = 0.2
SNAPSHOT_FULL = "SNAPSHOT_FULL"

Emit = Callable[[str, str, Any], None]


class JoinRefused(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@attrs.frozen
class FederationSettings:
    listen: str = "127.0.0.1:8002"  # the master's mTLS listener for dc CPs
    advertise: str | None = None  # HOST:PORT dc CPs dial (default: listen)
    degraded_after_s: float = 30.0  # silence after which a dc is degraded
    join_token_ttl_s: float = 600.0
    heartbeat_s: float = 2.0  # a dc sends at least one frame this often
    verify_threads: int = 2
    ask_timeout_s: float = DEFAULT_TIMEOUT_S  # a request to a dc (ee.federation.rpc)
    asks_per_dc: int = MAX_OUTSTANDING_PER_DC
    stats_interval_s: float = 15.0  # a dc sends its own metrics this often (if changed)


@attrs.frozen
class Enrolled:
    label: str
    fingerprint: str  # SHA-256 of the dc's certificate (DER)
    signing_key: str  # hex Ed25519 public key
    enrolled_at: float

    def public_key(self) -> Ed25519PublicKey:
        return public_key_from_bytes(bytes.fromhex(self.signing_key))


@attrs.frozen
class JoinToken:
    """A join token as the master keeps it (in memory, by its public id)."""

    expires_at: float  # trio time
    datacenter: str | None  # None: any label not yet enrolled (a re-join needs a bound one)
    secret_hash: str  # SHA-256 of its secret (``pki.join_secret_hash``): the proof's key




@attrs.frozen
class JoinRequest:
    """``POST /api/v2/federation/join`` (public; the proof of a join token authenticates:
    ``pki.join_body``). There is no ``token`` field: the secret never travels."""

    token_id: str = attrs.field(validator=check(partial(lower_hex, length=32),
                                                "32 lower-case hex characters"))
    proof: str = attrs.field(validator=check(partial(lower_hex, length=64),
                                             "64 lower-case hex characters"))
    datacenter: str = attrs.field(validator=attrs.validators.max_len(120))
    tls_public_key: str = attrs.field(validator=attrs.validators.max_len(2000))
    signing_key: str = attrs.field(validator=attrs.validators.matches_re(r"[0-9a-f]{64}"))


@attrs.frozen
class JoinTokenRequest:
    """``POST /api/v2/federation/join-tokens`` (admin)."""

    datacenter: str | None = None
    ttl_s: float | None = attrs.field(default=None, validator=attrs.validators.optional(
        [attrs.validators.gt(0.0), attrs.validators.le(86400.0)]))


# ---- the per-dc actor ----------------------------------------------------------------


@attrs.frozen
class LinkOpened:
    conn: int


@attrs.frozen
class LinkClosed:
    conn: int


@attrs.frozen
class Frame:
    frame: Hello | Events
    unix: float
    conn: int = 0


@attrs.frozen
class ReportedAgent:
    """The view of one agent as the dc last reported it (None: not reported)."""

    agent_id: str


@attrs.frozen
class Refusal:
    code: str
    detail: str


def aggregate(label: str, agents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts by status, attestation outcomes, capacity and deployment states."""
    counts = {"online": 0, "stale": 0, "offline": 0, "quarantined": 0}
    passed = failed = 0
    capacity: dict[str, dict[str, int]] = {}
    deployments: dict[str, int] = {}
    by_mrtd: dict[str, int] = {}
    for view in agents.values():
        status = str(view.get("status"))
        counts[status] = counts.get(status, 0) + 1
        if status != "offline":
            if view.get("verdict") in ("pass", "warn") and status != "quarantined":
                passed += 1
            else:
                failed += 1
            if view.get("mrtd"):
                by_mrtd[str(view["mrtd"])] = by_mrtd.get(str(view["mrtd"]), 0) + 1
        size = capacity.setdefault(str(view.get("node_size")), {"total": 0, "free": 0})
        size["total"] += 1
        size["free"] += 1 if view.get("free") else 0
        for state in (view.get("deployments") or {}).values():
            deployments[str(state)] = deployments.get(str(state), 0) + 1
    return {"agents": {"total": len(agents), **counts},
            "attestation": {"pass": passed, "fail": failed, "by_mrtd": by_mrtd},
            "capacity": capacity, "deployment_states": deployments}


class FederatedDatacenterActor(Actor):
    """A dc CP as the master sees it: ``dc/<label>``, answering ``DescribeDatacenter``
    like a direct datacenter (``mode: federated``)."""

    def __init__(self, label: str, fed: MasterFederation) -> None:
        self.label = label
        self.fed = fed
        self.applied: int | None = None  # highest sequence applied (None: not yet known)
        self.awaiting_replay: int | None = None
        self.agents: dict[str, dict[str, Any]] = {}
        self.links: set[int] = set()
        self.last_heard = trio.current_time()
        self.ever_heard = False
        self.last_lag = 0.0
        self.spool_depth = 0
        self.last_seq = 0
        self.snapshot_version = 0
        self.events_applied = 0
        self.replayed = 0
        self.gaps = 0
        self.refused = 0
        self.degraded = True
        self.outcomes: list[Outcome] = []  # placement events applied, for the master
        self.free: dict[str, int] = {}  # node size -> free agents (``capacity_of``)
        # Placement reports naming agents this actor does not know (yet): see _held_outcome.
        self.synced = False  # a full picture (``resync``) arrived since this actor started
        self.held: dict[str, Outcome] = {}

    async def started(self) -> None:
        self._publish_capacity()  # not a former incarnation's (it may have said online)
        self.start_soon(self._watch)

    async def _watch(self) -> None:
        period = min(1.0, self.fed.settings.degraded_after_s / 4)
        while True:
            self._judge_degraded()
            m = self.fed.metrics
            m.sync_lag.labels(self.label).set(self._lag())
            m.spool_depth.labels(self.label).set(self.spool_depth)
            await trio.sleep(period)

    def _publish_capacity(self) -> None:
        self.fed.capacity[self.label] = DcCapacity(
            self.label, self.degraded, {k: v for k, v in self.free.items() if v > 0})
        self.fed.dc_agents[self.label] = self.agents  # what view() checks replicas by

    def _silence(self) -> float:
        return trio.current_time() - self.last_heard

    def _lag(self) -> float:
        return self.last_lag if self.links else self.last_lag + self._silence()

    def _judge_degraded(self) -> None:
        degraded = not self.ever_heard or self._silence() > self.fed.settings.degraded_after_s
        if degraded != self.degraded:
            self.degraded = degraded
            self._publish_capacity()
            kind = "federation.degraded" if degraded else "federation.recovered"
            self.fed.emit(kind, self.label, {"silence_s": round(self._silence(), 3)})

    def _refuse(self, code: str, detail: str) -> Refused:
        self.refused += 1
        self.fed.refuse(self.label, code, detail)
        return Refused("refused", code, detail)

    @handler(LinkOpened)
    async def on_open(self, msg: LinkOpened) -> None:
        self.links.add(msg.conn)

    @handler(LinkClosed)
    async def on_close(self, msg: LinkClosed) -> None:
        self.links.discard(msg.conn)

    @handler(StatusReport)
    async def on_report(self, _: StatusReport) -> None:
        """A direct agent of this label (refused at admission while federated)."""

    @handler(Frame)
    async def on_frame(self, msg: Frame) -> list[DownFrame]:
        self.last_heard = trio.current_time()
        self.ever_heard = True
        self.links.add(msg.conn)  # also after this actor restarted under a live link
        frame = msg.frame
        self.snapshot_version = frame.snapshot_version
        if isinstance(frame, Hello):
            self.last_seq = frame.next_seq - 1
            out = self._hello(frame)
        else:
            self.last_seq = max(self.last_seq, frame.last_seq)
            out = self._events(frame, msg.unix)
        # What the dc holds that this master has not applied (acked) yet.
        self.spool_depth = max(0, self.last_seq - (self.applied or 0))
        outcomes, self.outcomes = self.outcomes, []
        for outcome in outcomes:
            await self.fed.placement_reported(self.label, outcome)
        return out

    def _hello(self, h: Hello) -> list[DownFrame]:
        base = h.first_unacked - 1
        if self.applied is None:
            self.applied = base
            self.fed.emit("federation.linked", self.label, {"from_seq": h.first_unacked})
        elif self.applied < base or self.applied >= h.next_seq:
            # The dc's spool does not continue what this master applied (it was wiped,
            # or another incarnation acked): start from the dc's, counted as an error.
            self.fed.metrics.sequence_errors.labels(self.label).inc()
            self.fed.emit("federation.sequence_reset", self.label,
                          {"applied": self.applied, "first_unacked": h.first_unacked})
            self.applied = base
        self.awaiting_replay = None
        self._judge_degraded()
        return [Ack("ack", self.applied)]

    def _events(self, frame: Events, unix: float) -> list[DownFrame]:
        out: list[DownFrame] = []
        if self.applied is None:
            # This actor restarted under a live link: the dc must say hello again.
            return [self._refuse(HELLO_REQUIRED, "events before hello")]
        replayed: list[int] = []
        newest = None
        for ev in frame.events:
            verdict = judge_sequence(self.applied, ev.seq)
            if verdict is SeqVerdict.REPLAYED:
                replayed.append(ev.seq)
                continue
            if verdict is SeqVerdict.GAP:
                if self.awaiting_replay != self.applied + 1:
                    self.awaiting_replay = self.applied + 1
                    self.gaps += 1
                    self.fed.metrics.sequence_errors.labels(self.label).inc()
                    self.fed.metrics.replays.labels(self.label).inc()
                    self.fed.refuse(self.label, SEQUENCE_GAP,
                                    f"expected {self.applied + 1}, got {ev.seq}")
                    out.append(Replay("replay", self.applied + 1, SEQUENCE_GAP))
                break
            self.awaiting_replay = None
            self.applied = ev.seq
            newest = ev.at if newest is None else max(newest, ev.at)
            try:
                refusal = self._apply(ev.kind, ev.data)
            except Exception as exc:  # a signed but malformed event: refused, consumed;
                # never a crashed actor (restarted, it would be sent the same one again)
                log.warning("federation: %s event %d of %s could not be applied: %r",
                            ev.kind[:40], ev.seq, self.label, exc)
                refusal = self._refuse(BAD_FRAME, f"{ev.kind[:40]} event {ev.seq}: "
                                       "malformed")
            if refusal is not None:
                out.append(refusal)
        if replayed:
            self.replayed += len(replayed)
            self.fed.metrics.sequence_errors.labels(self.label).inc(len(replayed))
            detail = f"{len(replayed)} already applied ({replayed[0]}..{replayed[-1]})"
            self.fed.refuse(self.label, SEQUENCE_REPLAYED, detail)
            out.append(Refused("refused", SEQUENCE_REPLAYED, detail))
        if newest is not None:
            self.last_lag = max(0.0, unix - newest)
        self._judge_degraded()
        out.append(Ack("ack", self.applied))
        return out

    def _apply(self, kind: str, data: dict[str, Any]) -> Refused | None:
        """Apply one in-sequence event whole, or nothing of it (refused: still consumed)."""
        if kind == "snapshot_applied":
            version = data.get("version")
            if not isinstance(version, int) or isinstance(version, bool) \
                    or not 0 <= version <= MAX_COUNT:
                return self._refuse(BAD_FRAME, "snapshot_applied needs an integer version")
            self.snapshot_version = version
            self.events_applied += 1
            return None
        if kind == "stats":  # the dc's own metrics: the latest replaces (ee.federation.metrics)
            try:
                stats = check_stats(data)
            except WireError as exc:
                return self._refuse(exc.code, exc.detail)
            self.fed.dc_stats[self.label] = stats  # labelled by this link, never the body
            self.events_applied += 1
            return None
        if kind == "placement":
            try:
                outcome = check_outcome(data)
            except OutcomeError as exc:
                return self._refuse(BAD_FRAME, f"placement: {exc}")
            if self.fed.intent_datacenter(outcome.deployment_id) != self.label:
                return self._refuse(FOREIGN_DEPLOYMENT, f"deployment "
                                    f"{outcome.deployment_id[:80]!r} is not placed in "
                                    f"{self.label}")
            foreign = foreign_replicas(outcome, self.agents)
            if foreign:
                return self._held_outcome(outcome, foreign)
            self.held.pop(outcome.deployment_id, None)  # a newer word replaces it
            self.outcomes.append(sized(outcome, self.agents))
            self.events_applied += 1
            return None
        try:
            foreign = foreign_agents(self.label, data)
        except WireError as exc:
            return self._refuse(exc.code, exc.detail)
        if foreign:
            return self._refuse(FOREIGN_AGENTS, f"{len(foreign)} agents not of datacenter "
                                f"{self.label}: {', '.join(foreign[:5])}")
        agents = {k: None if v is None else kept_view(v) for k, v in data["agents"].items()}
        total = sum(1 for v in agents.values() if v is not None) if kind == "resync" \
            else len(self.agents) + sum(
                (v is not None) - (v is None) for k, v in agents.items()
                if (k in self.agents) == (v is None))
        if total > MAX_AGENTS_PER_DC:
            return self._refuse(TOO_MANY_AGENTS, f"{total} agents reported, at most "
                                f"{MAX_AGENTS_PER_DC} per datacenter")
        if kind == "resync":
            self.agents = {k: v for k, v in agents.items() if v is not None}
            self.free = dict(capacity_of(self.label, False, self.agents.values()).free)
            self.synced = True
        else:
            for agent_id, view in agents.items():
                self._count(self.agents.get(agent_id), -1)
                self._count(view, 1)
                if view is None:
                    self.agents.pop(agent_id, None)
                else:
                    self.agents[agent_id] = view
        self._publish_capacity()
        self.events_applied += 1
        self._release_held()
        return None

    def _held_outcome(self, outcome: Outcome, foreign: list[str]) -> Refused | None:
        """A report naming agents (or node sizes) this dc has not reported is applied
        to nothing. It is held (the latest per deployment, so at most one per intent)
        and applied only once this dc's own agent reports make it check: a report
        spooled before the dc's ``resync`` (after a master restart), or sent before the
        outbox's word on a just-placed agent, arrives ahead of the agents it names.
        Before this actor's first ``resync`` that is expected (held silently); after
        it, it is refused (``foreign_agents``, an event), and still never applied
        unless the dc reports those agents as its own."""
        self.held[outcome.deployment_id] = outcome
        if not self.synced:
            return None
        return self._refuse(FOREIGN_AGENTS, f"{len(foreign)} replicas of "
                            f"{outcome.deployment_id[:80]!r} on agents not of "
                            f"datacenter {self.label}: {', '.join(foreign[:5])}")

    def _release_held(self) -> None:
        for dep_id, outcome in list(self.held.items()):
            if self.fed.intent_datacenter(dep_id) != self.label:
                del self.held[dep_id]
            elif not foreign_replicas(outcome, self.agents):
                del self.held[dep_id]
                self.outcomes.append(sized(outcome, self.agents))

    def _count(self, view: dict[str, Any] | None, delta: int) -> None:
        """Keep ``free`` (placement's capacity) by the change of one agent's view."""
        if view is not None:
            for size, n in capacity_of(self.label, False, (view,)).free.items():
                self.free[size] = self.free.get(size, 0) + delta * n

    @handler(ReportedAgent)
    async def on_reported_agent(self, msg: ReportedAgent) -> dict[str, Any] | None:
        return self.agents.get(msg.agent_id)

    @handler(DescribeDatacenter)
    async def on_describe(self, _: DescribeDatacenter) -> dict[str, Any]:
        self._judge_degraded()
        return {"datacenter": self.label, "label": self.label, "mode": "federated",
                **aggregate(self.label, self.agents),
                "degraded": self.degraded, "connected": bool(self.links),
                "sync_lag_s": round(self._lag(), 3), "spool_depth": self.spool_depth,
                "snapshot_version": self.snapshot_version,
                "applied_seq": self.applied, "events_applied": self.events_applied,
                "replayed": self.replayed, "gaps": self.gaps, "refused": self.refused,
                "silence_s": round(self._silence(), 3)}


# ---- the master ------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def gate_rollback_eras(eras: list[dict[str, Any]], version: str,
                       update: Mapping[str, Any] | None,
                       now: str | None = None) -> list[dict[str, Any]]:
    """The history of a dc-placed deployment whose dc's health gate rolled the update
    back to *version*: the last era closed, and one for *version* from then (the
    rollback's ``finished_at`` as the dc reported it; a value that is not a UTC
    timestamp of a real date adds nothing: the dc's word is shown, never parsed
    loosely). The dc's instant is kept within the era it closes and *now* (default:
    the wall clock): a lying dc cannot end an era before it began or in the future."""
    at = update.get("finished_at") if update is not None else None
    if not isinstance(at, str) or not ISO_UTC.fullmatch(at) or not eras \
            or eras[-1]["version"] == version:
        return eras
    try:
        datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:  # the 13th month, the 30th of February
        return eras
    began = str(eras[-1]["from"])  # the same fixed-width form: strings order as times
    at = min(max(at, began), max(began, now if now is not None else iso(time.time())))
    return [*eras[:-1], {**eras[-1], "to": at}, {"version": version, "from": at, "to": None}]


class MasterFederation:
    def __init__(self, data_dir: Path, cluster_id: str, settings: FederationSettings, *,
                 registry: Registry, emit: Emit, metrics: CollectorRegistry,
                 normalise: Callable[[str], str] = lambda s: s) -> None:
        self.dir = data_dir / "federation"
        self.cluster_id = cluster_id
        self.settings = settings
        self.registry = registry
        self.emit = emit
        self.normalise = normalise
        self.metrics = FederationMetrics(metrics)
        self.ca = pki.ClusterCa.load_or_create(self.dir, cluster_id)
        key_path = self.dir / "master.key"
        if not key_path.exists():
            save_private_key(key_path, generate_signing_key())
        try:
            self.key = load_private_key(key_path)
        except KeyFileError as exc:
            raise ValueError(f"federation: {exc}") from None
        self.enrolled = self._load_enrolled()
        self.tokens: dict[str, JoinToken] = {}  # by id (pki.join_token_id)
        self.desired = self._load_desired()
        self.desired_changed = trio.Event()
        self.capacity: dict[str, DcCapacity] = {}  # kept by each dc's actor
        self.dc_agents: dict[str, Mapping[str, Mapping[str, Any]]] = {}  # same: its agents
        self.dc_stats: dict[str, Stats] = {}  # same: its own metrics, the latest
        metrics.register(DcStatsCollector(lambda: {
            label: st for label, st in self.dc_stats.items() if label in self.enrolled}))
        # deployment id -> (dc, its last word): a rerouted intent's new dc speaks next
        self.outcomes: dict[str, tuple[str, Outcome]] = {}
        self._desired_lock = trio.Lock()
        self._enrolled_lock = trio.Lock()  # one writer of dcs.json at a time
        # Refusal events per source (None: strangers; else the dc's label), and those
        # left out since the source's last emitted one: one source's flood suppresses
        # only its own.
        self._refusal_buckets: dict[str | None, TokenBucket] = {}
        self._suppressed: dict[str | None, int] = {}
        self.verify_limiter = trio.CapacityLimiter(settings.verify_threads)
        # TLS handshakes in progress on the federation listener (strangers included):
        # beyond this a new connection is closed at once, never queued.
        self.handshakes = trio.CapacityLimiter(MAX_PENDING_HANDSHAKES)
        self.bound_port: int | None = None
        self._conn_ids = 0
        self._links: dict[str, trio.CancelScope] = {}
        self._ssl: ssl.SSLContext | None = None
        self.rpc = MasterRpc(partial(seal, key=self.key), self.refuse,
                             timeout_s=settings.ask_timeout_s, per_dc=settings.asks_per_dc)
        self.supervisor = Supervisor(
            "federation", [ChildSpec(id="listener", start=self._run_listener, shutdown=2.0)],
            max_restarts=20, period=10.0, populate=self._populate)

    # ---- configuration on disk ----

    def _load_enrolled(self) -> dict[str, Enrolled]:
        path = self.dir / "dcs.json"
        if not path.exists():
            return {}
        doc = json.loads(path.read_text())
        return {d["label"]: Enrolled(**d) for d in doc["dcs"]}

    def _save_enrolled(self) -> None:
        doc = {"dcs": [attrs.asdict(e) for e in sorted(self.enrolled.values(),
                                                      key=lambda e: e.label)]}
        pki.write_public(self.dir / "dcs.json", json.dumps(doc, indent=1).encode())

    def _load_desired(self) -> Snapshot:
        path = self.dir / "desired.json"
        if not path.exists():
            return Snapshot("snapshot", 0, 0.0, {"policy": {}})
        try:
            doc = read_signed(path, self.key.public_key())
        except SignatureError as exc:
            raise ValueError(f"federation: {path}: {exc}") from None
        return Snapshot("snapshot", int(doc["version"]), float(doc["issued_at"]),
                        dict(doc["desired"]))

    def master_key_hex(self) -> str:
        return public_key_bytes(self.key).hex()

    def pin(self) -> str:
        """The master pin a dc checks its join answer against (``pki.master_pin``)."""
        return pki.master_pin(pki.cert_pem(self.ca.cert), self.master_key_hex())

    def is_federated(self, label: str) -> bool:
        return label in self.enrolled

    # ---- join ----

    def issue_token(self, datacenter: str | None, ttl_s: float | None) -> dict[str, Any]:
        now = trio.current_time()
        self.tokens = {h: t for h, t in self.tokens.items() if t.expires_at > now}
        label = self.normalise(datacenter) if datacenter else None
        secret = pki.TOKEN_PREFIX + secrets.token_urlsafe(32)
        ttl = ttl_s if ttl_s is not None else self.settings.join_token_ttl_s
        secret_hash = pki.join_secret_hash(secret)
        self.tokens[pki.join_token_id(secret_hash)] = JoinToken(now + ttl, label, secret_hash)
        self.emit("federation.join_token", label or "*", {"ttl_s": ttl})
        pin = self.pin()
        out: dict[str, Any] = {"token": pki.join_token_text(secret, pin), "pin": pin,
                               "expires_in_s": ttl, "datacenter": label}
        if label is not None and label in self.enrolled:
            # Issued all the same (a re-join is how leaked keys are replaced), but said:
            # joining with it replaces the pinned keys and cuts the running dc off.
            linked = "linked now" if label in self._links else "not linked now"
            out["warning"] = (f"datacenter {label} is enrolled ({linked}): joining with "
                              "this token replaces its keys and cuts the running dc off")
        return out

    def advertised(self) -> str:
        host, port = _host_port(self.settings.advertise or self.settings.listen)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if not self.settings.advertise and self.bound_port:
            port = self.bound_port
        return f"{host}:{port}"

    def _redeem(self, req: JoinRequest) -> JoinToken:
        """The token *req* proves it holds, taken out (single use); JoinRefused
        ``join_token_invalid`` for an unknown id, an expired token or a wrong proof."""
        now = trio.current_time()
        # Found by its id (public: whoever the dc talked to knows it), never by a hash
        # per live token: a stranger's join costs one lookup, however many are live.
        held = self.tokens.get(req.token_id)
        invalid = JoinRefused("join_token_invalid", "unknown, used or expired join token, "
                              "or a proof not made with it for these keys")
        if held is None:
            raise invalid
        if held.expires_at <= now:
            del self.tokens[req.token_id]
            raise invalid
        proof = pki.join_proof(held.secret_hash, req.datacenter, req.tls_public_key,
                               req.signing_key)
        if not hmac.compare_digest(proof, req.proof):  # the secret-keyed part
            raise invalid  # the token stays (module docstring)
        return self.tokens.pop(req.token_id)  # single use, even if the rest fails

    async def join(self, req: JoinRequest) -> dict[str, Any]:
        """Consume a join token: issue the dc's certificate and pin its keys."""
        found = self._redeem(req)
        label = self.normalise(req.datacenter)
        if found.datacenter is not None and found.datacenter != label:
            raise JoinRefused("join_token_datacenter",
                              f"this token is for datacenter {found.datacenter}")
        if found.datacenter is None and label in self.enrolled:
            # Re-joining replaces the pinned certificate and key of a live dc: only with
            # a token the admin bound to that label, never with a general one.
            raise JoinRefused("join_token_unbound",
                              f"{label} is enrolled; a re-join needs a token bound to it "
                              "(eectl federation join-token --datacenter)")
        if label not in self.enrolled and f"dc/{label}" in self.registry:
            raise JoinRefused("datacenter_is_direct",
                              f"agents of {label} are connected to this master directly")
        try:
            cert = await trio.to_thread.run_sync(self.ca.issue, label, req.tls_public_key)
        except pki.PkiError as exc:
            raise JoinRefused("bad_key", str(exc)) from None
        if found.datacenter is None and label in self.enrolled:
            # Checked again after the await: a concurrent join with another general
            # token enrolled this label meanwhile; this one must not replace its keys.
            raise JoinRefused("join_token_unbound",
                              f"{label} was enrolled meanwhile; a re-join needs a token "
                              "bound to it (eectl federation join-token --datacenter)")
        self.enrolled[label] = Enrolled(label, pki.cert_fingerprint(cert), req.signing_key,
                                        time.time())
        # A re-join replaces the pinned keys (say they leaked): a link opened with the
        # old ones must not go on being trusted until it drops by itself.
        old_link = self._links.pop(label, None)
        if old_link is not None:
            old_link.cancel()
        async with self._enrolled_lock:  # each save writes the state as it is then
            await trio.to_thread.run_sync(self._save_enrolled)
        await self._ensure_actor(label)
        self.emit("federation.joined", label, {"fingerprint": self.enrolled[label].fingerprint})
        return {"datacenter": label, "certificate": pki.cert_pem(cert),
                "ca": pki.cert_pem(self.ca.cert), "master_key": self.master_key_hex(),
                "stream_url": f"wss://{self.advertised()}{STREAM_PATH}",
                "cluster_id": self.cluster_id}

    # ---- desired state ----

    async def set_desired(self, policy: FederationPolicy) -> Snapshot:
        """The policy part (ee.federation.trust: checked before it gets here)."""
        async with self._desired_lock:
            return await self._publish({**self.desired.desired, "policy": policy.to_json()})

    async def set_releases(self, bodies: list[dict[str, Any]]) -> Snapshot | None:
        """Carry the master's admitted releases (``trust.carried_releases``) to every dc:
        a new version when they changed (None: unchanged, or refused: too many, too
        large, or the snapshot would be over ``MAX_SNAPSHOT_BYTES``; an event says so,
        and the dcs keep the releases of the version they run, less those withdrawn
        here since: a withdrawal always goes down, it only makes the set smaller)."""
        async with self._desired_lock:
            old = list(self.desired.desired.get("releases") or [])
            if old == bodies:
                return None
            desired = {**self.desired.desired, "releases": bodies}

            def judge() -> tuple[str | None, list[dict[str, Any]]]:  # off the event loop
                kept = [b for b in old if b in bodies]
                if len(json.dumps(desired, separators=(",", ":"))) > MAX_SNAPSHOT_BYTES:
                    return f"the desired state would be over {MAX_SNAPSHOT_BYTES} bytes", kept
                return carried_error(bodies), kept

            error, kept = await trio.to_thread.run_sync(judge)
            if error is not None:
                log.error("federation: admitted releases not carried to the dcs: %s", error)
                self.emit("federation.refused", "releases",
                          {"code": SNAPSHOT_FULL, "detail": error})
                if kept == old:
                    return None
                bodies = kept  # the withdrawals alone
                desired = {**self.desired.desired, "releases": kept}
            snap = await self._publish(desired)
        self.emit("federation.releases", "master", {"version": snap.version,
                                                    "releases": len(bodies)})
        return snap

    async def _publish(self, desired: dict[str, Any]) -> Snapshot:
        """Sign *desired* as the next version, write it, then offer it to every dc."""
        version = self.desired.version + 1
        snap = Snapshot("snapshot", version, time.time(), desired)
        doc = {"version": snap.version, "issued_at": snap.issued_at, "desired": snap.desired}
        await trio.to_thread.run_sync(write_signed, self.dir / "desired.json", doc, self.key)
        self.desired = snap
        changed, self.desired_changed = self.desired_changed, trio.Event()
        changed.set()
        self.emit("federation.desired", "master", {"version": version})
        return snap

    def snapshot_frame(self, label: str | None = None) -> str:
        """The signed desired state; for one dc's link (*label*) with only the intents
        placed in that dc: a dc never reads another dc's tenants' workloads (compose,
        build context, env values). A dc stops a local deployment no intent names, so
        an intent moved away still stops there."""
        if label is None or "deployments" not in self.desired.desired:
            return seal(self.desired, self.key)
        mine = {dep_id: doc for dep_id, doc in self._intents().items()
                if isinstance(doc, dict) and doc.get("datacenter") == label}
        return seal(attrs.evolve(self.desired, desired={**self.desired.desired,
                                                        "deployments": mine}), self.key)

    # ---- placement across levels (ee.federation.placement) ----

    def _intents(self) -> dict[str, dict[str, Any]]:
        return dict(self.desired.desired.get("deployments") or {})

    def placed_apps(self) -> dict[str, str]:
        """Deployment id -> app key of every intent (the CP's index, after a restart)."""
        return {dep_id: str(doc["app"]) for dep_id, doc in self._intents().items()}

    def intent_datacenter(self, deployment_id: str) -> str | None:
        found = self._intents().get(deployment_id)
        return None if found is None else str(found["datacenter"])

    async def _fits(self, deployment_id: str, doc: dict[str, Any]) -> bool:
        """Would the desired state with *doc* as that intent stay under the budget?"""
        desired = {**self.desired.desired,
                   "deployments": {**self._intents(), deployment_id: doc}}
        size = await trio.to_thread.run_sync(
            lambda: len(json.dumps(desired, separators=(",", ":"))))
        return size <= MAX_SNAPSHOT_BYTES

    async def _set_intent(self, deployment_id: str, doc: dict[str, Any]) -> None:
        intents = self._intents()
        intents[deployment_id] = doc
        await self._publish({**self.desired.desired, "deployments": intents})

    async def place(self, app_key: str, deployment_id: str, version: dict[str, Any],
                    replicas: int, constraints: Constraints,
                    direct: Placement) -> dict[str, Any] | None:
        """No direct agent fits: a datacenter, or why none (None: no dc enrolled)."""
        if not self.enrolled:
            return None
        request = Request(deployment_id=None, replicas=replicas, constraints=constraints)
        async with self._desired_lock:
            target = choose_target(request, self.capacity.values())
            if not isinstance(target, Datacenter):
                self.emit("federation.unplaceable", app_key, {"datacenters": dict(
                    target.codes), "reasons": direct.reason_counts()})
                return {"error": "not_placeable", "placement": {
                    **direct.to_dict(), "datacenters": dict(target.codes)}}
            doc = intent(app_key, version, replicas, constraints, target.label,
                         created_at=time.time())
            if not await self._fits(deployment_id, doc):
                self.emit("federation.unplaceable", app_key,
                          {"datacenters": {target.label: SNAPSHOT_FULL}})
                return {"error": "not_placeable", "placement": {
                    **direct.to_dict(), "datacenters": {target.label: SNAPSHOT_FULL}}}
            await self._set_intent(deployment_id, doc)
        self.emit("federation.placed", deployment_id, {"app": app_key,
                                                       "datacenter": target.label})
        return {"deployment_id": deployment_id, "datacenter": target.label}

    async def placement_reported(self, label: str, outcome: Outcome) -> None:
        """A dc's word on an intent (checked by its actor to be that dc's). Unsatisfiable:
        the next datacenter; none left: the deployment fails with every dc's codes."""
        self.outcomes[outcome.deployment_id] = (label, outcome)
        self.emit("federation.placement", outcome.deployment_id, {
            "datacenter": label, "outcome": outcome.outcome,
            "reasons": dict(outcome.reasons), "running": outcome.running})
        if outcome.outcome == "stopped":
            async with self._desired_lock:  # stopped there: keep only what the view needs
                doc = self._intents().get(outcome.deployment_id)
                slim = None if doc is None or doc["datacenter"] != label else slimmed(doc)
                if slim is not None:
                    await self._set_intent(outcome.deployment_id, slim)
            return
        if outcome.outcome != "unsatisfiable":
            return
        async with self._desired_lock:
            doc = self._intents().get(outcome.deployment_id)
            if doc is None or doc["datacenter"] != label or doc["desired"] != "running":
                return
            tried = frozenset(doc.get("tried") or ()) | {label}
            # Each dc's reason codes stay with the intent (signed, survives a restart).
            said = {**(doc.get("reasons") or {}), label: dict(outcome.reasons)}
            c = doc["constraints"]
            request = Request(deployment_id=None, replicas=int(doc["replicas"]),
                              constraints=Constraints(
                                  node_size=c.get("node_size"), gpu=bool(c.get("gpu")),
                                  exclude_agents=frozenset(c.get("exclude_agents") or ())))
            target = choose_target(request, self.capacity.values(), tried)
            if isinstance(target, Datacenter):
                await self._set_intent(outcome.deployment_id, {
                    **doc, "datacenter": target.label, "tried": sorted(tried),
                    "reasons": said})
                self.emit("federation.rerouted", outcome.deployment_id,
                          {"from": label, "to": target.label})
            elif UNPLACED_REPLICAS in outcome.reasons:
                # Placed there once, stuck now, and no other dc fits: it stays (its dc
                # keeps trying, and fails it after its own placing timeout, as a direct
                # deployment would be), rather than failing at once.
                self.emit("federation.unplaceable", outcome.deployment_id,
                          {"datacenters": dict(target.codes), "reasons": said,
                           "kept_in": label})
            else:
                stopped = {**doc, "tried": sorted(tried), "desired": "stopped",
                           "reasons": said, "unplaced": dict(target.codes)}
                await self._set_intent(outcome.deployment_id, slimmed(stopped) or stopped)
                self.emit("federation.unplaceable", outcome.deployment_id,
                          {"datacenters": dict(target.codes), "reasons": said})

    def view(self, app_key: str, deployment_id: str) -> dict[str, Any] | None:
        """The tenant's view of a deployment placed in a dc (shaped as a direct one's)."""
        doc = self._intents().get(deployment_id)
        if doc is None or doc["app"] != app_key:
            return None
        said = self.outcomes.get(deployment_id)
        got = said[1] if said is not None and said[0] == doc["datacenter"] else None
        unplaced = doc.get("unplaced")
        by_dc: dict[str, dict[str, int]] = doc.get("reasons") or {}
        hashes = intent_hashes(doc)
        version = doc["version"]
        size = (doc.get("constraints") or {}).get("node_size")
        replicas = shown_replicas(got, hashes, self.dc_agents.get(doc["datacenter"], {}),
                                  size if isinstance(size, str) else None
                                  ) if got is not None else []
        # A dc that reports its local deployment: count what passed the hash check
        # (an older dc's report has no replicas: its own count).
        detailed = got is not None and got.version is not None
        running = sum(1 for r in replicas if r["state"] == "running") if detailed \
            else (got.running if got is not None else 0)
        # The dc has not applied the intent's latest change yet: rolling, as the master
        # set it; else the dc's own update record.
        pending = doc.get("change") in ("update", "rollback") and int(
            doc.get("generation") or 0) > (got.generation if got is not None else 0)
        update = dict(got.update) if got is not None and got.update is not None else None
        history = doc.get("history") or []
        if pending and doc.get("moved") and doc.get("previous_version") is not None \
                and history:
            update = {"state": "rolling", "from_version": doc["previous_version"],
                      "to_version": version.get("version"),
                      "started_at": iso(float(history[-1]["from"])), "finished_at": None,
                      "error": None, "reason": doc["change"]}
        shown_version = version.get("version")
        previous = doc.get("previous_version")
        eras = [{"version": e["version"], "from": iso(float(e["from"])),
                 "to": None if e.get("to") is None else iso(float(e["to"]))} for e in history]
        if not pending and got is not None and got.version in hashes \
                and got.version != shown_version:
            # The dc's health gate rolled the update back: it runs the previous version.
            shown_version, previous = got.version, version.get("version")
            eras = gate_rollback_eras(eras, got.version, update)
        state, error = "placing", None
        if unplaced is not None:
            state = "failed"
            error = "cannot place in any datacenter: " + "; ".join(
                f"{dc}: " + (", ".join(f"{k}: {v}" for k, v in ordered(by_dc[dc]).items())
                             if by_dc.get(dc) else code)
                for dc, code in sorted(unplaced.items()))
        elif doc["desired"] == "stopped":
            state = "stopped" if got is not None and got.outcome == "stopped" else "stopping"
        elif got is not None and got.outcome == "failed":
            state, error = "failed", got.error
        elif detailed:  # the replicas' states decide, as for a direct deployment
            assert got is not None
            state = derive("running", int(doc["replicas"]),
                           [r["state"] for r in replicas if r["state"] != "failed"],
                           gave_up=False)
            error = got.error
        elif got is not None and got.outcome == "running" and running >= doc["replicas"]:
            state = "running"
        if error is None and update is not None and update.get("state") in (
                "rolled_back", "failed"):
            error = update.get("error")
        created = doc.get("created_at")
        return {"deployment_id": deployment_id, "app": app_key.split(".", 1)[-1],
                "version": shown_version, "previous_version": previous,
                "state": state, "desired": doc["desired"],
                "replicas_wanted": doc["replicas"],
                "created_at": iso(float(created)) if created else None,
                "compose_hash": hashes.get(str(shown_version)), "error": error,
                "failure": dict(got.failure) if got is not None and got.failure else None,
                "failures": got.failures if got is not None else 0,
                "history": eras,
                "update": update, "replicas": replicas, "failed_replicas": [],
                "federated": {"datacenter": doc["datacenter"], "tried": doc.get("tried", []),
                              "outcome": got.outcome if got else None,
                              "reasons": by_dc, "running": running,
                              "unplaced": unplaced,
                              "degraded": self._degraded(doc["datacenter"])}}

    def _degraded(self, label: str) -> bool:
        found = self.capacity.get(label)
        return found is None or found.degraded

    async def update(self, app_key: str, deployment_id: str, version: dict[str, Any] | None,
                     replicas: int | None, reason: str = "update"
                     ) -> dict[str, Any] | None:
        """PATCH (or rollback) of a dc-placed deployment: the signed intent's version
        and/or replicas; answers like ``UpdateDeployment`` (None: not one of ours)."""
        async with self._desired_lock:
            doc = self._intents().get(deployment_id)
            if doc is None or doc["app"] != app_key:
                return None
            new = updated_intent(doc, version, replicas,
                                 "rollback" if reason == "rollback" else "update",
                                 time.time())
            if new == "stopped":
                return {"error": "stopped"}
            if isinstance(new, dict) and not await self._fits(deployment_id, new):
                self.emit("federation.refused", deployment_id, {
                    "code": SNAPSHOT_FULL, "detail": "the desired state would be over "
                    f"{MAX_SNAPSHOT_BYTES} bytes"})
                return {"error": "snapshot_full"}
            if isinstance(new, dict):
                await self._set_intent(deployment_id, new)
                self.emit("federation.rollback" if reason == "rollback"
                          else "federation.update", deployment_id, {
                              "app": app_key, "version": new["version"]["version"],
                              "previous_version": new.get("previous_version"),
                              "replicas": new["replicas"],
                              "generation": new["generation"]})
        return {"changed": isinstance(new, dict),
                "view": self.view(app_key, deployment_id)}

    async def rollback(self, app_key: str, deployment_id: str,
                       versions: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
        """Back to the intent's previous version (*versions*: the app's, by name)."""
        doc = self._intents().get(deployment_id)
        if doc is None or doc["app"] != app_key:
            return None
        back = doc.get("previous_version")
        if back is None or back not in versions:
            return {"error": "no_previous_version"}
        return await self.update(app_key, deployment_id, versions[back], None, "rollback")

    async def stop(self, app_key: str, deployment_id: str) -> dict[str, Any] | None:
        async with self._desired_lock:
            doc = self._intents().get(deployment_id)
            if doc is None or doc["app"] != app_key:
                return None
            if doc["desired"] != "stopped":
                await self._set_intent(deployment_id, {**doc, "desired": "stopped"})
                self.emit("federation.stopping", deployment_id, {"app": app_key})
        return self.view(app_key, deployment_id)

    # ---- asking a dc (ee.federation.rpc) ----

    async def ask(self, label: str, kind: str, *, asker: str,
                  deployment_id: str | None = None, agent_id: str | None = None,
                  args: dict[str, Any] | None = None, timeout_s: float | None = None
                  ) -> dict[str, Any]:
        """The dc's answer body, or ``RpcError`` (``datacenter_unavailable`` when it is
        not linked or degraded, ``datacenter_busy``, ``too_many_asks`` of *asker*'s
        (the account asking, or ``ADMIN_ASKER``; no default, so no caller counts a
        tenant's asks against the admin's share by forgetting to say),
        ``datacenter_timeout``, its code)."""
        cap = self.capacity.get(label)
        return await self.rpc.ask(label, kind, deployment_id=deployment_id,
                                  agent_id=agent_id, args=args, timeout_s=timeout_s,
                                  usable=cap is not None and not cap.degraded, asker=asker)

    def _placed(self, app_key: str, deployment_id: str) -> str | None:
        doc = self._intents().get(deployment_id)
        return None if doc is None or doc["app"] != app_key else str(doc["datacenter"])

    async def deployment_logs(self, app_key: str, deployment_id: str,
                              args: dict[str, Any]) -> dict[str, Any] | None:
        """Logs of *app_key*'s deployment placed in a dc, asked of that dc (None: not a
        dc-placed deployment of that app)."""
        label = self._placed(app_key, deployment_id)
        if label is None:
            return None
        body = await self.ask(label, "logs", deployment_id=deployment_id, args=args,
                              asker=app_key.split(".", 1)[0])
        return {**body, "datacenter": label}

    def preflight(self, replicas: int, constraints: Constraints) -> dict[str, Any] | None:
        """``place`` without placing: the datacenter it would choose now, or each dc's
        reason code (None: no dc enrolled)."""
        if not self.enrolled:
            return None
        target = choose_target(Request(deployment_id=None, replicas=replicas,
                                       constraints=constraints), self.capacity.values())
        if isinstance(target, Datacenter):
            return {"datacenter": target.label}
        return {"datacenters": dict(target.codes)}

    # ---- supervision ----

    async def _populate(self, _: Supervisor) -> None:
        for label in sorted(self.enrolled):
            await self._ensure_actor(label)

    async def _ensure_actor(self, label: str) -> None:
        name = f"dc/{label}"
        if name in self.registry:
            return
        await self.supervisor.start_child(actor_spec(
            self.registry, name, lambda: FederatedDatacenterActor(label, self),
            restart=Restart.PERMANENT, mailbox_size=1024))

    def refuse_stranger(self, label: str | None, code: str, detail: str) -> None:
        """``refuse`` for what anyone on the network can cause (a public join, a TLS
        handshake): one shared budget for all strangers."""
        self._refuse_from(None, label, code, detail)

    def refuse(self, label: str | None, code: str, detail: str) -> None:
        """Log and emit a refusal of what an enrolled dc sent (its own budget)."""
        self._refuse_from(label or "?", label, code, detail)

    def _refuse_from(self, source: str | None, label: str | None, code: str,
                     detail: str) -> None:
        """A burst, then a few a minute per source; the next one logged and emitted
        counts the ones left out (``suppressed``), or a flood (strangers', or a
        compromised dc's bad frames) could push every other event out of the CP's
        recent ring and history queue, and fill the log."""
        bucket = self._refusal_buckets.get(source)
        if bucket is None:
            if len(self._refusal_buckets) > len(self.enrolled) + 64:
                self._refusal_buckets.clear()  # labels of dcs since removed: start over
            bucket = self._refusal_buckets[source] = TokenBucket(
                rate=STRANGER_EVENTS_PER_S, burst=STRANGER_EVENT_BURST)
        if bucket.take(trio.current_time()) > 0:
            self._suppressed[source] = self._suppressed.get(source, 0) + 1
            return
        left_out = self._suppressed.pop(source, 0)
        # A stranger's label (a public join's datacenter) and details quoting what a
        # peer sent: one printable line each, never a forged log line or event subject.
        who, detail = printable(label or "?", 80), printable(detail, 300)
        log.warning("federation: refused from %s: %s: %s", who, code, detail)
        data: dict[str, Any] = {"code": code, "detail": detail}
        if left_out:
            data["suppressed"] = left_out
        self.emit("federation.refused", who, data)

    # ---- the listener ----

    def _server_ssl(self) -> ssl.SSLContext:
        hosts = {"localhost", "127.0.0.1"}
        for addr in (self.settings.listen, self.settings.advertise):
            if addr:
                host = _host_port(addr)[0]
                if host not in ("0.0.0.0", "::"):
                    hosts.add(host)
        key = pki.new_key()
        cert = self.ca.issue(f"ee master {self.cluster_id}", pki.public_pem(key),
                             server_hosts=tuple(sorted(hosts)))
        pki.save_key(self.dir / "server.key", key)
        pki.write_public(self.dir / "server.pem", pki.cert_pem(cert).encode())
        return pki.server_context(self.dir / "server.pem", self.dir / "server.key",
                                  self.dir / "ca.pem")

    async def _run_listener(self, task_status: trio.TaskStatus[int]) -> None:
        self._ssl = await trio.to_thread.run_sync(self._server_ssl)
        host, port = _host_port(self.settings.listen)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle, port, host=host))
            self.bound_port = int(listeners[0].socket.getsockname()[1])
            task_status.started(self.bound_port)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        assert self._ssl is not None
        try:
            self.handshakes.acquire_nowait()
        except trio.WouldBlock:
            self.refuse_stranger(None, UNKNOWN_CERTIFICATE, "too many TLS handshakes in "
                                 f"progress ({MAX_PENDING_HANDSHAKES}): connection closed")
            await trio.aclose_forcefully(tcp)
            return
        stream = trio.SSLStream(tcp, self._ssl, server_side=True)
        try:
            with trio.fail_after(10):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as exc:
            cause = exc.__cause__ or exc
            self.refuse_stranger(None, UNKNOWN_CERTIFICATE,
                                 f"TLS handshake failed: {cause}"[:300])
            await trio.aclose_forcefully(tcp)
            return
        finally:
            self.handshakes.release()
        try:
            der = stream.getpeercert(binary_form=True)
            label = pki.common_name(der) if der else ""
        except (ValueError, pki.PkiError) as exc:
            der, label = None, f"? ({exc})"
        enrolled = self.enrolled.get(label)
        if der is None or enrolled is None \
                or not hmac.compare_digest(enrolled.fingerprint, pki.fingerprint(der)):
            self.refuse_stranger(label[:80] or None, UNKNOWN_CERTIFICATE,
                                 "a cluster certificate not pinned for this datacenter")
            await trio.aclose_forcefully(stream)
            return
        try:
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, stream, message_queue_size=4,
                                                   max_message_size=MAX_FRAME_BYTES)
                if request.path != STREAM_PATH:
                    await request.reject(404, body=b"no such federation route")
                    nursery.cancel_scope.cancel()
                    return
                ws = await request.accept()
                await self._serve_link(enrolled, ws)
                nursery.cancel_scope.cancel()
        # (the nurseries wrap what ends the link in exception groups)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as g:
            log.info("federation: link of %s closed: %s", label, g.exceptions[0])
        except* Exception:  # one link's fault closes that link, never the listener
            log.exception("federation: link of %s failed", label)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_link(self, enrolled: Enrolled, ws: WebSocketConnection) -> None:
        label = enrolled.label
        ref = self.registry.ref(f"dc/{label}")
        key = enrolled.public_key()
        self._conn_ids += 1
        conn = self._conn_ids
        send_lock = trio.Lock()

        async def send(text: str) -> None:
            async with send_lock:
                await ws.send_message(text)

        # One link per dc: a new connection (the dc reconnected) replaces the old one.
        previous = self._links.pop(label, None)
        if previous is not None:
            previous.cancel()
        self.rpc.link_up(label, send)
        await ref.tell(LinkOpened(conn))
        scope: trio.CancelScope | None = None
        try:
            async with trio.open_nursery() as nursery:
                scope = self._links[label] = nursery.cancel_scope
                nursery.start_soon(self._push_snapshots, send, label)
                while True:
                    text = await ws.get_message()
                    try:
                        body = await trio.to_thread.run_sync(
                            open_envelope, text, key, limiter=self.verify_limiter)
                        frame = up_frame(body)
                        if frame.dc != label:
                            raise WireError(DATACENTER_MISMATCH,
                                            f"frame names {frame.dc[:80]!r}, the link is {label}")
                    except WireError as exc:
                        self.refuse(label, exc.code, exc.detail)
                        await send(seal(Refused("refused", exc.code, exc.detail[:300]),
                                        self.key))
                        continue
                    if isinstance(frame, Response):  # ephemeral: never the actor's
                        refusal = self.rpc.answered(label, frame, len(text))
                        if refusal is not None:
                            self.refuse(label, *refusal)
                            await send(seal(Refused("refused", refusal[0], refusal[1]),
                                            self.key))
                        continue
                    replies = await ref.ask(Frame(frame, time.time(), conn), timeout=30)
                    for reply in replies:
                        await send(seal(reply, self.key))
        finally:
            self.rpc.link_down(label, send)
            if scope is not None and self._links.get(label) is scope:
                del self._links[label]
            try:
                ref.try_tell(LinkClosed(conn))
            except ActorError:  # restarting: its next incarnation starts unlinked
                pass

    async def _push_snapshots(self, send: Callable[[str], Any], label: str) -> None:
        sent = 0
        while True:
            changed = self.desired_changed
            if self.desired.version > sent:
                sent = self.desired.version
                await send(self.snapshot_frame(label))
            await changed.wait()

