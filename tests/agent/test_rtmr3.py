"""RTMR3 runtime measurements: the agent's log and register, reconciliation after a
crash, refusal of a log that does not explain the register, and replay by a verifier."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ee.agent.rtmr3 import (
    Rtmr3Error,
    Rtmr3Unavailable,
    RuntimeMeasurements,
    SoftwareRegister,
    SysfsRegister,
    open_register,
    read_boot_log,
)
from ee.attestation.eventlog import RuntimeEvent, parse_runtime_log, replay_runtime

HASH_A = "sha256:" + "aa" * 32
HASH_B = "sha256:" + "bb" * 32


class HardwareLike:
    """A register with hardware semantics (survives the agent; extend-only)."""

    kind = "hardware-like"

    def __init__(self, value: bytes = bytes(48)) -> None:
        self.value = value

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        assert len(digest) == 48
        self.value = hashlib.sha384(self.value + digest).digest()


def deploy(m: RuntimeMeasurements, n: int, compose_hash: str = HASH_A) -> bytes:
    return m.record_deploy(
        app="web", version=f"v{n}", deployment_id=f"dep-{n}", compose_hash=compose_hash
    )


def test_record_extends_and_logs(tmp_path: Path) -> None:
    log = tmp_path / "run" / "rtmr3.jsonl"
    m = RuntimeMeasurements.open(SoftwareRegister(), log)
    assert m.register.read() == bytes(48)
    first = deploy(m, 1)
    second = deploy(m, 2, HASH_B)
    events = parse_runtime_log(log.read_bytes())
    assert [e.compose_hash for e in events] == [HASH_A, HASH_B]
    ev1 = events[0]
    assert first == hashlib.sha384(bytes(48) + hashlib.sha384(ev1.canonical()).digest()).digest()
    assert second == replay_runtime(events) == m.check()
    assert m.register.kind == "software" and events[1].version == "v2"


def test_a_hostile_field_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    log = tmp_path / "rtmr3.jsonl"
    m = RuntimeMeasurements.open(SoftwareRegister(), log)
    for bad in (
        {"app": "web\n{", "compose_hash": HASH_A},
        {"app": "web", "compose_hash": "sha256:zz"},
        {"app": "", "compose_hash": HASH_A},
    ):
        with pytest.raises(ValueError):
            m.record_deploy(version="v1", deployment_id="d", **bad)
    assert not log.exists() and m.register.read() == bytes(48)


def test_software_register_resumes_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "rtmr3.jsonl"
    m = RuntimeMeasurements.open(SoftwareRegister(), log)
    deploy(m, 1)
    value = deploy(m, 2)
    again = RuntimeMeasurements.open(SoftwareRegister(), log)
    assert again.register.read() == value and len(again.events) == 2


def test_hardware_register_must_be_explained_by_the_log(tmp_path: Path) -> None:
    log = tmp_path / "rtmr3.jsonl"
    hw = HardwareLike()
    m = RuntimeMeasurements.open(hw, log)
    deploy(m, 1)
    deploy(m, 2)
    # the agent restarts: the register kept its value, the log explains it
    assert RuntimeMeasurements.open(hw, log).check() == hw.value
    # a register the log does not explain (another extend, a swapped log) is refused
    with pytest.raises(Rtmr3Error, match="not explained"):
        RuntimeMeasurements.open(HardwareLike(hashlib.sha384(b"other").digest()), log)
    with pytest.raises(Rtmr3Error, match="not explained"):
        RuntimeMeasurements.open(HardwareLike(), log)  # a log claiming events never measured
    # ... and after a record, check() notices a register extended behind the log's back
    hw.extend(bytes(48))
    with pytest.raises(Rtmr3Error, match="no longer equals"):
        m.check()


def test_a_crash_between_append_and_extend_is_completed(tmp_path: Path) -> None:
    log = tmp_path / "rtmr3.jsonl"
    hw = HardwareLike()
    m = RuntimeMeasurements.open(hw, log)
    deploy(m, 1)
    before = hw.value
    lost = RuntimeEvent(
        type="deploy", app="web", version="v2", deployment_id="dep-2", compose_hash=HASH_B
    )
    with log.open("ab") as f:  # appended, then the agent died before extending
        f.write(lost.canonical() + b"\n")
    reopened = RuntimeMeasurements.open(hw, log)
    assert hw.value != before
    assert reopened.check() == replay_runtime(parse_runtime_log(log.read_bytes()))


def test_a_corrupted_log_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "rtmr3.jsonl"
    log.write_bytes(b'{"app":"web"}\n')
    with pytest.raises(Rtmr3Error, match="line 1"):
        RuntimeMeasurements.open(SoftwareRegister(), log)


def test_open_register(tmp_path: Path) -> None:
    with pytest.raises(Rtmr3Unavailable, match=r"Linux >= 6\.16"):
        open_register("tsm", sysfs=tmp_path / "missing")
    assert isinstance(open_register("sim"), SoftwareRegister)
    assert isinstance(open_register("tpm"), SoftwareRegister)
    with pytest.raises(Rtmr3Unavailable):
        open_register("nope")
    attr = tmp_path / "rtmr3:sha384"
    attr.write_bytes(b"\x07" * 48)
    reg = open_register("tsm", sysfs=attr)
    assert isinstance(reg, SysfsRegister) and reg.read() == b"\x07" * 48


def test_sysfs_register_io(tmp_path: Path) -> None:
    attr = tmp_path / "rtmr3:sha384"
    attr.write_bytes(bytes(48))
    reg = SysfsRegister(attr)
    digest = hashlib.sha384(b"event").digest()
    reg.extend(digest)
    assert attr.read_bytes() == digest  # exactly the 48 digest bytes are written
    with pytest.raises(Rtmr3Error, match="48 bytes"):
        reg.extend(b"short")
    attr.write_bytes(b"00" * 48)  # hex text is not what the ABI gives
    with pytest.raises(Rtmr3Error, match="96 bytes"):
        reg.read()
    with pytest.raises(Rtmr3Error, match="cannot read"):
        SysfsRegister(tmp_path / "gone").read()


def test_read_boot_log(tmp_path: Path) -> None:
    assert read_boot_log(tmp_path / "CCEL") is None
    (tmp_path / "CCEL").write_bytes(b"log")
    assert read_boot_log(tmp_path / "CCEL") == b"log"
    (tmp_path / "CCEL").write_bytes(bytes(8 * 1024 * 1024 + 1))
    with pytest.raises(Rtmr3Error, match="larger than"):
        read_boot_log(tmp_path / "CCEL")


def test_sim_quotes_carry_the_software_register(tmp_path: Path) -> None:
    from ee.attestation import parse_quote
    from ee.attestation.providers.sim import SimProvider, SimTD

    td = SimTD.create(rtmrs=(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48))
    m = RuntimeMeasurements.open(SoftwareRegister(), tmp_path / "rtmr3.jsonl")
    provider = SimProvider(td, rtmr3=m.register.read)
    deploy(m, 1)
    report = parse_quote(provider.get_quote(bytes(64))).report
    assert report.rtmr3 == m.check() and report.rtmr2 == b"\x03" * 48
    assert parse_quote(SimProvider(td).get_quote(bytes(64))).report.rtmr3 == b"\x04" * 48


def test_measured_names_the_last_event_of_a_deployment(tmp_path: Path) -> None:
    from ee.agent.rtmr3 import TD_RUNTIME_LOG, runtime_log_path

    m = RuntimeMeasurements.open(SoftwareRegister(), tmp_path / "rtmr3.jsonl")
    assert not m.measured("dep-1", HASH_A)
    deploy(m, 1)
    assert m.measured("dep-1", HASH_A) and not m.measured("dep-2", HASH_A)
    m.record_deploy(app="web", version="v9", deployment_id="dep-1", compose_hash=HASH_B)
    assert m.measured("dep-1", HASH_B) and not m.measured("dep-1", HASH_A)
    assert runtime_log_path("tsm", tmp_path) == TD_RUNTIME_LOG
    assert runtime_log_path("sim", tmp_path) == tmp_path / "rtmr3.jsonl"
