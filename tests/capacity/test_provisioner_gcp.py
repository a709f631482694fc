"""The provisioner launching GCP confidential instances, against the loopback stand-in
of the Compute Engine API (tests/image/gcp_standin.py; the real API is not reachable
here): a launch order becomes an instance whose metadata carries the agent config and
the order's bootstrap token; the "instance" boots (a sim agent started from exactly
that metadata, as the image's ee-gcp-config unit would), registers, and the order is
fulfilled; ``eectl capacity verify-clouds --gcp`` counts it; a stopped instance is
reaped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cp"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpkit import RunningCp, running_cp
from test_provisioner import FAST, SETTINGS, fast_pools, orders, pool, provisioner_key
from test_sessions import wait_until

from ee.capacity.gcp import GcpLaunchConfig, GcpLauncher, ProvisionerLauncher, order_label
from ee.capacity.provisioner import Provisioner
from ee.cloud.gcp import GcpClient, TokenSource, load_service_account
from ee.ctl.capacity import gcp_counts
from image.gcp_standin import StandIn
from image.test_gcp_publish import key_file, standin  # noqa: F401 -- fixtures

DATACENTER = "local:dev"  # the pool SETTINGS serves (test_provisioner.POOL)


def _agent_config(instance: dict[str, Any]) -> dict[str, Any]:
    items = {i["key"]: i["value"] for i in instance["metadata"]["items"]}
    return dict(json.loads(items["ee-agent-config"]))


async def test_an_order_becomes_a_gcp_instance_whose_agent_joins_the_pool(
        tmp_path: Path, standin: StandIn, key_file: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    booted: set[str] = set()
    with trio.fail_after(90):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as vms:
            fast_pools(env)
            key = await provisioner_key(env)

            async def boot_new_instances(env: RunningCp) -> None:
                """The cloud: each new instance's agent starts from its metadata."""
                while True:
                    for (_, _, name), instance in list(standin.instances.items()):
                        if name in booted or instance.get("status") == "TERMINATED":
                            continue
                        booted.add(name)
                        config = _agent_config(instance)
                        agent = env.agent(config["vm_name"],
                                          bootstrap_token=config["bootstrap_token"],
                                          node_size=config["node_size"])
                        vms.start_soon(agent.run_forever)
                    await trio.sleep(0.05)

            # An operator's instance with the agent labels but made for no order: the
            # provisioner never deletes it, stopped or not.
            standin.instances[("proj", "us-central1-a", "ops-debug")] = {
                "name": "ops-debug", "status": "TERMINATED",
                "labels": {"easyenclave": "agent", "ee-datacenter": "local-dev"}}
            booted.add("ops-debug")
            vms.start_soon(boot_new_instances, env)
            async with httpx.AsyncClient(timeout=10) as gcp_http, httpx.AsyncClient(
                    base_url=env.http, timeout=10,
                    headers={"Authorization": f"Bearer {key}"}) as client, \
                    trio.open_nursery() as n:
                gcp = GcpClient(gcp_http, TokenSource(load_service_account(key_file), gcp_http),
                                storage_url=standin.base,
                                compute_url=f"{standin.base}/compute/v1")
                launcher = GcpLauncher(gcp, GcpLaunchConfig(
                    project="proj", zone="us-central1-a", datacenter=DATACENTER,
                    image="projects/proj/global/images/family/easyenclave-agent",
                    cp_url=env.agent_url))
                prov = await n.start(Provisioner(client, ProvisionerLauncher(launcher),
                                                 SETTINGS, say=print).run)

                async def warm() -> dict[str, Any] | None:
                    p = await pool(env)
                    return p if p["warm"] == 1 else None

                await wait_until(warm, "the GCP instance's agent warm in the pool")

                async def fulfilled() -> dict[str, Any] | None:
                    (order,) = await orders(env)
                    return order if order["state"] == "fulfilled" else None

                order = await wait_until(fulfilled, "the order reported fulfilled")
                ((_, _, name), instance), = [
                    (k, v) for k, v in standin.instances.items() if k[2] != "ops-debug"]
                assert instance["labels"]["ee-order"] == order_label(order["order_id"])
                assert order["vm_name"] == name
                config = _agent_config(instance)
                assert config["bootstrap_token"].startswith("eebt1.")
                assert instance["confidentialInstanceConfig"]["confidentialInstanceType"] \
                    == "TDX"

                # verify-clouds counts it (credentials and endpoint from the environment).
                monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
                monkeypatch.setenv("EE_GCP_COMPUTE_URL", f"{standin.base}/compute/v1")
                lines, ok = await trio.to_thread.run_sync(
                    gcp_counts, [f"{DATACENTER}=proj/us-central1-a"])
                assert ok and lines[0].startswith(f"{DATACENTER}: 2 instances"), lines  # + ops
                lines, ok = await trio.to_thread.run_sync(gcp_counts, ["bad-target"])
                assert not ok and "expected DATACENTER=PROJECT/ZONE" in lines[0]

                # The instance stops (a powered-off agent): the provisioner deletes it.
                instance["status"] = "TERMINATED"
                await wait_until(lambda: list(standin.instances) == [
                    ("proj", "us-central1-a", "ops-debug")], "the stopped instance deleted")
                prov.request_stop()
            vms.cancel_scope.cancel()
