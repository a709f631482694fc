"""A control-plane VM (``eectl cp bootstrap``): what to make, decided before anything is.

Theory of operation
-------------------
A CP VM boots an image built from the ``cp`` profile: the agent image's base (dm-verity
root, Docker under user-namespace remapping, ``/data`` on an ephemeral dm-crypt disk)
whose one job is to run the control plane's container image. Which image is decided
by the host and *measured*: it goes on the kernel command line
(``easyenclave.cp_image=REF@sha256:<64 hex>``), which the firmware measures into
PCR9/RTMR2. That only means something for a reference that names exactly one image, so
:func:`check_cp_image` refuses a tag, a missing digest or any other spelling.

The CP's bootstrap bundle (``bootstrap.json``, its signature, the CP key file it
names; :mod:`ee.cp.bootstrap`) travels on a read-only config drive, checked first with
the same ``load`` the CP runs at start (a bundle the CP would refuse is refused here,
before any VM exists). The drive is not measured and the host can read it, so it may
carry a CP *private key* only for a dev bundle; a production bundle is refused until the
key is made inside the VM (see ``eectl cp bootstrap``'s report of what is missing).

Networking is the agent VM's (QEMU user networking) with two loopback forwards: the
CP's HTTP API (guest :data:`CP_API_PORT`) and its agent plane (guest
:data:`CP_PLANE_PORT`). The bootstrap agent VM then dials the plane through the host
(``ws://127.0.0.1:PLANE`` rewritten to 10.0.2.2, as ``vm create --dev`` does).

Everything here is pure (no libvirt, no files but reading the bundle's).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import attrs

from ee.agent.config import CMDLINE_LIMIT
from ee.vm.domain import NAME_RE, Accel, DomainSpec, Labels
from ee.vm.errors import VmRefused
from ee.vm.host import DomainInfo
from ee.vm.plan import WorkDir
from ee.vm.sizes import VmSize

__all__ = [
    "CMDLINE_CP_IMAGE",
    "CP_API_PORT",
    "CP_PLANE_PORT",
    "CpPlan",
    "CpRequest",
    "check_cp_image",
    "domain_cmdline",
    "existing_cp",
    "plan_cp_vm",
]

CMDLINE_CP_IMAGE = "easyenclave.cp_image"
CMDLINE_ROLE = "easyenclave.role=cp"
CP_API_PORT = 8000
CP_PLANE_PORT = 9000
#: ``[registry[:port]/]path@sha256:<64 hex>`` (lower-case, as Docker writes digests)
_DIGEST_REF = re.compile(
    r"\A(?:[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?(?::[0-9]{1,5})?/)?"
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,8}"
    r"@sha256:[0-9a-f]{64}\Z")


def check_cp_image(ref: str | None) -> str:
    """*ref* when it names one image by its immutable digest; VmRefused otherwise."""
    if not ref:
        raise VmRefused("no control_plane_image: give --control-plane-image REF@sha256:DIGEST "
                        "(or set control_plane_image in the cp profile)")
    if not _DIGEST_REF.match(ref):
        why = ("a tag can be moved to another image" if "@sha256:" not in ref
               else "it is not REPO@sha256:<64 lower-case hex>")
        raise VmRefused(f"control_plane_image {ref!r} is refused: the CP VM's measurement "
                        f"must pin one image, and {why}; use the image's digest "
                        f"(docker inspect --format '{{{{index .RepoDigests 0}}}}' IMAGE)")
    return ref


@attrs.frozen
class CpRequest:
    name: str
    image: Path  # a built image dir (the cp profile)
    size: VmSize
    root_dir: Path
    cp_image: str
    bundle_files: Mapping[str, bytes]  # name -> bytes for the config drive
    api_port: int
    plane_port: int
    accel: Accel = "tcg"
    created: int = 0


@attrs.frozen
class CpPlan:
    spec: DomainSpec
    workdir: WorkDir
    drive_files: Mapping[str, bytes]
    cp_image: str
    disk_gib: int


_DRIVE_NAME = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,63}\Z")


def plan_cp_vm(req: CpRequest, *, image_cmdline: str,
               limit: int = CMDLINE_LIMIT) -> CpPlan:
    """The CP VM for *req*; VmRefused when it cannot be made as asked."""
    if not NAME_RE.match(req.name):
        raise VmRefused(f"VM name must match {NAME_RE.pattern}, got {req.name!r}")
    ref = check_cp_image(req.cp_image)
    if req.api_port == req.plane_port:
        raise VmRefused("the API and agent-plane ports must differ")
    bad = [n for n in req.bundle_files if not _DRIVE_NAME.match(n)]
    if bad or not req.bundle_files:
        raise VmRefused(f"config drive file names refused: {bad or 'none given'}")
    cmdline = f"{' '.join(image_cmdline.split())} {CMDLINE_ROLE} {CMDLINE_CP_IMAGE}={ref}"
    if len(cmdline.encode()) > limit:
        raise VmRefused(f"the CP VM's cmdline would be {len(cmdline.encode())} bytes, over "
                        f"the {limit}-byte limit")
    workdir = WorkDir(req.root_dir / req.name)
    api = f"http://127.0.0.1:{req.api_port}"
    labels = Labels(role="cp", size=req.size.name, workdir=str(workdir.path),
                    cp=f"ws://127.0.0.1:{req.plane_port}", api=api,
                    agent_port=req.api_port, created=req.created)
    spec = DomainSpec(
        name=req.name, memory_mib=req.size.memory_mib, vcpus=req.size.vcpus,
        kernel=workdir.kernel, initrd=workdir.initrd, cmdline=cmdline,
        root=req.image / "root.img", serial_log=workdir.serial, labels=labels,
        accel=req.accel, data_disk=workdir.data_disk if req.size.disk_gib else None,
        config_drive=workdir.config_drive, agent_port=req.api_port,
        guest_agent_port=CP_API_PORT, extra_forwards=((req.plane_port, CP_PLANE_PORT),))
    return CpPlan(spec=spec, workdir=workdir, drive_files=dict(req.bundle_files),
                  cp_image=ref, disk_gib=req.size.disk_gib)


def domain_cmdline(xml: str | None) -> str | None:
    """The kernel cmdline in a domain XML (None when unreadable)."""
    try:
        return ET.fromstring(xml).findtext("os/cmdline") if xml else None
    except ET.ParseError:
        return None


def existing_cp(info: DomainInfo | None, cmdline: str | None, cp_image: str) -> bool:
    """Whether a re-run finds its CP VM already made (True: reuse it, make nothing).
    VmRefused when the name is taken by something else: an agent VM, or a CP VM
    measured with another control_plane_image."""
    if info is None:
        return False
    if info.labels.role != "cp":
        raise VmRefused(f"a VM named {info.name} exists and is an agent VM, not a CP VM")
    words = (cmdline or "").split()
    if f"{CMDLINE_CP_IMAGE}={cp_image}" not in words:
        raise VmRefused(f"CP VM {info.name} exists and runs another control_plane_image; "
                        f"delete it first (eectl vm delete {info.name}) to change it")
    return True
