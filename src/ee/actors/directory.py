"""The agent directory: the CP's one in-memory picture of every agent.

Every AgentActor *publishes* its agent here (``put``) whenever what others decide on
changes (lifecycle state, identity, drain flag, the deployments it lists, quarantine),
and each heartbeat is recorded in place (``beat``: no allocation beyond the frame's own
values), by the agent plane itself while the agent is ``ready`` (nothing for the actor
to decide), by the AgentActor otherwise (a stale agent comes back). Everyone else
*reads* it, synchronously, without asking an actor: AppActors
(what is listed under a deployment id, an agent's status), capacity pools (the agents
of one ``(datacenter, node size)``), placement (a shortlist instead of every agent), the
datacenter counts, the console and the HTTP routes.

Invariants:

* Only AgentActors write records, and each writes only its own agent; a write is a
  whole new frozen ``AgentRecord`` (never half of one), so a reader between two writes
  sees one consistent version. Trio runs everything on one thread: no locks. A
  ``Beat`` (heartbeat freshness) is written by the agent plane or the actor, never both
  for one frame.
* The record outlives the actor's incarnations: a crashed AgentActor is still listed,
  as last published, until its next incarnation publishes again from its agent's
  fresh snapshot. A record is not a source of truth for recovery (DESIGN.md §1); it is
  the shared *view* of the sources.
* The indexes (``by_deployment``, the free buckets, the per-pool and per-datacenter
  sets) are maintained from the difference between the old and the new record, so a
  write costs O(the agent's own deployments), never O(agents).

Change feed. ``subscribe(fn)`` registers ``fn(old, new)``, called synchronously after
every ``put`` that changed a record (``old`` is None for a newly seen agent). It must
not block or raise (a listener that raises is logged and kept). ``Nudges`` is the feed
the CP wires to the AppActors: it turns a change into a ``Reconcile`` for exactly the
apps concerned (the owner of every deployment id listed before or after, the apps
that watch that agent, and, when an agent becomes free to take work, the apps with a
deployment still short of replicas), coalesced so an app has at most one nudge queued.
A change that is only a listed replica's progress (its ``state``, compose hash) nudges
nobody: the AgentActor tells the replica's app (``ReplicaReport``) itself.

Placement over the directory. ``shortlist(request, holds)`` returns the only agents
``ee.placement.place`` can choose for *request*: the agents listing its deployment id,
the agents held for its claims, and from each free bucket matching the constraints
the ``k`` smallest agent ids (``k`` = replicas + excluded + held ids; the buckets are
kept sorted, so that is a slice). Within a tier
placement takes agents per datacenter by id and never more than ``replicas`` from one
datacenter, so the chosen agents (and their order) over the shortlist are exactly those
over all agents; only the diagnostics of rejected agents are missing, and those are
computed (O(agents)) only when a request cannot be placed.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

from ee.actors.identity import Identity
from ee.actors.lifecycle import AgentState, api_status
from ee.placement import AgentInfo, Placement, Request, place
from ee.protocol.messages import DeploymentSnapshot, Health, NodeStats

log = logging.getLogger("ee.actors.directory")

ATTESTED_VERDICTS: Final = ("pass", "warn")


@attrs.frozen
class AgentRecord:
    """What an AgentActor publishes about its agent (everything but the heartbeat)."""

    agent_id: str
    identity: Identity | None = None
    state: AgentState = AgentState.OFFLINE
    draining: bool = False
    deployments: tuple[DeploymentSnapshot, ...] = ()
    quarantine_reasons: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return api_status(self.state)

    @property
    def verdict(self) -> str | None:
        if self.identity is None:
            return None
        return "fail" if self.state is AgentState.QUARANTINED else self.identity.verdict

    @property
    def deployment_ids(self) -> tuple[str, ...]:
        return tuple(d.deployment_id for d in self.deployments)

    @property
    def free(self) -> bool:
        """Could take a new deployment (placement would not reject it for itself)."""
        return (self.identity is not None and self.state is AgentState.READY
                and not self.draining and not self.deployments
                and self.identity.verdict in ATTESTED_VERDICTS)

    def info(self, reserved_for: str | None = None) -> AgentInfo | None:
        """Placement's view of this agent (None while it is not identified)."""
        ident = self.identity
        if ident is None:
            return None
        return AgentInfo(agent_id=self.agent_id, datacenter=ident.datacenter,
                         node_size=ident.node_size, gpu=ident.gpu,
                         status=self.status,  # type: ignore[arg-type]
                         attested=self.verdict in ATTESTED_VERDICTS,
                         draining=self.draining, deployments=self.deployment_ids,
                         reserved_for=reserved_for)


