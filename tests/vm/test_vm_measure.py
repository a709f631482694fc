"""`eectl vm measure` with real parts: one OVMF + vTPM boot of the agent image in
measurement mode under QEMU/TCG (libvirt's swtpm, its EK certificate from
swtpm_localca); the guest's quote is verified and its PCR4/PCR9 equal
`eectl trust measure`'s prediction. The same VM is then measured again by name
(no second boot) with a replaced nonce (the quote no longer binds it: refused) and
with a different booted cmdline on record (a mismatch: exit 1).

Slow: one TCG boot with OVMF (about 1.5-3 minutes on a 2-core machine)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from ee.vm.host import VmHost
from ee.vm.manage import delete_vm

from .conftest import eectl

pytestmark = pytest.mark.slow


def test_measure_verifies_the_quote_and_matches_the_prediction(host: VmHost,
                                                                vm_image: Path) -> None:
    for tool, package in (("swtpm", "swtpm swtpm-tools"),):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install {package})")
    if not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file():
        pytest.skip("OVMF missing (apt-get install ovmf)")
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ee-vm-measure-"))
    os.chmod(root, 0o711)
    name = None
    try:
        done = eectl("vm", "measure", "--image", str(vm_image), "--memory", "2",
                     "--vcpus", "2", "--accel", "tcg", "--root", str(root), "--timeout",
                     "600", "--keep", timeout=700)
        found = re.search(r"measure: (ee-measure-[0-9a-f]{6}): quote verified", done.stdout)
        name = found[1] if found else None
        assert done.returncode == 0, done.stdout + done.stderr
        for pcr in ("pcr4", "pcr9"):
            assert re.search(rf"^{pcr}\s+([0-9a-f]{{64}})\s+\1\s+ok$", done.stdout, re.M), \
                done.stdout
        assert name is not None
        work = root / name

        again = eectl("vm", "measure", name, "--root", str(root))
        assert again.returncode == 0, again.stdout + again.stderr

        nonce = (work / "measure-nonce").read_text()
        (work / "measure-nonce").write_text(os.urandom(32).hex())
        stale = eectl("vm", "measure", name, "--root", str(root))
        assert stale.returncode == 1 and "QUALIFYING_DATA_MISMATCH" in stale.stderr, \
            stale.stdout + stale.stderr
        (work / "measure-nonce").write_text(nonce)

        xml = (work / "domain.xml").read_text()
        (work / "domain.xml").write_text(xml.replace("console=ttyS0", "console=ttyS1"))
        other = eectl("vm", "measure", name, "--root", str(root))
        assert other.returncode == 1, other.stdout + other.stderr
        assert re.search(r"^pcr9\s.*MISMATCH$", other.stdout, re.M), other.stdout
        assert re.search(r"^pcr4\s.*\sok$", other.stdout, re.M), other.stdout
    finally:
        if name is not None:
            delete_vm(name, host, root)
        assert not [d for d in host.ours() if d.name.startswith("ee-measure-")
                    and d.labels.workdir.startswith(str(root))]
        shutil.rmtree(root, ignore_errors=True)
