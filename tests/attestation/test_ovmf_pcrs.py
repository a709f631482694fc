"""`eectl trust measure`'s PCR4/PCR9 prediction against a real firmware and TPM.

Boots QEMU (TCG) with OVMF and swtpm by direct kernel boot; a tiny busybox init prints
PCR4/PCR9 (SHA-256 bank) and the firmware's event log to the serial port and powers
off. The prediction is computed from the artefacts (kernel, initrd, command line,
memory size) and must equal what the guest reads; the event log, parsed and replayed
by `ee.attestation.eventlog`, must equal them too.

Artefacts (the integrator points these at `eectl image build`'s output):

* ``EE_MEASURE_IMAGE=DIR`` -- use DIR/vmlinuz and DIR/cmdline; the test's init cpio
  is appended to DIR/initrd.img (a later cpio member overrides /init), so the initrd
  measured is the image's plus ours;
* otherwise the host's newest /boot/vmlinuz-* and an initrd of just our init;
* ``EE_MEASURE_MEMORY_MIB`` -- comma-separated memory sizes (default 512,2560: the
  second is between 2 GiB and 2.75 GiB, where QEMU's q35 initrd placement, and so the
  patched kernel's digest, depends on the memory size).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ee.attestation.eventlog import ALG_SHA256, parse_event_log, replay_pcrs
from ee.attestation.measure import predict

pytestmark = pytest.mark.slow

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT_S = 300
TEST_CMDLINE = "console=ttyS0 quiet panic=-1 ee.measure=test"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security
out=/dev/ttyS0
{
echo "EE-PCR4 $(cat /sys/class/tpm/tpm0/pcr-sha256/4)"
echo "EE-PCR9 $(cat /sys/class/tpm/tpm0/pcr-sha256/9)"
echo EE-LOG-BEGIN
base64 /sys/kernel/security/tpm0/binary_bios_measurements
echo EE-LOG-END
} > $out 2>&1
poweroff -f
"""


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    for fw in (OVMF_CODE, OVMF_VARS):
        if not fw.is_file():
            pytest.skip(f"{fw} is missing (apt-get install ovmf)")


def _busybox() -> Path:
    for p in (Path("/usr/bin/busybox"), Path("/bin/busybox")):
        if p.is_file():
            return p
    pytest.skip("busybox-static is not installed")


def _init_cpio(work: Path) -> bytes:
    root = work / "root"
    for d in ("bin", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    shutil.copy(_busybox(), root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    proc = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        input="\n".join([".", *names]).encode(),
        cwd=root,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return proc.stdout


def _artefacts(work: Path) -> tuple[Path, Path, str]:
    """(kernel, initrd, cmdline) to boot and predict."""
    ours = _init_cpio(work)
    initrd = work / "initrd.img"
    image = os.environ.get("EE_MEASURE_IMAGE")
    if image:
        d = Path(image)
        initrd.write_bytes((d / "initrd.img").read_bytes() + ours)
        return d / "vmlinuz", initrd, (d / "cmdline").read_text().strip()
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.skip("no /boot/vmlinuz-* (apt-get install linux-image-amd64)")
    initrd.write_bytes(ours)
    return kernels[-1], initrd, TEST_CMDLINE


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Path]:
    """A swtpm (TPM 2.0) whose control socket is yielded; killed and reaped afterwards."""
    _need("swtpm", "qemu-system-x86_64", "cpio")
    state = tmp_path / "tpm"
    state.mkdir()
    sock = tmp_path / "swtpm.sock"
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--ctrl", f"type=unixio,path={sock}", "--log", f"file={tmp_path / 'swtpm.log'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):  # the socket appears within milliseconds
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), f"swtpm did not start: {(tmp_path / 'swtpm.log').read_text()}"
        yield sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _boot(tmp_path: Path, sock: Path, kernel: Path, initrd: Path, cmdline: str, mib: int) -> str:
    vars_fd = tmp_path / "vars.fd"
    shutil.copy(OVMF_VARS, vars_fd)
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", str(mib), "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
        "-serial", "stdio",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
        "-chardev", f"socket,id=chrtpm,path={sock}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT_S, check=False
    )
    out = proc.stdout.decode("utf-8", "replace").replace("\r", "")
    assert proc.returncode == 0, f"qemu exited {proc.returncode}: {proc.stderr.decode()[-2000:]}"
    return out


MEMORY = [int(m) for m in os.environ.get("EE_MEASURE_MEMORY_MIB", "512,2560").split(",")]


@pytest.mark.parametrize("mib", MEMORY)
def test_predicted_pcr4_pcr9_equal_the_guests(tmp_path: Path, swtpm: Path, mib: int) -> None:
    kernel, initrd, cmdline = _artefacts(tmp_path)
    prediction = predict(
        kernel.read_bytes(), initrd.read_bytes(), cmdline, memory=mib * 1024 * 1024
    )
    out = _boot(tmp_path, swtpm, kernel, initrd, cmdline, mib)
    pcr4 = re.search(r"^EE-PCR4 ([0-9A-Fa-f]{64})$", out, re.M)
    pcr9 = re.search(r"^EE-PCR9 ([0-9A-Fa-f]{64})$", out, re.M)
    log_b64 = re.search(r"^EE-LOG-BEGIN\n(.*?)^EE-LOG-END$", out, re.M | re.S)
    assert pcr4 and pcr9 and log_b64, f"the guest printed no PCRs:\n{out[-3000:]}"
    guest = {4: bytes.fromhex(pcr4[1]), 9: bytes.fromhex(pcr9[1])}

    # The firmware's own log, parsed and replayed, explains the PCRs (the parser is right)
    log = parse_event_log(base64.b64decode(log_b64[1]))
    replayed = replay_pcrs(log, ALG_SHA256)
    assert {i: replayed[i] for i in (4, 9)} == guest
    logged = {
        i: [e.digests[ALG_SHA256] for e in log.events if e.index == i and e.event_type != 3]
        for i in (4, 9)
    }
    # ... and the prediction, from the artefacts alone, names the same events and values
    assert logged[4] == list(prediction.pcr4_events), "PCR4 events differ"
    assert logged[9] == list(prediction.pcr9_events), "PCR9 events differ"
    assert prediction.pcr4 == guest[4]
    assert prediction.pcr9 == guest[9]


def test_prediction_depends_on_what_was_booted() -> None:
    # the negative side, without a boot: another cmdline or initrd changes PCR9,
    # another memory size in QEMU's initrd-placement range changes PCR4
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.skip("no /boot/vmlinuz-*")
    k = kernels[-1].read_bytes()
    base = predict(k, b"initrd", "console=ttyS0", memory=2560 << 20)
    assert predict(k, b"initrd", "console=ttyS0 x", memory=2560 << 20).pcr9 != base.pcr9
    assert predict(k, b"initrd2", "console=ttyS0", memory=2560 << 20).pcr9 != base.pcr9
    assert predict(k, b"initrd", "console=ttyS0", memory=2304 << 20).pcr4 != base.pcr4
    assert predict(k, b"initrd", "console=ttyS0", memory=2560 << 20).pcr4 == base.pcr4
