"""Adoption after a CP restart only of what the signed intent placed; strays stopped and
reported; placements written before the deploy leaves (a CP crashed in between);
agents' reports never change what they do not hold; the failure budget survives a
restart; a deployment that cannot be placed says why.

Real CP (in-process, real listeners), real websockets, simulated agents. A CP "crash"
cancels the CP's task outright (no graceful stop, no last words to the agents).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from cpkit import RunningCp, dev_config, free_port
from simagent import SimAgent
from test_sessions import FAST, wait_until
from test_tenants import deployment, reach_state, setup_app, tenant

from ee.actors.app import Reconcile
from ee.actors.deployment import HashProblem, Stray, hash_problem, stray_reason
from ee.attestation.providers.sim import SimTD
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, prepare
from ee.protocol.messages import Deploy, DeploymentSnapshot, DeployStatus, Undeploy

WRONG_HASH = "ab" * 32
Save = Callable[[str, str, dict[str, Any]], Awaitable[None]]


# ---- the pure checks -----------------------------------------------------------------

def test_stray_reason_table() -> None:
    app = "acct-a.hello"
    assert stray_reason(placed=True, claimed_app=app, app=app) is None
    assert stray_reason(placed=False, claimed_app=app, app=app) is Stray.NOT_PLACED
    assert stray_reason(placed=True, claimed_app="acct-b.hello", app=app) is Stray.WRONG_APP
    assert stray_reason(placed=False, claimed_app=None, app=app) is Stray.WRONG_APP


@pytest.mark.parametrize(("state", "reported", "problem"), [
    ("running", "h1", None),
    ("starting", "h1", None),
    ("running", "h2", HashProblem.COMPOSE_HASH_MISMATCH),
    ("starting", "h2", HashProblem.COMPOSE_HASH_MISMATCH),
    ("failed", "h2", HashProblem.COMPOSE_HASH_MISMATCH),
    ("running", None, HashProblem.COMPOSE_HASH_MISSING),
    ("pending", None, None),
    ("starting", None, None),
    ("failed", None, None),
])
def test_hash_problem_table(state: str, reported: str | None,
                            problem: HashProblem | None) -> None:
    assert hash_problem(state, reported, "h1") is problem


# ---- fixtures ------------------------------------------------------------------------

@attrs.define
class Agent(SimAgent):
    """A sim agent that records what the CP told it, and can be told to misbehave."""

    received: list[tuple[str, str]] = attrs.field(factory=list)  # (kind, deployment id)
    ignore_undeploys: bool = False
    on_deploy: Callable[[Agent, Deploy], bool] | None = None  # False: do not run it

    async def _deploy(self, msg: Deploy) -> None:
        self.received.append(("deploy", msg.deployment_id))
        if self.on_deploy is not None and not self.on_deploy(self, msg):
            return
        await SimAgent._deploy(self, msg)

    async def _undeploy(self, msg: Undeploy) -> None:
        self.received.append(("undeploy", msg.deployment_id))
        if not self.ignore_undeploys:
            await SimAgent._undeploy(self, msg)

    def deploys(self, dep_id: str) -> int:
        return self.received.count(("deploy", dep_id))

    def undeploys(self, dep_id: str) -> int:
        return self.received.count(("undeploy", dep_id))

    async def lose(self) -> None:
        """The VM goes away: no more heartbeats, the session closed under the CP."""
        self.heartbeats = False
        assert self.ws is not None
        await self.ws.aclose()


@attrs.define
class Cp:
    env: RunningCp
    scope: trio.CancelScope

    def crash(self) -> None:
        self.scope.cancel()

    def agent(self, vm_name: str, **kw: Any) -> Agent:
        return Agent(url=self.env.agent_url, td=self.env.td, vm_name=vm_name, **kw)

    async def start(self, nursery: trio.Nursery, *names: str, forever: bool = False,
                    **kw: Any) -> list[Agent]:
        """Agents registered (``forever``: reconnecting, as across a CP restart)."""
        agents = [self.agent(name, **kw) for name in names]
        for agent in agents:
            await nursery.start(agent.run_forever if forever else agent.run)
        return agents

    def events(self, kind: str, subject: str | None = None) -> list[dict[str, Any]]:
        return [dict(e.data) for e in self.env.cp.events.recent
                if e.kind == kind and (subject is None or e.subject == subject)]


@asynccontextmanager
async def control_plane(data: Path, agent_listen: str, *,
                        wrap_save: Callable[[Save], Save] | None = None,
                        settle_s: float = 30, max_attempts: int = 3) -> AsyncIterator[Cp]:
    """A CP with the readiness wiring AppDeps.ready asks for (applied here until
    server.py passes it), a quick reconcile, and optionally a wrapped manifest save."""
    config = dev_config(data, agent_listen=agent_listen, quorum=Quorum(settle_timeout_s=settle_s),
                        **FAST)
    boot, _ = prepare(config)
    assert boot.sim_dir is not None
    cp = ControlPlane(config, boot)
    base = cp.app_deps

    def app_deps() -> Any:
        deps = base()
        changes: dict[str, Any] = {"reconcile_interval_s": 0.3, "max_attempts": max_attempts}
        if deps.ready is None:
            changes["ready"] = lambda: cp.readiness().ready
        if wrap_save is not None:
            changes["save"] = wrap_save(deps.save)
        return attrs.evolve(deps, **changes)

    cp.app_deps = app_deps  # type: ignore[method-assign]
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await cp.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        token = (data / "admin.token").read_text().strip()
        try:
            yield Cp(RunningCp(cp, SimTD.load(boot.sim_dir), token, data), scope)
        finally:
            if not scope.cancel_called:
                cp.request_stop()


async def key_of(http: httpx.AsyncClient) -> str:
    return str(http.headers["Authorization"]).split(" ", 1)[1]


async def app_key(http: httpx.AsyncClient, app: str = "hello") -> str:
    me = (await http.get("/api/v2/accounts/me")).json()
    return f"{me['account_id']}.{app}"


async def deploy(http: httpx.AsyncClient, replicas: int = 1) -> str:
    r = await http.post("/api/v2/apps/hello/deployments",
                        json={"version": "1.0", "replicas": replicas})
    assert r.status_code == 202, r.text
    return str(r.json()["deployment_id"])


async def deploy_into_a_crash(http: httpx.AsyncClient) -> None:
    """A deploy request whose CP dies under it: no answer is the expected answer."""
    try:
        await http.post("/api/v2/apps/hello/deployments", json={"version": "1.0"})
    except httpx.HTTPError:
        pass


def listing(dep_id: str, app: str, compose_hash: str | None,
            state: str = "running") -> DeploymentSnapshot:
    return DeploymentSnapshot(deployment_id=dep_id, app=app, version="1.0", state=state,
                              compose_hash=compose_hash)


# ---- strays after a restart ----------------------------------------------------------

async def test_strays_after_restart_are_stopped_and_reported(tmp_path: Path) -> None:
    """Agents that list a deployment the intent never placed on them — under its own app
    with the right hash, under another tenant's app, or with a wrong hash — are stopped
    and reported; the placed replica is adopted and keeps running; a stray's spoofed
    deploy_status changes nothing."""
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen) as cp:
                real = cp.agent("vm-real")
                real_scope = trio.CancelScope()

                async def run_real(task_status: trio.TaskStatus[None]) -> None:
                    with real_scope:
                        await real.run_forever(task_status=task_status)

                await agents.start(run_real)
                alice, bob = await tenant(cp.env, "alice"), await tenant(cp.env, "bob")
                async with alice, bob:
                    d = await setup_app(alice)
                    await setup_app(bob)
                    dep_id = await deploy(alice)
                    before = await reach_state(alice, dep_id, "running")
                    alice_app, bob_app = await app_key(alice), await app_key(bob)
                    keys = (await key_of(alice), await key_of(bob))
            real_scope.cancel()  # the real agent comes back only once the strays are seen
            good = d["compose_hash"]
            liars = {
                "vm-liar-same-app": (listing(dep_id, alice_app, good), Stray.NOT_PLACED),
                "vm-liar-other-tenant": (listing(dep_id, bob_app, good), Stray.WRONG_APP),
                "vm-liar-wrong-hash": (listing(dep_id, alice_app, WRONG_HASH),
                                       Stray.NOT_PLACED),
            }
            async with control_plane(data, listen) as cp:
                fleet = {}
                for name, (snap, _) in liars.items():
                    fleet[name] = cp.agent(name, ignore_undeploys=name.endswith("same-app"))
                    fleet[name].deployments[dep_id] = snap
                    await agents.start(fleet[name].run)

                def strays_seen() -> bool:
                    got = {e["agent_id"]: e["reason"] for e in cp.events("replica.stray", dep_id)}
                    return got == {fleet[n].agent_id: r.value for n, (_, r) in liars.items()}

                await wait_until(strays_seen, "every stray reported")
                await wait_until(lambda: all(a.undeploys(dep_id) for a in fleet.values()),
                                 "every stray told to stop")
                assert not fleet["vm-liar-other-tenant"].deployments
                assert not fleet["vm-liar-wrong-hash"].deployments
                async with cp.env.client(token=keys[0]) as http:
                    waiting = await deployment(http, dep_id)
                    assert waiting["replicas"] == []  # no stray was ever a replica
                    await agents.start(real.run_forever)
                    after = await reach_state(http, dep_id, "running")
                    assert after["replicas"] == before["replicas"]
                    # A stray that kept it (it ignores undeploys) reports it running: the
                    # report is ignored and reported, the deployment does not change.
                    liar = fleet["vm-liar-same-app"]
                    assert dep_id in liar.deployments
                    await liar.send(DeployStatus(deployment_id=dep_id, state="running",
                                                 compose_hash=good))
                    await wait_until(lambda: cp.events("replica.report_ignored", dep_id),
                                     "spoofed report ignored")
                    await wait_until(lambda: liar.undeploys(dep_id) >= 2, "stopped again")
                    assert (await deployment(http, dep_id))["replicas"] == before["replicas"]
                # Adopted, never restarted, never displaced.
                assert real.received == [("deploy", dep_id)]
                assert not cp.events("replica.surplus", dep_id)
                assert all(a.deploys(dep_id) == 0 for a in fleet.values())
            agents.cancel_scope.cancel()


async def test_placed_replica_with_a_wrong_hash_is_failed_not_adopted(tmp_path: Path) -> None:
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen) as cp:
                a, b = await cp.start(agents, "vm-a", "vm-b", forever=True)
                http = await tenant(cp.env, "t")
                async with http:
                    await setup_app(http)
                    dep_id = await deploy(http, replicas=2)
                    await reach_state(http, dep_id, "running")
                    key = await key_of(http)
            # While the CP is away, b's workload changes under it.
            b.deployments[dep_id] = attrs.evolve(b.deployments[dep_id],
                                                 compose_hash=WRONG_HASH)
            async with control_plane(data, listen) as cp:
                [c] = await cp.start(agents, "vm-c", forever=True)
                async with cp.env.client(token=key) as http:

                    async def moved() -> dict[str, Any] | None:
                        d = await deployment(http, dep_id)
                        ids = {r["agent_id"] for r in d["replicas"]}
                        ok = d["state"] == "running" and ids == {a.agent_id, c.agent_id}
                        return d if ok else None

                    d = await wait_until(moved, "b's replica replaced by c's")
                assert all(r["compose_hash"] == d["compose_hash"] for r in d["replicas"])
                # Counted as a failure (not silently replaced): the budget's count itself
                # is transient — a healthy pass clears it — so the evidence is the
                # replica.failed event and the failure the deployment keeps.
                failed = cp.events("replica.failed", dep_id)
                assert [e["agent_id"] for e in failed] == [b.agent_id]
                assert "COMPOSE_HASH_MISMATCH" in failed[0]["error"]
                assert d["failure"]["agent_id"] == b.agent_id
                assert not b.deployments and b.undeploys(dep_id) == 1
                stray = cp.events("replica.stray", dep_id)
                assert [(e["agent_id"], e["reason"]) for e in stray] == \
                    [(b.agent_id, "COMPOSE_HASH_MISMATCH")]
                assert a.received == [("deploy", dep_id)]  # adopted, not restarted
            agents.cancel_scope.cancel()


async def test_budget_spent_on_the_first_pass_after_a_restart(tmp_path: Path) -> None:
    """The adopted replica is the last try (budget 1) and has the wrong hash: the
    deployment fails straight from pending, without crashing its actor."""
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(60):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen) as cp:
                [a] = await cp.start(agents, "vm-a", forever=True)
                http = await tenant(cp.env, "t")
                async with http:
                    await setup_app(http)
                    dep_id = await deploy(http)
                    await reach_state(http, dep_id, "running")
                    key = await key_of(http)
            a.deployments[dep_id] = attrs.evolve(a.deployments[dep_id],
                                                 compose_hash=WRONG_HASH)
            async with control_plane(data, listen, max_attempts=1) as cp:
                async with cp.env.client(token=key) as http:
                    d = await reach_state(http, dep_id, "failed")
                assert d["failures"] == 1 and d["replicas"] == []
                app = f"app/{cp.env.cp.deployment_index[dep_id]}"
                node = next(x for x in cp.env.cp.root.snapshot().walk() if x.name == app)
                assert node.restarts == 0, node.last_error
                assert a.undeploys(dep_id) == 1
            agents.cancel_scope.cancel()


async def test_app_restart_that_spends_the_budget_on_its_first_pass(tmp_path: Path) -> None:
    """An AppActor restarted (chaos) with one failure on record finds its replica with
    the wrong hash on its first pass: the deployment goes pending → failed (budget 2
    spent), and the actor does not crash over it."""
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    hold = {"saves": False}
    blocked = trio.Event()

    def blocker(save: Save) -> Save:
        async def wrapped(kind: str, ident: str, spec: dict[str, Any]) -> None:
            if hold["saves"]:
                blocked.set()
                await trio.sleep_forever()
            await save(kind, ident, spec)

        return wrapped

    with trio.fail_after(60):
        async with trio.open_nursery() as agents, \
                control_plane(data, listen, wrap_save=blocker, max_attempts=2) as cp:
            fleet = {a.agent_id: a for a in await cp.start(agents, "vm-a", "vm-b")}
            http = await tenant(cp.env, "t")
            async with http, trio.open_nursery() as requests:
                await setup_app(http)
                dep_id = await deploy(http)
                d = await reach_state(http, dep_id, "running")
                first = fleet[d["replicas"][0]["agent_id"]]
                await first.send(DeployStatus(deployment_id=dep_id, state="running",
                                              compose_hash=WRONG_HASH))

                async def moved() -> dict[str, Any] | None:
                    d = await deployment(http, dep_id)
                    ids = [r["agent_id"] for r in d["replicas"]]
                    ok = d["state"] == "running" and ids and ids != [first.agent_id]
                    return d if ok else None

                d = await wait_until(moved, "moved after the first failure")
                assert d["failures"] == 1
                second = fleet[d["replicas"][0]["agent_id"]]
                # Hold the app actor in a save, let the second agent's workload change
                # meanwhile, then crash the actor: its restart sees the change first.
                hold["saves"] = True
                requests.start_soon(deploy_into_a_crash, http)
                await blocked.wait()
                await second.send(DeployStatus(deployment_id=dep_id, state="running",
                                               compose_hash=WRONG_HASH))

                async def agent_shows_it() -> bool:
                    async with cp.env.client() as admin:
                        view = (await admin.get(f"/api/v2/agents/{second.agent_id}")).json()
                    return any(x["compose_hash"] == WRONG_HASH for x in view["deployment"])

                await wait_until(agent_shows_it, "the agent's view changed")
                hold["saves"] = False
                app = f"app/{cp.env.cp.deployment_index[dep_id]}"
                assert cp.env.cp.root.crash(app)
                d = await reach_state(http, dep_id, "failed")
                assert d["failures"] == 2 and "2 agents" in d["error"]
                node = next(x for x in cp.env.cp.root.snapshot().walk() if x.name == app)
                assert node.restarts == 1, node.last_error  # the chaos crash, no other
                requests.cancel_scope.cancel()
            agents.cancel_scope.cancel()


async def test_a_report_with_a_wrong_hash_fails_the_replica(tmp_path: Path) -> None:
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(60):
        async with trio.open_nursery() as agents, control_plane(data, listen) as cp:
            fleet = await cp.start(agents, "vm-0", "vm-1")
            http = await tenant(cp.env, "t")
            async with http:
                await setup_app(http)
                dep_id = await deploy(http)
                d = await reach_state(http, dep_id, "running")
                first = next(x for x in fleet if x.agent_id == d["replicas"][0]["agent_id"])
                other = next(x for x in fleet if x is not first)
                await first.send(DeployStatus(deployment_id=dep_id, state="running",
                                              compose_hash=WRONG_HASH))

                async def moved() -> dict[str, Any] | None:
                    d = await deployment(http, dep_id)
                    ids = [r["agent_id"] for r in d["replicas"]]
                    return d if d["state"] == "running" and ids == [other.agent_id] else None

                d = await wait_until(moved, "moved off the mismatching agent")
                assert d["failures"] == 1
                assert [e["reason"] for e in cp.events("replica.stray", dep_id)] == \
                    ["COMPOSE_HASH_MISMATCH"]
                assert first.undeploys(dep_id) == 1
            agents.cancel_scope.cancel()


async def test_a_stray_is_never_placed_on(tmp_path: Path) -> None:
    """An agent listing the deployment unplaced (and ignoring undeploys) is busy to
    placement, never an 'existing replica' a lost one is re-placed onto."""
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(60):
        async with trio.open_nursery() as agents, control_plane(data, listen) as cp:
            [a] = await cp.start(agents, "vm-a")
            http = await tenant(cp.env, "t")
            async with http:
                d = await setup_app(http)
                dep_id = await deploy(http)
                await reach_state(http, dep_id, "running")
                liar = cp.agent("vm-liar", ignore_undeploys=True)
                liar.deployments[dep_id] = listing(dep_id, await app_key(http),
                                                   d["compose_hash"])
                await agents.start(liar.run)
                await wait_until(lambda: liar.undeploys(dep_id), "stray stopped")
                [spare] = await cp.start(agents, "vm-spare")
                await a.lose()  # the real replica's agent

                async def replaced() -> dict[str, Any] | None:
                    d = await deployment(http, dep_id)
                    ids = [r["agent_id"] for r in d["replicas"]]
                    return d if d["state"] == "running" and ids == [spare.agent_id] else None

                await wait_until(replaced, "re-placed on the spare")
                assert liar.deploys(dep_id) == 0
                assert liar.agent_id not in [r["agent_id"] for r in
                                             (await deployment(http, dep_id))["replicas"]]
            agents.cancel_scope.cancel()


# ---- placement written before the deploy leaves --------------------------------------

def _blocking_save(when: str, saved: trio.Event,
                   record: list[str]) -> Callable[[Save], Save]:
    """A save that hangs (before or after writing) on the first manifest that places a
    replica: the CP is crashed there, between the save and the send."""

    def wrap(save: Save) -> Save:
        async def wrapped(kind: str, ident: str, spec: dict[str, Any]) -> None:
            placing = kind == "deployments" and spec.get("placements") and not saved.is_set()
            if placing and when == "before":
                record.append(ident)
                saved.set()
                await trio.sleep_forever()
            await save(kind, ident, spec)
            if placing:
                record.append(ident)
                saved.set()
                await trio.sleep_forever()

        return wrapped

    return wrap


@pytest.mark.parametrize("when", ["before", "after"])
async def test_crash_between_placement_save_and_deploy(tmp_path: Path, when: str) -> None:
    """The CP dies while writing the placement ('before': the write never lands;
    'after': it landed, the deploy never left). Either way the agent got nothing from
    the dead CP, and the restarted CP deploys exactly once. Were the deploy sent before
    the placement is saved, 'before' would leave the agent running an unplaced replica:
    a stray stopped and deployed again (two deploys and an undeploy)."""
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    saved, record = trio.Event(), []
    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen,
                                     wrap_save=_blocking_save(when, saved, record)) as cp:
                [a] = await cp.start(agents, "vm-a", forever=True)
                http = await tenant(cp.env, "t")
                key = await key_of(http)
                async with http, trio.open_nursery() as requests:
                    await setup_app(http)
                    requests.start_soon(deploy_into_a_crash, http)
                    await saved.wait()
                    cp.crash()
                    requests.cancel_scope.cancel()
            dep_id = record[0]
            async with control_plane(data, listen) as cp:
                async with cp.env.client(token=key) as http:
                    d = await reach_state(http, dep_id, "running")
                assert [r["agent_id"] for r in d["replicas"]] == [a.agent_id]
                assert a.received == [("deploy", dep_id)]
                assert not cp.events("replica.stray", dep_id)
            agents.cancel_scope.cancel()


async def test_crash_right_after_the_deploy_left_adopts(tmp_path: Path) -> None:
    """The CP dies the moment the agent has the deploy: the placement was already
    signed, so the restarted CP adopts the replica instead of stopping it."""
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen) as cp:
                dead = cp

                def crash_now(_: Agent, __: Deploy) -> bool:
                    dead.crash()
                    return True

                a = cp.agent("vm-a", on_deploy=crash_now)
                await agents.start(a.run_forever)
                http = await tenant(cp.env, "t")
                key = await key_of(http)
                async with http, trio.open_nursery() as requests:
                    await setup_app(http)
                    requests.start_soon(deploy_into_a_crash, http)
                    await wait_until(lambda: a.received, "deploy received")
                    requests.cancel_scope.cancel()
            dep_id = a.received[0][1]
            a.on_deploy = None
            async with control_plane(data, listen) as cp:
                async with cp.env.client(token=key) as http:
                    d = await reach_state(http, dep_id, "running")
                assert [r["agent_id"] for r in d["replicas"]] == [a.agent_id]
                assert a.received == [("deploy", dep_id)]  # adopted: no undeploy, no redeploy
                assert not cp.events("replica.stray", dep_id)
            agents.cancel_scope.cancel()


# ---- failure budget ------------------------------------------------------------------

async def test_agent_lost_mid_deploy_is_not_a_failure(tmp_path: Path) -> None:
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    lost: list[Agent] = []

    def vanish(agent: Agent, _: Deploy) -> bool:
        if lost:
            return True
        lost.append(agent)
        return False  # never runs it, never reports: the test closes its session

    with trio.fail_after(60):
        async with trio.open_nursery() as agents, control_plane(data, listen) as cp:
            fleet = await cp.start(agents, "vm-0", "vm-1", on_deploy=vanish)
            http = await tenant(cp.env, "t")
            async with http:
                await setup_app(http)
                dep_id = await deploy(http)
                await wait_until(lambda: lost, "one agent got the deploy")
                await lost[0].lose()  # gone mid-deploy, never reported anything
                d = await reach_state(http, dep_id, "running")
                survivor = next(a for a in fleet if a is not lost[0])
                assert [r["agent_id"] for r in d["replicas"]] == [survivor.agent_id]
                assert d["failures"] == 0 and d["error"] is None
                assert [e["agent_id"] for e in cp.events("replica.lost", dep_id)] == \
                    [lost[0].agent_id]
                assert not cp.events("replica.failed", dep_id)
            agents.cancel_scope.cancel()


async def test_failure_count_survives_a_restart(tmp_path: Path) -> None:
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen) as cp:
                fleet = await cp.start(agents, *(f"vm-{i}" for i in range(4)),
                                       forever=True, fail_deploys=True)
                http = await tenant(cp.env, "t")
                async with http:
                    await setup_app(http)
                    dep_id = await deploy(http)
                    d = await reach_state(http, dep_id, "failed")
                    key = await key_of(http)
                assert d["failures"] == 3 and "3 agents" in d["error"]
                deploys = [a.deploys(dep_id) for a in fleet]
                assert sorted(deploys) == [0, 1, 1, 1]
            async with control_plane(data, listen) as cp:
                async with cp.env.client(token=key) as http:
                    d = await deployment(http, dep_id)
                    assert d["state"] == "failed" and d["failures"] == 3
                    assert "3 agents" in d["error"]
                    # Give it every chance to try again: all agents back, passes run.
                    await wait_until(lambda: cp.env.cp.readiness().ready, "ready")
                    await wait_until(lambda: all(a.sessions >= 2 for a in fleet), "back")
                    app = cp.env.cp.registry.ref(f"app/{cp.env.cp.deployment_index[dep_id]}")
                    for _ in range(3):  # full reconcile passes with every agent back
                        await app.ask(Reconcile(), timeout=10)
                    assert (await deployment(http, dep_id))["state"] == "failed"
                assert [a.deploys(dep_id) for a in fleet] == deploys  # no new try
            agents.cancel_scope.cancel()


# ---- unplaceable ---------------------------------------------------------------------

async def test_unplaceable_deployment_says_why(tmp_path: Path) -> None:
    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(60):
        async with trio.open_nursery() as agents, control_plane(data, listen) as cp:
            fleet = await cp.start(agents, "vm-0", "vm-1")
            http = await tenant(cp.env, "t")
            async with http:
                await setup_app(http)
                dep_id = await deploy(http, replicas=2)
                await reach_state(http, dep_id, "running")
                await fleet[0].lose()

                async def short() -> dict[str, Any] | None:
                    d = await deployment(http, dep_id)
                    return d if d["error"] else None

                d = await wait_until(short, "an error")
                assert d["state"] == "placing"
                # The lost agent is offline, and still lists the (no longer its) replica.
                assert d["error"] == ("cannot place 1 of 2 replicas: 1 candidate, "
                                      "1 agent rejected (OFFLINE: 1, BUSY: 1); "
                                      f"BUSY agents run {dep_id}")
                assert d["failures"] == 0
                await cp.start(agents, "vm-spare")
                d = await reach_state(http, dep_id, "running")
                assert d["error"] is None
            agents.cancel_scope.cancel()
