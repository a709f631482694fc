"""Failures reach the tenant: a failed deploy's phase, exit code and last lines in the
replica's and the deployment's ``error``/``failure``; CP-side phase timeouts end in a
terminal ``failed`` naming the phase; a BUSY agent names the deployment holding it
(the tenant's own id, or "another tenant", never another tenant's id).

The timeout tests run a real AppActor and real AgentActors (their agent sessions are
scripted links) under Trio's autojump clock; the BUSY test runs a real CP with
simulated agents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from cpkit import running_cp
from test_sessions import wait_until
from test_tenants import setup_app, tenant

from ee.actors.agent import AgentActor, AgentDeps, AgentSettings, DeployStatusIn, SessionOpened
from ee.actors.app import (
    AppActor,
    AppDeps,
    CreateDeployment,
    Deployment,
    DeploySettings,
    GetDeployment,
    Reconcile,
    Replica,
    StopDeployment,
    Update,
    _versions_used,
)
from ee.actors.deployment import failure_text, move_plan, timed_out
from ee.actors.directory import AgentDirectory, Nudges
from ee.actors.identity import Identity
from ee.cp.tenants import LOG_FETCH_TIMEOUT_S, fetch_logs
from ee.placement import Constraints
from ee.protocol.messages import (
    Deploy,
    DeployStatus,
    Health,
    LogLine,
    LogsReply,
    LogsRequest,
    Message,
    NodeInfo,
    Snapshot,
    SnapshotRequest,
    Undeploy,
)
from ee.runtime import ActorError, ActorHost, ActorRef, Registry

APP = "acct-a.hello"
HASHES = {"1.0": "sha256:" + "11" * 32, "2.0": "sha256:" + "22" * 32}


def version(v: str, **extra: Any) -> dict[str, Any]:
    return {"version": v, "compose": "services:\n  web:\n    image: x\n", "expose_port": 80,
            "health_path": "/", "env": {}, "compose_hash": HASHES[v], **extra}


# ---- the pure parts --------------------------------------------------------------------

@pytest.mark.parametrize(("phase", "code", "lines", "error", "text"), [
    ("build", 2, ("step 1", "npm ERR! missing script", ""), "build failed",
     "build failed (exit code 2): npm ERR! missing script"),
    ("health", None, (), "GET /health: 404", "health check failed: GET /health: 404"),
    ("pull", None, (), None, "image pull failed"),
    ("timeout", None, (), None, "timeout failed"),
    (None, None, (), "simulated failure", "simulated failure"),
    (None, None, ("last",), None, "last"),
])
def test_failure_text(phase: str | None, code: int | None, lines: tuple[str, ...],
                      error: str | None, text: str) -> None:
    assert failure_text(phase, code, lines, error) == text


def test_timed_out_and_settings() -> None:
    limits = DeploySettings(building_s=60).limits()
    assert timed_out("building", 10.0, 69.9, limits) is None
    assert timed_out("building", 10.0, 70.0, limits) == 60
    assert timed_out("running", 0.0, 1e9, limits) is None  # running has no limit
    assert DeploySettings.from_config({"placing_s": 5}).placing_s == 5.0
    for bad in ({"placing": 5}, {"starting_s": 0}, {"starting_s": True}, {"pulling_s": "9"}):
        with pytest.raises(ValueError, match="deployments"):
            DeploySettings.from_config(bad)


@pytest.mark.parametrize(("wanted", "current", "outdated", "free", "plan"), [
    (1, [], [], True, "none"),
    (1, [], ["running"], True, "surge"),
    (1, [], ["running"], False, "in_place"),
    (1, ["pending"], ["running"], True, "wait"),          # the new one's gate first
    (1, ["building"], [], True, "none"),
    (1, ["running"], ["running"], True, "stop_old"),      # surged: stop the old one
    (2, ["running"], ["running"], True, "surge"),         # next one
    (2, ["running", "starting"], ["running"], True, "wait"),
])
def test_move_plan(wanted: int, current: list[str], outdated: list[str], free: bool,
                   plan: str) -> None:
    assert move_plan(wanted=wanted, current=current, outdated=outdated,
                     free_agent=free) == plan


def test_a_deployment_needs_every_version_it_may_run() -> None:
    """What DELETE of a version is refused for: the deployment's version, its previous
    one, both ends of its update, and what its replicas run or are moved from."""
    dep = Deployment("dep-1", "3.0", 2, Constraints(), "running", 0.0,
                     previous_version="2.0", update=Update("rolling", "2.0", "3.0", 0.0),
                     replicas={"a": Replica("a", "running", version="1.0"),
                               "b": Replica("b", "pending", version="3.0",
                                            moved_from="0.9")})
    assert _versions_used(dep) == {"0.9", "1.0", "2.0", "3.0"}
    assert _versions_used(Deployment("d", "1.0", 1, Constraints(), "running", 0.0)) == {"1.0"}


def test_update_transitions() -> None:
    from ee.actors.deployment import IllegalDeploymentTransition, update_transition

    assert update_transition("rolling", "done") == "done"
    assert update_transition("rolling", "rolled_back") == "rolled_back"
    assert update_transition("rolled_back", "failed") == "failed"
    for current, target in (("done", "rolling"), ("rolled_back", "done"),
                            ("failed", "rolled_back")):
        with pytest.raises(IllegalDeploymentTransition):
            update_transition(current, target)


def test_busy_holders_are_shown_only_through_a_namer() -> None:
    from ee.placement import AgentInfo, Request, place

    busy = AgentInfo(agent_id="a1", datacenter="dc", node_size="s", gpu=False,
                     status="online", attested=True, draining=False,
                     deployments=("dep-theirs",))
    placement = place(Request(deployment_id=None, replicas=1), [busy])
    assert "dep-theirs" not in str(placement.to_dict()) + placement.why()
    named = placement.to_dict(lambda d: "another tenant")
    assert named["rejected"] == [{"agent_id": "a1", "reasons": ["BUSY"],
                                  "busy_with": ["another tenant"]}]
    assert placement.why(lambda d: d).endswith("; BUSY agents run dep-theirs")


def test_deploy_carries_every_secret_name_sorted() -> None:
    from ee.actors.agent import deploy_message

    deploy = deploy_message(APP, "dep-1", version("1.0", secrets=[
        {"name": "zeta", "as": "file", "on_rotate": "none"},
        {"name": "alpha", "as": "env", "env": "ALPHA", "on_rotate": "restart"}]))
    assert deploy.secret_names == ("alpha", "zeta")
    assert deploy.secret_env == {"ALPHA": "alpha"}
    assert deploy_message(APP, "dep-1", version("1.0")).secret_names == ()


# ---- a real AppActor and AgentActors over scripted agent sessions ------------------------

Script = Callable[["Agent", Deploy], Awaitable[None]]


async def runs(agent: Agent, msg: Deploy) -> None:
    await agent.status(msg.deployment_id, "pulling")
    await trio.sleep(1)
    await agent.status(msg.deployment_id, "starting")
    await trio.sleep(1)
    await agent.status(msg.deployment_id, "running", compose_hash=HASHES[msg.version])


@attrs.define
class Agent:
    """One agent VM, as its AgentActor's session sees it (scripted deploys)."""

    agent_id: str
    ref: ActorRef
    nursery: trio.Nursery
    script: Script = runs
    received: list[Message] = attrs.field(factory=list)
    session_id: int = 1
    slow_logs: bool = False  # never answers a logs request

    @property
    def identity(self) -> Identity:
        return Identity(agent_id=self.agent_id, vm_name=f"vm-{self.agent_id}",
                        node_size="standard", datacenter="local:dev", gpu=False,
                        public_key=b"k" * 32, provider="sim", mrtd="00", tcb_status=None,
                        verdict="pass", violations=(), verified_at=0.0)

    def snapshot(self) -> Snapshot:
        return Snapshot(deployments=(), health=Health(status="healthy"),
                        node=NodeInfo(node_size="standard", datacenter="local:dev",
                                      gpu=False, vcpus=2, memory_mb=2048), seq=0)

    async def request(self, msg: Message, timeout: float) -> Message:
        self.received.append(msg)
        if isinstance(msg, SnapshotRequest):
            return self.snapshot()
        assert isinstance(msg, LogsRequest)
        if self.slow_logs:
            await trio.sleep_forever()
        return LogsReply(lines=(LogLine("web", f"log of {msg.deployment_id}",
                                        "2026-12-01T00:00:00Z"),))

    async def send(self, msg: Message) -> None:
        self.received.append(msg)
        if isinstance(msg, Deploy):
            self.nursery.start_soon(self.script, self, msg)
        elif isinstance(msg, Undeploy):
            await self.status(msg.deployment_id, "stopped")

    async def close(self, code: int, reason: str) -> None:
        pass

    async def status(self, deployment_id: str, state: str, **kw: Any) -> None:
        await self.ref.tell(DeployStatusIn(self.session_id, DeployStatus(
            deployment_id=deployment_id, state=state, **kw)))  # type: ignore[arg-type]

    def deploys(self) -> list[Deploy]:
        return [m for m in self.received if isinstance(m, Deploy)]


