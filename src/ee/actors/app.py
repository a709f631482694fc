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
shortlist of the directory (``AgentDirectory.place``). In a pass:
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
the placement reason codes of the agents it could not use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from ee.actors.agent import FetchLogs, PushDeploy, PushUndeploy, ReplicaReport
from ee.actors.deployment import HashProblem, derive, hash_problem, stray_reason, transition
from ee.actors.directory import AgentDirectory, AgentRecord, Nudges
from ee.placement import AgentInfo, Constraints, Request, place
from ee.runtime import Actor, ActorError, handler

log = logging.getLogger("ee.actors.app")

ACTIVE_REPLICA = ("pending", "pulling", "building", "starting", "running")


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


# ---- messages -----------------------------------------------------------------------

@attrs.frozen
class AddVersion:
    spec: dict[str, Any]


@attrs.frozen
class ListVersions:
    pass


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
class DeploymentLogs:
    deployment_id: str
    tail: int


@attrs.frozen
class Reconcile:
    pass


# ---- state --------------------------------------------------------------------------

@attrs.frozen
class Replica:
    agent_id: str
    state: str
    compose_hash: str | None = None
    error: str | None = None


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

    def spec(self) -> dict[str, Any]:
        c = self.constraints
        return {"deployment_id": self.deployment_id, "version": self.version,
                "replicas": self.replicas_wanted, "desired": self.desired,
                "created_at": self.created_at,
                "constraints": {"datacenter": c.datacenter, "node_size": c.node_size,
                                "gpu": c.gpu, "exclude_agents": sorted(c.exclude_agents)},
                "placements": sorted(self.placements),
                "failed_agents": sorted(self.failed_agents)}


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


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


