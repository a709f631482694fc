from __future__ import annotations

from pathlib import Path

import trio
from cpkit import running_cp


async def test_one_agent_registers_and_is_listed(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, env.client() as http:
            r = await http.get("/api/v2/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"
            async with trio.open_nursery() as nursery:
                agent = await nursery.start(env.agent("vm-1").run)
                assert agent.registered is not None, agent.rejected
                await trio.sleep(0.2)
                r = await http.get("/api/v2/agents")
                agents = r.json()["agents"]
                assert [a["vm_name"] for a in agents] == ["vm-1"]
                assert agents[0]["status"] == "online"
                nursery.cancel_scope.cancel()
