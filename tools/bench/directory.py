"""Reconcile and placement cost over the agent directory (issue 17).

In one process, no network: N agents published in an ``AgentDirectory`` (as their
AgentActors would), A AppActors with one running deployment of one replica each.

* reconcile: the CPU of one pass of every app with nothing changed (each app asked to
  ``Reconcile`` once), against the CPU of what a pass cost before the directory (every
  app asked every AgentActor for its view: measured here as one ask-all over N live
  AgentActors, times A);
* placement: p50/p99 of one placement decision over N agents through the directory's
  shortlist (``AgentDirectory.place``), against ``place`` over every agent.

    python tools/bench/directory.py --agents 10000 --apps 100
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import trio
import trio.testing

from ee.actors.agent import AgentActor, AgentDeps, AgentSettings, Describe
from ee.actors.app import AppActor, AppDeps, Reconcile
from ee.actors.directory import AgentDirectory, AgentRecord, Nudges
from ee.actors.identity import Identity
from ee.actors.lifecycle import AgentState
from ee.cp.server import tune_gc
from ee.placement import Constraints, Request, place
from ee.protocol.messages import DeploymentSnapshot
from ee.runtime import Registry
from ee.supervisors import Restart, Supervisor, actor_spec

HASH = "sha256:" + "ab" * 32


def identity(i: int, datacenters: int) -> Identity:
    return Identity(agent_id=f"ag-{i:06d}", vm_name=f"vm-{i:06d}", node_size="standard",
                    datacenter=f"load:z{i % datacenters}", gpu=i % 10 == 0,
                    public_key=b"k" * 32, provider="sim", mrtd="00" * 48, tcb_status=None,
                    verdict="pass", violations=(), verified_at=0.0)


def fill(directory: AgentDirectory, n: int, apps: int, datacenters: int) -> None:
    for i in range(n):
        deps: tuple[DeploymentSnapshot, ...] = ()
        if i < apps:
            deps = (DeploymentSnapshot(deployment_id=f"dep-{i:04d}", app=f"app-{i:04d}",
                                       version="v1", state="running", compose_hash=HASH),)
        directory.put(AgentRecord(f"ag-{i:06d}", identity(i, datacenters), AgentState.READY,
                                  deployments=deps))


def desired(i: int) -> dict[str, Any]:
    return {"app": {"name": f"app-{i:04d}", "app_key": f"app-{i:04d}"},
            "versions": [{"version": "v1", "compose_hash": HASH}],
            "deployments": [{"deployment_id": f"dep-{i:04d}", "version": "v1", "replicas": 1,
                             "desired": "running", "created_at": 0.0,
                             "constraints": {}, "placements": [f"ag-{i:06d}"],
                             "failed_agents": []}]}


async def reconcile_bench(n: int, apps: int, datacenters: int) -> None:
    registry = Registry()
    directory = AgentDirectory()
    fill(directory, n, apps, datacenters)
    saves = 0

    async def load(key: str) -> dict[str, Any]:
        return desired(int(key.split("-")[1]))

    async def save(_kind: str, _ident: str, _spec: dict[str, Any]) -> None:
        nonlocal saves
        saves += 1

    def send(app_key: str) -> bool:
        registry.ref(f"app/{app_key}").try_tell(Reconcile())
        return True

    nudges = Nudges(send)
    directory.subscribe(nudges.changed)
    deps = AppDeps(load=load, save=save, directory=directory, emit=lambda *_: None,
                   nudges=nudges, ready=lambda: True)
    sup = Supervisor("apps", max_restarts=10, period=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for i in range(apps):
            key = f"app-{i:04d}"
            await sup.start_child(actor_spec(registry, f"app/{key}",
                                             lambda k=key: AppActor(k, deps),
                                             restart=Restart.PERMANENT))
        refs = [registry.ref(f"app/app-{i:04d}") for i in range(apps)]
        samples = []
        for _ in range(20):
            # As the sweep (or a nudge) does it: a Reconcile told to each app, then the
            # CPU until every app has handled it and the process is idle again.
            await trio.testing.wait_all_tasks_blocked()
            c0 = time.process_time()
            for ref in refs:
                ref.try_tell(Reconcile())
            await trio.testing.wait_all_tasks_blocked()
            samples.append(time.process_time() - c0)
        # A change of one agent holding a replica: only its app is nudged.
        sent0 = nudges.sent
        record = directory.get("ag-000000")
        assert record is not None
        directory.put(AgentRecord(record.agent_id, record.identity, AgentState.STALE,
                                  deployments=record.deployments))
        nudged = nudges.sent - sent0
        sup.request_stop()
        nursery.cancel_scope.cancel()
    print(f"reconcile, {apps} apps x {n} agents, nothing changed: one pass of every app "
          f"median {statistics.median(samples) * 1000:.2f} ms CPU, "
          f"max {max(samples) * 1000:.2f} ms (goal < 5 ms); manifest writes {saves}; "
          f"one agent's change nudged {nudged} app(s)")


async def ask_all_bench(n: int, apps: int) -> None:
    """What one app pass cost before: asking every AgentActor for its view."""
    registry = Registry()
    deps = AgentDeps(settings=AgentSettings(), link_for=lambda _a: None,
                     reattester=None,  # type: ignore[arg-type]
                     emit=lambda *_: None, attest_limiter=trio.CapacityLimiter(1))
    sup = Supervisor("agents", max_restarts=10, period=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for i in range(n):
            name = f"agent/ag-{i:06d}"
            await sup.start_child(actor_spec(registry, name,
                                             lambda a=f"ag-{i:06d}": AgentActor(a, deps),
                                             restart=Restart.TRANSIENT, mailbox_size=64))
        names = registry.names("agent/")
        limiter = trio.CapacityLimiter(64)
        views: list[Any] = []

        async def one(name: str) -> None:
            async with limiter:
                views.append(await registry.ref(name).ask(Describe()))

        c0 = time.process_time()
        async with trio.open_nursery() as asks:
            for name in names:
                asks.start_soon(one, name)
        cpu = time.process_time() - c0
        sup.request_stop()
        nursery.cancel_scope.cancel()
    print(f"before: one ask-all over {n} AgentActors {cpu * 1000:.0f} ms CPU; "
          f"x {apps} apps = {cpu * apps:.1f} s CPU per pass")


def placement_bench(n: int, datacenters: int, rounds: int) -> None:
    directory = AgentDirectory()
    fill(directory, n, 0, datacenters)
    rng = random.Random(17)
    fast: list[float] = []
    fast_cpu: list[float] = []
    full: list[float] = []
    for r in range(rounds):
        constraints = rng.choice([
            Constraints(), Constraints(datacenter="load:z1"), Constraints(gpu=True),
            Constraints(node_size="standard", exclude_agents=frozenset(
                f"ag-{rng.randrange(n):06d}" for _ in range(5)))])
        request = Request(deployment_id=f"dep-{r}", replicas=rng.randint(1, 5),
                          constraints=constraints)
        t0, c0 = time.perf_counter(), time.process_time()
        chosen = directory.place(request, {}).chosen
        fast_cpu.append(time.process_time() - c0)
        fast.append(time.perf_counter() - t0)
        if r < 30:
            t0 = time.perf_counter()
            reference = place(request, directory.infos({})).chosen
            full.append(time.perf_counter() - t0)
            assert chosen == reference, (request, chosen, reference)

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000

    print(f"placement over {n} agents: shortlist CPU p50 {q(fast_cpu, .5):.3f} ms p99 "
          f"{q(fast_cpu, .99):.3f} ms (goal p99 < 2 ms), wall p50 {q(fast, .5):.3f} ms "
          f"p99 {q(fast, .99):.3f} ms; over every agent (before) wall p50 "
          f"{q(full, .5):.1f} ms p99 {q(full, .99):.1f} ms; same choice in all "
          f"{len(full)} compared")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10_000)
    p.add_argument("--apps", type=int, default=100)
    p.add_argument("--datacenters", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--before", action="store_true",
                   help="also measure the ask-every-agent pass it replaces")
    args = p.parse_args()
    tune_gc()  # as ee-cp does
    trio.run(reconcile_bench, args.agents, args.apps, args.datacenters)
    placement_bench(args.agents, args.datacenters, args.rounds)
    if args.before:
        trio.run(ask_all_bench, args.agents, args.apps)


if __name__ == "__main__":
    main()
