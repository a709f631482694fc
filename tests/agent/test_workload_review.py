"""Attacks on the agent's deploy path found in review: secret and env values echoed by
a failing workload must not reach ``error``/``log_tail`` (they go to the CP, its admin
event stream and tenant views), and a deploy naming another app under a running
deployment id must not inherit the old app's named volumes.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx
import trio

from ee.agent.failures import MASK, mask_report, mask_text, mask_values, tail_lines
from ee.agent.logstore import RetainedLogs
from ee.agent.workload import ComposeRunner

from .test_workload import (
    DOCKER_TIMEOUT,
    Recorder,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    project_containers,
    settings_for,
)
from .test_workload_tenant import V1, V2, _spec, _volumes

# -- masking (pure) ------------------------------------------------------------------------


def test_mask_values_hides_whole_values_lines_and_cut_ends() -> None:
    pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END KEY-----"
    values = mask_values(["s3cr3t-token-value", pem, "abc"], ["postgres://u:pw@db/x", "1"])
    assert "abc" not in values and "1" not in values  # too short to mask usefully
    text = "login with s3cr3t-token-value to postgres://u:pw@db/x ok 1"
    assert mask_text(text, values) == f"login with {MASK} to {MASK} ok 1"
    # a multi-line secret printed by `cat`: each line goes on its own
    assert mask_text("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", values) == MASK
    # a long line cut in the middle by tail_lines: both halves of the value go
    long_secret = "Z" * 100 + secrets.token_hex(300)
    [cut] = tail_lines("x" * 100 + long_secret + "y" * 400)
    assert "…" in cut
    masked = mask_text(cut, mask_values([long_secret], []))
    assert long_secret[:20] not in masked and long_secret[-20:] not in masked, masked
    # the error line cut at 300 characters: the value's prefix at the end goes
    error, tail = mask_report("failed: " + long_secret[:50], (), mask_values([long_secret], []))
    assert error == f"failed: {MASK}" and tail == ()


# -- against Docker ------------------------------------------------------------------------

LEAKY = """\
services:
  web:
    image: ee-busybox:local
    environment: ["TOKEN=${TOKEN}"]
    command: ["sh", "-c", "cat /run/secrets/db; echo; echo token is $$TOKEN; exit 3"]
"""


@needs_docker
async def test_failure_report_masks_secret_and_env_values(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    secret_value = "db-password-" + secrets.token_hex(8)
    env_value = "tok-" + secrets.token_hex(8)
    secrets_root = tmp_path / "secrets"

    def secrets_dir(deployment_id: str) -> Path:
        path = secrets_root / deployment_id
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
        return path

    secrets_dir("leak").joinpath("db").write_text(secret_value + "\n")
    secrets_dir("leak").joinpath("db").chmod(0o444)
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace, health_timeout=5.0),
                           secrets_dir=secrets_dir)
    try:
        with trio.fail_after(DOCKER_TIMEOUT):
            recorder = Recorder()
            failed = await runner.deploy(_spec("leak", LEAKY, env={"TOKEN": env_value}),
                                         recorder)
            assert (failed.state, failed.phase, failed.exit_code) == ("failed", "start", 3), \
                failed
            reported = "\n".join([*(s.error or "" for s in recorder.seen),
                                  *(line for s in recorder.seen for line in s.log_tail),
                                  repr(runner.deployments())])
            assert secret_value not in reported and env_value not in reported, reported
            assert f"token is {MASK}" in failed.log_tail, failed.log_tail
            assert MASK in failed.log_tail, failed.log_tail  # the secret file's line
    finally:
        with trio.fail_after(DOCKER_TIMEOUT):
            assert (await runner.undeploy("leak")).state == "stopped"


CHATTY = """\
services:
  web:
    image: ee-busybox:local
    init: true
    environment: ["TOKEN=${TOKEN}"]
    command: ["sh", "-c", "cat /run/secrets/db; echo token is $$TOKEN; {SERVE}"]
