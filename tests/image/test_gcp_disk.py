"""The GCP disk (`eectl image bake-gcp`) booted the way GCP boots it: UEFI from the disk.

* two bakes of the same image are byte-identical (the .tar.gz and its record);
* `eectl trust measure --disk` reads the UKI back from the ESP and predicts PCR4/5/9/11
  and RTMR1/2, and writes the node size entries;
* the baked disk, attached as an NVMe namespace (as GCP's TDX machines attach disks),
  boots under OVMF + swtpm (TCG here) through systemd-stub, the initramfs finds root and
  hash tree by GPT type and label, and the agent registers with a production CP whose
  policy is the prediction (verdict pass; the CP's measurement of the verified quote is
  SHA-256(PCR4 || PCR9) of the predicted values); the PCRs the guest prints equal the
  prediction (PCR5, PCR11 too);
* one flipped byte in the root partition: dm-verity refuses it and the VM panics;
* a second disk with the same partitions: the initramfs refuses to choose, the VM panics.

Slow: a bake (~15 s), two TCG boots.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from attestation import tpmkit
from ee.agent.bootconfig import write_config_drive
from ee.agent.config import AgentConfig
from ee.image.build import BuildResult
from ee.image.disk import BAKE_TOOLS, ROOT_LABEL, ROOT_TYPE, bake_gcp
from ee.image.qemu import OVMF_CODE, DiskVmSpec, choose_accel, disk_qemu_command

from .conftest import require_tools
from .test_image import flip_byte
from .test_tpm_boot import OVMF_VARS, TPM_TOOLS, eectl, serial_text
from .vmkit import free_port, production_cp, running, swtpm

pytestmark = pytest.mark.slow

NODE_SIZES = ("tiny", "standard")  # a UKI boot does not depend on the memory size


@attrs.frozen
class Baked:
    tarball: Path
    info: dict[str, object]
    disk: Path  # disk.raw extracted


@pytest.fixture(scope="module")
def baked(built_image: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Baked:
    require_tools(BAKE_TOOLS)
    d = tmp_path_factory.mktemp("gcp")
    tarball = d / "ee.tar.gz"
    result = bake_gcp(built_image.out, tarball, name="ee-agent", family="ee-agent")
    with tarfile.open(tarball) as tar:
        assert tar.getnames() == ["disk.raw"]
        member = tar.getmember("disk.raw")
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        tar.extract(member, d, filter="data")
    return Baked(tarball, result.info, d / "disk.raw")


def test_two_bakes_are_identical(baked: Baked, built_image: BuildResult,
                                 tmp_path: Path) -> None:
    again = tmp_path / "again.tar.gz"
    bake_gcp(built_image.out, again, name="ee-agent", family="ee-agent")
    assert again.read_bytes() == baked.tarball.read_bytes()
    assert Path(f"{again}.json").read_bytes() == Path(f"{baked.tarball}.json").read_bytes()
    head = baked.tarball.read_bytes()[:10]
    assert head[3] == 0 and head[4:8] == bytes(4)  # gzip: no name, no mtime
    assert baked.disk.stat().st_size % (1 << 30) == 0
    assert hashlib.sha256(baked.disk.read_bytes()).hexdigest() == baked.info["disk_sha256"]


def test_measure_disk_predicts_and_writes_policy(baked: Baked, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"mode": "strict"}))
    args = ["trust", "measure", "--disk", str(baked.tarball), "--json", "--policy-out",
            str(policy)]
    for size in NODE_SIZES:
        args += ["--node-size", size]
    doc = json.loads(eectl(*args))
    assert doc["cmdline"] == baked.info["cmdline"]
    assert f"ee.verity.roothash={baked.info['root_hash']}" in doc["cmdline"]
    assert [p["label"] for p in doc["partitions"]] == ["ESP", ROOT_LABEL, "ee-verity"]
    assert doc["pcr12"] == "0" * 64
    sizes = json.loads(policy.read_text())["node_sizes"]
    for size in NODE_SIZES:
        assert sizes[size] == {"pcr4": [doc["pcr4"]], "pcr9": [doc["pcr9"]],
                               "rtmr1": [doc["rtmr1"]], "rtmr2": [doc["rtmr2"]]}
    # the raw disk gives the same prediction as its tarball
    raw = json.loads(eectl("trust", "measure", "--disk", str(baked.disk), "--json"))
    assert {k: raw[k] for k in ("pcr4", "pcr9", "pcr11", "rtmr1")} == \
        {k: doc[k] for k in ("pcr4", "pcr9", "pcr11", "rtmr1")}


async def test_flipped_root_byte_does_not_boot(baked: Baked, tmp_path: Path) -> None:
    """One byte of the root partition flipped (block 0, past the squashfs superblock):
    the UKI and initramfs are intact, dm-verity refuses the block, the kernel panics."""
    require_tools({"qemu-system-x86_64": "qemu-system-x86"})
    root = next(p for p in baked.info["partitions"]  # type: ignore[attr-defined]
                if p["label"] == ROOT_LABEL)
    disk = tmp_path / "disk.raw"
    flip_byte(baked.disk, disk, root["first_lba"] * 512 + 3000)
    shutil.copyfile(OVMF_VARS, tmp_path / "vars.fd")
    serial = tmp_path / "serial.log"
    spec = DiskVmSpec(disk=disk, serial_log=serial, ovmf_code=OVMF_CODE,
                      ovmf_vars=tmp_path / "vars.fd", accel=choose_accel(), memory_mib=1024,
                      cpus=1)
    with trio.fail_after(300):
        async with running(disk_qemu_command(spec), tmp_path / "qemu.log") as qemu:
            await qemu.wait()
    log = serial_text(serial)
    assert "ee-init: root /dev/nvme0n1p2, verity hash tree /dev/nvme0n1p3" in log, log[-3000:]
    assert re.search(r"verity.*data block 0 is corrupted", log), log[-3000:]
    assert "Kernel panic" in log
    assert "ee-init: root verified" not in log


async def test_a_second_disk_with_the_root_refuses_to_boot(baked: Baked,
                                                          tmp_path: Path) -> None:
    """Root and tree are found by GPT type and label, on any disk: a second disk carrying
    matching partitions makes the choice ambiguous, and the initramfs refuses to pick."""
    require_tools({"qemu-system-x86_64": "qemu-system-x86", "cp": "coreutils"})
    twin = tmp_path / "twin.raw"
    with trio.fail_after(120):
        await trio.run_process(["cp", "--sparse=always", str(baked.disk), str(twin)])
    shutil.copyfile(OVMF_VARS, tmp_path / "vars.fd")
    serial = tmp_path / "serial.log"
    spec = DiskVmSpec(disk=baked.disk, serial_log=serial, ovmf_code=OVMF_CODE,
                      ovmf_vars=tmp_path / "vars.fd", accel=choose_accel(), memory_mib=1024,
                      cpus=1, drives=(twin,))
    with trio.fail_after(300):
        async with running(disk_qemu_command(spec), tmp_path / "qemu.log") as qemu:
            await qemu.wait()
    log = serial_text(serial)
    assert f"ee-init: FATAL: two partitions match GPT:{ROOT_TYPE}:{ROOT_LABEL}" in log, \
        log[-3000:]
    assert "Kernel panic" in log and "ee-init: root verified" not in log


async def test_baked_disk_boots_to_registered_agent(baked: Baked, tmp_path: Path) -> None:
    require_tools(TPM_TOOLS)
    for fw in (OVMF_CODE, OVMF_VARS):
        if not fw.is_file():
            pytest.skip(f"{fw} is missing (apt-get install ovmf)")
    ca = tpmkit.direct_ca(tmp_path / "ca")
    tpmkit.manufacture(ca, tmp_path / "tpm")
    (tmp_path / "ek-root.pem").write_bytes(ca.root_pem)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"mode": "strict",
                                  "node_sizes": {"tiny": {"providers": ["tpm"]}}}))
    predicted = json.loads(eectl("trust", "measure", "--disk", str(baked.tarball), "--json",
                                 "--policy-out", str(policy), "--node-size", "tiny"))
    eectl("cp", "bundle", "keygen", "--out", str(tmp_path / "offline"))
    data = tmp_path / "cp"
    eectl("cp", "bundle", "create", "--signing-key", f"{tmp_path / 'offline'}.key",
          "--out", str(data), "--cluster-id", "gcp-e2e", "--root", "intel",
          "--ek-root", str(tmp_path / "ek-root.pem"), "--policy", str(policy))
    async with production_cp(tmp_path, data, Path(f"{tmp_path / 'offline'}.pub")) as (
            base, plane, token, _):
        config = AgentConfig(
            cp_url=f"ws://10.0.2.2:{plane}/api/v2/agents/connect", vm_name="gcp-vm",
            node_size="tiny", attestation_provider="tpm", data_dir="/data/easyenclave",
            reconnect_backoff_base_s=1.0, reconnect_backoff_max_s=5.0)
        write_config_drive(config, tmp_path / "config.iso")
        shutil.copyfile(OVMF_VARS, tmp_path / "vars.fd")
        serial = tmp_path / "serial.log"
        spec = DiskVmSpec(disk=baked.disk, serial_log=serial, ovmf_code=OVMF_CODE,
                          ovmf_vars=tmp_path / "vars.fd", accel=choose_accel(),
                          memory_mib=2048, agent_port=free_port(),
                          drives=(tmp_path / "config.iso",), tpm_socket=tmp_path / "swtpm.sock")
        headers = {"Authorization": f"Bearer {token}"}
        async with swtpm(tmp_path / "tpm", tmp_path / "swtpm.sock", tmp_path / "swtpm.log"), \
                running(disk_qemu_command(spec), tmp_path / "qemu.log") as qemu, \
                httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as admin:
            started = trio.current_time()
            with trio.fail_after(600):
                while True:
                    assert qemu.returncode is None, serial_text(serial)[-3000:]
                    agents = (await admin.get("/api/v2/agents")).json()["agents"]
                    mine = [a for a in agents if a["vm_name"] == "gcp-vm"]
                    if mine and mine[0]["status"] == "online":
                        break
                    await trio.sleep(2)
            print(f"UEFI disk boot (UKI) to registered: {trio.current_time() - started:.0f}s "
                  f"({spec.accel})")
    attestation = mine[0]["attestation"]
    assert attestation["provider"] == "tpm"
    assert attestation["verdict"] == "pass" and attestation["violations"] == []
    pcr4, pcr9 = bytes.fromhex(predicted["pcr4"]), bytes.fromhex(predicted["pcr9"])
    assert attestation["mrtd"] == "tpm:" + hashlib.sha256(pcr4 + pcr9).hexdigest()
    log = serial_text(serial)
    printed = dict(re.findall(r"ee-pcr: sha256 (\d+) ([0-9a-f]{64})", log))
    assert printed == {"4": predicted["pcr4"], "5": predicted["pcr5"], "9": predicted["pcr9"],
                       "11": predicted["pcr11_running"], "12": predicted["pcr12"]}, log[-3000:]
    assert "ee-init: root /dev/nvme0n1p2, verity hash tree /dev/nvme0n1p3" in log
    assert "ee-init: root verified by dm-verity" in log
