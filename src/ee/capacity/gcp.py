"""A launcher of agent VMs on GCP: TDX confidential instances from a published image.

One `GcpLauncher` serves one GCP account and zone (a datacenter such as
``gcp-a:us-central1``). ``launch(order_id, bootstrap_token, size)`` inserts an instance
named after the launch order from the image `eectl image publish-gcp` created: machine
type from the node size (`GcpLaunchConfig.machine_types`), ``confidentialInstanceConfig:
{confidentialInstanceType: TDX}``, host maintenance TERMINATE (TDX VMs cannot live
migrate), Secure Boot off (the UKI is not signed by Microsoft's key; the vTPM and the
RTMRs measure it instead), vTPM on, the boot disk over NVMe, gVNIC, and the agent's
config — with the one-time bootstrap token — as the instance metadata item
``ee-agent-config`` (JSON of `ee.agent.config.AgentConfig`). Instances carry the label
``easyenclave=agent`` and ``ee-datacenter``; `list` and `count_instances` select on it,
so a project's other VMs are never counted or deleted.

Instance names are a pure function of the order id (`instance_name`), so a retried
launch of the same order finds its instance (409 from insert = already launched) instead
of making a second VM.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from ee.agent.config import AgentConfig, config_to_dict
from ee.capacity.provisioner import LaunchFailed as ProvisionLaunchFailed
from ee.capacity.provisioner import LaunchRequest, NameTaken
from ee.cloud.gcp import GcpApiError, GcpClient, GcpError, valid_resource_name

__all__ = [
    "AGENT_LABEL",
    "DEFAULT_MACHINE_TYPES",
    "METADATA_KEY",
    "GcpLaunchConfig",
    "GcpLauncher",
    "LaunchRefused",
    "count_instances",
    "instance_body",
    "instance_name",
]

METADATA_KEY = "ee-agent-config"
AGENT_LABEL = ("easyenclave", "agent")
#: node size -> machine type (C3 is the TDX machine series; the smallest is 4 vCPU)
DEFAULT_MACHINE_TYPES: Mapping[str, str] = {"tiny": "c3-standard-4",
                                            "standard": "c3-standard-4"}
_LABEL_VALUE = re.compile(r"[^a-z0-9_-]")


class LaunchRefused(GcpError):
    """The launcher will not launch this (unknown node size, bad order id)."""


def label_value(text: str) -> str:
    """*text* as a GCP label value (lower case, ``[a-z0-9_-]``, at most 63)."""
    return _LABEL_VALUE.sub("-", text.lower())[:63]


def instance_name(order_id: str, prefix: str = "ee-agent") -> str:
    """A valid, stable instance name for a launch order (a digest keeps it unique)."""
    if not order_id or len(order_id) > 200:
        raise LaunchRefused(f"order id of length {len(order_id)}")
    slug = re.sub(r"[^a-z0-9]+", "-", order_id.lower()).strip("-")[:24].strip("-")
    digest = hashlib.sha256(order_id.encode()).hexdigest()[:10]
    name = f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"
    if not valid_resource_name(name):
        raise LaunchRefused(f"cannot name an instance for order {order_id!r}")
    return name


@attrs.frozen
class GcpLaunchConfig:
    """One account's launch settings."""

    project: str
    zone: str
    image: str  # the image's selfLink or "projects/P/global/images/family/F"
    cp_url: str  # the agent-plane websocket URL agents connect to
    datacenter: str  # e.g. "gcp-a:us-central1"
    machine_types: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_MACHINE_TYPES))
    network: str = "global/networks/default"
    subnetwork: str | None = None
    disk_gb: int = 20
    disk_type: str = "pd-balanced"
    external_ip: bool = False
    attestation_provider: str = "tsm"
    service_account: str | None = None


def order_label(order_id: str) -> str:
    """The ``ee-order`` label: which launch order an instance was made for (a digest:
    label values are short and lower case)."""
    return hashlib.sha256(order_id.encode()).hexdigest()[:16]


def instance_body(config: GcpLaunchConfig, name: str, bootstrap_token: str,
                  size: str, *, order_id: str | None = None) -> dict[str, Any]:
    """The ``instances.insert`` request (pure)."""
    machine = config.machine_types.get(size)
    if machine is None:
        raise LaunchRefused(f"no GCP machine type for node size {size!r} "
                            f"(known: {', '.join(sorted(config.machine_types))})")
    agent = AgentConfig(cp_url=config.cp_url, vm_name=name, node_size=size,
                        datacenter=config.datacenter,
                        attestation_provider=config.attestation_provider,  # type: ignore[arg-type]
                        bootstrap_token=bootstrap_token)
    nic: dict[str, Any] = {"network": config.network, "nicType": "GVNIC"}
    if config.subnetwork:
        nic["subnetwork"] = config.subnetwork
    if config.external_ip:
        nic["accessConfigs"] = [{"type": "ONE_TO_ONE_NAT", "name": "external-nat"}]
    zone = f"zones/{config.zone}"
    body: dict[str, Any] = {
        "name": name,
        "machineType": f"{zone}/machineTypes/{machine}",
        "confidentialInstanceConfig": {"confidentialInstanceType": "TDX"},
        "scheduling": {"onHostMaintenance": "TERMINATE", "automaticRestart": False},
        "shieldedInstanceConfig": {"enableSecureBoot": False, "enableVtpm": True,
                                   "enableIntegrityMonitoring": True},
        "disks": [{
            "boot": True, "autoDelete": True, "interface": "NVME",
            "initializeParams": {"sourceImage": config.image,
                                 "diskSizeGb": str(config.disk_gb),
                                 "diskType": f"{zone}/diskTypes/{config.disk_type}"},
        }],
        "networkInterfaces": [nic],
        "metadata": {"items": [{"key": METADATA_KEY,
                                "value": json.dumps(config_to_dict(agent), sort_keys=True)}]},
        "labels": {AGENT_LABEL[0]: AGENT_LABEL[1],
                   "ee-datacenter": label_value(config.datacenter),
                   **({"ee-order": order_label(order_id)} if order_id else {})},
    }
    if config.service_account:
        body["serviceAccounts"] = [{"email": config.service_account, "scopes": []}]
    return body


