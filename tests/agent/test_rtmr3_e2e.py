"""RTMR3 end to end: a real agent (sim provider) measures each deployment before it
runs, serves its runtime log with its attested health, and `eectl trust verify-quote
--runtime-log` replays that log against the served quote's RTMR3.

Deploys come from ``StandInCp`` (agentkit) and run on the real Docker daemon.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from ee.agent.rtmr3 import RUNTIME_LOG_FILE
from ee.attestation import parse_quote
from ee.attestation.eventlog import parse_runtime_log, replay_digests, replay_runtime
from ee.protocol.messages import Deploy, DeployStatus, Message, Undeploy

from .agentkit import StandInCp, agent_config, agent_http, eventually, running_agent, td
from .test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    project_containers,
    settings_for,
    spec_hash,
)

V2_COMPOSE = IMAGE_ONLY_COMPOSE.replace("echo ok >", "echo ok-v2 >")
ISSUED_AT = 1_760_000_000


def _deploy(deployment_id: str, version: str, compose: str) -> Deploy:
    return Deploy(deployment_id=deployment_id, app="rtmr-app", version=version,
                  compose=compose, expose_port=8080, health_path="/health")


def _final(deployment_id: str, count: int) -> Any:
    """Matches the *count*-th final status (running/failed) of *deployment_id*."""
    seen: list[int] = []

    def match(_frame: object, msg: Message) -> bool:
        if (isinstance(msg, DeployStatus) and msg.deployment_id == deployment_id
                and msg.state in ("running", "failed", "stopped")):
            seen.append(1)
            return len(seen) == count
        return False
    return match


async def _deploy_and_wait(peer: StandInCp, msg: Deploy) -> DeployStatus:
    before = sum(1 for _, m in peer.frames if isinstance(m, DeployStatus)
                 and m.deployment_id == msg.deployment_id
                 and m.state in ("running", "failed", "stopped"))
    await peer.send(msg)
    _, final = await peer.wait_for(_final(msg.deployment_id, before + 1), timeout=DOCKER_TIMEOUT)
    assert isinstance(final, DeployStatus)
    return final


def _log_file(path: Path, events: list[dict[str, Any]]) -> Path:
    """The served events as the JSON-lines file `verify-quote --runtime-log` reads."""
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
                            for e in events))
    return path


def _verify(tmp_path: Path, quote: bytes, runtime_log: Path) -> subprocess.CompletedProcess[str]:
    sim = td()
    (tmp_path / "q.bin").write_bytes(quote)
    (tmp_path / "root.pem").write_bytes(sim.root_pem())
    (tmp_path / "c.json").write_text(json.dumps(sim.collateral(issued_at=ISSUED_AT).to_json()))
    return subprocess.run(
        [sys.executable, "-m", "ee.ctl.main", "trust", "verify-quote", str(tmp_path / "q.bin"),
         "--collateral", str(tmp_path / "c.json"), "--root", str(tmp_path / "root.pem"),
         "--now", str(ISSUED_AT + 1), "--runtime-log", str(runtime_log), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )


async def _attest(agent: Any, secret: str | None) -> tuple[dict[str, Any], bytes, str]:
    async with agent_http(agent, secret) as http:
        r = await http.get("/.ee/health",
                           params={"attest": "true", "nonce": secrets.token_hex(16)})
    assert r.status_code == 200, r.text
    attestation: dict[str, Any] = r.json()["attestation"]
    return attestation, base64.b64decode(attestation["quote"]), r.text


@needs_docker
async def test_deploys_are_measured_served_replayed_and_resumed(
    tmp_path: Path, namespace: str  # noqa: F811
) -> None:
    deployment_id = f"dep-{secrets.token_hex(3)}"
    settings = settings_for(namespace)
    hash1 = spec_hash(_deploy(deployment_id, "v1", IMAGE_ONLY_COMPOSE))
    hash2 = spec_hash(_deploy(deployment_id, "v2", V2_COMPOSE))
    assert hash1 != hash2
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp().run)
            config = agent_config(tmp_path / "agent", peer.url)
            async with running_agent(config, workload_settings=settings) as agent:
                for version, compose in (("v1", IMAGE_ONLY_COMPOSE), ("v2", V2_COMPOSE)):
                    final = await _deploy_and_wait(peer, _deploy(deployment_id, version, compose))
                    assert final.state == "running", final.error

                # The operator (agent secret) gets the events; they replay to the quote.
                attestation, quote, _ = await _attest(agent, agent.secret)
                events = attestation["runtime_log"]
                assert [(e["version"], e["compose_hash"]) for e in events] == [
                    ("v1", hash1), ("v2", hash2)]
                assert {e["deployment_id"] for e in events} == {deployment_id}
                assert attestation["event_log"] is None  # sim: no firmware log
                log_file = _log_file(tmp_path / "runtime.jsonl", events)
                parsed = parse_runtime_log(log_file.read_bytes())
                rtmr3 = parse_quote(quote).report.rtmr3
                assert rtmr3 == replay_runtime(parsed) != bytes(48)
                assert attestation["runtime_digests"] == [e.digest.hex() for e in parsed]

                verified = _verify(tmp_path, quote, log_file)
                assert verified.returncode == 0, verified.stdout + verified.stderr
                assert json.loads(verified.stdout)["runtime_log"]["matches"] is True

                # One edited event (another compose hash) no longer explains the quote.
                tampered = [dict(events[0], compose_hash=hash2), events[1]]
                refused = _verify(tmp_path, quote, _log_file(tmp_path / "bad.jsonl", tampered))
                assert refused.returncode == 1, refused.stdout + refused.stderr
                assert json.loads(refused.stdout)["runtime_log"]["matches"] is False

                # The public view: digests that replay to RTMR3, no names of tenants.
                public, public_quote, text = await _attest(agent, None)
                assert public["runtime_log"] is None
                assert "rtmr-app" not in text and deployment_id not in text
                digests = [bytes.fromhex(d) for d in public["runtime_digests"]]
                assert replay_digests(digests) == parse_quote(public_quote).report.rtmr3 == rtmr3

            # Restarted on the same data dir: the software register resumes from the log
            # (the adopted deployment is already measured: no new event).
            # (With a firmware event log, here a stand-in file, it is served too.)
            ccel = tmp_path / "CCEL"
            ccel.write_bytes(b"\x00firmware event log\xff")
            async with running_agent(config, workload_settings=settings,
                                     boot_log=ccel) as agent2:
                await eventually(lambda: len(peer.registers) == 2)
                assert agent2.runtime is not None
                assert agent2.runtime.register.read() == rtmr3
                attestation, quote, _ = await _attest(agent2, agent2.secret)
                assert attestation["runtime_log"] == events
                assert base64.b64decode(attestation["event_log"]) == ccel.read_bytes()
                assert parse_quote(quote).report.rtmr3 == rtmr3

            # As after a TD reboot (log and register gone, containers back): the adopted
            # deployment is measured again before the agent serves.
            (tmp_path / "agent" / RUNTIME_LOG_FILE).unlink()
            async with running_agent(config, workload_settings=settings) as agent3:
                await eventually(lambda: len(peer.registers) == 3)
                attestation, quote, _ = await _attest(agent3, agent3.secret)
                [again] = attestation["runtime_log"]
                assert (again["version"], again["compose_hash"]) == ("v2", hash2)
                assert parse_quote(quote).report.rtmr3 == replay_runtime(
                    parse_runtime_log(_log_file(tmp_path / "r3.jsonl", [again]).read_bytes()))
                await peer.send(Undeploy(deployment_id=deployment_id))
                await peer.wait_for(
                    lambda _f, m: isinstance(m, DeployStatus) and m.state == "stopped"
                    and m.deployment_id == deployment_id, timeout=DOCKER_TIMEOUT)
            nursery.cancel_scope.cancel()


@needs_docker
async def test_a_deploy_that_cannot_be_measured_fails_and_runs_nothing(
    tmp_path: Path, namespace: str  # noqa: F811
) -> None:
    deployment_id = f"dep-{secrets.token_hex(3)}"
    settings = settings_for(namespace)
    with trio.fail_after(DOCKER_TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp().run)
            config = agent_config(tmp_path / "agent", peer.url)
            async with running_agent(config, workload_settings=settings) as agent:
                (tmp_path / "agent" / RUNTIME_LOG_FILE).mkdir()  # the log cannot be appended
                final = await _deploy_and_wait(peer, _deploy(deployment_id, "v1",
                                                             IMAGE_ONLY_COMPOSE))
                assert final.state == "failed"
                assert final.error is not None and final.error.startswith("rtmr3: "), final.error
                assert project_containers(agent.runner.project_name(deployment_id)) == []
                assert agent.runtime is not None and agent.runtime.register.read() == bytes(48)
                await peer.send(Undeploy(deployment_id=deployment_id))
                await peer.wait_for(
                    lambda _f, m: isinstance(m, DeployStatus) and m.state == "stopped"
                    and m.deployment_id == deployment_id, timeout=DOCKER_TIMEOUT)
            nursery.cancel_scope.cancel()
