"""`eectl vm` against the real libvirt, without booting: refusals create nothing, and
prune finds a planted orphan (a defined domain with our labels and a stray work dir)
that the dev CP does not know, removing them only with --yes."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import trio

from ee.vm.domain import domain_xml
from ee.vm.host import VmHost
from ee.vm.plan import CreateRequest, plan_vm
from ee.vm.sizes import PRESETS
from image.vmkit import dev_cp

from .conftest import eectl

NAME = "ee-test-cli"


def image_dir(tmp_path: Path) -> Path:
    """Enough of an image for planning (nothing boots here)."""
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "root.img"):
        (image / name).write_bytes(b"x")
    (image / "cmdline").write_text("console=ttyS0 panic=1 ee.verity.roothash=" + "a" * 64)
    return image


def nothing_left(host: VmHost, root: Path, name: str) -> None:
    assert host.info(name) is None
    assert not (root / name).exists()


def test_measure_refuses_the_config_drive_and_creates_nothing(host: VmHost,
                                                              tmp_path: Path) -> None:
    root = tmp_path / "vms"
    mrtds = [a for i in range(20)
             for a in ("--trust-cp-mrtd", hashlib.sha384(bytes([i])).hexdigest())]
    argv = ["vm", "create", NAME, "--image", str(image_dir(tmp_path)), "--size", "tiny",
            "--cp", "wss://cp.example", "--root", str(root), *mrtds]
    done = eectl(*argv, "--measure")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "--measure refuses a config drive" in done.stderr
    nothing_left(host, root, NAME)
    assert not root.exists() or not any(root.iterdir())


def test_tdx_is_refused_where_libvirt_lacks_it(host: VmHost, tmp_path: Path) -> None:
    if host.supports_tdx():
        pytest.skip("this libvirt supports TDX guests")
    root = tmp_path / "vms"
    done = eectl("vm", "create", NAME, "--image", str(image_dir(tmp_path)), "--tdx",
                 "--accel", "kvm", "--cp", "wss://cp.example", "--root", str(root))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"eectl vm create: --tdx: libvirt {host.version()} on this host offers no TDX guests "
        "(<launchSecurity type='tdx'> needs libvirt >= 11.0 on a TDX host); nothing was "
        "created")
    nothing_left(host, root, NAME)


def test_usage_errors(tmp_path: Path) -> None:
    image = str(image_dir(tmp_path))
    done = eectl("vm", "create", "Bad_Name", "--image", image, "--root", str(tmp_path))
    assert done.returncode == 1 and "VM name must match" in done.stderr
    done = eectl("vm", "create", NAME, "--image", image, "--memory", "0",
                 "--root", str(tmp_path))
    assert done.returncode == 1 and "--memory must be >= 0.25" in done.stderr
    done = eectl("vm", "create", NAME, "--image", str(tmp_path / "none"),
                 "--root", str(tmp_path))
    assert done.returncode == 1 and "is not a built image" in done.stderr
    done = eectl("vm", "create", NAME, "--image", image, "--cp", "ws://127.0.0.1:1",
                 "--root", str(tmp_path))
    assert done.returncode == 1 and "add --dev" in done.stderr


async def test_prune_finds_a_planted_orphan(host: VmHost, tmp_path: Path) -> None:
    root = tmp_path / "vms"
    req = CreateRequest(name=NAME, image=image_dir(tmp_path), size=PRESETS["tiny"],
                        root_dir=root, cp="wss://cp.example", created=int(time.time()) - 3600)
    plan = plan_vm(req, image_cmdline="console=ttyS0", agent_port=None)
    stray = root / "ee-test-stray"
    stray.mkdir(parents=True)
    (stray / "vm.json").write_text("{}")
    plan.workdir.path.mkdir()
    (plan.workdir.path / "vm.json").write_text("{}")
    host.conn.defineXML(domain_xml(plan.spec))  # defined, never started
    try:
        async with dev_cp(tmp_path) as (base, _plane, token, env):
            env = {**env, "EE_TOKEN": token, "EE_VM_ROOT": str(root)}
            dry = await trio.to_thread.run_sync(
                lambda: eectl("vm", "prune", "--api", base, env=env))
            assert dry.returncode == 0, dry.stderr
            assert f"domain {NAME}: no agent {NAME} at the CP (shutoff" in dry.stdout
            assert "workdir ee-test-stray: work dir without a domain" in dry.stdout
            assert "2 orphan(s); run again with --yes" in dry.stdout
            assert host.info(NAME) is not None and stray.exists()  # dry run: untouched
            young = await trio.to_thread.run_sync(
                lambda: eectl("vm", "prune", "--api", base, "--min-age", "7200", env=env))
            assert f"domain {NAME}" not in young.stdout  # younger than --min-age: spared
            done = await trio.to_thread.run_sync(
                lambda: eectl("vm", "prune", "--api", base, "--yes", env=env))
            assert done.returncode == 0, done.stderr
            assert f"removed domain {NAME}, work dir {plan.workdir.path}" in done.stdout
            nothing_left(host, root, NAME)
            assert not stray.exists()
    finally:
        if host.info(NAME) is not None:
            host.destroy(NAME)
