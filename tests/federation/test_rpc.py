"""The master asks a dc over the federation link (ee.federation.rpc), with real
processes: a tenant reads the logs and the attestation of a deployment the master placed
in a dc; an admin fetches one federated agent's full proof, which matches the digest its
dc reported up; another tenant reads nothing; a dc killed -9 answers 503/504 with a code
in bounded time. Plus the refusals on the link: a response to an id never sent, one on
another dc's link, a duplicate / late one, a bad signature: each refused with a code and
an event, and the link stays up.

Sim agents answer every logs request with no lines (``tools/loadgen/simagent.py``), so
the logs test checks the path (the dc asked the very agent hosting the replica) and an
agent that refuses (the agent actor's ``logs unavailable`` line comes back through the
dc), not workload output.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ee.actors.app import GetDeployment
from ee.actors.directory import AgentDirectory, AgentRecord
from ee.actors.identity import Identity
from ee.actors.lifecycle import AgentState
from ee.federation.dc import DcFederation
from ee.federation.master import FederationSettings
from ee.federation.reconcile import local_key
from ee.federation.rpc import (
    NOT_PLACED_HERE,
    UNKNOWN_AGENT,
    UNKNOWN_KIND,
    DcSources,
    MasterRpc,
    Outstanding,
    RpcError,
    answer,
    fit,
    proof_digest,
    proof_of,
)
from ee.federation.wire import MAX_RESPONSE_BYTES, Request, Response, seal
from ee.protocol.signing import generate_signing_key, load_private_key
from ee.runtime import Actor, ActorHost, Registry, handler

from .fedkit import CpProc, agent, dc, event_log, eventually, join_token, master, refused, sim_td
from .test_placement import COMPOSE, _tenant
from .test_refusals import LABEL, _agent, _enroll, _events, enrolled_home, link

A = "sim:dc-a"
OTHER = "sim:rogue-2"


# ---- the pure parts -------------------------------------------------------------------

def test_outstanding_table() -> None:
    t = Outstanding(per_dc=2)
    assert t.start("a", "1") and t.start("a", "2")
    assert not t.start("a", "3")  # the per-dc cap
    assert t.start("b", "3")
    assert t.judge("a", "1") is None
    assert t.judge("b", "1") == "response_unknown"  # sent to a, answered on b's link
    assert t.judge("a", "9") == "response_unknown"  # never sent
    t.finish("1")
    assert t.judge("a", "1") == "response_late"  # a duplicate, or after the timeout
    assert t.judge("b", "1") == "response_unknown"
    assert t.start("a", "4")  # room again


def test_fit_drops_oldest_lines() -> None:
    lines = [{"at": f"2026-01-01T00:00:{i % 60:02d}Z", "text": "x" * 1000} for i in range(3000)]
    view = {"deployment_id": "d", "replicas": [{"agent_id": "ag", "lines": lines}]}
    out = fit(view)
    assert out["truncated"] is True
    assert len(json.dumps(out)) <= MAX_RESPONSE_BYTES
    kept = out["replicas"][0]["lines"]
    assert 0 < len(kept) < 3000 and kept[-1] == lines[-1]  # the newest are kept
    small = fit({"deployment_id": "d", "replicas": [{"agent_id": "ag", "lines": lines[:3]}]})
    assert small["truncated"] is False and small["replicas"][0]["lines"] == lines[:3]


def _record(agent_id: str, datacenter: str) -> AgentRecord:
    ident = Identity(agent_id=agent_id, vm_name="vm", node_size="standard",
                     datacenter=datacenter, gpu=False, public_key=b"k" * 32, provider="sim",
                     mrtd="ab" * 48, tcb_status="UpToDate", verdict="pass", violations=(),
                     verified_at=1.0)
    return AgentRecord(agent_id, ident, AgentState.READY)


class _App(Actor):
    """A dc's local app of the reserved account (it runs every deployment asked of it)."""

    @handler(GetDeployment)
    async def on_get(self, msg: GetDeployment) -> dict[str, Any]:
        return {"deployment_id": msg.deployment_id, "compose_hash": "h",
                "replicas": [{"agent_id": "ag-mine", "state": "running"}]}


