"""``eectl capacity provision`` end to end with a real VM: a pool target on a dev CP opens
a launch order; the provisioner (a subprocess) claims it, creates a libvirt VM with the
order's bootstrap token; the VM's agent registers with it and the pool's warm count
goes from 0 to 1; the order is fulfilled. Everything is removed afterwards.

Slow: one TCG boot.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ee.vm.host import VmHost
from ee.vm.manage import delete_vm
from image.vmkit import dev_cp, running

pytestmark = pytest.mark.slow


async def test_capacity_provision_fulfils_a_launch_order(host: VmHost, vm_image: Path,
                                                         tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ee-vm-test-"))
    os.chmod(root, 0o711)
    try:
        async with dev_cp(tmp_path) as (base, plane, token, env):
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as admin:
                key = (await admin.post("/api/v2/accounts", json={
                    "name": "prov", "kind": "provisioner"})).json()["api_key"]

                async def tiny() -> dict[str, Any]:
                    pools = (await admin.get("/api/v2/capacity/pools")).json()["pools"]
                    return dict(next(p for p in pools if p["node_size"] == "tiny"))

                r = await admin.put("/api/v2/capacity/pools/local:dev/tiny",
                                    json={"min_warm": 1, "dispatch": True, "reason": "test"})
                assert r.status_code == 200, r.text
                assert (await tiny())["warm"] == 0
                argv = [sys.executable, "-m", "ee.ctl.main", "capacity", "provision",
                        "--cp", base, "--image", str(vm_image), "--pool", "local:dev/tiny",
                        "--agent-cp", f"ws://127.0.0.1:{plane}", "--dev", "--accel", "tcg",
                        "--memory", "1.5", "--vcpus", "2", "--disk", "4", "--max", "1",
                        "--poll", "2", "--root", str(root)]
                started = trio.current_time()
                async with running(argv, tmp_path / "provision.log",
                                   {**env, "EE_PROVISIONER_KEY": key}) as proc:
                    with trio.fail_after(700):
                        while (pool := await tiny())["warm"] < 1:
                            assert proc.returncode is None, \
                                (tmp_path / "provision.log").read_text()[-3000:]
                            await trio.sleep(3)
                print(f"\nTCG: order -> warm agent {trio.current_time() - started:.0f}s")
                assert pool["warm"] == 1
                orders = (await admin.get("/api/v2/capacity/launch-orders")).json()["orders"]
                (order,) = orders
                assert order["state"] == "fulfilled"
                agents = (await admin.get("/api/v2/agents")).json()["agents"]
                assert [a["vm_name"] for a in agents] == [order["vm_name"]]
                info = host.info(order["vm_name"])
                assert info is not None and info.labels.order_id == order["order_id"]
                log = (tmp_path / "provision.log").read_text()
                assert f"order {order['order_id']}: fulfilled by {order['vm_name']}" in log
    finally:
        for d in host.ours():
            if d.labels.workdir.startswith(str(root)):
                delete_vm(d.name, host, root)
        shutil.rmtree(root, ignore_errors=True)
