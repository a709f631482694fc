"""The dev-only chaos route that makes a CP answer 500 (rollout drills): admin only,
refused outside --dev, bounded input."""

from __future__ import annotations

from pathlib import Path

import trio
from cpkit import running_cp
from test_production import production_cp

from ee.attestation.providers.sim import SimTD


async def test_chaos_errors_on_a_dev_cp(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as cp:
            async with cp.client(token=None) as anon:
                r = await anon.post("/api/v2/admin/chaos/errors", json={"rate": 1.0})
                assert r.status_code == 401
            async with cp.client() as admin:
                for bad in ({"rate": 2}, {"rate": -0.1}, {"rate": "all"}, {}):
                    r = await admin.post("/api/v2/admin/chaos/errors", json=bad)
                    assert r.status_code == 400, (bad, r.text)
                r = await admin.post("/api/v2/admin/chaos/errors", json={"rate": 1.0})
                assert r.status_code == 200 and r.json() == {"rate": 1.0}
                r = await admin.get("/api/v2/health")
                assert r.status_code == 500 and r.json()["error"]["code"] == "chaos"
                # the guard's view of the 5xx stays readable
                assert (await admin.get("/metrics")).status_code == 200
                r = await admin.post("/api/v2/admin/chaos/errors", json={"rate": 0})
                assert r.status_code == 200
                assert (await admin.get("/api/v2/health")).status_code == 200


async def test_chaos_errors_are_refused_outside_dev(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with production_cp(tmp_path, SimTD.create()) as prod, \
                prod.client() as admin:
            r = await admin.post("/api/v2/admin/chaos/errors", json={"rate": 1.0})
            assert r.status_code == 403 and r.json()["error"]["code"] == "dev_only"
            for _ in range(5):
                assert (await admin.get("/api/v2/health")).status_code == 200
