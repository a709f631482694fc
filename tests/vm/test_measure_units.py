"""`eectl vm measure`'s pure parts: the evidence transcript on the serial console, the
booted facts from a domain XML, the comparison, and the nonce a measure VM gets."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from ee.attestation.measure import Prediction
from ee.vm.domain import domain_xml
from ee.vm.measure import (
    CHUNK,
    LINE,
    MeasureFailed,
    Row,
    booted_from_xml,
    compare,
    evidence_from_serial,
    evidence_lines,
)
from ee.vm.plan import NONCE_FW_CFG, SIM_FW_CFG, CreateRequest, plan_vm
from ee.vm.sizes import PRESETS

BLOB = bytes(range(256)) * 7  # several chunks


def console(lines: list[str]) -> str:
    """The lines as journal+console prints them, among other boot noise."""
    out = ["[    3.1] systemd[1]: Starting ee-measure.service..."]
    out += [f"\x1b[0m[   41.{i:03d}] ee-measure[512]: {line}" for i, line in enumerate(lines)]
    return "\n".join([*out, "[   42.0] ee-agent[600]: starting"]) + "\n"


def test_evidence_round_trips_through_the_console() -> None:
    lines = evidence_lines(BLOB)
    assert len(lines) > 3 and all(len(x) < CHUNK + 60 for x in lines)
    assert evidence_from_serial(console(lines)) == BLOB
    # chunks out of order, or printed twice identically: still the same evidence
    assert evidence_from_serial(console([lines[1], lines[0], lines[1], *lines[2:]])) == BLOB


def test_no_end_line_yet_is_not_an_answer() -> None:
    lines = evidence_lines(BLOB)
    assert evidence_from_serial("") is None
    assert evidence_from_serial(console(lines[:-1])) is None


@pytest.mark.parametrize("mangle", ["drop", "flip", "conflict", "count", "length"])
def test_a_garbled_transcript_is_refused_never_guessed(mangle: str) -> None:
    lines = evidence_lines(BLOB)
    if mangle == "drop":
        lines = [lines[0], *lines[2:]]
    elif mangle == "flip":  # one base64 character changed: the end line's digest catches it
        first = lines[0]
        i = len(first) - 5
        lines[0] = first[:i] + ("A" if first[i] != "A" else "B") + first[i + 1:]
    elif mangle == "conflict":
        lines.insert(1, lines[0][:-4] + "AAAA")
    elif mangle == "count":
        lines[0] = re.sub(r" 1/(\d+) ", lambda m: f" 1/{int(m[1]) + 1} ", lines[0])
    else:
        lines[-1] = re.sub(r" \d+$", " 7", lines[-1])
    with pytest.raises(MeasureFailed):
        evidence_from_serial(console(lines))


def test_booted_facts_come_from_the_domain_xml(tmp_path: Path) -> None:
    req = CreateRequest(name="m-1", image=tmp_path / "image", size=PRESETS["tiny"],
                        root_dir=tmp_path / "vms", measure=True, tpm=True)
    plan = plan_vm(req, image_cmdline="console=ttyS0 panic=1", agent_port=None)
    booted = booted_from_xml(domain_xml(plan.spec))
    assert booted.cmdline == plan.spec.cmdline
    assert "easyenclave.measurement=1" in booted.cmdline.split()
    assert booted.memory_mib == 4096
    assert booted.kernel == plan.workdir.kernel and booted.initrd == plan.workdir.initrd
    with pytest.raises(MeasureFailed, match="not a direct kernel boot"):
        booted_from_xml("<domain><memory unit='MiB'>1</memory></domain>")
    with pytest.raises(MeasureFailed):
        booted_from_xml("<domain")


def test_only_a_measure_vm_gets_a_nonce_and_it_is_not_on_the_cmdline(tmp_path: Path) -> None:
    base = {"image": tmp_path / "image", "size": PRESETS["tiny"], "root_dir": tmp_path / "v"}
    measured = plan_vm(CreateRequest(name="m-1", measure=True, tpm=True, **base),  # type: ignore[arg-type]
                       image_cmdline="console=ttyS0", agent_port=None)
    assert measured.spec.fw_cfg == ((NONCE_FW_CFG, measured.workdir.nonce),)
    assert "nonce" not in measured.spec.cmdline
    plain = plan_vm(CreateRequest(name="p-1", dev=True, cp="ws://127.0.0.1:1", **base),  # type: ignore[arg-type]
                    image_cmdline="console=ttyS0", agent_port=None)
    assert plain.spec.fw_cfg == ((SIM_FW_CFG, plain.workdir.sim),)


def test_compare_flags_every_difference() -> None:
    pred = Prediction(memory=2 << 30, patched=True, rtmr1_events=(), rtmr2_events=(),
                      pcr4_events=(hashlib.sha256(b"k").digest(),),
                      pcr9_events=(hashlib.sha256(b"c").digest(),))
    good = {4: pred.pcr4, 9: pred.pcr9, 0: bytes(32)}
    assert all(r.ok for r in compare(good, pred))
    rows = compare({4: pred.pcr4, 9: bytes(32)}, pred)
    assert [r.ok for r in rows] == [True, False]
    assert compare({9: pred.pcr9}, pred)[0] == Row("pcr4", "missing", pred.pcr4.hex())


def test_the_line_prefix_is_what_the_guest_script_prints() -> None:
    root = Path(__file__).resolve().parents[2] / "image"
    unit = (root / "rootfs/etc/systemd/system/ee-measure.service").read_text()
    assert "ConditionKernelCommandLine=easyenclave.measurement=1" in unit
    assert "Before=ee-agent.service" in unit
    assert LINE.startswith("ee-measure:")
