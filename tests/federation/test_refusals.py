"""Refusals on the link, against a real master over real mTLS: a tampered payload, an
unknown certificate, replayed / gapped sequences, a dc claiming another datacenter's
agents, a frame naming another dc, stale or tampered snapshots at a dc. Each refusal has
a reason code and an event, applies nothing, and the link stays up for good traffic."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from prometheus_client import CollectorRegistry

from ee.actors.directory import AgentDirectory
from ee.federation import pki
from ee.federation.dc import DcFederation, enroll
from ee.federation.master import FederationSettings
from ee.federation.wire import Snapshot, open_envelope, seal
from ee.protocol.signing import load_private_key

from .fedkit import CpProc, event_log, join_token, master, refused

LABEL = "sim:rogue"

Send = Callable[[Any], Awaitable[None]]
Recv = Callable[[], Awaitable[dict[str, Any]]]


def _agent(dc: str = LABEL) -> dict[str, Any]:
    return {"status": "online", "verdict": "pass", "datacenter": dc, "node_size": "standard",
            "free": True, "deployments": {}}


def _events(*events: tuple[int, dict[str, Any]], dc: str = LABEL, last: int = 0
            ) -> dict[str, Any]:
    return {"type": "events", "dc": dc, "spool_depth": 0, "snapshot_version": 0,
            "sent_at": 0.0, "last_seq": max([last, *(s for s, _ in events)]),
            "events": [{"seq": s, "kind": "agents", "at": 0.0, "data": {"agents": a}}
                       for s, a in events]}


@asynccontextmanager
async def link(home: Path, cert: Path | None = None) -> AsyncIterator[tuple[Send, Recv]]:
    d = home / "federation"
    enrolment = json.loads((d / "enrollment.json").read_text())
    key = load_private_key(d / "sign.key")
    master_key = pki_master_key(enrolment["master_key"])
    ctx = pki.client_context(cert or d / "dc.pem", d / "dc.key", d / "ca.pem")
    async with trio_websocket.open_websocket_url(enrolment["stream_url"],
                                                 ssl_context=ctx) as ws:

        async def send(body: Any) -> None:
            await ws.send_message(body if isinstance(body, str) else seal(body, key))

        async def recv() -> dict[str, Any]:
            while True:
                body = open_envelope(await ws.get_message(), master_key)
                if body["type"] != "snapshot":
                    return body

        yield send, recv


def pki_master_key(hex_key: str) -> Any:
    from ee.protocol.signing import public_key_from_bytes

    return public_key_from_bytes(bytes.fromhex(hex_key))


def _leaf(ca: pki.ClusterCa, stem: Path, trusted: Path) -> ssl.SSLContext:
    """A client context with a fresh key and a certificate from *ca* for LABEL."""
    key = pki.new_key()
    pki.save_key(stem.with_suffix(".key"), key)
    stem.with_suffix(".pem").write_text(pki.cert_pem(ca.issue(LABEL, pki.public_pem(key))))
    return pki.client_context(stem.with_suffix(".pem"), stem.with_suffix(".key"), trusted)


async def _tls_refused(ctx: ssl.SSLContext, url: str) -> bool:
    """True when the master closes the connection without answering the upgrade."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    try:
        stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=ctx)
        async with stream:
            await stream.send_all(b"GET /api/v2/federation/stream HTTP/1.1\r\nHost: x\r\n"
                                  b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                  b"Sec-WebSocket-Version: 13\r\n\r\n")
            return await stream.receive_some(4096) == b""
    except (trio.BrokenResourceError, ssl.SSLError, OSError):
        return True


async def _view(m: CpProc) -> dict[str, Any]:
    return (await m.datacenters())[LABEL]


async def _enroll(m: CpProc, home: Path) -> None:
    token = await join_token(m, LABEL)
    await trio.to_thread.run_sync(partial(enroll, home, m.http, LABEL, token, dev=True))


@asynccontextmanager
async def rogue_master(tmp_path: Path) -> AsyncIterator[tuple[CpProc, Path]]:
    """A master process, and a dc home enrolled with it whose link the test speaks
    itself (``link``); the master stops at the end."""
    m = master(tmp_path)
    home = tmp_path / "rogue"
    await m.start()
    try:
        await _enroll(m, home)
        yield m, home
    finally:
        await m.stop()


