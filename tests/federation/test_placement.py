"""Placement across levels with real processes: the master has no direct agents, so a
tenant's deployment goes to a dc CP in the signed snapshot, runs on that dc's sim agent
and its outcome comes back; a dc killed -9 gets no new deployment once degraded; an
unsatisfiable placement reaches the tenant with today's reason codes. Plus the refusals:
an intent in a tampered snapshot never runs, a dc reporting on a deployment it was not
given is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from ee.actors.directory import AgentDirectory
from ee.federation.dc import DcFederation
from ee.federation.master import FederationSettings
from ee.federation.placement import (
    Datacenter,
    DcCapacity,
    Unsatisfiable,
    check_outcome,
    choose_target,
)
from ee.federation.reconcile import LocalApps, read_intent
from ee.federation.wire import Snapshot, seal
from ee.placement import Constraints, Request
from ee.protocol.signing import generate_signing_key
from ee.runtime import ActorError, Registry

from .fedkit import CpProc, agent, dc, event_log, eventually, join_token, master, refused, sim_td
from .test_refusals import LABEL, enrolled_home, link, rogue_master

A, B = "sim:dc-a", "sim:dc-b"
COMPOSE = "services:\n  web:\n    image: nginx\n"


# ---- the pure decision ----------------------------------------------------------------

def test_choose_target() -> None:
    req = Request(deployment_id=None, replicas=2)
    a = DcCapacity(A, False, {"standard": 3})
    b = DcCapacity(B, False, {"standard": 2, "large": 1})
    assert choose_target(req, [b, a]) == Datacenter(A)  # the most free agents
    assert choose_target(req, [a, b], frozenset({A})) == Datacenter(B)  # A said no
    degraded = DcCapacity(A, True, {"standard": 3})
    assert choose_target(req, [degraded, b]) == Datacenter(B)
    big = Request(deployment_id=None, replicas=2, constraints=Constraints(node_size="large"))
    assert choose_target(big, [degraded, b]) == Unsatisfiable(
        {A: "DATACENTER_DEGRADED", B: "NO_CAPACITY"})
    pinned = Request(deployment_id=None, replicas=1, constraints=Constraints(datacenter=B))
    assert choose_target(pinned, [a, b]) == Datacenter(B)
    assert choose_target(pinned, [a]) == Unsatisfiable({A: "DATACENTER_NOT_ALLOWED"})


def test_intent_and_outcome_checks() -> None:
    version = {"version": "1", "compose_hash": "ab", "compose": COMPOSE, "expose_port": 80,
               "health_path": "/"}
    ok = {"app": "acct.web", "datacenter": A, "replicas": 1, "desired": "running",
          "version": version, "constraints": {}}
    got = read_intent("dep-1", ok, A)
    assert got is not None and got.constraints.datacenter == A and got.running
    assert read_intent("dep-1", ok, B) is None  # another dc's
    for bad in ({**ok, "replicas": 0}, {**ok, "version": {}}, {**ok, "constraints": {"x": 1}},
                {**ok, "app": 3}, {**ok, "version": {**version, "expose_port": "80"}}):
        try:
            read_intent("dep-1", bad, A)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    for data in ({"deployment_id": "d", "outcome": "won", "reasons": {}, "running": 0},
                 {"deployment_id": "d", "outcome": "running", "reasons": [], "running": 0},
                 {"deployment_id": "d", "outcome": "running", "reasons": {}, "running": -1}):
        try:
            check_outcome(data)
        except ValueError:
            continue
        raise AssertionError(f"accepted {data}")


# ---- real processes ---------------------------------------------------------------------

async def _tenant(m: CpProc) -> httpx.AsyncClient:
    async with m.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "tenant"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    tenant = httpx.AsyncClient(base_url=m.http, timeout=30,
                               headers={"Authorization": f"Bearer {key}"})
    r = await tenant.post("/api/v2/apps", json={"name": "web"})
    assert r.status_code == 201, r.text
    r = await tenant.post("/api/v2/apps/web/versions", json={
        "version": "1", "compose": COMPOSE, "expose_port": 80})
    assert r.status_code == 201, r.text
    return tenant


async def _state(tenant: httpx.AsyncClient, dep_id: str, state: str
                 ) -> dict[str, Any] | None:
    r = await tenant.get(f"/api/v2/deployments/{dep_id}")
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view if view["state"] == state else None


async def test_master_places_in_dc_reroutes_and_reports(tmp_path: Path) -> None:
    silence = 3.0
    m = master(tmp_path, "--degraded-after-s", str(silence))
    a = dc(tmp_path, m, A, "dc-a")
    b = dc(tmp_path, m, B, "dc-b")
    with trio.fail_after(180):
        await m.start()
        td = sim_td()
        tenant = None
        try:
            await a.start("--join-token", await join_token(m, A))
            await b.start("--join-token", await join_token(m, B))
            async with trio.open_nursery() as nursery:
                sims = {}
                for cp, label, n in ((a, A, 2), (b, B, 1)):
                    for i in range(n):
                        ag = agent(cp, f"{cp.name}-{i}", label, td)
                        await nursery.start(ag.run_forever)
                        sims[ag.vm_name] = ag

                async def ready() -> bool:
                    view = await m.datacenters()
                    return all(view.get(lb, {}).get("agents", {}).get("online") == n
                               and not view[lb]["degraded"] for lb, n in ((A, 2), (B, 1)))

                await eventually(ready, what="both dcs online at the master")
                tenant = await _tenant(m)

                # (1) No direct agent: the deployment goes to dc-a (most free agents) and
                # runs on one of its sim agents; the master's view says running.
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                first = r.json()["deployment_id"]
                view = await eventually(lambda: _state(tenant, first, "running"),
                                        timeout=30, what="first deployment running")
                assert view["federated"]["datacenter"] == A
                assert view["federated"]["running"] == 1
                hosts = [n for n, ag in sims.items() if first in ag.deployments]
                assert len(hosts) == 1 and hosts[0].startswith("dc-a-")
                listed = (await tenant.get("/api/v2/deployments")).json()["deployments"]
                assert [d["deployment_id"] for d in listed] == [first]

                # (3) Unsatisfiable in every dc (no GPU anywhere): dc-a says so, the
                # master tries dc-b, which says so too; the tenant reads the codes.
                r = await tenant.post("/api/v2/apps/web/deployments", json={
                    "version": "1", "replicas": 1, "constraints": {"gpu": True}})
                assert r.status_code == 202, r.text
                gpu = r.json()["deployment_id"]
                view = await eventually(lambda: _state(tenant, gpu, "failed"), timeout=30,
                                        what="gpu deployment failed")
                assert view["federated"]["tried"] == [A, B]
                # (dc-a's second agent runs the first deployment: BUSY too)
                assert view["federated"]["reasons"] == {A: {"NO_GPU": 2, "BUSY": 1},
                                                        B: {"NO_GPU": 1}}
                assert view["error"] == ("cannot place in any datacenter: "
                                         f"{A}: NO_GPU: 2, BUSY: 1; {B}: NO_GPU: 1")
                assert not any(gpu in ag.deployments for ag in sims.values())
                # Beyond every dc's capacity: refused at once, with per-dc codes.
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 5})
                assert r.status_code == 409, r.text
                err = r.json()["error"]
                assert err["code"] == "not_placeable"
                assert err["details"]["datacenters"] == {A: "NO_CAPACITY", B: "NO_CAPACITY"}

                # (2) dc-a killed -9: once degraded, a new deployment goes to dc-b; the
                # one placed in dc-a keeps its intent (nothing hard-stopped).
                a.kill9()
                await a.wait()

                async def degraded() -> bool:
                    return bool((await m.datacenters())[A]["degraded"])

                await eventually(degraded, timeout=silence + 10, what="dc-a degraded")
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                second = r.json()["deployment_id"]
                view = await eventually(lambda: _state(tenant, second, "running"),
                                        timeout=30, what="second deployment running")
                assert view["federated"]["datacenter"] == B
                assert second in sims["dc-b-0"].deployments
                kept = (await tenant.get(f"/api/v2/deployments/{first}")).json()
                assert kept["federated"]["datacenter"] == A and kept["desired"] == "running"
                # Each dc was sent only its own intents (what dc-b stored, as signed).
                import sqlite3
                with sqlite3.connect(b.data_dir / "federation" / "spool.sqlite3") as db:
                    [(text,)] = db.execute("SELECT value FROM meta WHERE key='snapshot'")
                sent_b = json.loads(text)["body"]["desired"]["deployments"]
                assert second in sent_b and first not in sent_b
                assert all(doc["datacenter"] == B for doc in sent_b.values())

                # Stop goes down the same way: dc-b stops its local deployment.
                r = await tenant.delete(f"/api/v2/deployments/{second}")
                assert r.status_code == 202, r.text
                await eventually(lambda: _state(tenant, second, "stopped"), timeout=30,
                                 what="second deployment stopped")
                assert second not in sims["dc-b-0"].deployments

                async def slimmed() -> bool:  # stopped there: the workload leaves the
                    async with m.client() as admin:  # signed desired state
                        snap = (await admin.get("/api/v2/federation/snapshot")).json()
                    return snap["body"]["desired"]["deployments"][second]["version"][
                        "compose"] == ""

                await eventually(slimmed, timeout=30, what="stopped intent slimmed")

                # A restarted master rebuilds the view from its signed desired state and
                # the dcs' outcomes (resent on every reconnection).
                await m.stop()
                await m.start()
                view = await eventually(lambda: _state(tenant, gpu, "failed"), timeout=30,
                                        what="unplaced deployment after the restart")
                assert view["federated"]["tried"] == [A, B]
                await eventually(lambda: _state(tenant, second, "stopped"), timeout=30,
                                 what="stopped deployment after the restart")
                nursery.cancel_scope.cancel()
        finally:
            if tenant is not None:
                await tenant.aclose()
            for cp in (a, b, m):
                await cp.stop()


async def test_dc_placement_report_for_foreign_deployment_refused(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with rogue_master(tmp_path) as (m, home):
            async with event_log(m) as seen, link(home) as (send, recv):
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert (await recv())["type"] == "ack"
                outcome = {"deployment_id": "dep-not-yours", "outcome": "running",
                           "reasons": {}, "running": 1, "error": None}
                await send({"type": "events", "dc": LABEL, "spool_depth": 0,
                            "snapshot_version": 0, "sent_at": 0.0, "last_seq": 2,
                            "events": [{"seq": 1, "kind": "placement", "at": 0.0,
                                        "data": outcome},
                                       {"seq": 2, "kind": "placement", "at": 0.0,
                                        "data": {**outcome, "outcome": "won"}}]})
                with trio.fail_after(10):
                    answers = [await recv() for _ in range(3)]
                assert [x.get("code") for x in answers[:2]] == ["foreign_deployment",
                                                               "bad_frame"]
                assert answers[2] == {"type": "ack", "upto": 2}
                await trio.sleep(0.3)
                assert len(refused(seen, "foreign_deployment")) == 1
            placements = [e for e in seen if e.get("kind") == "federation.placement"]
            assert placements == []


async def test_dc_runs_only_intents_of_a_verified_snapshot(tmp_path: Path) -> None:
    home, master_key = await enrolled_home(tmp_path)
    created: list[str] = []

    async def create_app(key: str, _spec: dict[str, Any]) -> dict[str, Any] | None:
        created.append(key)
        return None

    events: list[tuple[str, str, Any]] = []
    fed = DcFederation(home, LABEL, FederationSettings(), directory=AgentDirectory(),
                       emit=lambda k, s, d: events.append((k, s, d)),
                       metrics=CollectorRegistry(),
                       local=LocalApps(create_app, Registry(), {}))
    assert fed.reconciler is not None
    intent = {"app": "victim.web", "datacenter": LABEL, "replicas": 1, "desired": "running",
              "version": {"version": "1", "compose_hash": "ab", "compose": COMPOSE,
                          "expose_port": 80, "health_path": "/"},
              "constraints": {}}

    def snap(version: int, key: Any = master_key) -> str:
        return seal(Snapshot("snapshot", version, 0.0, {"policy": {}, "deployments": {}}),
                    key)

    try:
        assert await fed.offer_snapshot(snap(1)) is None
        # The master's signed snapshot, an intent slipped in: the signature breaks.
        tampered = snap(2).replace('"deployments":{}', '"deployments":{"dep-x":'
                                   + json.dumps(intent, separators=(",", ":"))
                                   + "}")
        assert "dep-x" in tampered
        # Signed by a key that is not the pinned master's.
        forged = seal(Snapshot("snapshot", 3, 0.0, {"deployments": {"dep-x": intent}}),
                      generate_signing_key())
        for text in (tampered, forged):
            answer = await fed.offer_snapshot(text)
            assert answer is not None and answer.code == "bad_signature"
        assert fed.snapshot.version == 1 and fed.snapshot.desired["deployments"] == {}
        await fed.reconciler.pass_once(fed.snapshot.desired)
        assert created == []
        codes = [d["code"] for k, _, d in events if k == "federation.refused"]
        assert codes == ["bad_signature", "bad_signature"]
        # Signed but malformed (no replicas): refused with a reason code, nothing run.
        broken = {k: v for k, v in intent.items() if k != "replicas"}
        assert await fed.offer_snapshot(seal(Snapshot(
            "snapshot", 4, 0.0, {"deployments": {"dep-x": broken}}), master_key)) is None
        await fed.reconciler.pass_once(fed.snapshot.desired)
        assert created == []
        codes = [d["code"] for k, _, d in events if k == "federation.refused"]
        assert codes == ["bad_signature", "bad_signature", "intent_refused"]
        # The control: the same intent in a snapshot the master signed does run.
        good = seal(Snapshot("snapshot", 5, 0.0, {"deployments": {"dep-x": intent}}),
                    master_key)
        assert await fed.offer_snapshot(good) is None
        with pytest.raises(ActorError):  # no app actor behind this stand-in: it stops there
            await fed.reconciler.pass_once(fed.snapshot.desired)
        assert created == ["federated.victim.web"]
    finally:
        fed.close()
