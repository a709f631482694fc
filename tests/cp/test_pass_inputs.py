"""A pass is skipped only when nothing it *read* changed: an agent that comes back
listing a replica while a pass is at an await (signing the manifest) is looked at
by the next pass, never recorded as already seen.

Found by the federation drill (tests/federation/test_drills.py): after a CP restart a
placed agent that came back late kept running a third replica for good. Its actor
first published an unidentified record (the app watches that agent: a nudge, a pass
that finds the deployment healthy without it and signs its placements down); while
that pass awaited the manifest write, the agent's session published the listing (a
second nudge); the pass then stored the inputs of the *current* directory as seen,
so the second nudge and every safety sweep skipped the deployment: never adopted,
never stopped, never counted.

A real AppActor and real AgentActors over scripted agent sessions, under the
autojump clock (as tests/cp/test_tenant_failures.py).
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.testing
from test_sessions import wait_until
from test_tenant_failures import APP, HASHES, Agent, version

from ee.actors.agent import AgentActor, AgentDeps, AgentSettings, SessionOpened
from ee.actors.app import AppActor, AppDeps, GetDeployment, Reconcile
from ee.actors.directory import AgentDirectory, Nudges
from ee.protocol.messages import DeploymentSnapshot, Health, NodeInfo, Snapshot, Undeploy
from ee.runtime import ActorError, ActorHost, Registry

DEP = "dep-1"


@attrs.define
class Listing(Agent):
    """A scripted agent that comes back (after a CP restart) listing replicas."""

    listing: tuple[DeploymentSnapshot, ...] = ()

    def snapshot(self) -> Snapshot:
        return Snapshot(deployments=self.listing, health=Health(status="healthy"),
                        node=NodeInfo(node_size="standard", datacenter="local:dev",
                                      gpu=False, vcpus=2, memory_mb=2048), seq=0)


def running() -> tuple[DeploymentSnapshot, ...]:
    return (DeploymentSnapshot(deployment_id=DEP, app=APP, version="1.0", state="running",
                               compose_hash=HASHES["1.0"]),)


async def test_an_agent_listing_during_a_pass_await_is_not_skipped(
        autojump_clock: trio.testing.MockClock) -> None:
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
    saved: dict[str, dict[str, Any]] = {}
    saving = trio.Event()
    armed = False
    events: list[tuple[str, str, dict[str, Any]]] = []

    # The CP restarted: the signed intent placed ag-a and ag-b; none is back yet.
    manifest = {"deployment_id": DEP, "version": "1.0", "replicas": 2, "desired": "running",
                "created_at": 1_800_000_000.0,
                "constraints": {"datacenter": None, "node_size": None, "gpu": False,
                                "exclude_agents": []},
                "placements": ["ag-a", "ag-b"], "failed_agents": []}

    async def load(app_key: str) -> dict[str, Any]:
        return {"app": {"app_key": app_key, "name": "hello", "account_id": "acct-a"},
                "versions": [version("1.0")], "deployments": [manifest]}

    async def save(kind: str, ident: str, spec: dict[str, Any]) -> None:
        if armed:
            saving.set()
        await trio.sleep(1)  # a signed manifest write (a worker thread in the CP)
        saved[f"{kind}/{ident}"] = spec

    deps = AppDeps(load=load, save=save, directory=directory,
                   emit=lambda k, s, d: events.append((k, s, dict(d))),
                   ready=lambda: True,  # no checkpoint: nothing to wait for
                   nudges=nudges, reconcile_interval_s=30.0,
                   wall=lambda: 1_800_000_000.0 + trio.current_time())
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            links: dict[str, Listing] = {}

            async def start_agent(agent_id: str) -> Listing:
                """The plane's order: the actor starts (no session yet: it publishes an
                unidentified record), then the session opens with the snapshot."""
                agent_deps = AgentDeps(settings=AgentSettings(), link_for=lambda _: None,
                                       reattester=None,  # type: ignore[arg-type]
                                       emit=lambda *_: None,
                                       attest_limiter=trio.CapacityLimiter(1),
                                       directory=directory)
                host = ActorHost(registry, f"agent/{agent_id}",
                                 lambda: AgentActor(agent_id, agent_deps))
                ref = await nursery.start(host.run)
                agent = Listing(agent_id, ref, nursery)
                links[agent_id] = agent
                return agent

            async def open_session(agent: Listing, listing: tuple[DeploymentSnapshot, ...]
                                   ) -> None:
                agent.listing = listing
                await agent.ref.ask(SessionOpened(agent, agent.snapshot()))  # type: ignore[arg-type]

            host = ActorHost(registry, f"app/{APP}", lambda: AppActor(APP, deps))
            app = await nursery.start(host.run)

            async def view() -> dict[str, Any]:
                return dict(await app.ask(GetDeployment(DEP)))

            a = await start_agent("ag-a")
            await open_session(a, running())  # adopted
            c = await start_agent("ag-c")
            await open_session(c, ())  # free: the missing replica goes there

            async def two_running() -> bool:
                v = await view()
                return v["state"] == "running" and len(v["replicas"]) == 2

            await wait_until(two_running, "running on ag-a and ag-c", poll=0.5)
            assert sorted(r["agent_id"] for r in (await view())["replicas"]) == \
                ["ag-a", "ag-c"]

            # ag-b comes back late. Its unidentified record nudges a pass (the app
            # watches it); that pass signs ag-b out of the placements, and while it
            # awaits the write, ag-b's session publishes its listing.
            armed = True
            b = await start_agent("ag-b")
            await saving.wait()
            await open_session(b, running())

            def settled() -> bool:
                return sorted(directory.listers(DEP)) == ["ag-a", "ag-c"]

            # The listing's own nudge is enough (well before the 30 s safety sweep,
            # which skipped it for good too: the same inputs as "seen").
            with trio.fail_after(20):
                await wait_until(settled, "ag-b's third replica stopped", poll=0.5)
            assert any(isinstance(m, Undeploy) for m in b.received)
            assert not b.deploys()  # stopped, never started again
            v = await view()
            assert v["state"] == "running"
            assert sorted(r["agent_id"] for r in v["replicas"]) == ["ag-a", "ag-c"]
            kinds = [(k, d.get("agent_id")) for k, s, d in events if s == DEP]
            assert ("replica.stray", "ag-b") in kinds or ("replica.surplus", "ag-b") in kinds
            nursery.cancel_scope.cancel()