async def test_dc_answers_only_its_own() -> None:
    """A dc reads nothing for a deployment that is not one of the master's intents
    placed in it (even when a local app of that name runs it), nor for an agent of
    another datacenter."""
    asked: list[str] = []

    async def fetch_logs(*a: Any) -> dict[str, Any] | None:
        asked.append(a[2])
        return {"deployment_id": a[2], "replicas": []}

    directory = AgentDirectory()
    directory.put(_record("ag-mine", A))
    directory.put(_record("ag-theirs", "sim:dc-b"))
    registry = Registry()
    src = DcSources(registry, directory, fetch_logs,
                    lambda r, rec: {"agent_id": r["agent_id"], "attested": True})
    intent = {"app": "acct.web", "datacenter": "sim:dc-b", "desired": "running",
              "replicas": 1, "constraints": {},
              "version": {"version": "1", "compose_hash": "h", "compose": COMPOSE,
                          "expose_port": 80, "health_path": "/"}}
    desired = {"deployments": {"dep-b": intent, "dep-a": {**intent, "datacenter": A}}}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host = ActorHost(registry, f"app/{local_key('acct.web')}", _App)
            await nursery.start(host.run)
            try:
                await _answers(src, desired, asked, directory)
            finally:
                host.request_stop()
        host.release()


async def _answers(src: DcSources, desired: dict[str, Any], asked: list[str],
                   directory: AgentDirectory) -> None:

    def req(kind: str, **kw: Any) -> Request:
        return Request("request", secrets.token_hex(16), kind, **kw)

    for r in (req("logs", deployment_id="dep-b"), req("logs", deployment_id="dep-none"),
              req("attestation", deployment_id="dep-b")):
        got = await answer(r, A, desired, src)
        assert (got.error, got.id, got.body) == (NOT_PLACED_HERE, r.id, None)
    got = await answer(req("attestation", agent_id="ag-theirs"), A, desired, src)
    assert got.error == UNKNOWN_AGENT and got.body is None
    got = await answer(req("shell", deployment_id="dep-b"), A, desired, src)
    assert got.error == UNKNOWN_KIND
    assert asked == []
    got = await answer(req("attestation", agent_id="ag-mine"), A, desired, src)
    assert got.error is None and got.body is not None
    record = directory.get("ag-mine")
    assert record is not None
    assert got.body["proof"] == proof_of(record)
    assert got.body["proof_sha256"] == proof_digest(got.body["proof"])
    # The intent placed here: answered (from the local app).
    # Args are JSON as they are (no coercion: "5" is not a tail, a list not a service).
    for bad in ({"tail": "5"}, {"service": ["web"]}, {"tail": True}, {"tail": 0}):
        got = await answer(req("logs", deployment_id="dep-a", args=bad), A, desired, src)
        assert got.error == "bad_request", bad
    assert asked == []
    got = await answer(req("logs", deployment_id="dep-a"), A, desired, src)
    assert got.error is None and asked == ["dep-a"]
    got = await answer(req("attestation", deployment_id="dep-a"), A, desired, src)
    assert got.error is None and got.body is not None
    assert [r["agent_id"] for r in got.body["replicas"]] == ["ag-mine"]


# ---- real processes ---------------------------------------------------------------------

async def _other_tenant(m: CpProc) -> httpx.AsyncClient:
    """A second account, with no app of its own."""
    async with m.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "other"})
        assert r.status_code == 201, r.text
    return httpx.AsyncClient(base_url=m.http, timeout=30, headers={
        "Authorization": f"Bearer {r.json()['api_key']}"})


