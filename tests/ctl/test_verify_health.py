"""`eectl trust verify-health` against a real agent (sim attestation, real Docker
workload, deployed through the agent session by agentkit's stand-in CP), and replayed or
doctored answers served from a tiny local HTTP server; plus `check_health_answer` on
hand-made sim quotes (fast, no Docker)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from agent.agentkit import StandInCp, agent_config, running_agent
from agent.test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    settings_for,
)
from ee.agent.config import HttpLimits
from ee.attestation.policy import Policy
from ee.attestation.providers.sim import SimTD, shared_sim_dir
from ee.attestation.verify import Verifier
from ee.ctl.verify_health import check_health_answer, health_urls, normalise_hash
from ee.protocol.messages import Deploy, DeployStatus, Message
from ee.protocol.reportdata import health_report_data

from .ctlkit import eectl, local_http

HASH = "sha256:" + "ab" * 32


# --- a real agent ------------------------------------------------------------------


def _running(deployment_id: str) -> Callable[[object, Message], bool]:
    def match(_frame: object, msg: Message) -> bool:
        return (isinstance(msg, DeployStatus) and msg.deployment_id == deployment_id
                and msg.state in ("running", "failed"))
    return match


@contextmanager
def replaying(answer: dict[str, Any], doctor: Callable[[dict[str, Any], str], None]
              ) -> Iterator[str]:
    """Serve *answer* (a recorded agent answer) to every GET, changed by
    ``doctor(answer, nonce_asked)``; yields the server's base URL."""

    def respond(_method: str, path: str, _body: bytes) -> tuple[int, str, bytes]:
        nonce = parse_qs(urlsplit(path).query).get("nonce", [""])[0]
        body = json.loads(json.dumps(answer))
        doctor(body, nonce)
        return 200, "application/json", json.dumps(body).encode()

    with local_http(respond) as url:
        yield url


async def _verify(url: str, *args: str, state_dir: Path) -> tuple[int, dict[str, Any], str]:
    r = await eectl("trust", "verify-health", url, "--root", "dev", "--json", *args,
                    state_dir=state_dir)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {}
    return r.returncode, doc, r.stderr


@needs_docker
async def test_verify_health_against_a_real_agent(tmp_path: Path, namespace: str,  # noqa: F811
                                                  ) -> None:
    deployment_id = f"dep-{secrets.token_hex(3)}"
    with trio.fail_after(DOCKER_TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp().run)
            config = agent_config(tmp_path / "agent", peer.url)
            async with running_agent(config, workload_settings=settings_for(namespace),
                                     http_limits=HttpLimits(attest_burst=50)) as agent:
                await peer.send(Deploy(deployment_id=deployment_id, app="hello", version="1",
                                       compose=IMAGE_ONLY_COMPOSE, env={"GREETING": "hi"},
                                       expose_port=8080, health_path="/health"))
                _, status = await peer.wait_for(_running(deployment_id),
                                                timeout=DOCKER_TIMEOUT)
                assert isinstance(status, DeployStatus) and status.state == "running", status
                expected = status.compose_hash
                assert expected is not None
                url = f"http://127.0.0.1:{agent.http_port}"

                # Accepted: the chain to the dev root, REPORTDATA over our nonce and the
                # hash, the expected hash, the event logs.
                rc, doc, err = await _verify(url, "--expect-hash", expected,
                                             state_dir=tmp_path)
                assert rc == 0, (doc, err)
                assert doc["accepted"] is True and doc["reasons"] == []
                assert doc["compose_hash"] == expected and doc["report_data_binds"] is True
                assert doc["provider"] == "sim" and doc["policy"]["admitted"] is True
                assert doc["url"].endswith("/.ee/health")
                # Human output, and the hash given as bare hex.
                r = await eectl("trust", "verify-health", url, "--root", "dev",
                                "--expect-hash", expected.removeprefix("sha256:"),
                                state_dir=tmp_path)
                assert r.returncode == 0, r.stderr
                assert "     verdict: ACCEPTED" in r.stdout.splitlines()
                assert f"compose_hash: {expected}" in r.stdout

                # Another hash expected: refused, saying which.
                rc, doc, _ = await _verify(url, "--expect-hash", HASH, state_dir=tmp_path)
                assert rc == 1 and doc["accepted"] is False
                assert doc["reasons"] == [f"the agent attests {expected}, not the expected "
                                          f"{HASH}"]

                # A root the quote does not chain to: refused by verification.
                r = await eectl("trust", "verify-health", url, "--root", "intel", "--json",
                                state_dir=tmp_path)
                assert r.returncode == 1
                assert any("policy refused: verification" in x
                           for x in json.loads(r.stdout)["reasons"])
                # A policy whose RTMR3 allowlist the agent does not match: refused.
                policy = tmp_path / "policy.json"
                policy.write_text(json.dumps({"require_collateral": False,
                                              "rtmr3": ["00" * 48]}))
                rc, doc, _ = await _verify(url, "--policy", str(policy), state_dir=tmp_path)
                assert rc == 1 and any(r.startswith("policy refused: rtmr3: ")
                                       for r in doc["reasons"])

                # Record one answer, then replay it from elsewhere.
                recorded = await _record(url)
                assert recorded["attestation"]["compose_hash"] == expected
                await _replays_are_refused(recorded, expected, tmp_path)

                await peer.send(_undeploy(deployment_id))
                await peer.wait_for(lambda _f, m: isinstance(m, DeployStatus)
                                    and m.state == "stopped", timeout=DOCKER_TIMEOUT)
            nursery.cancel_scope.cancel()


