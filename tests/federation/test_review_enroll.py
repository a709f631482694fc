"""Attacker's review of dc enrolment and fresh proofs (issue 15).

- A join answer (or offline bundle) whose ``ca`` holds the real CA *and* a second,
  attacker's CA: the pin covers the first certificate only, and the dc's link trusted
  every certificate of ``ca.pem``. Refused now, nothing written; what is kept is the
  re-encoded certificate that was checked.
- The public join route answered 500 to deeply nested JSON and to a lone surrogate in
  a field; now 400.
- Two concurrent joins with general tokens for one label: the second replaced the keys
  the first had just pinned (the enrolled check ran before the await only).
- A fresh proof whose summary names another datacenter's agent was verified by the
  master for this dc.
"""

from __future__ import annotations

import http.server
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from ee.attestation import Policy, Verifier
from ee.attestation.eventlog import RuntimeEvent, replay_runtime
from ee.attestation.providers.sim import SimTD
from ee.cp.nodes import Vocabulary
from ee.cp.registration import Judge
from ee.federation import master as master_mod
from ee.federation import pki, routes
from ee.federation.dc import (
    EnrolError,
    Enrollment,
    enroll,
    install_bundle,
    read_request,
    write_request,
)
from ee.federation.master import (
    FederationSettings,
    JoinRefused,
    JoinRequest,
    MasterFederation,
)
from ee.protocol.reportdata import registration_report_data
from ee.protocol.signing import generate_signing_key, public_key_bytes
from ee.runtime import Registry

from .fedkit import event_log, eventually, master
from .test_freshproof import _body, _key

A = "sim:dc-a"


def _files(home: Path) -> list[str]:
    fed = home / "federation"
    return sorted(str(p.relative_to(fed)) for p in fed.rglob("*")) if fed.exists() else []


# ---- a second CA in the answer ---------------------------------------------------------

def test_a_second_ca_in_the_answer_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "dc"
    req = json.loads(write_request(home, A, tmp_path / "req.json").read_text())
    real = pki.ClusterCa.load_or_create(tmp_path / "real-ca", "real")
    evil = pki.ClusterCa.load_or_create(tmp_path / "evil-ca", "evil")
    master_key = public_key_bytes(generate_signing_key()).hex()
    pin = pki.master_pin(pki.cert_pem(real.cert), master_key)
    good = {"format": "ee/v2/federation/enroll-bundle/1", "datacenter": A,
            "certificate": pki.cert_pem(real.issue(A, req["tls_public_key"])),
            "ca": pki.cert_pem(real.cert), "master_key": master_key,
            "stream_url": "wss://127.0.0.1:8002/api/v2/federation/stream",
            "cluster_id": "c1"}
    pending = ["pending", "pending/dc.key", "pending/sign.key"]
    for what, body in {
        "the attacker's CA appended": {**good, "ca": good["ca"] + pki.cert_pem(evil.cert)},
        "a certificate chain": {**good, "certificate": good["certificate"]
                                + pki.cert_pem(evil.cert)},
    }.items():
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(body))
        with pytest.raises(EnrolError, match="exactly one PEM certificate"):
            install_bundle(home, "https://m", A, bad, pin)
        assert _files(home) == pending, what
    # The real one is kept as the single, re-encoded certificate that was checked.
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({**good, "ca": "leading text\n" + good["ca"]}))
    assert install_bundle(home, "https://m", A, ok, pin) == Enrollment.load(home / "federation")
    kept = (home / "federation" / "ca.pem").read_text()
    assert kept == pki.cert_pem(real.cert) and kept.count("BEGIN") == 1


# ---- the public join route -------------------------------------------------------------

async def test_join_route_odd_bodies_are_400(tmp_path: Path) -> None:
    m = master(tmp_path)
    with trio.fail_after(60):
        await m.start()
        try:
            key = pki.public_pem(pki.new_key())
            async with httpx.AsyncClient(base_url=m.http, timeout=10) as c:
                url = "/api/v2/federation/join"
                nested = await c.post(url, content=b"[" * 8000,
                                      headers={"Content-Type": "application/json"})
                assert nested.status_code == 400, nested.text
                body = json.dumps(pki.join_body("eej_x", "sim:@", key, "a" * 64)
                                  ).replace("@", "\\ud800")
                lone = await c.post(url, content=body.encode(),
                                    headers={"Content-Type": "application/json"})
                assert lone.status_code == 400, lone.text
                assert lone.json()["error"]["code"] == "bad_request"
                health = await c.get("/api/v2/health")
                assert health.status_code == 200
        finally:
            await m.stop()


