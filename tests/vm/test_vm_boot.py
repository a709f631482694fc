"""An agent VM through libvirt under QEMU/TCG, end to end with real parts:

``eectl vm create --dev --wait`` → the agent in the VM attests to a dev CP on the host
(10.0.2.2 through user networking; the sim chain through fw_cfg) and is online →
``examples/hello`` deployed into it, its base image pulled from a registry on the
host's loopback (10.0.2.2:5000 from the guest) → the page answers through the agent's
proxy on the forwarded loopback port → ``eectl vm delete`` leaves no domain and no
work dir. One VM at a time, 1.5 GiB, 2 vCPU; every wait bounded.

Slow: one TCG boot (about 80 s to registered on a 2-core machine) and a docker build
inside the VM.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from ee.vm.host import VmHost
from ee.vm.manage import delete_vm, free_port, serial_tail
from image.vmkit import dev_cp, running

from .conftest import eectl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
NAME = "ee-test-boot"
REGISTRY = "127.0.0.1:5000"  # the guest's 10.0.2.2:5000
GUEST_REGISTRY = "10.0.2.2:5000"
BASE = "ee-busybox:local"


async def registry_up() -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"http://{REGISTRY}/v2/")).status_code == 200
    except httpx.HTTPError:
        return False


@asynccontextmanager
async def registry(tmp: Path) -> AsyncIterator[None]:
    """The host's loopback registry: the running one (tools/vm/services), else one of
    our own for the duration of the test."""
    if await registry_up():
        yield
        return
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry missing (apt-get install docker-registry)")
    (tmp / "registry.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp / 'registry'}\n"
        f"http:\n  addr: {REGISTRY}\n")
    async with running(["docker-registry", "serve", str(tmp / "registry.yml")],
                       tmp / "registry.log"):
        with trio.fail_after(30):
            while not await registry_up():  # noqa: ASYNC110 (an outside process)
                await trio.sleep(0.2)
        yield


async def push_base() -> None:
    inspect = await trio.run_process(["docker", "image", "inspect", BASE], check=False,
                                     capture_stdout=True, capture_stderr=True)
    if inspect.returncode:
        await trio.run_process([str(ROOT / "tools/images/build_busybox.sh")],
                               capture_stdout=True)
    await trio.run_process(["docker", "tag", BASE, f"{REGISTRY}/{BASE}"])
    await trio.run_process(["docker", "push", "-q", f"{REGISTRY}/{BASE}"], capture_stdout=True)


#: A sidecar of hello in the same project that tries to reach the agent (the container
#: network's gateway is the VM, port 8080) and the host (10.0.2.2:5000, the registry,
#: which certainly listens) and leaves what it found where hello serves it.
PROBE = (
    "gw=$$(ip route | awk '/default/ {print $$3}'); "
    "for t in \"agent $$gw 8080\" \"host 10.0.2.2 5000\"; do set -- $$t; "
    "if echo | nc -w 5 $$2 $$3 >/dev/null 2>&1; then echo \"$$1 reached\"; "
    "else echo \"$$1 blocked\"; fi; done > /probe/result.tmp && "
    "mv /probe/result.tmp /probe/result; exec sleep 86400")


def hello_version() -> dict[str, Any]:
    """examples/hello with its base image named as the guest reaches it, plus the
    :data:`PROBE` sidecar (its findings at ``/probe/result`` on hello's site)."""
    dockerfile = (HELLO / "Dockerfile").read_text().replace(
        f"FROM {BASE}", f"FROM {GUEST_REGISTRY}/{BASE}")
    assert GUEST_REGISTRY in dockerfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile.encode())
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
        tar.add(HELLO / "www", arcname="www")
    compose = yaml.safe_load((HELLO / "docker-compose.yml").read_text())
    compose["services"]["web"]["volumes"] = ["probe:/www/probe"]
    compose["services"]["probe"] = {"build": ".", "init": True, "volumes": ["probe:/probe"],
                                    "command": ["sh", "-c", PROBE]}
    compose["volumes"] = {"probe": {}}
    return {"version": "1", "compose": yaml.safe_dump(compose, sort_keys=False),
            "build_context": base64.b64encode(buf.getvalue()).decode(),
            "expose_service": "web", "expose_port": 8080, "health_path": "/health"}


