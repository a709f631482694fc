"""`eectl cp bootstrap` without booting: its refusals (each leaves nothing behind), the
domain and config drive it would make (`--dry-run`, checked with libvirt's schema),
the idempotency decision and the drive's contents."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pycdlib
import pytest
import trio

from ee.attestation.providers.sim import SIM_FILE
from ee.cp import bootstrap
from ee.ctl.cpvm import bundle_files, sim_material
from ee.vm.cpimage import guest_ref
from ee.vm.cpplan import (
    CMDLINE_CP_IMAGE,
    CpRequest,
    check_cp_image,
    domain_cmdline,
    existing_cp,
    plan_cp_vm,
)
from ee.vm.domain import Labels
from ee.vm.errors import VmRefused
from ee.vm.host import DomainInfo, VmHost
from ee.vm.manage import delete_vm, write_files_drive
from ee.vm.sizes import PRESETS

from .conftest import eectl

DIGEST = "sha256:" + "0123456789abcdef" * 4
REF = f"ghcr.io/easyenclave/cp@{DIGEST}"


def fake_image(tmp_path: Path) -> Path:
    """A directory with a built image's file names (the dry run reads only the cmdline)."""
    image = tmp_path / "image"
    image.mkdir(exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "root.img"):
        (image / name).write_bytes(b"x")
    (image / "cmdline").write_text("console=ttyS0 panic=1 ee.verity.roothash=" + "a" * 64)
    (image / "manifest.json").write_text('{"profile": "cp"}')
    return image


def dev_bundle(tmp_path: Path) -> Path:
    data = tmp_path / "cpdata"
    data.mkdir(mode=0o700)
    bootstrap.create_dev(data)
    return data


def run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return eectl("cp", "bootstrap", "cp-1", "--image", str(fake_image(tmp_path)),
                 "--root", str(tmp_path / "vms"), "--accel", "tcg", "--no-agent", *argv)


@pytest.mark.parametrize("ref", [None, "", "ghcr.io/easyenclave/cp:1.0",
                                 "ghcr.io/easyenclave/cp:latest",
                                 "ghcr.io/easyenclave/cp@sha256:" + "AB" * 32,
                                 "ghcr.io/easyenclave/cp@sha256:abc",
                                 "ghcr.io/easyenclave/cp@sha512:" + "ab" * 64,
                                 f"ghcr.io/easyenclave/cp@{DIGEST} --privileged",
                                 f"ghcr.io/easyenclave/cp:1.0@{DIGEST}x"])
def test_a_control_plane_image_without_a_digest_is_refused(ref: str | None) -> None:
    with pytest.raises(VmRefused, match="control_plane_image"):
        check_cp_image(ref)


@pytest.mark.parametrize("ref", [REF, f"localhost:5000/cp@{DIGEST}", f"cp@{DIGEST}",
                                 f"10.0.2.2:5000/team/ee-cp@{DIGEST}"])
def test_a_digest_reference_is_accepted(ref: str) -> None:
    assert check_cp_image(ref) == ref


def test_cli_refuses_a_tag_and_makes_nothing(tmp_path: Path) -> None:
    data = dev_bundle(tmp_path)
    done = run(tmp_path, "--bundle", str(data), "--control-plane-image", "ee-cp:latest")
    assert done.returncode == 1 and "a tag can be moved" in done.stderr, done.stderr
    assert not (tmp_path / "vms").exists()
    # nor without any image (the cp profile names none)
    done = run(tmp_path, "--bundle", str(data))
    assert done.returncode == 1 and "no control_plane_image" in done.stderr, done.stderr


def test_cli_refuses_a_bundle_the_cp_would_refuse(tmp_path: Path) -> None:
    data = dev_bundle(tmp_path)
    text = (data / "bootstrap.json").read_text()
    (data / "bootstrap.json").write_text(text.replace('"dev"', '"dev" ', 1) + " ")
    signed = (data / "bootstrap.json.sig").read_bytes()
    (data / "bootstrap.json.sig").write_bytes(bytes([signed[0] ^ 1]) + signed[1:])
    done = run(tmp_path, "--bundle", str(data), "--control-plane-image", REF, "--dry-run")
    assert done.returncode == 1 and "the CP would refuse this bundle" in done.stderr, \
        done.stderr
    assert not (tmp_path / "vms").exists()


