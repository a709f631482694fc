"""AgentActor: the CP's picture of one agent VM.

It outlives its websocket: a session opening or closing is a message to it
(``SessionOpened`` / ``SessionClosed``), so an agent that drops and comes back keeps
its actor, its id and its drain flag. Its lifecycle follows the table in
``ee.actors.lifecycle``; heartbeat age (Trio time) turns a silent agent stale and
then offline.

Recovery (``started``) rebuilds from the sources, never from a copy: the identity
comes from the live session (what registration proved) and the workload picture from
a fresh ``snapshot`` asked of the agent. With no live session the agent is offline
until it reconnects.

Timers live in the agent plane, not here: one sweep task there tells ``Tick`` to
agents whose last frame is older than the stale threshold and ``ReattestDue`` every
``attest_interval_s``, so an idle agent costs its actor no task and no wake-ups.
Heartbeats of a ready agent do not reach the actor at all: the plane records them in
the directory's ``Beat`` (``AgentPlane._beat_inline``), which is where this actor
reads heartbeat age from; the actor handles those that can change its state.
Re-attestation is a fresh nonce, the agent's quote and verification in a worker
thread; a refusal quarantines the agent (no new placements) and raises an event. A
verifier that raises on the agent's quote is a refusal too (``VERIFY_ERROR``, logged
with its traceback), never a crash of this actor.

A fresh proof (``ProveNow``, asked by a dc CP for its master) is the same round trip
with the master's nonce instead of one of ours: the handler only starts it (one at a
time per agent) and answers a ``PendingProof`` the asker waits on under its own
deadline, so the actor never blocks on the agent. A failing fresh quote counts as a
failed re-attestation (``ReattestDone``: the agent is quarantined); a passing one
changes nothing here.
"""

from __future__ import annotations

import base64
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import trio

from ee.actors.directory import AgentDirectory, AgentRecord, Beat, render
from ee.actors.identity import Identity
from ee.actors.lifecycle import AgentState, api_status, status_for_age, transition
from ee.protocol.messages import (
    Attest,
    Attestation,
    Deploy,
    DeploymentSnapshot,
    DeployStatus,
    Heartbeat,
    LogsReply,
    LogsRequest,
    Message,
    Snapshot,
    SnapshotRequest,
    Undeploy,
)
from ee.runtime import Actor, ActorDead, MailboxFull, handler

log = logging.getLogger("ee.actors.agent")


class AgentLink(Protocol):
    """The live, authenticated session of one agent (implemented by the agent plane)."""

    @property
    def session_id(self) -> int: ...

    @property
    def identity(self) -> Identity: ...

    async def request(self, msg: Message, timeout: float) -> Message: ...

    async def send(self, msg: Message) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class Reattester(Protocol):
    def reattest_answer(self, answer: Attestation, nonce: bytes, identity: Identity, *,
                        now: float) -> Any: ...


@attrs.frozen
class AgentSettings:
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 30.0
    offline_after_s: float = 60.0
    attest_interval_s: float = 3600.0
    request_timeout_s: float = 10.0


@attrs.frozen
class AgentDeps:
    settings: AgentSettings
    link_for: Callable[[str], AgentLink | None]  # agent id -> live session, if any
    reattester: Reattester
    emit: Callable[[str, str, Mapping[str, Any]], None]  # (kind, subject, data)
    attest_limiter: trio.CapacityLimiter
    # Operator intent, kept outside the actor so a restart does not forget it.
    drained: set[str] = attrs.field(factory=set)
    observe_heartbeat: Callable[[float], None] = lambda _seconds: None
    observe_heartbeat_gap: Callable[[float], None] = lambda _seconds: None
    count_fault: Callable[[str], None] = lambda _stage: None  # ee_agent_plane_faults_total
    # Where the agent is published for everyone else to read (one per CP).
    directory: AgentDirectory = attrs.field(factory=AgentDirectory)


@attrs.frozen
class VerifyFault:
    """The refusal of a re-attestation whose verification raised (shaped like a Refusal)."""

    code: str = "VERIFY_ERROR"
    reasons: tuple[str, ...] = ("the quote could not be verified (an internal error, "
                                "logged by the CP); it is not trusted",)


# ---- messages ------------------------------------------------------------------------

@attrs.frozen
class SessionOpened:
    link: AgentLink
    snapshot: Snapshot


@attrs.frozen
class SessionClosed:
    session_id: int
    reason: str