class AppActor(Actor):
    def __init__(self, app_key: str, deps: AppDeps) -> None:
        self.app_key = app_key
        self.deps = deps
        self.app: dict[str, Any] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, Deployment] = {}
        # deployment id -> the inputs of its last pass (see _inputs)
        self._seen: dict[str, tuple[object, ...]] = {}

    async def started(self) -> None:
        desired = await self.deps.load(self.app_key)
        self.app = desired["app"]
        self.versions = {v["version"]: v for v in desired["versions"]}
        for spec in desired["deployments"]:
            c = spec["constraints"]
            failed = _ids(spec.get("failed_agents"))
            exhausted = len(failed) >= self.deps.max_attempts
            # A stopped intent restarts as stopped (and goes back to stopping if an agent
            # still runs a replica); a failed one stays failed (its budget is spent); a
            # running one is placed from pending.
            state = ("stopped" if spec["desired"] == "stopped"
                     else "failed" if exhausted else "pending")
            self.deployments[spec["deployment_id"]] = Deployment(
                deployment_id=spec["deployment_id"], version=spec["version"],
                replicas_wanted=int(spec["replicas"]),
                constraints=Constraints.from_json(c), desired=spec["desired"],
                created_at=float(spec["created_at"]), state=state,
                placements=_ids(spec.get("placements")), failed_agents=failed,
                error=_gave_up(failed) if state == "failed" else None)
        if self.deps.nudges is not None:
            self.deps.nudges.own(self.app_key, self.deployments)
        self.start_soon(self._ticker)
        if self.deployments:
            await self._reconcile()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.deps.reconcile_interval_s)
            try:
                self.ref.try_tell(Reconcile())
            except ActorError:
                pass

    # ---- views -----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {**self.app, "versions": sorted(self.versions),
                "deployments": sorted(self.deployments)}

    def deployment_view(self, dep: Deployment) -> dict[str, Any]:
        return {
            "deployment_id": dep.deployment_id, "app": self.app["name"],
            "version": dep.version, "state": dep.state, "desired": dep.desired,
            "replicas_wanted": dep.replicas_wanted, "created_at": _iso(dep.created_at),
            "compose_hash": self._expected_hash(dep),
            "error": dep.error, "failures": len(dep.failed_agents),
            "replicas": [{"agent_id": r.agent_id, "state": r.state,
                          "compose_hash": r.compose_hash, "error": r.error}
                         for r in sorted(dep.replicas.values(), key=lambda r: r.agent_id)],
        }

    def _expected_hash(self, dep: Deployment) -> str | None:
        value = self.versions.get(dep.version, {}).get("compose_hash")
        return value if isinstance(value, str) else None

    async def _persist(self, dep: Deployment) -> None:
        await self.deps.save("deployments", dep.deployment_id,
                             {**dep.spec(), "app": self.app_key})

    def _replica_as_reported(self, dep: Deployment, old: Replica | None, agent_id: str,
                             state: str, compose_hash: str | None,
                             error: str | None) -> Replica:
        """A placed agent's replica as it reports it (a ``deploy_status`` or a listing),
        failed when the compose hash is not the version's (`hash_problem`)."""
        reported = compose_hash or (old.compose_hash if old else None)
        problem = hash_problem(state, reported, self._expected_hash(dep))
        if problem is None:
            return Replica(agent_id, state, reported, error)
        if old is not None and old.state == "failed":
            return old  # failed already, and said so
        return self._hash_failed(dep, agent_id, state, reported, problem)

    def _hash_failed(self, dep: Deployment, agent_id: str, state: str,
                     reported: str | None, problem: HashProblem) -> Replica:
        """The replica, failed: it does not run the version's workload."""
        expected = self._expected_hash(dep)
        self.deps.emit("replica.stray", dep.deployment_id, {
            "agent_id": agent_id, "reason": problem.value, "state": state,
            "compose_hash": reported, "expected": expected, "action": "failed"})
        return Replica(agent_id, "failed", reported,
                       f"{problem.value}: reported {reported or 'none'}, "
                       f"version {dep.version} is {expected}")

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

    async def _holds(self) -> dict[str, str]:
        return await self.deps.holds() if self.deps.holds is not None else {}

    @handler(Preflight)
    async def on_preflight(self, msg: Preflight) -> dict[str, Any]:
        if msg.version not in self.versions:
            return {"error": "unknown_version"}
        # A preflight shows every agent's verdict: placement over all of them.
        request = Request(deployment_id=None, replicas=msg.replicas,
                          constraints=msg.constraints)
        return place(request, self.deps.directory.infos(await self._holds())).to_dict()

    @handler(CreateDeployment)
    async def on_create(self, msg: CreateDeployment) -> dict[str, Any]:
        if msg.version not in self.versions:
            return {"error": "unknown_version"}
        placement = self.deps.directory.place(
            Request(deployment_id=None, replicas=msg.replicas, constraints=msg.constraints),
            await self._holds())
        if not placement.placeable:
            return {"error": "not_placeable", "placement": placement.to_dict()}
        dep = Deployment(deployment_id=msg.deployment_id, version=msg.version,
                         replicas_wanted=msg.replicas, constraints=msg.constraints,
                         desired="running", created_at=time.time())
        await self._persist(dep)
        self.deployments[dep.deployment_id] = dep
        if self.deps.nudges is not None:
            self.deps.nudges.own(self.app_key, (dep.deployment_id,))
        self.deps.emit("deployment.created", dep.deployment_id,
                       {"app": self.app_key, "version": msg.version, "replicas": msg.replicas})
        await self._reconcile_one(dep.deployment_id)
        self._watch()
        return {"deployment_id": dep.deployment_id}

    @handler(GetDeployment)
    async def on_get(self, msg: GetDeployment) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        return None if dep is None else self.deployment_view(dep)

    @handler(StopDeployment)
    async def on_stop(self, msg: StopDeployment) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None:
            return None
        if dep.desired != "stopped":
            dep = attrs.evolve(dep, desired="stopped")
            await self._persist(dep)
            self.deployments[dep.deployment_id] = dep
            self.deps.emit("deployment.stopping", dep.deployment_id, {"app": self.app_key})
        await self._reconcile_one(dep.deployment_id)
        self._watch()
        return self.deployment_view(self.deployments[dep.deployment_id])

    @handler(DeploymentLogs)
    async def on_logs(self, msg: DeploymentLogs) -> dict[str, Any] | None:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None:
            return None
        out = []
        for agent_id in sorted(dep.replicas):
            try:
                lines = await self.registry.ref(f"agent/{agent_id}").ask(
                    FetchLogs(dep.deployment_id, msg.tail), timeout=15)
                out.append({"agent_id": agent_id, "lines": lines})
            except ActorError as exc:
                out.append({"agent_id": agent_id, "error": str(exc)})
        return {"deployment_id": dep.deployment_id, "replicas": out}

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
                self.deps.emit("replica.report_ignored", dep.deployment_id, {
                    "agent_id": msg.agent_id, "state": msg.state,
                    "reason": "NOT_A_REPLICA"})
                # A stray claims progress: look again (it is stopped there again).
                await self._reconcile_one(dep.deployment_id)
                self._watch()
            return
        replicas = {a: r for a, r in dep.replicas.items() if a != msg.agent_id}
        failed = False
        if msg.state != "stopped":  # a stopped replica is gone, not a member
            replica = self._replica_as_reported(dep, old, msg.agent_id, msg.state,
                                                msg.compose_hash, msg.error)
            replicas[msg.agent_id] = replica
            failed = replica.state == "failed"
        self._set(attrs.evolve(dep, replicas=replicas))
        if failed:
            await self._reconcile_one(dep.deployment_id)
            self._watch()

    @handler(Reconcile)
    async def on_reconcile(self, _: Reconcile) -> None:
        await self._reconcile()

    # ---- reconciliation --------------------------------------------------------------

    def _set(self, dep: Deployment) -> None:
        state = derive(dep.desired, dep.replicas_wanted,
                       [r.state for r in dep.replicas.values()],
                       gave_up=dep.state == "failed" and dep.desired == "running"
                       and not any(r.state in ACTIVE_REPLICA for r in dep.replicas.values()))
        old = self.deployments.get(dep.deployment_id)
        current = dep.state
        if current == "pending" and state not in ("pending", "placing", "stopping", "stopped"):
            current = transition(current, "placing")  # placed in the same pass
        if state == "stopped" and current not in ("stopping", "stopped"):
            current = transition(current, "stopping")  # nothing left to stop: stop at once
        new_state = transition(current, state)
        dep = attrs.evolve(dep, state=new_state)
        self.deployments[dep.deployment_id] = dep
        if old is None or old.state != new_state:
            self.deps.emit("deployment.state", dep.deployment_id,
                           {"app": self.app_key, "state": new_state})

    async def _reconcile(self) -> None:
        if self.deps.nudges is not None:
            self.deps.nudges.taken(self.app_key)  # changes from now on nudge again
        if not self.deployments:
            return
        directory = self.deps.directory
        # A stopped deployment is looked at again only when an agent lists it (one that
        # was away when it was stopped came back, or a stray): it is stopped there.
        for dep in list(self.deployments.values()):
            if dep.state != "stopped" or directory.listed(dep.deployment_id):
                inputs = self._inputs(dep)
                if inputs is not None and _same(inputs, self._seen.get(dep.deployment_id)):
                    continue  # nothing it depends on changed since its last pass
                await self._reconcile_one(dep.deployment_id)
                after = self._inputs(self.deployments[dep.deployment_id])
                if after is not None:
                    self._seen[dep.deployment_id] = after
                else:
                    self._seen.pop(dep.deployment_id, None)
        self._watch()

    def _inputs(self, dep: Deployment) -> tuple[object, ...] | None:
        """What a pass over *dep* depends on, or None when it must run regardless (short
        of replicas: free agents and pool holds may have changed without a record of
        its own agents changing). Records are immutable and replaced on change, so
        comparing them by identity is exact (see ``_same``)."""
        active = sum(1 for r in dep.replicas.values() if r.state in ACTIVE_REPLICA)
        if dep.desired == "running" and (active < dep.replicas_wanted or any(
                r.state == "failed" for r in dep.replicas.values())):
            return None
        directory = self.deps.directory
        agents = sorted(dep.placements | dep.replicas.keys()
                        | directory.listers(dep.deployment_id))
        ready = self.deps.ready() if self.deps.ready is not None else True
        return (dep, ready, tuple(agents), *(directory.get(a) for a in agents))

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
                hungry = hungry or active < dep.replicas_wanted
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
        saved = (dep.placements, dep.failed_agents)

        async def persist() -> None:
            nonlocal dep, saved
            now = (frozenset(placed), frozenset(failed_agents))
            if now != saved:
                dep = attrs.evolve(dep, placements=now[0], failed_agents=now[1])
                await self._persist(dep)
                saved = now

        # 1. What the agents list under this id: refresh or adopt replicas of placed
        #    agents, fail those with the wrong hash, stop strays.
        for agent_id, d in sorted(listed.items()):
            stray = stray_reason(placed=agent_id in placed, claimed_app=d.app,
                                 app=self.app_key)
            if stray is not None:
                replicas.pop(agent_id, None)
                placed.discard(agent_id)
                if d.state != "stopping":  # not yet told to stop
                    self.deps.emit("replica.stray", deployment_id, {
                        "agent_id": agent_id, "reason": stray.value, "state": d.state,
                        "claimed_app": d.app, "action": "undeploy"})
                    await self._undeploy_on(agent_id, deployment_id)
                continue
            old = replicas.get(agent_id)
            replicas[agent_id] = self._replica_as_reported(
                dep, old, agent_id, d.state, d.compose_hash, old.error if old else None)
        # Members whose agent went away, or no longer lists the replica (stopped, or lost
        # before it ran: an agent lists a deployment from the moment PushDeploy was
        # accepted). Lost is not failed: it never counts against the budget.
        for agent_id in list(replicas):
            seen = directory.get(agent_id)
            if seen is None or seen.status == "offline":
                self.deps.emit("replica.lost", deployment_id, {"agent_id": agent_id})
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
        # 2. Failed replicas: stop them there and try elsewhere.
        for agent_id, replica in list(replicas.items()):
            if replica.state == "failed" and dep.desired == "running":
                failed_agents.add(agent_id)
                await self._undeploy_on(agent_id, deployment_id)
                del replicas[agent_id]
                placed.discard(agent_id)
                self.deps.emit("replica.failed", deployment_id,
                               {"agent_id": agent_id, "error": replica.error})
        if dep.desired == "stopped":
            for agent_id in sorted(replicas):
                if replicas[agent_id].state != "stopping":
                    await self._undeploy_on(agent_id, deployment_id)
                    replicas[agent_id] = attrs.evolve(replicas[agent_id], state="stopping")
            await persist()
            self._set(attrs.evolve(dep, replicas=replicas, error=None))
            return
        # 3. Surplus: stop the extras (not-running first, then by agent id).
        active = [r for r in replicas.values() if r.state in ACTIVE_REPLICA]
        surplus = len(active) - dep.replicas_wanted
        if surplus > 0:
            order = sorted(active, key=lambda r: (r.state == "running", r.agent_id))
            for r in order[:surplus]:
                await self._undeploy_on(r.agent_id, deployment_id)
                del replicas[r.agent_id]
                placed.discard(r.agent_id)
                self.deps.emit("replica.surplus", deployment_id, {"agent_id": r.agent_id})
        # 4. Deficit: place the missing replicas, each placement signed into the
        #    manifest before its deploy leaves.
        missing = dep.replicas_wanted - awaited - len(
            [r for r in replicas.values() if r.state in ACTIVE_REPLICA])
        error: str | None = None
        gave_up = False
        if missing > 0:
            if len(failed_agents) >= self.deps.max_attempts:
                gave_up = True
                error = _gave_up(frozenset(failed_agents))
            else:
                constraints = attrs.evolve(
                    dep.constraints,
                    exclude_agents=dep.constraints.exclude_agents | failed_agents)
                if self.deps.reserve_warm is not None:
                    # Consume warm capacity first: reservations are made atomically by
                    # the pool, so two deployments never hold the same agent.
                    await self.deps.reserve_warm(deployment_id, constraints, missing)
                members = dict(replicas)
                placement = directory.place(
                    Request(deployment_id=deployment_id, replicas=dep.replicas_wanted,
                            constraints=constraints), await self._holds(),
                    adjust=lambda i: _for_placement(i, deployment_id, members))
                targets = [a for a in placement.chosen if a not in replicas][:missing]
                placed.update(targets)
                await persist()  # before any deploy leaves
                for agent_id in targets:
                    sent = await self._deploy_on(agent_id, dep)
                    if sent:
                        replicas[agent_id] = Replica(agent_id, "pending")
                        missing -= 1
                    elif sent is not None:  # refused: never sent
                        placed.discard(agent_id)
                    # None (no answer): stays placed; the next pass adopts or lets it go
                if missing > 0:
                    error = (f"cannot place {missing} of {dep.replicas_wanted} "
                             f"replica{'' if dep.replicas_wanted == 1 else 's'}: "
                             f"{placement.why()}")
        if not gave_up and len(replicas) >= dep.replicas_wanted and all(
                r.state == "running" for r in replicas.values()):
            # Healthy: earlier failures no longer count against new shortfalls, and
            # the placements are exactly the replicas.
            failed_agents.clear()
            placed.intersection_update(replicas)
        await persist()
        dep = attrs.evolve(dep, replicas=replicas, error=error)
        if gave_up and not any(r.state in ACTIVE_REPLICA for r in replicas.values()):
            dep = attrs.evolve(dep, state=transition(dep.state, "failed"))
            self.deployments[deployment_id] = dep
            self.deps.emit("deployment.state", deployment_id,
                           {"app": self.app_key, "state": "failed", "error": error})
            return
        self._set(dep)

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
            self.deps.emit("replica.placed", dep.deployment_id, {"agent_id": agent_id})
        return ok

    async def _undeploy_on(self, agent_id: str, deployment_id: str) -> None:
        try:
            await self.registry.ref(f"agent/{agent_id}").ask(
                PushUndeploy(deployment_id), timeout=10)
        except ActorError as exc:
            log.info("undeploy %s on %s: %s", deployment_id, agent_id, exc)
