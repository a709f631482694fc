"""QEMU command lines for booting a built image by direct kernel boot.

:func:`qemu_command` is pure: a :class:`VmSpec` in, an argv out. The VM gets the root
image read-only as the first virtio disk (``/dev/vda``), an optional data disk
(``/dev/vdb``, encrypted with an ephemeral key inside), optional extra read-only drives
(a config-drive ISO), user networking where the guest reaches the host's loopback
services at 10.0.2.2 and the host reaches the guest's agent through a loopback-only
``hostfwd``, the serial console in a file, and ``-no-reboot`` so a kernel panic (a
refused root, say) ends QEMU. With OVMF (and optionally swtpm) the firmware measures the
kernel, initrd and cmdline into the vTPM — the evidence path the ``tpm`` provider uses.

Acceleration is chosen at run time by :func:`choose_accel`: KVM only when ``/dev/kvm``
is usable and not PVM-backed (a stock kernel hangs under PVM), else TCG.
``$EE_QEMU_ACCEL`` (``tcg``/``kvm``) overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import attrs

__all__ = [
    "QEMU_TOOLS",
    "SIM_FW_CFG",
    "DiskVmSpec",
    "VmSpec",
    "choose_accel",
    "disk_qemu_command",
    "qemu_command",
    "swtpm_command",
]

Accel = Literal["tcg", "kvm"]
QEMU_TOOLS = {"qemu-system-x86_64": "qemu-system-x86"}
#: fw_cfg name under which a dev host hands the sim chain to the guest
SIM_FW_CFG = "opt/easyenclave/sim-td.json"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")


def choose_accel(env: dict[str, str] | None = None, sys_module: Path = Path("/sys/module"),
                 dev_kvm: Path = Path("/dev/kvm")) -> Accel:
    """``kvm`` where it is usable, else ``tcg`` (``$EE_QEMU_ACCEL`` wins)."""
    env = dict(os.environ) if env is None else env
    forced = env.get("EE_QEMU_ACCEL")
    if forced in ("tcg", "kvm"):
        return forced  # type: ignore[return-value]
    if not os.access(dev_kvm, os.R_OK | os.W_OK) or (sys_module / "kvm_pvm").exists():
        return "tcg"
    return "kvm"


@attrs.frozen
class VmSpec:
    """Everything one boot needs; paths are host paths."""

    kernel: Path
    initrd: Path
    root: Path
    cmdline: str
    serial_log: Path
    accel: Accel = "tcg"
    memory_mib: int = 2048
    cpus: int = 2
    #: host loopback port forwarded to the guest's agent port
    agent_port: int | None = None
    guest_agent_port: int = 8080
    data_disk: Path | None = None
    drives: tuple[Path, ...] = ()
    #: (name, host file) items readable in the guest under /sys/firmware/qemu_fw_cfg
    fw_cfg: tuple[tuple[str, Path], ...] = ()
    ovmf_code: Path | None = None
    ovmf_vars: Path | None = None
    tpm_socket: Path | None = None


def _machine(binary: str, accel: Accel, cpus: int, memory_mib: int,
             serial_log: Path) -> list[str]:
    return [
        binary, "-machine", "q35", "-accel", accel,
        "-cpu", "max" if accel == "tcg" else "host",
        "-smp", str(cpus), "-m", str(memory_mib),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", f"file:{serial_log}", "-monitor", "none",
    ]


def _devices(drives: tuple[Path, ...], agent_port: int | None, guest_agent_port: int,
             fw_cfg: tuple[tuple[str, Path], ...], nic: str) -> list[str]:
    """Read-only extra drives, user networking (loopback hostfwd), rng, fw_cfg items."""
    argv: list[str] = []
    for drive in drives:
        argv += ["-drive", f"file={drive},format=raw,if=virtio,readonly=on"]
    netdev = "user,id=net0"
    if agent_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{agent_port}-:{guest_agent_port}"
    argv += ["-netdev", netdev, "-device", nic, "-device", "virtio-rng-pci"]
    for name, path in fw_cfg:
        argv += ["-fw_cfg", f"name={name},file={path}"]
    return argv


def _tpm(socket: Path | None) -> list[str]:
    if socket is None:
        return []
    return ["-chardev", f"socket,id=chrtpm,path={socket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]


def qemu_command(spec: VmSpec, binary: str = "qemu-system-x86_64") -> list[str]:
    argv = [
        *_machine(binary, spec.accel, spec.cpus, spec.memory_mib, spec.serial_log),
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline,
        "-drive", f"file={spec.root},format=raw,if=virtio,readonly=on",
    ]
    if spec.data_disk is not None:
        argv += ["-drive", f"file={spec.data_disk},format=raw,if=virtio"]
    argv += _devices(spec.drives, spec.agent_port, spec.guest_agent_port, spec.fw_cfg,
                     "virtio-net-pci,netdev=net0")
    if spec.ovmf_code is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={spec.ovmf_code}"]
        if spec.ovmf_vars is not None:
            argv += ["-drive", f"if=pflash,format=raw,unit=1,file={spec.ovmf_vars}"]
    return argv + _tpm(spec.tpm_socket)


@attrs.frozen
class DiskVmSpec:
    """A UEFI boot from a disk (a baked ``disk.raw``, as GCP boots it): no kernel from the
    host; OVMF finds ``/EFI/BOOT/BOOTX64.EFI`` on the ESP of the boot disk. The disk is
    an NVMe namespace by default (GCP's TDX machines attach disks over NVMe) and is
    writable as a cloud disk is (dm-verity, not the device, keeps the root intact)."""

    disk: Path
    serial_log: Path
    ovmf_code: Path
    ovmf_vars: Path
    accel: Accel = "tcg"
    memory_mib: int = 2048
    cpus: int = 2
    disk_interface: Literal["nvme", "virtio"] = "nvme"
    agent_port: int | None = None
    guest_agent_port: int = 8080
    drives: tuple[Path, ...] = ()
    fw_cfg: tuple[tuple[str, Path], ...] = ()
    tpm_socket: Path | None = None


def disk_qemu_command(spec: DiskVmSpec, binary: str = "qemu-system-x86_64") -> list[str]:
    argv = [
        *_machine(binary, spec.accel, spec.cpus, spec.memory_mib, spec.serial_log),
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={spec.ovmf_code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={spec.ovmf_vars}",
        "-drive", f"file={spec.disk},format=raw,if=none,id=boot0",
        "-device", ("nvme,drive=boot0,serial=ee-boot,bootindex=0"
                    if spec.disk_interface == "nvme" else
                    "virtio-blk-pci,drive=boot0,bootindex=0"),
    ]
    # romfile= (empty): no iPXE option ROM, so the firmware tries no network boot
    argv += _devices(spec.drives, spec.agent_port, spec.guest_agent_port, spec.fw_cfg,
                     "virtio-net-pci,netdev=net0,romfile=")
    return argv + _tpm(spec.tpm_socket)


def swtpm_command(state_dir: Path, socket: Path, log: Path | None = None) -> list[str]:
    """A TPM 2.0 emulator for one VM, serving QEMU's control channel on *socket* (start it
    before QEMU; it exits when the VM ends). The firmware sends TPM2_Startup itself, as on
    a real machine, so the TPM is not started here."""
    argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
            "--ctrl", f"type=unixio,path={socket}", "--terminate"]
    return argv + (["--log", f"file={log},level=1"] if log is not None else [])
