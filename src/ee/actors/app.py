"""AppActor: one tenant app — its versions, its deployments, and the reconciliation of
what should run against what the agents say runs.

Sources of truth, and how a (re)start rebuilds from them:

* desired state — the app, its versions and its deployment intents — comes from the
  signed manifests (``deps.load``), written before a change is acknowledged;
* what runs comes from the agents: every AgentActor publishes in the agent directory
  (``ee.actors.directory``) what its agent lists (rebuilt from its agent's snapshot and
  ``deploy_status`` frames); the app reads the directory, never asks every agent.

A reconcile pass compares the two for each deployment. Passes are driven by change:
the directory's ``Nudges`` feed sends a ``Reconcile`` when an agent this app watches
(placed or holding a replica) changes, when an agent lists one of its deployment ids,
and (while a deployment is short of replicas) when an agent becomes free; plus after
every change of its own and a slow safety sweep (``reconcile_interval_s``). A pass
costs O(its deployments and their replicas), not O(agents); placement reads a
shortlist of the directory (``AgentDirectory.place``). A deployment's pass is skipped
when nothing it reads changed since its last pass: the records *as that pass read them*
at its start, so a record that changes while a pass awaits (an agent coming back
during a manifest write) makes the next nudge a pass, never a skip. In a pass:
replicas whose agent went offline are dropped and re-placed elsewhere;
replicas beyond the wanted count are stopped; a replica that failed is moved to another
agent, up to ``max_attempts`` agents, then the deployment fails. Placement itself is
``ee.placement`` (pure); claiming an agent goes through its AgentActor (``PushDeploy``),
which refuses if another deployment got there first, so two concurrent deploys never
share an agent.

Agents are not trusted to say what they run (an attested agent may still lie about its
deployments). So:

* the deployment manifest records its **placements** (the agents the intent put a
  replica on), written *before* the ``deploy`` leaves: a CP that dies between the two
  still knows the agent may run it. After a (CP) restart a listed replica is adopted —
  never restarted — only on a placed agent, under this app, with the version's compose
  hash (``ee.actors.deployment.stray_reason`` / ``hash_problem``). Anything else an
  agent lists under this deployment id is a **stray**: a ``replica.stray`` event, an
  undeploy sent to that agent for that id (the agent lists it, so only it is touched),
  and it is never a member, so it cannot displace a placed replica, count as running
  or surface to the tenant. Placement sees a stray's agent as busy.
* a ``deploy_status`` changes a replica only if the reporting agent holds it; any other
  report is ignored (``replica.report_ignored``). A placed replica whose compose hash is
  not the version's (or that claims ``running`` without one) is failed at once.
* the failure budget (``failed_agents``) is in the manifest too, so a restart does not
  give a failed deployment another round. An agent that goes away is a lost replica,
  not a failed one: it never counts against the budget.
* a placed agent that has not reconnected since a CP restart stays placed (adopted
  when it returns) until the deployment is healthy without it; with ``ready`` given,
  it is not even re-placed until the CP's rehydration quorum is met.

A deployment that cannot be placed stays ``placing`` and says why in ``error``, with
the placement reason codes of the agents it could not use (a BUSY agent names the
deployment holding it: the tenant's own id, or "another tenant").

Failures reach the tenant. A failed ``deploy_status`` carries the phase, exit code and
last lines; the replica's ``error`` says them in one line and ``failure`` keeps them,
and the deployment keeps its last failure (``failure``, persisted) until it is healthy.
CP-side phase timeouts (``DeploySettings``, Trio time, not persisted: a CP restart
gives each phase its full time again): a deployment ``placing`` too long, or a replica
``pending``/``pulling``/``building``/``starting`` too long, is *halted*: a terminal
``failed`` (persisted; running replicas keep serving) whose ``error`` names the phase,
with ``failure.phase = "timeout"``. Only a PATCH or a rollback lifts it.

Updates. A deployment has one desired ``version``; every pass converges its replicas
to it, one replica at a time (``ee.actors.deployment.move_plan``): a replica on
another version is *outdated*; a new one starts on a free agent first (surge) and the
old one stops once the new one runs, or, with no free agent, the outdated replica's
agent redeploys in place (the agent stops the old services keeping their named
volumes, and starts the new version under the same deployment id). A new replica that
fails (or times out) while an update is ``rolling`` is its health gate failing: the
desired version goes back to the previous one (``rolled_back``, the ``error`` says
why), converged the same way; a replica that failed in place is redeployed in place
with the previous version. Version, previous version, history and the update record
are in the signed manifest, written before the change is acknowledged, so a CP
restart resumes a rolling update where the agents are.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
import trio

from ee.actors.agent import PushDeploy, PushUndeploy, ReplicaReport
from ee.actors.deployment import (
    HashProblem,
    derive,
    failure_text,
    hash_problem,
    move_plan,
    stray_reason,
    timed_out,
    transition,
    update_transition,
)
from ee.actors.directory import AgentDirectory, AgentRecord, Nudges
from ee.placement import MAX_REPLICAS, AgentInfo, Constraints, Placement, Request, place
from ee.runtime import Actor, ActorError, handler

log = logging.getLogger("ee.actors.app")

ACTIVE_REPLICA = ("pending", "pulling", "building", "starting", "running")
DEADLINE_GAP_S = 1.0  # the least time between two passes the phase deadlines ask for

@attrs.frozen
class DeploySettings:
    """Phase timeouts and log retention (the CP config's ``deployments`` object)."""

    placing_s: float = 600.0   # a deployment that cannot be placed for this long fails
    pending_s: float = 300.0   # a deploy sent, no word from the agent
    pulling_s: float = 900.0
    building_s: float = 1800.0
    starting_s: float = 600.0  # started, health check not passed yet
    log_retention_s: float = 86400.0  # a stopped deployment's logs stay reachable

    def limits(self) -> dict[str, float]:
        """Replica state -> its phase timeout."""
        return {"pending": self.pending_s, "pulling": self.pulling_s,
                "building": self.building_s, "starting": self.starting_s}

    @classmethod
    def from_config(cls, doc: Mapping[str, Any] | None) -> DeploySettings:
        """From the CP config (unknown keys and non-positive numbers: ValueError)."""
        doc = dict(doc or {})
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"deployments: unknown settings {', '.join(unknown)}")
        for key, value in doc.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"deployments.{key} must be a positive number of seconds")
        return cls(**{k: float(v) for k, v in doc.items()})


