"""The agent's Compose workload layer against the real Docker daemon.

Docker tests skip (with the reason) only when ``docker info`` fails; CI runs them.
Each one uses its own project namespace and checks that no container, network or
built image of that namespace is left behind.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import docker  # type: ignore[import-untyped]
import httpx
import pytest
import trio

from ee.agent.workload import (
    TRANSITIONS,
    ComposeCLIUnavailable,
    ComposeRunner,
    DeploymentStatus,
    DeploySpec,
    InvalidTransition,
    RetryPolicy,
    UnknownDeployment,
    WorkloadSettings,
    check_transition,
    detect_compose_cli,
    is_transient_error,
    project_slug,
)
from ee.protocol.compose import (
    compose_services,
    validate_build_context,
    validate_compose,
    workload_hash,
)

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_SCRIPT = REPO / "tools" / "images" / "build_busybox.sh"
BASE_IMAGE = "ee-busybox:local"
DOCKER_TIMEOUT = 120


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if result.returncode != 0:
        return f"`docker info` failed: {result.stderr.strip()[-300:]}"
    return None


_PROBLEM = _docker_problem()
needs_docker = pytest.mark.skipif(
    _PROBLEM is not None, reason=f"needs a running Docker daemon ({_PROBLEM})"
)

# -- the test app -----------------------------------------------------------------

DOCKERFILE = b"""\
FROM ee-busybox:local
COPY www /var/www
CMD ["httpd", "-f", "-v", "-p", "8080", "-h", "/var/www"]
"""

ECHO_CGI = b"""\
#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
printf '%s:%s:' "$REQUEST_METHOD" "$GREETING"
cat
"""

APP_COMPOSE = """\
services:
  web:
    build: .
    init: true
    environment:
      GREETING: ${GREETING:-unset}
  sidecar:
    image: ee-busybox:local
    init: true
    command: ["sh", "-c", "echo sidecar-up; exec sleep 3600"]
"""

IMAGE_ONLY_COMPOSE = """\
services:
  web:
    image: ee-busybox:local
    init: true
    command: ["sh", "-c", "mkdir -p /w && echo ok > /w/health && exec httpd -f -p 8080 -h /w"]