class Beat:
    """The latest heartbeat of one agent, updated in place (one per agent)."""

    __slots__ = ("at", "at_unix", "health", "seq", "stats")

    def __init__(self) -> None:
        self.seq = 0
        self.health: Health | None = None
        self.stats: NodeStats | None = None
        self.at: float | None = None  # Trio time
        self.at_unix: float | None = None


def _iso(unix: float | None) -> str | None:
    if unix is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def render(record: AgentRecord, beat: Beat | None, now: float) -> dict[str, Any]:
    """The API view of an agent (``GET /api/v2/agents``), from its record and beat."""
    ident = record.identity
    at = beat.at if beat is not None else None
    age = now - at if at is not None else None
    health = beat.health if beat is not None else None
    stats = beat.stats if beat is not None else None
    return {
        "agent_id": record.agent_id,
        "vm_name": ident.vm_name if ident else None,
        "node_size": ident.node_size if ident else None,
        "datacenter": ident.datacenter if ident else None,
        "gpu": ident.gpu if ident else None,
        "url": ident.url if ident else None,
        "status": record.status,
        "lifecycle": record.state.value,
        "draining": record.draining,
        "attestation": {
            "verdict": record.verdict,
            "provider": ident.provider if ident else None,
            "mrtd": ident.mrtd if ident else None,
            "tcb_status": ident.tcb_status if ident else None,
            "verified_at": _iso(ident.verified_at) if ident else None,
            "violations": list(ident.violations) if ident else [],
            "quarantine_reasons": list(record.quarantine_reasons),
        },
        "deployment": [
            {"deployment_id": d.deployment_id, "app": d.app, "version": d.version,
             "state": d.state, "compose_hash": d.compose_hash,
             "image_digests": dict(d.image_digests)}
            for d in record.deployments
        ],
        "health": ({"status": health.status, "detail": health.detail}
                   if health is not None else {"status": "unknown", "detail": ""}),
        "heartbeat_seq": beat.seq if beat is not None else 0,
        "stats": attrs.asdict(stats) if stats is not None else None,
        "heartbeat_age_s": round(age, 3) if age is not None else None,
        "last_heartbeat": _iso(beat.at_unix if beat is not None else None),
    }


Listener = Callable[[AgentRecord | None, AgentRecord | None], None]
_Bucket = tuple[str, str, bool]  # (datacenter, node size, gpu)