class RemotePlacer(Protocol):
    """Where a deployment goes when no direct agent fits (a master's federation, see
    ee.federation.placement): ``place`` answers like ``CreateDeployment`` or None (not
    taken: today's refusal); ``view``/``stop`` answer for the deployments it took, and
    ``update``/``rollback`` change them, answering like ``UpdateDeployment`` /
    ``RollbackDeployment`` (the app checked the version exists; *version* is its spec)."""

    async def place(self, app_key: str, deployment_id: str, version: dict[str, Any],
                    replicas: int, constraints: Constraints,
                    direct: Placement) -> dict[str, Any] | None: ...

    def view(self, app_key: str, deployment_id: str) -> dict[str, Any] | None: ...

    def preflight(self, replicas: int, constraints: Constraints) -> dict[str, Any] | None:
        """What ``place`` would do now (None: no datacenter to try): ``{"datacenter":
        label}`` or ``{"datacenters": {label: code}}``."""
        ...

    async def stop(self, app_key: str, deployment_id: str) -> dict[str, Any] | None: ...

    async def update(self, app_key: str, deployment_id: str, version: dict[str, Any] | None,
                     replicas: int | None) -> dict[str, Any] | None: ...

    async def rollback(self, app_key: str, deployment_id: str,
                       versions: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None: ...


@attrs.frozen
class AppDeps:
    load: Callable[[str], Awaitable[dict[str, Any]]]  # app key -> {app, versions, deployments}
    save: Callable[[str, str, dict[str, Any]], Awaitable[None]]  # (kind, id, spec)
    directory: AgentDirectory
    emit: Callable[[str, str, Mapping[str, Any]], None]
    # Warm capacity: (deployment id, constraints, how many) -> reserve up to that many
    # agents of the matching pool for it; then agent id -> what each agent is held for
    # (a deployment id or a reservation id), for AgentInfo.reserved_for.
    reserve_warm: Callable[[str, Constraints, int], Awaitable[None]] | None = None
    holds: Callable[[], Awaitable[dict[str, str]]] | None = None
    # Has the CP's rehydration quorum been met? (None: never wait for absent agents.)
    ready: Callable[[], bool] | None = None
    # The change feed that nudges this app (None: only its own changes and the sweep).
    nudges: Nudges | None = None
    reconcile_interval_s: float = 30.0  # the safety sweep; changes drive passes
    max_attempts: int = 3
    settings: DeploySettings = DeploySettings()
    # Deployment id -> the app key it belongs to (the CP's index): names the holder of a
    # BUSY agent to the tenant (its own, or "another tenant"). None: "another deployment".
    owner_of: Callable[[str], str | None] | None = None
    wall: Callable[[], float] = time.time  # unix time, for what is persisted
    remote: RemotePlacer | None = None  # no direct agent fits: hand it to the federation
    # (kind, id) -> delete that manifest (a version's, on DeleteVersion). None: nothing
    # is persisted to delete (the version is only forgotten).
    delete: Callable[[str, str], Awaitable[None]] | None = None


# ---- messages -----------------------------------------------------------------------

@attrs.frozen
class AddVersion:
    spec: dict[str, Any]


@attrs.frozen
class ListVersions:
    pass


@attrs.frozen
class DeleteVersion:
    """Delete a version (manifest, then memory) unless a deployment that is not
    ``stopped`` uses it: ``{"deleted": True}``, ``{"error": "unknown_version"}``, or
    ``{"error": "deployed", "deployments": [ids]}``. Decided inside the actor, so no
    PATCH, rollback or health-gate rollback can start using it between the check and
    the delete."""

    version: str


@attrs.frozen
class Describe:
    pass


@attrs.frozen
class Preflight:
    version: str
    replicas: int
    constraints: Constraints


@attrs.frozen
class CreateDeployment:
    deployment_id: str
    version: str
    replicas: int
    constraints: Constraints


@attrs.frozen
class GetDeployment:
    deployment_id: str


@attrs.frozen
class StopDeployment:
    deployment_id: str


@attrs.frozen
class LogSources:
    """Where a deployment's logs are: ``{"deployment_id", "agents": [ids]}`` or None.
    The asker fetches them from those agents' actors itself (``FetchLogs``),
    concurrently: the app never waits on an agent for logs, so a follower polling a
    slow agent cannot stall its reconciliation."""

    deployment_id: str


@attrs.frozen
class UpdateDeployment:
    """Move a deployment to *version* and/or *replicas* (None: keep)."""

    deployment_id: str
    version: str | None = None
    replicas: int | None = None


@attrs.frozen
class RollbackDeployment:
    deployment_id: str


@attrs.frozen
class Reconcile:
    pass


# ---- state --------------------------------------------------------------------------

@attrs.frozen
class Failure:
    """Why a replica failed: the human line, and the agent's phase / exit code / lines."""

    error: str
    phase: str | None = None
    exit_code: int | None = None
    lines: tuple[str, ...] = ()
    agent_id: str | None = None
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "phase": self.phase, "exit_code": self.exit_code,
                "lines": list(self.lines), "agent_id": self.agent_id,
                "version": self.version}

    def view(self) -> dict[str, Any]:
        return {"phase": self.phase, "exit_code": self.exit_code, "lines": list(self.lines)}

    @classmethod
    def from_json(cls, doc: object) -> Failure | None:
        if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
            return None
        lines = doc.get("lines")
        code = doc.get("exit_code")
        return cls(doc["error"], _str(doc.get("phase")),
                   code if isinstance(code, int) and not isinstance(code, bool) else None,
                   tuple(x for x in lines if isinstance(x, str))
                   if isinstance(lines, list) else (),
                   _str(doc.get("agent_id")), _str(doc.get("version")))


@attrs.frozen
class Era:
    """A version the deployment ran (was set to), from when to when (unix time)."""

    version: str
    start: float
    end: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "from": self.start, "to": self.end}

    def view(self) -> dict[str, Any]:
        return {"version": self.version, "from": _iso(self.start),
                "to": None if self.end is None else _iso(self.end)}


@attrs.frozen
class Update:
    """The deployment's last version change and where it is."""

    state: str  # rolling | done | rolled_back | failed (ee.actors.deployment)
    from_version: str
    to_version: str
    started_at: float
    finished_at: float | None = None
    error: str | None = None
    reason: str = "update"  # "update" (PATCH) or "rollback" (POST .../rollback)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def view(self) -> dict[str, Any]:
        return {**self.to_json(), "started_at": _iso(self.started_at),
                "finished_at": None if self.finished_at is None else _iso(self.finished_at)}

    @classmethod
    def from_json(cls, doc: object) -> Update | None:
        if not isinstance(doc, dict):
            return None
        try:
            return cls(str(doc["state"]), str(doc["from_version"]), str(doc["to_version"]),
                       float(doc["started_at"]),
                       None if doc.get("finished_at") is None else float(doc["finished_at"]),
                       _str(doc.get("error")), str(doc.get("reason") or "update"))
        except (KeyError, TypeError, ValueError):
            return None


@attrs.frozen
class Replica:
    agent_id: str
    state: str
    compose_hash: str | None = None
    error: str | None = None
    version: str = ""  # the version this replica runs (or is being moved to)
    failure: Failure | None = None
    since: float = 0.0  # Trio time it entered *state* (phase timeouts)
    # Redeployed in place from this version (its previous services ran on this agent).
    moved_from: str | None = None