async def test_logs_and_attestation_of_a_dc_placed_deployment(tmp_path: Path) -> None:
    ask_timeout = 3.0
    m = master(tmp_path, "--federation-ask-timeout-s", str(ask_timeout))
    a = dc(tmp_path, m, A, "dc-a")
    tenants: list[httpx.AsyncClient] = []
    with trio.fail_after(150):
        await m.start()
        try:
            await a.start("--join-token", await join_token(m, A))
            async with trio.open_nursery() as nursery:
                ag = agent(a, "dc-a-0", A, sim_td())
                await nursery.start(ag.run_forever)

                async def ready() -> bool:
                    view = (await m.datacenters()).get(A, {})
                    return view.get("agents", {}).get("online") == 1 \
                        and not view["degraded"]

                await eventually(ready, what="dc-a online at the master")
                owner = await _tenant(m)
                other = await _other_tenant(m)
                tenants += [owner, other]
                r = await owner.post("/api/v2/apps/web/deployments",
                                     json={"version": "1", "replicas": 1})
                assert r.status_code == 202, r.text
                dep = r.json()["deployment_id"]

                async def running() -> bool:
                    r = await owner.get(f"/api/v2/deployments/{dep}")
                    return r.json()["state"] == "running"

                await eventually(running, timeout=30, what="deployment running in dc-a")
                assert dep in ag.deployments

                # Logs at the master, asked of dc-a, which asked the agent hosting it.
                r = await owner.get(f"/api/v2/deployments/{dep}/logs", params={"tail": 50})
                assert r.status_code == 200, r.text
                logs = r.json()
                assert logs["deployment_id"] == dep and logs["datacenter"] == A
                assert logs["replicas"] == [{"agent_id": ag.agent_id, "lines": []}]
                assert logs["truncated"] is False
                # An agent that refuses: the agent actor's line saying so comes through.
                ag.refuse_logs = True
                r = await owner.get(f"/api/v2/deployments/{dep}/logs")
                assert r.status_code == 200, r.text
                (replica,) = r.json()["replicas"]
                assert replica["agent_id"] == ag.agent_id
                (line,) = replica["lines"]
                assert "logs unavailable" in line["text"] and "no such deployment" in line["text"]
                ag.refuse_logs = False
                r = await owner.get(f"/api/v2/deployments/{dep}/logs",
                                    params={"follow": "true"})
                assert r.status_code == 409
                assert r.json()["error"]["code"] == "federated_follow_unsupported"

                # Another tenant reads nothing of it (same answer as for no deployment).
                for path in (f"/api/v2/deployments/{dep}/logs",
                             f"/api/v2/deployments/{dep}/attestation"):
                    r = await other.get(path)
                    assert r.status_code == 404, r.text

                # Attestation: each replica's proof, whose digest is the one dc-a reported.
                r = await owner.get(f"/api/v2/deployments/{dep}/attestation")
                assert r.status_code == 200, r.text
                att = r.json()
                assert att["attested"] is True and att["datacenter"] == A
                (rep,) = att["replicas"]
                assert rep["agent_id"] == ag.agent_id and rep["attested"] is True
                assert rep["proof"]["agent_id"] == ag.agent_id
                assert rep["proof"]["datacenter"] == A and rep["proof"]["verdict"] == "pass"
                assert rep["proof_sha256"] == proof_digest(rep["proof"])
                async with m.client() as admin:
                    r = await admin.get(f"/api/v2/datacenters/{A}/agents/{ag.agent_id}"
                                        "/attestation")
                    assert r.status_code == 200, r.text
                    full = r.json()
                    assert full["matches"] is True and full["proof"] == rep["proof"]
                    assert full["reported_sha256"] == proof_digest(full["proof"])
                    r = await admin.get(f"/api/v2/datacenters/{A}/agents/ag-nobody"
                                        "/attestation")
                    assert r.status_code == 404
                    assert r.json()["error"]["code"] == "unknown_agent"
                    # Tenants cannot use the admin route.
                    r = await owner.get(f"/api/v2/datacenters/{A}/agents/{ag.agent_id}"
                                        "/attestation")
                    assert r.status_code in (401, 403)

                # dc-a killed -9: an answer with a code in bounded time, never a hang.
                a.kill9()
                await a.wait()
                with trio.fail_after(ask_timeout + 5):
                    r = await owner.get(f"/api/v2/deployments/{dep}/logs")
                assert r.status_code in (503, 504), r.text
                assert r.json()["error"]["code"] in ("datacenter_unavailable",
                                                     "datacenter_timeout")
                with trio.fail_after(ask_timeout + 5):
                    r = await owner.get(f"/api/v2/deployments/{dep}/attestation")
                assert r.status_code in (503, 504), r.text
                nursery.cancel_scope.cancel()
        finally:
            for t in tenants:
                await t.aclose()
            for cp in (a, m):
                await cp.stop()


