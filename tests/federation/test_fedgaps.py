"""Gaps a tryout found in federation, each with real processes where the area uses them:
a dc-placed deployment shows its replicas' URLs (the dc's word, shape-checked at the
master), a dc whose uplink fails says why (rate-limited, and in its status), re-issuing
a join token for an enrolled, linked label warns that it cuts the running dc off."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
from prometheus_client import CollectorRegistry
from tests.ctl.ctlkit import eectl
from trio_websocket import ConnectionTimeout

from ee.actors.app import GetDeployment
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, CpConfig
from ee.federation.dc import DcFederation, Downs, enroll, next_down, why_down
from ee.federation.master import FederationSettings, MasterFederation
from ee.federation.placement import (
    UNPLACED_REPLICAS,
    DcCapacity,
    Outcome,
    ReportedReplica,
    check_outcome,
    intent,
    reported_url,
    shown_replicas,
)
from ee.federation.reconcile import stuck_for, unplaced
from ee.federation.wire import HELLO_REQUIRED, WireError
from ee.placement import Constraints
from ee.protocol.messages import DeployStatus, Register
from ee.runtime import Registry

from .fedkit import (  # fedkit's SimAgent: it puts tools/loadgen on the path
    CpProc,
    SimAgent,
    cp_here,
    dc,
    eventually,
    free_port,
    join_token,
    master,
    sim_td,
)
from .test_placement import _tenant

A, B = "sim:dc-a", "sim:dc-b"
COMPOSE = "services:\n  web:\n    image: nginx\n"


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
        ("ConnectionRefusedError: [Errno 111] x\\n2026 INFO forged; earlier on that "
         "link the master refused: seq")
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


# ---- 4. a deployment stuck in its dc goes to another ------------------------------------

def test_stuck_is_a_shortfall_of_agents_that_lasts() -> None:
    def view(state: str, *replicas: str, wanted: int = 1,
             desired: str = "running") -> dict[str, Any]:
        return {"state": state, "desired": desired, "replicas_wanted": wanted,
                "replicas": [{"agent_id": f"ag-{i}", "state": r}
                             for i, r in enumerate(replicas)]}

    assert unplaced(None) == 0
    assert unplaced(view("placing", "failed")) == 1  # its replica failed, none re-placed
    assert unplaced(view("placing", wanted=2)) == 2
    assert unplaced(view("placing", "running", "failed", wanted=2)) == 1
    for merely in (view("starting", "pending"), view("starting", "pulling", "starting",
                                                     wanted=2),
                   view("placing", "pending"), view("running", "running"),
                   view("failed", "failed"), view("stopping", desired="stopped")):
        assert unplaced(merely) == 0, merely  # starting, running, failed, stopped: not stuck
    assert stuck_for(None, 0, 10.0, 60.0) == (None, False)
    assert stuck_for(None, 1, 10.0, 60.0) == (10.0, False)  # the clock starts
    assert stuck_for(10.0, 1, 69.0, 60.0) == (10.0, False)
    assert stuck_for(10.0, 1, 70.0, 60.0) == (10.0, True)
    assert stuck_for(10.0, 0, 71.0, 60.0) == (None, False)  # placed again: it restarts


@asynccontextmanager
async def dc_here(data_dir: Path, m: CpProc, label: str) -> AsyncIterator[ControlPlane]:
    """A dc ControlPlane in this process (the test sets its reconciler's bound)."""
    token = await join_token(m, label)
    await trio.to_thread.run_sync(partial(enroll, data_dir, m.http, label, token, dev=True))
    config = CpConfig(data_dir=data_dir, dev=True, listen="127.0.0.1:0",
                      agent_listen="127.0.0.1:0", role="dc", upstream=m.http,
                      datacenter=label, quorum=Quorum(settle_timeout_s=1))
    async with cp_here(config) as cp:
        yield cp


async def test_deployment_stuck_in_its_dc_is_rerouted(tmp_path: Path) -> None:
    m = master(tmp_path)
    b = dc(tmp_path, m, B, "dc-b")
    with trio.fail_after(150):
        await m.start()
        tenant = None
        try:
            async with dc_here(tmp_path / "dc-a", m, A) as a, \
                    trio.open_nursery() as nursery:
                assert isinstance(a.federation, DcFederation)
                assert a.federation.reconciler is not None
                a.federation.reconciler.stuck_after_s = 3.0
                await b.start("--join-token", await join_token(m, B))
                sim_a = SimAgent(url=f"ws://127.0.0.1:{a.plane.bound_port}"
                                     "/api/v2/agents/connect",
                                 vm_name="dc-a-0", datacenter=A, td=sim_td())
                sim_b = _agent(b, "dc-b-0", B, None)
                for sim in (sim_a, sim_b):
                    await nursery.start(sim.run_forever)

                async def ready() -> bool:
                    view = await m.datacenters()
                    return all(view.get(x, {}).get("agents", {}).get("online") == 1
                               and not view[x]["degraded"] for x in (A, B))

                await eventually(ready, timeout=30, what="both dcs online at the master")
                tenant = await _tenant(m)
                r = await tenant.post("/api/v2/apps/web/deployments",
                                      json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                dep = r.json()["deployment_id"]

                async def running_in(label: str) -> dict[str, Any] | None:
                    v: dict[str, Any] = (await tenant.get(f"/api/v2/deployments/{dep}")
                                         ).json()
                    return v if v["state"] == "running" \
                        and v["federated"]["datacenter"] == label else None

                # Equal room: dc-a (by label). It runs on dc-a's only agent.
                await eventually(lambda: running_in(A), timeout=30, what="running in dc-a")
                assert dep in sim_a.deployments
                # Its replica crashes; dc-a has no other agent: the local deployment is
                # back in placing ("cannot place 1 of 1 replica"), stuck.
                await sim_a.send(DeployStatus(deployment_id=dep, state="failed",
                                              error="simulated crash"))

                async def stuck_at_a() -> dict[str, Any] | None:
                    v: dict[str, Any] = (await tenant.get(f"/api/v2/deployments/{dep}")
                                         ).json()
                    return v if v["federated"]["datacenter"] == A \
                        and v["state"] == "placing" else None

                view = await eventually(stuck_at_a, timeout=20, what="stuck in dc-a")
                assert "cannot place 1 of 1 replica" in view["error"]
                # After the bound, dc-a says unsatisfiable: the master moves it to dc-b.
                view = await eventually(lambda: running_in(B), timeout=40,
                                        what="re-routed to dc-b and running")
                assert view["federated"]["tried"] == [A]
                assert view["federated"]["reasons"] == {A: {"UNPLACED_REPLICAS": 1}}
                assert dep in sim_b.deployments

                async def stopped_in_a() -> bool:  # no intent there: dc-a stops its own
                    key = a.deployment_index[dep]
                    got = await a.registry.ref(f"app/{key}").ask(GetDeployment(dep),
                                                                   timeout=5)
                    return got is not None and got["state"] == "stopped"

                await eventually(stopped_in_a, timeout=20, what="dc-a let it go")
                nursery.cancel_scope.cancel()
        finally:
            if tenant is not None:
                await tenant.aclose()
            for cp in (b, m):
                await cp.stop()


async def test_master_keeps_a_stuck_deployment_when_no_other_dc_fits(tmp_path: Path) -> None:
    """A dc's stuck report moves the intent only when another dc fits; else it stays
    (its dc keeps trying), where a first-placement refusal fails it at once."""
    events: list[tuple[str, str, Any]] = []
    fed = MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda *e: events.append(e), metrics=CollectorRegistry())
    version = {"version": "1", "compose_hash": "h", "compose": COMPOSE, "expose_port": 80,
               "health_path": "/"}
    fed.capacity = {A: DcCapacity(A, False, {}), B: DcCapacity(B, False, {})}  # no room
    for dep in ("stuck", "never"):
        await fed._set_intent(dep, intent("acct.web", version, 1, Constraints(), A))
    await fed.placement_reported(A, Outcome("stuck", "unsatisfiable",
                                            {UNPLACED_REPLICAS: 1}, 0))
    await fed.placement_reported(A, Outcome("never", "unsatisfiable", {"NO_GPU": 1}, 0))
    kept, failed = fed._intents()["stuck"], fed._intents()["never"]
    assert (kept["datacenter"], kept["desired"], kept.get("unplaced")) == (A, "running", None)
    assert failed["desired"] == "stopped" and failed["unplaced"] == {
        A: "DATACENTER_UNSATISFIABLE", B: "NO_CAPACITY"}
    assert [e[2].get("kept_in") for e in events if e[0] == "federation.unplaceable"] == [
        A, None]
    # Room in dc-b now: the next stuck report moves it there.
    fed.capacity[B] = DcCapacity(B, False, {"standard": 1})
    await fed.placement_reported(A, Outcome("stuck", "unsatisfiable",
                                            {UNPLACED_REPLICAS: 1}, 0))
    moved = fed._intents()["stuck"]
    assert (moved["datacenter"], moved["tried"], moved["desired"]) == (B, [A], "running")
