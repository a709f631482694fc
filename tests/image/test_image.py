"""The measured image, built once per session: its artefacts, a boot under QEMU in which
the agent registers with a real dev CP on the host, and a tampered root that must not boot.

Slow: a cold build takes minutes, a TCG boot about a minute.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from ee.agent.bootconfig import encode_cmdline
from ee.agent.config import AgentConfig
from ee.image.build import BuildResult
from ee.image.qemu import SIM_FW_CFG

from .vmkit import booted, dev_cp, free_port, vm_spec

pytestmark = pytest.mark.slow


def test_build_writes_the_artefacts_and_manifest(built_image: BuildResult) -> None:
    out = built_image.out
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("vmlinuz", "initrd.img", "root.img", "cmdline"):
        data = (out / name).read_bytes()
        assert manifest["artefacts"][name] == {
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    cmdline = (out / "cmdline").read_text()
    assert f"ee.verity.roothash={manifest['root_hash']}" in cmdline
    names = {p["name"] for p in manifest["packages"]}
    assert {"python3", "docker.io", "containerd", "cryptsetup-bin", "systemd"} <= names
    assert "easyenclave" in {p["name"] for p in manifest["python_packages"]}
    assert manifest["kernel"]["package"].startswith("linux-image-6.12.")
    assert isinstance(manifest["source_date_epoch"], int)
    files = (out / "rootfs.files").read_text()
    assert not re.search(r"\t/var/log/.+\n", files)
    assert "\t/usr/local/bin/ee-agent\n" in files
    # the host agrees with the root hash: veritysetup verify over the appended tree
    v = manifest["verity"]
    root = str(out / "root.img")
    ok = subprocess.run(["veritysetup", "verify", "--no-superblock",
                         f"--hash-offset={v['hash_offset']}",
                         f"--data-blocks={v['data_blocks']}", "--salt", v["salt"],
                         root, root, manifest["root_hash"]], capture_output=True)
    assert ok.returncode == 0, ok.stderr


def flip_byte(src: Path, dst: Path, offset: int) -> None:
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_tampered_root_does_not_boot(built_image: BuildResult, qemu_tools: None,
                                           tmp_path: Path) -> None:
    """One flipped byte in the squashfs (block 0, past the superblock, so squashfs itself
    would not notice) → dm-verity reports the block corrupted and the kernel panics."""
    tampered = tmp_path / "root.img"
    flip_byte(built_image.out / "root.img", tampered, 3000)
    serial = tmp_path / "serial.log"
    spec = vm_spec(built_image.out, serial, root=tampered, memory_mib=1024)
    with trio.fail_after(240):
        async with booted(spec, tmp_path / "qemu.log") as qemu:
            await qemu.wait()
    log = serial.read_text(errors="replace")
    assert re.search(r"verity.*data block 0 is corrupted", log), log[-3000:]
    assert "Kernel panic" in log
    assert "ee-init: root verified" not in log
    m = built_image.manifest
    v = m.verity
    bad = await trio.run_process(
        ["veritysetup", "verify", "--no-superblock", f"--hash-offset={v['hash_offset']}",
         f"--data-blocks={v['data_blocks']}", "--salt", str(v["salt"]), str(tampered),
         str(tampered), m.root_hash], capture_stdout=True, capture_stderr=True, check=False)
    assert bad.returncode != 0


async def test_agent_in_vm_registers_with_host_cp(built_image: BuildResult, qemu_tools: None,
                                                  tmp_path: Path) -> None:
    """Boot → the agent in the VM attests to a real dev CP on the host (through QEMU user
    networking, 10.0.2.2) and is admitted; the host reaches its HTTP port on loopback."""
    serial = tmp_path / "serial.log"
    async with dev_cp(tmp_path) as (base, plane, token, env):
        config = AgentConfig(
            cp_url=f"ws://10.0.2.2:{plane}/api/v2/agents/connect", vm_name="image-vm",
            attestation_provider="sim", sim_dir="/run/easyenclave/sim",
            data_dir="/data/easyenclave", reconnect_backoff_base_s=1.0,
            reconnect_backoff_max_s=5.0)
        port = free_port()
        data = tmp_path / "data.img"
        with data.open("wb") as f:
            f.truncate(1 << 30)  # sparse, blank: becomes /data under dm-crypt
        spec = vm_spec(built_image.out, serial, extra_cmdline=encode_cmdline(config),
                       agent_port=port, data_disk=data,
                       fw_cfg=((SIM_FW_CFG, Path(env["EE_SIM_DIR"]) / "sim-td.json"),))
        headers = {"Authorization": f"Bearer {token}"}
        async with booted(spec, tmp_path / "qemu.log") as qemu, \
                httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as admin:
            started = trio.current_time()
            with trio.fail_after(420):
                while True:
                    assert qemu.returncode is None, serial.read_text(errors="replace")[-3000:]
                    agents = (await admin.get("/api/v2/agents")).json()["agents"]
                    if any(a["vm_name"] == "image-vm" and a["status"] == "online"
                           for a in agents):
                        break
                    await trio.sleep(2)
            print(f"boot to registered: {trio.current_time() - started:.0f}s ({spec.accel})")
            async with httpx.AsyncClient(timeout=10) as client:
                health = (await client.get(f"http://127.0.0.1:{port}/.ee/health")).json()
            # the public view (the operator fields need the control secret, inside the VM)
            assert health == {"status": "healthy", "compose_hash": None, "deployments": []}
    log = re.sub(r"\x1b\[[0-9;]*m", "", serial.read_text(errors="replace"))
    assert "ee-init: root verified by dm-verity" in log
    assert "ee-data: /data is dm-crypt (ephemeral key) on /dev/vdb" in log
    assert "API listen on /run/docker.sock" in log  # dockerd up, data root on /data
    assert "ee-sim-material: sim chain in /run/easyenclave/sim" in log
