"""Trust and policy down a real federation (master and dc CP processes, sim agents): a
release admitted at the master is admitted at the dc (its agents are judged by it) only
when the dc's own bundle pins the key that signed it; withdrawn at the master, it leaves
the dc, never a release the dc's operator admitted there; the desired policy is strictly
checked, and ``accept_deployments: false`` makes the dc refuse new deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.cp.bootstrap import BUNDLE, CP_KEY, create_dev, release_key_entry
from ee.protocol.signing import (
    generate_signing_key,
    load_private_key,
    read_signed,
    write_signed,
)

from .fedkit import CpProc, agent, dc, event_log, eventually, join_token, master, refused, sim_td
from .test_fedtrust import body, manifest
from .test_placement import _state, _tenant

A = "sim:dc-a"
R1, R2 = "a1" * 48, "b2" * 48


def pin_release_keys(data_dir: Path, keys: list[tuple[str, Ed25519PrivateKey]]) -> None:
    """A dev CP's bundle that pins *keys* as release keys (re-signed with its CP key)."""
    create_dev(data_dir)
    cp_key = load_private_key(data_dir / CP_KEY)
    doc = read_signed(data_dir / BUNDLE, cp_key.public_key())
    doc["trust"]["release_keys"] = [release_key_entry(n, k.public_key()) for n, k in keys]
    write_signed(data_dir / BUNDLE, doc, cp_key)


async def listed(cp: CpProc) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in (await cp.get("/api/v2/admin/releases"))["releases"]}


async def test_releases_and_policy_reach_the_dc(tmp_path: Path) -> None:
    rel, rogue = generate_signing_key(), generate_signing_key()
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    pin_release_keys(m.data_dir, [("rel", rel), ("rogue", rogue)])
    pin_release_keys(a.data_dir, [("rel", rel)])  # the dc does not pin "rogue"
    td = sim_td()
    old_image = td.evolve(rtmrs=(b"\x00" * 48, b"\x01" * 48, b"\x02" * 48, b"\x00" * 48))
    new_image = td.evolve(rtmrs=(b"\x00" * 48, bytes.fromhex(R1), bytes.fromhex(R2),
                                 b"\x00" * 48))
    tenant: httpx.AsyncClient | None = None
    with trio.fail_after(150):
        await m.start()
        try:
            await a.start("--join-token", await join_token(m, A))
            async with trio.open_nursery() as nursery, m.client() as mc, a.client() as ac:
                before = agent(a, "old-1", A, old_image)
                await nursery.start(before.run)
                assert before.registered is not None, before.rejected

                async with event_log(a) as seen:
                    # (1) Admitted at the master: carried down, admitted at the dc.
                    r = await mc.post("/api/v2/admin/releases", json=body(manifest(R1), rel))
                    assert r.status_code == 201, r.text
                    good = r.json()["release"]["id"]
                    await eventually(lambda: _has(a, good), what="release admitted at dc")
                    # The dc's policy now pins the node size to the released image.
                    old = agent(a, "old-2", A, old_image)
                    await nursery.start(old.run)
                    assert old.registered is None and old.rejected is not None
                    new = agent(a, "new-1", A, new_image)
                    await nursery.start(new.run_forever)
                    assert new.registered is not None, new.rejected

                    # (2) Signed by a key the master pins and the dc does not: refused
                    # there (an event), the rest of the snapshot still applied.
                    r = await mc.post("/api/v2/admin/releases",
                                      json=body(manifest("dd" * 48), rogue))
                    assert r.status_code == 201, r.text
                    untrusted = r.json()["release"]["id"]
                    version = (await m.get("/api/v2/federation/status"))["snapshot_version"]

                    async def applied() -> bool:
                        st = await a.get("/api/v2/federation/status")
                        return bool(st["snapshot_version"] == version)

                    await eventually(applied, what="the snapshot applied at the dc")
                    assert refused(seen, "release_untrusted"), seen
                    assert untrusted not in await listed(a)

                # (3) The dc's operator admits one of its own (a key it pins).
                r = await ac.post("/api/v2/admin/releases", json=body(manifest("c1" * 48), rel))
                assert r.status_code == 201, r.text
                local = r.json()["release"]["id"]
                # The master carries it too, then withdraws both: the dc drops only the
                # one it got from the master.
                r = await mc.post("/api/v2/admin/releases", json=body(manifest("c1" * 48), rel))
                assert r.status_code == 201 and r.json()["release"]["id"] == local
                for ident in (good, local):
                    r = await mc.delete(f"/api/v2/admin/releases/{ident}")
                    assert r.status_code == 200, r.text

                async def withdrawn() -> bool:
                    return set(await listed(a)) == {local}

                await eventually(withdrawn, what="the master's release withdrawn at the dc")
                snap = await m.get("/api/v2/federation/snapshot")
                assert [b["manifest"]["image"]["measurements"]["rtmr1"]
                        for b in snap["body"]["desired"]["releases"]] == ["dd" * 48]

                # (4) The policy: strictly checked, and applied at the dc.
                for doc, field in (({"policy": {"max_replicas": 3}}, "policy.max_replicas"),
                                   ({}, "policy"),
                                   ({"policy": {"accept_deployments": "no"}},
                                    "policy.accept_deployments")):
                    r = await mc.put("/api/v2/federation/desired", json=doc)
                    assert r.status_code == 400, r.text
                    err = r.json()["error"]
                    assert err["code"] == "bad_policy" and err["details"]["field"] == field
                r = await mc.put("/api/v2/federation/desired",
                                 json={"policy": {"accept_deployments": False}})
                assert r.status_code == 200, r.text
                assert r.json()["policy"] == {"accept_deployments": False}

                async def closed() -> bool:
                    st = await a.get("/api/v2/federation/status")
                    return bool(st["desired"]["policy"] == {"accept_deployments": False})

                await eventually(closed, what="the policy applied at the dc")
                tenant = await _tenant(m)
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                refused_dep = r.json()["deployment_id"]
                view = await eventually(lambda: _state(tenant, refused_dep, "failed"),
                                        timeout=30, what="deployment refused by the dc")
                assert view["federated"]["reasons"] == {A: {"datacenter_closed": 1}}
                assert not new.deployments and not before.deployments
                # Open again: the next deployment runs there.
                r = await mc.put("/api/v2/federation/desired", json={"policy": {}})
                assert r.status_code == 200 and r.json()["policy"] == {
                    "accept_deployments": True}
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                runs = r.json()["deployment_id"]
                await eventually(lambda: _state(tenant, runs, "running"), timeout=30,
                                 what="deployment running once the dc is open")
                # on one of the dc's agents: new-1, or old-1 (admitted before the
                # release narrowed the policy, and still connected)
                assert runs in new.deployments or runs in before.deployments
                nursery.cancel_scope.cancel()
        finally:
            if tenant is not None:
                await tenant.aclose()
            for cp in (a, m):
                await cp.stop()


async def _has(cp: CpProc, ident: str) -> bool:
    return ident in await listed(cp)
