from __future__ import annotations

from pathlib import Path

import trio
from cpkit import running_cp
from test_sessions import wait_until


async def test_one_agent_registers_and_is_listed(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, env.client() as http:
            r = await http.get("/api/v2/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"
            async with trio.open_nursery() as nursery:
                agent = await nursery.start(env.agent("vm-1").run)
                assert agent.registered is not None, agent.rejected

                async def listed() -> list[dict[str, object]] | None:
                    agents = (await http.get("/api/v2/agents")).json()["agents"]
                    return agents or None

                agents = await wait_until(listed, "the agent listed")
                assert [a["vm_name"] for a in agents] == ["vm-1"]
                assert agents[0]["status"] == "online"
                nursery.cancel_scope.cancel()