""".replace("{SERVE}", "mkdir -p /w; echo ok > /w/health; exec httpd -f -p 8080 -h /w")


@needs_docker
async def test_logs_live_and_retained_mask_secret_and_env_values(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    secret_value = "db-password-" + secrets.token_hex(8)
    env_value = "tok-" + secrets.token_hex(8)
    directory = tmp_path / "secrets" / "chat"
    directory.mkdir(parents=True, mode=0o755)
    (directory / "db").write_text(secret_value + "\n")
    (directory / "db").chmod(0o444)
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace),
                           secrets_dir=lambda _: directory)
    runner.retained = RetainedLogs(tmp_path / "retained", retention_s=3600)
    try:
        with trio.fail_after(DOCKER_TIMEOUT):
            running = await runner.deploy(_spec("chat", CHATTY, env={"TOKEN": env_value}))
            assert running.state == "running", running.error
            while True:  # the lines are printed before httpd starts: there once healthy
                live = [ln.text for ln in (await runner.log_lines("chat"))["web"]]
                if any("token is" in text for text in live):
                    break
                await trio.sleep(0.2)
            assert f"token is {MASK}" in live and MASK in live, live
            assert not any(secret_value in t or env_value in t for t in live), live
            # An agent restart: the new runner adopts the deployment and still masks
            # the env value (the secret's comes from the secrets directory again).
            runner = ComposeRunner(tmp_path / "data", settings_for(namespace),
                                   secrets_dir=lambda _: directory)
            runner.retained = RetainedLogs(tmp_path / "retained", retention_s=3600)
            [adopted] = await runner.adopt()
            assert adopted.state == "running", adopted.error
            live = [ln.text for ln in (await runner.log_lines("chat"))["web"]]
            assert f"token is {MASK}" in live, live
            assert not any(secret_value in t or env_value in t for t in live), live
            assert (await runner.undeploy("chat")).state == "stopped"
            kept = [ln.text for ln in (await runner.log_lines("chat"))["web"]]
            assert f"token is {MASK}" in kept, kept
            assert not any(secret_value in t or env_value in t for t in kept), kept
            raw = "".join(p.read_text() for p in (tmp_path / "retained").glob("*.json"))
            assert secret_value not in raw and env_value not in raw
    finally:
        with trio.fail_after(DOCKER_TIMEOUT):
            await runner.undeploy("chat")


@needs_docker
async def test_another_app_under_the_same_id_gets_no_old_volumes(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace))
    project = runner.project_name("same")
    try:
        with trio.fail_after(DOCKER_TIMEOUT * 2):
            first = await runner.deploy(_spec("same", V1))
            assert first.state == "running", first.error
            # v2 of *another* app, same deployment id (a CP bug, or one replaying ids)
            other = await runner.deploy(_spec("same", V2, app="acct.other", version="v2"))
            assert other.state == "running", other.error
            host, port = other.upstream or ("", 0)
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                note = await http.get(f"http://{host}:{port}/note")
            assert note.status_code == 404, note.text  # acct.app's data is not there
            assert len(_volumes(project)) == 1
    finally:
        with trio.fail_after(DOCKER_TIMEOUT):
            assert (await runner.undeploy("same")).state == "stopped"
        assert project_containers(project) == [] and _volumes(project) == []


def test_env_secrets_must_be_named_in_the_hashed_secret_names() -> None:
    import pytest

    with pytest.raises(ValueError, match="not in secret_names"):
        _spec("x", "services: {}\n", secret_env={"DB_PASSWORD": "db"}, secret_names=())
    with pytest.raises(ValueError, match="not in secret_names"):
        _spec("x", "services: {}\n", secret_env={"A": "db", "B": "api"},
              secret_names=("db",))
    ok = _spec("x", "services: {}\n", secret_env={"A": "db"}, secret_names=("db", "tls"))
    assert dict(ok.secret_env) == {"A": "db"}


LOUD = """\
services:
  web:
    image: ee-busybox:local
    init: true
    command: ["sh", "-c", "for i in $$(seq 300); do echo line-$$i-{PAD}; done; {SERVE}"]
