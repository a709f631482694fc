"""The agent's CP session against a real in-process CP, plus the pure backoff rules."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio
import trio_websocket

from ee.agent.backoff import GiveUp, ReconnectPolicy, backoff_delay
from ee.agent.server import Agent
from ee.agent.session import Outcome, SessionLoop, Terminated
from ee.cp.nodes import Vocabulary
from ee.protocol.messages import (
    Attest,
    Attestation,
    ErrorMessage,
    Heartbeat,
    LogsReply,
    LogsRequest,
    Snapshot,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
)
from ee.protocol.reportdata import registration_report_data

from .agentkit import (
    StandInCp,
    agent_config,
    eventually,
    free_port,
    quote_report_data,
    running_agent,
    running_cp,
)

FAST_CP = {"heartbeat_interval_s": 0.2, "stale_after_s": 1.0, "offline_after_s": 2.0}

# -- pure backoff ------------------------------------------------------------------------


def test_backoff_delay_is_bounded_exponential_with_equal_jitter() -> None:
    assert [backoff_delay(n, 1.0, 8.0, 1.0) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert [backoff_delay(n, 1.0, 8.0, 0.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff_delay(3, 1.0, 8.0, 0.5) == 3.0
    assert backoff_delay(10_000, 1.0, 60.0, 1.0) == 60.0  # no overflow
    assert backoff_delay(2, 1.0, 8.0, 7.0) == 2.0  # jitter is clamped
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 8.0, 0.5)


def test_reconnect_policy_counts_failures_and_gives_up() -> None:
    policy = ReconnectPolicy(base=1.0, cap=4.0, max_attempts=3)
    policy.reached(0.0)
    assert policy.failed(1.0, 1.0) == 1.0
    assert policy.failed(2.0, 1.0) == 2.0
    policy.reached(3.0)  # a session was registered: the count starts again
    assert policy.failed(4.0, 1.0) == 1.0
    assert policy.failed(5.0, 1.0) == 2.0
    verdict = policy.failed(6.0, 1.0)
    assert isinstance(verdict, GiveUp) and "3 consecutive" in verdict.reason


def test_reconnect_policy_unreachable_deadline() -> None:
    policy = ReconnectPolicy(base=1.0, cap=4.0, unreachable_after=10.0)
    policy.reached(100.0)
    assert policy.failed(105.0, 0.0) == 0.5
    assert policy.check_unreachable(109.9) is None
    verdict = policy.failed(110.0, 0.0)
    assert isinstance(verdict, GiveUp) and "not reached for 10 s" in verdict.reason


class _NoHost:
    """A session host the scripted loop below never calls."""


async def test_session_loop_backoff_timing(autojump_clock: trio.abc.Clock) -> None:
    loop = SessionLoop(_NoHost(), "ws://unused", ReconnectPolicy(base=1.0, cap=8.0,  # type: ignore[arg-type]
                       max_attempts=6), jitter=lambda: 1.0)
    times: list[float] = []

    async def failing_attempt() -> Outcome:
        times.append(trio.current_time())
        return Outcome(False, "refused")

    loop.attempt = failing_attempt  # type: ignore[method-assign]
    start = trio.current_time()
    with pytest.raises(Terminated, match="6 consecutive connection attempts failed"):
        await loop.run()
    assert [t - start for t in times] == [0, 1, 3, 7, 15, 23]


async def test_session_loop_resets_after_a_session_and_honours_reconnect(
    autojump_clock: trio.abc.Clock,
) -> None:
    script = [
        Outcome(False, "refused"),
        Outcome(False, "refused"),
        Outcome(True, "closed"),  # the CP was reached: the backoff starts over
        Outcome(True, "cp restarting", reconnect_after=5.0),  # not a failure
        Outcome(False, "refused"),
        Outcome(False, "refused"),
        Outcome(False, "refused"),
    ]
    times: list[float] = []

    async def scripted() -> Outcome:
        times.append(trio.current_time())
        return script[len(times) - 1]

    loop = SessionLoop(_NoHost(), "ws://unused", ReconnectPolicy(base=1.0, cap=8.0,  # type: ignore[arg-type]
                       max_attempts=3), jitter=lambda: 1.0)
    loop.attempt = scripted  # type: ignore[method-assign]
    with pytest.raises(Terminated):
        await loop.run()
    start = times[0]
    # waits: 1, 2 (failures), 1 (after a session), 5 + 1 jitter (reconnect), 1, 2, give up
    assert [t - start for t in times] == [0, 1, 3, 4, 10, 11, 13]


async def test_unreachable_terminates_under_autojump_clock(
    autojump_clock: trio.abc.Clock,
) -> None:
    loop = SessionLoop(_NoHost(), "ws://unused", ReconnectPolicy(  # type: ignore[arg-type]
        base=1.0, cap=4.0, unreachable_after=30.0), jitter=lambda: 1.0)

    async def failing_attempt() -> Outcome:
        return Outcome(False, "refused")

    loop.attempt = failing_attempt  # type: ignore[method-assign]
    start = trio.current_time()
    with pytest.raises(Terminated, match="not reached for"):
        await loop.run()
    assert 30.0 <= trio.current_time() - start <= 34.0


# -- against the real CP -------------------------------------------------------------------


async def test_registers_heartbeats_and_answers_cp_requests(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST_CP) as env:
            config = agent_config(tmp_path / "agent", env.agent_url)
            async with running_agent(config) as agent:
                listed = await eventually(lambda: _online(env, config.vm_name))
                assert listed["agent_id"] == agent.agent_id
                assert listed["attestation"]["verdict"] == "pass"
                assert listed["attestation"]["provider"] == "sim"
                await trio.sleep(2.5)  # past offline_after_s: heartbeats keep it online
                listed = await _online(env, config.vm_name)
                assert listed and listed["heartbeat_seq"] >= 5
                assert listed["health"]["status"] == "healthy"

                assert agent.agent_id is not None
                link = env.cp.plane.link_for(agent.agent_id)
                assert link is not None
                snapshot = await link.request(SnapshotRequest(), 5)
                assert isinstance(snapshot, Snapshot)
                assert snapshot.deployments == () and snapshot.node.node_size == "standard"
                assert snapshot.seq >= 5

                nonce = secrets.token_bytes(32)
                attestation = await link.request(Attest(nonce=nonce), 5)
                assert isinstance(attestation, Attestation) and attestation.provider == "sim"
                assert quote_report_data(attestation.quote) == registration_report_data(
                    nonce, agent.public_key)

                logs = await link.request(LogsRequest(), 5)
                assert logs == LogsReply(lines=(), truncated=False)
                stats = await link.request(StatsRequest(), 5)
                assert isinstance(stats, StatsReply) and stats.containers == ()
                assert stats.node.memory_total_mb > 0 and stats.node.uptime_s > 0


async def _online(env: object, vm_name: str | None) -> dict[str, object] | None:
    agents = await env.agents()  # type: ignore[attr-defined]
    for entry in agents:
        if entry["vm_name"] == vm_name and entry["status"] == "online":
            return entry  # type: ignore[no-any-return]
    return None


async def test_cp_restart_agent_reconnects_with_same_agent_id(tmp_path: Path) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/api/v2/agents/connect"
    config = agent_config(tmp_path / "agent", url,
                          reconnect_backoff_base_s=0.1, reconnect_backoff_max_s=0.5)
    agent = Agent(config)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            async with running_cp(tmp_path / "cp", agent_port=port, **FAST_CP) as env:
                await nursery.start(agent.run)
                first = await eventually(lambda: _online(env, config.vm_name))
                # leaving this block stops the CP gracefully: it sends `reconnect`
            loop = agent.session_loop
            assert loop is not None
            # the CP said goodbye gracefully (`reconnect`), so this was no failed attempt
            last = await eventually(lambda: loop.last_outcome)
            assert last.registered and last.reconnect_after is not None
            async with running_cp(tmp_path / "cp", agent_port=port, **FAST_CP) as env2:
                again = await eventually(lambda: _online(env2, config.vm_name), timeout=30)
                assert again["agent_id"] == first["agent_id"] == agent.agent_id
                assert loop.sessions == 2  # a new session: a fresh challenge
                agent.request_stop()


async def test_rejection_is_a_failed_attempt_then_terminal_action(tmp_path: Path) -> None:
    marker = tmp_path / "powered-off"
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", vocabulary=Vocabulary()) as env:
            config = agent_config(
                tmp_path / "agent", env.agent_url, node_size="no-such-size",
                reconnect_max_attempts=3, terminal_action="poweroff",
                poweroff_command=("sh", "-c", f"echo off > {marker}"))
            agent = Agent(config)
            with pytest.raises(Terminated, match="3 consecutive"):
                await agent.run()
            assert agent.session_loop is not None and agent.session_loop.attempts == 3
            last = agent.session_loop.last_outcome
            assert last is not None and last.reason.startswith("rejected: ")
            assert marker.read_text() == "off\n"
            assert await env.agents() == []


async def test_unreachable_cp_exits_after_max_attempts(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/api/v2/agents/connect"  # nobody listens
    config = agent_config(tmp_path / "agent", url, reconnect_max_attempts=4)
    agent = Agent(config)
    with trio.fail_after(30), pytest.raises(Terminated) as info:
        await agent.run()
    assert "4 consecutive connection attempts failed" in str(info.value)
    assert "cannot connect" in str(info.value)


# -- against a stand-in peer ---------------------------------------------------------------


async def test_session_outlives_the_handshake_deadline_and_survives_bad_frames(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp(heartbeat_s=0.1).run)
            agent = Agent(agent_config(tmp_path / "agent", peer.url))
            loop = SessionLoop(agent, peer.url, ReconnectPolicy(base=0.1, cap=0.1),
                               handshake_timeout=0.5)
            nursery.start_soon(loop.run)
            await eventually(lambda: agent.link is not None)
            await trio.sleep(1.0)  # twice the handshake deadline
            assert loop.sessions == 1 and agent.link is not None
            beats = [m for _, m in peer.frames if isinstance(m, Heartbeat)]
            assert len(beats) >= 5 and [b.seq for b in beats] == sorted(b.seq for b in beats)

            await peer.send_raw('{"type": "deploy", "body": {"deployment_id": 5}}')
            # (the stand-in proves nothing: the agent said so first, ENVELOPE_MISSING)
            _, error = await peer.wait_for(
                lambda f, m: isinstance(m, ErrorMessage) and m.code == "bad_frame")
            assert isinstance(error, ErrorMessage) and error.code == "bad_frame"
            assert "deployment_id" in error.message
            frame_id = await peer.send(SnapshotRequest(), with_id=True)
            _, snapshot = await peer.wait_for(lambda f, m: f.re == frame_id)
            assert isinstance(snapshot, Snapshot) and loop.sessions == 1
            nursery.cancel_scope.cancel()


async def test_handshake_deadline(tmp_path: Path) -> None:
    async def silent(request: trio_websocket.WebSocketRequest) -> None:
        await request.accept()
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, silent, "127.0.0.1", 0,
                                         None)
            url = f"ws://127.0.0.1:{server.port}/api/v2/agents/connect"
            agent = Agent(agent_config(tmp_path / "agent", url))
            loop = SessionLoop(agent, url, ReconnectPolicy(base=0.1, cap=0.1),
                               handshake_timeout=0.3)
            outcome = await loop.attempt()
            assert not outcome.registered
            assert outcome.reason == "handshake did not finish within 0.3 s"
            nursery.cancel_scope.cancel()


def test_public_url(tmp_path: Path) -> None:
    local = Agent(agent_config(tmp_path / "a", "ws://127.0.0.1:9/api/v2/agents/connect",
                               listen="127.0.0.1:8123"))
    assert local.public_url() == "http://127.0.0.1:8123"
    wildcard = Agent(agent_config(tmp_path / "b", "ws://127.0.0.1:9/api/v2/agents/connect",
                                  listen="0.0.0.0:8124"))
    assert wildcard.public_url() == "http://127.0.0.1:8124"  # the address that reaches the CP


async def test_each_session_sends_a_fresh_cp_nonce(tmp_path: Path) -> None:
    """The CP's proof must bind a nonce the agent chose for *this* session."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp(heartbeat_s=0.1).run)
            agent = Agent(agent_config(tmp_path / "agent", peer.url))
            loop = SessionLoop(agent, peer.url, ReconnectPolicy(base=0.05, cap=0.1))
            nursery.start_soon(loop.run)
            await eventually(lambda: agent.link is not None)
            assert peer.ws is not None
            await peer.ws.aclose(1012, "again")
            await eventually(lambda: len(peer.registers) == 2)
            nonces = [r.cp_nonce for r in peer.registers]
            assert all(n is not None and len(n) == 32 for n in nonces)
            assert nonces[0] != nonces[1]
            nursery.cancel_scope.cancel()


