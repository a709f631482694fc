"""Gaps a tryout found in federation, each with real processes where the area uses them:
a dc-placed deployment shows its replicas' URLs (the dc's word, shape-checked at the
master), a dc whose uplink fails says why (rate-limited, and in its status), re-issuing
a join token for an enrolled, linked label warns that it cuts the running dc off."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import attrs
import trio
from tests.ctl.ctlkit import eectl
from trio_websocket import ConnectionTimeout

from ee.federation.dc import Downs, next_down, why_down
from ee.federation.placement import (
    Outcome,
    ReportedReplica,
    check_outcome,
    reported_url,
    shown_replicas,
)
from ee.federation.wire import HELLO_REQUIRED, WireError
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


# ---- 2. why the uplink is down; 3. a join token that would cut a dc off -----------------

def test_why_down_names_the_failure_and_repeats_are_rate_limited() -> None:
    hint = ("if it goes on, is this dc's certificate still pinned at the master? a join "
            "of this label elsewhere replaces it)")
    assert why_down(trio.BrokenResourceError()) == (
        f"BrokenResourceError (the master closed the connection; {hint}")
    assert why_down(ConnectionTimeout()) == (
        f"ConnectionTimeout (no websocket handshake in time; {hint}")
    broken = trio.BrokenResourceError()
    broken.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert why_down(broken) == ("BrokenResourceError (ConnectionResetError: [Errno 104] "
                                "Connection reset by peer)")
    assert why_down(OSError(111, "Connect call failed")) == \
        "ConnectionRefusedError: [Errno 111] Connect call failed"
    assert why_down(WireError(HELLO_REQUIRED, "send a hello")) == \
        "refused: hello_required: send a hello"
    assert why_down(ConnectionRefusedError(111, "x\n2026 INFO forged"), "seq") == \
        "ConnectionRefusedError: [Errno 111] x\\n2026 INFO forged; the master refused: seq"
    d, line = next_down(Downs(), "A", 0.0)
    assert line == (logging.WARNING, "A") and d.failures == 1
    for t in (1.0, 5.0, 59.0):  # the same reason within the minute: no line
        d, line = next_down(d, "A", t)
        assert line is None
    d, line = next_down(d, "A", 61.0)
    assert line == (logging.WARNING, "A (again, 4 times in 61 s; 5 failures in a row)")
    d, line = next_down(d, "A", 62.0)
    assert line is None
    d, line = next_down(d, "B", 63.0)  # another reason: at once
    assert line == (logging.WARNING, "B") and d.failures == 7


async def _token(m: CpProc, label: str) -> dict[str, Any]:
    async with m.client() as c:
        r = await c.post("/api/v2/federation/join-tokens", json={"datacenter": label})
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc


async def test_rejoin_warns_and_the_cut_off_dc_says_why(tmp_path: Path) -> None:
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    a2 = dc(tmp_path, m, A, "dc-a-again")  # the same label, enrolled again elsewhere
    with trio.fail_after(120):
        await m.start()
        try:
            first = await _token(m, A)
            assert "warning" not in first  # not enrolled yet: nothing to cut off
            await a.start("--join-token", first["token"])

            async def linked() -> bool:
                return bool((await a.get("/api/v2/federation/status"))["connected"])

            await eventually(linked, timeout=30, what="dc-a linked")
            status = await a.get("/api/v2/federation/status")
            assert status["last_error"] is None and status["uplink_failures"] == 0
            # (3) A token for the enrolled, linked label: issued, with a warning.
            again = await _token(m, A)
            assert again["warning"] == (
                f"datacenter {A} is enrolled (linked now): joining with this token "
                "replaces its keys and cuts the running dc off")
            assert "warning" not in await _token(m, B)  # another label: none
            # Used elsewhere: the running dc-a is cut off (its certificate is no longer
            # pinned) and says why, in its status and its log.
            await a2.start("--join-token", again["token"])

            async def cut_off() -> dict[str, Any] | None:
                st: dict[str, Any] = await a.get("/api/v2/federation/status")
                return st if not st["connected"] and st["uplink_failures"] >= 3 else None

            status = await eventually(cut_off, timeout=60, what="dc-a cut off, retrying")
            assert status["last_error"] and status["last_error_at"]
            assert a.log is not None
            downs = [line for line in a.log.read_text().splitlines()
                     if "federation: uplink to wss://" in line and " down:" in line]
            assert downs, "no uplink-down line"
            reasons = [line.split(" down: ", 1)[1] for line in downs]
            assert all(r.strip() for r in reasons), downs  # never an empty reason
            # Retried at least 3 times, logged once per reason (all within a minute).
            assert all(" WARNING " in line for line in downs), downs
            assert len(reasons) == len(set(reasons)) < status["uplink_failures"], downs
            assert status["last_error"] in reasons
            # The second dc stops: the warning says the label is not linked now.
            await a2.stop()

            async def unlinked() -> bool:
                return "(not linked now)" in (await _token(m, A))["warning"]

            await eventually(unlinked, timeout=20, what="the warning without a link")
        finally:
            for cp in (a, a2, m):
                await cp.stop()
