"""A dc-placed deployment at the master looks and acts like a direct one.

Real parts: a master ControlPlane (in this process, so the test owns its billing wall
clock), a real dc ``ee-cp`` process enrolled over mTLS, sim agents at the dc. The
tenant reads the replicas the dc runs (agent ids, the version's compose hash), PATCHes
the version (the dc rolls it with its AppActor) and rolls back, and the master's billing
pass charges the tenant for the replica the dc runs. Then, against a real master
process, a dc's forged report (a replica on an agent it never reported, a wrong compose
hash, a deployment it was not given) is refused or not counted, and nothing is applied.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, CpConfig
from ee.federation.placement import (
    Outcome,
    ReportedReplica,
    check_outcome,
    foreign_replicas,
    intent,
    intent_hashes,
    shown_replicas,
    updated_intent,
)
from ee.federation.wire import FOREIGN_AGENTS
from ee.placement import Constraints

from .fedkit import CpProc, agent, cp_here, event_log, eventually, master, refused, sim_td
from .test_refusals import LABEL, _agent, _enroll, _events, link

A = "sim:dc-a"
COMPOSE = "services:\n  web:\n    image: nginx\n"
COMPOSE2 = "services:\n  web:\n    image: nginx:stable\n"


# ---- the pure checks ----------------------------------------------------------------------

def test_report_checks() -> None:
    base = {"deployment_id": "d", "outcome": "running", "reasons": {}, "running": 1}
    rep = {"agent_id": "ag-1", "state": "running", "version": "1", "compose_hash": "h1",
           "vm_name": "vm", "node_size": "standard", "error": "x" * 5000}
    got = check_outcome({**base, "version": "1", "replicas": [rep], "failures": 2})
    assert got.replicas[0].error is not None and len(got.replicas[0].error) == 300
    for bad in ({"replicas": [rep] * 101}, {"replicas": [rep, rep]},
                {"replicas": [{**rep, "state": "won"}]}, {"replicas": [{**rep, "agent_id": 3}]},
                {"replicas": "x"}, {"failures": -1}, {"update": {"state": "odd"}},
                {"failure": {"lines": "x"}}):
        try:
            check_outcome({**base, **bad})
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    agents = {"ag-1": {"node_size": "standard"}}
    assert foreign_replicas(got, agents) == []
    assert foreign_replicas(got, {}) == ["ag-1"]
    assert foreign_replicas(got, {"ag-1": {"node_size": "llm"}}) == ["ag-1"]  # a size lie
    shown = shown_replicas(got, {"1": "h1"})
    assert shown[0]["state"] == "running" and shown[0]["compose_hash"] == "h1"
    wrong = shown_replicas(got, {"1": "h2"})
    assert wrong[0]["state"] == "failed" and "COMPOSE_HASH_MISMATCH" in wrong[0]["error"]
    other = Outcome("d", "running", {}, 1, None, "9", (ReportedReplica("ag-1", "running", "9",
                                                                       "h1"),))
    assert shown_replicas(other, {"1": "h1"})[0]["state"] == "failed"  # not the intent's
    pending = Outcome("d", "placed", {}, 0, None, "1", (ReportedReplica("ag-1", "pending",
                                                                        "1"),))
    assert shown_replicas(pending, {"1": "h1"})[0]["state"] == "pending"  # no hash yet


def test_updated_intent() -> None:
    v1 = {"version": "1", "compose_hash": "h1"}
    v2 = {"version": "2", "compose_hash": "h2"}
    doc = intent("a.web", v1, 1, Constraints(), A, created_at=100.0)
    assert updated_intent(doc, v1, None, "update", 200.0) == "unchanged"
    new = updated_intent(doc, v2, None, "update", 200.0)
    assert isinstance(new, dict)
    assert (new["version"], new["previous_version"], new["generation"], new["moved"]) == (
        v2, "1", 1, True)
    assert new["history"] == [{"version": "1", "from": 100.0, "to": 200.0},
                              {"version": "2", "from": 200.0, "to": None}]
    assert intent_hashes(new) == {"1": "h1", "2": "h2"}  # old replicas run h1 meanwhile
    more = updated_intent(new, None, 3, "update", 300.0)
    assert isinstance(more, dict) and more["replicas"] == 3 and not more["moved"]
    assert more["history"] == new["history"] and more["generation"] == 2
    assert updated_intent({**doc, "desired": "stopped"}, v2, None, "update", 1.0) == "stopped"


# ---- a master in this process, a real dc process ----------------------------------------

@asynccontextmanager
async def master_here(data_dir: Path, fed_port: int) -> AsyncIterator[ControlPlane]:
    config = CpConfig(data_dir=data_dir, dev=True, listen="127.0.0.1:0",
                      agent_listen="127.0.0.1:0", role="master",
                      federation_listen=f"127.0.0.1:{fed_port}",
                      quorum=Quorum(settle_timeout_s=1),
                      billing={"interval_s": 3600.0})  # the test ticks the meter
    async with cp_here(config) as cp:
        yield cp


async def _view(tenant: httpx.AsyncClient, dep_id: str) -> dict[str, Any]:
    r = await tenant.get(f"/api/v2/deployments/{dep_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def _running(tenant: httpx.AsyncClient, dep: str, version: str, n: int = 1
                   ) -> dict[str, Any] | None:
    """The view once *n* replicas of *version* run and any update is done."""
    v = await _view(tenant, dep)
    ok = v["state"] == "running" and v["version"] == version and len(
        [x for x in v["replicas"] if x["state"] == "running" and x["version"] == version]
    ) == n and len(v["replicas"]) == n and (v["update"] is None
                                             or v["update"]["state"] == "done")
    return v if ok else None


def _client(cp: ControlPlane, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}", timeout=60,
                             headers={"Authorization": f"Bearer {key}"})


async def test_dc_placed_deployment_shows_updates_rolls_back_and_is_billed(
        tmp_path: Path) -> None:
    from .fedkit import free_port

    fed_port = free_port()
    base = (int(time.time()) // 60 + 10) * 60  # the master's billing wall: a minute ahead
    offset = [0.0]
    home = tmp_path / "master"
    d: CpProc | None = None
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            try:
                async with master_here(home, fed_port) as m:
                    m.billing.deps = attrs.evolve(m.billing.deps,
                                                  wall=lambda: base + offset[0])
                    token = (home / "admin.token").read_text().strip()
                    async with _client(m, token) as admin:
                        d, key, dep, agents = await _first_master(
                            admin, m, tmp_path, nursery, offset)
                # The master restarts (it keeps no dc state on disk): the dc's resent
                # report shows the same replicas again.
                async with master_here(home, fed_port) as m, _client(m, key) as tenant:
                    view = await eventually(lambda: _running(tenant, dep, "1", 2),
                                            timeout=40, what="replicas after a restart")
                    assert sorted(x["agent_id"] for x in view["replicas"]) == agents
                    assert [e["version"] for e in view["history"]] == ["1", "2", "1"]
                    assert view["previous_version"] == "2"
                nursery.cancel_scope.cancel()
            finally:
                if d is not None:
                    await d.stop()


async def _first_master(admin: httpx.AsyncClient, m: ControlPlane, tmp_path: Path,
                        nursery: trio.Nursery, offset: list[float]
                        ) -> tuple[CpProc, str, str, list[str]]:
    http = f"http://127.0.0.1:{m.http_port}"
    r = await admin.post("/api/v2/federation/join-tokens", json={"datacenter": A})
    assert r.status_code == 201, r.text
    d = CpProc("dc-a", tmp_path / "dc-a", ["--role", "dc", "--upstream", http,
                                           "--datacenter", A])
    await d.start("--join-token", r.json()["token"])
    td = sim_td()
    sims = {}
    for i in range(2):
        ag = agent(d, f"dc-a-{i}", A, td)
        await nursery.start(ag.run_forever)
        sims[ag.vm_name] = ag

    async def ready() -> bool:
        r = await admin.get("/api/v2/datacenters")
        view = {x["label"]: x for x in r.json()["datacenters"]}
        return view.get(A, {}).get("agents", {}).get("online") == 2 \
            and not view[A]["degraded"]

    await eventually(ready, timeout=30, what="dc-a online at the master")
    dc_agents = {v["vm_name"]: v["agent_id"] for v in
                 (await d.get("/api/v2/agents"))["agents"]}
    r = await admin.post("/api/v2/accounts", json={"name": "tenant"})
    assert r.status_code == 201, r.text
    account, key = r.json()["account_id"], r.json()["api_key"]
    async with _client(m, key) as tenant:
        assert (await tenant.post("/api/v2/apps", json={"name": "web"})).status_code == 201
        hashes = {}
        for v, compose in (("1", COMPOSE), ("2", COMPOSE2)):
            r = await tenant.post("/api/v2/apps/web/versions", json={
                "version": v, "compose": compose, "expose_port": 80})
            assert r.status_code == 201, r.text
            hashes[v] = r.json()["compose_hash"]
        assert hashes["1"] != hashes["2"]

        # (1) Replicas visible at the master: the dc's agent, the version's hash.
        r = await tenant.post("/api/v2/apps/web/deployments",
                              json={"version": "1", "replicas": 1})
        assert r.status_code == 202, r.text
        dep = r.json()["deployment_id"]
        view = await eventually(lambda: _running(tenant, dep, "1"), timeout=40,
                                what="v1 running with its replica")
        [rep] = view["replicas"]
        host = next(n for n, ag in sims.items() if dep in ag.deployments)
        assert rep["agent_id"] == dc_agents[host]
        assert rep["compose_hash"] == hashes["1"] == view["compose_hash"]
        assert rep["node_size"] == "standard"
        assert view["created_at"] and view["failures"] == 0 and view["failure"] is None
        assert [e["version"] for e in view["history"]] == ["1"]
        assert view["federated"]["datacenter"] == A

        # (3) Billing at the master charges the tenant for that replica
        # (a standard node is 1 cent every 6 minutes at the default prices).
        for minute in range(9):
            offset[0] = minute * 60 + 5
            await m.billing.tick()
        usage = (await tenant.get("/api/v2/accounts/me/usage")).json()["usage"]
        assert sorted((u["deployment_id"], u["replica_id"]) for u in usage) == \
            [(dep, rep["agent_id"])] * 8  # windows 0..7, each once
        assert len({u["window_start"] for u in usage}) == 8
        await m.billing.tick()  # again in the same window: nothing more
        assert len((await tenant.get("/api/v2/accounts/me/usage")).json()["usage"]) == 8
        balance = (await tenant.get("/api/v2/accounts/me/balance")).json()
        assert balance["account_id"] == account and balance["balance_minor"] < 0

        # (2) PATCH to an unknown version: the direct refusal, nothing changes.
        r = await tenant.patch(f"/api/v2/deployments/{dep}", json={"version": "9"})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["details"] == {"field": "version"}
        assert (await _view(tenant, dep))["version"] == "1"
        # PATCH to version 2: the dc rolls it; the master shows it all.
        r = await tenant.patch(f"/api/v2/deployments/{dep}", json={"version": "2"})
        assert r.status_code == 202, r.text
        assert r.json()["version"] == "2" and r.json()["previous_version"] == "1"
        view = await eventually(lambda: _running(tenant, dep, "2"), timeout=60,
                                what="v2 rolled out at the dc")
        assert view["previous_version"] == "1"
        assert view["update"]["to_version"] == "2" and view["update"]["reason"] == "update"
        assert [e["version"] for e in view["history"]] == ["1", "2"]
        assert view["replicas"][0]["compose_hash"] == hashes["2"] == view["compose_hash"]
        # Rollback: back to 1, the same way.
        r = await tenant.post(f"/api/v2/deployments/{dep}/rollback")
        assert r.status_code == 202, r.text
        view = await eventually(lambda: _running(tenant, dep, "1"), timeout=60,
                                what="rolled back to v1 at the dc")
        assert view["previous_version"] == "2" and view["update"]["reason"] == "rollback"
        assert [e["version"] for e in view["history"]] == ["1", "2", "1"]
        # Replicas: 2, on both of the dc's agents.
        r = await tenant.patch(f"/api/v2/deployments/{dep}", json={"replicas": 2})
        assert r.status_code == 202, r.text
        view = await eventually(lambda: _running(tenant, dep, "1", 2), timeout=60,
                                what="two replicas at the dc")
        agents = sorted(x["agent_id"] for x in view["replicas"])
        assert agents == sorted(dc_agents.values())
    return d, key, dep, agents


# ---- a forged report, against a real master process -----------------------------------------

async def test_forged_replica_report_refused_and_nothing_applied(tmp_path: Path) -> None:
    m = master(tmp_path)
    home = tmp_path / "rogue"
    with trio.fail_after(90):
        await m.start()
        tenant = None
        try:
            await _enroll(m, home)
            async with event_log(m) as seen, link(home) as (send, recv):
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert (await recv())["type"] == "ack"
                # Its own agent, free (its full picture): the master places a tenant
                # deployment here.
                resync = _events((1, {"ag-own": _agent()}))
                resync["events"][0]["kind"] = "resync"
                await send(resync)
                assert (await recv()) == {"type": "ack", "upto": 1}
                async with m.client() as admin:
                    r = await admin.post("/api/v2/accounts", json={"name": "t"})
                    key = r.json()["api_key"]
                tenant = httpx.AsyncClient(base_url=m.http, timeout=30,
                                           headers={"Authorization": f"Bearer {key}"})
                assert (await tenant.post("/api/v2/apps", json={"name": "web"})
                        ).status_code == 201
                r = await tenant.post("/api/v2/apps/web/versions", json={
                    "version": "1", "compose": COMPOSE, "expose_port": 80})
                good_hash = r.json()["compose_hash"]
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                dep = r.json()["deployment_id"]

                def report(seq: int, agent_id: str, compose_hash: str,
                           dep_id: str = dep) -> dict[str, Any]:
                    replica = {"agent_id": agent_id, "state": "running", "version": "1",
                               "compose_hash": compose_hash, "vm_name": "vm",
                               "node_size": "standard", "error": None}
                    data = {"deployment_id": dep_id, "outcome": "running", "reasons": {},
                            "running": 1, "error": None, "version": "1",
                            "replicas": [replica], "failure": None, "failures": 0,
                            "update": None, "generation": 0}
                    return {"type": "events", "dc": LABEL, "spool_depth": 0,
                            "snapshot_version": 0, "sent_at": 0.0, "last_seq": seq,
                            "events": [{"seq": seq, "kind": "placement", "at": 0.0,
                                        "data": data}]}

                # A replica on an agent this dc never reported (another dc's): refused.
                await send(report(2, "ag-of-another-dc", good_hash))
                with trio.fail_after(10):
                    answers = [await recv(), await recv()]
                assert answers[0]["code"] == FOREIGN_AGENTS, answers
                assert answers[1] == {"type": "ack", "upto": 2}
                # A report on a deployment the master did not place here: refused.
                await send(report(3, "ag-own", good_hash, dep_id="dep-not-an-intent"))
                with trio.fail_after(10):
                    answers = [await recv(), await recv()]
                assert answers[0]["code"] == "foreign_deployment", answers
                await trio.sleep(0.3)
                assert len(refused(seen, FOREIGN_AGENTS)) == 1
                view = (await tenant.get(f"/api/v2/deployments/{dep}")).json()
                assert view["replicas"] == [] and view["state"] != "running"
                assert view["federated"]["outcome"] is None  # nothing applied
                # Its own agent with another compose hash: shown failed, never running.
                await send(report(4, "ag-own", "f" * 64))
                assert (await recv()) == {"type": "ack", "upto": 4}

                async def shown() -> dict[str, Any] | None:
                    v: dict[str, Any] = (await tenant.get(f"/api/v2/deployments/{dep}")).json()
                    return v if v["replicas"] else None

                view = await eventually(shown, timeout=10, what="the wrong-hash replica")
                assert view["replicas"][0]["state"] == "failed"
                assert "COMPOSE_HASH_MISMATCH" in view["replicas"][0]["error"]
                assert view["state"] != "running" and view["federated"]["running"] == 0
                # The control: its own agent with the intent's hash counts.
                await send(report(5, "ag-own", good_hash))
                assert (await recv()) == {"type": "ack", "upto": 5}

                async def counted() -> dict[str, Any] | None:
                    v: dict[str, Any] = (await tenant.get(f"/api/v2/deployments/{dep}")).json()
                    return v if v["state"] == "running" else None

                view = await eventually(counted, timeout=10, what="the good report")
                assert [x["agent_id"] for x in view["replicas"]] == ["ag-own"]
                # A report ahead of the dc's word on its agent (the outbox is behind):
                # refused, held, and applied once the dc reports that agent as its own.
                await send(report(6, "ag-late", good_hash))
                with trio.fail_after(10):
                    assert (await recv())["code"] == FOREIGN_AGENTS
                    assert (await recv()) == {"type": "ack", "upto": 6}
                assert [x["agent_id"] for x in (await _view(tenant, dep))["replicas"]] == \
                    ["ag-own"]
                await send(_events((7, {"ag-late": _agent()})))
                with trio.fail_after(10):
                    assert (await recv()) == {"type": "ack", "upto": 7}

                async def late() -> bool:
                    v = await _view(tenant, dep)
                    return [x["agent_id"] for x in v["replicas"]] == ["ag-late"]

                await eventually(late, timeout=10, what="the held report applied")
        finally:
            if tenant is not None:
                await tenant.aclose()
            await m.stop()