@attrs.frozen
class HeartbeatIn:
    session_id: int
    heartbeat: Heartbeat
    received_at: float = 0.0  # Trio time the frame was read (for handling latency)


@attrs.frozen
class DeployStatusIn:
    session_id: int
    status: DeployStatus


@attrs.frozen
class Tick:
    """Check heartbeat age (sent by the agent plane's sweep to agents gone quiet)."""


@attrs.frozen
class ReattestDue:
    """Time to re-attest (sent by the agent plane's sweep every attest interval)."""


@attrs.frozen
class Describe:
    pass


@attrs.frozen
class SetDrain:
    draining: bool


@attrs.frozen
class ReattestDone:
    session_id: int
    refusal: Any  # Refusal | None
    at_unix: float


@attrs.frozen
class ProveNow:
    """A fresh quote bound to *nonce* (the federation master's), verified here too."""

    nonce: bytes = attrs.field(validator=attrs.validators.min_len(16))


@attrs.define
class PendingProof:
    """``ProveNow``'s answer: filled once by the proving task (``done`` then set).

    ``error``: no answer to judge (``agent_offline``, ``proof_busy``,
    ``agent_no_answer``); else ``answer`` is the agent's ``attestation`` and
    ``refusal`` this CP's verdict on it (None: it passed)."""

    done: trio.Event = attrs.field(factory=trio.Event)
    answer: Attestation | None = None
    refusal: Any = None  # Refusal | VerifyFault | None
    error: str | None = None
    detail: str = ""

    def fail(self, code: str, detail: str) -> PendingProof:
        if not self.done.is_set():
            self.error, self.detail = code, detail
            self.done.set()
        return self


@attrs.frozen
class ReplicaReport:
    """AgentActor → AppActor: a replica's state changed on that agent."""

    deployment_id: str
    agent_id: str
    state: str
    compose_hash: str | None
    error: str | None
    # A failure's cause, as the agent reports it (``DeployStatus``): the phase, the exit
    # code and the last lines of the failed step's output.
    phase: str | None = None
    exit_code: int | None = None
    log_tail: tuple[str, ...] = ()


@attrs.frozen
class PushDeploy:
    """AppActor → AgentActor: claim this agent for a replica and send ``deploy``.

    Answers False when the agent cannot take it (offline, quarantined, draining, or
    already running another deployment): the actor is the one arbiter of its agent.
    An agent that lists this deployment under another version is sent the ``deploy``
    again: it redeploys in place (stops the old services, keeps their named volumes,
    starts the new version under the same compose project).
    """

    app: str
    deployment_id: str
    version: Mapping[str, Any]


@attrs.frozen
class PushUndeploy:
    deployment_id: str


@attrs.frozen
class FetchLogs:
    deployment_id: str
    tail: int = 200
    since: str | None = None  # RFC 3339 UTC: only lines from then on
    service: str | None = None  # only this compose service's lines


@attrs.frozen
class StatusReport:
    """AgentActor → DatacenterActor: this agent's status changed (``at``: Trio time)."""

    agent_id: str
    status: str
    attestation_pass: bool | None
    at: float


MAX_ERROR_CHARS = 2000  # of a replica error the agent reports (shown in views, events)


def _replica_report(st: DeployStatus, agent_id: str) -> ReplicaReport:
    error = st.error[:MAX_ERROR_CHARS] if st.error is not None else None
    return ReplicaReport(st.deployment_id, agent_id, st.state, st.compose_hash, error,
                         st.phase, st.exit_code, tuple(st.log_tail))


def deploy_message(app: str, deployment_id: str, v: Mapping[str, Any]) -> Deploy:
    """The ``deploy`` frame of a version spec (every secret name it receives, sorted,
    in ``secret_names``: part of the workload hash)."""
    context = v.get("build_context")
    secrets_list = v.get("secrets") or []
    return Deploy(deployment_id=deployment_id, app=app, version=v["version"],
                  compose=v["compose"], expose_port=int(v["expose_port"]),
                  health_path=v["health_path"], env=dict(v.get("env") or {}),
                  build_context=base64.b64decode(context) if context else None,
                  expose_service=v.get("expose_service"),
                  secret_env={s["env"]: s["name"] for s in secrets_list
                              if s.get("as") == "env"},
                  secret_names=tuple(sorted({s["name"] for s in secrets_list})))