@attrs.define
class World:
    registry: Registry
    nursery: trio.Nursery
    directory: AgentDirectory
    app: ActorRef
    agents: dict[str, Agent]
    events: list[tuple[str, str, dict[str, Any]]]
    saved: dict[str, dict[str, Any]]

    async def agent(self, agent_id: str, script: Script = runs) -> Agent:
        links: dict[str, Agent] = {}
        deps = AgentDeps(settings=AgentSettings(), link_for=links.get, reattester=None,  # type: ignore[arg-type]
                         emit=lambda *_: None, attest_limiter=trio.CapacityLimiter(1),
                         directory=self.directory)
        host = ActorHost(self.registry, f"agent/{agent_id}", lambda: AgentActor(agent_id, deps))
        ref = await self.nursery.start(host.run)
        agent = Agent(agent_id, ref, self.nursery, script)
        await ref.ask(SessionOpened(agent, agent.snapshot()))  # type: ignore[arg-type]
        self.agents[agent_id] = agent
        return agent

    async def deploy(self, dep_id: str = "dep-1", v: str = "1.0", replicas: int = 1) -> None:
        answer = await self.app.ask(CreateDeployment(dep_id, v, replicas, Constraints()))
        assert answer == {"deployment_id": dep_id}, answer

    async def view(self, dep_id: str = "dep-1") -> dict[str, Any]:
        return dict(await self.app.ask(GetDeployment(dep_id)))

    async def reach(self, state: str, dep_id: str = "dep-1") -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            v = await self.view(dep_id)
            return v if v["state"] == state else None

        return dict(await wait_until(check, state, poll=0.5))


