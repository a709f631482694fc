"""Helpers for agent tests: a real in-process CP, a running agent, and a stand-in CP.

``running_cp`` runs the real ``ee.cp.server.ControlPlane`` (like tests/cp/cpkit.py,
but with the agent-plane port choosable, so a CP can be restarted where its agents
expect it). ``StandInCp`` is **not** the CP: a tiny websocket peer speaking the agent
session protocol that sends whatever frames a test gives it — ``deploy``/``undeploy``
the real CP would never send (a compose the CP's workload policy refuses, a reserved
env name: the agent must refuse them on its own) and ``registered.tunnel`` grants.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from ee.agent.config import AgentConfig
from ee.agent.platform import shared_sim_dir
from ee.agent.server import Agent
from ee.attestation import parse_quote
from ee.attestation.providers.sim import SimTD
from ee.cp.envelope import WriteSigner, make_prover
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, CpConfig, prepare
from ee.protocol import decode_message, encode_message, registration_report_data
from ee.protocol.frames import Frame
from ee.protocol.messages import (
    Challenge,
    Deploy,
    Message,
    Register,
    Registered,
    TunnelGrant,
    Undeploy,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the real CP ----------------------------------------------------------------------


@attrs.define
class RunningCp:
    cp: ControlPlane
    token: str
    data_dir: Path

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.cp.plane.bound_port}/api/v2/agents/connect"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.cp.http_port}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )

    async def agents(self) -> list[dict[str, Any]]:
        async with self.client() as http:
            r = await http.get("/api/v2/agents")
            assert r.status_code == 200, r.text
            agents: list[dict[str, Any]] = r.json()["agents"]
            return agents


@asynccontextmanager
async def running_cp(data_dir: Path, agent_port: int = 0, **overrides: Any) -> AsyncIterator[
    RunningCp
]:
    overrides.setdefault("quorum", Quorum(settle_timeout_s=5))
    config = CpConfig(data_dir=data_dir, listen="127.0.0.1:0",
                      agent_listen=f"127.0.0.1:{agent_port}", dev=True, **overrides)
    boot, _ = prepare(config)
    token = (data_dir / "admin.token").read_text().strip()
    cp = ControlPlane(config, boot)
    async with trio.open_nursery() as nursery:
        await nursery.start(cp.run)
        try:
            yield RunningCp(cp, token, data_dir)
        finally:
            cp.request_stop()


# --- agents -------------------------------------------------------------------------


def agent_config(data_dir: Path, cp_url: str | None = None, **changes: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "cp_url": cp_url,
        "listen": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "vm_name": f"vm-{secrets.token_hex(3)}",
        "attestation_provider": "sim",
        "sim_dir": str(shared_sim_dir()),
        "reconnect_backoff_base_s": 0.05,
        "reconnect_backoff_max_s": 0.2,
    }
    values.update(changes)
    return AgentConfig(**values)


@asynccontextmanager
async def running_agent(config: AgentConfig, **kwargs: Any) -> AsyncIterator[Agent]:
    agent = Agent(config, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        try:
            yield agent
        finally:
            agent.request_stop()


def agent_http(agent: Agent, secret: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{agent.http_port}", headers=headers,
                             timeout=30, trust_env=False)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    """Poll *check* (sync or async) until it returns something truthy."""
    with trio.fail_after(timeout):
        while True:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(every)


def quote_report_data(quote: bytes) -> bytes:
    return parse_quote(quote).report.report_data


# --- the stand-in CP ----------------------------------------------------------------


class StandInCp:
    """A websocket peer that admits any agent and lets the test send it frames.

    Stands in for the CP's deploy path (and for tunnel grants); it checks that the
    registration quote binds the nonce and key, and records every frame it receives.
    With ``prove`` (the default) it proves a write key with a sim quote bound to the
    agent's ``cp_nonce`` and signs every deploy/undeploy it sends, as the real CP does
    (`ee.cp.envelope`); without, it sends unsigned writes (an agent requiring envelopes
    refuses them).
    """

    def __init__(self, tunnel: TunnelGrant | None = None, heartbeat_s: float = 0.5,
                 prove: bool = True) -> None:
        self.tunnel = tunnel
        self.heartbeat_s = heartbeat_s
        self.prover = make_prover("sim") if prove else None
        self.signer: WriteSigner | None = None
        self.port: int | None = None
        self.frames: list[tuple[Frame, Message]] = []
        self.registers: list[Register] = []
        self.ws: trio_websocket.WebSocketConnection | None = None
        self._changed = trio.Event()
        self._next_id = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v2/agents/connect"

    async def run(self, task_status: trio.TaskStatus[StandInCp] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, self._handle,
                                         "127.0.0.1", 0, None)
            self.port = server.port
            task_status.started(self)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        nonce = secrets.token_bytes(32)
        await ws.send_message(encode_message(Challenge(
            nonce=nonce, expires_at=datetime.now(UTC) + timedelta(seconds=30))))
        _, register = decode_message(await ws.get_message(), max_bytes=1 << 24, sender="agent")
        assert isinstance(register, Register)
        assert quote_report_data(register.attestation.quote) == registration_report_data(
            nonce, register.public_key)
        self.registers.append(register)
        proof = None
        if self.prover is not None and register.cp_nonce is not None:
            proof = await self.prover.prove(register.cp_nonce)
            self.signer = self.prover.signer(register.cp_nonce)
        await ws.send_message(encode_message(Registered(
            agent_id=f"ag-standin-{register.vm_name}", heartbeat_interval_s=self.heartbeat_s,
            attest_interval_s=3600, tunnel=self.tunnel, cp_proof=proof)))
        self.ws = ws
        self._wake()
        try:
            while True:
                data = await ws.get_message()
                self.frames.append(decode_message(data, max_bytes=1 << 24, sender="agent"))
                self._wake()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            if self.ws is ws:
                self.ws = None

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def send(self, msg: Message, *, with_id: bool = False) -> int | None:
        await eventually(lambda: self.ws is not None)
        assert self.ws is not None
        frame_id = None
        if with_id:
            self._next_id += 1
            frame_id = self._next_id
        if self.signer is not None and isinstance(msg, Deploy | Undeploy):
            msg = self.signer.sign(msg)
        await self.ws.send_message(encode_message(msg, id=frame_id))
        return frame_id

    async def send_raw(self, text: str) -> None:
        await eventually(lambda: self.ws is not None)
        assert self.ws is not None
        await self.ws.send_message(text)

    async def wait_for(self, match: Callable[[Frame, Message], bool], timeout: float = 60
                       ) -> tuple[Frame, Message]:
        with trio.fail_after(timeout):
            seen = 0
            while True:
                for frame, msg in self.frames[seen:]:
                    if match(frame, msg):
                        return frame, msg
                seen = len(self.frames)
                await self._changed.wait()


def td() -> SimTD:
    return SimTD.load_or_create(shared_sim_dir())
