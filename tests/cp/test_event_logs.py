"""The CP replays the event logs an agent sends with its quote (real CP, real
websockets, sim quotes): a CCEL and a runtime log that replay to the quoted RTMR0..3
are admitted; a log that parses but does not replay is ATTESTATION_FAILED naming
``event_log``; a log that does not parse is BAD_EVENT_LOG naming where; under
``require_event_log`` an agent that sends none is refused, without it nothing changes.
Also: re-attestation answers (`Judge.reattest_answer`) and the real agent, which sends
its runtime log and a CCEL it is given."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cpkit import RunningCp, dev_config
from simagent import SimAgent
from test_sessions import register_with, wait_until

from ee.agent.config import AgentConfig
from ee.agent.platform import QuoteSource
from ee.agent.server import Agent
from ee.attestation import Policy
from ee.attestation.eventlog import (
    ALG_SHA384,
    EV_EFI_ACTION,
    EV_NO_ACTION,
    EV_SEPARATOR,
    RuntimeEvent,
    encode_log,
    parse_ccel,
    replay_rtmrs,
    replay_runtime,
)
from ee.attestation.providers.sim import SimProvider, SimTD
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, prepare
from ee.protocol import registration_report_data
from ee.protocol.messages import MAX_EVENT_LOG_BYTES, Attestation, Register

EVENTS = [
    (1, 0x80000008, b"firmware volume"),
    (1, EV_SEPARATOR, b"\x00\x00\x00\x00"),
    (0, EV_NO_ACTION, b"informational, never replayed"),
    (2, 0x80000003, b"kernel"),
    (2, EV_EFI_ACTION, b"Calling EFI Application from Boot Option"),
    (3, 0x00000006, b"cmdline console=ttyS0"),
]
CCEL = encode_log(EVENTS, (ALG_SHA384,))
# The same boot with another kernel command line: parses, replays elsewhere.
TAMPERED_CCEL = encode_log([*EVENTS[:-1], (3, 0x00000006, b"cmdline init=/bin/sh")],
                           (ALG_SHA384,))
DEPLOY = RuntimeEvent(type="deploy", app="web", version="v1", deployment_id="dep-1",
                      compose_hash="sha256:" + hashlib.sha256(b"compose").hexdigest())
RUNTIME_LOG = DEPLOY.canonical().decode() + "\n"
OTHER_DEPLOY = attrs.evolve(DEPLOY, compose_hash="sha256:" + "0" * 64)


def boot_rtmrs(ccel: bytes = CCEL, runtime: tuple[RuntimeEvent, ...] = (DEPLOY,)
               ) -> tuple[bytes, bytes, bytes, bytes]:
    r0, r1, r2, _ = replay_rtmrs(parse_ccel(ccel))
    return r0, r1, r2, replay_runtime(runtime)


@attrs.define
class LogAgent(SimAgent):
    """A SimAgent that sends event logs with its registration quote."""

    event_log: bytes | None = None
    runtime_log: str | None = None

    def register_message(self, nonce: bytes) -> Register:
        msg = super().register_message(nonce)
        return attrs.evolve(msg, attestation=attrs.evolve(
            msg.attestation, event_log=self.event_log, runtime_log=self.runtime_log))


@asynccontextmanager
async def cp_with(data_dir: Path, *, require_event_log: bool) -> AsyncIterator[RunningCp]:
    """A dev CP (cpkit's) whose policy is the dev policy with *require_event_log*."""
    config = dev_config(data_dir, quorum=Quorum(settle_timeout_s=5))
    boot, _ = prepare(config)
    boot = attrs.evolve(boot, policy=Policy(require_event_log=require_event_log))
    token = (data_dir / "admin.token").read_text().strip()
    assert boot.sim_dir is not None
    cp = ControlPlane(config, boot)
    async with trio.open_nursery() as nursery:
        await nursery.start(cp.run)
        try:
            yield RunningCp(cp, SimTD.load(boot.sim_dir), token, data_dir)
        finally:
            cp.request_stop()


async def outcome(env: RunningCp, name: str, rtmrs: tuple[bytes, bytes, bytes, bytes],
                  **logs: Any) -> tuple[str, tuple[str, ...]]:
    """Register a sim agent whose quote carries *rtmrs* and sends *logs*: ("admitted",
    ()) or (refusal code, reasons)."""
    agent = LogAgent(url=env.agent_url, vm_name=name, td=env.td.evolve(rtmrs=rtmrs), **logs)
    await register_with(env, agent)
    if agent.registered is not None:
        return "admitted", ()
    assert agent.rejected is not None, "neither registered nor rejected"
    return agent.rejected.code, agent.rejected.reasons


async def test_logs_that_replay_are_admitted_and_logs_that_do_not_are_refused(
        tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cp_with(tmp_path / "cp", require_event_log=True) as env:
            good = boot_rtmrs()
            assert await outcome(env, "vm-good", good, event_log=CCEL,
                                 runtime_log=RUNTIME_LOG) == ("admitted", ())
            # The CCEL's padding is no part of the log.
            assert (await outcome(env, "vm-padded", good, event_log=CCEL + b"\xff" * 512,
                                  runtime_log=RUNTIME_LOG))[0] == "admitted"

            code, reasons = await outcome(env, "vm-boot", good, event_log=TAMPERED_CCEL,
                                          runtime_log=RUNTIME_LOG)
            assert code == "ATTESTATION_FAILED"
            assert [r.split(" replays")[0] for r in reasons] == ["event_log: RTMR2"]

            other = OTHER_DEPLOY.canonical().decode() + "\n"
            code, reasons = await outcome(env, "vm-deploy", good, event_log=CCEL,
                                          runtime_log=other)
            assert code == "ATTESTATION_FAILED"
            assert [r.split(" replays")[0] for r in reasons] == [
                "event_log: RTMR3 (runtime log)"]
            # A log that leaves out the deploy the quote measured.
            code, reasons = await outcome(env, "vm-hidden", good, event_log=CCEL,
                                          runtime_log="")
            assert code == "ATTESTATION_FAILED" and "RTMR3" in reasons[0]

        refused = [e.to_dict() for e in env.cp.events.recent
                   if e.kind == "registration.rejected"]
        assert sorted(e["subject"] for e in refused) == ["vm-boot", "vm-deploy", "vm-hidden"]


@pytest.mark.parametrize("logs, where", [
    ({"event_log": b"\x00" * 40}, "event_log: malformed event log: header.event_type at "
                                  "offset 4"),
    ({"event_log": CCEL[:-3]}, "event_log: malformed event log: event[5].event at offset"),
    ({"runtime_log": "not json\n"}, "runtime_log: malformed runtime event log: line 1: "
                                    "not JSON"),
    # the only known runtime event is "deploy"
    ({"runtime_log": RUNTIME_LOG + RUNTIME_LOG.replace('"deploy"', '"exec"')},
     "runtime_log: malformed runtime event log: line 2: type 'exec' is not one of deploy"),
    ({"runtime_log": RUNTIME_LOG.replace('","', '", "')},
     "runtime_log: malformed runtime event log: line 1: not in canonical form"),
])
async def test_a_log_that_does_not_parse_is_bad_event_log(
        tmp_path: Path, logs: dict[str, Any], where: str) -> None:
    """Also when the policy does not require logs: a log sent is a log checked."""
    with trio.fail_after(60):
        async with cp_with(tmp_path / "cp", require_event_log=False) as env:
            full = {"event_log": CCEL, "runtime_log": RUNTIME_LOG, **logs}
            code, reasons = await outcome(env, "vm-bad", boot_rtmrs(), **full)
    assert code == "BAD_EVENT_LOG"
    assert len(reasons) == 1 and reasons[0].startswith(where), reasons


async def test_require_event_log_refuses_an_agent_without_logs(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cp_with(tmp_path / "cp", require_event_log=True) as env:
            assert await outcome(env, "vm-none", boot_rtmrs()) == (
                "ATTESTATION_FAILED", ("event_log: no event log was served",))
            # One log is not enough when the other register it should explain is set.
            code, reasons = await outcome(env, "vm-no-ccel", boot_rtmrs(),
                                          runtime_log=RUNTIME_LOG)
            assert code == "ATTESTATION_FAILED"
            assert [r.split(" is ")[0] for r in reasons] == [
                "event_log: RTMR0", "event_log: RTMR1", "event_log: RTMR2"]
            assert "no CCEL was sent" in reasons[0]
            code, reasons = await outcome(env, "vm-no-runtime", boot_rtmrs(), event_log=CCEL)
            assert code == "ATTESTATION_FAILED"
            assert reasons == (f"event_log: RTMR3 is {boot_rtmrs()[3].hex()} and no runtime "
                               "log was sent to explain it",)
            # ... but a register that is still zero needs no log (a sim TD's boot).
            zero_boot = (bytes(48), bytes(48), bytes(48), boot_rtmrs()[3])
            assert await outcome(env, "vm-sim", zero_boot, runtime_log=RUNTIME_LOG) == (
                "admitted", ())


async def test_without_require_event_log_no_log_is_as_before(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cp_with(tmp_path / "cp", require_event_log=False) as env:
            # any RTMRs, no logs: admitted as always
            assert await outcome(env, "vm-none", boot_rtmrs(TAMPERED_CCEL)) == ("admitted", ())
            # one log: only that one is checked
            assert await outcome(env, "vm-runtime", boot_rtmrs(TAMPERED_CCEL),
                                 runtime_log=RUNTIME_LOG) == ("admitted", ())
            code, reasons = await outcome(env, "vm-lies", boot_rtmrs(TAMPERED_CCEL),
                                          event_log=CCEL)
            assert code == "ATTESTATION_FAILED" and reasons[0].startswith("event_log: RTMR2")


async def test_reattestation_answers_are_replayed(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cp_with(tmp_path / "cp", require_event_log=True) as env:
            td = env.td.evolve(rtmrs=boot_rtmrs())
            agent = LogAgent(url=env.agent_url, vm_name="vm-re", td=td, event_log=CCEL,
                             runtime_log=RUNTIME_LOG)
            await register_with(env, agent)
            assert agent.registered is not None
            identity = env.cp.plane.known["vm-re"]
            judge = env.cp.judge()

    def answer(**logs: Any) -> tuple[str, ...] | None:
        nonce = b"n" * 32
        quote = td.quote(registration_report_data(nonce, agent.public_key))
        refusal = judge.reattest_answer(Attestation(provider="sim", quote=quote, **logs),
                                        nonce, identity, now=time.time())
        return None if refusal is None else (refusal.code, *refusal.reasons)

    assert answer(event_log=CCEL, runtime_log=RUNTIME_LOG) is None
    assert answer() == ("ATTESTATION_FAILED", "event_log: no event log was served")
    refused = answer(event_log=TAMPERED_CCEL, runtime_log=RUNTIME_LOG)
    assert refused is not None and refused[1].startswith("event_log: RTMR2 replays")
    refused = answer(event_log=CCEL, runtime_log="{}\n")
    assert refused is not None and refused[0] == "BAD_EVENT_LOG"
    # The quote-only form (no logs) is judged as "no log was served".
    nonce = b"m" * 32
    refusal = judge.reattest(td.quote(registration_report_data(nonce, agent.public_key)),
                             nonce, identity, now=time.time())
    assert refusal is not None and refusal.reasons == ("event_log: no event log was served",)


def test_an_oversized_event_log_does_not_fit_the_message() -> None:
    with pytest.raises(ValueError, match="event_log"):
        Attestation(provider="sim", quote=b"q", event_log=b"\x00" * (MAX_EVENT_LOG_BYTES + 1))


async def test_the_real_agent_sends_its_logs(tmp_path: Path) -> None:
    """ee-agent (sim provider) with a runtime log from an earlier run and a CCEL: it
    sends both (the CCEL without its padding) and a policy requiring them admits it;
    the same agent with a CCEL that does not explain its boot is refused."""
    ccel = tmp_path / "CCEL"
    ccel.write_bytes(CCEL + b"\xff" * 4096)
    with trio.fail_after(60):
        async with cp_with(tmp_path / "cp", require_event_log=True) as env:
            for name, boot in (("vm-real", CCEL), ("vm-real-tampered", TAMPERED_CCEL)):
                data = tmp_path / name
                data.mkdir()
                (data / "rtmr3.jsonl").write_text(RUNTIME_LOG)
                config = AgentConfig(cp_url=env.agent_url, listen="127.0.0.1:0",
                                     data_dir=str(data), vm_name=name,
                                     attestation_provider="sim", sim_dir=env.cp.bootstrap.sim_dir,
                                     reconnect_backoff_base_s=0.05,
                                     reconnect_backoff_max_s=0.2)
                agent = Agent(config, boot_log=ccel)
                assert agent.runtime is not None
                r0, r1, r2, _ = boot_rtmrs(boot)
                td = env.td.evolve(rtmrs=(r0, r1, r2, bytes(48)))
                agent.quotes = QuoteSource("sim", SimProvider(
                    td, rtmr3=agent.runtime.register.read))
                sent = await agent.register_message(b"x" * 32)
                assert sent.attestation.event_log == CCEL  # trimmed
                assert sent.attestation.runtime_log == RUNTIME_LOG
                async with trio.open_nursery() as nursery:
                    await nursery.start(agent.run)
                    def rejections(vm: str = name) -> list[dict[str, Any]]:
                        return [e.to_dict() for e in env.cp.events.recent
                                if e.subject == vm and e.kind == "registration.rejected"]

                    def decided(vm: str = name) -> bool:
                        return bool(rejections(vm)) or vm in env.cp.plane.known

                    await wait_until(decided, "admitted or refused")
                    refused = rejections()
                    agent.request_stop()
                if boot is CCEL:
                    assert name in env.cp.plane.known and not refused, refused
                else:
                    assert name not in env.cp.plane.known
                    assert refused[0]["data"]["code"] == "ATTESTATION_FAILED"
                    assert refused[0]["data"]["reasons"][0].startswith("event_log: RTMR2")
