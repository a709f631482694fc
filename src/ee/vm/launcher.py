"""The provisioner's :class:`~ee.capacity.provisioner.Launcher` for libvirt: one VM per
launch order, made by :func:`ee.vm.manage.create_vm` with the order's bootstrap token
and labelled with its order id (so ``launched`` lists only what the provisioner made)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from ee.capacity.provisioner import LaunchFailed, LaunchRequest
from ee.vm.domain import Accel
from ee.vm.errors import VmError
from ee.vm.host import VmHost
from ee.vm.manage import create_vm, delete_vm
from ee.vm.plan import CreateRequest
from ee.vm.sizes import SizeError, resolve_size

__all__ = ["LibvirtLauncher"]


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
                create_vm(req, host, sim_chain=self.sim_chain)
        except (VmError, SizeError, ValueError) as exc:
            raise LaunchFailed(str(exc)) from None

    async def launch(self, request: LaunchRequest) -> None:
        await trio.to_thread.run_sync(self._create, request)

    def _destroy(self, vm_name: str) -> None:
        with VmHost(self.uri) as host:
            delete_vm(vm_name, host, self.root_dir)

    async def destroy(self, vm_name: str) -> None:
        await trio.to_thread.run_sync(self._destroy, vm_name)

    def _launched(self) -> dict[str, str]:
        with VmHost(self.uri) as host:
            return {d.name: d.state for d in host.ours() if d.labels.order_id is not None}

    async def launched(self) -> Mapping[str, str]:
        return await trio.to_thread.run_sync(self._launched)