async def deploy_hello(base: str, token: str, port: int, serial: Path) -> None:
    """Deploy hello into the (only) agent and fetch its page through the agent's port
    (the loopback port forwarded to the guest's :8080); a failure names the deployment's
    error and the serial lines of dockerd and the agent."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as admin:
        key = (await admin.post("/api/v2/accounts", json={"name": "vm"})).json()
    async with httpx.AsyncClient(base_url=base, timeout=60, headers={
            "Authorization": f"Bearer {key['api_key']}"}) as tenant:
        assert (await tenant.post("/api/v2/apps", json={"name": "hello"})).status_code == 201
        r = await tenant.post("/api/v2/apps/hello/versions", json=hello_version())
        assert r.status_code == 201, r.text
        r = await tenant.post("/api/v2/apps/hello/deployments",
                              json={"version": "1", "replicas": 1})
        assert r.status_code == 202, r.text
        dep_id = r.json()["deployment_id"]
        with trio.fail_after(600):
            while True:
                d = (await tenant.get(f"/api/v2/deployments/{dep_id}")).json()
                if d["state"] == "running":
                    break
                assert not d.get("failures") and d["state"] not in ("failed", "stopped"), (
                    f"hello did not start in the VM: {d.get('error')}\n"
                    + "\n".join(line for line in serial_tail(serial, 400).splitlines()
                                if "dockerd[" in line or "ee-agent[" in line))
                await trio.sleep(3)
    path = httpx.URL(d["replicas"][0]["url"]).raw_path.decode()
    async with httpx.AsyncClient(timeout=30) as client:
        page = await client.get(f"http://127.0.0.1:{port}{path.rstrip('/')}/")
    assert page.status_code == 200 and "Hello from EasyEnclave" in page.text, page.text[:300]
    # the workload boundary (image/rootfs/usr/lib/easyenclave/ee-workload-firewall)
    async with httpx.AsyncClient(timeout=30) as client:
        with trio.fail_after(120):
            while True:
                probe = await client.get(
                    f"http://127.0.0.1:{port}{path.rstrip('/')}/probe/result")
                if probe.status_code == 200:
                    break
                await trio.sleep(3)
    assert probe.text.split("\n")[:2] == ["agent blocked", "host blocked"], probe.text


async def test_vm_registers_runs_hello_and_is_deleted(host: VmHost, vm_image: Path,
                                                      tmp_path: Path) -> None:
    # not under pytest's tmp (0700): QEMU runs as libvirt-qemu and must reach the work dir
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ee-vm-test-"))
    os.chmod(root, 0o711)
    port = free_port()
    try:
        async with dev_cp(tmp_path) as (base, plane, token, env), registry(tmp_path):
            await push_base()
            env = {**env, "EE_TOKEN": token}
            started = trio.current_time()
            with trio.fail_after(700):
                created = await trio.to_thread.run_sync(lambda: eectl(
                    "vm", "create", NAME, "--image", str(vm_image), "--size", "tiny",
                    "--memory", "1.5", "--vcpus", "2", "--disk", "4",
                    "--cp", f"ws://127.0.0.1:{plane}", "--dev", "--api", base,
                    "--agent-port", str(port), "--root", str(root), "--accel", "tcg",
                    "--wait", "--timeout", "600", env=env, timeout=660))
            registered = trio.current_time() - started
            assert created.returncode == 0, created.stdout + created.stderr
            assert "accel tcg (--accel), config via cmdline" in created.stdout
            assert "ee-init: root verified by dm-verity" in created.stdout  # progress
            assert f"{NAME} online as agent" in created.stdout
            info = host.info(NAME)
            assert info is not None and info.state == "running"
            assert info.labels.agent_port == port and info.labels.size == "tiny"
            status = eectl("vm", "status", NAME, "--root", str(root), env=env)
            assert '"status": "online"' in status.stdout, status.stderr
            listed = eectl("vm", "list", "--root", str(root), env=env)
            assert re.search(rf"{NAME}\s+running\s+agent\s+tiny", listed.stdout)

            async with httpx.AsyncClient(timeout=30) as client:
                health = (await client.get(f"http://127.0.0.1:{port}/.ee/health")).json()
            assert health["status"] == "healthy"  # the agent, through the forwarded port
            await deploy_hello(base, token, port, root / NAME / "serial.log")
            deployed = trio.current_time() - started
            print(f"\nTCG: vm create -> registered {registered:.0f}s, -> hello answering "
                  f"through the agent's port {deployed:.0f}s")
            done = eectl("vm", "delete", NAME, "--root", str(root), env=env)
            assert done.returncode == 0, done.stderr
            assert host.info(NAME) is None
            assert not (root / NAME).exists()
    finally:
        if host.info(NAME) is not None or (root / NAME).exists():
            delete_vm(NAME, host, root)
        shutil.rmtree(root, ignore_errors=True)
