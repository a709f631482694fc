"""The agent assembled: identity, workloads, CP session, HTTP server, tunnel.

:class:`Agent` owns what outlives a CP session: its data dir (session key, control
secret, workloads), the :class:`~ee.agent.workload.ComposeRunner`, the heartbeat
sequence and the *current* deployment (the one the proxy and ``/.ee/health`` speak
for: the one deployed last, remembered across restarts, else any running one).

Deploys and undeploys run in tasks of the agent's own nursery, not of the session, so
a CP disconnect never cancels a workload half-way; their ``deploy_status`` frames go to
whatever session is live when they are reported (a status nobody hears is carried by
the next registration's snapshot). An undeploy cancels an in-flight deploy of the same
deployment first, and a redeploy cancels the previous in-flight deploy.

:attr:`Agent.runtime` is RTMR3 and its runtime log (:mod:`ee.agent.rtmr3`): the runner
measures each deployment into it before running it, the sim provider's quotes carry its
register, and the attested health serves its log (with the firmware's event log on a
TD). Under ``tsm`` on a kernel that cannot extend RTMR3 it is None: deployments then
run unmeasured and the attested health serves ``runtime_log: null`` (logged at start).

:meth:`Agent.run` adopts what a previous process left running, serves HTTP, starts
the tunnel when configured, then runs the session loop until it gives up; the
terminal action (``exit`` or ``poweroff_command``) then runs and
:class:`~ee.agent.session.Terminated` propagates to the caller. Without a CP URL the
agent only serves HTTP. :meth:`Agent.request_stop` stops it gracefully (HTTP first,
with a grace period); workloads keep running, to be adopted by the next start.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from ee import __version__
from ee.agent.backoff import ReconnectPolicy
from ee.agent.config import AgentConfig, WorkloadLimits, parse_host_port
from ee.agent.cptrust import CpTrust, release_keys_of
from ee.agent.http import HttpLimits, serve_http
from ee.agent.logstore import RetainedLogs
from ee.agent.platform import (
    KEY_FILE,
    SECRET_FILE,
    NodeSampler,
    QuoteSource,
    load_or_create_key,
    load_or_create_secret,
    node_info,
    outbound_address,
    public_key_bytes,
)
from ee.agent.rtmr3 import (
    CCEL,
    AttestationLogs,
    Rtmr3Error,
    Rtmr3Unavailable,
    RuntimeMeasurements,
    open_register,
    read_boot_log,
    runtime_log_path,
)
from ee.agent.secrets import SecretStore, secrets_base
from ee.agent.session import SessionLink, SessionLoop, Terminated, Write
from ee.agent.tunnel import TunnelSupervisor
from ee.agent.workload import (
    ComposeRunner,
    DeploymentStatus,
    DeploySpec,
    UnknownDeployment,
    WorkloadSettings,
)
from ee.attestation.eventlog import EventLogFormatError, RuntimeEvent, parse_ccel
from ee.protocol.frames import Frame
from ee.protocol.messages import (
    MAX_EVENT_LOG_BYTES,
    MAX_RUNTIME_LOG_CHARS,
    Attest,
    Attestation,
    ContainerStats,
    Deploy,
    DeploymentSnapshot,
    DeployStatus,
    ErrorMessage,
    Health,
    Heartbeat,
    LogLine,
    LogsReply,
    LogsRequest,
    Message,
    Register,
    Registered,
    SecretAck,
    SecretRelease,
    SecretRevoke,
    SecretsKey,
    SecretsKeyRequest,
    Snapshot,
    SnapshotRequest,
    StatsReply,
    StatsRequest,
    TunnelGrant,
    Undeploy,
)
from ee.protocol.reportdata import registration_report_data

__all__ = ["AGENT_VERSION", "Agent", "ChallengeBook"]

log = logging.getLogger("ee.agent")

AGENT_VERSION = f"ee-agent/{__version__}"
CURRENT_FILE = "current-deployment"
AGENT_ID_FILE = "agent-id"
MAX_LOG_REPLY_BYTES = 512 * 1024
HTTP_GRACE_S = 5.0
RETAINED_LOGS_DIR = "retained-logs"
LOG_PURGE_INTERVAL_S = 600.0
ATTEST_TRIES = 3


def workload_settings_of(limits: WorkloadLimits) -> WorkloadSettings:
    """The runner's settings from the agent config's ``workload`` limits."""
    return WorkloadSettings(pull_timeout=limits.pull_timeout_s,
                            build_timeout=limits.build_timeout_s,
                            start_timeout=limits.start_timeout_s,
                            health_timeout=limits.health_timeout_s)


def _wire_runtime_log(events: tuple[RuntimeEvent, ...] | None) -> str | None:
    """The runtime log as sent to the CP: its exact canonical lines; None (logged) when
    it exceeds the frame's share."""
    if events is None:
        return None
    text = "".join(e.canonical().decode() + "\n" for e in events)
    if len(text) > MAX_RUNTIME_LOG_CHARS:
        log.error("the runtime log has %d events (%d characters, max %d), it is not sent",
                  len(events), len(text), MAX_RUNTIME_LOG_CHARS)
        return None
    return text