async def test_link_refusals(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with rogue_master(tmp_path) as (m, home):
            async with event_log(m) as seen, link(home) as (send, recv):
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert await recv() == {"type": "ack", "upto": 0}
                await send(_events((1, {"ag-1": _agent()})))
                assert await recv() == {"type": "ack", "upto": 1}

                # Tampered after signing: refused, nothing applied.
                d = home / "federation"
                text = seal(_events((2, {"ag-t": _agent()})), load_private_key(d / "sign.key"))
                await send(text.replace('"ag-t"', '"ag-T"'))
                assert (await recv())["code"] == "bad_signature"

                # Replayed sequence (new content under an applied seq): refused.
                await send(_events((1, {"ag-r": _agent()})))
                answer = await recv()
                assert answer["type"] == "refused" and answer["code"] == "sequence_replayed"
                assert await recv() == {"type": "ack", "upto": 1}

                # Out of order: the master asks for a replay from the next sequence.
                await send(_events((5, {"ag-5": _agent()})))
                assert await recv() == {"type": "replay", "start": 2, "reason": "sequence_gap"}
                assert await recv() == {"type": "ack", "upto": 1}

                # Another datacenter's agents: the event is consumed, nothing of it applied.
                await send(_events((2, {"ag-f": _agent(), "ag-g": _agent("sim:other")})))
                answer = await recv()
                assert answer["code"] == "foreign_datacenter_agents"
                assert await recv() == {"type": "ack", "upto": 2}

                # A frame naming another dc on this dc's link.
                await send(_events((3, {"ag-m": _agent("sim:other")}), dc="sim:other"))
                assert (await recv())["code"] == "datacenter_mismatch"

                view = await _view(m)
                assert view["agents"]["total"] == 1 and view["applied_seq"] == 2
                assert view["events_applied"] == 1  # seq 1 only; seq 2 was refused

                # The link is still up for good traffic.
                await send(_events((3, {"ag-3": _agent()})))
                assert await recv() == {"type": "ack", "upto": 3}
                view = await _view(m)
                assert view["agents"]["total"] == 2 and view["events_applied"] == 2
                await trio.sleep(0.3)
            for code in ("bad_signature", "sequence_replayed", "sequence_gap",
                         "foreign_datacenter_agents", "datacenter_mismatch"):
                assert refused(seen, code), code
            async with m.client() as c:
                metrics = (await c.get("/metrics")).text
            assert f'ee_federation_sequence_errors_total{{datacenter="{LABEL}"}} 2.0' in metrics
            assert f'ee_federation_replays_total{{datacenter="{LABEL}"}} 1.0' in metrics


async def test_unknown_certificates(tmp_path: Path) -> None:
    m = master(tmp_path)
    home = tmp_path / "rogue"
    with trio.fail_after(90):
        await m.start()
        try:
            await _enroll(m, home)
            d = home / "federation"
            old_cert, old_key = tmp_path / "old.pem", tmp_path / "old.key"
            old_cert.write_bytes((d / "dc.pem").read_bytes())
            old_key.write_bytes((d / "dc.key").read_bytes())
            # Re-join: a new certificate is pinned; the old one (CA-signed) is unknown now.
            (d / "enrollment.json").unlink()
            await _enroll(m, home)
            url = json.loads((d / "enrollment.json").read_text())["stream_url"]
            async with event_log(m) as seen:
                # CA-signed for this label, but not the certificate pinned for it.
                ca = pki.ClusterCa.load_or_create(m.data_dir / "federation", "x")
                assert await _tls_refused(_leaf(ca, tmp_path / "s", d / "ca.pem"), url)
                # The certificate this dc had before it re-joined.
                ctx = pki.client_context(old_cert, old_key, d / "ca.pem")
                assert await _tls_refused(ctx, url)
                # A certificate from another CA: the TLS handshake itself fails.
                other = pki.ClusterCa.load_or_create(tmp_path / "other-ca", "other")
                assert await _tls_refused(_leaf(other, tmp_path / "o", d / "ca.pem"), url)
                await trio.sleep(0.3)
            assert len(refused(seen, "unknown_certificate")) == 3
            assert (await _view(m))["events_applied"] == 0
            # The pinned (new) certificate still links.
            async with link(home) as (send, recv):
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert (await recv())["type"] == "ack"
        finally:
            await m.stop()


async def enrolled_home(tmp_path: Path) -> tuple[Path, Any]:
    """A dc home enrolled with a master that is gone again, and that master's key."""
    m = master(tmp_path)
    home = tmp_path / "dc"
    with trio.fail_after(60):
        await m.start()
        try:
            await _enroll(m, home)
        finally:
            await m.stop()
    return home, load_private_key(m.data_dir / "federation" / "master.key")


async def test_dc_refuses_stale_and_tampered_snapshots(tmp_path: Path) -> None:
    home, master_key = await enrolled_home(tmp_path)
    events: list[tuple[str, str, Any]] = []
    fed = DcFederation(home, LABEL, FederationSettings(), directory=AgentDirectory(),
                       emit=lambda k, s, d: events.append((k, s, d)),
                       metrics=CollectorRegistry())
    try:
        def snap(version: int) -> str:
            return seal(Snapshot("snapshot", version, 0.0, {"policy": {"v": version}}),
                        master_key)

        assert await fed.offer_snapshot(snap(2)) is None
        assert fed.snapshot.version == 2
        for stale in (snap(2), snap(1)):
            answer = await fed.offer_snapshot(stale)
            assert answer is not None and answer.code == "snapshot_stale"
        tampered = snap(3).replace('"v":3', '"v":4')
        answer = await fed.offer_snapshot(tampered)
        assert answer is not None and answer.code == "bad_signature"
        assert fed.snapshot.version == 2 and fed.snapshot.desired == {"policy": {"v": 2}}
        codes = [d["code"] for k, _, d in events if k == "federation.refused"]
        assert codes == ["snapshot_stale", "snapshot_stale", "bad_signature"]
        # Applied snapshots survive a restart (kept signed in the spool).
        fed.close()
        fed = DcFederation(home, LABEL, FederationSettings(), directory=AgentDirectory(),
                           emit=lambda k, s, d: None, metrics=CollectorRegistry())
        assert fed.snapshot.version == 2
    finally:
        fed.close()