def test_cli_refuses_a_production_bundle_whose_key_the_host_would_carry(
        tmp_path: Path) -> None:
    keys = tmp_path / "offline"
    assert eectl("cp", "bundle", "keygen", "--out", str(keys)).returncode == 0
    data = tmp_path / "prod"
    made = eectl("cp", "bundle", "create", "--signing-key", f"{keys}.key", "--out",
                 str(data), "--cluster-id", "c1", "--environment", "staging")
    assert made.returncode == 0, made.stderr
    done = run(tmp_path, "--bundle", str(data), "--bundle-pubkey", f"{keys}.pub",
               "--control-plane-image", REF)
    assert done.returncode == 1 and "must make its key inside the VM" in done.stderr, \
        done.stderr
    # signed by another key: refused as the CP would
    other = tmp_path / "other"
    assert eectl("cp", "bundle", "keygen", "--out", str(other)).returncode == 0
    done = run(tmp_path, "--bundle", str(data), "--bundle-pubkey", f"{other}.pub",
               "--control-plane-image", REF)
    assert done.returncode == 1 and "the CP would refuse this bundle" in done.stderr
    assert not (tmp_path / "vms").exists()


def test_the_bootstrap_agent_needs_an_agent_image(tmp_path: Path) -> None:
    done = eectl("cp", "bootstrap", "cp-1", "--image", str(fake_image(tmp_path)),
                 "--bundle", str(dev_bundle(tmp_path)), "--control-plane-image", REF)
    assert done.returncode == 2 and "--agent-image" in done.stderr, done.stderr
    assert not (tmp_path / "vms").exists()


def test_dry_run_shows_the_measured_image_two_loopback_ports_and_the_drive(
        tmp_path: Path) -> None:
    data = dev_bundle(tmp_path)
    done = run(tmp_path, "--bundle", str(data), "--control-plane-image", REF, "--dry-run",
               "--api-port", "18000", "--plane-port", "19000", "--memory", "2")
    assert done.returncode == 0, done.stderr
    xml, _, drive = done.stdout.rpartition("</domain>\n")
    xml += "</domain>\n"
    cmdline = domain_cmdline(xml)
    assert cmdline is not None and f"{CMDLINE_CP_IMAGE}={REF}" in cmdline.split()
    assert "easyenclave.role=cp" in cmdline.split()
    assert "hostfwd=tcp:127.0.0.1:18000-:8000,hostfwd=tcp:127.0.0.1:19000-:9000" in xml
    assert re.search(r'role="cp"', xml) and 'api="http://127.0.0.1:18000"' in xml
    assert drive.strip() == ("config drive: bootstrap.json, bootstrap.json.sig, cp.key, "
                             "sim-td.json")
    assert not (tmp_path / "vms").exists()
    if shutil.which("virt-xml-validate"):
        (tmp_path / "d.xml").write_text(xml)
        ok = subprocess.run(["virt-xml-validate", str(tmp_path / "d.xml"), "domain"],
                            capture_output=True, text=True, timeout=60, check=False)
        assert ok.returncode == 0, ok.stderr


def test_a_dev_bundle_carries_its_sim_material_and_nothing_else(tmp_path: Path) -> None:
    """The sim chain the bundle names travels on the drive (the CP in the VM reads it at
    that path); the admin token and other files of the data dir do not."""
    data = dev_bundle(tmp_path)
    (data / "records.db").write_bytes(b"not for the drive")
    files, dev = bundle_files(data, None)
    assert dev and sorted(files) == ["bootstrap.json", "bootstrap.json.sig", "cp.key",
                                     SIM_FILE]
    sim_dir = bootstrap.read_unverified(data / bootstrap.BUNDLE)["dev"]["sim_dir"]
    assert files[SIM_FILE] == (Path(sim_dir) / SIM_FILE).read_bytes()


@pytest.mark.parametrize("sim_dir", ["relative/sim", "/a/../etc", "/a/./b", "/a b/sim",
                                     "/a/$(reboot)", "/", "/a\nb", "/a:/b"])
def test_a_sim_dir_the_guest_would_mount_badly_is_refused(sim_dir: str) -> None:
    with pytest.raises(VmRefused, match="sim_dir"):
        sim_material(sim_dir)


def test_a_dev_bundle_whose_sim_material_is_gone_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VmRefused, match="sim material"):
        sim_material(str(tmp_path / "nosuch"))


