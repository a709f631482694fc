"""Compose workloads on the agent: deploy, find, health-check, adopt, undeploy.

Theory of operation
-------------------
A *deployment* is one run of a tenant's app version on this agent. The
:class:`ComposeRunner` keeps each one in its own directory and its own Compose project::

    <data_dir>/workloads/<slug>/           (workloads/ and each slug dir: 0700)
        deployment.json     what adopt() needs after an agent restart (0600)
        docker-compose.yml  the tenant's compose text, byte for byte as hashed (0600)
        resolved-compose.yml  what Compose resolved, checked and hardened: what runs (0600)
        empty.env           the env file of `up`/`down` (so no tenant .env is read)
        context/            the build context, extracted safely (empty without one)

**The workload boundary** (:mod:`ee.protocol.workload_policy`). ``deploy`` checks the
tenant's YAML with the policy before it writes anything, so a refused feature runs
nothing. It then runs the CLI's ``config`` on the tenant file with the tenant env in a
0600 ``tenant.env`` given as ``--env-file`` (deleted right after; see
:func:`env_file_text`), checks the CLI's resolved model with the policy again (paths
must lie inside ``context/``), adds the agent's security options (``harden``:
``no-new-privileges``, all capabilities dropped but a short list, default seccomp) and
writes that as ``resolved-compose.yml``. ``up`` and ``down`` only ever run that file,
so what runs is exactly what was checked. The CLI's own environment is fixed
(``config``: ``PATH`` and a neutral ``HOME`` only, so interpolation reads nothing of
the agent's; ``up``/``down``: ``HOME`` under the data dir and the agent's
``DOCKER_HOST``, with nothing left to interpolate since the resolved check refuses any
unescaped ``$``): tenant env reaches the containers through interpolation and
``environment:`` only, never a process of the agent. The only bind mount is the
agent's own, added after the policy check: the deployment's tmpfs secrets directory,
read-only at ``/run/secrets`` (``ee.agent.secrets``); no container can read the data
dir.
The VM image's dockerd runs with ``ee/agent/dockerd.json`` (user-namespace remapping:
root in a container is an unprivileged uid of the VM; ``no-new-privileges`` by default;
no inter-container traffic on the default bridge). Images built or pulled before
remapping was enabled are not visible under it, and the image must ship the
``dockremap`` entries of /etc/subuid and /etc/subgid (its root is read-only).

The Compose CLI runs as ``<cli> -p <project> -f resolved-compose.yml --project-directory
context --env-file empty.env ...``; relative paths in the tenant's file (``build: .``,
``env_file``) resolve against the root of the build context, exactly as if the tenant
had run ``docker compose up`` at the top of the tree they tarred up.

The project name is ``<namespace>-<slug>``: the namespace defaults to ``ee`` plus a
short hash of the absolute data dir, so several agents can share one Docker host and
even run replicas of the same deployment id without colliding, and a restarted agent
with the same data dir finds its projects again. Compose labels every container with
``com.docker.compose.project`` and ``com.docker.compose.service``; that is how the
runner finds a workload's containers (Docker SDK, in worker threads).

Lifecycle (the table is :data:`TRANSITIONS`; anything else is a bug and raises)::

    (new)                       ──deploy───►  starting ──► running | failed
    (new)                       ──adopt────►  running | failed
    running | failed            ──deploy───►  starting              (update in place)
    running                     ──refresh──►  failed                (container died)
    failed                      ──refresh──►  running               (it is back up)
    starting | running | failed ──undeploy─►  stopping ──► stopped | failed

``deploy`` reports ``starting``, then validates the compose document (and the
workload policy) and build context, computes the *workload hash*
(:func:`ee.protocol.compose.workload_hash` over the compose document, the build
context, the env, the exposed port and service — the first service when the deploy
names none, as the CP resolves it —, the health path and the secret names; reported
as ``compose_hash``, measured into RTMR3 and bound into the attested health, so an env
change is another hash), writes the directory (atomically, via a temporary sibling),
resolves and checks the file as above, measures the deployment (app, version,
deployment id, workload hash) into RTMR3 through the runner's :class:`DeployMeasurer`
(:mod:`ee.agent.rtmr3`; a measurement that fails ends the deploy ``failed`` with
``rtmr3: ...`` before anything runs), then runs it in phases, each under its own
timeout (:class:`WorkloadSettings`; the agent config's ``workload`` section):

- ``pull``: ``pull <services>`` for the services that do not build and whose image is
  not on the daemon yet (``up`` would pull exactly those);
- ``build``: ``build``, when a service builds;
- ``start``: ``up -d --no-build --remove-orphans``, then the exposed service's
  container must be running (one that exited is a ``start`` failure with its exit
  code and logs, also when it exits while health is polled);
- ``health``: polls ``http://<ip>:<expose_port><health_path>`` on the container's
  compose-network address (no host port is published) until it answers 2xx.

``pull`` and ``start`` are retried with bounded backoff when the output looks like a
transient network failure. It then reports ``running`` with the workload hash, the
image ids of the service containers and the upstream address for the proxy. Any
workload problem ends in ``failed``, never an exception: a failed phase carries
``phase``, ``exit_code`` and ``log_tail`` (:mod:`ee.agent.failures`: the last 20 lines
of the step's output or the container's logs) and an ``error`` naming the phase, the
exit code and the last line; a phase that runs out of time ends with ``phase:
"timeout"`` (the health phase only when the workload never answered; a wrong answer
until the deadline, a 404 say, is phase ``health``); ``secrets`` when the env secrets
were not released in time; a refused or invalid workload carries the reason without a
phase. A failed deployment keeps its containers and directory, so its logs stay
readable, until ``undeploy``.

**Updates in place.** A ``deploy`` for a deployment id the runner already has, with
another version or workload hash, first stops the old version with ``down
--remove-orphans --rmi local`` and *without* ``-v`` (even when the new one turns out
invalid: the deployment then reports ``failed`` and nothing of it runs; *with* ``-v``
when the deploy names another app: one app's data is never mounted into another's
containers), then writes
the new directory and starts the new version under the *same* Compose project name,
so its named volumes (``<project>_<name>``) are the old version's, data included. The
states reported are those of a fresh deploy; a new version that fails leaves the
volumes for the next deploy (a rollback, say). A deploy with the same version and hash
just runs the phases again (``up`` leaves unchanged containers alone).

``undeploy`` (unchanged by updates) runs ``down --remove-orphans -v --rmi local``:
containers, networks and named/anonymous volumes of the project go, and so do the
images Compose *built* for the project (each deployment builds under its own project
name, so keeping them would leak one image per deployment). Base images and the
builder cache stay, so a redeploy is fast. A service that builds may not also name its
image (``image:`` with ``build:`` is refused by the policy): Compose would tag the
build with that name on the shared dockerd, ``--rmi local`` would keep it, and the next
deployment naming that image (any tenant's) would run it. So every image a project
builds carries the project's name and goes at undeploy. Before ``down``, the last
1,000 lines of each service are kept in the agent's data dir for the retention window
(:mod:`ee.agent.logstore`). Then the directory is removed.

``adopt`` (at agent start) reads every ``deployment.json`` and inspects the project's
containers without touching them: running ones come back as ``running`` (same
container ids, same StartedAt), others as ``failed`` with the reason. ``refresh``
re-inspects one deployment (say after the proxy failed to connect) and updates its
state and upstream address; ``upstream`` is the cached ``(ip, port)`` for the proxy;
``log_lines`` (Docker's timestamps as ``at``; ``since``, ``service`` and ``tail``
filters; an undeployed deployment's retained lines) and ``stats`` read per-service
data through the SDK.

Every status the runner stores or reports passes :meth:`ComposeRunner._masked`: the
deployment's released secret values and env values are masked in ``error`` and
``log_tail`` (:func:`ee.agent.failures.mask_report`), since a failing build or
container may print them and both go to the CP's events. So do the lines
``log_lines`` answers (live) and the lines kept at undeploy (masked before the secrets
are forgotten). The env values are kept in ``deployment.json`` too, so an adopted
deployment's are masked after an agent restart.

All waiting uses Trio (``trio.sleep``, ``trio.current_time``), so deadlines and backoff
follow the test clock; the Compose CLI runs as a Trio process and Docker SDK
calls under ``trio.to_thread.run_sync`` with a capacity limiter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from hashlib import sha256
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import attrs
import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import httpx
import requests
import trio
import yaml

from ee.agent.failures import (
    MAX_TAIL_LINES,
    FailureReport,
    container_exited,
    health_failed,
    mask_report,
    mask_text,
    mask_values,
    step_failed,
    step_timed_out,
)
from ee.agent.logstore import (
    MAX_LINES_PER_SERVICE,
    RetainedLogs,
    filter_lines,
    rfc3339_ns,
    split_timestamp,
)
from ee.agent.rtmr3 import Rtmr3Error
from ee.protocol.compose import (
    BuildContext,
    BuildContextError,
    ComposeError,
    LoadedBuildContext,
    compose_services,
    load_build_context,
    validate_compose,
    workload_hash,
)
from ee.protocol.dockerfile import check_build_dockerfiles
from ee.protocol.messages import SECRET_NAME, LogLine
from ee.protocol.workload_policy import (
    WorkloadPolicyError,
    check_compose,
    check_env,
    check_health_path,
    harden,
)

__all__ = [
    "TRANSITIONS",
    "ComposeCLI",
    "ComposeCLIUnavailable",
    "ComposeRunner",
    "DeploySpec",
    "DeploymentStatus",
    "InvalidTransition",
    "RetryPolicy",
    "ServiceStats",
    "StatusCallback",
    "UnknownDeployment",
    "WorkloadSettings",
    "WorkloadState",
    "check_transition",
    "detect_compose_cli",
    "is_transient_error",
    "project_slug",
]

log = logging.getLogger(__name__)

WorkloadState = Literal["starting", "running", "failed", "stopping", "stopped"]

#: Allowed state changes; ``None`` is "not known to this runner yet".
TRANSITIONS: Mapping[WorkloadState | None, frozenset[WorkloadState]] = MappingProxyType(
    {
        None: frozenset({"starting", "running", "failed"}),  # deploy; adopt
        # starting: a deploy superseding one that was cancelled mid-way (the agent cancels
        # an in-flight deploy of the same id; the cancelled one leaves "starting");
        # stopping: an undeploy of a deploy in flight.
        "starting": frozenset({"starting", "running", "failed", "stopping"}),
        "running": frozenset({"starting", "failed", "stopping"}),
        "failed": frozenset({"starting", "running", "stopping"}),
        "stopping": frozenset({"stopped", "failed"}),
        "stopped": frozenset({"starting"}),
    }
)

DEPLOYMENT_FILE = "deployment.json"
COMPOSE_FILE = "docker-compose.yml"
RESOLVED_FILE = "resolved-compose.yml"
TENANT_ENV_FILE = "tenant.env"
EMPTY_ENV_FILE = "empty.env"
CONTEXT_DIR = "context"
#: Never set in any environment (tenant names starting ``EE_`` are refused): its
#: default, ``$``, is how a literal ``${`` survives python-dotenv's interpolation.
_NO_SUCH_VARIABLE = "EE_NO_SUCH_VARIABLE"
#: Agent-side variables the Compose CLI may see (the daemon address, never tenant data).
_CLI_PASSTHROUGH = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
#: ``HOME`` of the interpolating ``config`` run: exists nowhere, says nothing.
NEUTRAL_HOME = "/nonexistent"
_STATE_FORMAT = 1

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: Substrings (lowercase) of Compose/Docker errors worth retrying.
TRANSIENT_MARKERS: tuple[str, ...] = (
    "tls handshake timeout",
    "connection reset",
    "i/o timeout",
    "temporary failure in name resolution",
    "net/http: request canceled",
    "client.timeout exceeded",
    "context deadline exceeded",
    "unexpected eof",
    "server misbehaving",
    "network is unreachable",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway timeout",
    "toomanyrequests",
    "429 too many requests",
)


class InvalidTransition(RuntimeError):
    """A state change outside :data:`TRANSITIONS` (a bug in the runner or its caller)."""


class UnknownDeployment(KeyError):
    """No deployment with that id is known to this runner."""


class ComposeCLIUnavailable(RuntimeError):
    """Neither ``docker compose`` (v2 plugin) nor ``docker-compose`` (v1) works here."""


def check_transition(old: WorkloadState | None, new: WorkloadState) -> None:
    """Raise :class:`InvalidTransition` unless ``old → new`` is in :data:`TRANSITIONS`."""
    if new not in TRANSITIONS.get(old, frozenset()):
        raise InvalidTransition(f"workload state {old!r} -> {new!r} is not allowed")


def is_transient_error(text: str) -> bool:
    """Whether a Compose/Docker error text looks like a passing network failure."""
    lowered = text.lower()
    return any(marker in lowered for marker in TRANSIENT_MARKERS)


def project_slug(deployment_id: str) -> str:
    """A directory- and project-name-safe slug for a deployment id (stable, unique).

    Lowercase ``[a-z0-9_-]``, starting with a letter or digit; when the id had to be
    changed to get there, a short hash of the original keeps slugs distinct.
    """
    slug = re.sub(r"[^a-z0-9_-]+", "-", deployment_id.lower()).strip("-_")[:40]
    if slug != deployment_id:
        digest = sha256(deployment_id.encode("utf-8")).hexdigest()[:10]
        slug = f"{slug}-{digest}" if slug else digest
    return slug


def _freeze_env(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


def _check_env(_: object, __: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    check_env(value)  # WorkloadPolicyError is a ValueError


def env_file_text(env: Mapping[str, str]) -> str:
    """``env`` as a Compose v1 ``--env-file`` (python-dotenv) that reads back exactly.

    Values are single-quoted (newlines allowed; ``\\'`` is the only escape we use).
    python-dotenv expands ``${NAME:-default}`` even inside quotes and has no escape for
    it, so a literal ``${`` is written ``${EE_NO_SUCH_VARIABLE:-$}{`` (an unset name
    with default ``$``) and a backslash ``${EE_NO_SUCH_VARIABLE:-\\}``: no written value
    then ends in a backslash, which would make ``\\'`` ambiguous and let one value run
    into the next line. Carriage returns are refused by :func:`check_env`.
    """
    lines = []
    for name, value in env.items():
        text = value.replace("${", "${" + _NO_SUCH_VARIABLE + ":-$}{")
        text = text.replace("\\", "${" + _NO_SUCH_VARIABLE + ":-\\}")
        text = text.replace("'", "\\'")
        lines.append(f"{name}='{text}'\n")
    return "".join(lines)


def _check_secret_env(_: object, __: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    """The agent's own allowlist for what the (signed) deploy names: variable names the
    tenant env rules allow (no reserved names; nothing that breaks an env file line), and
    secret names of the secrets pattern (no paths)."""
    check_env({name: "" for name in value})
    for name in value.values():
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise ValueError(f"secret_env: {name!r} is not a secret name")


def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_secret_names(_: object, __: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for name in value:
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise ValueError(f"secret_names: {name!r} is not a secret name")


def _check_health_path(_: object, __: attrs.Attribute[Any], value: str) -> None:
    check_health_path(value)  # WorkloadPolicyError is a ValueError


def check_images(resolved: Mapping[str, Any], namespace: str) -> None:
    """Refuse ``image:`` names of this runner's projects (pure).

    Every image a project builds is named ``<namespace>-<slug>_<service>`` (v1) or
    ``-<service>`` (v2) on the VM's shared dockerd: another deployment naming one would
    run a build of someone else's context (its files, its baked-in secrets). Docker
    resolves ``docker.io/library/x`` and ``library/x`` to the local ``x``, so those
    spellings are normalised first.
    """
    for name, service in dict(resolved.get("services") or {}).items():
        image = service.get("image") if isinstance(service, dict) else None
        if not isinstance(image, str):
            continue
        bare = image.lower()
        for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/", "library/"):
            bare = bare.removeprefix(prefix)
        if bare.startswith(namespace.lower() + "-"):
            raise WorkloadPolicyError(
                f"services.{name}.image", "foreign_image",
                f"image {image!r} is a build of one of this agent's projects")


SECRETS_TARGET = "/run/secrets"


def with_secrets_mount(resolved: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """*resolved* with the deployment's secrets directory bound read-only at
    :data:`SECRETS_TARGET` in every service (a directory, so a rotated file shows)."""
    mount = {"type": "bind", "source": str(source), "target": SECRETS_TARGET,
             "read_only": True}
    out = dict(resolved)
    out["services"] = {
        name: {**service, "volumes": [*service.get("volumes", []), mount]}
        for name, service in dict(resolved["services"]).items()
    }
    return out


def _bytes_repr(value: bytes | None) -> str:
    return "None" if value is None else f"<{len(value)} bytes>"


def _freeze_digests(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    return None if value is None else MappingProxyType(dict(value))


@attrs.frozen
class DeploySpec:
    """What the CP asked to run (the ``deploy`` message body, plus build context bytes)."""

    deployment_id: str = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.instance_of(str), attrs.validators.min_len(1)
        )
    )
    app: str = attrs.field(validator=attrs.validators.instance_of(str))
    version: str = attrs.field(validator=attrs.validators.instance_of(str))
    compose: str = attrs.field(validator=attrs.validators.instance_of(str))
    expose_port: int = attrs.field(
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.ge(1),
            attrs.validators.le(65535),
        ]
    )
    health_path: str = attrs.field(default="/", validator=_check_health_path)
    build_context: bytes | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(bytes)),
        repr=_bytes_repr,
    )
    env: Mapping[str, str] = attrs.field(
        factory=dict, converter=_freeze_env, validator=_check_env, repr=False
    )
    expose_service: str | None = None
    #: environment variables fed from released secrets: VAR -> secret name
    secret_env: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_env,
                                                validator=_check_secret_env)
    #: every secret name the version receives (part of the workload hash)
    secret_names: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple,
                                                validator=_check_secret_names)

    def __attrs_post_init__(self) -> None:
        # The hash binds secret_names only: a secret fed to the environment but not
        # named there would run unseen by anyone who checks the hash.
        unnamed = sorted(set(self.secret_env.values()) - set(self.secret_names))
        if unnamed:
            raise ValueError(f"secret_env feeds secrets not in secret_names (so not in the "
                             f"workload hash): {', '.join(unnamed)}")


@attrs.frozen
class DeploymentStatus:
    """A deployment's state as reported to the CP (``deploy_status``) and the proxy."""

    deployment_id: str
    state: WorkloadState
    app: str = ""
    version: str = ""
    compose_hash: str | None = None
    image_digests: Mapping[str, str] | None = attrs.field(
        default=None,
        converter=_freeze_digests,
    )
    upstream: tuple[str, int] | None = None
    error: str | None = None
    #: a failed deploy's phase, exit code and last output lines (``ee.agent.failures``)
    phase: str | None = None
    exit_code: int | None = None
    log_tail: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The ``deploy_status`` message body (optional fields omitted when unset)."""
        body: dict[str, Any] = {"deployment_id": self.deployment_id, "state": self.state}
        if self.compose_hash is not None:
            body["compose_hash"] = self.compose_hash
        if self.image_digests is not None:
            body["image_digests"] = dict(self.image_digests)
        if self.error is not None:
            body["error"] = self.error
        if self.phase is not None:
            body["phase"] = self.phase
        if self.exit_code is not None:
            body["exit_code"] = self.exit_code
        if self.log_tail:
            body["log_tail"] = list(self.log_tail)
        return body


@attrs.frozen
class ServiceStats:
    """One container's resource use (``error`` set when Docker could not say)."""

    service: str
    container_id: str
    state: str
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    pids: int | None = None
    error: str | None = None


@attrs.frozen
class RetryPolicy:
    """Bounded exponential backoff for transient ``up`` failures."""

    attempts: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    base_delay: float = 1.0
    max_delay: float = 15.0

    def delay(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


@attrs.frozen
class WorkloadSettings:
    """Tunables of the runner (seconds unless named otherwise)."""

    health_timeout: float = 120.0
    #: how long a deployment whose environment needs secrets waits for their release
    secret_wait_timeout: float = 120.0
    #: Upper bound of the health poll interval (polls start at 50 ms and double).
    health_interval: float = 1.0
    health_request_timeout: float = 3.0
    #: per-phase limits of a deploy: pulling missing images, building, `up`
    pull_timeout: float = 600.0
    build_timeout: float = 900.0
    start_timeout: float = 300.0
    down_timeout: float = 300.0
    retry: RetryPolicy = RetryPolicy()
    error_tail_bytes: int = 4096
    max_context_bytes: int = 64 * 1024 * 1024
    max_context_uncompressed_bytes: int = 256 * 1024 * 1024
    docker_threads: int = 4
    #: Project name prefix; default ``ee`` + hash of the data dir (see module doc).
    namespace: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            attrs.validators.matches_re(r"[a-z0-9][a-z0-9_-]{0,29}")
        ),
    )


@attrs.frozen
class ComposeCLI:
    """The Compose command line found on this host."""

    argv: tuple[str, ...]
    flavour: Literal["v2", "v1"]
    version: str


StatusCallback = Callable[[DeploymentStatus], Awaitable[None]]


class SecretEnv(Protocol):
    """Writes a deployment's env-secret file (``ee.agent.secrets.SecretStore``)."""

    def env_path(self, deployment_id: str) -> Path: ...

    def write_env(self, deployment_id: str, variables: Mapping[str, str]) -> None: ...


class DeployMeasurer(Protocol):
    """Measures a deployment before it runs (``ee.agent.rtmr3.RuntimeMeasurements``);
    blocking (called in a worker thread); raises ``Rtmr3Error`` or ``ValueError``."""

    def record_deploy(
        self, *, app: str, version: str, deployment_id: str, compose_hash: str
    ) -> bytes: ...


async def _run(
    argv: Iterable[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    try:
        result = await trio.run_process(
            list(argv),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    except OSError as exc:  # executable missing, not executable, ...
        return 127, "", str(exc)
    return (
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )


async def detect_compose_cli() -> ComposeCLI:
    """``docker compose version`` works → v2; else ``docker-compose version`` → v1."""
    attempts: list[str] = []
    candidates: tuple[tuple[tuple[str, ...], Literal["v2", "v1"]], ...] = (
        (("docker", "compose"), "v2"),
        (("docker-compose",), "v1"),
    )
    for argv, flavour in candidates:
        code, out, err = await _run([*argv, "version"])
        if code == 0:
            version = (out.strip().splitlines() or ["unknown"])[0]
            return ComposeCLI(argv=argv, flavour=flavour, version=version)
        reason = (err.strip() or out.strip() or f"exit {code}").splitlines()[-1]
        attempts.append(f"`{' '.join(argv)} version`: {reason}")
    raise ComposeCLIUnavailable(
        "no Docker Compose CLI: neither `docker compose` (v2 plugin) nor `docker-compose` "
        "(v1) works (" + "; ".join(attempts) + ")"
    )


class _Failure(Exception):
    """A workload problem: becomes a ``failed`` status, never escapes the runner
    (*report*: the phase, exit code and output of a failed step)."""

    def __init__(self, message: str, report: FailureReport | None = None) -> None:
        super().__init__(message)
        self.report = report

    @classmethod
    def of(cls, report: FailureReport) -> _Failure:
        return cls(report.error, report)


async def _run_step(argv: Iterable[str], *, env: Mapping[str, str], cwd: Path,
                    timeout: float, keep_bytes: int) -> tuple[int | None, str]:
    """Run a Compose command with stdout and stderr merged, keeping the last
    *keep_bytes* of its output: ``(exit code, output)``, or ``(None, output so far)``
    when it did not finish within *timeout* (it is killed; so it is when cancelled)."""
    try:
        process = await trio.lowlevel.open_process(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=dict(env), cwd=cwd)
    except OSError as exc:
        return 127, str(exc)
    buffer = bytearray()
    code: int | None = None
    try:
        with trio.move_on_after(timeout):
            assert process.stdout is not None
            async for chunk in process.stdout:
                buffer += chunk
                if len(buffer) > 2 * keep_bytes:
                    del buffer[:-keep_bytes]
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        if process.stdout is not None:
            await trio.aclose_forcefully(process.stdout)
    return code, bytes(buffer[-keep_bytes:]).decode("utf-8", "replace")


@attrs.frozen
class _Record:
    """What the runner remembers of one deployment (persisted as deployment.json)."""

    deployment_id: str
    app: str
    version: str
    project: str
    directory: Path
    expose_service: str
    expose_port: int
    health_path: str
    compose_hash: str
    services: tuple[str, ...]
    secret_env: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_env)
    #: the tenant env values, masked in reports and logs (also after an adopt); no new
    #: exposure: resolved-compose.yml next to it holds them interpolated, also 0600
    env_values: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "deployment_id": self.deployment_id,
            "app": self.app,
            "version": self.version,
            "project": self.project,
            "expose_service": self.expose_service,
            "expose_port": self.expose_port,
            "health_path": self.health_path,
            "compose_hash": self.compose_hash,
            "services": list(self.services),
            "secret_env": dict(self.secret_env),
            "env_values": list(self.env_values),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], directory: Path) -> _Record:
        if data.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown deployment.json format {data.get('format')!r}")
        return cls(
            deployment_id=str(data["deployment_id"]),
            app=str(data["app"]),
            version=str(data["version"]),
            project=str(data["project"]),
            directory=directory,
            expose_service=str(data["expose_service"]),
            expose_port=int(data["expose_port"]),
            health_path=str(data["health_path"]),
            compose_hash=str(data["compose_hash"]),
            services=tuple(str(s) for s in data["services"]),
            secret_env={str(k): str(v) for k, v in dict(data.get("secret_env") or {}).items()},
            env_values=tuple(str(v) for v in data.get("env_values") or ()),
        )


#: a log read keeps at most this many bytes per container (the newest; Docker's lines
#: are up to 16 KiB each, so ``tail=10000`` alone would not bound the agent's memory)
MAX_LOG_READ_BYTES = 4 * 1024 * 1024


def _read_logs(container: Any, options: Mapping[str, Any], limit: int) -> bytes:
    """A container's logs (worker thread), streamed so at most about twice *limit*
    bytes are ever held: the newest *limit* bytes, a cut first line dropped."""
    kept = bytearray()
    stream = container.logs(stream=True, follow=False, **options)
    try:
        for chunk in stream:
            kept += chunk
            if len(kept) > 2 * limit:
                del kept[:-limit]
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if len(kept) > limit:
        del kept[:-limit]
        del kept[: kept.find(b"\n") + 1]
    return bytes(kept)


#: at most this many released secrets, and this much of each, are read to be masked
MAX_MASKED_SECRETS = 256
MAX_MASKED_SECRET_BYTES = 64 * 1024

#: what a version may ask the agent to send its services when a secret rotates
ROTATION_SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2")


def _tail(text: str, limit: int) -> str:
    text = _ANSI.sub("", text).strip()
    if len(text.encode("utf-8")) <= limit:
        return text
    cut = text.encode("utf-8")[-limit:].decode("utf-8", "ignore")
    newline = cut.find("\n")
    if 0 <= newline < len(cut) - 1:
        cut = cut[newline + 1 :]
    return "…" + cut.strip()


def _extract(loaded: LoadedBuildContext, dest: Path) -> None:
    """Write a validated build context under ``dest`` (an empty, fresh directory).

    Validation guarantees: relative names without ``..``, no member below a symlink or
    file, symlinks that stay inside, hardlinks to earlier regular files. Files and
    directories get ``mode & 0o777``; directories get their modes last so that
    read-only directories can still be filled.
    """
    dir_modes: list[tuple[Path, int]] = []
    for member in loaded.context.members:
        target = dest / member.path
        if member.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            dir_modes.append((target, member.mode & 0o777))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if member.kind == "file":
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(loaded.contents[member.path])
            os.chmod(target, member.mode & 0o777)
        elif member.kind == "symlink":
            assert member.target is not None
            os.symlink(member.target, target)
    for member in loaded.context.members:
        if member.kind == "hardlink":
            assert member.target is not None
            (dest / member.path).parent.mkdir(parents=True, exist_ok=True)
            os.link(dest / member.target, dest / member.path)
    for path, mode in sorted(dir_modes, key=lambda item: -len(item[0].parts)):
        os.chmod(path, mode | 0o700)
    _check_symlinks(loaded, dest)


def _check_symlinks(loaded: LoadedBuildContext, dest: Path) -> None:
    """Every extracted symlink resolves (by the kernel's rules) inside ``dest``.

    Validation checks each link's target lexically; a chain of links (``c -> .`` then
    ``a -> c/d/e/../../..``) can still climb out, and Compose follows links on the
    host when it reads ``env_file`` or picks a build context. So resolve for real.
    """
    root = os.path.realpath(dest)
    for member in loaded.context.members:
        if member.kind == "symlink":
            resolved = os.path.realpath(dest / member.path)
            if resolved != root and not resolved.startswith(root + os.sep):
                raise BuildContextError("symlink resolves outside the context root", member.path)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist, nor be a link) readable by the agent only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _container_ip(attrs_: Mapping[str, Any], project: str) -> str | None:
    networks: Mapping[str, Any] = (attrs_.get("NetworkSettings") or {}).get("Networks") or {}
    ordered = sorted(networks.items(), key=lambda item: not item[0].startswith(f"{project}_"))
    for _, net in ordered:
        address = (net or {}).get("IPAddress") or (net or {}).get("GlobalIPv6Address")
        if address:
            return str(address)
    return None


def _cpu_percent(stats: Mapping[str, Any]) -> float | None:
    try:
        cpu = stats["cpu_stats"]
        pre = stats["precpu_stats"]
        cpu_delta = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system_delta = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
        online = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or [1])
    except (KeyError, TypeError):
        return None
    if system_delta <= 0 or cpu_delta < 0:
        return 0.0
    return round(float(cpu_delta) / float(system_delta) * float(online) * 100.0, 3)


