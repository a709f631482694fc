"""What a tenant sees of their workload on the agent, against the real Docker daemon:
failure causes (phase, exit code, last lines) within each phase's timeout, updates in
place that keep named volumes, logs with timestamps and filters, and logs kept after
undeploy for the retention window.
"""

from __future__ import annotations

import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import docker  # type: ignore[import-untyped]
import httpx
import pytest
import trio

from ee.agent.config import ConfigError, WorkloadLimits, config_from_dict, config_to_dict
from ee.agent.logstore import RetainedLogs
from ee.agent.server import Agent
from ee.agent.workload import ComposeRunner, DeploymentStatus, DeploySpec, UnknownDeployment
from ee.protocol.messages import Deploy, ErrorMessage, LogsReply, LogsRequest

from .agentkit import agent_config, agent_http, running_agent
from .test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    Recorder,
    busybox_image,  # noqa: F401  (fixture)
    make_context,
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    project_containers,
    settings_for,
    spec_hash,
)


def _spec(deployment_id: str, compose: str, **changes: Any) -> DeploySpec:
    spec = DeploySpec(deployment_id=deployment_id, app="acct.app", version="v1",
                      compose=compose, expose_port=8080, health_path="/health")
    return attrs.evolve(spec, **changes)


def _volumes(project: str) -> list[str]:
    client = docker.from_env()
    try:
        return sorted(v.name for v in client.volumes.list(
            filters={"label": f"com.docker.compose.project={project}"}))
    finally:
        client.close()


def test_any_part_of_the_workload_changes_the_hash() -> None:
    base = _spec("h", IMAGE_ONLY_COMPOSE, env={"A": "1"}, secret_names=("db",))
    changed = [
        attrs.evolve(base, env={"A": "2"}),
        attrs.evolve(base, env={"A": "1", "B": ""}),
        attrs.evolve(base, expose_port=8081),
        attrs.evolve(base, health_path="/ready"),
        attrs.evolve(base, secret_names=("db", "api_key")),
        attrs.evolve(base, compose=IMAGE_ONLY_COMPOSE + "    init: false\n"),
    ]
    hashes = {spec_hash(spec) for spec in [base, *changed]}
    assert len(hashes) == len(changed) + 1
    # ... but not the deployment id, the version label, or the order of secret names
    assert spec_hash(attrs.evolve(base, deployment_id="other", version="v9")) == spec_hash(base)
    assert spec_hash(attrs.evolve(base, secret_names=("db", "db"))) == spec_hash(base)
    # the default exposed service is the first one, as named explicitly
    assert spec_hash(attrs.evolve(base, expose_service="web")) == spec_hash(base)


# -- failure causes ----------------------------------------------------------------------

FAILING_BUILD = make_context({
    "Dockerfile": (0o644, b"FROM ee-busybox:local\nRUN echo about-to-fail && exit 3\n"),
})
# A fresh step each run: the daemon may finish (and cache) a build whose client it lost.
SLOW_BUILD = make_context({
    "Dockerfile": (0o644, b"FROM ee-busybox:local\nRUN echo building-slowly-%s && sleep 60\n"
                   % secrets.token_hex(8).encode()),
})
BUILD_COMPOSE = "services:\n  web:\n    build: .\n"
EXITS_COMPOSE = """\
services:
  web:
    image: ee-busybox:local
    command: ["sh", "-c", "echo starting-up; echo cannot-open-config >&2; exit 7"]
"""


@needs_docker
async def test_failure_causes_reach_the_status(tmp_path: Path, namespace: str) -> None:  # noqa: F811
    runner = ComposeRunner(tmp_path / "data", settings_for(
        namespace, health_timeout=4.0, build_timeout=8.0))
    with trio.fail_after(DOCKER_TIMEOUT):
        # a build whose RUN step exits 3: the build phase, the step's code, its output
        recorder = Recorder()
        built = await runner.deploy(_spec("bld", BUILD_COMPOSE, build_context=FAILING_BUILD),
                                    recorder)
        assert recorder.states == ["starting", "failed"]
        assert (built.state, built.phase, built.exit_code) == ("failed", "build", 3), built
        assert built.error is not None and built.error.startswith("build failed (exit code 3)")
        assert any("about-to-fail" in line for line in built.log_tail), built.log_tail
        assert len(built.log_tail) <= 20 and all(len(x) <= 500 for x in built.log_tail)
        assert built.compose_hash == spec_hash(_spec("bld", BUILD_COMPOSE,
                                                     build_context=FAILING_BUILD))
        wire = built.to_wire()
        assert (wire["phase"], wire["exit_code"]) == ("build", 3)

        # a container that exits at once: the start phase with its exit code and logs
        exited = await runner.deploy(_spec("ext", EXITS_COMPOSE))
        assert (exited.state, exited.phase, exited.exit_code) == ("failed", "start", 7), exited
        assert exited.error is not None and "exit code 7" in exited.error
        assert "starting-up" in exited.log_tail and "cannot-open-config" in exited.log_tail

        # a health path that answers 404: the health phase, within the health timeout
        start = trio.current_time()
        sick = await runner.deploy(_spec("sick", IMAGE_ONLY_COMPOSE, health_path="/nope"))
        assert (sick.state, sick.phase, sick.exit_code) == ("failed", "health", None), sick
        assert sick.error is not None and "GET /nope" in sick.error and "HTTP 404" in sick.error
        assert trio.current_time() - start < 4.0 + 30

        # a workload that never answers its health check: phase "timeout", health named
        mute = await runner.deploy(_spec("mute", "services:\n  web:\n    image: ee-busybox:local"
                                               "\n    init: true\n    command: [sleep, '600']\n"))
        assert (mute.state, mute.phase) == ("failed", "timeout"), mute
        assert mute.error is not None and mute.error.startswith("health did not finish")

        # a build that outlives its phase timeout: phase "timeout", the phase named
        start = trio.current_time()
        slow = await runner.deploy(_spec("slow", BUILD_COMPOSE, build_context=SLOW_BUILD))
        assert (slow.state, slow.phase) == ("failed", "timeout"), slow
        assert slow.error is not None and slow.error.startswith("build did not finish within 8 s")
        assert trio.current_time() - start < 8.0 + 30

        for name in ("bld", "ext", "sick", "mute", "slow"):
            assert (await runner.undeploy(name)).state == "stopped"
            assert project_containers(runner.project_name(name)) == []