def test_the_guest_pulls_the_cp_image_from_the_host_registry_by_the_same_digest() -> None:
    assert guest_ref(f"127.0.0.1:5000/ee-cp@{DIGEST}") == f"10.0.2.2:5000/ee-cp@{DIGEST}"
    with pytest.raises(ValueError, match="loopback registry"):
        guest_ref(f"ghcr.io/ee-cp@{DIGEST}")


def test_plan_refuses_what_cannot_be_made(tmp_path: Path) -> None:
    base = {"name": "cp-1", "image": tmp_path, "size": PRESETS["tiny"],
            "root_dir": tmp_path / "vms", "cp_image": REF,
            "bundle_files": {"bootstrap.json": b"{}"}, "api_port": 1, "plane_port": 2}
    plan = plan_cp_vm(CpRequest(**base), image_cmdline="console=ttyS0")  # type: ignore[arg-type]
    assert plan.spec.labels.role == "cp" and plan.spec.config_drive is not None
    for change, why in (({"plane_port": 1}, "must differ"),
                        ({"bundle_files": {"../x": b""}}, "file names"),
                        ({"bundle_files": {}}, "file names"),
                        ({"name": "CP_1"}, "VM name"),
                        ({"cp_image": "cp:1"}, "tag")):
        with pytest.raises(VmRefused, match=why):
            plan_cp_vm(CpRequest(**{**base, **change}),  # type: ignore[arg-type]
                       image_cmdline="console=ttyS0")
    with pytest.raises(VmRefused, match="limit"):
        plan_cp_vm(CpRequest(**base), image_cmdline="x" * 2100)  # type: ignore[arg-type]


def test_a_rerun_reuses_this_cp_and_refuses_anything_else() -> None:
    cp = DomainInfo("cp-1", "running", Labels(role="cp"))
    line = f"console=ttyS0 easyenclave.role=cp {CMDLINE_CP_IMAGE}={REF}"
    assert existing_cp(None, None, REF) is False
    assert existing_cp(cp, line, REF) is True
    with pytest.raises(VmRefused, match="another control_plane_image"):
        existing_cp(cp, line, REF.replace("0123", "4567"))
    with pytest.raises(VmRefused, match="another control_plane_image"):
        existing_cp(cp, None, REF)
    with pytest.raises(VmRefused, match="agent VM"):
        existing_cp(DomainInfo("cp-1", "running", Labels(role="agent")), line, REF)


def test_the_bundle_drive_holds_the_files_by_name(tmp_path: Path) -> None:
    files = {"bootstrap.json": b'{"a": 1}', "bootstrap.json.sig": os.urandom(64),
             "cp.key": b"KEY"}
    write_files_drive(files, tmp_path / "d.iso")
    assert (tmp_path / "d.iso").stat().st_mode & 0o777 == 0o600
    iso = pycdlib.PyCdlib()
    iso.open(str(tmp_path / "d.iso"))
    try:
        found = {}
        for name in files:
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            found[name] = out.getvalue()
    finally:
        iso.close()
    assert found == files
    with pytest.raises(FileExistsError):
        write_files_drive(files, tmp_path / "d.iso")