class ChallengeBook:
    """Single-use nonces for ``GET /.ee/control/challenge`` (Trio time, TTL)."""

    def __init__(self, ttl_s: float = 60.0, limit: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._issued: dict[bytes, float] = {}

    def issue(self, now: float) -> tuple[bytes, float]:
        self._issued = {n: t for n, t in self._issued.items() if t > now}
        while len(self._issued) >= self.limit:
            self._issued.pop(next(iter(self._issued)))
        nonce = secrets.token_bytes(32)
        self._issued[nonce] = now + self.ttl_s
        return nonce, self.ttl_s

    def consume(self, nonce: bytes, now: float) -> bool:
        expires = self._issued.pop(nonce, None)
        return expires is not None and expires > now


class Agent:
    """One agent process's state and tasks (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        runner: ComposeRunner | None = None,
        workload_settings: WorkloadSettings | None = None,
        quotes: QuoteSource | None = None,
        jitter: Callable[[], float] = random.random,
        http_limits: HttpLimits | None = None,
        runtime_log: Path | None = None,
        boot_log: Path | None = None,
    ) -> None:
        """*runtime_log* overrides where the RTMR3 runtime log lives
        (`ee.agent.rtmr3.runtime_log_path`); *boot_log* where the firmware's event log
        is read (default: the CCEL under ``tsm``, none otherwise)."""
        self.config = config
        self.http_limits = http_limits or config.http
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.vm_name = config.vm_name or socket.gethostname().lower().rstrip(".")
        self.key = load_or_create_key(self.data_dir / KEY_FILE)
        self.public_key = public_key_bytes(self.key)
        self.secret_path = self.data_dir / SECRET_FILE
        self.secret, self.secret_created = load_or_create_secret(self.secret_path)
        self.runtime = self._open_runtime(runtime_log)
        self.boot_log = boot_log or (CCEL if config.attestation_provider == "tsm" else None)
        self._boot_log_bytes: bytes | None = None
        self._boot_log_wire: tuple[bytes, bytes | None] | None = None  # (read, as sent)
        self.quotes = quotes or QuoteSource.from_config(
            config, rtmr3=None if self.runtime is None else self.runtime.register.read
        )
        self.secret_store = SecretStore(secrets_base(self.data_dir))
        self.runner = runner or ComposeRunner(
            self.data_dir, workload_settings or workload_settings_of(config.workload),
            measurer=self.runtime)
        if self.runner.retained is None:
            self.runner.retained = RetainedLogs(self.data_dir / RETAINED_LOGS_DIR,
                                                retention_s=config.workload.log_retention_s)
        if self.runner.secrets_dir is None:
            self.runner.secrets_dir = self.secret_store.directory
        if self.runner.secret_env is None:
            self.runner.secret_env = self.secret_store
        self.trust = CpTrust(config.cp_envelope, self.data_dir, config.trusted_cp_mrtds,
                             release_keys=release_keys_of(config))
        self.sampler = NodeSampler(str(self.data_dir))
        self.node = node_info(config)
        self.challenges = ChallengeBook()
        self.jitter = jitter
        self.seq = 0
        self.started_at = time.time()
        self.agent_id: str | None = self._read_small(AGENT_ID_FILE)
        self.current: str | None = self._read_small(CURRENT_FILE)
        self.link: SessionLink | None = None
        self.registered: Registered | None = None
        self.session_loop: SessionLoop | None = None
        self.tunnel: TunnelSupervisor | None = None
        self.http_port: int | None = None
        self._tunnel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._inflight: dict[str, trio.CancelScope] = {}
        self._stop = trio.Event()
        self._http_stopped = trio.Event()
        self.terminated: Terminated | None = None

    def _open_runtime(self, override: Path | None) -> RuntimeMeasurements | None:
        """RTMR3 and its log (see the module docstring); raises `Rtmr3Error` when the
        log does not explain the register (the agent must not start lying)."""
        provider = self.config.attestation_provider
        path = override or runtime_log_path(provider, self.data_dir)
        try:
            register = open_register(provider)
        except Rtmr3Unavailable as exc:
            log.error("RTMR3 unavailable, deployments will not be measured: %s", exc)
            return None
        runtime = RuntimeMeasurements.open(register, path)
        log.info("RTMR3 (%s) %s, %d runtime events in %s", register.kind,
                 register.read().hex(), len(runtime.events), path)
        return runtime

    async def attestation_logs(self) -> AttestationLogs:
        """The logs served with an attested health, read before its quote is taken."""
        if self.boot_log is not None and self._boot_log_bytes is None:
            self._boot_log_bytes = await trio.to_thread.run_sync(read_boot_log, self.boot_log)
        runtime = None if self.runtime is None else self.runtime.events
        return AttestationLogs(event_log=self._boot_log_bytes, runtime_log=runtime)

    async def attestation(self, report_data: bytes) -> Attestation:
        """A quote over *report_data* with the event logs that explain it (for the CP:
        ``register`` and the answer to ``attest``). The logs are read before the quote;
        a deploy measured in between would make the runtime log miss an event the quote
        holds, so then both are taken again (`ATTEST_TRIES` times at most; the CP refuses
        a log that does not replay, and the agent registers again)."""
        for _ in range(ATTEST_TRIES):
            try:
                logs = await self.attestation_logs()
            except Rtmr3Error as exc:
                log.error("cannot read the event logs, the quote goes without them: %s", exc)
                logs = AttestationLogs()
                quote = await self.quotes.quote(report_data)
                break  # nothing to keep consistent with the quote
            quote = await self.quotes.quote(report_data)
            if self.runtime is None or self.runtime.events is logs.runtime_log:
                break
        return Attestation(provider=self.quotes.name, quote=quote,  # type: ignore[arg-type]
                           event_log=await self._wire_boot_log(logs.event_log),
                           runtime_log=_wire_runtime_log(logs.runtime_log))

    async def _wire_boot_log(self, raw: bytes | None) -> bytes | None:
        """The CCEL as sent to the CP: without its padding (the firmware reserves a
        fixed area), None when it does not parse or exceeds the frame's share."""
        if raw is None:
            return None
        if self._boot_log_wire is None or self._boot_log_wire[0] is not raw:
            try:
                size = (await trio.to_thread.run_sync(parse_ccel, raw)).size
            except EventLogFormatError as exc:
                log.error("the boot event log does not parse, it is not sent: %s", exc)
                wire = None
            else:
                wire = raw[:size]
                if len(wire) > MAX_EVENT_LOG_BYTES:
                    log.error("the boot event log has %d bytes (max %d), it is not sent",
                              len(wire), MAX_EVENT_LOG_BYTES)
                    wire = None
            self._boot_log_wire = (raw, wire)
        return self._boot_log_wire[1]

    async def _measure_adopted(self, adopted: list[DeploymentStatus]) -> None:
        """Measure adopted deployments the runtime log does not show (a TD reboot
        resets RTMR3 and its log while the containers may come back)."""
        runtime = self.runtime
        if runtime is None:
            return
        for status in adopted:
            if status.compose_hash is None or runtime.measured(status.deployment_id,
                                                               status.compose_hash):
                continue
            try:
                await trio.to_thread.run_sync(partial(
                    runtime.record_deploy, app=status.app, version=status.version,
                    deployment_id=status.deployment_id, compose_hash=status.compose_hash))
            except (Rtmr3Error, ValueError) as exc:
                log.error("cannot measure adopted deployment %s into RTMR3: %s",
                          status.deployment_id, exc)

    # -- small persistent facts ---------------------------------------------------

    def _read_small(self, name: str) -> str | None:
        try:
            return (self.data_dir / name).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _write_small(self, name: str, value: str | None) -> None:
        path = self.data_dir / name
        if value is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(value + "\n", encoding="utf-8")
        tmp.replace(path)

    # -- what the agent reports ---------------------------------------------------

    def current_status(self) -> DeploymentStatus | None:
        """The deployment the proxy and health speak for (see the module docstring)."""
        if self.current is not None:
            status = self.runner.status(self.current)
            if status is not None:
                return status
        known = self.runner.deployments()
        running = [s for s in known if s.state == "running"]
        candidates = running or known
        return candidates[0] if candidates else None

    def upstream(self) -> tuple[str, int] | None:
        """Where the proxy sends requests: the current deployment's container, if running."""
        status = self.current_status()
        return None if status is None else self.runner.upstream(status.deployment_id)

    def deployment_statuses(self) -> list[DeploymentStatus]:
        return list(self.runner.deployments())

    async def recheck(self, deployment_id: str) -> None:
        """Re-inspect a deployment the proxy could not reach (a dead one turns ``failed``)."""
        try:
            await self.runner.refresh(deployment_id)
        except UnknownDeployment:
            pass

    @property
    def cp_connected(self) -> bool:
        return self.link is not None

    @property
    def listen(self) -> str:
        return self.config.listen

    def tunnel_view(self) -> dict[str, Any] | None:
        return self.tunnel.status.to_json() if self.tunnel else None

    def health(self) -> Health:
        status = self.current_status()
        if status is None:
            return Health(status="healthy", detail="no workload deployed")
        if status.state == "running":
            return Health(status="healthy", detail=f"{status.deployment_id} running")
        if status.state == "starting":
            return Health(status="starting", detail=f"{status.deployment_id} starting")
        if status.state == "failed":
            error = (status.error or "failed").strip().splitlines() or ["failed"]
            return Health(status="unhealthy", detail=f"{status.deployment_id}: {error[-1][:300]}")
        return Health(status="unknown", detail=f"{status.deployment_id} {status.state}")

    def deployment_snapshots(self) -> tuple[DeploymentSnapshot, ...]:
        return tuple(
            DeploymentSnapshot(
                deployment_id=s.deployment_id,
                app=s.app or "unknown",
                version=s.version or "unknown",
                state=s.state,
                compose_hash=s.compose_hash,
                image_digests=dict(s.image_digests or {}),
            )
            for s in self.runner.deployments()
        )

    def snapshot(self) -> Snapshot:
        return Snapshot(
            deployments=self.deployment_snapshots(),
            health=self.health(),
            node=self.node,
            seq=self.seq,
        )

    # -- SessionHost ----------------------------------------------------------------

    async def register_message(self, nonce: bytes) -> Register:
        attestation = await self.attestation(registration_report_data(nonce, self.public_key))
        return Register(
            vm_name=self.vm_name,
            node_size=self.config.node_size,
            datacenter=self.config.datacenter,
            agent_version=AGENT_VERSION,
            public_key=self.public_key,
            attestation=attestation,
            snapshot=self.snapshot(),
            bootstrap_token=self.config.bootstrap_token,
            url=self.public_url(),
        )

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes
                                  ) -> bytes:
        return await self.quotes.activate(credential_blob, encrypted_secret)

    def heartbeat(self) -> Heartbeat:
        self.seq += 1
        return Heartbeat(seq=self.seq, health=self.health(), stats=self.sampler.sample())

    async def answer(self, msg: Message) -> Message:
        if isinstance(msg, SnapshotRequest):
            return self.snapshot()
        if isinstance(msg, Attest):
            return await self.attestation(registration_report_data(msg.nonce, self.public_key))
        if isinstance(msg, LogsRequest):
            try:
                return await self.logs_reply(msg)
            except UnknownDeployment:
                return ErrorMessage(code="unknown_deployment",
                                    message=f"no deployment {msg.deployment_id!r} on this agent "
                                            "(nor its logs within the retention window)")
        if isinstance(msg, StatsRequest):
            return await self.stats_reply()
        if isinstance(msg, SecretsKeyRequest):
            store = self.secret_store
            return SecretsKey(public_key=store.public_key, signature=store.prove(msg.nonce,
                                                                                  self.key))
        return ErrorMessage(code="unsupported", message=f"cannot answer {msg.TYPE}")

    def attach(self, link: SessionLink, registered: Registered) -> None:
        self.link = link
        self.registered = registered
        if registered.agent_id != self.agent_id:
            self.agent_id = registered.agent_id
            self._write_small(AGENT_ID_FILE, registered.agent_id)
        if registered.tunnel is not None:
            self._start_tunnel(registered.tunnel)

    def detach(self, link: SessionLink) -> None:
        if self.link is link:
            self.link = None

    async def write(self, frame: Frame, msg: Write) -> None:
        # Canonical JSON of the whole body (build context included) and an Ed25519
        # check: off the event loop. The reader awaits each write, so seq stays ordered.
        verdict = await trio.to_thread.run_sync(
            self.trust.check, frame.type, frame.body, msg.envelope)
        if verdict.accepted:
            if verdict.pin is not None:
                log.warning("pinned the CP MRTD %s (first envelope seen)", verdict.pin)
            if isinstance(msg, Deploy):
                self.start_deploy(msg)
            elif isinstance(msg, Undeploy):
                self.start_undeploy(msg.deployment_id)
            else:
                self._spawn(self._secret_write, msg, frame.id)
            return
        log.error("%s", verdict.reason)
        if isinstance(msg, SecretRelease | SecretRevoke):
            self._spawn(self.send, SecretAck(
                deployment_id=msg.deployment_id, state="refused", name=msg.name,
                code=verdict.code or "ENVELOPE_MISSING", reason=verdict.reason[:500]), frame.id)
            return
        if isinstance(msg, Deploy):
            refusal: Message = DeployStatus(
                deployment_id=msg.deployment_id, state="failed", error=verdict.reason
            )
        else:
            refusal = ErrorMessage(code="envelope_refused", message=verdict.reason)
        self._spawn(self.send, refusal, frame.id if isinstance(msg, Undeploy) else None)

    async def _secret_write(self, msg: SecretRelease | SecretRevoke, re: int | None) -> None:
        """Apply a release (or a revocation) in a worker thread and answer ``secret_ack``."""
        store = self.secret_store
        if isinstance(msg, SecretRevoke):
            ack = await trio.to_thread.run_sync(store.revoke, msg)
        else:
            status = self.runner.status(msg.deployment_id)
            runs = status is not None and status.state in ("starting", "running")
            before = store.held(msg.deployment_id).get(msg.name)
            ack = await trio.to_thread.run_sync(store.apply, msg, runs)
            rotated = ack.state == "applied" and before is not None and before < msg.version
            if rotated and msg.on_rotate != "none":
                # The new file is in place; tell the services before answering, so the
                # CP (which awaits this answer) rotates replicas one at a time.
                problem = await self.runner.on_secret_rotated(
                    msg.deployment_id, msg.name, msg.on_rotate, msg.signal)
                what = (f"sent {msg.signal}" if msg.on_rotate == "signal"
                        else "restarted the services")
                ack = attrs.evolve(ack, reason=f"{ack.reason}; rotated: " + (
                    what if problem is None else f"could not {msg.on_rotate}: {problem}"))
        await self.send(ack, re)

    # -- sending --------------------------------------------------------------------

    async def send(self, msg: Message, re: int | None = None) -> bool:
        """Send on the live session, if any; False when nobody heard it."""
        link = self.link
        if link is None:
            return False
        try:
            await link.send(msg, re=re)
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            return False
        return True

    async def _report(self, status: DeploymentStatus) -> None:
        await self.send(DeployStatus(**status.to_wire()))

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("the agent is not running")
        self._nursery.start_soon(fn, *args)

    # -- deploy and undeploy ----------------------------------------------------------

    def start_deploy(self, msg: Deploy) -> None:
        """Run a ``deploy`` in the background, reporting ``deploy_status`` frames."""
        previous = self._inflight.pop(msg.deployment_id, None)
        if previous is not None:
            previous.cancel()
        scope = trio.CancelScope()
        self._inflight[msg.deployment_id] = scope
        self._spawn(self._deploy, msg, scope)

    async def deploy(self, msg: Deploy) -> DeploymentStatus:
        """Deploy and wait for the outcome (what the background task runs)."""
        scope = trio.CancelScope()
        self._inflight[msg.deployment_id] = scope
        await self._deploy(msg, scope)
        status = self.runner.status(msg.deployment_id)
        assert status is not None
        return status

    async def _deploy(self, msg: Deploy, scope: trio.CancelScope) -> None:
        try:
            with scope:
                try:
                    spec = DeploySpec(
                        deployment_id=msg.deployment_id,
                        app=msg.app,
                        version=msg.version,
                        compose=msg.compose,
                        expose_port=msg.expose_port,
                        health_path=msg.health_path,
                        build_context=msg.build_context,
                        env=dict(msg.env),
                        secret_env=dict(msg.secret_env),
                        expose_service=msg.expose_service,
                        secret_names=msg.secret_names,
                    )
                except (TypeError, ValueError) as exc:
                    await self.send(DeployStatus(deployment_id=msg.deployment_id, state="failed",
                                                 error=f"invalid deploy: {exc}"))
                    return
                self.current = msg.deployment_id
                self._write_small(CURRENT_FILE, msg.deployment_id)
                await self.runner.deploy(spec, on_status=self._report)
        except Exception as exc:  # a bug below must not take the agent down
            log.exception("deploy %s crashed", msg.deployment_id)
            await self.send(DeployStatus(deployment_id=msg.deployment_id, state="failed",
                                         error=f"agent error: {type(exc).__name__}: {exc}"))
        finally:
            if self._inflight.get(msg.deployment_id) is scope:
                del self._inflight[msg.deployment_id]

    def start_undeploy(self, deployment_id: str) -> None:
        inflight = self._inflight.pop(deployment_id, None)
        if inflight is not None:
            inflight.cancel()
        self._spawn(self.undeploy, deployment_id)

    async def undeploy(self, deployment_id: str) -> DeploymentStatus:
        reported: list[DeploymentStatus] = []

        async def report(status: DeploymentStatus) -> None:
            reported.append(status)
            await self._report(status)

        async def forget() -> None:  # under the runner's lock: see ComposeRunner.undeploy
            await trio.to_thread.run_sync(self.secret_store.forget, deployment_id)

        try:
            result = await self.runner.undeploy(deployment_id, on_status=report,
                                                on_stopped=forget)
        except Exception as exc:
            log.exception("undeploy %s crashed", deployment_id)
            result = DeploymentStatus(deployment_id=deployment_id, state="failed",
                                      error=f"agent error: {type(exc).__name__}: {exc}")
        if not reported or reported[-1] != result:
            await self._report(result)
        if (result.state == "stopped" and self.current == deployment_id
                and self.runner.status(deployment_id) is None
                and deployment_id not in self._inflight):  # not redeployed meanwhile
            self.current = None
            self._write_small(CURRENT_FILE, None)
        return result

    # -- logs and stats -------------------------------------------------------------

    def _resolve(self, deployment_id: str | None) -> str | None:
        if deployment_id is not None:
            return deployment_id
        status = self.current_status()
        return None if status is None else status.deployment_id

    async def log_lines(self, request: LogsRequest) -> tuple[str | None, dict[str, list[LogLine]]]:
        """The deployment the request names (else the current one) and its lines per
        service; raises ``UnknownDeployment`` for an id neither running here nor kept
        (:mod:`ee.agent.logstore`)."""
        target = self._resolve(request.deployment_id)
        if target is None:
            return None, {}
        return target, await self.runner.log_lines(target, tail=request.tail,
                                                   since=request.since, service=request.service)

    async def logs_reply(self, request: LogsRequest) -> LogsReply:
        lines: list[LogLine] = []
        size = 0
        truncated = False
        for service, found in (await self.log_lines(request))[1].items():
            for line in found[-request.tail:]:
                size += len(line.text) + len(service) + 64
                if size > MAX_LOG_REPLY_BYTES:
                    truncated = True
                    break
                lines.append(line)
        return LogsReply(lines=tuple(lines), truncated=truncated)

    async def stats(self) -> dict[str, Any]:
        deployments: dict[str, Any] = {}
        for status in self.runner.deployments():
            samples = await self.runner.stats(status.deployment_id)
            deployments[status.deployment_id] = {k: attrs.asdict(v) for k, v in samples.items()}
        return {"node": attrs.asdict(self.sampler.sample()), "deployments": deployments}

    async def stats_reply(self) -> StatsReply:
        containers: list[ContainerStats] = []
        for status in self.runner.deployments():
            for key, sample in (await self.runner.stats(status.deployment_id)).items():
                containers.append(ContainerStats(
                    name=f"{status.deployment_id}/{key}",
                    cpu_percent=max(0.0, sample.cpu_percent or 0.0),
                    memory_mb=max(0, sample.memory_bytes or 0) >> 20,
                ))
        return StatsReply(node=self.sampler.sample(), containers=tuple(containers))

    # -- tunnel ---------------------------------------------------------------------

    def public_url(self) -> str:
        """Where this agent's HTTP API answers, as told to the CP at registration.

        The tunnel hostname once the CP granted one; else the listen address, with a
        wildcard host replaced by the local address that routes to the CP.
        """
        if self.registered is not None and self.registered.tunnel is not None:
            return f"https://{self.registered.tunnel.hostname}"
        host, port = parse_host_port(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            cp_host = urlsplit(self.config.cp_url or "").hostname or "127.0.0.1"
            host = outbound_address(cp_host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port or port}"

    def _local_url(self) -> str:
        host, port = parse_host_port(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.http_port or port}"

    def _start_tunnel(self, grant: TunnelGrant | None) -> None:
        if self.tunnel is not None and self.tunnel.grant == grant:
            return
        if self._tunnel_scope is not None:
            self._tunnel_scope.cancel()
        supervisor = TunnelSupervisor(self.config.tunnel, self._local_url(), grant,
                                      jitter=self.jitter)
        self.tunnel = supervisor
        scope = trio.CancelScope()
        self._tunnel_scope = scope

        async def run() -> None:
            with scope:
                await supervisor.run()

        self._spawn(run)

    # -- running --------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped; raises :class:`Terminated` after the terminal action."""
        self._stop = trio.Event()
        self.terminated = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            adopted = await self.runner.adopt()
            for status in adopted:
                log.info("adopted deployment %s (%s)", status.deployment_id, status.state)
            await self._measure_adopted(adopted)
            binds = await nursery.start(self._serve_http)
            self.http_port = int(str(binds[0]).rsplit(":", 1)[1])
            if self.config.tunnel.enabled:
                self._start_tunnel(None)
            nursery.start_soon(self._purge_logs)
            task_status.started(self)
            async with trio.open_nursery() as inner:
                if self.config.cp_url is not None:
                    inner.start_soon(self._run_session, self.config.cp_url)
                await self._stop.wait()
                inner.cancel_scope.cancel()
            with trio.move_on_after(HTTP_GRACE_S):
                await self._http_stopped.wait()
            nursery.cancel_scope.cancel()
        self._nursery = None
        if self.terminated is not None:
            raise self.terminated

    async def _purge_logs(self) -> None:
        """Drop retained logs past their window now and then (reads purge too)."""
        retained = self.runner.retained
        while retained is not None:
            try:
                await trio.to_thread.run_sync(retained.purge)
            except OSError as exc:
                log.warning("cannot purge retained logs: %s", exc)
            await trio.sleep(LOG_PURGE_INTERVAL_S)

    async def _serve_http(self, task_status: trio.TaskStatus[list[str]]) -> None:
        self._http_stopped = trio.Event()
        try:
            await serve_http(self, self._stop, task_status=task_status)
        finally:
            self._http_stopped.set()

    async def _run_session(self, url: str) -> None:
        config = self.config
        policy = ReconnectPolicy(
            base=config.reconnect_backoff_base_s,
            cap=config.reconnect_backoff_max_s,
            max_attempts=config.reconnect_max_attempts,
            unreachable_after=config.unreachable_terminate_after_s,
        )
        self.session_loop = SessionLoop(self, url, policy, connect_timeout=config.connect_timeout_s,
                                        jitter=self.jitter)
        try:
            await self.session_loop.run()
        except Terminated as exc:
            log.error("giving up on the CP: %s; terminal action: %s", exc, config.terminal_action)
            if config.terminal_action == "poweroff":
                await self._poweroff()
            self.terminated = exc
            self.request_stop()

    async def _poweroff(self) -> None:
        argv = list(self.config.poweroff_command)
        try:
            result = await trio.run_process(argv, check=False)
        except OSError as exc:
            log.error("poweroff command %s failed: %s", argv, exc)
            return
        if result.returncode != 0:
            log.error("poweroff command %s exited with %d", argv, result.returncode)
