"""From a create request to what gets made: the agent config, where it travels
(kernel cmdline or config drive), and the domain spec. Pure: no libvirt, no files.

The config goes on the kernel command line (``easyenclave.configz``) when the whole
cmdline fits the 2,048-byte safe limit; else on a config drive. A measured VM
(``--measure``) must have all its config in its measured cmdline, so there the
fallback is refused before anything is created.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import attrs

from ee.agent.bootconfig import encode_cmdline
from ee.agent.config import CMDLINE_LIMIT, AgentConfig
from ee.vm.domain import NAME_RE, Accel, DomainSpec, Labels
from ee.vm.errors import VmRefused
from ee.vm.sizes import VmSize

__all__ = [
    "AGENT_PLANE_PATH",
    "GUEST_HOST",
    "NONCE_FW_CFG",
    "SIM_FW_CFG",
    "CreateRequest",
    "VmPlan",
    "WorkDir",
    "agent_config",
    "guest_cp_url",
    "plan_vm",
]

AGENT_PLANE_PATH = "/api/v2/agents/connect"
#: the host's loopback as the guest sees it under QEMU user networking
GUEST_HOST = "10.0.2.2"
SIM_FW_CFG = "opt/easyenclave/sim-td.json"
#: measurement mode: the nonce the guest's quote binds (``ee.vm.measure``; not measured)
NONCE_FW_CFG = "opt/easyenclave/measure-nonce"
GUEST_SIM_DIR = "/run/easyenclave/sim"
GUEST_DATA_DIR = "/data/easyenclave"
_LOOPBACK_NAMES = ("localhost",)


@attrs.frozen
class CreateRequest:
    name: str
    image: Path
    size: VmSize
    root_dir: Path
    datacenter: str = "local:dev"
    cp: str | None = None  # the agent-plane URL (ws:// or wss://)
    api: str | None = None  # the CP's HTTP API, for --wait and status
    bootstrap_token: str | None = None
    dev: bool = False
    tpm: bool = False
    tdx: bool = False
    measure: bool = False
    accel: Accel = "tcg"
    role: Literal["agent", "cp"] = "agent"
    order_id: str | None = None
    #: cloud nodes: power off after this long without reaching the CP
    poweroff_after_s: float | None = None
    trusted_cp_mrtds: tuple[str, ...] = ()
    created: int = 0  # unix seconds, a label (prune spares young VMs)


@attrs.frozen
class WorkDir:
    """The files of one VM under its work dir."""

    path: Path

    kernel = property(lambda self: self.path / "vmlinuz")
    initrd = property(lambda self: self.path / "initrd.img")
    serial = property(lambda self: self.path / "serial.log")
    data_disk = property(lambda self: self.path / "data.qcow2")
    config_drive = property(lambda self: self.path / "config.iso")
    sim = property(lambda self: self.path / "sim-td.json")
    nvram = property(lambda self: self.path / "vars.fd")
    nonce = property(lambda self: self.path / "measure-nonce")
    marker = property(lambda self: self.path / "vm.json")


@attrs.frozen
class VmPlan:
    config: AgentConfig
    delivery: Literal["cmdline", "config-drive"]
    spec: DomainSpec
    workdir: WorkDir


def guest_cp_url(url: str, *, dev: bool) -> str:
    """The agent-plane URL as the guest must dial it.

    The path defaults to the agent plane's. Under ``--dev`` a loopback host (the dev CP
    on this machine) becomes 10.0.2.2, the host as user networking shows it; without
    ``--dev`` a loopback CP is refused (the guest's loopback is not the host's).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise VmRefused(f"--cp must be a ws:// or wss:// URL, got {url!r}")
    host = parts.hostname
    try:
        loopback = host in _LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    netloc = parts.netloc
    if loopback:
        if not dev:
            raise VmRefused(f"--cp {url} is this host's loopback, which the VM cannot reach; "
                            f"add --dev (it becomes {GUEST_HOST}, the host as the VM sees it)")
        port = parts.port
        netloc = GUEST_HOST + (f":{port}" if port is not None else "")
    path = parts.path if parts.path not in ("", "/") else AGENT_PLANE_PATH
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