@attrs.frozen
class Deployment:
    deployment_id: str
    version: str
    replicas_wanted: int
    constraints: Constraints
    desired: str  # "running" | "stopped"
    created_at: float
    state: str = "pending"
    replicas: Mapping[str, Replica] = attrs.field(factory=dict)
    # Persisted (signed manifest): the agents the intent placed a replica on, and the
    # agents its replicas failed on (the failure budget).
    placements: frozenset[str] = frozenset()
    failed_agents: frozenset[str] = frozenset()
    error: str | None = None
    # Persisted too: the version before this one, the versions it ran, the last version
    # change, a terminal failure (halted: why), the last replica failure, and where a
    # stopped deployment last ran (its logs stay there for the retention window).
    previous_version: str | None = None
    history: tuple[Era, ...] = ()
    update: Update | None = None
    halted: str | None = None
    failure: Failure | None = None
    last_agents: frozenset[str] = frozenset()
    stopped_at: float | None = None
    placing_since: float | None = None  # Trio time (placing timeout), not persisted
    # Replicas stopped because they failed, by agent (shown to the tenant with their
    # cause until the deployment is healthy again or the agent takes a new replica).
    failed_replicas: Mapping[str, Replica] = attrs.field(factory=dict)

    def spec(self) -> dict[str, Any]:
        c = self.constraints
        return {"deployment_id": self.deployment_id, "version": self.version,
                "replicas": self.replicas_wanted, "desired": self.desired,
                "created_at": self.created_at,
                "constraints": {"datacenter": c.datacenter, "node_size": c.node_size,
                                "gpu": c.gpu, "exclude_agents": sorted(c.exclude_agents)},
                "placements": sorted(self.placements),
                "failed_agents": sorted(self.failed_agents),
                "previous_version": self.previous_version,
                "history": [e.to_json() for e in self.history],
                "update": None if self.update is None else self.update.to_json(),
                "halted": self.halted,
                "failure": None if self.failure is None else self.failure.to_json(),
                "last_agents": sorted(self.last_agents), "stopped_at": self.stopped_at}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _eras(value: object, version: str, created_at: float) -> tuple[Era, ...]:
    """The history of a manifest (one era from creation when it has none)."""
    out = []
    for e in value if isinstance(value, list) else []:
        if isinstance(e, dict) and isinstance(e.get("version"), str):
            try:
                out.append(Era(e["version"], float(e["from"]),
                               None if e.get("to") is None else float(e["to"])))
            except (KeyError, TypeError, ValueError):
                continue
    return tuple(out) or (Era(version, created_at),)


MAX_HISTORY = 50  # eras kept per deployment


def _switch(history: tuple[Era, ...], version: str, now: float) -> tuple[Era, ...]:
    """The history once the deployment is set to *version* at *now*."""
    closed = tuple(e if e.end is not None else attrs.evolve(e, end=now) for e in history)
    return (*closed, Era(version, now))[-MAX_HISTORY:]


def _ids(value: object) -> frozenset[str]:
    """A list of agent ids from a (signed) manifest; anything else reads as none."""
    if not isinstance(value, list):
        return frozenset()
    return frozenset(v for v in value if isinstance(v, str) and v)


def _gave_up(failed_agents: frozenset[str]) -> str:
    return (f"replicas failed on {len(failed_agents)} agents: "
            + "; ".join(sorted(failed_agents)))


def _same(now: tuple[object, ...], before: tuple[object, ...] | None) -> bool:
    """The same pass inputs: the same objects (records, deployment) and equal flags."""
    if before is None or len(now) != len(before):
        return False
    return (now[0] is before[0] and now[1] == before[1] and now[2] == before[2]
            and all(a is b for a, b in zip(now[3:], before[3:], strict=True)))


READY_KEY = ""  # _read: the readiness flag (never an agent id)
UNREAD = object()  # _inputs: a record the pass did not read (never "the same")


def _absent(record: AgentRecord | None) -> bool:
    """Not back since the CP (re)started: never identified by a session of this CP
    (an actor started for it publishes an unidentified record before its session)."""
    return record is None or record.identity is None


STRAY_MARK = "stray:"  # how placement sees a deployment id an agent lists unverified


def _for_placement(info: AgentInfo, deployment_id: str, members: Mapping[str, Replica]
                   ) -> AgentInfo:
    """An agent listing this deployment without holding a replica of it is busy (with
    a stray), not an existing replica to place on."""
    if deployment_id not in info.deployments or info.agent_id in members:
        return info
    return attrs.evolve(info, deployments=tuple(
        STRAY_MARK + d if d == deployment_id else d for d in info.deployments))


def _versions_used(dep: Deployment) -> set[str]:
    """The versions *dep* needs: its own, the one a rollback goes back to, both ends of
    its update, and what each replica runs or is being moved from."""
    used = {dep.version}
    if dep.previous_version is not None:
        used.add(dep.previous_version)
    if dep.update is not None:
        used |= {dep.update.from_version, dep.update.to_version}
    for r in dep.replicas.values():
        used.add(r.version)
        if r.moved_from is not None:
            used.add(r.moved_from)
    return used


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _replica_view(r: Replica) -> dict[str, Any]:
    return {"agent_id": r.agent_id, "state": r.state, "version": r.version,
            "compose_hash": r.compose_hash, "error": r.error,
            "failure": None if r.failure is None else r.failure.view()}


