"""The agent's websocket session to its CP, and the reconnect loop around it.

Theory of operation
-------------------
One *attempt* opens a websocket to the CP's agent plane and runs the handshake (API.md,
"Agent session"): the CP sends ``challenge``; the agent answers ``register`` with a
quote whose REPORTDATA is ``registration_report_data(nonce, public key)`` and its
current snapshot; the CP answers ``registered`` or ``rejected``. A rejection (logged
with its code and reasons), a connect error or a broken handshake is a *failed*
attempt. After ``registered`` the session runs until the connection ends; it is then
over, not failed: the CP was reached.

During a session two tasks run: the **reader**, which never waits on anything but the
socket (requests are answered in their own tasks; deploys and undeploys are handed to
the host, which runs them in tasks that outlive the session), and the **heartbeat**
sender. Every send goes through one lock, so frames never interleave.

**CP trust.** Each attempt sends a fresh random ``cp_nonce`` in ``register``. Once
``registered`` arrives, its ``cp_proof`` is judged in a worker thread by the host's
:class:`~ee.agent.cptrust.CpTrust` (quote verification, MRTD allowlist or pin) before
any frame of the session is read; the verdict holds for the whole session, and every
write (``deploy``, ``undeploy``, ``secret_release``, ``secret_revoke``) is then judged
against it by the host (signature and sequence).
A refused proof is told to the CP at once (an ``error`` frame whose code is the
refusal's), and again on every write it sends.

Between attempts the loop sleeps per :class:`ReconnectPolicy`, a pure object fed the
Trio clock from outside: bounded exponential backoff with equal jitter after each
failed attempt (the ceiling doubles from ``base`` up to ``cap``; the delay is drawn
from the upper half of it, so a fleet spreads out but no agent retries in a hot loop),
reset whenever the CP was reached. It gives up after ``max_attempts`` consecutive
failures, or when the CP has not been reached for ``unreachable_after`` seconds; the
loop then raises :class:`Terminated` and the host carries out the terminal action. A
``reconnect`` frame (graceful CP shutdown) is not a failure: the agent waits
``after_s`` (plus jitter up to one base delay) and reconnects with a fresh challenge.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable
from typing import Protocol

import attrs
import trio
import trio_websocket

from ee.agent.backoff import GiveUp, ReconnectPolicy, backoff_delay
from ee.agent.config import AgentConfig
from ee.agent.cptrust import CpTrust, config_quote_check
from ee.protocol import AgentProtocolError, decode_message, encode_message
from ee.protocol.frames import Frame
from ee.protocol.messages import (
    Attest,
    Challenge,
    CredentialAnswer,
    CredentialChallenge,
    Deploy,
    ErrorMessage,
    Heartbeat,
    LogsRequest,
    Message,
    Reconnect,
    Register,
    Registered,
    Rejected,
    SecretRelease,
    SecretRevoke,
    SecretsKeyRequest,
    SnapshotRequest,
    StatsRequest,
    Undeploy,
)

__all__ = [
    "Outcome",
    "SessionHost",
    "SessionLink",
    "SessionLoop",
    "Terminated",
]

log = logging.getLogger("ee.agent.session")

MAX_FRAME_BYTES = 64 << 20  # what we accept from the CP (deploys carry build contexts)
HANDSHAKE_TIMEOUT_S = 60.0  # registration verification happens on the CP meanwhile
CP_NONCE_BYTES = 32


class Terminated(Exception):
    """The agent gave up on its CP (attempts exhausted or unreachable for too long)."""


@attrs.frozen
class Outcome:
    """How one attempt ended: ``registered`` (CP reached), and a CP-requested wait."""

    registered: bool
    reason: str
    reconnect_after: float | None = None


# --- the session --------------------------------------------------------------------


class SessionLink:
    """The live session's sending side (what deploy tasks report through)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._lock = trio.Lock()

    async def send(self, msg: Message, *, id: int | None = None, re: int | None = None) -> None:
        text = encode_message(msg, id=id, re=re)
        async with self._lock:
            await self.ws.send_message(text)


class SessionHost(Protocol):
    """What the session needs from the agent (implemented by ``ee.agent.server.Agent``)."""

    config: AgentConfig
    trust: CpTrust
    vm_name: str

    async def register_message(self, nonce: bytes) -> Register: ...

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes
                                  ) -> bytes: ...

    def heartbeat(self) -> Heartbeat: ...

    async def answer(self, msg: Message) -> Message: ...

    async def write(self, frame: Frame, msg: Write) -> None: ...

    def attach(self, link: SessionLink, registered: Registered) -> None: ...

    def detach(self, link: SessionLink) -> None: ...