class AgentDirectory:
    def __init__(self) -> None:
        self._records: dict[str, AgentRecord] = {}
        self._beats: dict[str, Beat] = {}
        self._by_deployment: dict[str, set[str]] = {}
        self._free: dict[_Bucket, list[str]] = {}  # sorted agent ids
        self._by_pool: dict[tuple[str, str], set[str]] = {}
        self._by_dc: dict[str, set[str]] = {}
        self._listeners: list[Listener] = []
        self.writes = 0  # records replaced (a changed view), for tests and benchmarks

    # ---- writes (AgentActors only) ---------------------------------------------------

    def put(self, record: AgentRecord) -> None:
        old = self._records.get(record.agent_id)
        if old == record:
            return
        self._records[record.agent_id] = record
        self.writes += 1
        self._unindex(old)
        self._index(record)
        for fn in self._listeners:
            try:
                fn(old, record)
            except Exception:
                log.exception("directory listener failed on %s", record.agent_id)

    def beat_of(self, agent_id: str) -> Beat:
        """The agent's one ``Beat`` (made on first use), shared by its writers."""
        b = self._beats.get(agent_id)
        if b is None:
            b = self._beats[agent_id] = Beat()
        return b

    def beat(self, agent_id: str, seq: int, health: Health, stats: NodeStats | None,
             at: float, at_unix: float) -> Beat:
        b = self.beat_of(agent_id)
        b.seq, b.health, b.stats, b.at, b.at_unix = seq, health, stats, at, at_unix
        return b

    def _index(self, r: AgentRecord) -> None:
        for d in r.deployments:
            self._by_deployment.setdefault(d.deployment_id, set()).add(r.agent_id)
        ident = r.identity
        if ident is None:
            return
        self._by_pool.setdefault((ident.datacenter, ident.node_size), set()).add(r.agent_id)
        self._by_dc.setdefault(ident.datacenter, set()).add(r.agent_id)
        if r.free:
            bisect.insort(self._free.setdefault(
                (ident.datacenter, ident.node_size, ident.gpu), []), r.agent_id)

    def _unindex(self, r: AgentRecord | None) -> None:
        if r is None:
            return
        for d in r.deployments:
            ids = self._by_deployment.get(d.deployment_id)
            if ids is not None:
                ids.discard(r.agent_id)
                if not ids:
                    del self._by_deployment[d.deployment_id]
        ident = r.identity
        if ident is None:
            return
        for ids in (self._by_pool.get((ident.datacenter, ident.node_size)),
                    self._by_dc.get(ident.datacenter)):
            if ids is not None:
                ids.discard(r.agent_id)
        if r.free:
            free = self._free.get((ident.datacenter, ident.node_size, ident.gpu), [])
            i = bisect.bisect_left(free, r.agent_id)
            if i < len(free) and free[i] == r.agent_id:
                del free[i]

    def subscribe(self, fn: Listener) -> None:
        self._listeners.append(fn)

    # ---- reads -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._records

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._records.get(agent_id)

    def records(self) -> Iterator[AgentRecord]:
        return iter(self._records.values())

    def listing(self, deployment_id: str) -> dict[str, DeploymentSnapshot]:
        """Agent id → what that agent lists under *deployment_id*."""
        out: dict[str, DeploymentSnapshot] = {}
        for agent_id in self._by_deployment.get(deployment_id, ()):
            for d in self._records[agent_id].deployments:
                if d.deployment_id == deployment_id:
                    out[agent_id] = d
        return out

    def listers(self, deployment_id: str) -> frozenset[str]:
        return frozenset(self._by_deployment.get(deployment_id, ()))

    def listed(self, deployment_id: str) -> bool:
        return deployment_id in self._by_deployment

    def view(self, agent_id: str, now: float) -> dict[str, Any] | None:
        record = self._records.get(agent_id)
        if record is None:
            return None
        return render(record, self._beats.get(agent_id), now)

    def views(self, now: float, agent_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Views of *agent_ids* (default: every agent), by agent id."""
        ids = sorted(self._records if agent_ids is None else agent_ids)
        beats = self._beats
        return [render(self._records[a], beats.get(a), now) for a in ids
                if a in self._records]

    def in_datacenter(self, datacenter: str) -> list[AgentRecord]:
        return [self._records[a] for a in self._by_dc.get(datacenter, ())]

    def pool_members(self, datacenter: str, node_size: str) -> set[str]:
        return set(self._by_pool.get((datacenter, node_size), ()))

    def datacenter_counts(self, datacenter: str) -> dict[str, Any]:
        """What a DatacenterActor reports: status counts and attestation outcomes."""
        counts = {"online": 0, "stale": 0, "offline": 0, "quarantined": 0}
        passed = failed = 0
        for agent_id in self._by_dc.get(datacenter, ()):
            r = self._records[agent_id]
            counts[r.status] += 1
            if r.state is AgentState.OFFLINE:
                continue
            if r.state is AgentState.QUARANTINED:
                failed += 1
            else:
                passed += 1
        return {"counts": counts, "pass": passed, "fail": failed,
                "total": sum(counts.values())}

    def status_counts(self) -> dict[str, int]:
        counts = {"online": 0, "stale": 0, "offline": 0, "quarantined": 0}
        for r in self._records.values():
            counts[r.status] += 1
        return counts

    def datacenters(self) -> list[str]:
        return sorted(self._by_dc)

    # ---- placement -------------------------------------------------------------------

    def infos(self, holds: Mapping[str, str]) -> list[AgentInfo]:
        """Every identified agent as placement sees it (O(agents): diagnostics only)."""
        out = []
        for r in self._records.values():
            info = r.info(holds.get(r.agent_id))
            if info is not None:
                out.append(info)
        return out

    def shortlist(self, request: Request, holds: Mapping[str, str]) -> list[AgentInfo]:
        """The agents placement may choose for *request* (see the module docstring)."""
        c = request.constraints
        claims = {x for x in (request.reservation, request.deployment_id) if x is not None}
        picked: set[str] = set()
        if request.deployment_id is not None:
            picked.update(self._by_deployment.get(request.deployment_id, ()))
        picked.update(a for a, h in holds.items() if h in claims)
        k = request.replicas + len(c.exclude_agents) + len(holds)
        for (dc, size, gpu), ids in self._free.items():
            if ((c.datacenter is not None and dc != c.datacenter)
                    or (c.node_size is not None and size != c.node_size)
                    or (c.gpu and not gpu) or not ids):
                continue
            picked.update(ids[:k])
        out = []
        for agent_id in picked:
            record = self._records.get(agent_id)
            info = record.info(holds.get(agent_id)) if record is not None else None
            if info is not None:
                out.append(info)
        return out

    def place(self, request: Request, holds: Mapping[str, str],
              adjust: Callable[[AgentInfo], AgentInfo] = lambda i: i) -> Placement:
        """``place`` over the shortlist; over every agent (for the diagnostics of the
        rejected ones) only when the request cannot be placed."""
        placement = place(request, [adjust(i) for i in self.shortlist(request, holds)])
        if placement.placeable:
            return placement
        return place(request, [adjust(i) for i in self.infos(holds)])


def _shape(r: AgentRecord) -> tuple[object, ...]:
    """What a pass decides on, short of a listed replica's progress (``state``, its
    compose hash), which reaches the replica's app directly (``ReplicaReport``)."""
    return (r.identity, r.state, r.draining, r.quarantine_reasons,
            tuple((d.deployment_id, d.app) for d in r.deployments))