"""


def make_context(entries: dict[str, tuple[int, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, (mode, payload) in entries.items():
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(raw.getvalue())


APP_CONTEXT = make_context(
    {
        "Dockerfile": (0o644, DOCKERFILE),
        "www/health": (0o644, b"ok\n"),
        "www/cgi-bin/echo": (0o755, ECHO_CGI),
    }
)


def app_spec(deployment_id: str, **changes: Any) -> DeploySpec:
    spec = DeploySpec(
        deployment_id=deployment_id,
        app="echo",
        version="1",
        compose=APP_COMPOSE,
        build_context=APP_CONTEXT,
        env={"GREETING": "hi"},
        expose_port=8080,
        health_path="/health",
    )
    return attrs.evolve(spec, **changes)


def spec_hash(spec: Any) -> str:
    """The workload hash of a DeploySpec or a Deploy message, computed from the protocol
    functions directly (the formula the CP and ``eectl`` use), not by the agent."""
    doc = validate_compose(spec.compose)
    context = (None if spec.build_context is None
               else validate_build_context(spec.build_context))
    return workload_hash(doc, context, env=dict(spec.env), expose_port=spec.expose_port,
                         expose_service=spec.expose_service or compose_services(doc)[0],
                         health_path=spec.health_path, secret_names=spec.secret_names,
                         secret_env=spec.secret_env)


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_image() -> str:
    if _PROBLEM is not None:
        pytest.skip(f"needs a running Docker daemon ({_PROBLEM})")
    subprocess.run(["sh", str(BUSYBOX_SCRIPT)], check=True, capture_output=True, timeout=300)
    return BASE_IMAGE


def _leftovers(client: Any, namespace: str) -> list[str]:
    found = []
    for container in client.containers.list(
        all=True, filters={"label": "com.docker.compose.project"}
    ):
        if container.labels["com.docker.compose.project"].startswith(namespace):
            found.append(f"container {container.name}")
            container.remove(force=True, v=True)
    for network in client.networks.list():
        if network.name.startswith(namespace):
            found.append(f"network {network.name}")
            network.remove()
    for image in client.images.list():
        for tag in image.tags:
            if tag.startswith(namespace):
                found.append(f"image {tag}")
                client.images.remove(tag, force=True)
    return found


@pytest.fixture
def namespace(busybox_image: str) -> Iterator[str]:
    """A fresh project namespace; fails the test if anything of it is left behind."""
    name = f"eet{secrets.token_hex(4)}"
    yield name
    client = docker.from_env()
    try:
        left = _leftovers(client, name)
    finally:
        client.close()
    assert left == [], f"test left Docker objects behind (now removed): {left}"


def settings_for(namespace: str, **changes: Any) -> WorkloadSettings:
    values: dict[str, Any] = {
        "namespace": namespace,
        "health_timeout": 60.0,
        "health_interval": 0.2,
        "retry": RetryPolicy(attempts=2, base_delay=0.2, max_delay=0.5),
    }
    return WorkloadSettings(**{**values, **changes})


@pytest.fixture
def runner(tmp_path: Path, namespace: str) -> ComposeRunner:
    return ComposeRunner(tmp_path / "data", settings_for(namespace))


def project_containers(project: str) -> list[Any]:
    client = docker.from_env()
    try:
        return list(
            client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={project}"}
            )
        )
    finally:
        client.close()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[DeploymentStatus] = []

    async def __call__(self, status: DeploymentStatus) -> None:
        self.seen.append(status)

    @property
    def states(self) -> list[str]:
        return [s.state for s in self.seen]


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10)


# -- pure parts (no Docker) -------------------------------------------------------------


def test_transition_table() -> None:
    check_transition(None, "starting")
    check_transition("starting", "running")
    check_transition("running", "stopping")
    check_transition("stopping", "stopped")
    check_transition("failed", "running")  # refresh sees a restarted container
    check_transition("starting", "starting")  # a deploy superseding a cancelled one
    for old, new in [(None, "stopped"), ("stopped", "running"), ("starting", "stopped")]:
        with pytest.raises(InvalidTransition):
            check_transition(old, new)  # type: ignore[arg-type]
    assert all(new in TRANSITIONS for targets in TRANSITIONS.values() for new in targets)


@pytest.mark.parametrize(
    ("text", "transient"),
    [
        ('Get "https://r/v2/": net/http: TLS handshake timeout', True),
        ("read tcp 10.0.0.2:1->1.2.3.4:443: read: connection reset by peer", True),
        ("dial tcp: lookup registry: i/o timeout", True),
        ("dial tcp: lookup registry: Temporary failure in name resolution", True),
        ("net/http: request canceled while waiting for connection", True),
        ("toomanyrequests: You have reached your pull rate limit", True),
        ("pull access denied for ee-nope, repository does not exist", False),
        ("Error starting userland proxy: bind: address already in use", False),
        ("yaml: line 3: mapping values are not allowed in this context", False),
    ],
)
def test_is_transient_error(text: str, transient: bool) -> None:
    assert is_transient_error(text) is transient


def test_project_slug() -> None:
    assert project_slug("dep-1") == "dep-1"
    assert project_slug("Dep 1") != project_slug("dep-1")
    assert project_slug("Dep 1").startswith("dep-1-")
    assert project_slug("../../etc") not in ("", "etc")
    slug = project_slug("x" * 300)
    assert len(slug) <= 51 and slug == project_slug("x" * 300)
    assert project_slug("___") and project_slug("___")[0].isalnum()


def test_spec_and_status_values() -> None:
    with pytest.raises(ValueError):
        app_spec("d", expose_port=0)
    with pytest.raises(ValueError):
        app_spec("d", health_path="health")
    with pytest.raises(ValueError):
        app_spec("d", env={"BAD NAME": "x"})
    # What a deploy names for env secrets is checked at the agent too: no reserved or
    # malformed variable (an env-file line break), no path as a secret name.
    for bad in ({"LD_PRELOAD": "db"}, {"A\nB": "db"}, {"A=B": "db"}, {"OK": "../x"},
                {"OK": "Db"}):
        with pytest.raises(ValueError):
            app_spec("d", secret_env=bad)
    for names in (("../x",), ("Db",), ("",), ("a/b",)):
        with pytest.raises(ValueError):
            app_spec("d", secret_names=names)
    assert app_spec("d", secret_names=["db", "api.key"]).secret_names == ("db", "api.key")
    assert dict(app_spec("d", secret_env={"DB_PASSWORD": "db_password"},
                         secret_names=("db_password",)).secret_env) == {
        "DB_PASSWORD": "db_password"}
    spec = app_spec("d")
    with pytest.raises(TypeError):
        spec.env["GREETING"] = "x"  # type: ignore[index]
    status = DeploymentStatus(
        deployment_id="d", state="running", compose_hash="sha256:00", image_digests={"a": "b"}
    )
    assert status.to_wire() == {
        "deployment_id": "d",
        "state": "running",
        "compose_hash": "sha256:00",
        "image_digests": {"a": "b"},
    }
    assert RetryPolicy(base_delay=1, max_delay=5).delay(1) == 1
    assert RetryPolicy(base_delay=1, max_delay=5).delay(10) == 5


async def test_cli_detection_names_both_when_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with trio.fail_after(30), pytest.raises(ComposeCLIUnavailable) as info:
        await detect_compose_cli()
    assert "`docker compose version`" in str(info.value)
    assert "`docker-compose version`" in str(info.value)


async def test_missing_cli_is_a_failed_deployment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    runner = ComposeRunner(tmp_path / "data", WorkloadSettings(namespace="eetnocli"))
    with trio.fail_after(30):
        status = await runner.deploy(app_spec("nocli"))
    assert status.state == "failed"
    assert status.error is not None and "docker-compose" in status.error


# -- with Docker ---------------------------------------------------------------------------


@needs_docker
async def test_cli_detected() -> None:
    with trio.fail_after(30):
        cli = await detect_compose_cli()
    assert cli.argv in (("docker", "compose"), ("docker-compose",))
    assert cli.version


@needs_docker
async def test_deploy_reach_logs_stats_undeploy_redeploy(runner: ComposeRunner) -> None:
    with trio.fail_after(DOCKER_TIMEOUT):
        recorder = Recorder()
        spec = app_spec("app-1")
        status = await runner.deploy(spec, recorder)
        assert status.state == "running", status.error
        assert recorder.states == ["starting", "running"]
        assert status.compose_hash == spec_hash(spec)
        assert recorder.seen[-1] == status == runner.status("app-1")
        assert runner.deployments() == [status]

        project = runner.project_name("app-1")
        containers = {
            c.labels["com.docker.compose.service"]: c for c in project_containers(project)
        }
        assert set(containers) == {"web", "sidecar"}
        assert status.image_digests == {s: c.attrs["Image"] for s, c in containers.items()}
        assert all(d.startswith("sha256:") for d in status.image_digests.values())
        for container in containers.values():  # nothing published on the host
            assert not any(container.attrs["NetworkSettings"]["Ports"].values())

        upstream = runner.upstream("app-1")
        assert upstream is not None and upstream == status.upstream
        host, port = upstream
        assert port == 8080
        assert host == next(
            n["IPAddress"]
            for name, n in containers["web"].attrs["NetworkSettings"]["Networks"].items()
            if name.startswith(project)
        )
        async with client() as http:
            health = await http.get(f"http://{host}:{port}/health")
            assert (health.status_code, health.text) == (200, "ok\n")
            echo = await http.post(f"http://{host}:{port}/cgi-bin/echo", content=b"hello body")
            assert echo.status_code == 200
            assert echo.text == "POST:hi:hello body"  # env reached compose interpolation

        logs = await runner.logs("app-1", tail=50)
        assert set(logs) == {"web", "sidecar"}
        assert "sidecar-up" in logs["sidecar"]
        stats = await runner.stats("app-1")
        assert set(stats) == {"web", "sidecar"}
        for sample in stats.values():
            assert sample.state == "running" and sample.error is None
            assert sample.memory_bytes is not None and sample.memory_bytes > 0
            assert sample.memory_limit_bytes is not None and sample.memory_limit_bytes > 0
            assert sample.cpu_percent is not None and sample.cpu_percent >= 0

        workdir = runner.workload_dir("app-1")
        assert (workdir / "docker-compose.yml").read_text() == APP_COMPOSE
        assert os.access(workdir / "context" / "www" / "cgi-bin" / "echo", os.X_OK)
        saved = json.loads((workdir / "deployment.json").read_text())
        assert saved["compose_hash"] == status.compose_hash
        assert (workdir / "deployment.json").stat().st_mode & 0o077 == 0

        recorder.seen.clear()
        stopped = await runner.undeploy("app-1", recorder)
        assert stopped.state == "stopped", stopped.error
        assert recorder.states == ["stopping", "stopped"]
        assert project_containers(project) == []
        assert not workdir.exists()
        assert runner.status("app-1") is None and runner.upstream("app-1") is None
        images = docker.from_env().images.list()
        assert not [t for i in images for t in i.tags if t.startswith(project)]

        again = await runner.deploy(spec)
        assert again.state == "running", again.error
        assert again.compose_hash == status.compose_hash
        assert (await runner.undeploy("app-1")).state == "stopped"
        assert project_containers(project) == []


@needs_docker
async def test_redeploy_in_place_updates_workload(runner: ComposeRunner) -> None:
    with trio.fail_after(DOCKER_TIMEOUT):
        first = await runner.deploy(app_spec("upd"))
        assert first.state == "running", first.error
        second = await runner.deploy(app_spec("upd", env={"GREETING": "again"}, version="2"))
        assert second.state == "running", second.error
        assert second.version == "2"
        host, port = runner.upstream("upd") or ("", 0)
        async with client() as http:
            echo = await http.post(f"http://{host}:{port}/cgi-bin/echo", content=b"x")
        assert echo.text == "POST:again:x"
        assert (await runner.undeploy("upd")).state == "stopped"


@needs_docker
async def test_a_deploy_supersedes_one_cancelled_mid_way(runner: ComposeRunner) -> None:
    """The agent cancels an in-flight deploy when the same id is deployed again; the
    cancelled one leaves ``starting`` and the next deploy must still run."""
    spec = DeploySpec(deployment_id="again", app="a", version="1", compose=IMAGE_ONLY_COMPOSE,
                      expose_port=8080, health_path="/health")
    with trio.fail_after(DOCKER_TIMEOUT):
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()
            started = trio.Event()

            async def on_status(status: DeploymentStatus) -> None:
                if status.state == "starting":
                    started.set()

            async def first() -> None:
                with cancelled:
                    await runner.deploy(spec, on_status)

            nursery.start_soon(first)
            await started.wait()
            cancelled.cancel()
        second = await runner.deploy(attrs.evolve(spec, version="2"))
        assert second.state == "running" and second.version == "2", second.error
        assert (await runner.undeploy("again")).state == "stopped"


@needs_docker
async def test_failing_health_reports_failed_and_keeps_logs(tmp_path: Path, namespace: str) -> None:
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace, health_timeout=3.0))
    with trio.fail_after(DOCKER_TIMEOUT):
        recorder = Recorder()
        status = await runner.deploy(app_spec("sick", health_path="/missing"), recorder)
        assert recorder.states == ["starting", "failed"]
        assert status.state == "failed"
        assert status.error is not None
        assert "/missing did not answer 2xx within 3 s (last: HTTP 404)" in status.error
        assert status.compose_hash == spec_hash(app_spec("sick", health_path="/missing"))
        assert (status.phase, status.exit_code) == ("health", None)
        assert any("response:404" in line for line in status.log_tail), status.log_tail
        assert runner.upstream("sick") is None
        logs = await runner.logs("sick")
        assert "sidecar-up" in logs["sidecar"]
        assert (await runner.undeploy("sick")).state == "stopped"
        assert project_containers(runner.project_name("sick")) == []


@needs_docker
async def test_exiting_service_fails_with_its_logs(runner: ComposeRunner) -> None:
    compose = """\