def _undeploy(deployment_id: str) -> Message:
    from ee.protocol.messages import Undeploy
    return Undeploy(deployment_id=deployment_id)


async def _record(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(url + "/.ee/health", params={"attest": "true",
                                                         "nonce": secrets.token_hex(32)})
        if r.status_code == 200 and "attestation" in r.json():
            answer: dict[str, Any] = r.json()
            return answer
    raise AssertionError("the agent gave no attested health answer")


async def _replays_are_refused(recorded: dict[str, Any], expected: str, tmp: Path) -> None:
    # As recorded: another nonce in the answer and in REPORTDATA.
    with replaying(recorded, lambda body, nonce: None) as url:
        rc, doc, _ = await _verify(url, "--expect-hash", expected, state_dir=tmp)
    assert rc == 1 and doc["accepted"] is False
    assert doc["reasons"][0].startswith("the answer is for another nonce")
    assert any(r.startswith("REPORTDATA does not bind") for r in doc["reasons"])

    # The replayer echoes our nonce: only REPORTDATA can tell.
    def echo(body: dict[str, Any], nonce: str) -> None:
        body["attestation"]["nonce"] = nonce
    with replaying(recorded, echo) as url:
        rc, doc, _ = await _verify(url, "--expect-hash", expected, state_dir=tmp)
    assert rc == 1 and doc["report_data_binds"] is False
    assert [r for r in doc["reasons"] if not r.startswith("policy")] == [
        "REPORTDATA does not bind this nonce and hash (SHA-512('ee/v2/health' || nonce "
        "|| digest))"]

    # The answer claims the hash we expect (and echoes the nonce), the quote binds
    # another: refused.
    def claim(body: dict[str, Any], nonce: str) -> None:
        body["attestation"].update(nonce=nonce, compose_hash=HASH)
    with replaying(recorded, claim) as url:
        rc, doc, _ = await _verify(url + "/.ee/health", "--expect-hash", HASH, state_dir=tmp)
    assert rc == 1 and doc["compose_hash"] == HASH
    assert any(r.startswith("REPORTDATA does not bind") for r in doc["reasons"])


# --- check_health_answer on hand-made quotes (no Docker) -----------------------------


@pytest.fixture
def td() -> SimTD:
    return SimTD.load_or_create(shared_sim_dir())


def _answer(td: SimTD, nonce: bytes, compose_hash: str = HASH, **att: Any) -> dict[str, Any]:
    quote = td.quote(health_report_data(nonce, compose_hash))
    return {"status": "healthy", "compose_hash": compose_hash,
            "attestation": {"provider": "sim", "nonce": nonce.hex(),
                            "compose_hash": compose_hash,
                            "quote": base64.b64encode(quote).decode(), "event_log": None,
                            "runtime_digests": None, **att}}


def _check(td: SimTD, body: object, nonce: bytes, expect: str | None = HASH,
           policy: Policy | None = None) -> Any:
    return check_health_answer(body, nonce=nonce, expect_hash=expect,
                               verifier=Verifier([td.root_cert]),
                               policy=policy or Policy(require_collateral=False),
                               now=time.time())


def test_check_health_answer(td: SimTD) -> None:
    nonce = secrets.token_bytes(32)
    good = _answer(td, nonce)
    verdict = _check(td, good, nonce)
    assert verdict.accepted and verdict.reasons == () and verdict.compose_hash == HASH
    assert verdict.report["event_logs"] is None

    # Runtime digests that do not replay to the quoted RTMR3 (sim RTMR3 is zeros).
    forged = _answer(td, nonce, runtime_digests=["11" * 48])
    verdict = _check(td, forged, nonce)
    assert not verdict.accepted
    assert verdict.report["event_logs"]["replay"] is False
    assert any(r.startswith("policy refused: event_log: RTMR3") for r in verdict.reasons)
    assert _check(td, _answer(td, nonce, runtime_digests=[]), nonce).accepted  # replays

    # Even a policy that checks nothing cannot accept a quote over another nonce.
    other = _answer(td, secrets.token_bytes(32))
    other["attestation"]["nonce"] = nonce.hex()
    verdict = _check(td, other, nonce, policy=Policy(mode="disabled"))
    assert not verdict.accepted and verdict.reasons[0].startswith("REPORTDATA does not bind")

    # Garbage is a refusal with a reason, never an exception.
    for body, reason in (
            ({"status": "healthy"}, "the answer carries no attestation"),
            ([], "the answer carries no attestation"),
            ({"attestation": {**good["attestation"], "compose_hash": "md5:x"}},
             "the answer's compose_hash 'md5:x' is not a sha256 hash"),
            ({"attestation": {**good["attestation"], "quote": "***"}},
             "quote: quote is not valid base64"),
            ({"attestation": {**good["attestation"], "quote": "AAAA"}}, "quote: "),
            ({"attestation": {**good["attestation"], "runtime_digests": ["zz"]}},
             "runtime_digests: "),
            ({"attestation": {**good["attestation"], "event_log": "AAAA"}}, "event log: ")):
        verdict = _check(td, body, nonce)
        assert not verdict.accepted
        assert any(r.startswith(reason) for r in verdict.reasons), (reason, verdict.reasons)


def test_hash_and_url_forms() -> None:
    assert normalise_hash("AB" * 32) == "sha256:" + "ab" * 32
    assert normalise_hash(" sha256:" + "cd" * 32) == "sha256:" + "cd" * 32
    for bad in ("sha256:ab", "sha512:" + "ab" * 32, "zz" * 32):
        with pytest.raises(ValueError):
            normalise_hash(bad)
    assert health_urls("http://h:1") == ["http://h:1/.ee/health"]
    assert health_urls("https://h/") == ["https://h/.ee/health"]
    assert health_urls("http://h/x/health?q") == ["http://h/x/health"]


async def test_usage_errors_and_dev_root(tmp_path: Path, td: SimTD) -> None:
    with trio.fail_after(60):
        r = await eectl("trust", "dev-root", state_dir=tmp_path)
        assert r.returncode == 0 and r.stdout.encode() == td.root_pem()
        r = await eectl("trust", "dev-root", "--sim-dir", str(tmp_path / "none"),
                        state_dir=tmp_path)
        assert r.returncode == 2 and "no dev cluster root at" in r.stderr
        r = await eectl("trust", "verify-health", "ftp://x", state_dir=tmp_path)
        assert r.returncode == 2 and "URL must be http(s)" in r.stderr
        r = await eectl("trust", "verify-health", "http://127.0.0.1:9", "--expect-hash",
                        "nope", state_dir=tmp_path)
        assert r.returncode == 2 and "--expect-hash: 'nope' is not a sha256 hash" in r.stderr
        r = await eectl("trust", "verify-health", "http://127.0.0.1:9", "--root", "dev",
                        state_dir=tmp_path)
        assert r.returncode == 1 and "cannot reach http://127.0.0.1:9/.ee/health" in r.stderr
        r = await eectl("trust", "verify-quote", "--help", state_dir=tmp_path)
        assert "policy file (--policy FILE)" in r.stdout and "eectl trust dev-root" in r.stdout