@pytest.mark.slow  # needs a built image (vm_image builds one when $EE_VM_IMAGE is unset)
def test_rerun_with_real_libvirt_reuses_the_cp_vm_and_refuses_another_image(
        host: VmHost, vm_image: Path, tmp_path: Path) -> None:
    """The CP VM is really defined and started (its boot is not awaited: the run stops
    it again right away); a re-run makes nothing, another image is refused, and
    ``vm delete`` removes it."""
    data = dev_bundle(tmp_path)
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ee-cp-test-"))
    os.chmod(root, 0o711)
    name = "ee-test-cp"
    try:
        refused = eectl("cp", "bootstrap", "x", "--image", str(vm_image), "--bundle", str(data),
                        "--control-plane-image", REF, "--root", str(root), "--dry-run",
                        "--no-agent")
        assert refused.returncode == 1 and "'agent' profile" in refused.stderr, refused.stderr
        # the agent image's files under a cp manifest: what is tested here is the
        # bootstrap's handling of libvirt, not the cp image (its boot needs a CP image)
        image = root / "image"
        image.mkdir(mode=0o755)
        for part in ("vmlinuz", "initrd.img", "root.img", "cmdline"):
            shutil.copyfile(vm_image / part, image / part)
            os.chmod(image / part, 0o644)
        (image / "manifest.json").write_text('{"profile": "cp"}')
        argv = ("cp", "bootstrap", name, "--image", str(image), "--bundle", str(data),
                "--control-plane-image", REF, "--root", str(root), "--accel", "tcg",
                "--memory", "1", "--vcpus", "1", "--disk", "0", "--no-agent")
        first = eectl(*argv)
        assert first.returncode == 0, first.stderr
        assert f"created CP VM {name}" in first.stdout
        info = host.info(name)
        assert info is not None and info.labels.role == "cp"
        again = eectl(*argv)
        assert again.returncode == 0 and "not recreated" in again.stdout, again.stderr
        other = eectl(*[a if a != REF else REF.replace("0123", "4567") for a in argv])
        assert other.returncode == 1 and "another control_plane_image" in other.stderr
        assert eectl("vm", "delete", name, "--root", str(root)).returncode == 0
        assert host.info(name) is None and not (root / name).exists()
    finally:
        if host.info(name) is not None:
            delete_vm(name, host, root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # two TCG boots, the CP image pulled into the CP VM (3-6 min here)
async def test_bootstrap_boots_a_cp_vm_until_ready_and_its_agent_registers(
        host: VmHost, cp_vm_image: Path, vm_image: Path, tmp_path: Path) -> None:
    """The real thing: the CP container image built here and pushed to the loopback
    registry, a CP VM that pulls it by digest and runs it with a dev bundle (and its sim
    material) from the drive until ``/api/v2/ready`` answers through the forwarded
    loopback port, then the bootstrap agent VM registered with that CP. A re-run makes
    nothing; both VMs are deleted whatever happens."""
    from ee.image.build import Progress, default_cache_dir
    from ee.vm.cpimage import build_cp_image

    from .test_vm_boot import registry

    data = dev_bundle(tmp_path)
    token = (data / bootstrap.ADMIN_TOKEN).read_text().strip()
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ee-cp-test-"))
    os.chmod(root, 0o711)
    name, agent = "ee-test-cpboot", "ee-test-cpboot-agent-1"
    env = {**os.environ, "EE_VM_TINY_MEMORY_GIB": "1.5", "EE_VM_TINY_VCPUS": "2",
           "EE_VM_TINY_DISK_GIB": "4"}
    try:
        async with registry(tmp_path):
            with trio.fail_after(600):  # cold: a debootstrap; warm: seconds
                ref = guest_ref(await trio.to_thread.run_sync(
                    lambda: build_cp_image(default_cache_dir(), Progress())))
            argv = ("cp", "bootstrap", name, "--image", str(cp_vm_image), "--bundle",
                    str(data), "--control-plane-image", ref, "--root", str(root),
                    "--accel", "tcg", "--memory", "2", "--vcpus", "2", "--disk", "4",
                    "--agent-image", str(vm_image), "--wait-ready", "--timeout", "840")
            started = trio.current_time()
            with trio.fail_after(900):
                first = await trio.to_thread.run_sync(
                    lambda: eectl(*argv, env=env, timeout=880))
            took = trio.current_time() - started
            assert first.returncode == 0, first.stdout + first.stderr
            assert f"created CP VM {name}" in first.stdout
            assert "ee-cp-vm: starting" in first.stdout  # the guest's script, followed
            api = re.search(r"API (http://127\.0\.0\.1:\d+)", first.stdout)
            assert api is not None and f"CP at {api[1]} is ready" in first.stdout
            assert f"{agent} registered" in first.stdout, first.stdout
            print(f"\nTCG: cp bootstrap -> CP ready and bootstrap agent registered "
                  f"{took:.0f}s")
            async with httpx.AsyncClient(base_url=api[1], timeout=30) as client:
                assert (await client.get("/api/v2/ready")).status_code == 200
                listed = await client.get("/api/v2/agents",
                                          headers={"Authorization": f"Bearer {token}"})
            assert listed.status_code == 200, listed.text
            mine = [a for a in listed.json()["agents"] if a.get("vm_name") == agent]
            assert [a["status"] for a in mine] == ["online"], listed.text
            with trio.fail_after(300):
                again = await trio.to_thread.run_sync(
                    lambda: eectl(*argv, env=env, timeout=280))
            assert again.returncode == 0, again.stdout + again.stderr
            assert f"CP VM {name} exists" in again.stdout
            assert f"bootstrap agent VM {agent} exists" in again.stdout
            assert "created CP VM" not in again.stdout
            assert "created bootstrap" not in again.stdout
    finally:
        for vm in (agent, name):
            if host.info(vm) is not None:
                delete_vm(vm, host, root)
        shutil.rmtree(root, ignore_errors=True)
