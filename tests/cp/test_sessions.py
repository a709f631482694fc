"""Agent sessions against a real CP: real websockets on port 0, sim quotes.

Time here is real (the network is real), so intervals are short and every wait is for
a condition under ``trio.fail_after`` — nothing asserts a duration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio_websocket
from cpkit import RunningCp, running_cp
from simagent import SimAgent

from ee.protocol import registration_report_data

FAST = {"heartbeat_interval_s": 0.2, "stale_after_s": 0.8, "offline_after_s": 2.5}


async def wait_until(check: Callable[[], Any], what: str, poll: float = 0.05) -> Any:
    """Poll an async/sync condition until truthy (the caller holds a fail_after)."""
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        await trio.sleep(poll)


async def agents_by_vm(env: RunningCp) -> dict[str, dict[str, Any]]:
    async with env.client() as http:
        r = await http.get("/api/v2/agents")
        assert r.status_code == 200, r.text
        return {a["vm_name"]: a for a in r.json()["agents"]}


async def test_fifty_agents_register_go_stale_and_come_back(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agents = [env.agent(f"vm-{i:02d}") for i in range(50)]
            for agent in agents:
                await nursery.start(agent.run)
            assert all(a.registered for a in agents)

            async def all_online() -> bool:
                view = await agents_by_vm(env)
                return len(view) == 50 and all(v["status"] == "online" for v in view.values())

            await wait_until(all_online, "all online")
            silent = agents[:10]
            for agent in silent:
                agent.paused = True

            async def ten_stale() -> bool:
                view = await agents_by_vm(env)
                stale = {n for n, v in view.items() if v["status"] == "stale"}
                return stale == {a.vm_name for a in silent}

            await wait_until(ten_stale, "ten stale")
            for agent in silent:
                agent.paused = False
            await wait_until(all_online, "back online")
            view = await agents_by_vm(env)
            assert {v["agent_id"] for v in view.values()} == {a.agent_id for a in agents}
            for v in view.values():
                assert v["attestation"]["verdict"] == "pass"
                assert v["attestation"]["tcb_status"] == "UpToDate"
                assert len(v["attestation"]["mrtd"]) == 96
            async with env.client() as http:
                dcs = (await http.get("/api/v2/datacenters")).json()["datacenters"]
            assert dcs == [{"datacenter": "local:dev",
                            "agents": {"total": 50, "online": 50, "stale": 0, "offline": 0,
                                       "quarantined": 0},
                            "attestation": {"pass": 50, "fail": 0}, "degraded": False,
                            "label": "local:dev", "mode": "direct", "sync_lag_s": 0.0,
                            "spool_depth": 0}]
            nursery.cancel_scope.cancel()


async def test_silent_agent_goes_offline_and_is_disconnected(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agent = env.agent("vm-quiet", heartbeats=False)
            await nursery.start(agent.run)

            async def offline() -> bool:
                return (await agents_by_vm(env))["vm-quiet"]["status"] == "offline"

            await wait_until(offline, "offline")
            await wait_until(lambda: agent.closed_code == 1001, "closed by the CP")
            nursery.cancel_scope.cancel()


# ---- hostile input -------------------------------------------------------------------

async def test_bad_frames_get_error_frames_then_close_1008(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            bystander = env.agent("vm-ok")
            await nursery.start(bystander.run)
            async with trio_websocket.open_websocket_url(env.agent_url) as ws:
                json.loads(await ws.get_message())  # challenge
                errors = []
                for bad in ("{not json", json.dumps({"type": "nonsense", "body": {}}),
                            json.dumps({"type": "register", "body": {"vm_name": 5}})):
                    await ws.send_message(bad)
                    try:
                        errors.append(json.loads(await ws.get_message()))
                    except trio_websocket.ConnectionClosed:
                        break
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1008
            assert [e["type"] for e in errors] == ["error", "error", "error"]
            assert "not valid JSON" in errors[0]["body"]["message"] or \
                "JSON" in errors[0]["body"]["message"]
            assert "nonsense" in errors[1]["body"]["message"]
            assert "vm_name" in errors[2]["body"]["message"]
            view = await agents_by_vm(env)
            assert view["vm-ok"]["status"] == "online"
            nursery.cancel_scope.cancel()


async def test_oversized_frames_close_1009(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", max_frame_bytes=4096) as env:
            async with trio_websocket.open_websocket_url(env.agent_url) as ws:
                await ws.get_message()
                codes = []
                for _ in range(3):
                    await ws.send_message(json.dumps({"type": "heartbeat",
                                                      "body": {"pad": "x" * 6000}}))
                    try:
                        codes.append(json.loads(await ws.get_message())["body"]["code"])
                    except trio_websocket.ConnectionClosed:
                        break
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1009
                assert codes == ["frame_too_large"] * 3
            # Far beyond the limit: trio-websocket itself closes with 1009, no buffering.
            async with trio_websocket.open_websocket_url(env.agent_url) as ws:
                await ws.get_message()
                await ws.send_message("y" * 50_000)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1009


async def register_with(env: RunningCp, agent: SimAgent) -> SimAgent:
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        nursery.cancel_scope.cancel()
    return agent


async def test_registration_refusals_carry_reason_codes(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", nonce_ttl_s=1.0) as env:
            other = Ed25519PrivateKey.generate().public_key().public_bytes(
                Encoding.Raw, PublicFormat.Raw)
            cases = {
                "UNKNOWN_NODE_SIZE": env.agent("vm-a", node_size="gigantic"),
                "BAD_DATACENTER": env.agent("vm-b", datacenter="no-colon"),
                "REPORTDATA_MISMATCH": env.agent(
                    "vm-c", quote_for=lambda nonce, _pk: env.td.quote(
                        registration_report_data(nonce, other))),
                "NODE_MISMATCH": env.agent("vm-d", node_size="llm", gpu=False),
            }
            for code, agent in cases.items():
                await register_with(env, agent)
                assert agent.rejected is not None, code
                assert agent.rejected.code == code, (code, agent.rejected)
                assert agent.rejected.reasons

            # A quote that is not a quote.
            junk = env.agent("vm-e", quote_for=lambda n, k: b"\x04\x00" + b"\x00" * 100)
            await register_with(env, junk)
            assert junk.rejected is not None and junk.rejected.code == "BAD_QUOTE"
            assert "offset" in junk.rejected.reasons[0]

            # Replay: a register captured from one session, sent on a new connection.
            captured: list[bytes] = []

            def capture(nonce: bytes, pk: bytes) -> bytes:
                quote = env.td.quote(registration_report_data(nonce, pk))
                captured.append(quote)
                return quote

            first = await register_with(env, env.agent("vm-f", quote_for=capture))
            assert first.registered is not None
            replay = env.agent("vm-f2", key=first.key, quote_for=lambda n, k: captured[0])
            await register_with(env, replay)
            assert replay.rejected is not None and replay.rejected.code == "NONCE_REPLAYED"

            # Expired: answer the challenge after its TTL.
            async with trio_websocket.open_websocket_url(env.agent_url) as ws:
                await ws.get_message()
                await trio.sleep(1.5)
                answer = json.loads(await ws.get_message())
                assert answer["type"] == "rejected"
                assert answer["body"]["code"] == "NONCE_EXPIRED"

            # Drift: a known VM comes back with another MRTD.
            ok = await register_with(env, env.agent("vm-g"))
            assert ok.registered is not None
            drifted = env.agent("vm-g", td=env.td.evolve(mr_td=b"\x11" * 48))
            await register_with(env, drifted)
            assert drifted.rejected is not None and drifted.rejected.code == "DRIFT"

            async with env.client() as http:
                r = await http.get("/metrics")
            assert 'ee_registrations_total{detail="DRIFT",outcome="rejected"} 1.0' in r.text


async def test_debug_td_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            debug = env.agent("vm-debug", td=env.td.evolve(debug=True))
            await register_with(env, debug)
            assert debug.rejected is not None
            assert debug.rejected.code == "ATTESTATION_FAILED"
            assert any("debug" in r.lower() for r in debug.rejected.reasons)


async def test_flooding_agent_does_not_stall_others(tmp_path: Path) -> None:
    from ee.protocol import encode_message
    from ee.protocol.messages import Health, Heartbeat, NodeStats

    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            calm = env.agent("vm-calm")
            await nursery.start(calm.run)
            flood = env.agent("vm-flood", heartbeats=False)
            await nursery.start(flood.run)
            frame = encode_message(Heartbeat(seq=1, health=Health(), stats=NodeStats()),
                                   id=None, re=None)
            sent = 0
            with trio.move_on_after(3):
                try:
                    while True:
                        assert flood.ws is not None
                        await flood.ws.send_message(frame)
                        sent += 1
                        if sent % 500 == 0:
                            await trio.lowlevel.checkpoint()
                except (trio_websocket.ConnectionClosed, AssertionError):
                    pass
            assert sent > 1000
            view = await agents_by_vm(env)
            assert view["vm-calm"]["status"] == "online"
            assert calm.seq > 3
            nursery.cancel_scope.cancel()


async def test_impostor_with_another_key_and_bad_vm_names_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            victim = env.agent("vm-victim")
            await nursery.start(victim.run)
            impostor = env.agent("vm-victim")  # same name, same measurements, new key
            await register_with(env, impostor)
            assert impostor.rejected is not None and impostor.rejected.code == "KEY_CHANGED"
            assert victim.closed_code is None  # the real VM keeps its session
            for name in ("x" * 64, "bad name", "../etc"):
                odd = await register_with(env, env.agent(name))
                assert odd.rejected is not None and odd.rejected.code == "BAD_VM_NAME"
            nursery.cancel_scope.cancel()


# ---- liveness, log hygiene, error frames (issue 11) -----------------------------------

async def test_only_heartbeats_keep_an_agent_alive(tmp_path: Path) -> None:
    """An agent that stopped heartbeating but keeps sending other frames (orphan
    replies, deploy_status for unknown deployments, an error frame) goes stale, then
    offline, and is disconnected, like a silent one."""
    from ee.protocol import encode_message
    from ee.protocol.messages import DeployStatus, LogsReply

    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agent = env.agent("vm-chatty", heartbeats=False)
            await nursery.start(agent.run)
            frames = [encode_message(DeployStatus(deployment_id="nope", state="running")),
                      encode_message(LogsReply(lines=()), re=424242),
                      json.dumps({"type": "error", "body": {"code": "c", "message": "m"}})]

            async def chatter() -> None:
                i = 0
                while agent.ws is not None:
                    # One error frame in all (they count as bad frames), then the rest.
                    frame = frames[2] if i == 3 else frames[i % 2]
                    try:
                        await agent.ws.send_message(frame)
                    except trio_websocket.ConnectionClosed:
                        return
                    i += 1
                    await trio.sleep(0.1)

            nursery.start_soon(chatter)
            seen: set[str] = set()

            async def offline() -> bool:
                status = (await agents_by_vm(env))["vm-chatty"]["status"]
                seen.add(status)
                return status == "offline"

            await wait_until(offline, "offline")
            assert "stale" in seen
            await wait_until(lambda: agent.closed_code == 1001, "closed by the CP")
            nursery.cancel_scope.cancel()


async def test_agent_strings_cannot_forge_or_flood_log_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO)
    forged = "\n2026-01-01 00:00:00,000 CRITICAL ee.cp: FORGED"
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agent = env.agent("vm-liar")
            await nursery.start(agent.run)
            assert agent.ws is not None
            for message in (forged, "x" * 200_000):
                await agent.ws.send_message(json.dumps(
                    {"type": "error", "body": {"code": "c" + forged, "message": message}}))
            # A refused registration quoting a hostile node size, too.
            liar = await register_with(env, env.agent("vm-size",
                                                      node_size="big" + forged + "z" * 50_000))
            assert liar.rejected is not None
            assert all("\n" not in r and len(r) < 400 for r in liar.rejected.reasons)

            def logged(text: str) -> list[str]:
                return [r.getMessage() for r in caplog.records if text in r.getMessage()]

            await wait_until(lambda: len(logged("reported error")) == 2, "both logged")
            await wait_until(lambda: logged("UNKNOWN_NODE_SIZE"), "refusal logged")
            for line in logged("reported error") + logged("UNKNOWN_NODE_SIZE"):
                assert "\n" not in line and len(line) < 1200, line[:200]
            assert "FORGED" in logged("reported error")[0]  # escaped, still visible
            nursery.cancel_scope.cancel()


async def test_unsolicited_error_frames_use_up_the_bad_frame_budget(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            agent = env.agent("vm-noisy")
            await nursery.start(agent.run)
            ws = agent.ws
            assert ws is not None
            for re in (None, 99, None):  # unsolicited, or answering nothing
                frame: dict[str, Any] = {"type": "error", "body": {"code": "x"}}
                if re is not None:
                    frame["re"] = re
                await ws.send_message(json.dumps(frame))
            await wait_until(lambda: agent.closed_code is not None, "closed")
            assert agent.closed_code == 1008
            nursery.cancel_scope.cancel()


async def test_error_frames_name_the_refused_frame_with_re(tmp_path: Path) -> None:
    from ee.protocol import encode_message
    from ee.protocol.messages import Health, Heartbeat, NodeStats

    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **FAST) as env:
            async with trio_websocket.open_websocket_url(env.agent_url) as ws:
                await ws.get_message()  # challenge
                await ws.send_message(encode_message(
                    Heartbeat(seq=1, health=Health(), stats=NodeStats()), id=41))
                before = json.loads(await ws.get_message())
                await ws.send_message(json.dumps({"type": "register", "id": 42,
                                                  "body": {"vm_name": 5}}))
                bad = json.loads(await ws.get_message())
            assert before["type"] == "error" and before["re"] == 41
            assert before["body"]["code"] == "register_first"
            assert bad["type"] == "error" and bad["re"] == 42
            assert "vm_name" in bad["body"]["message"]

            # After registration too: a frame the agent may not send, with an id.
            agent = env.agent("vm-asks")
            async with trio_websocket.open_websocket_url(env.agent_url) as ws:
                challenge = json.loads(await ws.get_message())
                await ws.send_message(encode_message(agent.register_message(
                    bytes.fromhex(challenge["body"]["nonce"]))))
                assert json.loads(await ws.get_message())["type"] == "registered"
                await ws.send_message(json.dumps(
                    {"type": "attestation", "id": 7,
                     "body": {"provider": "sim", "quote": "AAAA"}}))
                refused = json.loads(await ws.get_message())
            assert refused["type"] == "error" and refused["re"] == 7
            assert refused["body"]["code"] == "unexpected"
