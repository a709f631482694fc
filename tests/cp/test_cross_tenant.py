"""Cross-tenant isolation over real HTTP: tenant B cannot read, stop, tail or list
tenant A's deployments — whatever id or name it tries, the answer is the 404 of a
deployment that does not exist, nothing changes, and A's replica keeps running."""

from __future__ import annotations

from pathlib import Path

import trio
from cpkit import running_cp
from test_sessions import FAST
from test_tenants import deployment, reach_state, setup_app, tenant


async def test_tenant_b_cannot_touch_tenant_a_deployments(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            agents = [env.agent(f"vm-{i}") for i in range(2)]
            for agent in agents:
                await n.start(agent.run)
            alice, bob = await tenant(env, "alice"), await tenant(env, "bob")
            async with alice, bob:
                await setup_app(alice)
                await setup_app(bob)  # the same app name, in another account
                r = await alice.post("/api/v2/apps/hello/deployments",
                                     json={"version": "1.0", "replicas": 1})
                assert r.status_code == 202, r.text
                dep_a = r.json()["deployment_id"]
                before = await reach_state(alice, dep_a, "running")
                r = await bob.post("/api/v2/apps/hello/deployments",
                                   json={"version": "1.0", "replicas": 1})
                assert r.status_code == 202, r.text
                dep_b = r.json()["deployment_id"]
                await reach_state(bob, dep_b, "running")
                holder = next(a for a in agents if dep_a in a.deployments)
                app_key = env.cp.deployment_index[dep_a]
                events_before = len(env.cp.events.recent)

                # What a deployment that does not exist answers, for comparison.
                missing = await bob.get("/api/v2/deployments/dep-0000000000000000")
                assert missing.status_code == 404
                code = missing.json()["error"]["code"]

                attempts = [
                    ("GET", f"/api/v2/deployments/{dep_a}"),
                    ("DELETE", f"/api/v2/deployments/{dep_a}"),
                    ("GET", f"/api/v2/deployments/{dep_a}/logs"),
                    ("GET", f"/api/v2/deployments/{dep_a}/logs?tail=10"),
                    ("GET", f"/api/v2/deployments/{app_key}"),
                    ("DELETE", f"/api/v2/deployments/{app_key}"),
                    ("GET", f"/api/v2/deployments/{dep_a.upper()}"),
                    ("GET", f"/api/v2/deployments/{dep_a}%00"),
                    ("GET", f"/api/v2/deployments/{dep_a}%2F..%2F{dep_b}"),
                ]
                for method, path in attempts:
                    r = await bob.request(method, path)
                    assert r.status_code == 404, (method, path, r.status_code, r.text)
                    assert r.json()["error"]["code"] == code, (method, path, r.text)

                r = await bob.get("/api/v2/deployments")
                assert r.status_code == 200
                assert [d["deployment_id"] for d in r.json()["deployments"]] == [dep_b]
                # Bob's "hello" is his own app: its deployments and versions only.
                r = await bob.get("/api/v2/apps/hello")
                assert r.status_code == 200 and r.json()["deployments"] == [dep_b]

                # Nothing changed: A's deployment, its replica, the agent, the events.
                assert await deployment(alice, dep_a) == before
                assert dep_a in holder.deployments
                assert holder.deployments[dep_a].state == "running"
                assert not [e for e in list(env.cp.events.recent)[events_before:]
                            if e.subject == dep_a]
                r = await alice.get("/api/v2/deployments")
                assert [d["deployment_id"] for d in r.json()["deployments"]] == [dep_a]
                r = await alice.get(f"/api/v2/deployments/{dep_a}/logs")
                assert r.status_code == 200
                # An agent refusing the logs request answers the tenant with the reason
                # and never crashes its AgentActor.
                holder.refuse_logs = True
                r = await alice.get(f"/api/v2/deployments/{dep_a}/logs")
                assert r.status_code == 200
                (replica,) = r.json()["replicas"]
                assert "logs unavailable" in replica["lines"][0]["text"], replica
                holder.refuse_logs = False
                node = next(x for x in env.cp.root.snapshot().walk()
                            if x.name == f"agent/{holder.agent_id}")
                assert node.restarts == 0, node.last_error

                # And the other way round: A stopping its own leaves B's running.
                assert (await alice.delete(f"/api/v2/deployments/{dep_a}")).status_code == 202
                await reach_state(alice, dep_a, "stopped")
                assert (await deployment(bob, dep_b))["state"] == "running"
            n.cancel_scope.cancel()


async def test_no_token_and_other_kinds_of_key_see_no_deployment(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            agent = env.agent("vm-a")
            await n.start(agent.run)
            alice = await tenant(env, "alice")
            async with env.client() as admin:
                r = await admin.post("/api/v2/accounts",
                                     json={"name": "prov", "kind": "provisioner"})
                provisioner = r.json()["api_key"]
            async with alice, env.client(token=None) as anon, \
                    env.client(token=provisioner) as prov, env.client() as admin:
                await setup_app(alice)
                r = await alice.post("/api/v2/apps/hello/deployments",
                                     json={"version": "1.0", "replicas": 1})
                dep_a = r.json()["deployment_id"]
                before = await reach_state(alice, dep_a, "running")
                for who, client, status in ((anon, anon, 401), (prov, prov, 403),
                                            (admin, admin, 403)):
                    for method, path in (("GET", f"/api/v2/deployments/{dep_a}"),
                                         ("DELETE", f"/api/v2/deployments/{dep_a}"),
                                         ("GET", f"/api/v2/deployments/{dep_a}/logs"),
                                         ("GET", "/api/v2/deployments")):
                        r = await client.request(method, path)
                        assert r.status_code == status, (who, method, path, r.text)
                assert await deployment(alice, dep_a) == before
                assert agent.deployments[dep_a].state == "running"
            n.cancel_scope.cancel()