# ---- concurrent joins ------------------------------------------------------------------

async def test_concurrent_general_joins_do_not_replace_keys(tmp_path: Path) -> None:
    fed = MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda *_: None, metrics=CollectorRegistry())

    async def no_actor(_: str) -> None:
        return None

    fed._ensure_actor = no_actor  # type: ignore[method-assign]
    tokens = [fed.issue_token(None, None)["token"] for _ in range(2)]
    outcomes: list[str] = []

    async def join(token: str) -> None:
        req = JoinRequest(**pki.join_body(token, A, pki.public_pem(pki.new_key()),
                                          public_key_bytes(generate_signing_key()).hex()))
        try:
            out = await fed.join(req)
            outcomes.append("joined " + out["certificate"])
        except JoinRefused as exc:
            outcomes.append(exc.code)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(join, token)
    assert sorted(o.split(" ")[0] for o in outcomes) == ["join_token_unbound", "joined"]
    winner = next(o for o in outcomes if o.startswith("joined "))
    assert pki.fingerprint(pki.x509.load_pem_x509_certificate(
        winner.removeprefix("joined ").encode()).public_bytes(
            pki.serialization.Encoding.DER)) == fed.enrolled[A].fingerprint


# ---- a fresh proof named for another datacenter ----------------------------------------

async def test_fresh_proof_of_another_datacenter_is_refused() -> None:
    td = SimTD.create()
    now = time.time()
    judge = Judge(cluster_id="c", vocabulary=Vocabulary(), verifier=Verifier([td.root_cert]),
                  policy=Policy(), collateral=td.collateral(issued_at=now - 60))
    nonce = bytes(range(32))
    key = _key()
    body: dict[str, Any] = _body(td, td.quote(registration_report_data(nonce, key)), key)
    emitted: list[tuple[str, str, Any]] = []
    cp = SimpleNamespace(judge=lambda: judge)
    fed = SimpleNamespace(verify_limiter=trio.CapacityLimiter(1),
                          emit=lambda *a: emitted.append(a))
    reported = {"mrtd": td.mr_td.hex()}
    with trio.fail_after(30):
        own = await routes._verified(cp, fed, A, nonce, body, reported)  # type: ignore[arg-type]
        assert own["verified_by_master"]["ok"] is True, own
        # dc-b answers with the same genuine evidence, naming the agent as dc-a's.
        other = await routes._verified(cp, fed, "sim:dc-b", nonce, body,  # type: ignore[arg-type]
                                       reported)
    got = other["verified_by_master"]
    assert got["ok"] is False and got["code"] == "proof_mismatch", got
    assert [e[:2] for e in emitted] == [("federation.proof_refused", "sim:dc-b")]


# ---- hostile sizes and leftovers -------------------------------------------------------

FLOOD = 40 << 20  # what a hostile source offers; a capped reader takes far less


class _Flood(http.server.BaseHTTPRequestHandler):
    sent = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(FLOOD))
        self.end_headers()
        chunk = b" " * (64 << 10)
        try:
            while _Flood.sent < FLOOD:
                self.wfile.write(chunk)
                _Flood.sent += len(chunk)
        except OSError:
            return

    def log_message(self, *_: Any) -> None:
        return None


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, doc: Any) -> None:
    """A stand-in upstream's JSON answer."""
    body = json.dumps(doc).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A stand-in upstream on a loopback port, in a thread; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_huge_join_answer_is_not_read_whole(tmp_path: Path) -> None:
    with serving(_Flood) as url, pytest.raises(EnrolError, match="larger than"):
        enroll(tmp_path, url, A, "eej_x",
               timeout_s=10, dev=True)
    assert _Flood.sent < FLOOD // 4, _Flood.sent
    assert _files(tmp_path) == []


