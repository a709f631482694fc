"""Preflight at a master says what a deployment would do: go to a federated datacenter
(``placeable``, ``datacenter``) or why no dc takes it (``datacenters``: each dc's code),
not only the direct agents' verdicts (it said ``placeable: no`` where a deploy then ran
in a dc)."""

from __future__ import annotations

from pathlib import Path

import trio

from .fedkit import agent, dc, eventually, join_token, master, sim_td
from .test_placement import _tenant

A = "sim:dc-a"


async def test_preflight_at_the_master_counts_the_datacenters(tmp_path: Path) -> None:
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    with trio.fail_after(120):
        await m.start()
        tenant = None
        try:
            await a.start("--join-token", await join_token(m, A))
            async with trio.open_nursery() as nursery:
                await nursery.start(agent(a, "dc-a-0", A, sim_td()).run_forever)

                async def online() -> bool:
                    view = await m.datacenters()
                    return view.get(A, {}).get("agents", {}).get("online") == 1

                await eventually(online, what="dc-a's agent online at the master")
                tenant = await _tenant(m)

                async def preflight(body: dict[str, object]) -> dict[str, object]:
                    assert tenant is not None
                    r = await tenant.post("/api/v2/apps/web/preflight", json=body)
                    assert r.status_code == 200, r.text
                    answer: dict[str, object] = r.json()
                    return answer

                fits = await preflight({"version": "1", "replicas": 1})
                assert fits["placeable"] is True and fits["datacenter"] == A
                too_many = await preflight({"version": "1", "replicas": 5})
                assert too_many["placeable"] is False
                assert too_many["datacenters"] == {A: "NO_CAPACITY"}
                elsewhere = await preflight({"version": "1", "replicas": 1,
                                             "constraints": {"datacenter": "sim:dc-z"}})
                assert elsewhere["placeable"] is False
                assert elsewhere["datacenters"] == {A: "DATACENTER_NOT_ALLOWED"}
                # and a deploy does what the preflight said
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                nursery.cancel_scope.cancel()
        finally:
            if tenant is not None:
                await tenant.aclose()
            await a.stop()
            await m.stop()
