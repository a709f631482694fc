"""The agent plane: one websocket listener (``ee.cp.plane_ws``) for every agent session.

Each connection runs challenge → register → registered | rejected, then a reader loop
that hands frames to the agent's actor with a *non-blocking* send: a slow or flooding
agent fills its own mailbox and is told so (then closed), and never stalls the reader
of another agent or the CP. Replies (frames with ``re``) resolve the pending request
of the ``Session``; every other frame type the agent may send is routed by type.

Bad input gets an ``error`` frame naming the problem; the third bad frame on one
connection closes it with 1008 (policy) or, for oversized frames, 1009. Frames larger
than twice the limit are cut by the websocket layer itself (1009) without being buffered.

Footprint: a connection is one task (``plane_ws``: no reader task, no channel, no
per-connection nursery) that runs the handshake, registration and then the read loop;
what registration needed (the ``register`` frame with its quote, the admission) is
dropped before the read loop, so an idle session holds its socket, its codec and a
``Session``.

Registration is decided by ``registration.Judge`` in a worker thread under a capacity
limiter (quote verification is CPU work). The nonce is issued per connection, single
use, with a TTL; a quote that binds an already-used nonce is named a replay.

Exception boundaries (nothing one peer sends can reach the plane's nursery):

1. verification: anything the judge raises is a ``VERIFY_ERROR`` refusal, never an
   exception (the verifier is meant to raise only typed errors, but a refusal must not
   depend on that);
2. the connection handler (``_handle``): anything unexpected while serving one peer is
   logged with its traceback, counted (``ee_agent_plane_faults_total``), emitted as an
   ``agent.session_fault`` event, and closes that connection with 1011. The peer sees a
   close reason, never exception text;
3. the transport (``plane_ws.serve``): the same for anything raised by the websocket
   layer around the handler.

A crash of the plane itself (its listener or sweep: a real bug) is logged with its
traceback before it reaches the supervisor.

CP envelopes and tunnels (at ``registered``): when the agent sent a ``cp_nonce`` and the
CP has an ``EnvelopeProver`` (``ee.cp.envelope``), ``registered.cp_proof`` carries the
CP's quote over that nonce and its write key, and the session signs every ``deploy``
and ``undeploy`` it sends (under its send lock, so ``seq`` follows the wire order).
With a ``TunnelProvider`` (``ee.cp.tunnels``), ``registered.tunnel`` carries the
agent's grant. Neither ever blocks a registration: a failed quote or grant is logged,
emitted (``cp.envelope_proof_failed``, ``agent.tunnel_failed``) and the agent is
admitted without it (the tunnel is retried at its next registration). An agent that
refuses a write says why (``deploy_status`` ``failed`` with ``error`` "<CODE>: ...",
or an ``error`` frame with the code, ``WRITE_REFUSAL_CODES``): the plane emits
``agent.write_refused`` with the code. Such error frames are not bad frames, up to
``max_write_refusals`` per session.

Liveness: an agent counts as alive only on heartbeats it sends (``last_heartbeat``),
never on other frames (error frames, orphan replies, unknown ``deploy_status``), so an
agent that stopped heartbeating goes stale and offline whatever else it sends. An
``error`` frame that answers no pending request is a bad frame. Strings an agent
chooses are logged through ``printable`` (one line, capped, escaped).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed

from ee.actors.agent import (
    AgentActor,
    AgentDeps,
    DeployStatusIn,
    HeartbeatIn,
    ReattestDue,
    SessionClosed,
    SessionOpened,
    Tick,
)
from ee.actors.datacenter import DatacenterActor
from ee.actors.directory import AgentDirectory
from ee.actors.identity import Identity
from ee.actors.lifecycle import AgentState
from ee.attestation.tpm import qualifying_data
from ee.attestation.tpm_credential import Credential
from ee.cp.envelope import EnvelopeProver, WriteSigner
from ee.cp.events import EventBus
from ee.cp.plane_ws import PlaneRequest, PlaneSocket
from ee.cp.plane_ws import serve as serve_websockets
from ee.cp.registration import Admission, Judge, NonceBook, Refusal
from ee.cp.tunnels import TunnelError, TunnelProvider
from ee.protocol import (
    AgentProtocolError,
    Frame,
    FrameTooLarge,
    decode_frame,
    encode_message,
    parse_frame,
    registration_report_data,
)
from ee.protocol.messages import (
    WRITE_REFUSAL_CODES,
    Challenge,
    CpProof,
    CredentialAnswer,
    CredentialChallenge,
    Deploy,
    DeployStatus,
    ErrorMessage,
    Heartbeat,
    Message,
    Reconnect,
    Register,
    Registered,
    Rejected,
    SecretRelease,
    SecretRevoke,
    TunnelGrant,
    Undeploy,
)
from ee.protocol.strict import printable
from ee.runtime import ActorDead, ActorError, MailboxFull, Registry
from ee.supervisors import ChildExists, Restart, Supervisor, actor_spec

log = logging.getLogger("ee.cp.agent_plane")

CONNECT_PATH = "/api/v2/agents/connect"
MAX_REASONS = 8  # per refusal, each cut to REASON_CHARS (reasons may quote the peer)
REASON_CHARS = 300
SWEEP_SLICE = 500  # sessions looked at between two checkpoints of the sweep


class _SessionEnded(Exception):
    """We closed the session (too many bad frames); unwinds the connection handler."""


class AgentRequestError(Exception):
    """The agent answered a request with an ``error`` frame, or not at all."""


@attrs.frozen
class PlaneSettings:
    max_frame_bytes: int = 1 << 20
    nonce_ttl_s: float = 30.0
    max_bad_frames: int = 3
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 30.0
    attest_interval_s: float = 3600.0
    reconnect_after_s: float = 2.0
    tunnel_timeout_s: float = 15.0  # per grant; registration waits at most this long
    proof_timeout_s: float = 15.0  # per CP quote
    max_write_refusals: int = 64  # per session, before refusal error frames count as bad


class Session:
    """One authenticated websocket session (the ``AgentLink`` AgentActors talk through)."""

    __slots__ = ("_identity", "_next_request", "_pending", "attested_at",
                 "bad_frames", "last_heartbeat", "max_frame_bytes", "session_id", "signer",
                 "write_refusals", "ws")

    _ids = itertools.count(1)

    def __init__(self, ws: PlaneSocket, max_frame_bytes: int) -> None:
        self.session_id = next(Session._ids)
        self.ws = ws
        self.max_frame_bytes = max_frame_bytes
        self._identity: Identity | None = None
        self._next_request = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list[Message]]] = {}
        self.bad_frames = 0
        self.write_refusals = 0
        self.signer: WriteSigner | None = None  # set at registration when the CP proved itself
        # For the plane's staleness sweep: heartbeats only (see the module docstring).
        self.last_heartbeat = trio.current_time()
        self.attested_at = trio.current_time()

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            raise RuntimeError("session is not registered yet")
        return self._identity

    async def send(self, msg: Message, *, id: int | None = None, re: int | None = None) -> None:
        async with self.ws.send_lock:  # the socket's one lock: seq follows the wire order
            if isinstance(msg, Deploy | Undeploy | SecretRelease | SecretRevoke):
                # Signing (canonical JSON + Ed25519 over a body that may carry a 16 MiB
                # build context) and encoding a deploy: off the event loop. Still in the
                # lock, so seq follows the wire order.
                write, signer = msg, self.signer
                text = await trio.to_thread.run_sync(lambda: encode_message(
                    write if signer is None else signer.sign(write), id=id, re=re))
            else:
                text = encode_message(msg, id=id, re=re)
            await self.ws.send_locked(text)

    async def request(self, msg: Message, timeout: float) -> Message:
        request_id = next(self._next_request)
        done = trio.Event()
        box: list[Message] = []
        self._pending[request_id] = (done, box)
        try:
            with trio.move_on_after(timeout):
                try:
                    await self.send(msg, id=request_id)
                except ConnectionClosed:
                    raise AgentRequestError("session closed") from None
                await done.wait()
            if not box:
                raise AgentRequestError(f"no answer to {type(msg).__name__} within {timeout}s")
            reply = box[0]
            if isinstance(reply, ErrorMessage):
                raise AgentRequestError(f"agent refused: {printable(reply.code, 64)}: "
                                        f"{printable(reply.message, 200)}")
            return reply
        finally:
            self._pending.pop(request_id, None)

    def resolve(self, re: int, msg: Message) -> bool:
        entry = self._pending.get(re)
        if entry is None:
            return False
        done, box = entry
        box.append(msg)
        done.set()
        return True

    async def close(self, code: int, reason: str) -> None:
        with trio.move_on_after(5):
            await self.ws.aclose(code, reason[:120])


class AgentPlane:
    """Serves ``/api/v2/agents/connect``; a child of the CP's supervision tree."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        registry: Registry,
        agents: Supervisor,
        datacenters: Supervisor,
        judge: Callable[[], Judge],
        agent_deps: Callable[[], AgentDeps],
        events: EventBus,
        settings: PlaneSettings,
        record_registration: Callable[[dict[str, Any]], None],
        metrics: Any,
        attest_limiter: trio.CapacityLimiter,
        claim_name: Callable[[Identity, float], Refusal | None] = lambda _i, _t: None,
        prepare_name: Callable[[str], Callable[[], Callable[[], None] | None] | None]
        = lambda _n: None,
        directory: AgentDirectory | None = None,
        prover: EnvelopeProver | None = None,
        tunnels: TunnelProvider | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.registry = registry
        self.agents = agents
        self.datacenters = datacenters
        self.judge = judge
        self.agent_deps = agent_deps
        self.events = events
        self.settings = settings
        self.record_registration = record_registration
        self.metrics = metrics
        self.attest_limiter = attest_limiter
        self.claim_name = claim_name  # binds a VM name to its key, atomically; or refuses
        # verifies a name's stored binding in the admission's worker thread, ahead of
        # the claim (after a restart, every returning agent's binding is unverified)
        self.prepare_name = prepare_name
        # Heartbeats of ready agents are recorded here directly (see _beat_inline).
        self.directory = directory
        self.prover = prover  # the CP's write key and quote (None: the CP proves nothing)
        self.tunnels = tunnels  # grants registered.tunnel (None: no tunnels)
        self.nonces = NonceBook(settings.nonce_ttl_s)
        self.sessions: dict[str, Session] = {}
        self.known: dict[str, Identity] = {}  # vm_name -> last admitted identity
        self.bound_port: int | None = None
        self._stop = trio.Event()

    def link_for(self, agent_id: str) -> Session | None:
        return self.sessions.get(agent_id)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        except Exception:
            # Peers cannot get here (see the boundaries above): this is a bug in the plane.
            log.exception("agent plane crashed; every session ends")
            raise

    async def _run(self, task_status: trio.TaskStatus[int]) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            if self.ssl_context is None:
                listeners: Any = await trio.open_tcp_listeners(self.port, host=self.host)
            else:
                listeners = await trio.open_ssl_over_tcp_listeners(
                    self.port, self.ssl_context, host=self.host, https_compatible=True)
            await nursery.start(lambda task_status: serve_websockets(
                self._on_request, listeners, handler_nursery=nursery,
                max_message_size=2 * self.settings.max_frame_bytes,
                connect_timeout=10, disconnect_timeout=5,
                on_fault=lambda exc: self._fault("transport", "-", exc),
                task_status=task_status))
            port = _bound_port(listeners)
            self.bound_port = port
            log.info("agent plane listening on %s:%d%s", self.host, port, CONNECT_PATH)
            nursery.start_soon(self._prune_nonces)
            nursery.start_soon(self._sweep)
            task_status.started(port)
            await self._stop.wait()
            # Graceful: tell every agent to come back shortly, then close its session.
            sessions = list(self.sessions.values())
            async with trio.open_nursery() as closers:
                for session in sessions:
                    closers.start_soon(self._say_goodbye, session)
            nursery.cancel_scope.cancel()

    async def _say_goodbye(self, session: Session) -> None:
        with trio.move_on_after(2):
            try:
                await session.send(Reconnect(reason="control plane restarting",
                                             after_s=self.settings.reconnect_after_s))
            except (ConnectionClosed, trio.BrokenResourceError):
                return
            await session.close(1012, "control plane restarting")

    async def _sweep(self) -> None:
        """One timer for every agent: Tick the quiet ones, ReattestDue the due ones.

        The pass walks the sessions in slices of ``SWEEP_SLICE`` with a checkpoint
        between them, so 10,000 sessions never hold the event loop in one stretch
        (a heartbeat read meanwhile waits one slice, not the whole plane)."""
        s = self.settings
        interval = max(0.05, min(s.heartbeat_interval_s, s.stale_after_s / 2))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            items = list(self.sessions.items())
            for start in range(0, len(items), SWEEP_SLICE):
                if start:
                    await trio.lowlevel.checkpoint()
                for agent_id, session in items[start:start + SWEEP_SLICE]:
                    stale = now - session.last_heartbeat >= s.stale_after_s
                    due = now - session.attested_at >= s.attest_interval_s
                    if not (stale or due):
                        continue
                    if due:
                        session.attested_at = now
                    for msg in (Tick() if stale else None, ReattestDue() if due else None):
                        if msg is None:
                            continue
                        try:
                            self.registry.ref(f"agent/{agent_id}").try_tell(msg)
                        except (ActorDead, MailboxFull):
                            pass  # busy or restarting: the next sweep tries again

    async def _prune_nonces(self) -> None:
        while True:
            await trio.sleep(self.settings.nonce_ttl_s)
            self.nonces.prune(trio.current_time())

    # ---- one connection ------------------------------------------------------------

    def _beat_inline(self, agent_id: str, session: Session, msg: Heartbeat,
                     received: float) -> bool:
        """Record the heartbeat of a *ready* agent here, without a hop to its actor.

        A heartbeat changes nothing an actor decides while its agent is ready (the
        state stays ``ready``): only the freshness the sweep and the views read. So the
        plane writes it into the directory's ``Beat`` (which the actor reads its age
        from) and the frame costs no envelope, no mailbox slot and no task switch. Any
        other state (stale: the heartbeat brings it back) goes to the actor.
        """
        directory = self.directory
        if (directory is None or self.sessions.get(agent_id) is not session
                or not _ready(directory, agent_id)):
            return False
        beat = directory.beat_of(agent_id)
        if beat.at is not None:
            self.metrics.heartbeat_gap.observe(received - beat.at)
        directory.beat(agent_id, msg.seq, msg.health, msg.stats, received, time.time())
        session.last_heartbeat = received
        self.metrics.heartbeat_handling.observe(trio.current_time() - received)
        return True

    def _fault(self, stage: str, peer: str, exc: BaseException) -> None:
        """Record an unexpected exception that ended (or refused) one connection."""
        self.metrics.plane_faults.labels(stage).inc()
        log.error("agent plane: %s fault serving %s; only this connection is affected",
                  stage, printable(peer, 80), exc_info=exc)
        self.events.emit("agent.session_fault", printable(peer, 80),
                         {"stage": stage, "error": type(exc).__name__})

    def _on_request(self, request: PlaneRequest) -> Awaitable[None]:
        return self._handle(request)  # looked up per connection (tests replace _handle)

    async def _handle(self, request: PlaneRequest) -> None:
        """One connection, under its own exception boundary (see the module docstring)."""
        path = request.path.split("?", 1)[0]
        try:
            if path != CONNECT_PATH:
                await request.reject(404, body=f"no websocket endpoint at "
                                     f"{printable(path, 80)}; agents connect to "
                                     f"{CONNECT_PATH}".encode())
                return
            ws = await request.accept()
        except (ConnectionClosed, trio.BrokenResourceError):
            return  # the peer left during the handshake
        session = Session(ws, self.settings.max_frame_bytes)
        try:
            await self._serve(session)
        except (ConnectionClosed, trio.BrokenResourceError, _SessionEnded):
            pass
        except Exception as exc:
            peer = (session.identity.agent_id if session._identity is not None
                    else f"unregistered peer {request.remote}")
            self._fault("session", peer, exc)
            try:
                await session.close(1011, "internal error; the CP logged it")
            except Exception as close_exc:  # the transport boundary has the rest
                log.debug("closing after a fault failed: %r", close_exc)
        finally:
            self._forget(session)

    def _forget(self, session: Session) -> None:
        if session._identity is not None:
            agent_id = session.identity.agent_id
            if self.sessions.get(agent_id) is session:
                del self.sessions[agent_id]
                try:
                    self.registry.ref(f"agent/{agent_id}").try_tell(
                        SessionClosed(session.session_id, "connection closed"))
                except (ActorDead, MailboxFull):
                    pass
        self.metrics.sessions.set(len(self.sessions))

    def _count_bad(self, session: Session, reason: str) -> bool:
        """Count one bad frame; True when the session has used up its budget."""
        session.bad_frames += 1
        self.metrics.bad_frames.labels(reason).inc()
        return session.bad_frames >= self.settings.max_bad_frames

    async def _bad_frame(self, session: Session, exc: AgentProtocolError | str,
                         code: str = "bad_frame", *, re: int | None = None) -> None:
        """Answer a refused frame with ``error`` (``re``: its id); close when over budget."""
        too_big = isinstance(exc, FrameTooLarge)
        spent = self._count_bad(session, "too_large" if too_big else code)
        await session.send(ErrorMessage(code="frame_too_large" if too_big else code,
                                        message=str(exc)[:500]), re=re)
        if spent:
            await session.close(1009 if too_big else 1008,
                                f"too many bad frames ({session.bad_frames})")
            raise _SessionEnded

    async def _next_frame(self, session: Session) -> tuple[Frame, Message]:
        """The next well-formed frame; bad ones get an error frame (and, repeated, close)."""
        while True:
            data = await session.ws.get_message()
            frame: Frame | None = None
            try:
                frame = decode_frame(data, max_bytes=self.settings.max_frame_bytes)
                return frame, parse_frame(frame, sender="agent")
            except AgentProtocolError as exc:
                await self._bad_frame(session, exc, re=frame.id if frame else None)

    async def _serve(self, session: Session) -> None:
        nonce, expires = self.nonces.issue(trio.current_time())
        expires_at = datetime.fromtimestamp(time.time() + self.settings.nonce_ttl_s, UTC)
        await session.send(Challenge(nonce=nonce, expires_at=expires_at))
        register = await self._await_register(session, expires)
        if register is None:
            self.nonces.discard(nonce)
            await self._reject(session, None, Refusal(
                "NONCE_EXPIRED", ("no register before the challenge expired",)))
            return
        admission = await self._admit(session, register, nonce)
        if admission.identity is None:
            assert admission.refusal is not None
            await self._reject(session, register, admission.refusal, admission)
            return
        if admission.credential is not None:
            refusal = await self._activate(session, admission.credential, expires)
            if refusal is not None:
                await self._reject(session, register, refusal, admission)
                return
        if register.bootstrap_token is not None:
            refusal = await self._check_token(register, admission.identity)
            if refusal is not None:
                await self._reject(session, register, refusal, admission)
                return
        # The judge checked the name's binding before verification; two registrations of
        # one new name with different keys may both have passed it while verifying. The
        # claim below runs with no await before admission, so only the first one binds.
        refusal = self.claim_name(admission.identity, time.time())
        if refusal is not None:
            await self._reject(session, register, refusal, admission)
            return
        await self._admitted(session, register, admission.identity)
        del register, admission  # the quote and snapshot: not kept for the session's life
        await self._read_loop(session)

    async def _await_register(self, session: Session, expires: float) -> Register | None:
        with trio.move_on_at(expires):
            while True:
                frame, msg = await self._next_frame(session)
                if isinstance(msg, Register):
                    return msg
                await self._bad_frame(session, f"expected register, got {frame.type}",
                                      "register_first", re=frame.id)
        return None

    async def _activate(self, session: Session, credential: Credential,
                        expires: float) -> Refusal | None:
        """Provider ``tpm``: the credential round trip, within the challenge's TTL."""
        await session.send(CredentialChallenge(credential_blob=credential.credential_blob,
                                               encrypted_secret=credential.encrypted_secret))
        with trio.move_on_at(expires):
            while True:
                frame, msg = await self._next_frame(session)
                if isinstance(msg, CredentialAnswer):
                    if credential.matches(msg.secret):
                        return None
                    return Refusal("CREDENTIAL_FAILED", (
                        "the activation secret is wrong: the AK is not in the TPM the EK "
                        "certificate names",))
                await self._bad_frame(session, f"expected activation, got {frame.type}",
                                      "activation_first")
        return Refusal("CREDENTIAL_FAILED", ("no activation before the challenge expired",))

    async def _admit(self, session: Session, register: Register, nonce: bytes) -> Admission:
        refusal = self.nonces.consume(nonce, trio.current_time())
        if refusal is not None:
            return Admission(None, refusal)
        known = self.known.get(register.vm_name)
        started = time.perf_counter()
        now_unix = time.time()
        prepared = self.prepare_name(register.vm_name)
        try:
            judge = self.judge()

            def work() -> tuple[Admission, Callable[[], None] | None]:
                take_in = prepared() if prepared is not None else None
                return judge.admit(register, nonce, now=now_unix, known=known), take_in

            admission, take_in = await trio.to_thread.run_sync(work,
                                                               limiter=self.attest_limiter)
            if take_in is not None:
                take_in()
        except Exception as exc:
            # Boundary 1: whatever the verifier raised, this peer is refused, not crashed.
            self._fault("verify", f"vm {register.vm_name}", exc)
            return Admission(None, Refusal("VERIFY_ERROR", (
                "the registration could not be verified (an internal error, logged by "
                "the CP); the quote is not trusted",)))
        self.metrics.attestation_seconds.observe(time.perf_counter() - started)
        self.nonces.remember_binding(
            registration_report_data(nonce, register.public_key), trio.current_time())
        self.nonces.remember_binding(  # what a tpm quote binds
            qualifying_data(nonce, register.public_key), trio.current_time())
        if (admission.refusal is not None and admission.refusal.code == "REPORTDATA_MISMATCH"
                and admission.report_data is not None
                and self.nonces.was_used(admission.report_data, trio.current_time())):
            admission = attrs.evolve(admission, refusal=Refusal(
                "NONCE_REPLAYED", ("the quote binds a challenge nonce that was already used",)))
        return admission

    async def _check_token(self, register: Register, identity: Identity) -> Refusal | None:
        """A launch order's bootstrap token: verified and consumed by its pool."""
        from ee.actors.pool import TokenAccepted, present_token

        assert register.bootstrap_token is not None
        try:
            answer = await present_token(
                self.registry, register.bootstrap_token, vm_name=identity.vm_name,
                datacenter=identity.datacenter, node_size=identity.node_size,
                agent_key=hashlib.sha256(identity.public_key).hexdigest())
        except ActorError as exc:
            return Refusal("TOKEN_UNAVAILABLE", (f"the pool could not check the token: {exc}",))
        if isinstance(answer, TokenAccepted):
            return None
        return Refusal(answer.code, (answer.reason,))

    async def _reject(self, session: Session, register: Register | None, refusal: Refusal,
                      admission: Admission | None = None) -> None:
        # Reasons may quote what the peer sent (a node size, a parse error): one line
        # each, capped, a bounded number of them, wherever they go.
        reasons = tuple(printable(r, REASON_CHARS) for r in refusal.reasons[:MAX_REASONS])
        vm_name = printable(register.vm_name, 80) if register else "-"
        datacenter = printable(register.datacenter, 80) if register else ""
        self.metrics.registrations.labels("rejected", refusal.code).inc()
        self.events.emit("registration.rejected", vm_name,
                         {"code": refusal.code, "reasons": list(reasons),
                          "datacenter": datacenter})
        self.record_registration({
            "vm_name": vm_name, "agent_id": None,
            "datacenter": datacenter,
            "node_size": printable(register.node_size, 80) if register else "",
            "outcome": "rejected", "reasons": [refusal.code, *reasons],
            "mrtd": admission.mrtd if admission else None,
            "tcb_status": admission.tcb_status if admission else None})
        log.info("registration rejected: %s %s: %s", vm_name, refusal.code, "; ".join(reasons))
        await session.send(Rejected(code=refusal.code, reasons=reasons))
        await session.close(1008, f"registration rejected: {refusal.code}")

    async def _prove(self, session: Session, register: Register,
                     identity: Identity) -> CpProof | None:
        """The CP's proof for this session, and its signer; None when there is none."""
        if self.prover is None or register.cp_nonce is None:
            return None
        proof = None
        try:
            with trio.move_on_after(self.settings.proof_timeout_s):
                proof = await self.prover.prove(register.cp_nonce)
            problem = "timed out" if proof is None else ""
        except Exception as exc:  # a provider fault must not refuse or crash the session
            problem = f"{type(exc).__name__}: {exc}"
        if proof is None:
            log.error("cannot prove the CP write key to %s: %s", identity.agent_id, problem)
            self.events.emit("cp.envelope_proof_failed", identity.agent_id,
                             {"error": printable(problem, REASON_CHARS)})
            return None
        session.signer = self.prover.signer(register.cp_nonce)
        return proof

    async def _grant_tunnel(self, identity: Identity) -> TunnelGrant | None:
        if self.tunnels is None:
            return None
        grant = None
        try:
            with trio.move_on_after(self.settings.tunnel_timeout_s):
                grant = await self.tunnels.grant(identity.agent_id, identity.vm_name)
            problem = "timed out" if grant is None else ""
        except TunnelError as exc:
            problem = str(exc)
        except Exception as exc:  # a provider bug must not refuse or crash the session
            log.exception("tunnel provider failed for %s", identity.agent_id)
            problem = f"{type(exc).__name__}: {exc}"
        if grant is None:
            log.warning("no tunnel for %s (retried at its next registration): %s",
                        identity.agent_id, printable(problem, REASON_CHARS))
            self.events.emit("agent.tunnel_failed", identity.agent_id,
                             {"error": printable(problem, REASON_CHARS)})
            return None
        self.events.emit("agent.tunnel_granted", identity.agent_id, {"hostname": grant.hostname})
        return grant

    def _write_refused(self, session: Session, code: str, message: str,
                       deployment_id: str | None = None) -> None:
        """The agent refused a CP write (or the CP's proof): say so to the operator."""
        agent_id = session.identity.agent_id
        detail = printable(message, REASON_CHARS)
        log.warning("agent %s refused a CP write: %s: %s", agent_id, code, detail)
        self.events.emit("agent.write_refused", agent_id,
                         {"code": code, "reason": detail, "deployment_id": deployment_id})

    async def _admitted(self, session: Session, register: Register, identity: Identity) -> None:
        identity = _interned(identity)
        proof = await self._prove(session, register, identity)
        tunnel = await self._grant_tunnel(identity)
        session._identity = identity
        self.known[identity.vm_name] = identity
        self.metrics.registrations.labels("admitted", identity.datacenter).inc()
        self.record_registration({
            "vm_name": identity.vm_name, "agent_id": identity.agent_id,
            "datacenter": identity.datacenter, "node_size": identity.node_size,
            "outcome": "admitted", "reasons": list(identity.violations),
            "mrtd": identity.mrtd, "tcb_status": identity.tcb_status})
        await self._ensure_actors(identity)
        self.sessions[identity.agent_id] = session
        self.metrics.sessions.set(len(self.sessions))
        session.last_heartbeat = trio.current_time()
        await session.send(Registered(agent_id=identity.agent_id,
                                      heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                      attest_interval_s=self.settings.attest_interval_s,
                                      tunnel=tunnel, cp_proof=proof))
        await self.registry.ref(f"agent/{identity.agent_id}").tell(
            SessionOpened(session, register.snapshot))

    async def _ensure_actors(self, identity: Identity) -> None:
        dc_name = f"dc/{identity.datacenter}"
        if dc_name not in self.registry:
            label = identity.datacenter
            directory = self.agent_deps().directory
            try:
                await self.datacenters.start_child(actor_spec(
                    self.registry, dc_name, lambda: DatacenterActor(label, directory),
                    mailbox_size=4096))
            except ChildExists:
                pass
        name = f"agent/{identity.agent_id}"
        if name not in self.registry:
            agent_id = identity.agent_id
            deps = self.agent_deps()
            try:
                await self.agents.start_child(actor_spec(
                    self.registry, name, lambda: AgentActor(agent_id, deps),
                    restart=Restart.TRANSIENT, mailbox_size=64))
            except ChildExists:
                pass

    async def _read_loop(self, session: Session) -> None:
        agent_id = session.identity.agent_id
        agent_ref = self.registry.ref(f"agent/{agent_id}")
        while True:
            frame, msg = await self._next_frame(session)
            if frame.re is not None:
                if session.resolve(frame.re, msg):
                    continue
                if isinstance(msg, ErrorMessage):  # an error that answers nothing
                    if self._count_bad(session, "orphan_error"):
                        await session.close(1008, f"too many bad frames ({session.bad_frames})")
                        raise _SessionEnded
                else:  # late (after its request timed out) or unknown: dropped
                    log.debug("agent %s: late or unknown reply re=%s", agent_id, frame.re)
                continue
            if isinstance(msg, Heartbeat):
                self.metrics.heartbeats.inc()
                received = trio.current_time()
                if self._beat_inline(agent_id, session, msg, received):
                    continue
                handoff: object = HeartbeatIn(session.session_id, msg, received)
            elif isinstance(msg, DeployStatus):
                code = _refusal_code(msg)
                if code is not None:
                    self._write_refused(session, code, msg.error or "", msg.deployment_id)
                handoff = DeployStatusIn(session.session_id, msg)
            elif (isinstance(msg, ErrorMessage) and (code := _error_refusal_code(msg))
                  and session.write_refusals < self.settings.max_write_refusals):
                session.write_refusals += 1
                self._write_refused(session, code, msg.message)
                continue
            elif isinstance(msg, ErrorMessage):
                # Unsolicited: logged (escaped, capped) and counted, never answered (an
                # error for an error could ping-pong between two peers).
                log.info("agent %s reported error %s: %s", agent_id,
                         printable(msg.code, 64), printable(msg.message, 200))
                if self._count_bad(session, "agent_error"):
                    await session.close(1008, f"too many bad frames ({session.bad_frames})")
                    raise _SessionEnded
                continue
            else:
                await self._bad_frame(session, f"unexpected {frame.type} frame", "unexpected",
                                      re=frame.id)
                continue
            try:
                agent_ref.try_tell(handoff)
            except MailboxFull:
                await self._bad_frame(session, "agent is sending faster than it is handled",
                                      "flooding", re=frame.id)
                continue
            except ActorDead:
                await session.close(1011, "agent actor is gone; reconnect")
                return
            if isinstance(msg, Heartbeat):
                session.last_heartbeat = trio.current_time()


