"""Secrets end to end: a real CP, real agents (sim provider), real Docker.

A container reads its secret at /run/secrets/NAME; a rotation reaches the running
container without a restart; quarantining the agent revokes it; a replica that runs
another compose hash gets nothing; a recorded release replayed to another agent (or to
the same one) is refused; and no file, log line, record or event holds a value.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import docker  # type: ignore[import-untyped]
import httpx
import pytest
import trio

from ee.actors.agent import ReattestDue
from ee.agent.secrets import secrets_base
from ee.agent.server import Agent
from ee.protocol.messages import Attestation, Deploy, SecretAck, SecretRelease

from .agentkit import RunningCp, agent_config, eventually, running_agent, running_cp
from .test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    settings_for,
)

pytestmark = needs_docker

COMPOSE = IMAGE_ONLY_COMPOSE
SECRET = "db_password"


def _value() -> str:
    return "value-" + secrets.token_hex(16)


async def _tenant(env: RunningCp) -> httpx.AsyncClient:
    async with env.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "sec"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{env.cp.http_port}",
                             headers={"Authorization": f"Bearer {key}"}, timeout=30)


async def _prepare(http: httpx.AsyncClient, value: str) -> None:
    r = await http.post("/api/v2/apps", json={"name": "sec"})
    assert r.status_code == 201, r.text
    r = await http.put(f"/api/v2/apps/sec/secrets/{SECRET}", json={"value": value})
    assert r.status_code == 201, r.text
    r = await http.post("/api/v2/apps/sec/versions", json={
        "version": "1", "compose": COMPOSE, "expose_port": 8080, "health_path": "/health",
        "secrets": [{"name": SECRET, "as": "file"}]})
    assert r.status_code == 201, r.text
    # The default release policy: the version's compose hash, verdict pass, UpToDate.


async def _deploy(http: httpx.AsyncClient) -> str:
    r = await http.post("/api/v2/apps/sec/deployments", json={"version": "1", "replicas": 1})
    assert r.status_code == 202, r.text
    return str(r.json()["deployment_id"])


async def _view(http: httpx.AsyncClient, dep_id: str) -> dict[str, Any]:
    r = await http.get(f"/api/v2/deployments/{dep_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def _audit(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await http.get("/api/v2/apps/sec/secret-events")
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def _container(agent: Agent, dep_id: str) -> Any:
    client = docker.from_env()
    try:
        found = client.containers.list(filters={
            "label": f"com.docker.compose.project={agent.runner.project_name(dep_id)}"})
        return found[0] if found else None
    finally:
        client.close()


def _read_secret(agent: Agent, dep_id: str) -> str | None:
    container = _container(agent, dep_id)
    if container is None:
        return None
    code, out = container.exec_run(["cat", f"/run/secrets/{SECRET}"])
    return out.decode() if code == 0 else None


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


@asynccontextmanager
async def _env(tmp_path: Path, namespace: str, count: int  # noqa: F811
               ) -> AsyncIterator[tuple[RunningCp, list[Agent]]]:
    async with running_cp(tmp_path / "cp") as env:
        releaser = env.cp.secret_releaser
        releaser.deps = attrs.evolve(releaser.deps, sweep_interval_s=0.5)
        agents: list[Agent] = []
        try:
            async with (running_agent(agent_config(
                    tmp_path / "a0", env.agent_url, vm_name="sec-a0"),
                    workload_settings=settings_for(namespace)) as a0,
                    running_agent(agent_config(
                        tmp_path / "a1", env.agent_url, vm_name="sec-a1"),
                        workload_settings=settings_for(namespace)) as a1):
                agents = [a0, a1][:count]
                if count == 1:
                    a1.request_stop()
                await eventually(lambda: all(a.link is not None for a in agents), 30)
                yield env, agents
        finally:
            for i in range(2):
                shutil.rmtree(secrets_base(tmp_path / f"a{i}"), ignore_errors=True)


async def _undeploy_all(http: httpx.AsyncClient, agents: list[Agent], dep_id: str) -> None:
    r = await http.delete(f"/api/v2/deployments/{dep_id}")
    assert r.status_code == 202, r.text
    await eventually(lambda: all(a.runner.status(dep_id) is None for a in agents),
                     DOCKER_TIMEOUT)


async def test_release_rotation_quarantine_and_no_value_anywhere(
        tmp_path: Path, namespace: str,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    first, second = _value(), _value()
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 1) as (env, (agent,)), await _tenant(env) as http:
            await _prepare(http, first)
            dep_id = await _deploy(http)
            await eventually(lambda: _read_secret(agent, dep_id) == first, DOCKER_TIMEOUT)
            code, _ = _container(agent, dep_id).exec_run(
                ["sh", "-c", f"echo x > /run/secrets/{SECRET}; echo x > /run/secrets/new"])
            assert code != 0 and _read_secret(agent, dep_id) == first  # mounted read-only
            # Rotation: the running container sees the new value, not restarted.
            before = _container(agent, dep_id)
            r = await http.put(f"/api/v2/apps/sec/secrets/{SECRET}", json={"value": second})
            assert r.json()["version"] == 2
            await eventually(lambda: _read_secret(agent, dep_id) == second, 30)
            after = _container(agent, dep_id)
            assert (after.id, after.attrs["State"]["StartedAt"]) == (
                before.id, before.attrs["State"]["StartedAt"])
            released = [e for e in await _audit(http) if e["action"] == "released"]
            assert [(e["version"], e["agent_id"], e["deployment_id"]) for e in released] == [
                (2, agent.agent_id, dep_id), (1, agent.agent_id, dep_id)]
            # Quarantine: the agent's next re-attestation fails, its secret is revoked.
            honest = agent.attestation

            async def lying(report_data: bytes) -> Attestation:
                return await honest(bytes(64))  # a quote that binds nothing it was asked

            agent.attestation = lying  # type: ignore[method-assign]
            env.cp.registry.ref(f"agent/{agent.agent_id}").try_tell(ReattestDue())
            await eventually(lambda: _read_secret(agent, dep_id) is None, 30)
            assert _container(agent, dep_id) is not None  # the workload runs on, without it
            revoked = [e for e in await _audit(http) if e["action"] == "revoked"]
            assert revoked and revoked[0]["code"] == "AGENT_QUARANTINED"
            assert revoked[0]["version"] == 2 and revoked[0]["agent_id"] == agent.agent_id
            assert any(e.kind == "secret.revoked" for e in env.cp.events.recent)
            shm = secrets_base(tmp_path / "a0")
            assert _files_containing(shm, [second.encode()]) == []
            await _undeploy_all(http, [agent], dep_id)
            assert not shm.exists()  # the deployment's directory went, and the root
        # Nothing anywhere holds a value: data dirs (records, manifests, workloads),
        # the agent's tmpfs, the events, the logs.
        needles = [v.encode() for v in (first, second)]
        needles += [v.encode().hex().encode() for v in (first, second)]
        assert _files_containing(tmp_path, needles) == []
        events = " ".join(str(e.to_dict()) for e in env.cp.events.recent)
        assert first not in events and second not in events
        logs = caplog.text
        assert first not in logs and second not in logs


async def test_a_tampered_replica_gets_nothing(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    value = _value()
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 1) as (env, (agent,)), await _tenant(env) as http:
            applied: list[SecretRelease] = []
            apply = agent.secret_store.apply

            def spy(msg: SecretRelease, runs: bool) -> SecretAck:
                applied.append(msg)
                return apply(msg, runs)

            agent.secret_store.apply = spy  # type: ignore[method-assign]
            start = agent.start_deploy

            def tamper(msg: Deploy) -> None:  # runs other code than the version's
                start(attrs.evolve(msg, compose=msg.compose.replace("echo ok", "echo ok2")))

            agent.start_deploy = tamper  # type: ignore[method-assign]
            await _prepare(http, value)
            dep_id = await _deploy(http)

            async def failed_out() -> bool:  # the CP failed the replica (wrong hash)
                return bool((await _view(http, dep_id))["failures"] >= 1)

            await eventually(failed_out, DOCKER_TIMEOUT)
            passes = env.cp.secret_releaser.passes
            await eventually(lambda: env.cp.secret_releaser.passes >= passes + 2, 30)
            assert applied == []
            assert not [e for e in await _audit(http) if e["action"] == "released"]
            await _undeploy_all(http, [agent], dep_id)


async def test_a_recorded_release_is_refused_by_another_agent_and_on_replay(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    value = _value()
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 2) as (env, agents), await _tenant(env) as http:
            recorded: list[SecretRelease] = []
            for agent in agents:
                apply = agent.secret_store.apply

                def spy(msg: SecretRelease, runs: bool, apply: Any = apply) -> SecretAck:
                    recorded.append(msg)
                    return apply(msg, runs)

                agent.secret_store.apply = spy  # type: ignore[method-assign]
            await _prepare(http, value)
            dep_id = await _deploy(http)
            await eventually(lambda: bool(recorded), DOCKER_TIMEOUT)
            release = recorded[0]
            holder = next(a for a in agents if a.secret_store.public_key == release.recipient)
            other = next(a for a in agents if a is not holder)
            assert _read_secret(holder, dep_id) == value
            # The other agent: not its key (even were it running the deployment).
            ack = other.secret_store.apply(release, True)
            assert (ack.state, ack.code) == ("refused", "SECRET_NOT_FOR_ME")
            # Aimed at the other agent's key, the sealed value still does not open there.
            forged = attrs.evolve(release, recipient=other.secret_store.public_key,
                                  nonce=secrets.token_bytes(32))
            ack = other.secret_store.apply(forged, True)
            assert (ack.state, ack.code) == ("refused", "SECRET_UNSEALABLE")
            # The same agent, again: a nonce it has seen.
            ack = holder.secret_store.apply(release, True)
            assert (ack.state, ack.code) == ("refused", "SECRET_REPLAYED")
            # And for a deployment it does not run, through the agent's own check.
            fresh = attrs.evolve(release, nonce=secrets.token_bytes(32))
            ack = other.secret_store.apply(attrs.evolve(fresh, recipient=other.secret_store
                                                        .public_key), False)
            assert ack.code == "SECRET_UNKNOWN_DEPLOYMENT"
            assert _files_containing(secrets_base(other.data_dir), [value.encode()]) == []
            await _undeploy_all(http, agents, dep_id)


async def test_a_key_not_vouched_for_by_the_attested_session_key_gets_nothing(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    value = _value()
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 1) as (env, (agent,)), await _tenant(env) as http:
            stranger = Ed25519PrivateKey.generate()
            prove = agent.secret_store.prove
            agent.secret_store.prove = (  # type: ignore[method-assign]
                lambda nonce, _key: prove(nonce, stranger))
            await _prepare(http, value)
            dep_id = await _deploy(http)

            async def refused() -> bool:
                return any(e["code"] == "KEY_PROOF_INVALID" for e in await _audit(http))

            await eventually(refused, DOCKER_TIMEOUT)
            assert _read_secret(agent, dep_id) is None
            assert not [e for e in await _audit(http) if e["action"] == "released"]
            await _undeploy_all(http, [agent], dep_id)


async def _app(http: httpx.AsyncClient, value: str, compose: str, secret: dict[str, Any],
               policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """App "sec" with the secret set to *value*, an optional release policy, and version
    "1" of *compose* receiving the secret as *secret* says; the version's view."""
    assert (await http.post("/api/v2/apps", json={"name": "sec"})).status_code == 201
    r = await http.put(f"/api/v2/apps/sec/secrets/{SECRET}", json={"value": value})
    assert r.status_code == 201, r.text
    if policy is not None:
        r = await http.put("/api/v2/apps/sec/secret-policy", json=policy)
        assert r.status_code == 200, r.text
    r = await http.post("/api/v2/apps/sec/versions", json={
        "version": "1", "compose": compose, "expose_port": 8080, "health_path": "/health",
        "secrets": [{"name": SECRET, **secret}]})
    assert r.status_code == 201, r.text
    return dict(r.json())


