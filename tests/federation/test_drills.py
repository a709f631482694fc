"""Outage drills with real processes: master kill -9 (the dc spools, the master returns
with its records deleted and converges, each event applied exactly once), dc kill -9
(degraded within the configured silence, resync on return)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from .fedkit import CpProc, agent, dc, eventually, join_token, master, sim_td
from .fedkit import counts as _counts

A, B = "sim:dc-a", "sim:dc-b"


async def _deploy(cp: CpProc, replicas: int) -> str:
    """A tenant account, app and version on *cp*, deployed with *replicas*."""
    async with cp.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "tenant"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    async with httpx.AsyncClient(base_url=cp.http, timeout=10,
                                 headers={"Authorization": f"Bearer {key}"}) as tenant:
        r = await tenant.post("/api/v2/apps", json={"name": "web"})
        assert r.status_code == 201, r.text
        r = await tenant.post("/api/v2/apps/web/versions", json={
            "version": "1", "compose": "services:\n  web:\n    image: nginx\n",
            "expose_port": 80})
        assert r.status_code == 201, r.text
        r = await tenant.post("/api/v2/apps/web/deployments",
                              json={"version": "1", "replicas": replicas})
        assert r.status_code == 202, r.text
        return str(r.json()["deployment_id"])


async def _agrees(m: CpProc, *dcs: tuple[CpProc, str]) -> dict[str, Any] | None:
    try:
        view = await m.datacenters()
    except Exception:
        return None
    for cp, label in dcs:
        truth = _counts((await cp.get("/api/v2/agents"))["agents"])
        got = view.get(label)
        if got is None or got["degraded"] or got["spool_depth"] != 0 \
                or {k: got["agents"][k] for k in truth} != truth:
            return None
    return view


async def test_master_kill9_dc_spools_master_returns_without_records(tmp_path: Path) -> None:
    m = master(tmp_path, "--degraded-after-s", "3")
    a = dc(tmp_path, m, A, "dc-a")
    with trio.fail_after(150):
        await m.start()
        td = sim_td()
        try:
            await a.start("--join-token", await join_token(m, A))
            async with trio.open_nursery() as nursery:
                scopes = []
                for i in range(4):
                    ag = agent(a, f"a-{i}", A, td)
                    scope = trio.CancelScope()
                    scopes.append(scope)

                    async def run(ag: Any = ag, scope: trio.CancelScope = scope,
                                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
                                  ) -> None:
                        with scope:
                            await ag.run_forever(task_status=task_status)

                    await nursery.start(run)
                await eventually(lambda: _agrees(m, (a, A)), what="first convergence")

                m.kill9()
                await m.wait()
                # Master away: the dc keeps admitting agents and spooling their changes.
                for i in range(4, 7):
                    await nursery.start(agent(a, f"a-{i}", A, td).run_forever)
                scopes[0].cancel()
                # ... and keeps reconciling: a tenant deploys on the dc while the master is
                # away; its execution state reaches the master once it is back.
                await _deploy(a, replicas=2)

                async def spooled() -> dict[str, Any] | None:
                    st = await a.get("/api/v2/federation/status")
                    truth = _counts((await a.get("/api/v2/agents"))["agents"])
                    ok = not st["connected"] and st["spool_depth"] >= 2 \
                        and truth["online"] == 6
                    return st if ok else None

                await eventually(spooled, what="dc spooling while the master is down")
                # kill -9 the dc too: its spool survives, its agents come back to it.
                a.kill9()
                await a.wait()
                await a.start()
                before = await eventually(spooled, what="spool kept across kill -9")
                acked_before = before["acked_seq"]

                # The master returns with its records deleted.
                for f in ("records.sqlite3", "records.sqlite3-wal", "records.sqlite3-shm",
                          "checkpoint.json", "checkpoint.json.sig"):
                    (m.data_dir / f).unlink(missing_ok=True)
                await m.start()
                async def converged() -> dict[str, Any] | None:
                    view = await _agrees(m, (a, A))
                    return view if view and view[A]["deployment_states"] == {"running": 2} \
                        else None

                view = await eventually(converged, timeout=40,
                                        what="convergence after the master's return")
                st = await a.get("/api/v2/federation/status")
                got = view[A]
                assert got["agents"]["online"] == 6
                assert got["deployment_states"] == {"running": 2}
                # Exactly once: this master applied each spooled sequence once, in order.
                assert got["replayed"] == 0 and got["gaps"] == 0 and got["refused"] == 0
                applied = got["applied_seq"]
                assert applied == st["last_seq"] and st["spool_depth"] == 0
                assert got["events_applied"] == applied - acked_before
                nursery.cancel_scope.cancel()
        finally:
            for cp in (a, m):
                await cp.stop()


async def test_dc_kill9_degraded_then_resync(tmp_path: Path) -> None:
    silence = 3.0
    m = master(tmp_path, "--degraded-after-s", str(silence))
    a = dc(tmp_path, m, A, "dc-a")
    b = dc(tmp_path, m, B, "dc-b")
    with trio.fail_after(150):
        await m.start()
        td = sim_td()
        try:
            await a.start("--join-token", await join_token(m, A))
            await b.start("--join-token", await join_token(m, B))
            async with trio.open_nursery() as nursery:
                for cp, label, n in ((a, A, 3), (b, B, 2)):
                    for i in range(n):
                        await nursery.start(agent(cp, f"{cp.name}-{i}", label, td).run_forever)
                await eventually(lambda: _agrees(m, (a, A), (b, B)), what="convergence")

                a.kill9()
                await a.wait()
                killed = trio.current_time()

                async def degraded() -> dict[str, Any] | None:
                    view = await m.datacenters()
                    return view if view[A]["degraded"] else None

                view = await eventually(degraded, timeout=silence + 5, what="dc-a degraded")
                took = trio.current_time() - killed
                assert took >= silence - 0.5, took  # not before the configured silence
                assert not view[B]["degraded"] and view[B]["agents"]["online"] == 2
                assert view[A]["sync_lag_s"] >= silence - 0.5
                # The master keeps the last picture of dc-a (workloads are not stopped).
                assert view[A]["agents"]["total"] == 3

                await a.start()  # same data dir: enrolled already, spool intact
                async def resynced() -> dict[str, Any] | None:
                    # agreement alone can be reached before dc-a's agents are back (0 == 0)
                    view = await _agrees(m, (a, A), (b, B))
                    return view if view and view[A]["agents"]["online"] == 3 else None

                view = await eventually(resynced, timeout=40, what="resync after dc-a's return")
                assert view[A]["agents"]["online"] == 3 and not view[A]["degraded"]
                nursery.cancel_scope.cancel()
        finally:
            for cp in (a, b, m):
                await cp.stop()