@asynccontextmanager
async def world(settings: DeploySettings | None = None,
                owner_of: Callable[[str], str | None] | None = None,
                extra_versions: tuple[dict[str, Any], ...] = ()) -> AsyncIterator[World]:
    registry = Registry()
    directory = AgentDirectory()

    def nudge(app_key: str) -> bool:  # as the CP wires it (ControlPlane._nudge_app)
        try:
            registry.ref(f"app/{app_key}").try_tell(Reconcile())
        except ActorError:
            return False
        return True

    nudges = Nudges(nudge)
    directory.subscribe(nudges.changed)
    events: list[tuple[str, str, dict[str, Any]]] = []
    saved: dict[str, dict[str, Any]] = {}

    async def load(app_key: str) -> dict[str, Any]:
        return {"app": {"app_key": app_key, "name": "hello", "account_id": "acct-a"},
                "versions": [version("1.0"), *extra_versions], "deployments": []}

    async def save(kind: str, ident: str, spec: dict[str, Any]) -> None:
        saved[f"{kind}/{ident}"] = spec

    deps = AppDeps(load=load, save=save, directory=directory,
                   emit=lambda k, s, d: events.append((k, s, dict(d))),
                   reconcile_interval_s=30.0, settings=settings or DeploySettings(),
                   owner_of=owner_of, nudges=nudges,
                   wall=lambda: 1_800_000_000.0 + trio.current_time())
    async with trio.open_nursery() as nursery:
        host = ActorHost(registry, f"app/{APP}", lambda: AppActor(APP, deps))
        ref = await nursery.start(host.run)
        yield World(registry, nursery, directory, ref, {}, events, saved)
        nursery.cancel_scope.cancel()


async def fails_to_build(agent: Agent, msg: Deploy) -> None:
    await agent.status(msg.deployment_id, "building")
    await trio.sleep(3)
    await agent.status(msg.deployment_id, "failed", error="docker compose build failed",
                       phase="build", exit_code=2,
                       log_tail=("Step 2/3 : RUN make", "make: *** [all] Error 2"))


async def builds_forever(agent: Agent, msg: Deploy) -> None:
    await agent.status(msg.deployment_id, "building")
    await trio.sleep_forever()