services:
  web:
    image: ee-busybox:local
    command: ["sh", "-c", "echo boom-before-exit; sleep 1; exit 3"]
"""
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await runner.deploy(
            DeploySpec(deployment_id="exits", app="x", version="1", compose=compose, expose_port=80)
        )
        assert status.state == "failed"
        assert status.error is not None
        assert "exit" in status.error
        assert "boom-before-exit" in status.error or "exit code 3" in status.error
        assert (await runner.undeploy("exits")).state == "stopped"


def _bad_cases(port: int) -> list[tuple[str, dict[str, Any], str]]:
    traversal = make_context({"../evil": (0o644, b"x"), "Dockerfile": (0o644, DOCKERFILE)})
    return [
        ("yaml", {"compose": "services: [\n", "build_context": None}, "not valid YAML"),
        (
            "schema",  # valid YAML the policy allows, refused by the Compose CLI itself
            {"compose": "services:\n  web:\n    image: ee-busybox:local\n    cpus: abc\n"},
            "cpus",
        ),
        (
            "image",
            {"compose": "services:\n  web:\n    image: ee-no-such-image:local\n"},
            "ee-no-such-image",
        ),
        ("traversal", {"build_context": traversal}, "'../evil'"),
        ("notgzip", {"build_context": b"not a tarball"}, "not a valid gzip"),
        ("oversize", {"build_context": make_context({"big": (0o644, os.urandom(4096))})}, "limit"),
        (
            "policy",  # host ports are refused before anything runs
            {
                "compose": (
                    "services:\n  web:\n    image: ee-busybox:local\n"
                    '    command: ["sleep", "30"]\n'
                    f'    ports: ["127.0.0.1:{port}:80"]\n'
                ),
                "build_context": None,
            },
            "workload policy (host_port): services.web.ports",
        ),
        (
            "service",
            {"expose_service": "nope"},
            "expose_service 'nope' is not a service",
        ),
    ]


@needs_docker
async def test_bad_workloads_fail_with_cli_text_and_runner_stays_usable(
    tmp_path: Path, namespace: str
) -> None:
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace, max_context_bytes=1024))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with trio.fail_after(DOCKER_TIMEOUT):
            for name, changes, expected in _bad_cases(busy.getsockname()[1]):
                recorder = Recorder()
                status = await runner.deploy(app_spec(f"bad-{name}", **changes), recorder)
                assert recorder.states == ["starting", "failed"], name
                assert status.state == "failed", name
                assert status.error is not None and expected in status.error, (name, status.error)
                assert len(status.error.encode()) <= 4096 + 3
                stopped = await runner.undeploy(f"bad-{name}")
                assert stopped.state == "stopped", (name, stopped.error)
                assert project_containers(runner.project_name(f"bad-{name}")) == []
            good = await runner.deploy(
                DeploySpec(
                    deployment_id="good",
                    app="x",
                    version="1",
                    compose=IMAGE_ONLY_COMPOSE,
                    expose_port=8080,
                    health_path="/health",
                )
            )
            assert good.state == "running", good.error
            assert good.image_digests is not None and set(good.image_digests) == {"web"}
            assert (await runner.undeploy("good")).state == "stopped"
    finally:
        busy.close()


@needs_docker
async def test_transient_registry_errors_are_retried(tmp_path: Path, namespace: str) -> None:
    """A registry that resets every connection: `up` is retried, then fails with its text."""
    connections = 0

    async def reset(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await stream.aclose()

    runner = ComposeRunner(
        tmp_path / "data",
        settings_for(namespace, retry=RetryPolicy(attempts=3, base_delay=0.1, max_delay=0.2)),
    )
    with trio.fail_after(DOCKER_TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, reset, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            compose = f"services:\n  web:\n    image: 127.0.0.1:{port}/ee/nope:1\n"
            status = await runner.deploy(
                DeploySpec(
                    deployment_id="flaky", app="x", version="1", compose=compose, expose_port=80
                )
            )
            nursery.cancel_scope.cancel()
        assert status.state == "failed"
        assert status.error is not None and is_transient_error(status.error), status.error
        assert connections >= 3  # one (or more, the daemon retries too) per attempt
        assert (await runner.undeploy("flaky")).state == "stopped"


@needs_docker
async def test_new_runner_adopts_without_restarting(tmp_path: Path, namespace: str) -> None:
    data = tmp_path / "data"
    first = ComposeRunner(data, settings_for(namespace))
    with trio.fail_after(DOCKER_TIMEOUT):
        deployed = await first.deploy(app_spec("keep"))
        assert deployed.state == "running", deployed.error
        project = first.project_name("keep")
        before = {c.id: c.attrs["State"]["StartedAt"] for c in project_containers(project)}
        assert len(before) == 2

        # Debris of a deploy interrupted mid-write is swept; junk dirs are ignored.
        (data / "workloads" / ".tmp-keep-dead").mkdir()
        (data / "workloads" / "junk").mkdir()

        second = ComposeRunner(data, settings_for(namespace))
        assert second.project_name("keep") == project
        adopted = await second.adopt()
        assert [a.deployment_id for a in adopted] == ["keep"]
        (status,) = adopted
        assert status.state == "running", status.error
        assert status.compose_hash == deployed.compose_hash
        assert status.image_digests == deployed.image_digests
        assert second.upstream("keep") == deployed.upstream
        assert not (data / "workloads" / ".tmp-keep-dead").exists()

        after = {c.id: c.attrs["State"]["StartedAt"] for c in project_containers(project)}
        assert after == before  # same containers, never restarted

        host, port = deployed.upstream or ("", 0)
        async with client() as http:
            assert (await http.get(f"http://{host}:{port}/health")).status_code == 200
        assert "sidecar-up" in (await second.logs("keep"))["sidecar"]

        # The container dies behind the runner's back: refresh notices.
        containers = {
            c.labels["com.docker.compose.service"]: c for c in project_containers(project)
        }
        await trio.to_thread.run_sync(lambda: containers["web"].kill())
        refreshed = await second.refresh("keep")
        assert refreshed.state == "failed" and second.upstream("keep") is None
        await trio.to_thread.run_sync(containers["web"].start)
        assert (await second.refresh("keep")).state == "running"

        assert (await second.undeploy("keep")).state == "stopped"
        assert project_containers(project) == []
        with pytest.raises(UnknownDeployment):
            await second.logs("keep")
        with pytest.raises(UnknownDeployment):
            await second.refresh("keep")


@needs_docker
async def test_adopt_reports_stopped_containers_as_failed(tmp_path: Path, namespace: str) -> None:
    data = tmp_path / "data"
    first = ComposeRunner(data, settings_for(namespace))
    with trio.fail_after(DOCKER_TIMEOUT):
        spec = DeploySpec(
            deployment_id="gone",
            app="x",
            version="1",
            compose=IMAGE_ONLY_COMPOSE,
            expose_port=8080,
            health_path="/health",
        )
        assert (await first.deploy(spec)).state == "running"
        for container in project_containers(first.project_name("gone")):
            await trio.to_thread.run_sync(partial(container.stop, timeout=1))
        second = ComposeRunner(data, settings_for(namespace))
        (status,) = await second.adopt()
        assert status.state == "failed"
        assert status.error is not None and "exited" in status.error
        assert (await second.undeploy("gone")).state == "stopped"
