"""Updates of a running deployment: ``PATCH /api/v2/deployments/{id}`` (version and/or
replicas) and ``POST …/rollback``. A rolling update starts the new version on a free
agent first (surge) and stops the old replica once the new one runs, or redeploys in
place on the same agent (no undeploy: the agent keeps the named volumes); a new replica
that fails its health gate rolls the deployment back to the previous version. The
deployment keeps its id and gains its history.

Real CP (in-process, real listeners), real websockets, simulated agents.
"""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from cpkit import RunningCp, free_port, running_cp
from simagent import SimAgent
from test_sessions import FAST, wait_until
from test_tenants import COMPOSE, deployment, reach_state, setup_app, tenant

from ee.protocol.messages import Deploy, DeployStatus, Undeploy


def context(marker: str) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = f"FROM ee-busybox:local\n# {marker}\n".encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


@attrs.define
class Agent(SimAgent):
    """A sim agent that records what it was told, and fails the versions in ``bad``
    at their health check."""

    received: list[tuple[str, str, str]] = attrs.field(factory=list)  # (kind, dep, version)
    bad: frozenset[str] = frozenset()

    async def _deploy(self, msg: Deploy) -> None:
        self.received.append(("deploy", msg.deployment_id, msg.version))
        if msg.version not in self.bad:
            await SimAgent._deploy(self, msg)
            return
        await self.send(DeployStatus(deployment_id=msg.deployment_id, state="starting"))
        await self.send(DeployStatus(
            deployment_id=msg.deployment_id, state="failed", phase="health",
            error="health check failed", log_tail=("GET /health -> 404",)))

    async def _undeploy(self, msg: Undeploy) -> None:
        self.received.append(("undeploy", msg.deployment_id, ""))
        await SimAgent._undeploy(self, msg)

    def told(self, kind: str) -> list[str]:
        return [v for k, _, v in self.received if k == kind]


async def start(env: RunningCp, nursery: trio.Nursery, *names: str, **kw: Any) -> list[Agent]:
    agents = [Agent(url=env.agent_url, td=env.td, vm_name=n, **kw) for n in names]
    for agent in agents:
        await nursery.start(agent.run)
    return agents


async def two_versions(http: httpx.AsyncClient) -> None:
    await setup_app(http)
    r = await http.post("/api/v2/apps/hello/versions", json={
        "version": "2.0", "compose": COMPOSE, "build_context": context("v2"),
        "expose_port": 8080, "health_path": "/health"})
    assert r.status_code == 201, r.text


async def deploy(http: httpx.AsyncClient, replicas: int = 1) -> str:
    r = await http.post("/api/v2/apps/hello/deployments",
                        json={"version": "1.0", "replicas": replicas})
    assert r.status_code == 202, r.text
    dep_id = str(r.json()["deployment_id"])
    await reach_state(http, dep_id, "running")
    return dep_id


async def update_over(http: httpx.AsyncClient, dep_id: str, state: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        d = await deployment(http, dep_id)
        u = d["update"]
        return d if u is not None and u["state"] == state and u["finished_at"] \
            and d["state"] == "running" else None

    return dict(await wait_until(check, f"update {state}"))


async def test_rolling_update_with_surge(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agents = await start(env, nursery, "vm-0", "vm-1")
            http = await tenant(env, "t")
            async with http:
                await two_versions(http)
                dep_id = await deploy(http)
                [before] = (await deployment(http, dep_id))["replicas"]
                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"version": "2.0"})
                assert r.status_code == 202, r.text
                assert r.headers["Location"] == f"/api/v2/deployments/{dep_id}"
                assert r.json()["update"]["state"] == "rolling"
                d = await update_over(http, dep_id, "done")
                assert (d["deployment_id"], d["version"], d["previous_version"]) == \
                    (dep_id, "2.0", "1.0")
                [after] = d["replicas"]
                # Surge: the new version started on the free agent, the old one stopped.
                assert after["agent_id"] != before["agent_id"]
                assert (after["version"], after["state"]) == ("2.0", "running")
                old = next(a for a in agents if a.agent_id == before["agent_id"])
                new = next(a for a in agents if a.agent_id == after["agent_id"])
                assert old.told("deploy") == ["1.0"] and old.told("undeploy") == [""]
                assert new.told("deploy") == ["2.0"] and new.told("undeploy") == []
                assert [h["version"] for h in d["history"]] == ["1.0", "2.0"]
                assert d["history"][0]["to"] == d["history"][1]["from"]
                assert d["history"][1]["to"] is None
                assert d["error"] is None
                # The same version and count again: nothing to do.
                r = await http.patch(f"/api/v2/deployments/{dep_id}",
                                     json={"version": "2.0", "replicas": 1})
                assert r.status_code == 200 and "Location" not in r.headers
            nursery.cancel_scope.cancel()


