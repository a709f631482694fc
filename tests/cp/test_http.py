"""The CP's HTTP surface: auth, error shape, admin views, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from cpkit import running_cp
from test_sessions import wait_until


async def test_auth_and_error_shapes(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            async with env.client(token=None) as anon:
                r = await anon.get("/api/v2/agents")
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "unauthenticated"
                r = await anon.get("/api/v2/ready")
                assert r.status_code == 200 and r.json()["ready"] is True
                r = await anon.get("/metrics")
                assert r.status_code == 200 and "ee_agent_sessions" in r.text
                r = await anon.get("/api/v2/nothing/here")
                assert r.status_code == 404 and "error" in r.json()
                r = await anon.delete("/api/v2/health")
                assert r.status_code == 405 and r.json()["error"]["code"]
            async with env.client(token="not-the-token") as wrong:
                r = await wrong.get("/api/v2/admin/tree")
                assert r.status_code == 403
            async with env.client() as admin:
                r = await admin.get("/api/v2/agents/ag-nope")
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
                r = await admin.post("/api/v2/agents/ag-nope/drain")
                assert r.status_code == 404
                r = await admin.post("/api/v2/admin/crash", content=b"{bad json")
                assert r.status_code == 400
                tree = (await admin.get("/api/v2/admin/tree")).json()
                assert [c["name"] for c in tree["children"]] == [
                    "records", "accounts", "billing", "identities", "datacenters", "agents",
                    "apps", "capacity", "agent-plane", "checkpoint", "secrets", "deploy-metrics",
                    "http"]


async def test_drain_crash_and_tree(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            agent = await nursery.start(env.agent("vm-d").run)
            name = f"agent/{agent.agent_id}"
            async with env.client() as admin:
                r = await admin.post(f"/api/v2/agents/{agent.agent_id}/drain")
                assert r.status_code == 200 and r.json()["draining"] is True
                r = await admin.post("/api/v2/admin/crash", json={"name": name})
                assert r.status_code == 202

                async def restarted() -> dict[str, Any] | None:
                    tree = (await admin.get("/api/v2/admin/tree")).json()
                    agents = next(c for c in tree["children"] if c["name"] == "agents")
                    node = next(c for c in agents["children"] if c["name"] == name)
                    return node if node["restarts"] == 1 and node["state"] == "running" \
                        else None

                node = await wait_until(restarted, "restarted once")
                assert "ChaosCrash" in node["last_error"]
                view = (await admin.get(f"/api/v2/agents/{agent.agent_id}")).json()
                # Rebuilt from the live session (a fresh snapshot), still online.
                assert view["status"] == "online" and view["vm_name"] == "vm-d"
                assert view["draining"] is True  # operator intent survives the crash
                assert agent.requests_answered >= 1
            nursery.cancel_scope.cancel()