def test_a_bundle_path_naming_a_fifo_is_read_capped(tmp_path: Path) -> None:
    home = tmp_path / "dc"
    write_request(home, A, tmp_path / "req.json")
    fifo = tmp_path / "bundle"
    os.mkfifo(fifo)
    sent = [0]

    def flood() -> None:
        try:
            with fifo.open("wb") as f:
                while sent[0] < FLOOD:
                    f.write(b" " * (64 << 10))
                    sent[0] += 64 << 10
        except OSError:
            return

    for read in (lambda: install_bundle(home, "https://m", A, fifo, "0" * 64),
                 lambda: read_request(fifo)):  # eectl federation issue --request
        sent[0] = 0
        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        with pytest.raises(EnrolError, match="larger than"):
            read()
        thread.join(10)
        assert sent[0] < FLOOD // 4, sent[0]


def test_a_leftover_tmp_file_does_not_loosen_a_key(tmp_path: Path) -> None:
    path = tmp_path / "federation" / "dc.key"
    path.parent.mkdir()
    leftover = path.with_suffix(".key.tmp")
    leftover.write_bytes(b"")
    leftover.chmod(0o644)
    pki.save_key(path, pki.new_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_strangers_cannot_flood_the_events(tmp_path: Path) -> None:
    """30 garbage connections to the federation listener and 30 bad joins: at most the
    burst of refusal events; the next one, after a refill, counts the ones left out."""
    m = master(tmp_path)
    body = pki.join_body("eej_guess", A, pki.public_pem(pki.new_key()), "a" * 64)

    def stranger(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("kind") == "federation.refused"]

    with trio.fail_after(60):
        await m.start()
        try:
            async with event_log(m) as events, \
                    httpx.AsyncClient(base_url=m.http, timeout=10) as c:
                for _ in range(30):
                    tcp = await trio.open_tcp_stream("127.0.0.1", m.fed_port)
                    await tcp.send_all(b"not TLS\r\n\r\n")
                    await tcp.aclose()
                for _ in range(30):
                    r = await c.post("/api/v2/federation/join", json=body)
                    assert r.status_code == 401, r.text

                async def settled() -> bool:  # every garbage handshake refused by now
                    return len(stranger(events)) >= master_mod.STRANGER_EVENT_BURST

                await eventually(settled, what="the burst of refusals")
                await trio.sleep(1 / master_mod.STRANGER_EVENTS_PER_S + 0.5)
                await c.post("/api/v2/federation/join", json=body)

                async def counted() -> bool:
                    return any("suppressed" in e["data"] for e in stranger(events))

                await eventually(counted, what="the suppressed count")
            got = stranger(events)
            assert len(got) <= master_mod.STRANGER_EVENT_BURST + 2, len(got)
            assert {e["data"]["code"] for e in got} <= {"unknown_certificate",
                                                         "join_token_invalid"}
            assert got[-1]["data"]["suppressed"] + len(got) == 61, got[-1]
        finally:
            await m.stop()


async def test_concurrent_joins_of_many_dcs_all_persist(tmp_path: Path) -> None:
    """Joins of different dcs at once: each saved dcs.json (one tmp file shared by
    concurrent writers made some joins 500 and could leave it torn or missing a dc)."""

    def fed() -> MasterFederation:
        return MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                                emit=lambda *_: None, metrics=CollectorRegistry())

    first = fed()

    async def no_actor(_: str) -> None:
        return None

    first._ensure_actor = no_actor  # type: ignore[method-assign]
    labels = [f"sim:dc-{i}" for i in range(24)]

    async def join(label: str) -> None:
        token = first.issue_token(label, None)["token"]
        await first.join(JoinRequest(**pki.join_body(
            token, label, pki.public_pem(pki.new_key()),
            public_key_bytes(generate_signing_key()).hex())))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for label in labels:
                nursery.start_soon(join, label)
    assert sorted(fed().enrolled) == sorted(labels)
    assert [p.name for p in (tmp_path / "federation").iterdir() if "tmp" in p.name] == []


