"""Libvirt domain XML for one agent (or CP) VM, built by a pure function.

:func:`domain_xml` turns a :class:`DomainSpec` into the XML libvirt defines; nothing
here touches libvirt, the disk or the clock, so every choice is testable (and checked
against libvirt's own schema with ``virt-xml-validate`` in the tests).

What the XML says, and why:

* ``type='qemu'`` (TCG) or ``type='kvm'``: the caller chooses (``ee.vm.host`` detects;
  a PVM-backed ``/dev/kvm`` hangs stock kernels, so TCG is the safe default).
* Direct kernel boot: kernel, initrd and cmdline (which carries the dm-verity root hash
  and, when it fits, the agent config) — the parts TDX/OVMF measure.
* Disks in a fixed order: the root image read-only (``vda``; never relabelled, as many
  VMs share it), the /data disk (qcow2, sparse) when there is one, then the config
  drive (read-only) when the config did not fit on the cmdline.
* ``<on_reboot>destroy``: a kernel panic (an unverifiable root) ends the domain, as
  QEMU's ``-no-reboot`` does; ACPI so that ``poweroff`` in the guest ends it too.
* Serial console to a file, the log ``--wait`` follows.
* Networking: QEMU user networking through ``<qemu:commandline>`` (libvirt 9.0's own
  ``<portForward>`` needs passt), with loopback-only ``hostfwd``s: the agent's port
  (a CP VM: its API, and its agent plane as an extra forward). The guest reaches the
  host's loopback services at 10.0.2.2.
* fw_cfg items (``<sysinfo type='fwcfg'>``): the dev sim chain for ``--dev`` VMs, the
  measurement nonce for ``--measure`` VMs (``ee.vm.measure``).
* ``--tpm``: OVMF (code read-only, a per-VM copy of the vars) and an emulated
  TPM 2.0 (``tpm-crb``, swtpm managed by libvirt).
* ``--tdx``: ``<launchSecurity type='tdx'>`` with the quote-generation service socket
  (libvirt >= 11 only; ``ee.vm.host`` refuses it where the host lacks support).
* ``<metadata>``: our labels (role, size, datacenter, network, work dir, CP) in our
  namespace; a domain without them is not ours and is never touched.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

import attrs

__all__ = [
    "GUEST_AGENT_PORT",
    "METADATA_NS",
    "NAME_RE",
    "Accel",
    "DomainSpec",
    "Labels",
    "domain_xml",
    "labels_from_xml",
]

Accel = Literal["tcg", "kvm"]
METADATA_NS = "https://easyenclave.dev/xmlns/vm/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")
GUEST_AGENT_PORT = 8080
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QGS_SOCKET = Path("/var/run/tdx-qgs/qgs.socket")
TDX_POLICY = "0x10000000"  # SEPT_VE_DISABLE; debug off


def _name(_inst: object, _attr: object, value: str) -> None:
    if not NAME_RE.match(value):
        raise ValueError(f"VM name must match {NAME_RE.pattern}, got {value!r}")


_LABEL_TEXT = re.compile(r"\A[\x21-\x7e]{1,512}\Z")


def _label(_inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not _LABEL_TEXT.match(value):
        raise ValueError(f"label {attr.name} must be 1..512 printable ASCII characters")


@attrs.frozen
class Labels:
    """What the domain's ``<metadata>`` records: enough for list/status/delete/prune."""

    role: Literal["agent", "cp"] = "agent"
    size: str = attrs.field(default="tiny", validator=_label)
    datacenter: str = attrs.field(default="local:dev", validator=_label)
    network: Literal["user"] = "user"
    workdir: str = attrs.field(default="/", validator=_label)
    cp: str | None = attrs.field(default=None, validator=_label)
    api: str | None = attrs.field(default=None, validator=_label)
    agent_port: int | None = None
    order_id: str | None = attrs.field(default=None, validator=_label)
    created: int = 0  # unix seconds