def _bound_port(listeners: list[Any]) -> int:
    """The port the first listener bound (SSL listeners wrap a TCP one)."""
    listener = listeners[0]
    listener = getattr(listener, "transport_listener", listener)
    return int(listener.socket.getsockname()[1])


def _ready(directory: AgentDirectory, agent_id: str) -> bool:
    record = directory.get(agent_id)
    return record is not None and record.state is AgentState.READY


def _interned(identity: Identity) -> Identity:
    """The identity with the strings thousands of agents share (datacenter, node size,
    provider, MRTD, TCB status) interned: one copy each, not one per agent."""
    tcb = identity.tcb_status
    return attrs.evolve(identity, datacenter=sys.intern(identity.datacenter),
                        node_size=sys.intern(identity.node_size),
                        provider=sys.intern(identity.provider),
                        mrtd=sys.intern(identity.mrtd),
                        tcb_status=sys.intern(tcb) if tcb is not None else None,
                        verdict=sys.intern(identity.verdict))


def _refusal_code(status: DeployStatus) -> str | None:
    """The write-refusal code a ``failed`` deploy status starts with, if any."""
    if status.state != "failed" or not status.error:
        return None
    code = status.error.split(":", 1)[0]
    return code if code in WRITE_REFUSAL_CODES else None


def _error_refusal_code(msg: ErrorMessage) -> str | None:
    """The write-refusal code of an ``error`` frame: its code, or (``envelope_refused``,
    the agent's generic code) the one its message starts with."""
    if msg.code in WRITE_REFUSAL_CODES:
        return msg.code
    prefix = msg.message.split(":", 1)[0]
    if msg.code == "envelope_refused" and prefix in WRITE_REFUSAL_CODES:
        return prefix
    return None


__all__ = ["CONNECT_PATH", "AgentPlane", "AgentRequestError", "PlaneSettings", "Session"]