class ComposeRunner:
    """Runs and tracks this agent's Compose workloads under ``<data_dir>/workloads``.

    One runner per agent process. Methods are Trio-async and safe to call
    concurrently; operations on one deployment are serialised.
    """

    def __init__(
        self,
        data_dir: Path | str,
        settings: WorkloadSettings | None = None,
        measurer: DeployMeasurer | None = None,
        secrets_dir: Callable[[str], Path] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        #: deployment id -> its tmpfs secrets directory (``ee.agent.secrets``), bound
        #: read-only at /run/secrets into every service (None: no secrets mount)
        self.secrets_dir = secrets_dir
        #: the store that writes env-secret files (``ee.agent.secrets.SecretStore``)
        self.secret_env: SecretEnv | None = None
        #: where an undeployed deployment's last log lines are kept (None: nowhere)
        self.retained: RetainedLogs | None = None
        self.settings = settings or WorkloadSettings()
        self.measurer = measurer
        self.workloads_dir = self.data_dir / "workloads"
        self.namespace = self.settings.namespace or (
            "ee" + sha256(str(self.data_dir).encode("utf-8")).hexdigest()[:8]
        )
        self._records: dict[str, _Record] = {}
        self._status: dict[str, DeploymentStatus] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: deployment id -> its env values, masked in what a failure reports (memory only)
        self._env_values: dict[str, tuple[str, ...]] = {}
        self._cli: ComposeCLI | None = None
        self._docker: Any = None
        self._limiter = trio.CapacityLimiter(self.settings.docker_threads)

    # -- naming ---------------------------------------------------------------

    def project_name(self, deployment_id: str) -> str:
        """The Compose project name used for a deployment id on this runner."""
        return f"{self.namespace}-{project_slug(deployment_id)}"

    def workload_dir(self, deployment_id: str) -> Path:
        return self.workloads_dir / project_slug(deployment_id)

    # -- queries ----------------------------------------------------------------

    def status(self, deployment_id: str) -> DeploymentStatus | None:
        return self._status.get(deployment_id)

    def deployments(self) -> list[DeploymentStatus]:
        """Every deployment this runner knows, for the state snapshot."""
        return [self._status[key] for key in sorted(self._status)]

    def upstream(self, deployment_id: str) -> tuple[str, int] | None:
        """``(container_ip, expose_port)`` of a running deployment, else None."""
        status = self._status.get(deployment_id)
        if status is None or status.state != "running":
            return None
        return status.upstream

    # -- CLI and SDK ------------------------------------------------------------

    async def detect_cli(self) -> ComposeCLI:
        """Find (once) and return the Compose CLI; raises :class:`ComposeCLIUnavailable`."""
        if self._cli is None:
            self._cli = await detect_compose_cli()
            log.info("compose CLI: %s (%s)", " ".join(self._cli.argv), self._cli.version)
        return self._cli

    async def _sdk(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _client(self) -> Any:  # runs in a worker thread
        if self._docker is None:
            self._docker = docker.from_env()
        return self._docker

    def _project_containers(self, project: str) -> list[Any]:  # worker thread
        return list(
            self._client().containers.list(
                all=True, filters={"label": f"com.docker.compose.project={project}"}
            )
        )

    # -- state ------------------------------------------------------------------

    def _lock(self, deployment_id: str) -> trio.Lock:
        return self._locks.setdefault(deployment_id, trio.Lock())

    def _forget_lock(self, deployment_id: str) -> None:
        lock = self._locks.get(deployment_id)
        if lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0:
            del self._locks[deployment_id]

    def _secret_values(self, deployment_id: str) -> list[str]:  # worker thread
        """The deployment's released secret values (its secrets directory's files)."""
        if self.secrets_dir is None:
            return []
        values = []
        try:
            directory = self.secrets_dir(deployment_id)
            names = sorted(os.listdir(directory))[:MAX_MASKED_SECRETS]
        except OSError:
            return []
        for name in names:
            if name.startswith("."):
                continue
            try:
                fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                values.append(os.read(fd, MAX_MASKED_SECRET_BYTES).decode("utf-8", "replace"))
            except OSError:
                pass
            finally:
                os.close(fd)
        return values

    async def _masked(self, status: DeploymentStatus) -> DeploymentStatus:
        """*status* with the deployment's secret and env values masked in its ``error``
        and ``log_tail`` (``ee.agent.failures.mask_report``): both go to the CP."""
        if status.error is None and not status.log_tail:
            return status
        values = await self._mask_values(status.deployment_id)
        error, tail = mask_report(status.error, status.log_tail, values)
        return attrs.evolve(status, error=error, log_tail=tail)

    async def _mask_values(self, deployment_id: str) -> tuple[str, ...]:
        """What :func:`ee.agent.failures.mask_text` hides for this deployment."""
        secret_values = await trio.to_thread.run_sync(self._secret_values, deployment_id)
        return mask_values(secret_values, self._env_values.get(deployment_id, ()))

    async def _masked_lines(self, deployment_id: str, found: dict[str, list[LogLine]]
                            ) -> dict[str, list[LogLine]]:
        """Log lines with the deployment's secret and env values masked."""
        values = await self._mask_values(deployment_id)
        if not values:
            return found

        def mask() -> dict[str, list[LogLine]]:  # worker thread: up to 10,000 lines
            return {key: [attrs.evolve(ln, text=mask_text(ln.text, values, cut=False))
                          for ln in lines]
                    for key, lines in found.items()}

        return await trio.to_thread.run_sync(mask)

    async def _set(
        self, status: DeploymentStatus, on_status: StatusCallback | None
    ) -> DeploymentStatus:
        status = await self._masked(status)
        old = self._status.get(status.deployment_id)
        check_transition(None if old is None else old.state, status.state)
        self._status[status.deployment_id] = status
        log.info(
            "deployment %s: %s%s",
            status.deployment_id,
            status.state,
            "" if status.error is None else f" ({status.error.splitlines()[-1][:200]})",
        )
        if on_status is not None:
            await on_status(status)
        return status

    def _compose_argv(
        self,
        cli: ComposeCLI,
        record: _Record,
        *command: str,
        compose_file: str = RESOLVED_FILE,
        env_file: str = EMPTY_ENV_FILE,
    ) -> list[str]:
        """The CLI's argv: always an explicit env file, so a tenant ``.env`` in the
        project directory (which Compose v1 would read for ``DOCKER_HOST`` and
        ``COMPOSE_*``) is never consulted."""
        return [
            *cli.argv,
            "-p",
            record.project,
            "-f",
            str(record.directory / compose_file),
            "--project-directory",
            str(record.directory / CONTEXT_DIR),
            "--env-file",
            str(record.directory / env_file),
            *command,
        ]

    def _cli_env(self, *, interpolating: bool = False) -> dict[str, str]:
        """The Compose CLI's whole environment: fixed, agent-owned, never tenant data.

        ``interpolating`` (the ``config`` run, the only one that interpolates: the
        resolved file it prints has nothing left to interpolate, see
        :func:`ee.protocol.workload_policy.check_compose`): ``PATH`` and a neutral
        ``HOME`` only, so ``${HOME}`` or ``${DOCKER_HOST}`` in a tenant's file reveal
        nothing about the agent (``config`` needs no daemon).
        """
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": NEUTRAL_HOME if interpolating else str(self.data_dir / "cli-home"),
        }
        if interpolating:
            return env
        for name in _CLI_PASSTHROUGH:
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    # -- deploy -----------------------------------------------------------------

    async def deploy(
        self, spec: DeploySpec, on_status: StatusCallback | None = None
    ) -> DeploymentStatus:
        """Deploy (or update in place) and return the final status.

        Reports ``starting`` then ``running`` or ``failed`` through ``on_status``
        (awaited in order; an exception from the callback propagates). Workload
        problems end in ``failed``; only bugs raise. Cancellation stops the Compose
        CLI and leaves the deployment ``starting`` until the next deploy/undeploy.
        """
        async with self._lock(spec.deployment_id):
            base = DeploymentStatus(
                deployment_id=spec.deployment_id,
                state="starting",
                app=spec.app,
                version=spec.version,
            )
            self._env_values[spec.deployment_id] = tuple(spec.env.values())
            await self._set(base, on_status)
            record: _Record | None = None
            try:
                try:
                    cli = await self.detect_cli()
                except ComposeCLIUnavailable as exc:
                    raise _Failure(str(exc)) from None
                old = self._records.get(spec.deployment_id)
                planned: tuple[_Record, LoadedBuildContext | None] | None = None
                try:
                    planned = await trio.to_thread.run_sync(self._plan, spec)
                finally:
                    # An update in place (another version or hash under this id): the
                    # old version stops first, its named volumes stay -- for the same
                    # app only: another app's data is never handed to this one.
                    if old is not None and (planned is None or (
                            planned[0].compose_hash, planned[0].version) != (
                                old.compose_hash, old.version) or old.app != spec.app):
                        await self._stop_old(cli, old, keep_volumes=old.app == spec.app)
                record, loaded = planned
                await trio.to_thread.run_sync(self._write, spec, record, loaded)
                self._records[spec.deployment_id] = record
                pulls, builds = await self._resolve(cli, record)
                await self._measure(record)
                if record.secret_env:
                    # Say what will run, so the CP can judge this replica and release
                    # the secrets its environment needs; start once they are here.
                    await self._set(attrs.evolve(base, compose_hash=record.compose_hash),
                                    on_status)
                    await self._await_secret_env(record)
                await self._pull(cli, record, pulls)
                if builds:
                    await self._step(cli, record, "build", ("build",),
                                     self.settings.build_timeout)
                await self._step(cli, record, "start",
                                 ("up", "-d", "--no-build", "--remove-orphans"),
                                 self.settings.start_timeout, retry=True)
                containers = await self._sdk(self._project_containers, record.project)
                await self._check_alive(record, containers)
                upstream, digests = self._locate(record, containers)
                await self._wait_healthy(record, upstream)
                final = attrs.evolve(
                    base, state="running", image_digests=digests, upstream=upstream
                )
            except _Failure as failure:
                report = failure.report
                final = attrs.evolve(base, state="failed", error=str(failure))
                if report is not None:
                    final = attrs.evolve(final, phase=report.phase, exit_code=report.exit_code,
                                         log_tail=report.log_tail)
            except Exception as exc:
                if not _is_docker_error(exc):
                    raise
                final = attrs.evolve(base, state="failed", error=f"docker: {exc}")
            if record is not None:
                final = attrs.evolve(final, compose_hash=record.compose_hash)
            return await self._set(final, on_status)

    async def _stop_old(self, cli: ComposeCLI, old: _Record, *, keep_volumes: bool) -> None:
        """Stop the version that runs under this deployment id before another replaces
        it: ``down --remove-orphans --rmi local`` *without* ``-v``, so its named
        volumes stay for the next version (same project name) to mount; with ``-v``
        when the deploy names another app (*keep_volumes* false): the same Compose
        project would otherwise mount the old app's volumes, data included, into the
        new one."""
        if not (old.directory / RESOLVED_FILE).exists():
            return
        await trio.to_thread.run_sync(self._env_placeholder, old)
        argv = self._compose_argv(cli, old, "down", "--remove-orphans", "--rmi", "local",
                                  *(() if keep_volumes else ("-v",)))
        code, out = await _run_step(argv, env=self._cli_env(), cwd=old.directory,
                                    timeout=self.settings.down_timeout,
                                    keep_bytes=self.settings.error_tail_bytes)
        if code is None:
            raise _Failure.of(step_timed_out("stop of the previous version",
                                             self.settings.down_timeout, out))
        if code != 0:
            raise _Failure.of(step_failed("stop of the previous version", code, out))
        log.info("deployment %s: stopped version %s (named volumes kept)",
                 old.deployment_id, old.version)

    def _plan(self, spec: DeploySpec) -> tuple[_Record, LoadedBuildContext | None]:
        """Validate and hash (worker thread; writes nothing)."""
        try:
            doc = validate_compose(spec.compose)
            loaded = None
            context: BuildContext | None = None
            if spec.build_context is not None:
                loaded = load_build_context(
                    spec.build_context,
                    max_bytes=self.settings.max_context_bytes,
                    max_uncompressed_bytes=self.settings.max_context_uncompressed_bytes,
                )
                context = loaded.context
            check_compose(doc, stage="upload")
            check_build_dockerfiles(doc, loaded)
            services = compose_services(doc)
            expose = spec.expose_service or services[0]  # the CP resolves it the same way
            if expose not in services:
                raise _Failure(
                    f"expose_service {expose!r} is not a service of the compose file "
                    f"(services: {', '.join(services)})"
                )
            digest = workload_hash(doc, context, env=spec.env, expose_port=spec.expose_port,
                                   expose_service=expose, health_path=spec.health_path,
                                   secret_names=spec.secret_names,
                                   secret_env=spec.secret_env)
        except ComposeError as exc:
            raise _Failure(f"invalid compose: {exc}") from None
        except BuildContextError as exc:
            raise _Failure(f"invalid build context: {exc}") from None
        except WorkloadPolicyError as exc:
            raise _Failure(f"refused by the workload policy ({exc.code}): {exc}") from None
        final = self.workload_dir(spec.deployment_id)
        record = _Record(
            deployment_id=spec.deployment_id,
            app=spec.app,
            version=spec.version,
            project=self.project_name(spec.deployment_id),
            directory=final,
            expose_service=expose,
            expose_port=spec.expose_port,
            health_path=spec.health_path,
            compose_hash=digest,
            services=tuple(services),
            secret_env=spec.secret_env,
            env_values=tuple(spec.env.values()),
        )
        return record, loaded

    def _write(self, spec: DeploySpec, record: _Record,
               loaded: LoadedBuildContext | None) -> None:  # worker thread
        """Write the workload directory atomically (via a temporary sibling)."""
        final = record.directory
        staging = self.workloads_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
        try:
            self.workloads_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(self.workloads_dir, 0o700)
            staging.mkdir(mode=0o700)
            _write_private(staging / COMPOSE_FILE, spec.compose)
            _write_private(staging / TENANT_ENV_FILE, env_file_text(spec.env))
            _write_private(staging / EMPTY_ENV_FILE, "")
            (staging / CONTEXT_DIR).mkdir()
            if loaded is not None:
                _extract(loaded, staging / CONTEXT_DIR)
            _write_private(
                staging / DEPLOYMENT_FILE, json.dumps(record.to_json(), indent=2, sort_keys=True)
            )
            if final.exists():
                trash = self.workloads_dir / f".tmp-old-{final.name}-{secrets.token_hex(4)}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            staging.rename(final)
        except BuildContextError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _Failure(f"invalid build context: {exc}") from None
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _Failure(f"cannot write workload directory: {exc}") from None

    async def _resolve(self, cli: ComposeCLI, record: _Record) -> tuple[dict[str, str], bool]:
        """Resolve the tenant's file with the CLI's ``config``, check it, write what runs;
        return the image of each service that does not build, and whether any builds.

        ``config`` gets the tenant env only through ``--env-file`` (for interpolation);
        the env file is deleted afterwards. The CLI's model is checked with the workload
        policy (stage ``resolved``) and written, with :func:`harden`'s security options,
        as the only file ``up`` and ``down`` ever see.
        """
        argv = self._compose_argv(
            cli, record, "config", compose_file=COMPOSE_FILE, env_file=TENANT_ENV_FILE
        )
        try:
            with trio.move_on_after(self.settings.down_timeout) as scope:
                code, out, err = await _run(
                    argv, env=self._cli_env(interpolating=True), cwd=record.directory
                )
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    lambda: (record.directory / TENANT_ENV_FILE).unlink(missing_ok=True)
                )
        if scope.cancelled_caught:
            raise _Failure(f"`config` did not finish within {self.settings.down_timeout:g} s")
        if code != 0:
            raise _Failure(_tail(err or out, self.settings.error_tail_bytes) or f"exit {code}")
        def check_and_write() -> tuple[dict[str, str], bool]:  # YAML parse, policy,
            # dump: off the event loop
            try:
                resolved = validate_compose(out)
                check_compose(
                    resolved,
                    stage="resolved",
                    context_root=str(record.directory / CONTEXT_DIR),
                    project=record.project,
                )
                check_images(resolved, self.namespace)
            except ComposeError as exc:
                raise _Failure(
                    f"the Compose CLI's resolved file is not acceptable: {exc}") from None
            except WorkloadPolicyError as exc:
                raise _Failure(f"refused by the workload policy ({exc.code}): {exc}") from None
            hardened = harden(resolved)
            if self.secrets_dir is not None:  # added after the policy check: ours, not the
                # tenant's (a tenant bind mount is still refused above)
                hardened = with_secrets_mount(hardened, self.secrets_dir(record.deployment_id))
            if record.secret_env:
                if self.secret_env is None:
                    raise _Failure("this agent cannot feed environment variables from "
                                   "secrets (no secret store)")
                path = str(self.secret_env.env_path(record.deployment_id))
                hardened["services"] = {
                    name: {**service, "env_file": [path]}
                    for name, service in hardened["services"].items()}
            text = yaml.safe_dump(hardened, sort_keys=True, allow_unicode=True)
            _write_private(record.directory / RESOLVED_FILE, text)
            services = dict(hardened["services"])
            images = {name: str(service["image"]) for name, service in services.items()
                      if "build" not in service and isinstance(service.get("image"), str)}
            return images, any("build" in service for service in services.values())

        return await trio.to_thread.run_sync(check_and_write)

    async def _measure(self, record: _Record) -> None:
        """Extend RTMR3 with this deployment (and log it) before it runs."""
        if self.measurer is None:
            return
        measure = partial(
            self.measurer.record_deploy,
            app=record.app,
            version=record.version,
            deployment_id=record.deployment_id,
            compose_hash=record.compose_hash,
        )
        try:
            await trio.to_thread.run_sync(measure)
        except (Rtmr3Error, ValueError) as exc:
            raise _Failure(f"rtmr3: cannot measure the deployment into RTMR3: {exc}") from None

    def _missing_images(self, images: Mapping[str, str]) -> list[str]:  # worker thread
        missing = []
        for service, image in sorted(images.items()):
            try:
                self._client().images.get(image)
            except docker.errors.ImageNotFound:
                missing.append(service)
        return missing

    async def _pull(self, cli: ComposeCLI, record: _Record, images: Mapping[str, str]) -> None:
        """Pull the images of the services that do not build and are not here yet (as
        ``up`` would: a local-only image is never looked for in a registry)."""
        missing = await self._sdk(self._missing_images, images)
        if missing:
            await self._step(cli, record, "pull", ("pull", *missing),
                             self.settings.pull_timeout, retry=True,
                             subject=", ".join(f"{s}: {images[s]}" for s in missing))

    async def _step(self, cli: ComposeCLI, record: _Record, phase: str,
                    command: tuple[str, ...], timeout: float, *, retry: bool = False,
                    subject: str = "") -> None:
        """One phase's Compose command under its timeout; transient network failures
        retried (*retry*) with bounded backoff; a failure carries its output's tail."""
        argv = self._compose_argv(cli, record, *command)
        policy = self.settings.retry
        for attempt in range(1, policy.attempts + 1):
            code, out = await _run_step(argv, env=self._cli_env(), cwd=record.directory,
                                        timeout=timeout,
                                        keep_bytes=self.settings.error_tail_bytes)
            if code is None:
                raise _Failure.of(step_timed_out(phase, timeout, out))
            if code == 0:
                return
            text = _tail(out, self.settings.error_tail_bytes) or f"exit status {code}"
            if retry and attempt < policy.attempts and is_transient_error(text):
                delay = policy.delay(attempt)
                log.warning(
                    "deployment %s: transient compose failure (attempt %d/%d), retry in %g s",
                    record.deployment_id,
                    attempt,
                    policy.attempts,
                    delay,
                )
                await trio.sleep(delay)
                continue
            raise _Failure.of(step_failed(phase, code, out, subject))

    def _locate(
        self, record: _Record, containers: list[Any]
    ) -> tuple[tuple[str, int], dict[str, str]]:
        """The exposed container's address and every service's image id."""
        digests: dict[str, str] = {}
        exposed: Any = None
        for container in containers:
            service = container.labels.get("com.docker.compose.service", "")
            digests.setdefault(service, str(container.attrs.get("Image", "")))
            if service == record.expose_service and (
                exposed is None or container.status == "running"
            ):
                exposed = container
        if exposed is None:
            raise _Failure(f"no container found for service {record.expose_service!r}")
        if exposed.status != "running":
            state = exposed.attrs.get("State") or {}
            raise _Failure(
                f"service {record.expose_service!r} is {exposed.status} "
                f"(exit code {state.get('ExitCode')}, {state.get('Error') or 'no error'})"
            )
        address = _container_ip(exposed.attrs, record.project)
        if address is None:
            raise _Failure(
                f"service {record.expose_service!r} has no IP address on a Docker network "
                "(network_mode: host or none is not supported for the exposed service)"
            )
        return (address, record.expose_port), digests

    async def _wait_healthy(self, record: _Record, upstream: tuple[str, int]) -> None:
        host, port = upstream
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{record.health_path}"
        deadline = trio.current_time() + self.settings.health_timeout
        last = "no answer yet"
        answered = False
        timeout = httpx.Timeout(self.settings.health_request_timeout)
        next_alive_check = trio.current_time() + 1.0
        interval = min(0.05, self.settings.health_interval)  # doubles up to health_interval
        async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
            while True:
                try:
                    response = await client.get(url)
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                else:
                    if 200 <= response.status_code < 300:
                        return
                    last = f"HTTP {response.status_code}"
                    answered = True
                if trio.current_time() >= next_alive_check:
                    await self._check_alive(record)
                    next_alive_check = trio.current_time() + 1.0
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    what = (f"health check of {record.expose_service}:{port}: "
                            f"GET {record.health_path}")
                    logs = await self._service_logs(record, record.expose_service)
                    raise _Failure.of(health_failed(what, self.settings.health_timeout, last,
                                                    answered, logs))
                await trio.sleep(min(interval, remaining))
                interval = min(interval * 2, self.settings.health_interval)

    async def _check_alive(self, record: _Record, containers: list[Any] | None = None) -> None:
        """Raise a ``start`` failure (exit code, logs) when the exposed service's
        container has stopped (right after ``up``, or while health is polled)."""
        if containers is None:
            try:
                containers = await self._sdk(self._project_containers, record.project)
            except Exception as exc:  # docker SDK errors are workload-side
                if _is_docker_error(exc):
                    return
                raise
        mine = [c for c in containers
                if c.labels.get("com.docker.compose.service") == record.expose_service]
        if not mine or any(c.status == "running" for c in mine):
            return
        container = mine[0]
        if container.status not in ("exited", "dead"):
            return
        state = container.attrs.get("State") or {}
        try:
            logs = await self._sdk(
                lambda: container.logs(tail=MAX_TAIL_LINES).decode("utf-8", "replace"))
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            logs = f"<logs unavailable: {exc}>"
        code = state.get("ExitCode")
        raise _Failure.of(container_exited(
            record.expose_service, code if isinstance(code, int) else None, logs,
            str(state.get("Error") or "")))

    async def _service_logs(self, record: _Record, service: str) -> str:
        """The last lines of *service*'s container logs ("" when Docker cannot say)."""
        try:
            containers = await self._sdk(self._project_containers, record.project)
            mine = [c for c in containers
                    if c.labels.get("com.docker.compose.service") == service]
            if not mine:
                return ""
            raw: bytes = await self._sdk(lambda: mine[0].logs(tail=MAX_TAIL_LINES))
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            return ""
        return raw.decode("utf-8", "replace")

    # -- undeploy -----------------------------------------------------------------

    async def undeploy(
        self, deployment_id: str, on_status: StatusCallback | None = None,
        on_stopped: Callable[[], Awaitable[None]] | None = None,
    ) -> DeploymentStatus:
        """Stop and remove a deployment (containers, networks, volumes, built images, dir).

        Unknown ids are cleaned up as far as the workload dir allows and reported
        ``stopped``. A failed ``down`` reports ``failed`` and keeps the dir for a retry.
        *on_stopped* runs once stopped, before the next deploy of this id may begin.
        """
        async with self._lock(deployment_id):
            result = await self._undeploy(deployment_id, on_status)
            if result.state == "stopped" and on_stopped is not None:
                # Still under the lock: a deploy of this id queued behind the undeploy
                # starts only after this clean-up (its secrets are never wiped by it).
                await on_stopped()
        if result.state == "stopped":
            self._forget_lock(deployment_id)
        return result

    async def _undeploy(
        self, deployment_id: str, on_status: StatusCallback | None
    ) -> DeploymentStatus:
        record = self._records.get(deployment_id) or await trio.to_thread.run_sync(
            self._load_record, self.workload_dir(deployment_id)
        )
        old = self._status.get(deployment_id)
        base = DeploymentStatus(
            deployment_id=deployment_id,
            state="stopping",
            app=record.app if record else (old.app if old else ""),
            version=record.version if record else (old.version if old else ""),
            compose_hash=record.compose_hash if record else None,
        )
        if old is not None and old.state != "stopping":
            await self._set(base, on_status)
        if record is not None:
            await self._retain_logs(record)
        try:
            await self._down(deployment_id, record)
        except _Failure as failure:
            failed = attrs.evolve(base, state="failed", error=str(failure))
            if old is None:
                return await self._masked(failed)
            return await self._set(failed, on_status)
        stopped = attrs.evolve(base, state="stopped")
        if old is not None:
            await self._set(stopped, on_status)
        self._records.pop(deployment_id, None)
        self._status.pop(deployment_id, None)
        self._env_values.pop(deployment_id, None)
        return stopped

    async def _retain_logs(self, record: _Record) -> None:
        """Keep the last lines of each service for the retention window (best effort:
        an undeploy never fails because its logs could not be kept)."""
        if self.retained is None:
            return
        try:
            lines = await self._masked_lines(record.deployment_id, await self._docker_lines(
                record, tail=MAX_LINES_PER_SERVICE, since=None, service=None))
            await trio.to_thread.run_sync(self.retained.keep, record.deployment_id, lines)
        except (OSError, ValueError) as exc:
            log.warning("deployment %s: cannot keep its logs: %s", record.deployment_id, exc)

    def _env_placeholder(self, record: _Record) -> None:  # worker thread
        """The Compose CLI reads every ``env_file`` even to stop: when the env-secret
        file is gone (revoked, or never released), an empty one lets ``down`` run."""
        if record.secret_env and self.secret_env is not None:
            path = self.secret_env.env_path(record.deployment_id)
            if not path.exists() and path.parent.is_dir():
                path.touch(mode=0o400)

    async def _down(self, deployment_id: str, record: _Record | None) -> None:
        directory = self.workload_dir(deployment_id)
        if record is not None and (record.directory / RESOLVED_FILE).exists():
            await trio.to_thread.run_sync(self._env_placeholder, record)
            try:
                cli = await self.detect_cli()
            except ComposeCLIUnavailable as exc:
                raise _Failure(str(exc)) from None
            argv = self._compose_argv(
                cli, record, "down", "--remove-orphans", "-v", "--rmi", "local"
            )
            with trio.move_on_after(self.settings.down_timeout) as scope:
                code, out, err = await _run(argv, env=self._cli_env(), cwd=record.directory)
            if scope.cancelled_caught:
                raise _Failure(f"`down` did not finish within {self.settings.down_timeout:g} s")
            if code != 0:
                # E.g. a compose file the CLI refuses: fall back to label-based removal,
                # and report the CLI's text only if that cannot finish the job either.
                text = _tail(err or out, self.settings.error_tail_bytes) or f"exit {code}"
                log.warning("deployment %s: `down` failed: %s", deployment_id, text)
                await self._remove_by_label(deployment_id, text)
        else:
            # No compose file to drive `down`: remove what carries the project label.
            await self._remove_by_label(deployment_id, None)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))

    async def on_secret_rotated(self, deployment_id: str, name: str, action: str,
                                signal: str | None = None) -> str | None:
        """Tell a running workload its secret *name* changed: ``signal`` sends *signal*
        to every service's containers (``kill -s``), ``restart`` restarts them (their
        named volumes and the /run/secrets mount stay) — or, when *name* feeds an
        environment variable, rewrites the env file and recreates the services (``up
        -d``: an environment is fixed at start). None when done, else why not."""
        if action not in ("signal", "restart") or (action == "signal" and signal not in
                                                    ROTATION_SIGNALS):
            return f"unknown rotation action {action!r}"
        async with self._lock(deployment_id):  # never beside a deploy or an undeploy
            status = self._status.get(deployment_id)
            record = self._records.get(deployment_id)
            if (record is None or status is None or status.state != "running"
                    or not (record.directory / RESOLVED_FILE).exists()):
                return "the deployment does not run here (any more)"
            return await self._rotated(record, name, action, signal)

    async def _rotated(self, record: _Record, name: str, action: str,
                       signal: str | None) -> str | None:
        deployment_id = record.deployment_id
        try:
            cli = await self.detect_cli()
        except ComposeCLIUnavailable as exc:
            return str(exc)
        command: tuple[str, ...] = (
            ("kill", "-s", str(signal)) if action == "signal" else ("restart",))
        await trio.to_thread.run_sync(self._env_placeholder, record)
        if name in record.secret_env.values() and self.secret_env is not None:
            try:
                await trio.to_thread.run_sync(self.secret_env.write_env, deployment_id,
                                              record.secret_env)
            except (KeyError, ValueError, OSError) as exc:
                return f"cannot write the env-secret file: {exc}"
            command = ("up", "-d", "--no-build")
        argv = self._compose_argv(cli, record, *command)
        with trio.move_on_after(self.settings.down_timeout) as scope:
            code, out, err = await _run(argv, env=self._cli_env(), cwd=record.directory)
        if scope.cancelled_caught:
            return f"`{command[0]}` did not finish within {self.settings.down_timeout:g} s"
        if code != 0:
            return _tail(err or out, self.settings.error_tail_bytes) or f"exit {code}"
        log.info("deployment %s: secrets rotated, %s", deployment_id,
                 f"sent {signal}" if action == "signal" else "restarted")
        return None

    async def _await_secret_env(self, record: _Record) -> None:
        """Wait (bounded) until every env secret is released, then write the env file."""
        assert self.secret_env is not None  # checked when the resolved file was written
        deadline = trio.current_time() + self.settings.secret_wait_timeout
        while True:
            try:
                await trio.to_thread.run_sync(self.secret_env.write_env, record.deployment_id,
                                              record.secret_env)
                return
            except KeyError as exc:
                missing = exc.args[0]
            except (ValueError, OSError) as exc:
                raise _Failure.of(FailureReport(
                    error=f"cannot feed the environment from secrets: {exc}",
                    phase="secrets")) from None
            if trio.current_time() >= deadline:
                raise _Failure.of(FailureReport(
                    error=f"secret {missing!r} (for an environment variable) was not released "
                    f"within {self.settings.secret_wait_timeout:g} s: the app's release "
                    "policy refused this replica, or the secret does not exist "
                    "(see the app's secret-events)", phase="secrets"))
            await trio.sleep(0.25)

    async def _remove_by_label(self, deployment_id: str, cli_error: str | None) -> None:
        try:
            await self._sdk(self._sdk_remove_project, self.project_name(deployment_id))
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            reason = f"cannot remove the project's Docker objects: {exc}"
            raise _Failure(reason if cli_error is None else f"{cli_error}\n{reason}") from None

    def _sdk_remove_project(self, project: str) -> None:  # worker thread
        """What ``down -v --rmi local`` would remove, found by Compose's project label."""
        label = {"label": f"com.docker.compose.project={project}"}
        client = self._client()
        for container in client.containers.list(all=True, filters=label):
            container.remove(force=True, v=True)
        for network in client.networks.list(filters=label):
            network.remove()
        for volume in client.volumes.list(filters=label):
            volume.remove(force=True)
        for image in client.images.list(name=f"{project}*"):
            for tag in image.tags:
                if tag.startswith((f"{project}_", f"{project}-")):
                    client.images.remove(tag)

    # -- adopt --------------------------------------------------------------------

    def _load_record(self, directory: Path) -> _Record | None:  # worker thread
        try:
            data = json.loads((directory / DEPLOYMENT_FILE).read_text(encoding="utf-8"))
            return _Record.from_json(data, directory)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if directory.exists():
                log.warning("ignoring workload dir %s: %s", directory, exc)
            return None

    def _scan_dirs(self) -> list[_Record]:  # worker thread
        if not self.workloads_dir.is_dir():
            return []
        records = []
        for entry in sorted(self.workloads_dir.iterdir()):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)  # leftover of an interrupted deploy
                continue
            if entry.is_dir() and (record := self._load_record(entry)) is not None:
                records.append(record)
        return records

    async def adopt(self) -> list[DeploymentStatus]:
        """Rediscover deployments left by a previous agent process, without restarting.

        Deployments whose exposed container runs come back ``running``; the rest
        ``failed`` with the reason (the CP decides whether to redeploy or undeploy).
        """
        adopted = []
        for record in await trio.to_thread.run_sync(self._scan_dirs):
            async with self._lock(record.deployment_id):
                if record.deployment_id in self._status:
                    adopted.append(self._status[record.deployment_id])
                    continue
                self._records[record.deployment_id] = record
                self._env_values[record.deployment_id] = record.env_values
                status = await self._inspect(record)
                adopted.append(await self._set(status, None))
        return adopted

    async def _inspect(self, record: _Record) -> DeploymentStatus:
        base = DeploymentStatus(
            deployment_id=record.deployment_id,
            state="running",
            app=record.app,
            version=record.version,
            compose_hash=record.compose_hash,
        )
        try:
            containers = await self._sdk(self._project_containers, record.project)
            upstream, digests = self._locate(record, containers)
        except _Failure as failure:
            return attrs.evolve(base, state="failed", error=str(failure))
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            return attrs.evolve(base, state="failed", error=f"docker: {exc}")
        return attrs.evolve(base, image_digests=digests, upstream=upstream)

    async def refresh(self, deployment_id: str) -> DeploymentStatus:
        """Re-inspect a deployment's containers (e.g. after a proxy connect error).

        A running deployment whose container died turns ``failed``; a failed one whose
        container runs again (restart policy) turns ``running``; the upstream address is
        updated. Deployments in other states are returned as they are.
        """
        async with self._lock(deployment_id):
            record = self._records.get(deployment_id)
            current = self._status.get(deployment_id)
            if record is None or current is None:
                raise UnknownDeployment(deployment_id)
            if current.state not in ("running", "failed"):
                return current
            fresh = await self._inspect(record)
            if fresh.state == current.state and fresh.upstream == current.upstream:
                return current
            if fresh.state == "failed" and current.state == "failed":
                return current
            if fresh.state == current.state:
                self._status[deployment_id] = fresh  # same state, new address
                return fresh
            return await self._set(fresh, None)

    # -- logs and stats -----------------------------------------------------------

    def _containers_of(self, deployment_id: str) -> tuple[_Record, Callable[[], list[Any]]]:
        record = self._records.get(deployment_id)
        if record is None:
            raise UnknownDeployment(deployment_id)
        return record, lambda: self._project_containers(record.project)

    @staticmethod
    def _service_key(container: Any, seen: Mapping[str, object]) -> str:
        service = str(container.labels.get("com.docker.compose.service", container.name))
        if service not in seen:
            return service
        number = container.labels.get("com.docker.compose.container-number", container.short_id)
        return f"{service}#{number}"

    async def log_lines(self, deployment_id: str, *, tail: int = 200, since: str | None = None,
                        service: str | None = None) -> dict[str, list[LogLine]]:
        """The last ``tail`` lines per service (``service#n`` for extra replicas), each
        with Docker's timestamp; only lines at or after *since* (RFC 3339 UTC) and only
        *service*'s when given. A deployment undeployed within the retention window is
        answered from its retained logs (:mod:`ee.agent.logstore`).

        Raises :class:`UnknownDeployment`; Docker errors become the value's text.
        """
        record = self._records.get(deployment_id)
        if record is None:
            kept = (None if self.retained is None
                    else await trio.to_thread.run_sync(self.retained.read, deployment_id))
            if kept is None:
                raise UnknownDeployment(deployment_id)
            return {key: filter_lines(lines, tail=tail, since=since)
                    for key, lines in kept.items()
                    if service is None or key.split("#", 1)[0] == service}
        return await self._masked_lines(deployment_id, await self._docker_lines(
            record, tail=tail, since=since, service=service))

    async def _docker_lines(self, record: _Record, *, tail: int, since: str | None,
                            service: str | None) -> dict[str, list[LogLine]]:
        try:
            containers = await self._sdk(self._project_containers, record.project)
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            return {"": [LogLine(service="", text=f"<logs unavailable: {exc}>")]}
        floor = None if since is None else rfc3339_ns(since)
        options: dict[str, Any] = {"tail": tail, "timestamps": True}
        if floor is not None:
            options["since"] = max(1.0, floor / 1e9 - 1.0)  # whole-second APIs: filter below
        result: dict[str, list[LogLine]] = {}
        for container in sorted(containers, key=lambda c: c.name):
            key = self._service_key(container, result)
            if service is not None and key.split("#", 1)[0] != service:
                continue
            try:
                raw = await self._sdk(_read_logs, container, options, MAX_LOG_READ_BYTES)
            except Exception as exc:
                if not _is_docker_error(exc):
                    raise
                result[key] = [LogLine(service=key, text=f"<logs unavailable: {exc}>")]
                continue
            lines = []
            for text in raw.decode("utf-8", "replace").splitlines():
                at, body = split_timestamp(text)
                lines.append(LogLine(service=key, text=body, at=at))
            result[key] = filter_lines(lines, tail=tail, since=since)
        return result

    async def logs(self, deployment_id: str, tail: int = 200) -> dict[str, str]:
        """The last ``tail`` log lines per service as text (see :meth:`log_lines`)."""
        found = await self.log_lines(deployment_id, tail=tail)
        return {key: "".join(line.text + "\n" for line in lines)
                for key, lines in found.items()}

    async def stats(self, deployment_id: str) -> dict[str, ServiceStats]:
        """One resource sample per service container (taken concurrently).

        Raises :class:`UnknownDeployment`; Docker errors land in ``ServiceStats.error``.
        """
        _, list_containers = self._containers_of(deployment_id)
        try:
            containers = await self._sdk(list_containers)
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            return {"": ServiceStats(service="", container_id="", state="unknown", error=str(exc))}
        keyed: dict[str, Any] = {}
        for container in sorted(containers, key=lambda c: c.name):
            keyed[self._service_key(container, keyed)] = container
        result: dict[str, ServiceStats] = {}

        async def sample(key: str, container: Any) -> None:
            result[key] = await self._sample(key, container)

        async with trio.open_nursery() as nursery:
            for key, container in keyed.items():
                nursery.start_soon(sample, key, container)
        return {key: result[key] for key in keyed}

    async def _sample(self, key: str, container: Any) -> ServiceStats:
        base = ServiceStats(service=key, container_id=container.id, state=container.status)
        if container.status != "running":
            return base
        try:
            raw: Mapping[str, Any] = await self._sdk(lambda: container.stats(stream=False))
        except Exception as exc:
            if not _is_docker_error(exc):
                raise
            return attrs.evolve(base, error=str(exc))
        memory = raw.get("memory_stats") or {}
        usage = memory.get("usage")
        if usage is not None:
            extra = memory.get("stats") or {}
            usage -= extra.get("inactive_file", extra.get("total_inactive_file", 0))
        networks = (raw.get("networks") or {}).values()
        return attrs.evolve(
            base,
            cpu_percent=_cpu_percent(raw),
            memory_bytes=usage,
            memory_limit_bytes=memory.get("limit"),
            net_rx_bytes=sum(int(n.get("rx_bytes", 0)) for n in networks) if networks else None,
            net_tx_bytes=sum(int(n.get("tx_bytes", 0)) for n in networks) if networks else None,
            pids=(raw.get("pids_stats") or {}).get("current"),
        )


def _is_docker_error(exc: BaseException) -> bool:
    """Docker SDK / daemon / transport errors (workload side), not programming errors."""
    return isinstance(exc, docker.errors.DockerException | requests.RequestException | OSError)
