"""CP restart: the runtime picture is rebuilt from the agents, even with the record
store deleted; readiness waits for the checkpointed quorum; chaos in the actor tree
loses nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import trio
from cpkit import free_port, running_cp
from test_sessions import FAST, agents_by_vm, wait_until

from ee.cp.readiness import Quorum


async def test_restart_with_wiped_records_relists_agents_with_same_ids(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    listen = f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents_nursery:
            async with running_cp(data, checkpoint_interval_s=0.3, agent_listen=listen,
                                  **FAST) as env:
                agents = [env.agent(f"vm-{i:02d}") for i in range(20)]
                for agent in agents:
                    await agents_nursery.start(agent.run_forever)
                before = await wait_until(
                    lambda: _all_online(env, 20), "20 online")

                def checkpointed() -> bool:
                    try:
                        doc = json.loads((data / "checkpoint.json").read_text())
                    except (OSError, ValueError):
                        return False  # not written yet, or mid-rename
                    return len(doc["agents"]) == 20

                await wait_until(checkpointed, "a checkpoint with all 20 agents")
            # The CP told every agent to reconnect; they retry until it is back.
            assert all(a.reconnect is not None or a.sessions >= 1 for a in agents)
            (data / "records.sqlite3").unlink()
            async with running_cp(data, quorum=Quorum(quorum_fraction=1.0,
                                                      settle_timeout_s=60),
                                  agent_listen=listen, **FAST) as env:
                async with env.client() as http:
                    first = await http.get("/api/v2/ready")
                    assert first.json()["agents_expected"] == 20
                    async def ready() -> bool:
                        return (await http.get("/api/v2/ready")).status_code == 200
                    await wait_until(ready, "ready")
                after = await wait_until(lambda: _all_online(env, 20), "20 back")
                assert {n: v["agent_id"] for n, v in after.items()} == \
                    {n: v["agent_id"] for n, v in before.items()}
                assert all(a.sessions >= 2 for a in agents)
                assert (data / "records.sqlite3").exists()  # recreated, empty history
            agents_nursery.cancel_scope.cancel()


async def _all_online(env, n):  # type: ignore[no-untyped-def]
    view = await agents_by_vm(env)
    if len(view) == n and all(v["status"] == "online" for v in view.values()):
        return view
    return None


async def test_not_ready_until_quorum(tmp_path: Path) -> None:
    from ee.protocol.signing import write_signed

    data = tmp_path / "cp"
    with trio.fail_after(60):
        async with running_cp(data, **FAST):
            pass  # creates the bundle
        from ee.protocol.signing import load_private_key

        key = load_private_key(data / "cp.key")
        ids = [f"ag-{i}" for i in range(10)]
        write_signed(data / "checkpoint.json", {"agents": ids}, key)
        async with running_cp(data, quorum=Quorum(quorum_fraction=0.5, settle_timeout_s=600),
                              **FAST) as env, env.client() as http:
            r = await http.get("/api/v2/ready")
            assert r.status_code == 503
            assert r.json() == {"ready": False, "reason": "waiting for agents to reconnect",
                                "agents_seen": 0, "agents_expected": 10,
                                "elapsed_s": r.json()["elapsed_s"]}


async def test_chaos_crashing_agent_and_datacenter_actors(tmp_path: Path) -> None:
    rng = random.Random(7)
    with trio.fail_after(120):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agents = [env.agent(f"vm-{i:02d}", datacenter=f"local:z{i % 3}")
                      for i in range(30)]
            for agent in agents:
                await nursery.start(agent.run_forever)
            before = await wait_until(lambda: _all_online(env, 30), "online")
            crashes = 0
            end = trio.current_time() + 6
            while trio.current_time() < end:
                names = env.cp.registry.names("agent/") + env.cp.registry.names("dc/")
                if env.cp.root.crash(rng.choice(names)):
                    crashes += 1
                await trio.sleep(rng.uniform(0.01, 0.05))
            assert crashes > 50
            assert env.cp.root.running  # intensity held: nothing escalated to the root
            after = await wait_until(lambda: _all_online(env, 30), "online after chaos")
            assert {n: v["agent_id"] for n, v in after.items()} == \
                {n: v["agent_id"] for n, v in before.items()}
            assert all(v["attestation"]["verdict"] == "pass" for v in after.values())

            async def dcs_consistent() -> bool:
                async with env.client() as http:
                    dcs = (await http.get("/api/v2/datacenters")).json()["datacenters"]
                return sorted((d["datacenter"], d["agents"]["online"]) for d in dcs) == [
                    ("local:z0", 10), ("local:z1", 10), ("local:z2", 10)]

            await wait_until(dcs_consistent, "datacenters rebuilt")
            tree = env.cp.root.snapshot()
            restarted = sum(n.restarts for n in tree.walk() if n.kind == "actor")
            assert restarted >= crashes * 0.9
            nursery.cancel_scope.cancel()
