"""Gaps a tryout found in federation, each with real processes where the area uses them:
a dc-placed deployment shows its replicas' URLs (the dc's word, shape-checked at the
master), a dc whose uplink fails says why (rate-limited, and in its status), re-issuing
a join token for an enrolled, linked label warns that it cuts the running dc off."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import trio
from tests.ctl.ctlkit import eectl

from ee.federation.placement import (
    Outcome,
    ReportedReplica,
    check_outcome,
    reported_url,
    shown_replicas,
)
from ee.protocol.messages import Register

from .fedkit import (  # fedkit's SimAgent: it puts tools/loadgen on the path
    CpProc,
    SimAgent,
    dc,
    eventually,
    free_port,
    join_token,
    master,
    sim_td,
)
from .test_placement import _tenant

A, B = "sim:dc-a", "sim:dc-b"


@attrs.define
class UrlAgent(SimAgent):
    """A sim agent that advertises where its HTTP API answers (as ``ee-agent`` does)."""

    http: str | None = None

    def register_message(self, nonce: bytes) -> Register:
        return attrs.evolve(super().register_message(nonce), url=self.http)


def _agent(cp: CpProc, vm_name: str, label: str, http: str | None) -> UrlAgent:
    return UrlAgent(url=cp.agent_url, vm_name=vm_name, datacenter=label, td=sim_td(),
                    http=http)


# ---- 1. replica URLs of a dc-placed deployment ----------------------------------------

def test_reported_url_is_shape_checked_and_failed_replicas_have_none() -> None:
    assert reported_url("http://10.0.0.7:8081") == "http://10.0.0.7:8081"
    assert reported_url("https://agent-1.dc-a.example") == "https://agent-1.dc-a.example"
    for bad in (None, 3, ["http://x"], "javascript:alert(1)", "file:///etc/passwd",
                "ftp://x", "http://user:pw@x", "http://x/?q=1", "http://x\x1b[31m",
                "http://x y", "http://" + "a" * 600, "http://\u00e9.example", ""):
        assert reported_url(bad) is None, bad
    base = {"deployment_id": "d", "outcome": "running", "reasons": {}, "running": 1,
            "version": "1"}
    rep = {"agent_id": "ag-1", "state": "running", "version": "1", "compose_hash": "h1"}
    # A bad URL is dropped (null), never the whole report.
    got = check_outcome({**base, "replicas": [{**rep, "url": "javascript:x"}]})
    assert got.replicas[0].url is None and got.replicas[0].state == "running"
    got = check_outcome({**base, "replicas": [{**rep, "url": "http://10.0.0.7:8081"}]})
    assert got.replicas[0].url == "http://10.0.0.7:8081"
    assert shown_replicas(got, {"1": "h1"})[0]["url"] == "http://10.0.0.7:8081"
    # Shown failed (hash mismatch, agent offline, wrong size): no URL.
    assert shown_replicas(got, {"1": "h2"})[0]["url"] is None
    assert shown_replicas(got, {"1": "h1"}, {"ag-1": {"status": "offline"}})[0]["url"] is None
    sized = Outcome("d", "running", {}, 1, None, "1", (ReportedReplica(
        "ag-1", "running", "1", "h1", node_size="standard", url="http://10.0.0.7:8081"),))
    assert shown_replicas(sized, {"1": "h1"}, None, "llm")[0]["url"] is None
    assert shown_replicas(sized, {"1": "h1"}, None, "standard")[0]["url"] == \
        "http://10.0.0.7:8081"


async def test_dc_placed_deployment_shows_its_replica_url(tmp_path: Path) -> None:
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    agent_http = f"http://127.0.0.1:{free_port()}"
    with trio.fail_after(150):
        await m.start()
        tenant = None
        try:
            await a.start("--join-token", await join_token(m, A))
            async with trio.open_nursery() as nursery:
                sim = _agent(a, "dc-a-0", A, agent_http)
                await nursery.start(sim.run_forever)

                async def ready() -> bool:
                    view = await m.datacenters()
                    return view.get(A, {}).get("agents", {}).get("online") == 1 \
                        and not view[A]["degraded"]

                await eventually(ready, timeout=30, what="dc-a online at the master")
                tenant = await _tenant(m)
                key = tenant.headers["Authorization"].split(" ", 1)[1]
                r = await eectl("deploy", "run", "web", "--version", "1", "--datacenter", A,
                                "--poll", "0.2", "--cp", m.http, "--token", key,
                                state_dir=tmp_path)
                assert r.returncode == 0, r.stderr
                lines = r.stdout.splitlines()
                dep = lines[0].split()[1]
                assert lines == [f"deployment {dep} is running", f"url: {agent_http}"], \
                    r.stdout
                view = (await tenant.get(f"/api/v2/deployments/{dep}")).json()
                assert view["federated"]["datacenter"] == A
                assert [(x["state"], x["url"]) for x in view["replicas"]] == [
                    ("running", agent_http)]
                r = await eectl("status", dep, "--json", "--cp", m.http, "--token", key,
                                state_dir=tmp_path)
                assert r.returncode == 0, r.stderr
                assert [x["url"] for x in json.loads(r.stdout)["replicas"]] == [agent_http]
                nursery.cancel_scope.cancel()
        finally:
            if tenant is not None:
                await tenant.aclose()
            for cp in (a, m):
                await cp.stop()
