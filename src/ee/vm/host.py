"""The libvirt side of `eectl vm`: thin, blocking calls over libvirt-python.

Nothing here decides anything; it defines, starts, stops and lists domains and reads
what the host offers (TDX support, the QEMU user). Callers in Trio run these through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import attrs

from ee.vm.domain import Labels, labels_from_xml
from ee.vm.errors import VmError

__all__ = ["DomainInfo", "VmHost", "open_host"]

_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown",
           5: "shutoff", 6: "crashed", 7: "pmsuspended"}


@attrs.frozen
class DomainInfo:
    name: str
    state: str
    labels: Labels


def _libvirt() -> Any:
    try:
        import libvirt  # type: ignore[import-untyped]
    except ImportError:
        raise VmError("libvirt-python is not installed (pip install libvirt-python; it "
                      "needs libvirt-dev and pkg-config: apt-get install libvirt-dev "
                      "pkg-config)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
    return libvirt


class VmHost:
    def __init__(self, uri: str) -> None:
        self.libvirt = _libvirt()
        self.uri = uri
        try:
            self.conn = self.libvirt.open(uri)
        except self.libvirt.libvirtError as exc:
            raise VmError(f"cannot connect to libvirt at {uri}: {exc} (is libvirtd "
                          f"running? start it with tools/vm/services)") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> VmHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> str:
        v = int(self.conn.getLibVersion())
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def supports_tdx(self) -> bool:
        """True when libvirt's domain capabilities list TDX launch security."""
        try:
            caps = self.conn.getDomainCapabilities(None, "x86_64", "q35", "kvm", 0)
        except self.libvirt.libvirtError:
            return False
        root = ET.fromstring(caps)
        if root.find("features/tdx[@supported='yes']") is not None:
            return True
        values = root.findall("features/launchSecurity/enum[@name='sectype']/value")
        return any(v.text == "tdx" for v in values)

    def qemu_user(self) -> tuple[int, int]:
        """The uid/gid QEMU runs as under this connection (the DAC base label)."""
        caps = self.conn.getCapabilities()
        found = re.search(r"<baselabel type='(?:kvm|qemu)'>\+(\d+):\+(\d+)</baselabel>", caps)
        if found is None:
            return 0, 0
        return int(found[1]), int(found[2])

    def _lookup(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError:
            return None

    def info(self, name: str) -> DomainInfo | None:
        """Our domain *name*; None when there is none, VmError when it is not ours."""
        dom = self._lookup(name)
        if dom is None:
            return None
        labels = labels_from_xml(dom.XMLDesc(0))
        if labels is None:
            raise VmError(f"domain {name} exists but is not an EasyEnclave VM; not touching it")
        return DomainInfo(name, _STATES.get(dom.state()[0], "unknown"), labels)

    def ours(self) -> list[DomainInfo]:
        out = []
        for dom in self.conn.listAllDomains(0):
            labels = labels_from_xml(dom.XMLDesc(0))
            if labels is not None:
                out.append(DomainInfo(dom.name(), _STATES.get(dom.state()[0], "unknown"),
                                      labels))
        return sorted(out, key=lambda d: d.name)

    def define_and_start(self, xml: str) -> None:
        try:
            dom = self.conn.defineXML(xml)
        except self.libvirt.libvirtError as exc:
            raise VmError(f"libvirt refused the domain: {exc}") from None
        try:
            dom.create()
        except self.libvirt.libvirtError as exc:
            self._undefine(dom)
            raise VmError(f"libvirt could not start the domain: {exc}") from None

    def _undefine(self, dom: Any) -> None:
        lv = self.libvirt
        flags = lv.VIR_DOMAIN_UNDEFINE_NVRAM | getattr(lv, "VIR_DOMAIN_UNDEFINE_TPM", 0)
        try:
            dom.undefineFlags(flags)
        except lv.libvirtError:
            dom.undefine()

    def destroy(self, name: str) -> bool:
        """Stop and undefine *name* (ours only); False when there was no such domain."""
        if self.info(name) is None:
            return False
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
        except self.libvirt.libvirtError as exc:
            if self._lookup(name) is not None and dom.isActive():
                raise VmError(f"cannot stop {name}: {exc}") from None
        try:
            self._undefine(dom)
        except self.libvirt.libvirtError as exc:
            if self._lookup(name) is not None:
                raise VmError(f"cannot undefine {name}: {exc}") from None
        return True


def open_host(uri: str) -> VmHost:
    return VmHost(uri)