""".replace("{PAD}", "x" * 100).replace(
    "{SERVE}", "mkdir -p /w; echo ok > /w/health; exec httpd -f -p 8080 -h /w")


@needs_docker
async def test_a_log_read_holds_a_bounded_number_of_bytes(
        tmp_path: Path, namespace: str, monkeypatch: Any) -> None:  # noqa: F811
    import ee.agent.workload as workload

    monkeypatch.setattr(workload, "MAX_LOG_READ_BYTES", 4096)
    runner = ComposeRunner(tmp_path / "data", settings_for(namespace))
    try:
        with trio.fail_after(DOCKER_TIMEOUT):
            running = await runner.deploy(_spec("loud", LOUD))
            assert running.state == "running", running.error
            lines = (await runner.log_lines("loud", tail=10_000))["web"]
            assert lines and lines[-1].text.startswith("line-300-"), lines[-1:]
            assert sum(len(ln.text) + 32 for ln in lines) <= 4096 + 200, len(lines)
            assert all(ln.text.startswith("line-") and ln.at for ln in lines)  # whole lines
    finally:
        with trio.fail_after(DOCKER_TIMEOUT):
            await runner.undeploy("loud")


def test_a_masked_report_still_fits_deploy_status() -> None:
    from ee.agent.workload import DeploymentStatus
    from ee.protocol.messages import DeployStatus

    values = mask_values(["abcd"], [])  # a 4-character secret, masked by 8 characters
    tail = tail_lines("\n".join(["abcd " * 100] * 20))
    status = DeploymentStatus(deployment_id="d", state="failed", error="x",
                              log_tail=mask_report("x", tail, values)[1])
    assert tuple(DeployStatus(**status.to_wire()).log_tail) == status.log_tail
    assert "abcd" not in "".join(status.log_tail)


@needs_docker
async def test_a_redeploy_queued_behind_an_undeploy_keeps_its_secrets(
        tmp_path: Path, namespace: str, monkeypatch: Any) -> None:  # noqa: F811
    """Scale down then up on one agent: ``undeploy`` then ``deploy`` of one id. The
    undeploy's clean-up (wiping the id's released secrets) must happen before the new
    deploy begins, never while it runs (it would wipe what the CP releases to it)."""
    from trio.testing import wait_all_tasks_blocked

    from ee.agent.server import Agent
    from ee.protocol.messages import Deploy

    from .agentkit import agent_config, running_agent
    from .test_workload import IMAGE_ONLY_COMPOSE

    runner = ComposeRunner(tmp_path / "agent", settings_for(namespace))
    msg = Deploy(deployment_id="rq", app="acct.app", version="v1",
                 compose=IMAGE_ONLY_COMPOSE, expose_port=8080, health_path="/health")
    with trio.fail_after(DOCKER_TIMEOUT * 2):
        async with running_agent(agent_config(tmp_path / "agent"), runner=runner) as agent:
            assert isinstance(agent, Agent)
            try:
                assert (await agent.deploy(msg)).state == "running"
                seen: list[str | None] = []
                forget = agent.secret_store.forget

                def spy(deployment_id: str) -> None:  # worker thread
                    trio.from_thread.run(wait_all_tasks_blocked)  # let the deploy go on
                    status = runner.status(deployment_id)
                    seen.append(None if status is None else status.state)
                    forget(deployment_id)

                monkeypatch.setattr(agent.secret_store, "forget", spy)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(agent.undeploy, "rq")
                    await wait_all_tasks_blocked()  # the undeploy holds the lock (`down`)
                    assert runner._lock("rq").locked()
                    nursery.start_soon(agent.deploy, msg)
                assert seen == [None], seen  # the clean-up ran before the deploy began
                status = runner.status("rq")
                assert status is not None and status.state == "running", status
                assert agent.current == "rq"
            finally:
                await agent.undeploy("rq")
