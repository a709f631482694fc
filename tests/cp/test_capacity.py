"""Capacity through the real CP: targets, launch orders claimed by provisioners over
HTTP, bootstrap tokens consumed at registration, restart rebuilds the same numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from cpkit import RunningCp, free_port, running_cp
from test_sessions import FAST, wait_until

TARGET = {"min_warm": 3, "dispatch": True, "reason": "test"}


async def accounts(env: RunningCp) -> tuple[str, str]:
    async with env.client() as admin:
        prov = (await admin.post("/api/v2/accounts",
                                 json={"name": "prov", "kind": "provisioner"})).json()
        ten = (await admin.post("/api/v2/accounts", json={"name": "t"})).json()
    return prov["api_key"], ten["api_key"]


async def pool(env: RunningCp) -> dict[str, Any]:
    async with env.client() as admin:
        pools = (await admin.get("/api/v2/capacity/pools")).json()["pools"]
    return dict(next(p for p in pools if p["datacenter"] == "local:dev"))


async def test_targets_orders_claims_and_tokens(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    listen = f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with running_cp(data, agent_listen=listen, **FAST) as env:
                prov_key, tenant_key = await accounts(env)
                await agents.start(env.agent("vm-warm").run_forever)
                async with env.client() as admin:
                    r = await admin.put("/api/v2/capacity/pools/local:dev/gigantic",
                                        json=TARGET)
                    assert r.status_code == 400
                    assert r.json()["error"]["details"]["field"] == "node_size"
                    r = await admin.put("/api/v2/capacity/pools/nocolon/standard",
                                        json=TARGET)
                    assert r.status_code == 400
                    assert r.json()["error"]["details"]["field"] == "datacenter"
                    r = await admin.put("/api/v2/capacity/pools/local:dev/standard",
                                        json={"min_warm": -1, "dispatch": True,
                                              "reason": "x"})
                    assert r.status_code == 400
                    r = await admin.put("/api/v2/capacity/pools/local:dev/standard",
                                        json=TARGET)
                    assert r.status_code == 200, r.text

                async def two_open() -> dict[str, Any] | None:
                    p = await pool(env)
                    return p if p["warm"] == 1 and p["pending_orders"] == 2 else None

                p = await wait_until(two_open, "shortfall 2, two orders")
                assert p["shortfall"] == 2

                # Only provisioner keys may claim; many at once never share an order.
                async with env.client() as admin, env.client(token=tenant_key) as tenant:
                    body = {"datacenter": "local:dev", "node_size": "standard"}
                    assert (await admin.post("/api/v2/capacity/launch-orders/claim",
                                             json=body)).status_code == 403
                    assert (await tenant.post("/api/v2/capacity/launch-orders/claim",
                                              json=body)).status_code == 403
                grants: list[dict[str, Any]] = []
                async with env.client(token=prov_key) as prov:

                    async def claim() -> None:
                        r = await prov.post("/api/v2/capacity/launch-orders/claim",
                                            json={"datacenter": "local:dev",
                                                  "node_size": "standard"})
                        assert r.status_code in (200, 204), r.text
                        if r.status_code == 200:
                            grants.append(r.json())

                    async with trio.open_nursery() as claims:
                        for _ in range(10):
                            claims.start_soon(claim)
                    assert len(grants) == 2
                    assert len({g["order"]["order_id"] for g in grants}) == 2
                    first = grants[0]
                    r = await prov.post(
                        f"/api/v2/capacity/launch-orders/{first['order']['order_id']}/fulfil",
                        json={"vm_name": "vm-new-1"})
                    assert r.status_code == 200, r.text
                    r = await prov.post("/api/v2/capacity/launch-orders/lo-nope/fail",
                                        json={"error": "x"})
                    assert r.status_code == 404
                # The new VM registers with its token; a second VM with the same token
                # and a forged token are refused.
                new = env.agent("vm-new-1", bootstrap_token=first["bootstrap_token"])
                await agents.start(new.run_forever)
                assert new.registered is not None
                thief = env.agent("vm-thief", bootstrap_token=first["bootstrap_token"])
                await agents.start(thief.run)
                assert thief.rejected is not None and thief.rejected.code == "TOKEN_USED"
                forged = env.agent("vm-forged", bootstrap_token="eebt1.bm9wZQ.nope")
                await agents.start(forged.run)
                assert forged.rejected is not None
                assert forged.rejected.code.startswith("TOKEN_")
                async with env.client() as admin:
                    orders = (await admin.get("/api/v2/capacity/launch-orders")).json()
                states = sorted(o["state"] for o in orders["orders"])
                assert states == ["claimed", "fulfilled"]
                before = await pool(env)
            async with running_cp(data, agent_listen=listen, **FAST) as env:

                async def same() -> dict[str, Any] | None:
                    p = await pool(env)
                    keep = ("warm", "shortfall", "pending_orders", "orders_by_state")
                    return p if all(p[k] == before[k] for k in keep) else None

                await wait_until(same, "the same pool numbers after a restart")
            agents.cancel_scope.cancel()


async def test_deploys_consume_warm_reservations_without_sharing_agents(tmp_path: Path) -> None:
    from test_tenants import COMPOSE

    with trio.fail_after(90):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            agents = [env.agent(f"vm-{i}") for i in range(4)]
            for agent in agents:
                await n.start(agent.run)
            _, tenant_key = await accounts(env)
            async with env.client() as admin:
                r = await admin.put("/api/v2/capacity/pools/local:dev/standard",
                                    json={"min_warm": 4, "dispatch": False, "reason": "t"})
                assert r.status_code == 200, r.text
            async with env.client(token=tenant_key) as http:
                for app in ("a", "b", "c"):
                    await http.post("/api/v2/apps", json={"name": app})
                    await http.post(f"/api/v2/apps/{app}/versions", json={
                        "version": "1", "compose": COMPOSE, "expose_port": 80})
                constraints = {"datacenter": "local:dev", "node_size": "standard"}
                ids: list[str] = []

                async def deploy(app: str, replicas: int) -> None:
                    r = await http.post(f"/api/v2/apps/{app}/deployments", json={
                        "version": "1", "replicas": replicas, "constraints": constraints})
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["deployment_id"])

                async with trio.open_nursery() as deploys:  # concurrently
                    deploys.start_soon(deploy, "a", 2)
                    deploys.start_soon(deploy, "b", 1)
                    deploys.start_soon(deploy, "c", 1)

                async def all_running() -> list[dict[str, Any]] | None:
                    views = []
                    for dep_id in ids:
                        d = (await http.get(f"/api/v2/deployments/{dep_id}")).json()
                        if d["state"] != "running":
                            return None
                        views.append(d)
                    return views

                views = await wait_until(all_running, "all running")
            placed = [r["agent_id"] for d in views for r in d["replicas"]]
            assert len(placed) == 4 and len(set(placed)) == 4  # never the same agent twice
            assert all(len(a.deployments) == 1 for a in agents)
            events = [e.kind for e in env.cp.events.recent]
            assert "reservation.made" in events
            n.cancel_scope.cancel()


async def test_bad_provisioner_reports_are_400_and_never_crash_the_pool(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env:
            prov_key, _ = await accounts(env)
            async with env.client() as admin:
                await admin.put("/api/v2/capacity/pools/local:dev/standard", json=TARGET)

            async def opened() -> bool:
                return (await pool(env))["pending_orders"] > 0

            await wait_until(opened, "orders open")
            async with env.client(token=prov_key) as prov:
                grant = (await prov.post("/api/v2/capacity/launch-orders/claim", json={
                    "datacenter": "local:dev", "node_size": "standard"})).json()
                order = grant["order"]["order_id"]
                base = f"/api/v2/capacity/launch-orders/{order}"
                for path, body in ((f"{base}/provisioning", {"vm_name": 5}),
                                   (f"{base}/provisioning", {"vm_name": ["a"]}),
                                   (f"{base}/fulfil", {"vm_name": "x" * 1001}),
                                   (f"{base}/fail", {"error": ""})):
                    r = await prov.post(path, json=body)
                    assert r.status_code == 400, (path, body, r.text)
            node = next(x for x in env.cp.root.snapshot().walk()
                        if x.name == "pool/local:dev/standard")
            assert node.restarts == 0, node.last_error