def agent_config(req: CreateRequest) -> AgentConfig:
    provider: Literal["sim", "tpm", "tsm"] = "sim" if req.dev else (
        "tpm" if req.tpm and not req.tdx else "tsm")
    return AgentConfig(
        cp_url=guest_cp_url(req.cp, dev=req.dev) if req.cp is not None else None,
        vm_name=req.name, node_size=req.size.name, datacenter=req.datacenter,
        attestation_provider=provider, sim_dir=GUEST_SIM_DIR if provider == "sim" else None,
        data_dir=GUEST_DATA_DIR, bootstrap_token=req.bootstrap_token,
        reconnect_backoff_base_s=1.0, reconnect_backoff_max_s=10.0,
        terminal_action="poweroff" if req.poweroff_after_s is not None else "exit",
        unreachable_terminate_after_s=req.poweroff_after_s,
        trusted_cp_mrtds=req.trusted_cp_mrtds,
        measurement_mode=req.measure)


def _fw_cfg(req: CreateRequest, workdir: WorkDir) -> tuple[tuple[str, Path], ...]:
    items = [(SIM_FW_CFG, workdir.sim)] if req.dev else []
    if req.measure:
        items.append((NONCE_FW_CFG, workdir.nonce))
    return tuple(items)


def plan_vm(req: CreateRequest, *, image_cmdline: str, agent_port: int | None,
            limit: int = CMDLINE_LIMIT) -> VmPlan:
    """Everything to make for *req*; VmRefused when it cannot be done as asked."""
    if not NAME_RE.match(req.name):
        raise VmRefused(f"VM name must match {NAME_RE.pattern}, got {req.name!r}")
    if req.tdx and req.accel != "kvm":
        raise VmRefused("--tdx needs KVM (--accel kvm)")
    try:
        config = agent_config(req)
    except ValueError as exc:  # a field the agent would refuse (FieldValueError)
        raise VmRefused(f"agent config: {exc}") from None
    base = " ".join(image_cmdline.split())
    full = f"{base} {encode_cmdline(config)}"
    workdir = WorkDir(req.root_dir / req.name)
    size = len(full.encode("utf-8"))
    if size <= limit:
        delivery: Literal["cmdline", "config-drive"] = "cmdline"
        cmdline = full
    elif req.measure:
        raise VmRefused(f"the agent config needs a {size}-byte kernel cmdline, over the "
                        f"{limit}-byte limit, and --measure refuses a config drive (it is "
                        f"not measured); shorten the config (fewer trusted MRTDs, a "
                        f"shorter CP URL) or drop --measure")
    else:
        delivery, cmdline = "config-drive", base
    labels = Labels(role=req.role, size=req.size.name, datacenter=req.datacenter,
                    workdir=str(workdir.path), cp=req.cp, api=req.api,
                    agent_port=agent_port, order_id=req.order_id,
                    created=req.created)
    spec = DomainSpec(
        name=req.name, memory_mib=req.size.memory_mib, vcpus=req.size.vcpus,
        kernel=workdir.kernel, initrd=workdir.initrd, cmdline=cmdline,
        root=req.image / "root.img", serial_log=workdir.serial, labels=labels,
        accel=req.accel, data_disk=workdir.data_disk if req.size.disk_gib else None,
        config_drive=workdir.config_drive if delivery == "config-drive" else None,
        agent_port=agent_port, fw_cfg=_fw_cfg(req, workdir),
        tpm=req.tpm, nvram=workdir.nvram if req.tpm else None, tdx=req.tdx)
    return VmPlan(config=config, delivery=delivery, spec=spec, workdir=workdir)