class AppActor(Actor):
    def __init__(self, app_key: str, deps: AppDeps) -> None:
        self.app_key = app_key
        self.deps = deps
        self.app: dict[str, Any] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, Deployment] = {}
        # deployment id -> the inputs of its last pass (see _inputs)
        self._seen: dict[str, tuple[object, ...]] = {}
        self._wake = trio.Event()  # set: the ticker recomputes its next deadline

    async def started(self) -> None:
        desired = await self.deps.load(self.app_key)
        self.app = desired["app"]
        self.versions = {v["version"]: v for v in desired["versions"]}
        for spec in desired["deployments"]:
            c = spec["constraints"]
            failed = _ids(spec.get("failed_agents"))
            halted = _str(spec.get("halted"))
            exhausted = len(failed) >= self.deps.max_attempts or halted is not None
            # A stopped intent restarts as stopped (and goes back to stopping if an agent
            # still runs a replica); a failed one stays failed (its budget is spent, or
            # it was halted); a running one is placed from pending.
            state = ("stopped" if spec["desired"] == "stopped"
                     else "failed" if exhausted else "pending")
            created = float(spec["created_at"])
            stopped_at = spec.get("stopped_at")
            self.deployments[spec["deployment_id"]] = Deployment(
                deployment_id=spec["deployment_id"], version=spec["version"],
                replicas_wanted=int(spec["replicas"]),
                constraints=Constraints.from_json(c), desired=spec["desired"],
                created_at=created, state=state,
                placements=_ids(spec.get("placements")), failed_agents=failed,
                error=_gave_up(failed) if state == "failed" and not halted else None,
                previous_version=_str(spec.get("previous_version")),
                history=_eras(spec.get("history"), spec["version"], created),
                update=Update.from_json(spec.get("update")), halted=halted,
                failure=Failure.from_json(spec.get("failure")),
                last_agents=_ids(spec.get("last_agents")),
                stopped_at=float(stopped_at) if isinstance(stopped_at, int | float) else None)
        if self.deps.nudges is not None:
            self.deps.nudges.own(self.app_key, self.deployments)
        self.start_soon(self._ticker)
        if self.deployments:
            await self._reconcile()

    async def _ticker(self) -> None:
        """A pass every ``reconcile_interval_s`` (the safety sweep), and one at the next
        phase deadline (a placing deployment, a replica in a timed phase)."""
        fired = -math.inf
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            delay = self.deps.reconcile_interval_s
            deadline = self._next_deadline()
            if deadline is not None:  # at most one deadline pass per DEADLINE_GAP_S
                delay = min(delay, max(deadline - now, fired + DEADLINE_GAP_S - now, 0.0))
            with trio.move_on_after(delay):
                await self._wake.wait()
                continue  # something changed: look at the deadlines again
            fired = trio.current_time()
            try:
                self.ref.try_tell(Reconcile())
            except ActorError:
                pass

    def _next_deadline(self) -> float | None:
        s = self.deps.settings
        limits = s.limits()
        out: list[float] = []
        for dep in self.deployments.values():
            if dep.desired != "running" or dep.halted is not None:
                continue
            if dep.state == "placing" and dep.placing_since is not None:
                out.append(dep.placing_since + s.placing_s)
            out.extend(r.since + limits[r.state] for r in dep.replicas.values()
                       if r.state in limits)
        return min(out) if out else None

    # ---- views -----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {**self.app, "versions": sorted(self.versions),
                "deployments": sorted(self.deployments)}

    def deployment_view(self, dep: Deployment) -> dict[str, Any]:
        return {
            "deployment_id": dep.deployment_id, "app": self.app["name"],
            "version": dep.version, "previous_version": dep.previous_version,
            "state": dep.state, "desired": dep.desired,
            "replicas_wanted": dep.replicas_wanted, "created_at": _iso(dep.created_at),
            "compose_hash": self._expected_hash(dep),
            "error": self._error(dep),
            "failure": None if dep.failure is None else {
                **dep.failure.view(), "agent_id": dep.failure.agent_id,
                "version": dep.failure.version},
            "failures": len(dep.failed_agents),
            "history": [e.view() for e in dep.history],
            "update": None if dep.update is None else dep.update.view(),
            "replicas": [_replica_view(r) for r in sorted(dep.replicas.values(),
                                                           key=lambda r: r.agent_id)],
            # Replicas stopped because they failed (not members: never counted, billed
            # or given secrets), with their cause, until the deployment is healthy.
            "failed_replicas": [_replica_view(r) for a, r in sorted(
                dep.failed_replicas.items()) if a not in dep.replicas],
        }

    @staticmethod
    def _error(dep: Deployment) -> str | None:
        """What the tenant reads in ``error``: a terminal failure; else why it cannot
        be placed (with the last failure); else a rolled-back update; else, while not
        running, the last replica failure."""
        if dep.halted is not None:
            return dep.halted
        last = dep.failure.error if dep.failure is not None else None
        if dep.error is not None:
            return f"{dep.error}; last failure: {last}" if last else dep.error
        if dep.update is not None and dep.update.state in ("rolled_back", "failed"):
            return dep.update.error
        if dep.state != "running" and dep.desired == "running":
            return last
        return None

    def _hash_of(self, version: str) -> str | None:
        value = self.versions.get(version, {}).get("compose_hash")
        return value if isinstance(value, str) else None

    def _expected_hash(self, dep: Deployment) -> str | None:
        return self._hash_of(dep.version)

    def _holder(self, holder: str) -> str:
        """How a BUSY agent's deployment is named to this app's tenant: its own id when
        it is one of the tenant's deployments, else "another tenant" (never the id)."""
        dep_id = holder.removeprefix(STRAY_MARK)
        if dep_id in self.deployments:
            return dep_id
        owner = self.deps.owner_of(dep_id) if self.deps.owner_of is not None else None
        account = self.app.get("account_id") or self.app_key.split(".", 1)[0]
        if owner is not None and owner.split(".", 1)[0] == account:
            return dep_id
        return "another tenant"

    def _emit(self, kind: str, deployment_id: str, data: Mapping[str, Any]) -> None:
        """An event about one of this app's deployments (always naming the app, so the
        tenant event stream can tell whose it is before the CP's index has the id)."""
        self.deps.emit(kind, deployment_id, {**data, "app": self.app_key})

    async def _persist(self, dep: Deployment) -> None:
        await self.deps.save("deployments", dep.deployment_id,
                             {**dep.spec(), "app": self.app_key})

    def _replica_as_reported(self, dep: Deployment, old: Replica | None, agent_id: str,
                             state: str, compose_hash: str | None, error: str | None, *,
                             version: str | None = None,
                             failure: Failure | None = None) -> Replica:
        """A placed agent's replica as it reports it (a ``deploy_status`` or a listing),
        failed when the compose hash is not its version's (`hash_problem`). Its version
        is the one this app sent it; only an adopted replica's comes from the agent."""
        version = old.version if old is not None else (version or dep.version)
        if old is not None and old.state == "failed" and state != "failed":
            return old  # failed here (a timeout, a wrong hash): until it is stopped
        reported = compose_hash or (old.compose_hash if old else None)
        if (old is not None and old.moved_from is not None and state != "failed"
                and reported is not None and reported == self._hash_of(old.moved_from)):
            return old  # still the version it is being moved from: not yet switched
        problem = hash_problem(state, reported, self._hash_of(version))
        if problem is None:
            since = old.since if old is not None and old.state == state \
                else trio.current_time()
            if state == "failed" and failure is None:
                failure = old.failure if old is not None and old.failure is not None \
                    else Failure(error or "failed", agent_id=agent_id, version=version)
            return Replica(agent_id, state, reported,
                           failure.error if failure is not None else error, version,
                           failure if state == "failed" else None, since,
                           old.moved_from if old is not None else None)
        if old is not None and old.state == "failed":
            return old  # failed already, and said so
        return self._hash_failed(dep, agent_id, state, reported, problem, version,
                                 old.moved_from if old is not None else None)

    def _hash_failed(self, dep: Deployment, agent_id: str, state: str,
                     reported: str | None, problem: HashProblem, version: str,
                     moved_from: str | None = None) -> Replica:
        """The replica, failed: it does not run its version's workload."""
        expected = self._hash_of(version)
        self._emit("replica.stray", dep.deployment_id, {
            "agent_id": agent_id, "reason": problem.value, "state": state,
            "compose_hash": reported, "expected": expected, "action": "failed"})
        error = (f"{problem.value}: reported {reported or 'none'}, "
                 f"version {version} is {expected}")
        return Replica(agent_id, "failed", reported, error, version,
                       Failure(error, agent_id=agent_id, version=version),
                       trio.current_time(), moved_from)

    # ---- handlers --------------------------------------------------------------------

    @handler(Describe)
    async def on_describe(self, _: Describe) -> dict[str, Any]:
        return self.view()

    @handler(AddVersion)
    async def on_add_version(self, msg: AddVersion) -> dict[str, Any] | None:
        version = msg.spec["version"]
        if version in self.versions:
            return None
        await self.deps.save("versions", f"{self.app_key}/{version}", msg.spec)
        self.versions[version] = msg.spec
        self.deps.emit("app.version", self.app_key, {"version": version,
                                                     "compose_hash": msg.spec["compose_hash"]})
        return msg.spec

    @handler(ListVersions)
    async def on_list_versions(self, _: ListVersions) -> list[dict[str, Any]]:
        return [self.versions[v] for v in sorted(self.versions)]

    @handler(DeleteVersion)
    async def on_delete_version(self, msg: DeleteVersion) -> dict[str, Any]:
        if msg.version not in self.versions:
            return {"error": "unknown_version"}
        users = sorted(d.deployment_id for d in self.deployments.values()
                       if d.state != "stopped" and msg.version in _versions_used(d))
        if users:
            return {"error": "deployed", "deployments": users}
        if self.deps.delete is not None:
            await self.deps.delete("versions", f"{self.app_key}/{msg.version}")
        del self.versions[msg.version]
        self.deps.emit("app.version_deleted", self.app_key, {"version": msg.version})
        return {"deleted": True}

    async def _holds(self) -> dict[str, str]:
        return await self.deps.holds() if self.deps.holds is not None else {}

    @handler(Preflight)
    async def on_preflight(self, msg: Preflight) -> dict[str, Any]:
        if msg.version not in self.versions:
            return {"error": "unknown_version"}
        # A preflight shows every agent's verdict: placement over all of them.
        request = Request(deployment_id=None, replicas=msg.replicas,
                          constraints=msg.constraints)
        placement = place(request, self.deps.directory.infos(await self._holds()))
        answer = placement.to_dict(self._holder)
        if not placement.placeable and self.deps.remote is not None:
            # What a deployment would do: go to a federated datacenter (or why none).
            remote = self.deps.remote.preflight(msg.replicas, msg.constraints)
            if remote is not None:
                answer.update(remote)
                answer["placeable"] = "datacenter" in remote
        return answer

    @handler(CreateDeployment)
    async def on_create(self, msg: CreateDeployment) -> dict[str, Any]:
        if msg.version not in self.versions:
            return {"error": "unknown_version"}
        placement = self.deps.directory.place(
            Request(deployment_id=None, replicas=msg.replicas, constraints=msg.constraints),
            await self._holds())
        if not placement.placeable:
            if self.deps.remote is not None:
                taken = await self.deps.remote.place(
                    self.app_key, msg.deployment_id, self.versions[msg.version],
                    msg.replicas, msg.constraints, placement)
                if taken is not None:
                    return taken
            return {"error": "not_placeable", "placement": placement.to_dict(self._holder)}
        now = self.deps.wall()
        dep = Deployment(deployment_id=msg.deployment_id, version=msg.version,
                         replicas_wanted=msg.replicas, constraints=msg.constraints,
                         desired="running", created_at=now,
                         history=(Era(msg.version, now),))
        await self._persist(dep)
        self.deployments[dep.deployment_id] = dep
        if self.deps.nudges is not None:
            self.deps.nudges.own(self.app_key, (dep.deployment_id,))
        self._emit("deployment.created", dep.deployment_id,
                   {"version": msg.version, "replicas": msg.replicas})
        await self._reconcile_one(dep.deployment_id)
        self._watch()
        return {"deployment_id": dep.deployment_id}

    @handler(GetDeployment)
    async def on_get(self, msg: GetDeployment) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None and self.deps.remote is not None:
            return self.deps.remote.view(self.app_key, msg.deployment_id)
        return None if dep is None else self.deployment_view(dep)

    @handler(StopDeployment)
    async def on_stop(self, msg: StopDeployment) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None and self.deps.remote is not None:
            return await self.deps.remote.stop(self.app_key, msg.deployment_id)
        if dep is None:
            return None
        if dep.desired != "stopped":
            # Where it ran stays known (persisted): its logs are kept there for the
            # retention window, and asked for there.
            ran = frozenset(dep.replicas) | dep.placements
            dep = attrs.evolve(dep, desired="stopped", last_agents=ran or dep.last_agents,
                               stopped_at=self.deps.wall())
            await self._persist(dep)
            self.deployments[dep.deployment_id] = dep
            self._emit("deployment.stopping", dep.deployment_id, {})
        await self._reconcile_one(dep.deployment_id)
        self._watch()
        return self.deployment_view(self.deployments[dep.deployment_id])

    @handler(UpdateDeployment)
    async def on_update(self, msg: UpdateDeployment) -> dict[str, Any] | None:
        """``{"view", "changed"}``, ``{"error": code}``, or None (no such deployment)."""
        dep = self.deployments.get(msg.deployment_id)
        remote = self.deps.remote
        if dep is None and (remote is None
                            or remote.view(self.app_key, msg.deployment_id) is None):
            return None
        if msg.version is not None and msg.version not in self.versions:
            return {"error": "unknown_version"}
        if dep is None:
            assert remote is not None
            return await remote.update(
                self.app_key, msg.deployment_id,
                None if msg.version is None else self.versions[msg.version], msg.replicas)
        return await self._change(dep, msg.version or dep.version,
                                  msg.replicas or dep.replicas_wanted, "update")

    @handler(RollbackDeployment)
    async def on_rollback(self, msg: RollbackDeployment) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None and self.deps.remote is not None:
            return await self.deps.remote.rollback(self.app_key, msg.deployment_id,
                                                   self.versions)
        if dep is None:
            return None
        back = dep.previous_version
        if back is None or back not in self.versions:
            return {"error": "no_previous_version"}
        return await self._change(dep, back, dep.replicas_wanted, "rollback")

    async def _change(self, dep: Deployment, version: str, replicas: int,
                      reason: str) -> dict[str, Any]:
        """A new desired version and/or replica count, signed into the manifest before
        it is acknowledged; the passes converge to it (see the module docstring)."""
        if dep.desired == "stopped":
            return {"error": "stopped"}
        if version == dep.version and replicas == dep.replicas_wanted:
            return {"changed": False, "view": self.deployment_view(dep)}
        now = self.deps.wall()
        changes: dict[str, Any] = {
            "replicas_wanted": replicas, "halted": None, "failed_agents": frozenset(),
            "failure": None, "error": None, "failed_replicas": {}}
        if version != dep.version:
            changes.update(version=version, previous_version=dep.version,
                           history=_switch(dep.history, version, now),
                           update=Update("rolling", dep.version, version, now,
                                         reason=reason))
        dep = attrs.evolve(dep, **changes)
        if dep.state == "failed":
            dep = attrs.evolve(dep, state=transition(dep.state, "placing"))
        await self._persist(dep)
        self.deployments[dep.deployment_id] = dep
        self._emit("deployment.rollback" if reason == "rollback" else "deployment.update",
                   dep.deployment_id, {"version": dep.version,
                                       "previous_version": dep.previous_version,
                                       "replicas": dep.replicas_wanted})
        await self._reconcile_one(dep.deployment_id)
        self._watch()
        self._wake.set()
        return {"changed": True, "view": self.deployment_view(
            self.deployments[dep.deployment_id])}

    def _log_agents(self, dep: Deployment) -> list[str]:
        """Where a deployment's logs are: its replicas' agents, the agent of its last
        failure, and (stopped, within the retention window) where it last ran."""
        agents = set(dep.replicas)
        if dep.failure is not None and dep.failure.agent_id is not None:
            agents.add(dep.failure.agent_id)
        if dep.desired == "stopped" and dep.stopped_at is not None and \
                self.deps.wall() - dep.stopped_at <= self.deps.settings.log_retention_s:
            agents |= dep.last_agents
        return sorted(agents)

    @handler(LogSources)
    async def on_log_sources(self, msg: LogSources) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None:
            return None
        return {"deployment_id": dep.deployment_id, "agents": self._log_agents(dep)}

    @handler(ReplicaReport)
    async def on_report(self, msg: ReplicaReport) -> None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None:
            return
        old = dep.replicas.get(msg.agent_id)
        if old is None:
            # A report never makes a replica: only a placement (or the adoption of a
            # placed one, from the agent's view, under the same checks) does. A late
            # "stopped" of a replica already let go is routine; the rest is reported.
            if msg.state != "stopped" and msg.agent_id not in dep.placements:
                self._emit("replica.report_ignored", dep.deployment_id, {
                    "agent_id": msg.agent_id, "state": msg.state,
                    "reason": "NOT_A_REPLICA"})
                # A stray claims progress: look again (it is stopped there again).
                await self._reconcile_one(dep.deployment_id)
                self._watch()
            return
        replicas = {a: r for a, r in dep.replicas.items() if a != msg.agent_id}
        failed = False
        if msg.state != "stopped":  # a stopped replica is gone, not a member
            failure = None
            if msg.state == "failed":
                failure = Failure(failure_text(msg.phase, msg.exit_code, msg.log_tail,
                                               msg.error),
                                  msg.phase, msg.exit_code, msg.log_tail, msg.agent_id,
                                  old.version)
            replica = self._replica_as_reported(dep, old, msg.agent_id, msg.state,
                                                msg.compose_hash, msg.error,
                                                failure=failure)
            replicas[msg.agent_id] = replica
            failed = replica.state == "failed"
        self._set(attrs.evolve(dep, replicas=replicas))
        u = dep.update
        moving = (u is not None and u.finished_at is None) or any(
            r.version != dep.version for r in replicas.values())
        if failed or moving:  # a failure, or the next step of a rolling update
            await self._reconcile_one(dep.deployment_id)
            self._watch()
        self._wake.set()

    @handler(Reconcile)
    async def on_reconcile(self, _: Reconcile) -> None:
        await self._reconcile()

    # ---- reconciliation --------------------------------------------------------------

    def _set(self, dep: Deployment) -> None:
        state = derive(dep.desired, dep.replicas_wanted,
                       [r.state for r in dep.replicas.values()],
                       gave_up=dep.desired == "running" and (dep.halted is not None or (
                           dep.state == "failed" and not any(
                               r.state in ACTIVE_REPLICA for r in dep.replicas.values()))))
        old = self.deployments.get(dep.deployment_id)
        current = dep.state
        if current == "pending" and state not in ("pending", "placing", "stopping", "stopped"):
            current = transition(current, "placing")  # placed in the same pass
        if state == "stopped" and current not in ("stopping", "stopped"):
            current = transition(current, "stopping")  # nothing left to stop: stop at once
        new_state = transition(current, state)
        since = None
        if new_state == "placing":
            since = dep.placing_since if dep.placing_since is not None else trio.current_time()
        dep = attrs.evolve(dep, state=new_state, placing_since=since)
        self.deployments[dep.deployment_id] = dep
        if old is None or old.state != new_state:
            self._emit("deployment.state", dep.deployment_id, {"state": new_state})

    def _check_timeouts(self) -> None:
        """Phase timeouts (Trio time): a replica too long in a timed phase is failed
        (``failure.phase = "timeout"``); outside an update's health gate that halts the
        deployment (terminal ``failed``, the phase named in ``error``). A deployment
        ``placing`` too long is halted too."""
        now = trio.current_time()
        settings = self.deps.settings
        limits = settings.limits()
        for dep in list(self.deployments.values()):
            if dep.desired != "running" or dep.halted is not None:
                continue
            replicas = dict(dep.replicas)
            halted: str | None = None
            failure = dep.failure
            for agent_id, r in sorted(dep.replicas.items()):
                limit = timed_out(r.state, r.since, now, limits)
                if limit is None:
                    continue
                text = f"timed out in phase {r.state} after {limit:g}s on {agent_id}"
                failure = Failure(text, "timeout", None, (), agent_id, r.version)
                replicas[agent_id] = attrs.evolve(r, state="failed", error=text,
                                                  failure=failure, since=now)
                if not self._in_gate(dep, r):
                    halted = halted or text
            if (halted is None and dep.state == "placing" and dep.placing_since is not None
                    and now - dep.placing_since >= settings.placing_s):
                halted = (f"timed out in phase placing after {settings.placing_s:g}s: "
                          f"{dep.error or 'not placed'}")
                failure = Failure(halted, "timeout")
            if replicas != dep.replicas or halted is not None:
                self.deployments[dep.deployment_id] = attrs.evolve(
                    dep, replicas=replicas, halted=halted, failure=failure)
                self._emit("deployment.timeout", dep.deployment_id,
                           {"error": halted or (failure.error if failure else None),
                            "halted": halted is not None})

    @staticmethod
    def _in_gate(dep: Deployment, replica: Replica) -> bool:
        """Is *replica* a new replica of a rolling update (its failure is the health
        gate failing: rolled back, not counted against the agent)?"""
        u = dep.update
        return (u is not None and u.state == "rolling" and u.reason == "update"
                and replica.version == dep.version)

    def _gate_failed(self, dep: Deployment, replica: Replica) -> Deployment:
        """*dep* after *replica* failed: an update whose health gate failed goes back
        to the previous version (rolled back); the previous version failing during
        that, or an explicit rollback failing, fails the update."""
        u = dep.update
        if u is None or u.finished_at is not None or replica.version != dep.version:
            return dep
        failure = replica.failure
        cause = failure.error if failure is not None else (replica.error or "failed")
        now = self.deps.wall()
        if self._in_gate(dep, replica) and u.from_version in self.versions:
            why = (f"update to {u.to_version} rolled back: the new replica on "
                   f"{replica.agent_id} failed: {cause}")
            self._emit("deployment.rolled_back", dep.deployment_id, {
                "from": u.to_version, "to": u.from_version, "error": why})
            return attrs.evolve(dep, version=u.from_version, previous_version=u.to_version,
                                history=_switch(dep.history, u.from_version, now),
                                update=attrs.evolve(u, state=update_transition(
                                    u.state, "rolled_back"), error=why))
        why = f"{u.error + '; ' if u.error else ''}{dep.version} failed too: {cause}" \
            if u.state == "rolled_back" else f"rollback to {dep.version} failed: {cause}"
        self._emit("deployment.update_failed", dep.deployment_id, {"error": why})
        return attrs.evolve(dep, update=attrs.evolve(
            u, state=update_transition(u.state, "failed"), finished_at=now, error=why))

    async def _reconcile(self) -> None:
        if self.deps.nudges is not None:
            self.deps.nudges.taken(self.app_key)  # changes from now on nudge again
        if not self.deployments:
            return
        self._check_timeouts()
        directory = self.deps.directory
        # A stopped deployment is looked at again only when an agent lists it (one that
        # was away when it was stopped came back, or a stray): it is stopped there.
        for dep in list(self.deployments.values()):
            if dep.state != "stopped" or directory.listed(dep.deployment_id):
                inputs = self._inputs(dep)
                if inputs is not None and _same(inputs, self._seen.get(dep.deployment_id)):
                    continue  # nothing it depends on changed since its last pass
                # What the pass reads, as it reads it: a record that changes while the
                # pass awaits (a manifest write, an agent's answer) differs from this,
                # so the nudge that change sent is a pass, not a skip.
                read = self._read(dep)
                await self._reconcile_one(dep.deployment_id)
                after = self._inputs(self.deployments[dep.deployment_id], read)
                if after is not None:
                    self._seen[dep.deployment_id] = after
                else:
                    self._seen.pop(dep.deployment_id, None)
        self._watch()
        self._wake.set()

    def _read(self, dep: Deployment) -> dict[str, object]:
        """The readiness flag and the records a pass over *dep* starts from (its
        placed agents, its replicas' and the agents listing its id), keyed by agent id
        (``READY_KEY``: the flag)."""
        directory = self.deps.directory
        agents = dep.placements | dep.replicas.keys() | directory.listers(dep.deployment_id)
        ready = self.deps.ready() if self.deps.ready is not None else True
        return {READY_KEY: ready, **{a: directory.get(a) for a in agents}}

    def _inputs(self, dep: Deployment, read: Mapping[str, object] | None = None
                ) -> tuple[object, ...] | None:
        """What a pass over *dep* depends on, or None when it must run regardless (short
        of replicas: free agents and pool holds may have changed without a record of
        its own agents changing). Records are immutable and replaced on change, so
        comparing them by identity is exact (see ``_same``).

        With *read* (``_read`` before a pass): the records as that pass read them, not
        as they are now. An agent it did not read (placed by the pass) is ``UNREAD``,
        never the same as a record: the next nudge is a pass, which then sees it."""
        active = sum(1 for r in dep.replicas.values() if r.state in ACTIVE_REPLICA)
        if dep.desired == "running" and (active < dep.replicas_wanted or any(
                r.state == "failed" or r.version != dep.version
                for r in dep.replicas.values())):
            return None  # short, failed, or moving to another version
        directory = self.deps.directory
        agents = sorted(dep.placements | dep.replicas.keys()
                        | directory.listers(dep.deployment_id))
        if read is None:
            read = self._read(dep)
        return (dep, read[READY_KEY], tuple(agents), *(read.get(a, UNREAD) for a in agents))

    def _watch(self) -> None:
        """Tell the change feed which agents this app's passes depend on."""
        if self.deps.nudges is None:
            return
        agents: set[str] = set()
        hungry = False
        for dep in self.deployments.values():
            agents.update(dep.placements)
            agents.update(dep.replicas)
            if dep.desired == "running" and dep.state != "failed":
                active = sum(1 for r in dep.replicas.values() if r.state in ACTIVE_REPLICA)
                moving = any(r.version != dep.version for r in dep.replicas.values())
                hungry = hungry or moving or active < dep.replicas_wanted
        self.deps.nudges.watch(self.app_key, agents, hungry=hungry)

    async def _reconcile_one(self, deployment_id: str) -> None:
        dep = self.deployments[deployment_id]
        directory = self.deps.directory
        listed = {}
        for agent_id, d in directory.listing(deployment_id).items():
            record = directory.get(agent_id)
            if record is not None and record.status != "offline":
                listed[agent_id] = d
        replicas = dict(dep.replicas)
        placed = set(dep.placements)
        failed_agents = set(dep.failed_agents)
        saved = dep.spec()

        async def persist() -> None:
            """Sign what changed (placements, budget, version, update) into the
            manifest: before any deploy leaves, and at the end of the pass."""
            nonlocal dep, saved
            dep = attrs.evolve(dep, placements=frozenset(placed),
                               failed_agents=frozenset(failed_agents))
            spec = dep.spec()
            if spec != saved:
                await self._persist(dep)
                saved = spec

        # 1. What the agents list under this id: refresh or adopt replicas of placed
        #    agents, fail those with the wrong hash, stop strays.
        for agent_id, d in sorted(listed.items()):
            stray = stray_reason(placed=agent_id in placed, claimed_app=d.app,
                                 app=self.app_key)
            if stray is not None:
                replicas.pop(agent_id, None)
                placed.discard(agent_id)
                if d.state != "stopping":  # not yet told to stop
                    self._emit("replica.stray", deployment_id, {
                        "agent_id": agent_id, "reason": stray.value, "state": d.state,
                        "claimed_app": d.app, "action": "undeploy"})
                    await self._undeploy_on(agent_id, deployment_id)
                continue
            old = replicas.get(agent_id)
            replicas[agent_id] = self._replica_as_reported(
                dep, old, agent_id, d.state, d.compose_hash, old.error if old else None,
                version=d.version)
        # Members whose agent went away, or no longer lists the replica (stopped, or lost
        # before it ran: an agent lists a deployment from the moment PushDeploy was
        # accepted). Lost is not failed: it never counts against the budget.
        for agent_id in list(replicas):
            seen = directory.get(agent_id)
            if seen is None or seen.status == "offline":
                self._emit("replica.lost", deployment_id, {"agent_id": agent_id})
                del replicas[agent_id]
                placed.discard(agent_id)
            elif agent_id not in listed:
                del replicas[agent_id]
                placed.discard(agent_id)
        # Placed agents holding no replica. One not back since a CP restart stays placed
        # (adopted if it returns with the replica) until the deployment is healthy
        # without it, and is waited for (not re-placed) while the CP is not ready. One
        # that is back (or offline) without the replica lets it go: the deploy never
        # arrived, or the replica was lost.
        absent = {a for a in placed - set(replicas) if _absent(directory.get(a))}
        placed &= set(replicas) | absent
        waiting = bool(absent) and self.deps.ready is not None and not self.deps.ready()
        awaited = len(absent) if waiting else 0
        # 2. Failed replicas: the deployment keeps the cause; a new replica of a rolling
        #    update failing is its health gate failing (rolled back, not counted against
        #    the agent); one that failed in place goes back in place when its previous
        #    version is wanted again; the rest are stopped there and tried elsewhere.
        for agent_id, replica in sorted(replicas.items()):
            if replica.state != "failed" or dep.desired != "running":
                continue
            failure = replica.failure or Failure(replica.error or "failed",
                                                 agent_id=agent_id, version=replica.version)
            self._emit("replica.failed", deployment_id, {
                "agent_id": agent_id, "version": replica.version, "error": failure.error,
                **failure.view()})
            gate = self._in_gate(dep, replica)
            dep = attrs.evolve(self._gate_failed(dep, replica), failure=failure)
            if (replica.moved_from is not None and replica.moved_from == dep.version
                    and dep.halted is None):
                await persist()  # the rollback is signed before its deploy leaves
                if await self._deploy_on(agent_id, dep):
                    replicas[agent_id] = Replica(agent_id, "pending", version=dep.version,
                                                 since=trio.current_time(),
                                                 moved_from=replica.version)
                    continue
            if not gate:
                failed_agents.add(agent_id)
            await self._undeploy_on(agent_id, deployment_id)
            del replicas[agent_id]
            placed.discard(agent_id)
            dep = attrs.evolve(dep, failed_replicas={
                **dep.failed_replicas, agent_id: attrs.evolve(replica, failure=failure,
                                                              error=failure.error)})
        if dep.desired == "stopped":
            for agent_id in sorted(replicas):
                if replicas[agent_id].state != "stopping":
                    await self._undeploy_on(agent_id, deployment_id)
                    replicas[agent_id] = attrs.evolve(replicas[agent_id], state="stopping")
            await persist()
            self._set(attrs.evolve(dep, replicas=replicas, error=None))
            return
        # 3. Surplus: replicas of the deployment's version beyond the count, then those
        #    of an older version beyond what the running new ones do not yet serve
        #    (not-running first, then by agent id).
        wanted = dep.replicas_wanted
        current = [r for r in replicas.values()
                   if r.state in ACTIVE_REPLICA and r.version == dep.version]
        outdated = [r for r in replicas.values()
                    if r.state in ACTIVE_REPLICA and r.version != dep.version]
        order = sorted(current, key=lambda r: (r.state == "running", r.agent_id))
        extra = order[:max(0, len(current) - wanted)]
        serving = sum(1 for r in current if r.state == "running" and r not in extra)
        old_order = sorted(outdated, key=lambda r: (r.state == "running", r.agent_id))
        extra += old_order[:max(0, serving + len(outdated) - wanted)]
        for r in extra:
            await self._undeploy_on(r.agent_id, deployment_id)
            del replicas[r.agent_id]
            placed.discard(r.agent_id)
            self._emit("replica.surplus", deployment_id,
                       {"agent_id": r.agent_id, "version": r.version})
        # 4. Deficit: place the missing replicas, each placement signed into the
        #    manifest before its deploy leaves.
        missing = wanted - awaited - len(
            [r for r in replicas.values() if r.state in ACTIVE_REPLICA])
        error: str | None = None
        gave_up = dep.halted is not None
        if missing > 0 and not gave_up:
            if len(failed_agents) >= self.deps.max_attempts:
                gave_up = True
                error = _gave_up(frozenset(failed_agents))
            else:
                targets, placement = await self._choose(dep, replicas, failed_agents,
                                                        wanted, missing)
                placed.update(targets)
                await persist()  # before any deploy leaves
                for agent_id in targets:
                    sent = await self._deploy_on(agent_id, dep)
                    if sent:
                        replicas[agent_id] = Replica(agent_id, "pending",
                                                     version=dep.version,
                                                     since=trio.current_time())
                        missing -= 1
                    elif sent is not None:  # refused: never sent
                        placed.discard(agent_id)
                    # None (no answer): stays placed; the next pass adopts or lets it go
                if missing > 0:
                    error = (f"cannot place {missing} of {wanted} "
                             f"replica{'' if wanted == 1 else 's'}: "
                             f"{placement.why(self._holder)}")
        # 5. Rolling update: move one replica to the deployment's version at a time.
        if missing <= 0 and not gave_up and not waiting:
            await self._move_one(dep, replicas, placed, failed_agents, persist)
        if not gave_up and len(replicas) >= wanted and all(
                r.state == "running" for r in replicas.values()):
            # Healthy: earlier failures no longer count against new shortfalls, and
            # the placements are exactly the replicas.
            failed_agents.clear()
            placed.intersection_update(replicas)
            dep = attrs.evolve(dep, failed_replicas={})
            if all(r.version == dep.version for r in replicas.values()):
                dep = self._finished(dep)
        await persist()
        dep = attrs.evolve(dep, replicas=replicas, error=error, failed_replicas={
            a: r for a, r in dep.failed_replicas.items() if a not in replicas})
        if gave_up and (dep.halted is not None
                        or not any(r.state in ACTIVE_REPLICA for r in replicas.values())):
            was = dep.state
            dep = attrs.evolve(dep, state=transition(dep.state, "failed"),
                               placing_since=None)
            self.deployments[deployment_id] = dep
            if was != "failed":
                self._emit("deployment.state", deployment_id,
                           {"state": "failed", "error": self._error(dep)})
            return
        self._set(dep)

    async def _choose(self, dep: Deployment, replicas: Mapping[str, Replica],
                      failed_agents: set[str], count: int, missing: int
                      ) -> tuple[list[str], Placement]:
        """Up to *missing* agents not holding a replica yet, by placement of *count*."""
        constraints = attrs.evolve(
            dep.constraints, exclude_agents=dep.constraints.exclude_agents | failed_agents)
        if self.deps.reserve_warm is not None:
            # Consume warm capacity first: reservations are made atomically by the
            # pool, so two deployments never hold the same agent.
            await self.deps.reserve_warm(dep.deployment_id, constraints, missing)
        members = dict(replicas)
        placement = self.deps.directory.place(
            Request(deployment_id=dep.deployment_id, replicas=min(count, MAX_REPLICAS),
                    constraints=constraints), await self._holds(),
            adjust=lambda i: _for_placement(i, dep.deployment_id, members))
        return [a for a in placement.chosen if a not in replicas][:missing], placement

    async def _move_one(self, dep: Deployment, replicas: dict[str, Replica],
                        placed: set[str], failed_agents: set[str],
                        persist: Callable[[], Awaitable[None]]) -> None:
        """One step of a rolling update (``move_plan``): surge onto a free agent, else
        redeploy an outdated replica in place on its own agent."""
        active = [r for r in replicas.values() if r.state in ACTIVE_REPLICA]
        current = [r.state for r in active if r.version == dep.version]
        outdated = sorted((r for r in active if r.version != dep.version),
                          key=lambda r: (r.state == "running", r.agent_id))
        plan = move_plan(wanted=dep.replicas_wanted, current=current,
                         outdated=[r.state for r in outdated], free_agent=False)
        if plan != "in_place":
            return  # nothing to move, or wait for the new replica's health gate
        targets, _ = await self._choose(dep, replicas, failed_agents,
                                        len(replicas) + 1, 1)
        now = trio.current_time()
        if targets:  # surge: the new one first, the old one stops once it runs (step 3)
            placed.update(targets)
            await persist()
            if await self._deploy_on(targets[0], dep):
                replicas[targets[0]] = Replica(targets[0], "pending", version=dep.version,
                                               since=now)
                self._emit("replica.surge", dep.deployment_id,
                           {"agent_id": targets[0], "version": dep.version})
                return
            placed.discard(targets[0])
        old = outdated[0]  # in place: same agent, named volumes kept there
        if await self._deploy_on(old.agent_id, dep):
            replicas[old.agent_id] = Replica(old.agent_id, "pending", version=dep.version,
                                             since=now, moved_from=old.version)
            self._emit("replica.in_place", dep.deployment_id, {
                "agent_id": old.agent_id, "from": old.version, "version": dep.version})

    def _finished(self, dep: Deployment) -> Deployment:
        """Every replica runs the deployment's version: its update (if any) is over."""
        u = dep.update
        if u is None or u.finished_at is not None:
            return dep
        state = update_transition(u.state, "done") if u.state == "rolling" else u.state
        self._emit("deployment.updated", dep.deployment_id,
                   {"version": dep.version, "state": state})
        return attrs.evolve(dep, update=attrs.evolve(u, state=state,
                                                     finished_at=self.deps.wall()),
                            failure=None)

    async def _deploy_on(self, agent_id: str, dep: Deployment) -> bool | None:
        """True: sent; False: the agent refused (nothing sent); None: no answer."""
        version = self.versions[dep.version]
        try:
            ok: bool = await self.registry.ref(f"agent/{agent_id}").ask(
                PushDeploy(app=self.app_key, deployment_id=dep.deployment_id, version=version),
                timeout=10)
        except ActorError as exc:
            log.info("deploy %s on %s: %s", dep.deployment_id, agent_id, exc)
            return None
        if ok:
            self._emit("replica.placed", dep.deployment_id,
                       {"agent_id": agent_id, "version": dep.version})
        return ok

    async def _undeploy_on(self, agent_id: str, deployment_id: str) -> None:
        try:
            await self.registry.ref(f"agent/{agent_id}").ask(
                PushUndeploy(deployment_id), timeout=10)
        except ActorError as exc:
            log.info("undeploy %s on %s: %s", deployment_id, agent_id, exc)