async def test_response_refusals_keep_the_link(tmp_path: Path) -> None:
    """Two rogue dcs speak the link by hand; the master asks the first for a proof."""
    m = master(tmp_path, "--federation-ask-timeout-s", "2")
    home, home2 = tmp_path / "rogue", tmp_path / "rogue2"
    with trio.fail_after(90):
        await m.start()
        try:
            await _enroll(m, home)
            await _enroll_as(m, home2, OTHER)
            key = load_private_key(home / "federation" / "sign.key")
            async with event_log(m) as seen, link(home) as (send, recv), \
                    link(home2) as (send2, recv2), m.client() as admin, \
                    trio.open_nursery() as nursery:
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert await recv() == {"type": "ack", "upto": 0}
                await send(_events((1, {"ag-1": _agent()})))
                assert await recv() == {"type": "ack", "upto": 1}
                await send2({"type": "hello", "dc": OTHER, "first_unacked": 1,
                             "next_seq": 1, "snapshot_version": 0, "spool_depth": 0})
                assert await recv2() == {"type": "ack", "upto": 0}
                put, answers = trio.open_memory_channel[httpx.Response](2)

                async def ask() -> None:
                    await put.send(await admin.get(
                        f"/api/v2/datacenters/{LABEL}/agents/ag-1/attestation"))

                nursery.start_soon(ask)
                req = await recv()
                assert req["type"] == "request" and req["kind"] == "attestation"
                assert req["agent_id"] == "ag-1"
                proof = {"agent_id": "ag-1", "verdict": "pass"}
                good = {"type": "response", "dc": LABEL, "id": req["id"], "error": None,
                        "detail": "", "body": {"proof": proof}}

                # An id never sent to this dc.
                await send({**good, "id": secrets.token_hex(16)})
                assert (await recv())["code"] == "response_unknown"
                # The right id, on another dc's link (as that dc).
                await send2({**good, "dc": OTHER})
                assert (await recv2())["code"] == "response_unknown"
                # Tampered after signing.
                text = seal(good, key).replace('"pass"', '"fail"')
                await send(text)
                assert (await recv())["code"] == "bad_signature"
                # None of them answered the request.
                assert answers.statistics().current_buffer_used == 0
                # The genuine answer applies; the link is up all along.
                await send(good)
                with trio.fail_after(5):
                    answered = await answers.receive()
                assert answered.status_code == 200, answered.text
                got = answered.json()
                assert got["proof"] == proof and got["proof_sha256"] == proof_digest(proof)
                assert got["matches"] is False  # ag-1 reported no digest
                # A duplicate of it.
                await send(good)
                assert (await recv())["code"] == "response_late"

                # One the master gave up on (its timeout, 2 s): late too, and the asker
                # got 504 datacenter_timeout meanwhile.
                nursery.start_soon(ask)
                req = await recv()
                with trio.fail_after(10):
                    answered = await answers.receive()
                assert answered.status_code == 504, answered.text
                assert answered.json()["error"]["code"] == "datacenter_timeout"
                await send({**good, "id": req["id"]})
                assert (await recv())["code"] == "response_late"

                # Still up for good traffic on both links.
                await send(_events((2, {"ag-2": _agent()})))
                assert await recv() == {"type": "ack", "upto": 2}
                await send2(_events((1, {"ag-9": _agent(OTHER)}), dc=OTHER))
                assert await recv2() == {"type": "ack", "upto": 1}
                await trio.sleep(0.3)
            assert len(refused(seen, "response_unknown")) == 2
            assert len(refused(seen, "response_late")) == 2
            assert refused(seen, "bad_signature")
        finally:
            await m.stop()


async def _enroll_as(m: CpProc, home: Path, label: str) -> None:
    from ee.federation.dc import enroll

    token = await join_token(m, label)
    await trio.to_thread.run_sync(lambda: enroll(home, m.http, label, token, dev=True))