async def test_in_place_update_then_rollback(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            [agent] = await start(env, nursery, "vm-0")
            http = await tenant(env, "t")
            async with http:
                await two_versions(http)
                dep_id = await deploy(http)
                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"version": "2.0"})
                assert r.status_code == 202, r.text
                d = await update_over(http, dep_id, "done")
                [replica] = d["replicas"]
                assert (replica["agent_id"], replica["version"]) == (agent.agent_id, "2.0")
                # In place: the same agent redeployed the same id; never undeployed
                # (an undeploy removes the named volumes; a redeploy keeps them).
                assert agent.told("deploy") == ["1.0", "2.0"]
                assert agent.told("undeploy") == []
                assert agent.deployments[dep_id].version == "2.0"
                # Explicit rollback: back to the previous version, in place too.
                r = await http.post(f"/api/v2/deployments/{dep_id}/rollback")
                assert r.status_code == 202, r.text
                assert r.headers["Location"] == f"/api/v2/deployments/{dep_id}"
                d = await update_over(http, dep_id, "done")
                assert (d["version"], d["previous_version"]) == ("1.0", "2.0")
                assert d["update"]["reason"] == "rollback"
                assert agent.told("deploy") == ["1.0", "2.0", "1.0"]
                assert agent.told("undeploy") == []
                assert [h["version"] for h in d["history"]] == ["1.0", "2.0", "1.0"]
            nursery.cancel_scope.cancel()


async def test_failing_health_gate_rolls_back(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            [agent] = await start(env, nursery, "vm-0", bad=frozenset({"2.0"}))
            http = await tenant(env, "t")
            async with http:
                await two_versions(http)
                dep_id = await deploy(http)
                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"version": "2.0"})
                assert r.status_code == 202, r.text
                d = await update_over(http, dep_id, "rolled_back")
                assert (d["version"], d["previous_version"]) == ("1.0", "2.0")
                assert d["error"] == (
                    f"update to 2.0 rolled back: the new replica on {agent.agent_id} "
                    "failed: health check failed: GET /health -> 404")
                assert d["failures"] == 0  # the version's fault, not the agent's
                [replica] = d["replicas"]
                assert (replica["version"], replica["state"]) == ("1.0", "running")
                # In place there and back: the agent never undeployed it.
                assert agent.told("deploy") == ["1.0", "2.0", "1.0"]
                assert agent.told("undeploy") == []
                kinds = [e.kind for e in env.cp.events.recent if e.subject == dep_id]
                assert "deployment.rolled_back" in kinds
            nursery.cancel_scope.cancel()


async def test_surge_replica_failing_rolls_back_and_keeps_the_old(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agents = await start(env, nursery, "vm-0", "vm-1", bad=frozenset({"2.0"}))
            http = await tenant(env, "t")
            async with http:
                await two_versions(http)
                dep_id = await deploy(http)
                [before] = (await deployment(http, dep_id))["replicas"]
                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"version": "2.0"})
                assert r.status_code == 202
                d = await update_over(http, dep_id, "rolled_back")
                [replica] = d["replicas"]
                assert replica["agent_id"] == before["agent_id"]
                assert (replica["version"], replica["state"]) == ("1.0", "running")
                old = next(a for a in agents if a.agent_id == before["agent_id"])
                assert old.told("deploy") == ["1.0"] and old.told("undeploy") == []
            nursery.cancel_scope.cancel()