class AgentActor(Actor):
    def __init__(self, agent_id: str, deps: AgentDeps) -> None:
        self.agent_id = agent_id
        self.deps = deps
        self.state = AgentState.OFFLINE
        self.identity: Identity | None = None
        self.link: AgentLink | None = None
        self.draining = False
        # The latest heartbeat lives in the directory, updated in place (by the agent
        # plane while the agent is ready, by this actor otherwise); age comes from it.
        self.beat: Beat = deps.directory.beat_of(agent_id)
        self.deployments: dict[str, DeploymentSnapshot] = {}
        self.quarantine_reasons: tuple[str, ...] = ()
        self._reattesting = False
        self._proving = False

    # ---- recovery --------------------------------------------------------------------

    async def started(self) -> None:
        self.draining = self.agent_id in self.deps.drained
        link = self.deps.link_for(self.agent_id)
        if link is not None:
            self.identity = link.identity
            try:
                reply = await link.request(SnapshotRequest(),
                                           self.deps.settings.request_timeout_s)
            except Exception as exc:  # the agent will reconnect; stay offline till then
                log.info("agent %s: no snapshot on recovery (%s)", self.agent_id, exc)
            else:
                if isinstance(reply, Snapshot):
                    self._adopt(link, reply)
        self._announce()
        self._publish()

    async def _reattest_once(self, link: AgentLink) -> None:
        """One re-attestation: fresh nonce, the agent's quote, verification in a thread."""
        identity = self.identity
        if identity is None:
            return
        nonce = secrets.token_bytes(32)
        try:
            reply = await link.request(Attest(nonce=nonce), self.deps.settings.request_timeout_s)
        except Exception as exc:
            log.info("agent %s: re-attestation request failed: %s", self.agent_id, exc)
            return
        finally:
            self._reattesting = False
        if not isinstance(reply, Attestation):
            return
        refusal = await self._verify_answer(reply, nonce, identity)
        await self.ref.tell(ReattestDone(link.session_id, refusal, time.time()))

    async def _verify_answer(self, reply: Attestation, nonce: bytes,
                             identity: Identity) -> Any:  # Refusal | VerifyFault | None
        """An ``attestation`` answer checked in a worker thread (None: it passes). The
        quote came from the agent: whatever the verifier raises on it is a refusal
        (fail closed: quarantine), never a crashed actor."""
        try:
            return await trio.to_thread.run_sync(
                functools.partial(self.deps.reattester.reattest_answer, reply, nonce, identity,
                                  now=time.time()),
                limiter=self.deps.attest_limiter)
        except Exception as exc:
            log.error("agent %s: an attestation answer could not be verified",
                      self.agent_id, exc_info=exc)
            self.deps.count_fault("reattest")
            return VerifyFault()

    async def _prove(self, link: AgentLink, identity: Identity, nonce: bytes,
                     pending: PendingProof) -> None:
        """``ProveNow``'s round trip; always fills *pending*, never raises."""
        try:
            try:
                reply = await link.request(Attest(nonce=nonce),
                                           self.deps.settings.request_timeout_s)
            except Exception as exc:
                pending.fail("agent_no_answer", f"the agent did not answer: {exc}"[:300])
                return
            if not isinstance(reply, Attestation):
                pending.fail("agent_no_answer", "the agent answered no attestation")
                return
            refusal = await self._verify_answer(reply, nonce, identity)
            pending.answer, pending.refusal = reply, refusal
            pending.done.set()
            if refusal is not None:  # as a failed re-attestation: quarantined (a pass
                # changes nothing: the proof the dc reported up stays the one it holds)
                await self.ref.tell(ReattestDone(link.session_id, refusal, time.time()))
        finally:
            self._proving = False
            pending.fail("agent_no_answer", "the proof was abandoned")

    # ---- state changes ---------------------------------------------------------------

    def _set_state(self, target: AgentState) -> None:
        if target is self.state:
            return
        old = self.state
        self.state = transition(self.state, target)
        self.deps.emit("agent.status", self.agent_id,
                       {"from": old.value, "to": target.value, "vm_name": self.vm_name})
        self._announce()
        self._publish()

    @property
    def vm_name(self) -> str | None:
        return self.identity.vm_name if self.identity else None

    def record(self) -> AgentRecord:
        return AgentRecord(self.agent_id, self.identity, self.state, self.draining,
                           tuple(self.deployments.values()), self.quarantine_reasons)

    def _publish(self) -> None:
        """Put this agent's current record in the directory (a no-op when unchanged)."""
        self.deps.directory.put(self.record())

    def _announce(self) -> None:
        if self.identity is None:
            return
        passed = None if self.state is AgentState.OFFLINE else (
            self.state is not AgentState.QUARANTINED)
        report = StatusReport(self.agent_id, api_status(self.state), passed,
                              trio.current_time())
        try:
            self.registry.ref(f"dc/{self.identity.datacenter}").try_tell(report)
        except (ActorDead, MailboxFull):
            pass  # the datacenter rebuilds from agents when it (re)starts

    def _adopt(self, link: AgentLink, snapshot: Snapshot) -> None:
        self.link = link
        self.identity = link.identity
        if self.state is not AgentState.CONNECTING:
            self.state = transition(self.state, AgentState.CONNECTING)
        self.state = transition(self.state, AgentState.REGISTERED)
        self._apply_snapshot(snapshot)
        self.quarantine_reasons = ()
        self._set_state(AgentState.READY)
        self._publish()

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        self.deployments = {d.deployment_id: d for d in snapshot.deployments}
        self.beat = self.deps.directory.beat(self.agent_id, snapshot.seq, snapshot.health,
                                             None, trio.current_time(), time.time())

    def _current(self, session_id: int) -> bool:
        return self.link is not None and self.link.session_id == session_id

    # ---- handlers --------------------------------------------------------------------

    @handler(SessionOpened)
    async def on_opened(self, msg: SessionOpened) -> None:
        old = self.link
        if old is not None and old.session_id != msg.link.session_id:
            await old.close(1000, "replaced by a newer session of the same VM")
        self._adopt(msg.link, msg.snapshot)
        self.deps.emit("agent.connected", self.agent_id,
                       {"vm_name": msg.link.identity.vm_name,
                        "datacenter": msg.link.identity.datacenter})

    @handler(SessionClosed)
    async def on_closed(self, msg: SessionClosed) -> None:
        if not self._current(msg.session_id):
            return
        self.link = None
        self._set_state(AgentState.OFFLINE)
        self.deps.emit("agent.disconnected", self.agent_id, {"reason": msg.reason})

    @handler(HeartbeatIn)
    async def on_heartbeat(self, msg: HeartbeatIn) -> None:
        if not self._current(msg.session_id):
            return
        hb = msg.heartbeat
        now = trio.current_time()
        if msg.received_at:
            self.deps.observe_heartbeat(now - msg.received_at)
        if self.beat.at is not None:
            self.deps.observe_heartbeat_gap(now - self.beat.at)
        # In place: the frozen frame values are kept, turned into JSON only when viewed.
        self.deps.directory.beat(self.agent_id, hb.seq, hb.health, hb.stats, now,
                                 time.time())
        if self.state is AgentState.STALE:
            self._set_state(AgentState.READY)

    @handler(DeployStatusIn)
    async def on_deploy_status(self, msg: DeployStatusIn) -> None:
        if not self._current(msg.session_id):
            return
        st = msg.status
        old = self.deployments.get(st.deployment_id)
        if old is None:
            return  # not one the CP knows on this agent; the next snapshot settles it
        if st.state == "stopped":
            del self.deployments[st.deployment_id]
        else:
            self.deployments[st.deployment_id] = attrs.evolve(
                old, state=st.state, compose_hash=st.compose_hash or old.compose_hash,
                image_digests=st.image_digests or old.image_digests)
        self._publish()
        report = _replica_report(st, self.agent_id)
        try:
            self.registry.ref(f"app/{old.app}").try_tell(report)
        except (ActorDead, MailboxFull):
            pass  # the app reconciles from agent views on its next pass

    @handler(PushDeploy)
    async def on_push_deploy(self, msg: PushDeploy) -> bool:
        others = [d for d in self.deployments if d != msg.deployment_id]
        if (self.link is None or self.state not in (AgentState.READY,)
                or self.draining or others):
            return False
        v = msg.version
        listed = self.deployments.get(msg.deployment_id)
        if listed is not None and listed.app != msg.app:
            return False  # listed under another app: a stray, stopped by the app
        if listed is not None and listed.version == v["version"]:
            return True  # already there (adopted or in flight)
        # New here, or listed under another version: (re)deploy, in place for the latter.
        deploy = deploy_message(msg.app, msg.deployment_id, v)
        try:
            await self.link.send(deploy)
        except Exception as exc:  # the session just died; the app will re-place
            log.info("agent %s: deploy %s not sent: %s", self.agent_id, msg.deployment_id, exc)
            return False
        self.deployments[msg.deployment_id] = DeploymentSnapshot(
            deployment_id=msg.deployment_id, app=msg.app, version=v["version"],
            state="pending", compose_hash=None)
        self._publish()
        return True

    @handler(PushUndeploy)
    async def on_push_undeploy(self, msg: PushUndeploy) -> bool:
        old = self.deployments.get(msg.deployment_id)
        if old is None:
            return False
        if self.link is not None:
            try:
                await self.link.send(Undeploy(deployment_id=msg.deployment_id))
            except Exception as exc:
                log.info("agent %s: undeploy not sent: %s", self.agent_id, exc)
                return False
            self.deployments[msg.deployment_id] = attrs.evolve(old, state="stopping")
            self._publish()
        return True

    @handler(FetchLogs)
    async def on_fetch_logs(self, msg: FetchLogs) -> list[dict[str, str | None]]:
        if self.link is None:
            raise_offline = f"agent {self.agent_id} is offline"
            return [{"service": "-", "text": raise_offline, "at": None}]
        try:
            ask = LogsRequest(deployment_id=msg.deployment_id, tail=msg.tail,
                              since=msg.since, service=msg.service)
        except (ValueError, TypeError) as exc:  # checked by the route; never a crash here
            return [{"service": "-", "text": f"logs unavailable: {exc}", "at": None}]
        try:
            reply = await self.link.request(ask, self.deps.settings.request_timeout_s)
        except Exception as exc:  # refused, no answer, session gone: the asker's problem,
            # never this actor's (a tenant asking for logs must not crash it)
            return [{"service": "-", "text": f"logs unavailable: {exc}", "at": None}]
        if not isinstance(reply, LogsReply):
            return []
        return [{"service": line.service, "text": line.text, "at": line.at}
                for line in reply.lines]

    @handler(Tick)
    async def on_tick(self, _: Tick) -> None:
        if self.beat.at is None:
            return
        age = trio.current_time() - self.beat.at
        s = self.deps.settings
        target = status_for_age(self.state, age, s.stale_after_s, s.offline_after_s)
        if target is AgentState.OFFLINE and self.link is not None:
            link, self.link = self.link, None
            await link.close(1001, f"no heartbeat for {age:.0f}s")
        self._set_state(target)

    @handler(ReattestDue)
    async def on_reattest_due(self, _: ReattestDue) -> None:
        if self.link is not None and not self._reattesting:
            self._reattesting = True
            self.start_soon(self._reattest_once, self.link)

    @handler(ProveNow)
    async def on_prove_now(self, msg: ProveNow) -> PendingProof:
        pending = PendingProof()
        if self.link is None or self.identity is None:
            return pending.fail("agent_offline", f"agent {self.agent_id} is offline")
        if self._proving:
            return pending.fail("proof_busy", "a fresh proof of this agent is under way")
        self._proving = True
        self.start_soon(self._prove, self.link, self.identity, msg.nonce, pending)
        return pending

    @handler(SetDrain)
    async def on_drain(self, msg: SetDrain) -> dict[str, Any]:
        self.draining = msg.draining
        if msg.draining:
            self.deps.drained.add(self.agent_id)
        else:
            self.deps.drained.discard(self.agent_id)
        self._publish()
        self.deps.emit("agent.drain", self.agent_id, {"draining": msg.draining})
        return self.view()

    @handler(ReattestDone)
    async def on_reattest(self, msg: ReattestDone) -> None:
        if not self._current(msg.session_id) or self.identity is None:
            return
        if msg.refusal is None:
            self.identity = attrs.evolve(self.identity, verified_at=msg.at_unix)
            self._publish()
            self.deps.emit("agent.reattested", self.agent_id, {"vm_name": self.vm_name})
            return
        self.quarantine_reasons = tuple(msg.refusal.reasons)
        self._publish()
        self.deps.emit("agent.quarantined", self.agent_id,
                       {"code": msg.refusal.code, "reasons": list(msg.refusal.reasons)})
        if self.state in (AgentState.READY, AgentState.STALE):
            self._set_state(AgentState.QUARANTINED)

    @handler(Describe)
    async def on_describe(self, _: Describe) -> dict[str, Any]:
        return self.view()

    def view(self) -> dict[str, Any]:
        return render(self.record(), self.beat, trio.current_time())