_REQUESTS = (SnapshotRequest, Attest, LogsRequest, StatsRequest, SecretsKeyRequest)
#: CP writes: judged against the session's CP proof, in wire order (seq).
Write = Deploy | Undeploy | SecretRelease | SecretRevoke


class SessionLoop:
    """Attempts sessions to *url* forever, per the policy; raises :class:`Terminated`."""

    def __init__(
        self,
        host: SessionHost,
        url: str,
        policy: ReconnectPolicy,
        *,
        connect_timeout: float = 10.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.host = host
        self.url = url
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.jitter = jitter
        self.attempts = 0
        self.sessions = 0
        self.last_outcome: Outcome | None = None
        self._reached = False

    async def run(self) -> None:
        self.policy.reached(trio.current_time())  # the clock starts now
        while True:
            self.attempts += 1
            outcome = await self.attempt()
            self.last_outcome = outcome
            now = trio.current_time()
            if outcome.registered:
                self.policy.reached(now)
            if outcome.reconnect_after is not None:
                wait = outcome.reconnect_after + self.jitter() * self.policy.base
                log.info("CP asked to reconnect (%s); reconnecting in %.1f s", outcome.reason, wait)
                await trio.sleep(wait)
                continue
            if outcome.registered:
                delay: float | GiveUp = backoff_delay(1, self.policy.base, self.policy.cap,
                                                      self.jitter())
            else:
                delay = self.policy.failed(now, self.jitter())
            if isinstance(delay, GiveUp):
                raise Terminated(f"{delay.reason} (last: {outcome.reason})")
            log.info("session to %s ended (%s); next attempt in %.1f s", self.url, outcome.reason,
                     delay)
            await trio.sleep(delay)
            unreachable = self.policy.check_unreachable(trio.current_time())
            if unreachable is not None:
                raise Terminated(f"{unreachable.reason} (last: {outcome.reason})")

    async def attempt(self) -> Outcome:
        """One connection: handshake, then serve until it ends."""
        self._reached = False
        try:
            async with trio_websocket.open_websocket_url(
                self.url,
                # The cohort key a rollout router (ee-router, the Worker) routes this
                # agent by, so its reconnects stay on one CP stack (not a credential).
                extra_headers=[(b"x-ee-agent", self.host.vm_name.encode())],
                connect_timeout=self.connect_timeout,
                disconnect_timeout=5,
                max_message_size=MAX_FRAME_BYTES,
            ) as ws:
                return await self._session(ws)
        except trio_websocket.HandshakeError as exc:
            cause = exc.__cause__ or exc.__context__
            detail = str(exc) or (f"{cause}" if cause else type(exc).__name__)
            return Outcome(False, f"cannot connect: {detail}")
        except trio_websocket.ConnectionClosed as exc:
            return Outcome(self._reached, f"connection closed ({_close_reason(exc)})")
        except (OSError, trio.BrokenResourceError) as exc:
            what = "connection broken" if self._reached else "cannot connect"
            return Outcome(self._reached, f"{what}: {type(exc).__name__}: {exc}")

    async def _receive(self, ws: trio_websocket.WebSocketConnection) -> tuple[Frame, Message]:
        while True:
            data = await ws.get_message()
            try:
                return decode_message(data, max_bytes=MAX_FRAME_BYTES, sender="cp")
            except AgentProtocolError as exc:
                log.warning("bad frame from the CP: %s", exc)
                await ws.send_message(
                    encode_message(ErrorMessage(code="bad_frame", message=str(exc)[:500]))
                )

    async def _session(self, ws: trio_websocket.WebSocketConnection) -> Outcome:
        registered: tuple[Registered, bytes] | Outcome | None = None
        with trio.move_on_after(self.handshake_timeout):
            registered = await self._handshake(ws)
        if registered is None:
            return Outcome(False, f"handshake did not finish within {self.handshake_timeout:g} s")
        if isinstance(registered, Outcome):
            return registered
        self._reached = True  # registered: whatever follows, the CP was reached
        self.sessions += 1
        reg, cp_nonce = registered
        try:
            await self._judge_cp(ws, reg, cp_nonce)
            return await self._serve(ws, reg)  # no deadline: a session lasts
        finally:
            self.host.trust.close_session()

    async def _handshake(
        self, ws: trio_websocket.WebSocketConnection
    ) -> tuple[Registered, bytes] | Outcome:
        _, first = await self._receive(ws)
        if not isinstance(first, Challenge):
            return Outcome(False, f"expected challenge, got {first.TYPE}")
        cp_nonce = secrets.token_bytes(CP_NONCE_BYTES)  # fresh per session: see CpTrust
        register = attrs.evolve(await self.host.register_message(first.nonce), cp_nonce=cp_nonce)
        await ws.send_message(encode_message(register))
        _, answer = await self._receive(ws)
        if isinstance(answer, CredentialChallenge):  # provider tpm: prove the AK's TPM
            secret = await self.host.activate_credential(answer.credential_blob,
                                                         answer.encrypted_secret)
            await ws.send_message(encode_message(CredentialAnswer(secret=secret)))
            _, answer = await self._receive(ws)
        if isinstance(answer, Rejected):
            log.error("registration rejected: %s: %s", answer.code, "; ".join(answer.reasons))
            return Outcome(False, f"rejected: {answer.code}: {'; '.join(answer.reasons)}")
        if not isinstance(answer, Registered):
            return Outcome(False, f"expected registered, got {answer.TYPE}")
        return answer, cp_nonce

    async def _judge_cp(self, ws: trio_websocket.WebSocketConnection, reg: Registered,
                        cp_nonce: bytes) -> None:
        """Judge the CP's proof for this session (a worker thread: quote verification)."""
        trust = self.host.trust
        if trust.verify_quote is None:  # a host that built CpTrust without roots
            trust.verify_quote = await trio.to_thread.run_sync(config_quote_check,
                                                               self.host.config)
        verdict = await trio.to_thread.run_sync(trust.judge_proof, cp_nonce, reg.cp_proof)
        trust.open_session(cp_nonce, verdict)
        if verdict.pin is not None:
            log.warning("pinned the CP MRTD %s (first proof seen)", verdict.pin)
        if verdict.accepted:
            log.info("CP writes on this session: %s", verdict.reason)
            return
        log.error("the CP's proof is refused (%s: %s); every write on this session will be "
                  "refused", verdict.code, verdict.reason)
        try:
            await ws.send_message(encode_message(ErrorMessage(code=verdict.code,
                                                              message=verdict.reason[:500])))
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            pass  # the session's reader sees the end (after any frame still queued)

    async def _serve(self, ws: trio_websocket.WebSocketConnection, reg: Registered) -> Outcome:
        log.info("registered as %s (heartbeat every %g s)", reg.agent_id, reg.heartbeat_interval_s)
        link = SessionLink(ws)
        self.host.attach(link, reg)
        ended: Outcome | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, link, reg.heartbeat_interval_s)
                ended = await self._read(ws, link, nursery)
                nursery.cancel_scope.cancel()
        except* trio_websocket.ConnectionClosed as group:
            # The CP went away mid-session (killed, network cut): reconnect, don't crash.
            exc = group.exceptions[0]
            assert isinstance(exc, trio_websocket.ConnectionClosed)
            ended = Outcome(True, f"connection closed ({_close_reason(exc)})")
        except* (OSError, trio.BrokenResourceError) as group:
            ended = Outcome(True, f"connection broken: {group.exceptions[0]!r}")
        finally:
            self.host.detach(link)
        assert ended is not None
        return ended

    async def _heartbeats(self, link: SessionLink, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await link.send(self.host.heartbeat())
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                return  # the reader sees the end too

    async def _read(
        self, ws: trio_websocket.WebSocketConnection, link: SessionLink, nursery: trio.Nursery
    ) -> Outcome:
        while True:
            frame, msg = await self._receive(ws)
            if isinstance(msg, _REQUESTS):
                nursery.start_soon(self._answer, link, frame, msg)
            elif isinstance(msg, Write):
                await self.host.write(frame, msg)  # in order: seq checks follow the wire
            elif isinstance(msg, Reconnect):
                return Outcome(True, msg.reason or "reconnect", reconnect_after=msg.after_s)
            elif isinstance(msg, ErrorMessage):
                log.warning("CP reported an error: %s: %s", msg.code, msg.message)
            else:
                await link.send(
                    ErrorMessage(code="unexpected", message=f"unexpected {frame.type} frame"),
                    re=frame.id,
                )

    async def _answer(self, link: SessionLink, frame: Frame, msg: Message) -> None:
        try:
            reply = await self.host.answer(msg)
        except Exception as exc:  # one bad request must not end the session
            log.warning("answering %s failed: %s", frame.type, exc, exc_info=True)
            reply = ErrorMessage(code="request_failed", message=f"{type(exc).__name__}: {exc}")
        if frame.id is None:
            return
        try:
            await link.send(reply, re=frame.id)
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            pass


def _close_reason(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"{reason.code} {reason.name}{': ' + reason.reason if reason.reason else ''}"