TRAP_COMPOSE = """\
services:
  web:
    image: ee-busybox:local
    init: true
    command:
      - sh
      - -c
      - >-
        mkdir -p /w && echo ok > /w/health && httpd -p 8080 -h /w &&
        trap 'cat /run/secrets/db_password > /w/hup' HUP &&
        while true; do sleep 1; done
"""


@pytest.mark.parametrize("on_rotate", ["signal", "restart"])
async def test_rotation_signals_or_restarts_when_the_version_asks(
        tmp_path: Path, namespace: str, on_rotate: str) -> None:  # noqa: F811
    """``on_rotate: signal`` sends the version's signal to the running services after the
    new file is in place (the container's trap reads the new value, same container);
    ``restart`` restarts them (a new start, the new value at /run/secrets)."""
    first, second = _value(), _value()
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 1) as (env, (agent,)), await _tenant(env) as http:
            rotate = {"on_rotate": "signal", "signal": "SIGHUP"} if on_rotate == "signal" \
                else {"on_rotate": "restart"}
            await _app(http, first, TRAP_COMPOSE, {"as": "file", **rotate})
            dep_id = await _deploy(http)
            await eventually(lambda: _read_secret(agent, dep_id) == first, DOCKER_TIMEOUT)
            before = _container(agent, dep_id)
            r = await http.put(f"/api/v2/apps/sec/secrets/{SECRET}", json={"value": second})
            assert r.json()["version"] == 2
            await eventually(lambda: _read_secret(agent, dep_id) == second, 30)
            if on_rotate == "signal":
                def trapped() -> bool:
                    code, out = _container(agent, dep_id).exec_run(["cat", "/w/hup"])
                    return code == 0 and out.decode() == second
                await eventually(trapped, 30)
                after = _container(agent, dep_id)
                assert after.attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
            else:
                def restarted() -> Any:
                    now = _container(agent, dep_id)  # None while it is down
                    return now is not None and now.attrs["State"]["StartedAt"] != before.attrs[
                        "State"]["StartedAt"] and now
                now = await eventually(restarted, 60)
                assert now.id == before.id  # restarted, not recreated
            await _undeploy_all(http, [agent], dep_id)


