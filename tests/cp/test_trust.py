"""Periodic re-attestation quarantines an agent whose TD changed; desired-state
manifests with a bad signature are refused and reported, never loaded."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from cpkit import running_cp
from test_sessions import FAST, agents_by_vm, wait_until


async def test_failed_reattestation_quarantines(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", attest_interval_s=0.5, **FAST) as env, \
                trio.open_nursery() as nursery:
            good = env.agent("vm-good")
            bad = env.agent("vm-bad")
            await nursery.start(good.run)
            await nursery.start(bad.run)

            async def reattested() -> bool:
                return good.requests_answered >= 1 and bad.requests_answered >= 1

            await wait_until(reattested, "both re-attested once")
            view = await agents_by_vm(env)
            assert view["vm-bad"]["status"] == "online"
            # The "VM" now reports another MRTD: its next re-attestation fails.
            bad.td = env.td.evolve(mr_td=b"\x42" * 48)

            async def quarantined() -> dict[str, object] | None:
                v = (await agents_by_vm(env))["vm-bad"]
                return v if v["status"] == "quarantined" else None

            v = await wait_until(quarantined, "quarantined")
            assert v["attestation"]["verdict"] == "fail"  # type: ignore[index]
            assert any("MRTD" in r for r in v["attestation"]["quarantine_reasons"])  # type: ignore[index]
            assert (await agents_by_vm(env))["vm-good"]["status"] == "online"
            async with env.client() as admin:
                dcs = (await admin.get("/api/v2/datacenters")).json()["datacenters"]
                events = [e.kind for e in env.cp.events.recent]
            assert dcs[0]["attestation"] == {"pass": 1, "fail": 1}
            assert "agent.quarantined" in events
            nursery.cancel_scope.cancel()


async def test_tampered_manifest_is_refused_and_reported(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    with trio.fail_after(60):
        async with running_cp(data) as env, env.client() as admin:
            key = (await admin.post("/api/v2/accounts", json={"name": "t"})).json()["api_key"]
            async with env.client(token=key) as http:
                for name in ("kept", "forged"):
                    assert (await http.post("/api/v2/apps",
                                            json={"name": name})).status_code == 201
        forged = next(p for p in (data / "manifests" / "apps").glob("*.json")
                      if "forged" in p.name)
        doc = json.loads(forged.read_text())
        doc["document"]["spec"]["account_id"] = "acct-attacker"
        forged.write_text(json.dumps(doc))
        async with running_cp(data) as env:
            async with env.client(token=key) as http:
                apps = (await http.get("/api/v2/apps")).json()["apps"]
            assert [a["name"] for a in apps] == ["kept"]
            refused = [e for e in env.cp.events.recent if e.kind == "manifest.refused"]
            assert len(refused) == 1 and "forged" in refused[0].data["detail"]
            assert not any(n.endswith(".forged") for n in env.cp.registry.names("app/"))
