"""Tenants end to end against a real CP with simulated agents: accounts and keys,
apps and versions, preflight and deployments, re-placement, undeploy, isolation."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import trio
from cpkit import RunningCp, free_port, running_cp
from test_sessions import FAST, wait_until

from ee.protocol.compose import validate_build_context, validate_compose, workload_hash

COMPOSE = "services:\n  web:\n    build: .\n    init: true\n"


def context() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"FROM ee-busybox:local\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def workload_of(compose: str, ctx: bytes | None, *, port: int, service: str = "web",
                health: str = "/", env: dict[str, str] | None = None,
                secret_names: tuple[str, ...] = ()) -> str:
    """The workload hash a version with these fields must get (the documented formula)."""
    return workload_hash(validate_compose(compose),
                         None if ctx is None else validate_build_context(ctx),
                         env=env or {}, expose_port=port, expose_service=service,
                         health_path=health, secret_names=secret_names, secret_env={})


async def tenant(env: RunningCp, name: str) -> httpx.AsyncClient:
    async with env.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": name})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    return env.client(token=key)


async def setup_app(http: httpx.AsyncClient, name: str = "hello") -> dict[str, Any]:
    r = await http.post("/api/v2/apps", json={"name": name})
    assert r.status_code == 201, r.text
    ctx = context()
    r = await http.post(f"/api/v2/apps/{name}/versions", json={
        "version": "1.0", "compose": COMPOSE, "build_context": ctx, "expose_port": 8080,
        "health_path": "/health"})
    assert r.status_code == 201, r.text
    assert r.json()["compose_hash"] == workload_of(COMPOSE, base64.b64decode(ctx), port=8080,
                                                   health="/health")
    return dict(r.json())


async def deployment(http: httpx.AsyncClient, dep_id: str) -> dict[str, Any]:
    r = await http.get(f"/api/v2/deployments/{dep_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def reach_state(http: httpx.AsyncClient, dep_id: str, state: str) -> dict[str, Any]:
    """Wait (under the caller's fail_after) until the deployment is in *state*."""

    async def check() -> dict[str, Any] | None:
        d = await deployment(http, dep_id)
        return d if d["state"] == state else None

    return dict(await wait_until(check, f"deployment {state}"))


async def test_accounts_keys_and_isolation(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            async with env.client(token=None) as anon:
                r = await anon.post("/api/v2/accounts", json={"name": "x"})
                assert r.status_code == 401
                r = await anon.get("/api/v2/apps")
                assert r.status_code == 401
            async with env.client() as admin:
                r = await admin.get("/api/v2/apps")
                assert r.status_code == 403  # the admin token is not a tenant key
                r = await admin.post("/api/v2/accounts", json={"name": ""})
                assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "name"
                r = await admin.post("/api/v2/accounts", json={"name": "p", "kind": "provisioner"})
                provisioner_key = r.json()["api_key"]
            alice = await tenant(env, "alice")
            bob = await tenant(env, "bob")
            async with alice, bob, env.client(token=provisioner_key) as prov:
                assert (await prov.get("/api/v2/apps")).status_code == 403
                await setup_app(alice)
                assert (await bob.get("/api/v2/apps/hello")).status_code == 404
                assert (await bob.get("/api/v2/apps")).json() == {"apps": [], "next_cursor": None}
                me = (await alice.get("/api/v2/accounts/me")).json()
                assert me["name"] == "alice" and me["balance"] == 0
                old = alice.headers["Authorization"]
                r = await alice.post("/api/v2/accounts/me/keys")
                assert r.status_code == 201 and r.json()["revoked"] == 1
                alice.headers["Authorization"] = f"Bearer {r.json()['api_key']}"
                assert (await alice.get("/api/v2/apps/hello")).status_code == 200
                async with env.client(token=old.split(" ", 1)[1]) as stale:
                    assert (await stale.get("/api/v2/apps")).status_code == 401


async def test_version_validation(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http:
                await http.post("/api/v2/apps", json={"name": "v"})
                base = {"version": "1", "compose": COMPOSE, "expose_port": 80}
                bad = [
                    ({**base, "compose": "not: [yaml"}, "compose"),
                    ({**base, "compose": "foo: 1"}, "compose"),
                    ({**base, "expose_port": 0}, "expose_port"),
                    ({**base, "expose_service": "nope"}, "expose_service"),
                    ({**base, "health_path": "health"}, "health_path"),
                    ({**base, "build_context": "%%%"}, "build_context"),
                    ({**base, "build_context": base64.b64encode(b"not gz").decode()},
                     "build_context"),
                    ({**base, "env": {"A": 1}}, "env"),
                    ({**base, "version": "../x"}, "version"),
                ]
                for body, field in bad:
                    r = await http.post("/api/v2/apps/v/versions", json=body)
                    assert r.status_code == 400, (field, r.text)
                    assert r.json()["error"]["details"]["field"] == field
                r = await http.post("/api/v2/apps/v/versions", content=b"{nope")
                assert r.status_code == 400
                assert (await http.post("/api/v2/apps/v/versions", json=base)).status_code == 201
                assert (await http.post("/api/v2/apps/v/versions", json=base)).status_code == 409


async def test_deploy_replace_and_undeploy(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            agents = {name: env.agent(name) for name in ("vm-a", "vm-b", "vm-c")}
            for agent in agents.values():
                await n.start(agent.run)
            http = await tenant(env, "t")
            async with http:
                await setup_app(http)
                r = await http.post("/api/v2/apps/hello/preflight",
                                    json={"version": "1.0", "replicas": 2})
                assert r.status_code == 200 and r.json()["placeable"] is True
                assert r.json()["chosen"] == (await http.post(
                    "/api/v2/apps/hello/preflight",
                    json={"version": "1.0", "replicas": 2})).json()["chosen"]
                r = await http.post("/api/v2/apps/hello/deployments",
                                    json={"version": "1.0", "replicas": 2})
                assert r.status_code == 202, r.text
                dep_id = r.json()["deployment_id"]

                d = await reach_state(http, dep_id, "running")
                placed = {rep["agent_id"] for rep in d["replicas"]}
                assert len(placed) == 2
                assert all(rep["state"] == "running" for rep in d["replicas"])
                assert all(rep["compose_hash"] == d["compose_hash"] for rep in d["replicas"])

                # Nothing fits a third deployment of 2 replicas on one free agent.
                r = await http.post("/api/v2/apps/hello/deployments",
                                    json={"version": "1.0", "replicas": 2})
                assert r.status_code == 409
                rejected = r.json()["error"]["details"]["rejected"]
                assert sorted(x["reasons"] for x in rejected) == [["BUSY"], ["BUSY"]]

                # Kill one replica's agent: its replica moves to the spare agent.
                by_id = {a.agent_id: a for a in agents.values()}
                victim_id = sorted(placed)[0]
                by_id[victim_id].heartbeats = False
                assert by_id[victim_id].ws is not None
                await by_id[victim_id].ws.aclose()

                async def moved() -> dict[str, Any] | None:
                    d = await deployment(http, dep_id)
                    ids = {rep["agent_id"] for rep in d["replicas"]}
                    ok = d["state"] == "running" and victim_id not in ids and len(ids) == 2
                    return d if ok else None

                d = await wait_until(moved, "re-placed")
                spare = ({a.agent_id for a in agents.values()} - placed).pop()
                assert spare in {rep["agent_id"] for rep in d["replicas"]}

                r = await http.delete(f"/api/v2/deployments/{dep_id}")
                assert r.status_code == 202

                await reach_state(http, dep_id, "stopped")
                assert all(not a.deployments for a in agents.values()
                           if a.agent_id != victim_id)
                logs = await http.get(f"/api/v2/deployments/{dep_id}/logs")
                assert logs.status_code == 200
            n.cancel_scope.cancel()


async def test_failed_replica_moves_then_deployment_fails(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            for i in range(3):
                await n.start(env.agent(f"vm-{i}", fail_deploys=True).run)
            http = await tenant(env, "t")
            async with http:
                await setup_app(http)
                r = await http.post("/api/v2/apps/hello/deployments",
                                    json={"version": "1.0", "replicas": 1})
                dep_id = r.json()["deployment_id"]

                d = await reach_state(http, dep_id, "failed")
                assert "3 agents" in d["error"]
            n.cancel_scope.cancel()


async def test_restart_adopts_running_replicas(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    listen = f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents_nursery:
            async with running_cp(data, agent_listen=listen, **FAST) as env:
                agents = [env.agent(f"vm-{i}") for i in range(2)]
                for agent in agents:
                    await agents_nursery.start(agent.run_forever)
                http = await tenant(env, "t")
                key = http.headers["Authorization"]
                async with http:
                    await setup_app(http)
                    r = await http.post("/api/v2/apps/hello/deployments",
                                        json={"version": "1.0", "replicas": 2})
                    dep_id = r.json()["deployment_id"]

                    await reach_state(http, dep_id, "running")
                    before = await deployment(http, dep_id)
            (data / "records.sqlite3").unlink()
            async with running_cp(data, agent_listen=listen, **FAST) as env:
                async with env.client(token=key.split(" ", 1)[1]) as http:

                    async def back() -> dict[str, Any] | None:
                        r = await http.get(f"/api/v2/deployments/{dep_id}")
                        if r.status_code != 200:
                            return None
                        d = r.json()
                        return d if d["state"] == "running" else None

                    after = await wait_until(back, "adopted")
                assert [r["agent_id"] for r in after["replicas"]] == \
                    [r["agent_id"] for r in before["replicas"]]
                # Adopted, not restarted: each agent got exactly one deploy, ever.
                assert all(len(a.deployments) == 1 for a in agents)
            agents_nursery.cancel_scope.cancel()


async def test_chaos_crashing_app_and_agent_actors_during_deploys(tmp_path: Path) -> None:
    """Every desired replica ends running exactly once, whatever crashes meanwhile."""
    import random

    rng = random.Random(11)
    with trio.fail_after(120):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            agents = [env.agent(f"vm-{i:02d}") for i in range(8)]
            for agent in agents:
                await n.start(agent.run_forever)
            http = await tenant(env, "t")
            async with http:
                await setup_app(http)
                await http.post("/api/v2/apps", json={"name": "other"})
                await http.post("/api/v2/apps/other/versions", json={
                    "version": "1", "compose": COMPOSE, "expose_port": 80})
                stop_chaos = trio.Event()
                crashes = 0

                async def chaos() -> None:
                    nonlocal crashes
                    while not stop_chaos.is_set():
                        names = (env.cp.registry.names("app/")
                                 + env.cp.registry.names("agent/"))
                        if names and env.cp.root.crash(rng.choice(names)):
                            crashes += 1
                        await trio.sleep(rng.uniform(0.02, 0.1))

                n.start_soon(chaos)
                wanted = {}
                for app, replicas in (("hello", 3), ("other", 2), ("hello", 2)):
                    while True:  # an ask may hit a crash: the tenant retries, as clients do
                        r = await http.post(f"/api/v2/apps/{app}/deployments",
                                            json={"version": "1" if app == "other"
                                                  else "1.0", "replicas": replicas})
                        if r.status_code == 202:
                            break
                        assert r.status_code == 503, r.text  # actor restarting: retry
                        await trio.sleep(0.1)
                    wanted[r.json()["deployment_id"]] = replicas
                await trio.sleep(3)
                stop_chaos.set()
                assert crashes > 10

                async def settled() -> bool:
                    for dep_id, count in wanted.items():
                        d = await deployment(http, dep_id)
                        if d["state"] != "running" or len(d["replicas"]) != count:
                            return False
                    return True

                await wait_until(settled, "all running")
                # Exactly once: each agent runs at most one replica, and the agents
                # themselves (the ground truth) hold exactly the wanted replicas.
                held: dict[str, int] = {}
                for agent in agents:
                    assert len(agent.deployments) <= 1, agent.deployments
                    for dep_id in agent.deployments:
                        held[dep_id] = held.get(dep_id, 0) + 1
                assert held == wanted
            n.cancel_scope.cancel()


async def test_late_replica_reports_after_stop_do_not_crash_the_app(tmp_path: Path) -> None:
    from ee.actors.agent import ReplicaReport

    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            agent = env.agent("vm-a")
            await n.start(agent.run)
            http = await tenant(env, "t")
            async with http:
                await setup_app(http)
                r = await http.post("/api/v2/apps/hello/deployments",
                                    json={"version": "1.0", "replicas": 1})
                dep_id = r.json()["deployment_id"]

                await reach_state(http, dep_id, "running")
                await http.delete(f"/api/v2/deployments/{dep_id}")
                await reach_state(http, dep_id, "stopped")
                app = next(iter(env.cp.registry.names("app/")))
                for state in ("stopped", "running", "failed"):
                    await env.cp.registry.ref(app).tell(
                        ReplicaReport(dep_id, agent.agent_id or "", state, None, None))
                d = await deployment(http, dep_id)
                assert d["state"] in ("stopped", "stopping")
                node = next(x for x in env.cp.root.snapshot().walk() if x.name == app)
                assert node.restarts == 0, node.last_error
            n.cancel_scope.cancel()


async def test_concurrent_creates_and_stopping_a_failed_deployment(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            for i in range(3):
                await n.start(env.agent(f"vm-{i}", fail_deploys=True).run)
            http = await tenant(env, "t")
            async with http:
                codes: list[int] = []

                async def create() -> None:
                    codes.append((await http.post("/api/v2/apps",
                                                  json={"name": "dup"})).status_code)

                async with trio.open_nursery() as creates:
                    for _ in range(6):
                        creates.start_soon(create)
                assert sorted(codes) == [201] + [409] * 5
                assert not [e for e in env.cp.events.recent if e.kind == "manifest.refused"]
                await setup_app(http)
                r = await http.post("/api/v2/apps/hello/deployments",
                                    json={"version": "1.0", "replicas": 1})
                dep_id = r.json()["deployment_id"]

                await reach_state(http, dep_id, "failed")
                r = await http.delete(f"/api/v2/deployments/{dep_id}")
                assert r.status_code == 202, r.text
                assert (await deployment(http, dep_id))["state"] == "stopped"
                app = f"app/{env.cp.deployment_index[dep_id]}"
                node = next(x for x in env.cp.root.snapshot().walk() if x.name == app)
                assert node.restarts == 0, node.last_error
            n.cancel_scope.cancel()


async def test_a_replica_claimed_under_another_app_is_not_adopted(tmp_path: Path) -> None:
    from ee.actors.app import Reconcile
    from ee.protocol.messages import DeploymentSnapshot

    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as n:
            await n.start(env.agent("vm-a").run)
            http = await tenant(env, "t")
            async with http:
                await setup_app(http)
                r = await http.post("/api/v2/apps/hello/deployments",
                                    json={"version": "1.0", "replicas": 1})
                dep_id = r.json()["deployment_id"]

                before = await reach_state(http, dep_id, "running")
                liar = env.agent("vm-liar")
                liar.deployments[dep_id] = DeploymentSnapshot(
                    deployment_id=dep_id, app="acct-someone.else", version="1.0",
                    state="running")
                await n.start(liar.run)
                app = env.cp.registry.ref(f"app/{env.cp.deployment_index[dep_id]}")
                for _ in range(2):  # two full reconcile passes, after the liar registered
                    await app.ask(Reconcile(), timeout=10)
                after = await deployment(http, dep_id)
                assert [x["agent_id"] for x in after["replicas"]] == \
                    [x["agent_id"] for x in before["replicas"]]
                # Never counted as a member: no surplus stop was ever needed. It is a stray:
                # reported, and stopped on the agent that listed it.
                assert not [e for e in env.cp.events.recent
                            if e.kind == "replica.surplus" and e.subject == dep_id]
                strays = [dict(e.data) for e in env.cp.events.recent
                          if e.kind == "replica.stray" and e.subject == dep_id]
                assert [(e["agent_id"], e["reason"]) for e in strays] == \
                    [(liar.agent_id, "WRONG_APP")]
                await wait_until(lambda: dep_id not in liar.deployments, "stray stopped")
            n.cancel_scope.cancel()