class GcpLauncher:
    """Launch, delete and list this datacenter's agent instances (`Launcher` shape)."""

    def __init__(self, client: GcpClient, config: GcpLaunchConfig) -> None:
        self.client = client
        self.config = config

    def _filter(self) -> str:
        return (f"labels.{AGENT_LABEL[0]}={AGENT_LABEL[1]} AND "
                f"labels.ee-datacenter={label_value(self.config.datacenter)}")

    async def launch(self, order_id: str, bootstrap_token: str, size: str,
                     name: str | None = None) -> str:
        """Insert the order's instance (named *name*, default :func:`instance_name` of the
        order); its name. Idempotent per order id."""
        name = name or instance_name(order_id)
        body = instance_body(self.config, name, bootstrap_token, size, order_id=order_id)
        try:
            await self.client.insert_instance(self.config.project, self.config.zone, body)
        except GcpApiError as exc:
            if exc.status != 409:
                raise
            # alreadyExists: this order's own instance (a retried launch), or a name taken
            # by something else, which is left alone.
            if await self.order_of(name) != order_label(order_id):
                raise NameTaken(f"an instance named {name} exists and was not made for "
                                f"order {order_id}; leaving it alone") from None
        return name

    async def order_of(self, name: str) -> str | None:
        """The ``ee-order`` label of this datacenter's agent instance *name* (None: no such
        instance of ours, or unlabelled)."""
        items = await self.client.list_instances(self.config.project, self.config.zone,
                                                 self._filter())
        for item in items:
            if item.get("name") == name and _labelled(item, self.config.datacenter):
                label = (item.get("labels") or {}).get("ee-order")
                return str(label) if label else None
        return None

    async def delete(self, name: str) -> None:
        """Delete one of *our* instances (others are refused); gone already is fine."""
        if name not in await self.list():
            raise LaunchRefused(f"{name} is not an agent instance of {self.config.datacenter}")
        try:
            await self.client.delete_instance(self.config.project, self.config.zone, name)
        except GcpApiError as exc:
            if exc.status != 404:
                raise

    async def list(self) -> list[str]:
        """Names of this datacenter's agent instances (any state), sorted."""
        items = await self.client.list_instances(self.config.project, self.config.zone,
                                                 self._filter())
        return sorted(str(i["name"]) for i in items
                      if _labelled(i, self.config.datacenter) and "name" in i)


def _labelled(item: Mapping[str, Any], datacenter: str) -> bool:
    labels = item.get("labels") or {}
    return bool(labels.get(AGENT_LABEL[0]) == AGENT_LABEL[1]
                and labels.get("ee-datacenter") == label_value(datacenter))


#: instance statuses of a VM that is (or is becoming) up; anything else is stopped
LIVE_STATUSES = frozenset({"PROVISIONING", "STAGING", "RUNNING", "REPAIRING"})


class ProvisionerLauncher:
    """The provisioner's ``Launcher`` (``ee.capacity.provisioner``) over a
    :class:`GcpLauncher`: the instance is named with the provisioner's VM name (the
    agent registers under it, which is how the CP matches it to its launch order)."""

    def __init__(self, gcp: GcpLauncher) -> None:
        self.gcp = gcp

    async def launch(self, request: LaunchRequest) -> None:
        if request.datacenter != self.gcp.config.datacenter:
            raise ProvisionLaunchFailed(
                f"this launcher serves {self.gcp.config.datacenter}, not {request.datacenter}")
        try:
            await self.gcp.launch(request.order_id, request.bootstrap_token,
                                  request.node_size, name=request.vm_name)
        except NameTaken:
            raise
        except (GcpError, LaunchRefused) as exc:
            raise ProvisionLaunchFailed(str(exc)) from None

    async def destroy(self, vm_name: str) -> None:
        """Delete *vm_name* only when it is an instance a provisioner made for a launch
        order (it carries the ``ee-order`` label; the names carry a digest of the exact
        order id, so another order's instance never has this name)."""
        if await self.gcp.order_of(vm_name) is None:
            return  # not made for an order (an operator's), or gone already: left alone
        try:
            await self.gcp.delete(vm_name)
        except LaunchRefused:
            return

    async def launched(self) -> Mapping[str, str]:
        items = await self.gcp.client.list_instances(self.gcp.config.project,
                                                     self.gcp.config.zone, self.gcp._filter())
        return {str(i["name"]): "running" if i.get("status", "PROVISIONING") in LIVE_STATUSES
                else str(i.get("status")).lower()
                for i in items if _labelled(i, self.gcp.config.datacenter) and "name" in i}


async def count_instances(launcher: GcpLauncher) -> dict[str, int]:
    """For ``eectl capacity verify-clouds``: this datacenter's agent instances by status
    (``RUNNING``, ``PROVISIONING``, ``STAGING``, ``TERMINATED``, ...) and ``total``."""
    items = await launcher.client.list_instances(launcher.config.project,
                                                 launcher.config.zone, launcher._filter())
    counts: dict[str, int] = {"total": 0}
    for item in items:
        if not _labelled(item, launcher.config.datacenter):
            continue
        status = str(item.get("status", "UNKNOWN"))
        counts[status] = counts.get(status, 0) + 1
        counts["total"] += 1
    return counts