async def test_build_failure_reaches_replica_and_deployment(
        autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        async with world() as w:
            only = await w.agent("ag-1", fails_to_build)
            await w.deploy()
            # One agent, which failed it: nowhere else to go (until placing times out).
            want = "build failed (exit code 2): make: *** [all] Error 2"
            error = ("cannot place 1 of 1 replica: 0 candidates, 1 agent rejected "
                     f"(EXCLUDED: 1); last failure: {want}")  # (BUSY too, until stopped)

            async def said() -> dict[str, Any] | None:
                v = await w.view()
                return v if v["error"] == error else None

            d = await wait_until(said, "the cause", poll=0.5)
            assert d["state"] == "placing"
            assert [m.version for m in only.deploys()] == ["1.0"]
            assert d["failure"] == {"phase": "build", "exit_code": 2,
                                    "lines": ["Step 2/3 : RUN make", "make: *** [all] Error 2"],
                                    "agent_id": "ag-1", "version": "1.0"}
            assert d["replicas"] == []  # not a member any more: shown apart
            [replica] = d["failed_replicas"]
            assert replica["state"] == "failed" and replica["error"] == want
            assert replica["failure"] == {"phase": "build", "exit_code": 2,
                                          "lines": ["Step 2/3 : RUN make",
                                                    "make: *** [all] Error 2"]}
            # The cause is signed into the manifest (survives a CP restart).
            assert w.saved["deployments/dep-1"]["failure"]["error"] == want
            # The failed agent's logs are still asked for (it keeps the lines).
            logs = await fetch_logs(w.registry, w.app, "dep-1", 50, "2026-12-01T00:00:00Z",
                                    "web")
            assert [r["agent_id"] for r in logs["replicas"]] == ["ag-1"]
            asked = [m for m in only.received if isinstance(m, LogsRequest)][-1]
            assert (asked.since, asked.service, asked.tail) == \
                ("2026-12-01T00:00:00Z", "web", 50)
            assert logs["replicas"][0]["lines"][0]["at"] == "2026-12-01T00:00:00Z"


async def test_a_phase_timeout_ends_in_a_terminal_failed(
        autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(7200):
        async with world(DeploySettings(building_s=120)) as w:
            stuck = await w.agent("ag-1", builds_forever)
            spare = await w.agent("ag-2")
            await w.deploy()
            start = trio.current_time()
            await trio.sleep(60)
            d = await w.view()
            assert d["state"] == "placing" or d["state"] == "starting"
            assert d["error"] is None
            d = await w.reach("failed")
            # Within the phase timeout (plus the poll), not at the safety sweep.
            assert 120 <= trio.current_time() - start < 125
            assert d["error"].startswith("timed out in phase building after 120s")
            assert d["failure"]["phase"] == "timeout"
            assert stuck.deploys() and any(isinstance(m, Undeploy) for m in stuck.received)
            # Terminal: not tried elsewhere, and still failed much later.
            await trio.sleep(3600)
            assert not spare.deploys()
            assert (await w.view())["state"] == "failed"
            assert w.saved["deployments/dep-1"]["halted"] == d["error"]


async def test_placing_too_long_times_out(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(7200):
        async with world(DeploySettings(placing_s=300)) as w:
            agent = await w.agent("ag-1")
            await w.deploy()
            await w.reach("running")
            # The agent goes away: lost, and nowhere else to go.
            from ee.actors.agent import SessionClosed

            lost_at = trio.current_time()
            await agent.ref.ask(SessionClosed(agent.session_id, "gone"))
            d = await w.reach("placing")
            assert d["error"].startswith("cannot place 1 of 1 replica")
            d = await w.reach("failed")
            assert 300 <= trio.current_time() - lost_at < 305
            assert d["error"].startswith("timed out in phase placing after 300s: "
                                         "cannot place 1 of 1 replica")
            assert d["failure"]["phase"] == "timeout"


async def test_stopped_deployment_logs_stay_reachable_for_the_retention(
        autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(7200):
        async with world(DeploySettings(log_retention_s=3600)) as w:
            agent = await w.agent("ag-1")
            await w.deploy()
            await w.reach("running")
            await w.app.ask(StopDeployment("dep-1"))
            await w.reach("stopped")
            logs = await fetch_logs(w.registry, w.app, "dep-1", 10, None, None)
            assert logs["replicas"][0]["lines"][0]["text"] == "log of dep-1"
            assert w.saved["deployments/dep-1"]["last_agents"] == ["ag-1"]
            await trio.sleep(3601)
            assert (await fetch_logs(w.registry, w.app, "dep-1", 10, None, None)
                    )["replicas"] == []
            assert agent.agent_id == "ag-1"


async def test_a_slow_agent_never_stalls_the_app_for_logs(
        autojump_clock: trio.testing.MockClock) -> None:
    """Logs are fetched by the asker from the agents' actors, concurrently and bounded:
    the app actor only names them (``LogSources``), so while a follower waits on an
    agent that never answers, the app keeps answering and reconciling."""
    with trio.fail_after(600):
        async with world() as w:
            await w.agent("ag-1")
            slow = await w.agent("ag-2")
            slow.slow_logs = True
            await w.deploy(replicas=2)
            await w.reach("running")
            got: list[dict[str, Any] | None] = []
            done = trio.Event()

            async def fetch() -> None:
                got.append(await fetch_logs(w.registry, w.app, "dep-1", 10, None, None))
                done.set()

            started = trio.current_time()
            w.nursery.start_soon(fetch)
            await trio.sleep(1)  # the fetch waits on ag-2 now
            with trio.fail_after(1):  # (was: until ag-2's ask timed out, 15 s)
                assert (await w.view())["state"] == "running"
            await done.wait()
            assert trio.current_time() - started <= LOG_FETCH_TIMEOUT_S + 1
            answer = got[0]
            assert answer is not None
            by = {r["agent_id"]: r for r in answer["replicas"]}
            assert by["ag-1"]["lines"][0]["text"] == "log of dep-1"
            assert "logs unavailable" in (by["ag-2"].get("error")
                                          or by["ag-2"]["lines"][0]["text"])


# ---- BUSY names the holder, never another tenant's id ----------------------------------

async def test_busy_names_own_deployment_or_another_tenant(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-0").run)
            await nursery.start(env.agent("vm-1").run)
            a = await tenant(env, "a")
            b = await tenant(env, "b")
            async with a, b:
                await setup_app(a, "first")
                await setup_app(a, "second")
                await setup_app(b, "theirs")
                r = await a.post("/api/v2/apps/first/deployments", json={"version": "1.0"})
                assert r.status_code == 202, r.text
                mine = r.json()["deployment_id"]
                r = await b.post("/api/v2/apps/theirs/deployments", json={"version": "1.0"})
                assert r.status_code == 202, r.text
                theirs = r.json()["deployment_id"]

                async def both_busy() -> bool:
                    r = await a.post("/api/v2/apps/second/preflight", json={"version": "1.0"})
                    return len(r.json()["rejected"]) == 2

                await wait_until(both_busy, "both agents busy")
                r = await a.post("/api/v2/apps/second/preflight", json={"version": "1.0"})
                busy = sorted(x["busy_with"][0] for x in r.json()["rejected"])
                assert busy == sorted([mine, "another tenant"])
                assert theirs not in r.text
                r = await b.post("/api/v2/apps/theirs/preflight", json={"version": "1.0"})
                assert mine not in r.text and "another tenant" in r.text
                # The 409 of a deploy that cannot be placed says the same.
                r = await b.post("/api/v2/apps/theirs/deployments", json={"version": "1.0"})
                assert r.status_code == 409
                assert mine not in r.text and theirs in r.text
            nursery.cancel_scope.cancel()


async def test_a_timeout_in_an_update_rolls_back(autojump_clock: trio.testing.MockClock) -> None:
    """A new replica stuck past its phase timeout fails the update's health gate: back
    to the previous version (in place), not a halted deployment."""
    from ee.actors.app import UpdateDeployment

    async def v2_hangs(agent: Agent, msg: Deploy) -> None:
        await (builds_forever if msg.version == "2.0" else runs)(agent, msg)

    with trio.fail_after(7200):
        async with world(DeploySettings(building_s=120),
                         extra_versions=(version("2.0"),)) as w:
            agent = await w.agent("ag-1", v2_hangs)
            await w.deploy()
            await w.reach("running")
            answer = await w.app.ask(UpdateDeployment("dep-1", "2.0"))
            assert answer["changed"] and answer["view"]["update"]["state"] == "rolling"

            async def rolled_back() -> dict[str, Any] | None:
                v = await w.view()
                u = v["update"]
                return v if u["state"] == "rolled_back" and u["finished_at"] else None

            d = await wait_until(rolled_back, "rolled back", poll=0.5)
            assert d["state"] == "running" and d["version"] == "1.0"
            assert d["error"] == ("update to 2.0 rolled back: the new replica on ag-1 failed: "
                                  "timed out in phase building after 120s on ag-1")
            assert [m.version for m in agent.deploys()] == ["1.0", "2.0", "1.0"]
            assert not any(isinstance(m, Undeploy) for m in agent.received)
            assert w.saved["deployments/dep-1"]["halted"] is None
