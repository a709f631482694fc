"""A lean simulated agent: the CP session protocol over a real websocket, with quotes
from the ``sim`` attestation provider. No workloads — for CP tests and load.

One ``SimAgent`` is one task holding one trio-websocket connection; it registers,
heartbeats on the interval the CP gives, and answers ``snapshot``, ``attest``, ``logs``
and ``stats`` requests. Many run in one process (tools/loadgen/run.py).
"""

from __future__ import annotations

import random
import secrets
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio_websocket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ee.agent.backoff import backoff_delay
from ee.attestation.providers.sim import SimTD
from ee.protocol import decode_message, encode_message, registration_report_data
from ee.protocol.compose import (
    compose_services,
    validate_build_context,
    validate_compose,
    workload_hash,
)
from ee.protocol.messages import (
    Attest,
    Attestation,
    Challenge,
    Deploy,
    DeploymentSnapshot,
    DeployStatus,
    ErrorMessage,
    Health,
    Heartbeat,
    LogsReply,
    LogsRequest,
    Message,
    NodeInfo,
    NodeStats,
    Reconnect,
    Register,
    Registered,
    Rejected,
    Snapshot,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
    Undeploy,
)


@attrs.define
class SimAgent:
    url: str
    td: SimTD
    vm_name: str
    node_size: str = "standard"
    datacenter: str = "local:dev"
    gpu: bool = False
    vcpus: int = 4
    memory_mb: int = 16384
    key: Ed25519PrivateKey = attrs.field(factory=Ed25519PrivateKey.generate)
    heartbeats: bool = True
    paused: bool = False  # True: keep the session but stop heartbeating (goes stale)
    refuse_logs: bool = False  # True: answer logs requests with an error frame
    answer_attest: bool = True  # False: leave ``attest`` requests unanswered
    attest_for: Callable[[bytes, bytes], bytes] | None = None  # as quote_for, for attest
    route_header: bool = True  # send X-EE-Agent (the rollout router's cohort) on upgrade
    sessions: int = 0
    quote_for: Callable[[bytes, bytes], bytes] | None = None  # (nonce, pubkey) -> quote
    agent_id: str | None = None
    rejected: Rejected | None = None
    registered: Registered | None = None
    seq: int = 0
    reconnect: Reconnect | None = None
    closed_code: int | None = None
    requests_answered: int = 0
    # Simulated workloads: no containers; deploys "run" at once unless fail_deploys.
    deployments: dict[str, DeploymentSnapshot] = attrs.field(factory=dict)
    fail_deploys: bool = False
    bootstrap_token: str | None = None  # a launch order's token, for VMs a provisioner made
    ssl_context: ssl.SSLContext | None = None  # for wss:// agent planes
    ws: trio_websocket.WebSocketConnection | None = None
    # Reconnects (run_forever) as the real agent's session loop does them: bounded
    # exponential backoff with equal jitter (ee.agent.backoff), so a fleet that lost its
    # CP at once does not come back at once. The agent's defaults are 1 s and 60 s; these
    # are short for tests (the benchmark passes the agent's).
    reconnect_base_s: float = 0.1
    reconnect_cap_s: float = 1.0
    connect_timeout_s: float = 60.0  # trio-websocket's default (the first attempt raises)
    handshake_timeout_s: float = 60.0  # challenge -> registered | rejected
    jitter: Callable[[], float] = random.random

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def snapshot(self) -> Snapshot:
        return Snapshot(deployments=tuple(self.deployments.values()),
                        health=Health(status="healthy"),
                        node=NodeInfo(node_size=self.node_size, datacenter=self.datacenter,
                                      gpu=self.gpu, vcpus=self.vcpus, memory_mb=self.memory_mb),
                        seq=self.seq)

    def register_message(self, nonce: bytes) -> Register:
        if self.quote_for is not None:
            quote = self.quote_for(nonce, self.public_key)
        else:
            quote = self.td.quote(registration_report_data(nonce, self.public_key))
        return Register(vm_name=self.vm_name, node_size=self.node_size,
                        datacenter=self.datacenter, agent_version="sim-1",
                        public_key=self.public_key,
                        attestation=Attestation(provider="sim", quote=quote),
                        snapshot=self.snapshot(), bootstrap_token=self.bootstrap_token)

    async def receive(self) -> tuple[Any, Message]:
        assert self.ws is not None
        data = await self.ws.get_message()
        return decode_message(data, max_bytes=64 << 20, sender="cp")

    async def send(self, msg: Message, *, re: int | None = None) -> None:
        assert self.ws is not None
        await self.ws.send_message(encode_message(msg, id=None, re=re))

    async def run(self, *, task_status: trio.TaskStatus[SimAgent] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Connect, register, then serve the session until it closes."""
        # The close is bounded: trio-websocket's context exit (close handshake, joining
        # its reader) must not keep an agent from its next attempt (seen at 10,000 agents
        # after a CP kill: 1,791 sessions stuck in CLOSE-WAIT).
        with trio.CancelScope() as closing:
            async with trio_websocket.open_websocket_url(
                    self.url, ssl_context=self.ssl_context, connect_timeout=self.connect_timeout_s,
                    extra_headers=[(b"x-ee-agent", self.vm_name.encode())]
                    if self.route_header else []) as ws:
                self.ws = ws
                try:
                    # Bounded like the real agent's handshake: a CP too busy to answer within
                    # it (or an exchange stuck anywhere) is a failed attempt, then a backoff.
                    answer: Message | None = None
                    with trio.move_on_after(self.handshake_timeout_s):
                        _, challenge = await self.receive()
                        assert isinstance(challenge, Challenge), challenge
                        await self.send(self.register_message(challenge.nonce))
                        _, answer = await self.receive()
                    if answer is None:
                        if self.registered is None and self.rejected is None:
                            task_status.started(self)
                        return
                    if isinstance(answer, Rejected):
                        self.rejected = answer
                        task_status.started(self)
                        with trio.move_on_after(5):
                            await ws.get_message()  # until the CP closes
                        return
                    assert isinstance(answer, Registered), answer
                    self.registered = answer
                    self.agent_id = answer.agent_id
                    self.sessions += 1
                    task_status.started(self)
                    async with trio.open_nursery() as nursery:
                        if self.heartbeats:
                            nursery.start_soon(self._heartbeat, answer.heartbeat_interval_s)
                        await self._serve()
                        nursery.cancel_scope.cancel()
                except trio_websocket.ConnectionClosed as exc:
                    self.closed_code = exc.reason.code if exc.reason else None
                    if self.registered is None and self.rejected is None:
                        task_status.started(self)
                finally:
                    self.ws = None
                    closing.deadline = trio.current_time() + 5

    async def run_forever(self, *, task_status: trio.TaskStatus[SimAgent] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Like an agent: reconnect after the CP's ``reconnect.after_s`` (plus jitter up to
        one base delay), else after the jittered backoff of ``ee.agent.backoff``: attempt 1
        after a registered session, one more doubling per consecutive failure."""
        first = True
        failures = 0
        while True:
            sessions = self.sessions
            try:
                if first:
                    await self.run(task_status=task_status)
                    first = False
                else:
                    await self.run()
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed):
                if first:
                    raise
            failures = 0 if self.sessions > sessions else failures + 1
            if self.reconnect is not None:
                delay = self.reconnect.after_s + self.jitter() * self.reconnect_base_s
            else:
                delay = backoff_delay(max(1, failures), self.reconnect_base_s,
                                      self.reconnect_cap_s, self.jitter())
            self.reconnect = None
            await trio.sleep(delay)

    async def _deploy(self, msg: Deploy) -> None:
        # the hash a real agent reports (ee.agent.workload): the workload hash
        doc = validate_compose(msg.compose)
        context = (None if msg.build_context is None
                   else validate_build_context(msg.build_context))
        digest = workload_hash(doc, context, env=msg.env, expose_port=msg.expose_port,
                               expose_service=msg.expose_service or compose_services(doc)[0],
                               health_path=msg.health_path, secret_names=msg.secret_names,
                               secret_env=msg.secret_env)
        snap = DeploymentSnapshot(deployment_id=msg.deployment_id, app=msg.app,
                                  version=msg.version, state="starting", compose_hash=digest)
        self.deployments[msg.deployment_id] = snap
        await self.send(DeployStatus(deployment_id=msg.deployment_id, state="starting"))
        final = "failed" if self.fail_deploys else "running"
        self.deployments[msg.deployment_id] = attrs.evolve(snap, state=final)
        await self.send(DeployStatus(deployment_id=msg.deployment_id, state=final,
                                     compose_hash=digest,
                                     error="simulated failure" if self.fail_deploys else None))

    async def _undeploy(self, msg: Undeploy) -> None:
        if self.deployments.pop(msg.deployment_id, None) is not None:
            await self.send(DeployStatus(deployment_id=msg.deployment_id, state="stopped"))

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            if self.paused:
                continue
            self.seq += 1
            try:
                await self.send(Heartbeat(seq=self.seq, health=Health(status="healthy"),
                                          stats=NodeStats(uptime_s=float(self.seq))))
            except trio_websocket.ConnectionClosed:
                return

    async def _serve(self) -> None:
        try:
            await self._serve_frames()
        except trio_websocket.ConnectionClosed as exc:
            self.closed_code = exc.reason.code if exc.reason else None

    async def _serve_frames(self) -> None:
        while True:
            frame, msg = await self.receive()
            reply: Message | None = None
            if isinstance(msg, SnapshotRequest):
                reply = self.snapshot()
            elif isinstance(msg, Attest):
                if not self.answer_attest:
                    continue
                reply = Attestation(provider="sim", quote=self.td.quote(
                    registration_report_data(msg.nonce, self.public_key))
                    if self.attest_for is None else self.attest_for(msg.nonce,
                                                                    self.public_key))
            elif isinstance(msg, LogsRequest):
                reply = (ErrorMessage(code="unknown_deployment", message="no such deployment")
                         if self.refuse_logs else LogsReply(lines=()))
            elif isinstance(msg, StatsRequest):
                reply = StatsReply(node=NodeStats())
            elif isinstance(msg, Reconnect):
                self.reconnect = msg
                continue
            elif isinstance(msg, Deploy):
                await self._deploy(msg)
                continue
            elif isinstance(msg, Undeploy):
                await self._undeploy(msg)
                continue
            if reply is not None and frame.id is not None:
                self.requests_answered += 1
                await self.send(reply, re=frame.id)


def random_vm_name(prefix: str = "sim") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