async def test_tenant_replicas_say_whether_the_tds_run_the_deployment(
        tmp_path: Path) -> None:
    """A dc may show any genuine TD as a replica: ``runs_deployment`` is true only when
    the verified runtime log (replayed against RTMR3) names the deployment."""
    td = SimTD.create()
    now = time.time()
    events = [RuntimeEvent(type="deploy", app="acct.web", version="1",
                           deployment_id="dep-1", compose_hash="sha256:" + "ab" * 32)]
    measured = attrs.evolve(td, rtmrs=(*td.rtmrs[:3], replay_runtime(events)))
    judge = Judge(cluster_id="c", vocabulary=Vocabulary(),
                  verifier=Verifier([measured.root_cert]), policy=Policy(),
                  collateral=measured.collateral(issued_at=now - 60))
    fed = MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda *_: None, metrics=CollectorRegistry())
    asked: list[dict[str, Any]] = []

    async def ask(label: str, kind: str, **kw: Any) -> dict[str, Any]:
        nonce = bytes.fromhex(kw["args"]["nonce"])
        key = _key()
        quote = measured.quote(registration_report_data(nonce, key))
        log = "".join(e.canonical().decode() + "\n" for e in events)
        asked.append(kw)
        logged = len(asked) == 1  # the first answer with the runtime log, then without
        return {"replicas": [{**_body(measured, quote, key,
                                      runtime_log=log if logged else None),
                              "agent_id": "ag-1"},
                             {"agent_id": "ag-made-up"}]}  # not a replica: ignored

    fed.ask = ask  # type: ignore[method-assign]
    fed.intent_datacenter = lambda _d: A  # type: ignore[method-assign]
    fed.view = lambda _k, _d: {  # type: ignore[method-assign]
        "replicas": [{"agent_id": "ag-1"}], "compose_hash": "sha256:" + "ab" * 32}
    cp = SimpleNamespace(federation=fed, deployment_index={"dep-1": "acct.web"},
                         judge=lambda: judge)
    with trio.fail_after(30):
        view = await routes.tenant_attestation(cp, "acct", "dep-1")
        again = await routes.tenant_attestation(cp, "acct", "dep-1")
    assert view is not None and again is not None
    assert asked and asked[0]["deployment_id"] == "dep-1"
    assert [r["agent_id"] for r in view["replicas"]] == ["ag-1"]  # only its replicas
    [with_log], [without] = view["replicas"], again["replicas"]
    assert with_log["verified_by_master"]["ok"] is True, with_log["verified_by_master"]
    assert with_log["runs_deployment"] is True
    assert without["runs_deployment"] is False


class _Refuse(http.server.BaseHTTPRequestHandler):
    """A hostile upstream's refusal: terminal escapes, a forged line, a lot of it."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply(self, 403, {"error": {"code": "x", "message": "\x1b[2J\nINFO enrolled OK "
                                    + "A" * 20_000}})

    def log_message(self, *_: Any) -> None:
        return None


def test_a_refusal_text_from_the_upstream_is_one_printable_line(tmp_path: Path) -> None:
    with serving(_Refuse) as url, pytest.raises(EnrolError) as caught:
        enroll(tmp_path, url, A, "eej_x",
               timeout_s=10, dev=True)
    text = str(caught.value)
    assert "refused the join (403)" in text and text.isprintable() and len(text) < 600, text


async def test_idle_handshakes_cannot_hold_the_listener(tmp_path: Path) -> None:
    """Connections that never finish their TLS handshake hold at most
    MAX_PENDING_HANDSHAKES slots; one more is closed at once (not queued behind them),
    and the slots come back when the idle ones go."""
    m = master(tmp_path)
    cap = master_mod.MAX_PENDING_HANDSHAKES
    with trio.fail_after(60):
        await m.start()
        idle: list[trio.SocketStream] = []
        try:
            for _ in range(cap):
                idle.append(await trio.open_tcp_stream("127.0.0.1", m.fed_port))
            await trio.sleep(0.5)  # accepted and waiting in their handshakes
            extra = await trio.open_tcp_stream("127.0.0.1", m.fed_port)
            with trio.fail_after(5):  # closed at once, not after the 10 s handshake limit
                assert await extra.receive_some(100) == b""
            await extra.aclose()
            for tcp in idle:
                await tcp.aclose()
            idle.clear()
            await trio.sleep(0.5)
            probe = await trio.open_tcp_stream("127.0.0.1", m.fed_port)
            await probe.send_all(b"\x16\x03\x01\x00\x05hello")  # a (bad) handshake starts
            with trio.fail_after(5):
                await probe.receive_some(100)  # answered by the TLS layer (an alert)
            await probe.aclose()
        finally:
            for tcp in idle:
                await tcp.aclose()
            await m.stop()