class Nudges:
    """Turns directory changes into coalesced ``Reconcile`` nudges for the apps concerned.

    ``send(app_key)`` delivers one nudge (the CP: ``try_tell(Reconcile())``); it is not
    called again for that app until the app calls ``taken(app_key)`` at the start of the
    pass the nudge caused, so a burst of changes costs an app one pass.
    """

    def __init__(self, send: Callable[[str], bool]) -> None:
        self._send = send
        self._queued: set[str] = set()
        self._owners: dict[str, str] = {}  # deployment id -> app key
        self._watchers: dict[str, set[str]] = {}  # agent id -> app keys
        self._watching: dict[str, frozenset[str]] = {}  # app key -> agent ids
        self._hungry: set[str] = set()
        self.sent = 0
        # While the CP stops, agents disconnect because of it, not because they are
        # lost: no nudge then (an app would drop and persist away its placements).
        self.paused = False

    # ---- what apps declare ---------------------------------------------------------

    def own(self, app_key: str, deployment_ids: Iterable[str]) -> None:
        for d in deployment_ids:
            self._owners[d] = app_key

    def watch(self, app_key: str, agent_ids: Iterable[str], *, hungry: bool) -> None:
        """Replace the agents *app_key* holds replicas on (or placed), and say whether
        it still misses replicas (then it hears of every agent that becomes free)."""
        new = frozenset(agent_ids)
        old = self._watching.get(app_key, frozenset())
        if new != old:
            for a in old - new:
                apps = self._watchers.get(a)
                if apps is not None:
                    apps.discard(app_key)
                    if not apps:
                        del self._watchers[a]
            for a in new - old:
                self._watchers.setdefault(a, set()).add(app_key)
            self._watching[app_key] = new
        if hungry:
            self._hungry.add(app_key)
        else:
            self._hungry.discard(app_key)

    def forget(self, app_key: str) -> None:
        self.watch(app_key, (), hungry=False)
        self._watching.pop(app_key, None)
        self._queued.discard(app_key)

    def taken(self, app_key: str) -> None:
        self._queued.discard(app_key)

    # ---- the feed ------------------------------------------------------------------

    def nudge(self, app_key: str) -> None:
        if self.paused or app_key in self._queued:
            return
        if self._send(app_key):
            self._queued.add(app_key)
            self.sent += 1

    def nudge_all(self) -> None:
        for app_key in sorted(set(self._owners.values()) | set(self._watching)):
            self.nudge(app_key)

    def changed(self, old: AgentRecord | None, new: AgentRecord | None) -> None:
        if old is not None and new is not None and _shape(old) == _shape(new):
            return  # only a replica's progress: its app hears it as a ReplicaReport
        apps: set[str] = set()
        agent_id = (new or old).agent_id if (new or old) is not None else None  # type: ignore[union-attr]
        for r in (old, new):
            if r is None:
                continue
            for d in r.deployments:
                owner = self._owners.get(d.deployment_id)
                if owner is not None:
                    apps.add(owner)
        if agent_id is not None:
            apps.update(self._watchers.get(agent_id, ()))
        if new is not None and new.free and not (old is not None and old.free):
            apps.update(self._hungry)
        for app_key in sorted(apps):
            self.nudge(app_key)


__all__ = ["AgentDirectory", "AgentRecord", "Beat", "Nudges", "render"]
