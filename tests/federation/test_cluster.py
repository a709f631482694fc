"""One master, two dc CPs and direct agents, all real processes over real TLS/websockets:
join tokens, admission by datacenter, aggregation equal to the dc's own truth, snapshots."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import trio

from ee.federation import pki
from ee.protocol.signing import generate_signing_key, public_key_bytes

from .fedkit import agent, dc, event_log, eventually, join_token, master, run, sim_td
from .fedkit import counts as _counts

A, B, DIRECT = "sim:dc-a", "sim:dc-b", "sim:direct"


async def test_cluster_join_admission_aggregation_snapshots(tmp_path: Path) -> None:
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    b = dc(tmp_path, m, B, "dc-b")
    with trio.fail_after(150):
        await m.start()
        td = sim_td()
        try:
            # The CLI prints a single-use token; a dc CP trades it for its certificate.
            out = await trio.to_thread.run_sync(run, [
                "eectl", "federation", "join-token", "--cp", m.http, "--token", m.token])
            assert out.returncode == 0, out.stderr
            token = out.stdout.strip()
            await a.start("--join-token", token)
            await b.start("--join-token", await join_token(m, B))
            # The token was used: another join with it is refused (403, reason code).
            key = pki.new_key()
            async with httpx.AsyncClient() as c:
                r = await c.post(f"{m.http}/api/v2/federation/join", json=pki.join_body(
                    token, "sim:dc-x", pki.public_pem(key),
                    public_key_bytes(generate_signing_key()).hex()))
            assert r.status_code == 401 and r.json()["error"]["code"] == "join_token_invalid"
            # A token bound to a datacenter joins only that one.
            bound = await join_token(m, "sim:dc-y")
            async with httpx.AsyncClient() as c:
                r = await c.post(f"{m.http}/api/v2/federation/join", json=pki.join_body(
                    bound, "sim:dc-z", pki.public_pem(key),
                    public_key_bytes(generate_signing_key()).hex()))
            assert r.status_code == 403 and r.json()["error"]["code"] == "join_token_datacenter"

            async with trio.open_nursery() as nursery:
                agents = {}
                for cp, label, n in ((a, A, 3), (b, B, 2), (m, DIRECT, 2)):
                    for i in range(n):
                        ag = agent(cp, f"{cp.name}-{i}", label, td)
                        await nursery.start(ag.run)
                        assert ag.registered is not None, ag.rejected
                        agents[ag.vm_name] = ag
                # A dc CP refuses agents of another datacenter; the master refuses direct
                # agents of a datacenter a dc CP serves.
                wrong = agent(a, "wrong-dc", B, td)
                await nursery.start(wrong.run)
                assert wrong.rejected is not None and wrong.rejected.code == "WRONG_DATACENTER"
                # A datacenter with direct agents at the master cannot be taken over by
                # a dc CP joining under its label.
                async with httpx.AsyncClient() as c:
                    r = await c.post(f"{m.http}/api/v2/federation/join", json=pki.join_body(
                        await join_token(m), DIRECT, pki.public_pem(key),
                        public_key_bytes(generate_signing_key()).hex()))
                assert r.status_code == 403
                assert r.json()["error"]["code"] == "datacenter_is_direct"
                bypass = agent(m, "bypass", A, td)
                await nursery.start(bypass.run)
                assert bypass.rejected is not None \
                    and bypass.rejected.code == "WRONG_DATACENTER"

                async def agrees() -> dict[str, Any] | None:
                    view = await m.datacenters()
                    for cp, label in ((a, A), (b, B)):
                        truth = _counts((await cp.get("/api/v2/agents"))["agents"])
                        got = view.get(label)
                        if got is None or got["mode"] != "federated" \
                                or {k: got["agents"][k] for k in truth} != truth \
                                or got["agents"]["total"] != sum(truth.values()):
                            return None
                    return view

                view = await eventually(agrees, what="master agrees with the dc CPs")
                assert view[A]["agents"]["online"] == 3 and view[B]["agents"]["online"] == 2
                assert view[A]["attestation"]["pass"] == 3 \
                    and view[A]["attestation"]["fail"] == 0
                # Attestation outcomes by measured image (the digest each verified).
                mrtds = {v["attestation"]["mrtd"]
                         for v in (await a.get("/api/v2/agents"))["agents"]}
                assert view[A]["attestation"]["by_mrtd"] == {m_: 3 for m_ in mrtds}
                assert view[A]["capacity"]["standard"] == {"total": 3, "free": 3}
                assert not view[A]["degraded"] and view[A]["spool_depth"] == 0
                assert view[DIRECT]["mode"] == "direct" and view[DIRECT]["agents"]["online"] == 2
                for d in view.values():
                    assert {"label", "mode", "agents", "degraded", "sync_lag_s",
                            "spool_depth"} <= set(d)

                # Churn: two agents of dc-a leave, one of dc-b; the master follows.
                for name in ("dc-a-0", "dc-a-1", "dc-b-0"):
                    ws = agents[name].ws
                    assert ws is not None
                    await ws.aclose()
                ag = agent(a, "dc-a-late", A, td)
                await nursery.start(ag.run)
                view = await eventually(agrees, what="master agrees after churn")
                truth_a = _counts((await a.get("/api/v2/agents"))["agents"])
                assert truth_a["online"] == 2 and view[A]["agents"]["total"] == 4

                # Down: a signed, versioned snapshot reaches both dc CPs, which report it.
                async with event_log(a) as seen:
                    out = await trio.to_thread.run_sync(run, [
                        "eectl", "federation", "desired", "--cp", m.http, "--token", m.token,
                        "--policy", '{"accept_deployments": true}'])
                    assert out.returncode == 0 and "version 1" in out.stdout, out.stderr

                    async def applied() -> bool:
                        st = await a.get("/api/v2/federation/status")
                        view = await m.datacenters()
                        return (st["snapshot_version"] == 1
                                and st["desired"] == {"policy": {"accept_deployments": True}}
                                and view[A]["snapshot_version"] == 1
                                and view[B]["snapshot_version"] == 1)

                    await eventually(applied, what="snapshot applied and reported")
                    assert any(e["kind"] == "federation.snapshot_applied" for e in seen)

                # The dc's actor at the master crashes: its supervisor restarts it, the
                # link asks the dc for a new hello, and the picture comes back (resync).
                async with m.client() as c:
                    r = await c.post("/api/v2/admin/crash", json={"name": f"dc/{A}"})
                    assert r.status_code == 202, r.text
                view = await eventually(agrees, what="master agrees after an actor crash")
                assert view[A]["agents"]["total"] == 4 and view[A]["connected"]

                # Console: links, lag, degraded and spool depth; the federation subtree.
                out = await trio.to_thread.run_sync(lambda: subprocess.run(
                    ["eectl", "console", "--cp", m.http, "--token", m.token],
                    input="datacenters\ntree\n", capture_output=True, text=True, timeout=60,
                    env={**os.environ, "HOME": str(tmp_path)}))
                assert out.returncode == 0, out.stderr
                row = next(line for line in out.stdout.splitlines() if line.startswith(A))
                assert "federated" in row.split() and "yes" in row.split()
                assert "MODE" in out.stdout and "SPOOL" in out.stdout and "LAG S" in out.stdout
                assert "├─ listener" in out.stdout or "└─ listener" in out.stdout
                assert f"dc/{A}" in out.stdout

                # Metrics: the per-dc series the rollout guardrails read.
                async with httpx.AsyncClient() as c:
                    text = (await c.get(f"{m.http}/metrics")).text
                for name in ("ee_federation_sync_lag_seconds", "ee_federation_spool_depth"):
                    assert f'{name}{{datacenter="{A}"}}' in text
                nursery.cancel_scope.cancel()
        finally:
            for cp in (a, b, m):
                await cp.stop()