async def test_scale_up_and_down_in_place(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agents = await start(env, nursery, "vm-0", "vm-1", "vm-2")
            http = await tenant(env, "t")
            async with http:
                await two_versions(http)
                dep_id = await deploy(http)
                [first] = (await deployment(http, dep_id))["replicas"]

                async def replicas(n: int) -> dict[str, Any] | None:
                    d = await deployment(http, dep_id)
                    ok = d["state"] == "running" and len(d["replicas"]) == n
                    return d if ok else None

                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"replicas": 3})
                assert r.status_code == 202, r.text
                d = await wait_until(lambda: replicas(3), "3 replicas")
                assert d["update"] is None and d["version"] == "1.0"
                # Up: the running replica untouched, one deploy on each new agent.
                assert all(a.told("deploy") == ["1.0"] for a in agents)
                assert all(a.told("undeploy") == [] for a in agents)
                assert first["agent_id"] in [x["agent_id"] for x in d["replicas"]]
                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"replicas": 1})
                assert r.status_code == 202, r.text
                d = await wait_until(lambda: replicas(1), "1 replica")
                # Down: two stopped, the one kept never touched (no redeploy).
                [kept] = d["replicas"]
                for a in agents:
                    assert a.told("deploy") == ["1.0"]
                    assert a.told("undeploy") == ([] if a.agent_id == kept["agent_id"]
                                                  else [""])
                assert d["replicas_wanted"] == 1
            nursery.cancel_scope.cancel()