@attrs.frozen
class DomainSpec:
    name: str = attrs.field(validator=_name)
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    root: Path
    serial_log: Path
    labels: Labels
    accel: Accel = "tcg"
    data_disk: Path | None = None
    config_drive: Path | None = None
    agent_port: int | None = None
    guest_agent_port: int = GUEST_AGENT_PORT
    #: more loopback forwards (host port, guest port): a CP VM's API and agent plane
    extra_forwards: tuple[tuple[int, int], ...] = ()
    fw_cfg: tuple[tuple[str, Path], ...] = ()
    tpm: bool = False
    nvram: Path | None = None  # per-VM OVMF vars (with --tpm)
    ovmf_code: Path = OVMF_CODE
    ovmf_vars: Path = OVMF_VARS
    tdx: bool = False
    qgs_socket: Path = QGS_SOCKET
    emulator: str = "/usr/bin/qemu-system-x86_64"

    def __attrs_post_init__(self) -> None:
        if self.memory_mib < 256 or self.vcpus < 1:
            raise ValueError("a VM needs >= 256 MiB and >= 1 vCPU")
        if self.tdx and self.accel != "kvm":
            raise ValueError("a TDX VM needs KVM")
        ports = [p for f in self.extra_forwards for p in f]
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError("forwarded ports are 1..65535")
        if self.tpm and self.nvram is None:
            raise ValueError("--tpm needs a per-VM nvram path (OVMF vars)")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def _disk(devices: ET.Element, path: Path, dev: str, fmt: str, *, readonly: bool,
          relabel: bool = True) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type=fmt)
    source = _sub(disk, "source", file=str(path))
    if not relabel:
        _sub(source, "seclabel", model="dac", relabel="no")
    _sub(disk, "target", dev=dev, bus="virtio")
    if readonly:
        _sub(disk, "readonly")


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for *spec* (a string, deterministic)."""
    ET.register_namespace("ee", METADATA_NS)
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(dom, "name", spec.name)
    meta = _sub(dom, "metadata")
    labels = attrs.asdict(spec.labels)
    _sub(meta, f"{{{METADATA_NS}}}vm",
         **{k: str(v) for k, v in sorted(labels.items()) if v is not None})
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    if spec.fw_cfg:
        sysinfo = _sub(dom, "sysinfo", type="fwcfg")
        for name, path in spec.fw_cfg:
            _sub(sysinfo, "entry", name=name, file=str(path))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    if spec.tdx:
        _sub(os_el, "loader", str(spec.ovmf_code), type="rom")
    elif spec.tpm:
        _sub(os_el, "loader", str(spec.ovmf_code), readonly="yes", type="pflash")
        _sub(os_el, "nvram", str(spec.nvram), template=str(spec.ovmf_vars))
    _sub(os_el, "kernel", str(spec.kernel))
    _sub(os_el, "initrd", str(spec.initrd))
    _sub(os_el, "cmdline", spec.cmdline)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    else:
        _sub(dom, "cpu", mode="maximum")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    _sub(devices, "emulator", spec.emulator)
    _disk(devices, spec.root, "vda", "raw", readonly=True, relabel=False)
    letters = iter("bcdefg")
    if spec.data_disk is not None:
        _disk(devices, spec.data_disk, f"vd{next(letters)}", "qcow2", readonly=False)
    if spec.config_drive is not None:
        _disk(devices, spec.config_drive, f"vd{next(letters)}", "raw", readonly=True)
    _sub(devices, "controller", type="usb", model="none")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.serial_log))
    _sub(serial, "target", port="0")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    if spec.tpm:
        tpm = _sub(devices, "tpm", model="tpm-crb")
        _sub(tpm, "backend", type="emulator", version="2.0")
    _sub(devices, "memballoon", model="none")
    if spec.tdx:
        sec = _sub(dom, "launchSecurity", type="tdx")
        _sub(sec, "policy", TDX_POLICY)
        _sub(sec, "quoteGenerationService", path=str(spec.qgs_socket))
    netdev = "user,id=ee0"
    if spec.agent_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{spec.agent_port}-:{spec.guest_agent_port}"
    for host_port, guest_port in spec.extra_forwards:
        netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
    cmd = _sub(dom, f"{{{QEMU_NS}}}commandline")
    for arg in ("-netdev", netdev, "-device", "virtio-net-pci,netdev=ee0,bus=pcie.0,addr=0x1e"):
        _sub(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def labels_from_xml(xml: str) -> Labels | None:
    """Our labels from a domain's XML; None when the domain is not ours."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    found = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if found is None:
        return None
    a = dict(found.attrib)
    port = a.get("agent_port")
    try:
        created = int(a.get("created", "0"))
        return Labels(role=a.get("role", "agent"),  # type: ignore[arg-type]
                      size=a.get("size", "tiny"), datacenter=a.get("datacenter", "local:dev"),
                      network="user", workdir=a.get("workdir", "/"), cp=a.get("cp"),
                      api=a.get("api"), agent_port=int(port) if port else None,
                      order_id=a.get("order_id"), created=created)
    except (ValueError, TypeError):
        return None
