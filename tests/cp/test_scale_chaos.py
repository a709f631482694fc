"""Chaos at scale: 1,000 sim agents, 100 deployments, a random actor crashed every
100 ms. Afterwards no desired deployment is lost, no replica runs twice (the agents
themselves are the ground truth), the root supervisor never died and the registry
holds the same actors as before the drill.

Real parts: an in-process CP with its real listeners, 1,000 sim agents over real
websockets (one loadgen ``SimAgent`` each), deployments through the tenant API.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from cpkit import running_cp
from test_sessions import wait_until
from test_tenants import deployment, setup_app, tenant

AGENTS = 1000
APPS = 10
DEPLOYMENTS_PER_APP = 10
CHAOS_S = 60.0
CRASH_EVERY_S = 0.1
SETTINGS = {"heartbeat_interval_s": 2.0, "stale_after_s": 8.0, "offline_after_s": 20.0,
            "attestation_threads": 2}


@pytest.mark.slow
async def test_chaos_at_scale(tmp_path: Path) -> None:
    rng = random.Random(1017)
    with trio.fail_after(300):
        async with running_cp(tmp_path / "cp", **SETTINGS) as env, \
                trio.open_nursery() as nursery:
            cp = env.cp
            agents = [env.agent(f"vm-{i:04d}", datacenter=f"chaos:z{i % 4}")
                      for i in range(AGENTS)]
            limiter = trio.CapacityLimiter(64)

            async def join(agent: object) -> None:
                async with limiter:
                    await nursery.start(agent.run_forever)  # type: ignore[attr-defined]

            async with trio.open_nursery() as joins:
                for agent in agents:
                    joins.start_soon(join, agent)
            await wait_until(lambda: len(cp.directory) == AGENTS
                             and cp.directory.status_counts()["online"] == AGENTS,
                             "every agent online")
            wanted: dict[str, int] = {}
            clients = []  # (tenant client, its deployment ids)
            for a in range(APPS):
                http = await tenant(env, f"t{a}")
                await setup_app(http)
                mine = []
                for _ in range(DEPLOYMENTS_PER_APP):
                    replicas = rng.randint(1, 3)
                    r = await http.post("/api/v2/apps/hello/deployments",
                                        json={"version": "1.0", "replicas": replicas})
                    assert r.status_code == 202, r.text
                    wanted[r.json()["deployment_id"]] = replicas
                    mine.append(r.json()["deployment_id"])
                clients.append((http, mine))
            before = set(cp.registry.names())
            crashes = 0
            root_down = 0

            names = sorted(n for n in before if n.startswith(("agent/", "app/", "dc/")))

            async def chaos() -> None:
                nonlocal crashes, root_down
                start = trio.current_time()
                for k in range(1, int(CHAOS_S / CRASH_EVERY_S) + 1):
                    await trio.sleep_until(start + k * CRASH_EVERY_S)  # on schedule
                    if not cp.root.running:
                        root_down += 1
                    if cp.registry.crash(rng.choice(names)):
                        crashes += 1

            await chaos()
            # Nearly every crash lands (one may hit an actor restarting already).
            assert crashes > CHAOS_S / CRASH_EVERY_S * 0.9, crashes
            assert root_down == 0 and cp.root.running

            async def settled() -> bool:
                for http, mine in clients:
                    for dep_id in mine:
                        d = await deployment(http, dep_id)
                        if d["state"] != "running" or len(d["replicas"]) != wanted[dep_id]:
                            return False
                return True

            await wait_until(settled, "every desired deployment running again", poll=0.5)
            # The agents are the ground truth: each runs at most one replica, and the
            # replicas they hold are exactly the wanted ones: none lost, none twice.
            held: dict[str, int] = {}
            for agent in agents:
                assert len(agent.deployments) <= 1, (agent.vm_name, agent.deployments)
                for dep_id in agent.deployments:
                    held[dep_id] = held.get(dep_id, 0) + 1
            assert held == wanted
            assert set(cp.registry.names()) == before
            assert cp.root.running
            for http, _ in clients:
                await http.aclose()
            nursery.cancel_scope.cancel()