def test_rotation_settings_are_checked_at_upload() -> None:
    from ee.cp.errors import ApiError
    from ee.cp.tenants import _version_secrets

    ok = _version_secrets([{"name": "a", "as": "file", "on_rotate": "signal",
                            "signal": "SIGUSR1"}, {"name": "b", "on_rotate": "restart"}])
    assert [s["on_rotate"] for s in ok] == ["signal", "restart"]
    for bad in ({"name": "a", "on_rotate": "signal"},  # no signal
                {"name": "a", "on_rotate": "signal", "signal": "SIGKILL"},
                {"name": "a", "on_rotate": "restart", "signal": "SIGHUP"},
                {"name": "a", "on_rotate": "reboot"}):
        with pytest.raises(ApiError) as refused:
            _version_secrets([bad])
        assert refused.value.status == 400


ENV_COMPOSE = """\
services:
  web:
    image: ee-busybox:local
    init: true
    command:
      - sh
      - -c
      - >-
        mkdir -p /w && echo ok > /w/health && env | grep ^DB_PASSWORD= > /w/env &&
        exec httpd -f -p 8080 -h /w
"""


def _served_env(agent: Agent, dep_id: str) -> str | None:
    container = _container(agent, dep_id)
    if container is None:
        return None
    try:
        code, out = container.exec_run(["cat", "/w/env"])
    except docker.errors.APIError:  # stopped or removed meanwhile (being recreated)
        return None
    return out.decode().removesuffix("\n").removeprefix("DB_PASSWORD=") if code == 0 else None