async def test_cp_leaving_while_its_proof_is_judged_is_a_reached_session(tmp_path: Path) -> None:
    """``registered`` then, at once, ``reconnect`` and a close: the agent is judging
    the (absent) proof and telling the CP so; the attempt still counts as registered
    and the ``reconnect`` is honoured, not lost."""
    from datetime import UTC, datetime, timedelta

    from ee.protocol import decode_message, encode_message
    from ee.protocol.messages import Challenge, Reconnect, Registered

    async def hasty(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(encode_message(Challenge(
            nonce=secrets.token_bytes(32), expires_at=datetime.now(UTC) + timedelta(seconds=30))))
        decode_message(await ws.get_message(), max_bytes=1 << 24, sender="agent")
        await ws.send_message(encode_message(Registered(
            agent_id="ag-hasty", heartbeat_interval_s=10, attest_interval_s=3600)))
        await ws.send_message(encode_message(Reconnect(reason="bye", after_s=1.0)))
        await ws.aclose(1012, "restarting")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, hasty, "127.0.0.1", 0,
                                         None)
            url = f"ws://127.0.0.1:{server.port}/api/v2/agents/connect"
            agent = Agent(agent_config(tmp_path / "agent", url))
            loop = SessionLoop(agent, url, ReconnectPolicy(base=0.1, cap=0.1))
            for _ in range(5):
                outcome = await loop.attempt()
                assert outcome.registered, outcome
            nursery.cancel_scope.cancel()
