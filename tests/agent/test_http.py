"""The agent's HTTP port: own routes, secret, attested health, and the workload proxy.

The workload tests deploy through the agent session from ``StandInCp`` (agentkit), a
stand-in for the CP's deploy path, against the real Docker daemon.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import trio

from ee.agent.server import ChallengeBook
from ee.protocol.messages import (
    Deploy,
    DeployStatus,
    Message,
    Snapshot,
    SnapshotRequest,
    Undeploy,
)
from ee.protocol.reportdata import health_report_data

from .agentkit import (
    StandInCp,
    agent_config,
    agent_http,
    eventually,
    quote_report_data,
    running_agent,
)
from .test_workload import (
    APP_COMPOSE,
    APP_CONTEXT,
    DOCKER_TIMEOUT,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    project_containers,
    settings_for,
    spec_hash,
)

SECRET_ROUTES = ("/.ee/state-snapshot", "/.ee/logs", "/.ee/stats", "/.ee/control/challenge")


def _error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    code: str = body["error"]["code"]
    return code


async def test_health_and_secret_routes_without_workload(tmp_path: Path) -> None:
    config = agent_config(tmp_path / "agent")  # no CP: HTTP only
    with trio.fail_after(30):
        async with running_agent(config) as agent, agent_http(agent) as http:
            r = await http.get("/.ee/health")
            assert r.status_code == 200
            # The public view: no names, no ids (see test_proxy_attacks for a tenant's).
            assert r.json() == {"status": "healthy", "compose_hash": None, "deployments": []}
            r = await http.get("/.ee/health", headers={"Authorization": f"Bearer {agent.secret}"})
            body = r.json()
            assert body["status"] == "healthy" and body["vm_name"] == config.vm_name
            assert body["agent_id"] is None and body["deployments"] == []
            assert body["compose_hash"] is None and body["cp_connected"] is False
            assert body["detail"] == "no workload deployed" and body["tunnel"] is None

            r = await http.get("/.ee/health", params={"attest": "true", "nonce": "zz"})
            assert r.status_code == 400 and _error_code(r) == "bad_nonce"
            r = await http.get("/.ee/health", params={"attest": "true", "nonce": "ab" * 65})
            assert r.status_code == 400 and _error_code(r) == "bad_nonce"
            r = await http.get("/.ee/health", params={"attest": "true", "nonce": "ab" * 16})
            assert r.status_code == 409 and _error_code(r) == "no_workload"

            secret = (tmp_path / "agent" / "control.secret").read_text().strip()
            assert secret == agent.secret
            assert (tmp_path / "agent" / "control.secret").stat().st_mode & 0o077 == 0
            for path in SECRET_ROUTES:
                for headers in ({}, {"Authorization": "Bearer wrong"},
                                {"Authorization": f"Basic {secret}"},
                                {"Authorization": f"Bearer {secret}x"}):
                    r = await http.get(path, headers=headers)
                    assert r.status_code == 401, (path, headers)
                    assert _error_code(r) == "unauthenticated"
                r = await http.get(path, headers={"Authorization": f"Bearer {secret}"})
                assert r.status_code == 200, (path, r.text)

            auth = {"Authorization": f"Bearer {secret}"}
            r = await http.get("/.ee/control/challenge", headers=auth)
            assert len(bytes.fromhex(r.json()["nonce"])) == 32 and r.json()["ttl_seconds"] > 0
            r = await http.get("/.ee/state-snapshot", headers=auth)
            assert r.json()["deployments"] == [] and r.json()["node"]["vcpus"] >= 1
            r = await http.get("/.ee/logs", headers=auth, params={"deployment_id": "nope"})
            assert r.status_code == 404 and _error_code(r) == "unknown_deployment"
            r = await http.get("/.ee/logs", headers=auth, params={"tail": "lots"})
            assert r.status_code == 400 and _error_code(r) == "bad_tail"
            r = await http.get("/.ee/stats", headers=auth)
            assert r.json()["deployments"] == {} and r.json()["node"]["memory_total_mb"] > 0

            for method, path in (("GET", "/"), ("GET", "/some/app/path?q=1"),
                                 ("POST", "/.ee-not-ours"), ("GET", "/api/health"),
                                 ("DELETE", "/x")):
                r = await http.request(method, path)
                assert r.status_code == 502, (method, path)
                assert _error_code(r) == "no_workload"


def _deploy(deployment_id: str, **changes: Any) -> Deploy:
    values: dict[str, Any] = {
        "deployment_id": deployment_id,
        "app": "echo",
        "version": "1",
        "compose": APP_COMPOSE,
        "build_context": APP_CONTEXT,
        "env": {"GREETING": "hi"},
        "expose_port": 8080,
        "health_path": "/health",
    }
    values.update(changes)
    return Deploy(**values)


def _status_of(deployment_id: str, *states: str) -> Any:
    def match(_frame: object, msg: Message) -> bool:
        return (isinstance(msg, DeployStatus) and msg.deployment_id == deployment_id
                and msg.state in states)
    return match


@needs_docker
async def test_deploy_proxy_attest_adopt_undeploy(tmp_path: Path, namespace: str) -> None:  # noqa: F811
    deployment_id = f"dep-{secrets.token_hex(3)}"
    settings = settings_for(namespace)
    with trio.fail_after(DOCKER_TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp().run)
            config = agent_config(tmp_path / "agent", peer.url)
            async with running_agent(config, workload_settings=settings) as agent:
                await peer.send(_deploy(deployment_id))
                # The reader answers requests while the deploy runs in its own task.
                frame_id = await peer.send(SnapshotRequest(), with_id=True)
                _, during = await peer.wait_for(lambda f, m: f.re == frame_id, timeout=10)
                assert isinstance(during, Snapshot)
                assert not [m for _, m in peer.frames
                            if isinstance(m, DeployStatus) and m.state == "running"]
                _, final = await peer.wait_for(_status_of(deployment_id, "running", "failed"),
                                               timeout=DOCKER_TIMEOUT)
                assert isinstance(final, DeployStatus)
                assert final.state == "running", final.error
                states = [m.state for _, m in peer.frames
                          if isinstance(m, DeployStatus) and m.deployment_id == deployment_id]
                assert states == ["starting", "running"]
                expected_hash = spec_hash(_deploy(deployment_id))  # the workload hash
                assert final.compose_hash == expected_hash
                assert final.image_digests and set(final.image_digests) == {"web", "sidecar"}

                async with agent_http(agent) as http:
                    r = await http.get("/health")
                    assert (r.status_code, r.text) == (200, "ok\n")
                    r = await http.post("/cgi-bin/echo?x=1", content=b"hello body")
                    assert (r.status_code, r.text) == (200, "POST:hi:hello body")
                    big = secrets.token_hex(256 * 1024).encode()  # 512 KiB each way
                    r = await http.post("/cgi-bin/echo", content=big)
                    assert r.status_code == 200 and r.content == b"POST:hi:" + big
                    r = await http.get("/no-such-file")
                    assert r.status_code == 404  # the workload's own answer, passed through

                    nonce = secrets.token_bytes(32)
                    r = await http.get("/.ee/health",
                                       params={"attest": "true", "nonce": nonce.hex()})
                    assert r.status_code == 200, r.text
                    health = r.json()
                    assert health["status"] == "healthy"
                    assert health["compose_hash"] == expected_hash
                    assert health["deployments"] == [{"state": "running",
                                                      "compose_hash": expected_hash}]
                    assert "echo" not in r.text and deployment_id not in r.text
                    quote = base64.b64decode(health["attestation"]["quote"])
                    digest = bytes.fromhex(expected_hash.removeprefix("sha256:"))
                    assert quote_report_data(quote) == health_report_data(nonce, digest)

                    auth = {"Authorization": f"Bearer {agent.secret}"}
                    operator = (await http.get("/.ee/health", headers=auth)).json()
                    [shown] = operator["deployments"]
                    assert (shown["deployment_id"], shown["state"]) == (deployment_id, "running")
                    assert (shown["app"], shown["compose_hash"]) == ("echo", expected_hash)
                    assert operator["agent_id"] == f"ag-standin-{config.vm_name}"
                    r = await http.get("/.ee/logs", headers=auth)
                    assert r.json()["deployment_id"] == deployment_id
                    assert "sidecar-up" in r.json()["logs"]["sidecar"]
                    r = await http.get("/.ee/stats", headers=auth)
                    assert set(r.json()["deployments"][deployment_id]) == {"web", "sidecar"}
                    r = await http.get("/.ee/state-snapshot", headers=auth)
                    [snap] = r.json()["deployments"]
                    assert snap["state"] == "running" and snap["compose_hash"] == expected_hash

                project = agent.runner.project_name(deployment_id)
                before = {c.id: c.attrs["State"]["StartedAt"] for c in project_containers(project)}
                assert len(before) == 2

            # The agent stopped; its workload did not. A new agent process adopts it.
            assert {c.id for c in project_containers(project)} == set(before)
            async with running_agent(config, workload_settings=settings) as agent2:
                status = agent2.runner.status(deployment_id)
                assert status is not None and status.state == "running"
                await eventually(lambda: len(peer.registers) == 2)
                [reported] = peer.registers[1].snapshot.deployments
                assert (reported.deployment_id, reported.state) == (deployment_id, "running")
                assert reported.compose_hash == expected_hash
                after = {c.id: c.attrs["State"]["StartedAt"] for c in project_containers(project)}
                assert after == before  # same containers, not restarted
                async with agent_http(agent2) as http:
                    r = await http.post("/cgi-bin/echo", content=b"again")
                    assert r.text == "POST:hi:again"

                await peer.send(Undeploy(deployment_id=deployment_id))
                _, stopped = await peer.wait_for(_status_of(deployment_id, "stopped", "failed"))
                assert isinstance(stopped, DeployStatus) and stopped.state == "stopped"
                assert project_containers(project) == []
                async with agent_http(agent2) as http:
                    r = await http.get("/health")
                    assert r.status_code == 502 and _error_code(r) == "no_workload"
            nursery.cancel_scope.cancel()


@needs_docker
async def test_proxy_reports_a_dead_workload(tmp_path: Path, namespace: str) -> None:  # noqa: F811
    deployment_id = f"dead-{secrets.token_hex(3)}"
    with trio.fail_after(DOCKER_TIMEOUT):
        config = agent_config(tmp_path / "agent")
        async with running_agent(config, workload_settings=settings_for(namespace)) as agent:
            status = await agent.deploy(_deploy(deployment_id))
            assert status.state == "running", status.error
            project = agent.runner.project_name(deployment_id)
            for container in project_containers(project):
                if container.labels["com.docker.compose.service"] == "web":
                    container.kill()
            async with agent_http(agent) as http:
                r = await http.get("/health")
                assert r.status_code == 502
                assert _error_code(r) in ("workload_unreachable", "no_workload")
                await eventually(lambda: agent.health().status == "unhealthy")
                r = await http.get("/health")
                assert r.status_code == 502 and _error_code(r) == "no_workload"
                assert "failed" in r.json()["error"]["message"]
            assert (await agent.undeploy(deployment_id)).state == "stopped"


async def test_required_envelope_refuses_deploy_and_undeploy(tmp_path: Path) -> None:
    """A CP that proves no write key (no ``cp_proof``) gets every write refused, with a
    reason it sees; the signed path is covered in test_cptrust."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp(prove=False).run)
            config = agent_config(tmp_path / "agent", peer.url, cp_envelope="required")
            async with running_agent(config) as agent:
                await eventually(lambda: peer.registers)
                assert peer.registers[0].url == f"http://127.0.0.1:{agent.http_port}"
                await peer.send(_deploy("env-1"))
                _, refused = await peer.wait_for(_status_of("env-1", "failed"))
                assert isinstance(refused, DeployStatus)
                assert refused.error is not None
                assert refused.error.startswith("ENVELOPE_MISSING: deploy refused"), refused.error
                assert agent.runner.status("env-1") is None  # nothing was started
                frame_id = await peer.send(Undeploy(deployment_id="env-1"), with_id=True)
                _, error = await peer.wait_for(
                    lambda f, m: m.TYPE == "error" and f.re == frame_id)
                assert str(getattr(error, "message", "")).startswith("ENVELOPE_MISSING: undeploy")
            nursery.cancel_scope.cancel()


def test_control_challenges_are_single_use_with_a_ttl() -> None:
    book = ChallengeBook(ttl_s=10.0, limit=3)
    nonce, ttl = book.issue(now=0.0)
    assert ttl == 10.0 and len(nonce) == 32
    assert book.consume(nonce, now=5.0) and not book.consume(nonce, now=5.0)
    late, _ = book.issue(now=0.0)
    assert not book.consume(late, now=10.0)
    first, _ = book.issue(now=0.0)
    for _ in range(3):
        book.issue(now=0.0)
    assert not book.consume(first, now=1.0)  # the oldest made room