def test_oversized_response_is_refused() -> None:
    rpc = MasterRpc(lambda f: "", lambda *a: None)
    assert rpc.table.start(LABEL, "a" * 32)
    frame = Response("response", LABEL, "a" * 32, None, "", {"x": 1})
    got = rpc.answered(LABEL, frame, MAX_RESPONSE_BYTES + 10_000)
    assert got is not None and got[0] == "response_too_large"
    again = rpc.answered(LABEL, frame, 10)
    assert again is not None and again[0] == "response_late"


async def test_ask_bounded(autojump_clock: trio.testing.MockClock) -> None:
    """An ask ends: its link closing (503), the dc's silence (504), the per-dc cap (503)."""
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    rpc = MasterRpc(lambda f: json.dumps({"id": f.id}), lambda *a: None, timeout_s=10,
                    per_dc=1)
    errors: list[RpcError] = []

    async def asker() -> None:
        try:
            await rpc.ask(A, "logs", deployment_id="d")
        except RpcError as exc:
            errors.append(exc)

    assert (await _fails(rpc.ask(A, "logs"))).code == "datacenter_unavailable"  # no link
    rpc.link_up(A, send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        assert len(sent) == 1
        busy = await _fails(rpc.ask(A, "logs"))
        assert (busy.status, busy.code) == (503, "datacenter_busy")
        rpc.link_down(A, send)
    assert [(e.status, e.code) for e in errors] == [(503, "datacenter_unavailable")]
    rpc.link_up(A, send)
    start = trio.current_time()
    late = await _fails(rpc.ask(A, "logs"))
    assert (late.status, late.code) == (504, "datacenter_timeout")
    assert trio.current_time() - start == pytest.approx(10)
    # A degraded dc is asked nothing.
    before = len(sent)
    assert (await _fails(rpc.ask(A, "logs", usable=False))).code == "datacenter_unavailable"
    assert len(sent) == before


async def _fails(ask: Any) -> RpcError:
    try:
        await ask
    except RpcError as exc:
        return exc
    raise AssertionError("the ask did not fail")


async def test_dc_answers_only_requests_signed_by_the_master(tmp_path: Path) -> None:
    """The dc's link loop: a request not signed by the pinned master key is refused
    (``bad_signature``, an event, no answer); a signed one is answered, signed by the dc."""
    home, master_key = await enrolled_home(tmp_path)
    events: list[tuple[str, str, Any]] = []
    directory = AgentDirectory()
    directory.put(_record("ag-1", LABEL))
    two_refused, answered = trio.Event(), trio.Event()

    def emit(kind: str, subject: str, data: Any) -> None:
        events.append((kind, subject, data))
        if sum(1 for k, _, _ in events if k == "federation.refused") == 2:
            two_refused.set()

    async def no_logs(*a: Any) -> None:
        return None

    fed = DcFederation(home, LABEL, FederationSettings(), directory=directory,
                       emit=emit, metrics=CollectorRegistry(),
                       sources=DcSources(Registry(), directory, no_logs, lambda r, rec: {}))
    put, get = trio.open_memory_channel[str](4)
    sent: list[Any] = []

    class Ws:
        async def get_message(self) -> str:
            return await get.receive()

    async def send(body: Any) -> None:
        sent.append(body)
        answered.set()

    def request() -> Request:
        return Request("request", secrets.token_hex(16), "attestation", agent_id="ag-1")

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fed._receive, Ws(), {"cursor": 1}, send, nursery)
                await put.send(seal(request(), generate_signing_key()))  # not the master
                forged = seal(request(), master_key).replace('"ag-1"', '"ag-2"')
                await put.send(forged)
                await two_refused.wait()
                good = request()
                await put.send(seal(good, master_key))
                await answered.wait()
                nursery.cancel_scope.cancel()
        (resp,) = sent
        assert isinstance(resp, Response) and resp.id == good.id and resp.error is None
        assert resp.body is not None and resp.body["proof"]["agent_id"] == "ag-1"
        codes = [d["code"] for k, _, d in events if k == "federation.refused"]
        assert codes == ["bad_signature", "bad_signature"]
    finally:
        fed.close()