# -- updates in place ----------------------------------------------------------------------

SERVE = "mkdir -p /w; echo ok > /w/health; exec httpd -f -p 8080 -h /w"


def _volume_compose(command: str) -> str:
    return f"""\
services:
  web:
    image: ee-busybox:local
    init: true
    volumes: ["data:/data"]
    command: ["sh", "-c", "{command}; {SERVE}"]
volumes:
  data: {{}}
"""


V1 = _volume_compose("echo from-v1 > /data/note")
V2 = _volume_compose("mkdir -p /w; cp /data/note /w/note")
V3_BROKEN = "services:\n  web:\n    image: ee-busybox:local\n    volumes: [\"data:/data\"]\n" \
    "    command: [\"sh\", \"-c\", \"echo v3-broken; exit 5\"]\nvolumes:\n  data: {}\n"


@needs_docker
async def test_update_in_place_keeps_named_volumes(tmp_path: Path, namespace: str) -> None:  # noqa: F811
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace))
    project = runner.project_name("upd")
    with trio.fail_after(DOCKER_TIMEOUT * 2):
        v1 = await runner.deploy(_spec("upd", V1, env={"MODE": "a"}))
        assert v1.state == "running", v1.error
        [volume] = _volumes(project)
        old_ids = {c.id for c in project_containers(project)}

        recorder = Recorder()
        v2 = await runner.deploy(_spec("upd", V2, version="v2", env={"MODE": "b"}), recorder)
        assert recorder.states == ["starting", "running"], v2.error
        assert (v2.version, v2.compose_hash) == ("v2", spec_hash(_spec("upd", V2,
                                                                       env={"MODE": "b"})))
        assert v2.compose_hash != v1.compose_hash
        assert not old_ids & {c.id for c in project_containers(project)}  # new containers
        host, port = v2.upstream or ("", 0)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            note = await http.get(f"http://{host}:{port}/note")
        assert (note.status_code, note.text) == (200, "from-v1\n")  # v1's data, read by v2
        assert _volumes(project) == [volume]

        # A broken version fails at start; the volume stays for the next one.
        broken = await runner.deploy(_spec("upd", V3_BROKEN, version="v3"))
        assert (broken.state, broken.phase, broken.exit_code) == ("failed", "start", 5)
        assert _volumes(project) == [volume]
        again = await runner.deploy(_spec("upd", V2, version="v2", env={"MODE": "b"}))
        assert again.state == "running", again.error
        host, port = again.upstream or ("", 0)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            assert (await http.get(f"http://{host}:{port}/note")).text == "from-v1\n"

        # undeploy is unchanged: containers and volumes go
        assert (await runner.undeploy("upd")).state == "stopped"
        assert project_containers(project) == [] and _volumes(project) == []


# -- logs ----------------------------------------------------------------------------------

LOGS_COMPOSE = f"""\
services:
  web:
    image: ee-busybox:local
    init: true
    command: ["sh", "-c", "echo web-line-1; {SERVE}"]
  sidecar:
    image: ee-busybox:local
    init: true
    command: ["sh", "-c", "echo side-early; sleep 2; echo side-late; exec sleep 3600"]
"""