async def test_an_env_secret_is_in_the_environment_from_the_start_and_recreated_on_rotation(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    """``"as": "env"``: the agent reports ``starting`` with the compose hash, waits for
    the release, then starts the services with the variable set (the env file is on
    tmpfs, nowhere in the agent's data dir); a rotation recreates them with the new
    value. The value reaches the container exactly: nothing in it is expanded from the
    Compose CLI's environment, cut at `` #`` or unquoted."""
    first = "pw-${HOME}-$PATH 'q\" #tail " + _value()
    second = _value()
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 1) as (env, (agent,)), await _tenant(env) as http:
            view = await _app(http, first, ENV_COMPOSE, {"as": "env", "env": "DB_PASSWORD"})
            assert view["secrets"] == [{"name": SECRET, "as": "env", "env": "DB_PASSWORD",
                                            "on_rotate": "restart"}]
            dep_id = await _deploy(http)
            await eventually(lambda: _served_env(agent, dep_id) == first, DOCKER_TIMEOUT)
            before = _container(agent, dep_id)
            r = await http.put(f"/api/v2/apps/sec/secrets/{SECRET}", json={"value": second})
            assert r.json()["version"] == 2
            await eventually(lambda: _served_env(agent, dep_id) == second, 60)
            assert _container(agent, dep_id).id != before.id  # recreated: a new environment
            assert _files_containing(tmp_path / "a0", [first.encode(), second.encode()]) == []
            assert (await _view(http, dep_id))["state"] == "running"
            await _undeploy_all(http, [agent], dep_id)
            assert not agent.secret_store.env_path(dep_id).exists()


async def test_an_env_secret_never_released_fails_the_deployment_with_the_reason(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    """A release policy that refuses the replica: the deployment does not start
    without its environment; it fails after the wait, saying why."""
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with _env(tmp_path, namespace, 1) as (env, (agent,)), await _tenant(env) as http:
            agent.runner.settings = attrs.evolve(agent.runner.settings, secret_wait_timeout=2.0)
            await _app(http, _value(), ENV_COMPOSE, {"as": "env", "env": "DB_PASSWORD"},
                       policy={"datacenters": ["nowhere:x"]})
            dep_id = await _deploy(http)
            failed = await eventually(lambda: [
                e for e in env.cp.events.recent if e.kind == "replica.failed"
                and e.subject == dep_id], DOCKER_TIMEOUT)
            assert "was not released within 2 s" in failed[0].data["error"], failed
            assert _container(agent, dep_id) is None  # nothing started without it
            await _undeploy_all(http, [agent], dep_id)
