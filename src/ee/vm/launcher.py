"""The provisioner's :class:`~ee.capacity.provisioner.Launcher` for libvirt: one VM per
launch order, made by :func:`ee.vm.manage.create_vm` with the order's bootstrap token
and labelled with its order id (so ``launched`` lists only what the provisioner made).

A name is acted on only when the domain there carries the order id the name is derived
from (``vm_name_for(labels.order_id) == name``): a launch onto a taken name fails with
:class:`NameTaken` without touching the VM, and ``destroy`` leaves alone a VM it did not
make for that order (an operator's ``eectl vm create`` VM, say)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from ee.capacity.provisioner import LaunchFailed, LaunchRequest, NameTaken, vm_name_for
from ee.vm.domain import Accel
from ee.vm.errors import VmError
from ee.vm.host import DomainInfo, VmHost
from ee.vm.manage import create_vm, delete_vm
from ee.vm.plan import CreateRequest
from ee.vm.sizes import SizeError, resolve_size

__all__ = ["LibvirtLauncher", "made_for"]


def made_for(info: DomainInfo | None, vm_name: str) -> bool:
    """Whether *info* is the domain the provisioner made under *vm_name* for its order."""
    return (info is not None and info.labels.order_id is not None
            and vm_name_for(info.labels.order_id) == vm_name)


def _marker_made_for(work: Path, vm_name: str) -> bool:
    try:
        labels = json.loads((work / "vm.json").read_text())["labels"]
        order_id = labels["order_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(order_id, str) and vm_name_for(order_id) == vm_name


@attrs.frozen
class LibvirtLauncher:
    uri: str
    image: Path
    root_dir: Path
    cp: str  # the agent plane URL the VMs dial
    api: str | None = None
    dev: bool = False
    accel: Accel = "tcg"
    poweroff_after_s: float | None = None
    sim_chain: Path | None = None
    memory_gib: str | None = None
    vcpus: str | None = None
    disk_gib: str | None = None

    def _create(self, request: LaunchRequest) -> None:
        try:
            size = resolve_size(request.node_size, dict(os.environ),
                                memory_gib=self.memory_gib, vcpus=self.vcpus,
                                disk_gib=self.disk_gib)
            req = CreateRequest(
                name=request.vm_name, image=self.image, size=size, root_dir=self.root_dir,
                datacenter=request.datacenter, cp=self.cp, api=self.api,
                bootstrap_token=request.bootstrap_token, dev=self.dev, accel=self.accel,
                order_id=request.order_id, poweroff_after_s=self.poweroff_after_s,
                created=int(time.time()))
            with VmHost(self.uri) as host:
                try:
                    taken = host.info(request.vm_name)
                except VmError:  # a domain that is not an EasyEnclave VM
                    raise NameTaken(f"a VM named {request.vm_name} exists and is not "
                                    f"ours; leaving it alone") from None
                if taken is not None and taken.labels.order_id != request.order_id:
                    raise NameTaken(f"a VM named {request.vm_name} exists and was not made "
                                    f"for order {request.order_id}; leaving it alone")
                create_vm(req, host, sim_chain=self.sim_chain)
        except (VmError, SizeError, ValueError) as exc:
            raise LaunchFailed(str(exc)) from None

    async def launch(self, request: LaunchRequest) -> None:
        await trio.to_thread.run_sync(self._create, request)

    def _destroy(self, vm_name: str) -> None:
        with VmHost(self.uri) as host:
            try:
                info = host.info(vm_name)
            except VmError:
                return  # not an EasyEnclave VM: never ours to delete
            if info is not None and not made_for(info, vm_name):
                return  # not made for the order this name belongs to
            if info is None and not _marker_made_for(self.root_dir / vm_name, vm_name):
                return  # no domain, and no work dir made for this name's order
            delete_vm(vm_name, host, self.root_dir)

    async def destroy(self, vm_name: str) -> None:
        await trio.to_thread.run_sync(self._destroy, vm_name)

    def _launched(self) -> dict[str, str]:
        with VmHost(self.uri) as host:
            return {d.name: d.state for d in host.ours() if d.labels.order_id is not None}

    async def launched(self) -> Mapping[str, str]:
        return await trio.to_thread.run_sync(self._launched)