class Wall:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@needs_docker
async def test_logs_filters_timestamps_and_retention(tmp_path: Path, namespace: str) -> None:  # noqa: F811
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace))
    wall = Wall()
    runner.retained = RetainedLogs(tmp_path / "data" / "retained-logs", retention_s=600,
                                   wall=wall)
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await runner.deploy(_spec("logs", LOGS_COMPOSE))
        assert status.state == "running", status.error
        while True:  # the sidecar's second line comes about 2 s after its first
            found = await runner.log_lines("logs")
            if [ln.text for ln in found.get("sidecar", [])] == ["side-early", "side-late"]:
                break
            await trio.sleep(0.2)
        assert set(found) == {"web", "sidecar"}
        for lines in found.values():
            for line in lines:
                assert line.at is not None and line.at.endswith("Z"), line
        early, late = found["sidecar"]
        assert early.at is not None and late.at is not None and early.at < late.at

        only = await runner.log_lines("logs", service="sidecar")
        assert set(only) == {"sidecar"}
        since = await runner.log_lines("logs", service="sidecar", since=late.at)
        assert [ln.text for ln in since["sidecar"]] == ["side-late"]
        one = await runner.log_lines("logs", tail=1)
        assert [ln.text for ln in one["sidecar"]] == ["side-late"]
        future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert (await runner.log_lines("logs", since=future)) == {"web": [], "sidecar": []}

        assert (await runner.undeploy("logs")).state == "stopped"
        assert project_containers(runner.project_name("logs")) == []
        # Retained: same answers, from the agent's data dir, 0600.
        kept = await runner.log_lines("logs", service="sidecar")
        assert [(ln.text, ln.at) for ln in kept["sidecar"]] == [
            (early.text, early.at), (late.text, late.at)]
        assert "web-line-1" in (await runner.logs("logs"))["web"]
        [path] = list((tmp_path / "data" / "retained-logs").iterdir())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with pytest.raises(UnknownDeployment):
            await runner.log_lines("other-deployment")
        # The window ends: gone.
        wall.now += 601
        with pytest.raises(UnknownDeployment):
            await runner.log_lines("logs")
        assert list((tmp_path / "data" / "retained-logs").iterdir()) == []


def test_status_wire_carries_the_failure() -> None:
    status = DeploymentStatus(deployment_id="d", state="failed", error="start failed",
                              phase="start", exit_code=7, log_tail=("a", "b"))
    assert status.to_wire() == {"deployment_id": "d", "state": "failed",
                                "error": "start failed", "phase": "start", "exit_code": 7,
                                "log_tail": ["a", "b"]}


# -- through the agent: its config, the session's LogsRequest, /.ee/logs --------------------


def test_agent_config_sets_phase_timeouts_and_retention(tmp_path: Path) -> None:
    config = agent_config(tmp_path / "agent", workload=WorkloadLimits(
        pull_timeout_s=11, build_timeout_s=12, start_timeout_s=13, health_timeout_s=14,
        log_retention_s=15))
    agent = Agent(config)
    settings = agent.runner.settings
    assert (settings.pull_timeout, settings.build_timeout, settings.start_timeout,
            settings.health_timeout) == (11, 12, 13, 14)
    assert agent.runner.retained is not None and agent.runner.retained.retention_s == 15
    assert config_from_dict(config_to_dict(config), source="test") == config
    with pytest.raises(ConfigError):
        config_from_dict({"workload": {"build_timeout_s": 0}}, source="test")
    defaults = WorkloadLimits()
    assert defaults.log_retention_s == 86400 and defaults.health_timeout_s > 0


@needs_docker
async def test_agent_answers_logs_requests_live_and_retained(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    deployment_id = "logs-agent"
    deploy = Deploy(deployment_id=deployment_id, app="acct.app", version="v1",
                    compose=LOGS_COMPOSE, expose_port=8080, health_path="/health")
    with trio.fail_after(DOCKER_TIMEOUT):
        async with running_agent(agent_config(tmp_path / "agent"),
                                 workload_settings=settings_for(namespace)) as agent:
            status = await agent.deploy(deploy)
            assert status.state == "running", status.error
            assert status.compose_hash == spec_hash(deploy)
            while True:
                reply = await agent.answer(LogsRequest(deployment_id=deployment_id,
                                                       service="sidecar"))
                assert isinstance(reply, LogsReply)
                if [ln.text for ln in reply.lines] == ["side-early", "side-late"]:
                    break
                await trio.sleep(0.2)
            assert {ln.service for ln in reply.lines} == {"sidecar"}
            late = reply.lines[-1]
            assert late.at is not None
            async with agent_http(agent, agent.secret) as http:
                r = await http.get("/.ee/logs", params={"service": "sidecar", "since": late.at})
                assert r.status_code == 200, r.text
                assert r.json()["lines"] == [{"service": "sidecar", "at": late.at,
                                              "text": "side-late"}]
                assert r.json()["logs"] == {"sidecar": "side-late\n"}
                r = await http.get("/.ee/logs", params={"since": "2026-02-30T00:00:00Z"})
                assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_query")

            assert (await agent.undeploy(deployment_id)).state == "stopped"
            kept = await agent.answer(LogsRequest(deployment_id=deployment_id, tail=1))
            assert isinstance(kept, LogsReply)
            assert sorted(ln.text for ln in kept.lines) == ["side-late", "web-line-1"]
            other = await agent.answer(LogsRequest(deployment_id="someone-elses"))
            assert isinstance(other, ErrorMessage) and other.code == "unknown_deployment"
            async with agent_http(agent, agent.secret) as http:
                r = await http.get("/.ee/logs", params={"deployment_id": deployment_id})
                assert "web-line-1" in r.json()["logs"]["web"]
            assert project_containers(agent.runner.project_name(deployment_id)) == []