async def test_patch_refusals(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            await start(env, nursery, "vm-0")
            http = await tenant(env, "t")
            other = await tenant(env, "other")
            async with http, other:
                await two_versions(http)
                dep_id = await deploy(http)
                path = f"/api/v2/deployments/{dep_id}"
                for body, field in (({"version": "2.0", "image": "x"}, None),
                                    ({}, None), ({"replicas": 0}, "replicas"),
                                    ({"replicas": True}, "replicas"),
                                    ({"version": "../x"}, "version")):
                    r = await http.patch(path, json=body)
                    assert r.status_code == 400, (body, r.text)
                    if field:
                        assert r.json()["error"]["details"]["field"] == field
                r = await http.patch(path, json={"version": "9.9"})
                assert r.status_code == 404
                r = await http.post(f"{path}/rollback")
                assert r.status_code == 409
                assert r.json()["error"]["code"] == "no_previous_version"
                r = await http.post(f"{path}/rollback", json={"version": "2.0"})
                assert r.status_code == 400  # it takes no fields
                assert r.json()["error"]["code"] == "unknown_field"
                r = await http.post(f"{path}/rollback", json=[1])
                assert r.status_code == 400
                # Another tenant: not found, whatever it asks.
                r = await other.patch(path, json={"version": "2.0"})
                assert r.status_code == 404
                r = await other.post(f"{path}/rollback")
                assert r.status_code == 404
                assert (await deployment(http, dep_id))["version"] == "1.0"
                # The CP's manifest has the new desired state before the answer.
                r = await http.patch(path, json={"version": "2.0"})
                assert r.status_code == 202
                spec = env.cp.manifests.load("deployments")[0]
                assert [s["version"] for s in spec if s["deployment_id"] == dep_id] == ["2.0"]
                await update_over(http, dep_id, "done")
                r = await http.delete(path)
                assert r.status_code == 202
                r = await http.patch(path, json={"replicas": 2})
                assert r.status_code == 409
            nursery.cancel_scope.cancel()


async def test_a_version_an_update_needs_cannot_be_deleted(tmp_path: Path) -> None:
    """DELETE of a version is decided by the app actor (``DeleteVersion``): the version
    a deployment runs, the one it was updated from (a rollback goes back to it, a failed
    health gate too) and both ends of its update are kept; another is deleted."""
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            await start(env, nursery, "vm-0", "vm-1")
            http = await tenant(env, "t")
            async with http:
                await two_versions(http)
                r = await http.post("/api/v2/apps/hello/versions", json={
                    "version": "3.0", "compose": COMPOSE, "build_context": context("v3"),
                    "expose_port": 8080, "health_path": "/health"})
                assert r.status_code == 201, r.text
                dep_id = await deploy(http)
                r = await http.patch(f"/api/v2/deployments/{dep_id}", json={"version": "2.0"})
                assert r.status_code == 202, r.text
                # Mid-update (and after it): 1.0 is the update's from and the previous
                # version; 2.0 is the deployment's. Both refused, nothing deleted.
                for v in ("1.0", "2.0"):
                    r = await http.delete(f"/api/v2/apps/hello/versions/{v}")
                    assert r.status_code == 409, (v, r.text)
                    assert r.json()["error"]["code"] == "deployed"
                    assert r.json()["error"]["details"]["deployments"] == [dep_id]
                await update_over(http, dep_id, "done")
                r = await http.delete("/api/v2/apps/hello/versions/1.0")
                assert r.status_code == 409, r.text
                assert {s["version"] for s in env.cp.manifests.load("versions")[0]} == \
                    {"1.0", "2.0", "3.0"}
                r = await http.delete("/api/v2/apps/hello/versions/3.0")
                assert r.status_code == 204, r.text
                assert (await http.get("/api/v2/apps/hello/versions/3.0")).status_code == 404
                assert {s["version"] for s in env.cp.manifests.load("versions")[0]} == \
                    {"1.0", "2.0"}
                r = await http.post(f"/api/v2/deployments/{dep_id}/rollback")
                assert r.status_code == 202, r.text
                d = await update_over(http, dep_id, "done")
                assert (d["version"], d["previous_version"]) == ("1.0", "2.0")
                r = await http.delete("/api/v2/apps/hello/versions/9.9")
                assert r.status_code == 404
                r = await http.delete(f"/api/v2/deployments/{dep_id}")
                assert r.status_code == 202
                await reach_state(http, dep_id, "stopped")
                r = await http.delete("/api/v2/apps/hello/versions/2.0")
                assert r.status_code == 204, r.text
            nursery.cancel_scope.cancel()


async def test_a_cp_restart_resumes_a_rolling_update(tmp_path: Path) -> None:
    """The new version is in the signed manifest before PATCH answers: a CP that dies
    before the agent ran it finishes the update after its restart."""
    from test_adoption import Agent as Recording
    from test_adoption import control_plane, key_of

    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    first_cp = [True]

    def until_restart(_: Recording, msg: Deploy) -> bool:
        return not (msg.version == "2.0" and first_cp[0])  # lost with the first CP

    with trio.fail_after(90):
        async with trio.open_nursery() as agents:
            async with control_plane(data, listen) as cp:
                agent = cp.agent("vm-a", on_deploy=until_restart)
                await agents.start(agent.run_forever)
                http = await tenant(cp.env, "t")
                key = await key_of(http)
                async with http:
                    await two_versions(http)
                    dep_id = await deploy(http)
                    r = await http.patch(f"/api/v2/deployments/{dep_id}",
                                         json={"version": "2.0"})
                    assert r.status_code == 202, r.text
                    assert agent.deploys(dep_id) == 2  # 2.0 sent, never run
                cp.crash()
            first_cp[0] = False
            async with control_plane(data, listen) as cp, \
                    cp.env.client(token=key) as http:
                d = await update_over(http, dep_id, "done")
                assert (d["version"], d["previous_version"]) == ("2.0", "1.0")
                [replica] = d["replicas"]
                assert (replica["agent_id"], replica["version"]) == (agent.agent_id, "2.0")
                assert agent.deployments[dep_id].version == "2.0"
                assert agent.undeploys(dep_id) == 0  # in place, volumes kept
                assert [h["version"] for h in d["history"]] == ["1.0", "2.0"]
            agents.cancel_scope.cancel()
