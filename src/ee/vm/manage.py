"""VM lifecycle over a :class:`~ee.vm.host.VmHost`: create, delete, list, prune, wait.

The decisions (what to make, which VMs are orphans) are pure functions in
:mod:`ee.vm.plan` and here (:func:`find_orphans`); these functions do the files and the
libvirt calls in a fixed order so that a failure leaves nothing behind: ``create``
plans first (a refusal creates nothing), then writes the work dir, then defines and
starts the domain, and removes the work dir again when libvirt says no.

A work dir is ``<root>/<name>`` and holds ``vm.json`` (our marker: the labels), the
kernel and initrd (copied: libvirt relabels what it boots, and the image dir is
shared), the serial log, the data disk, the config drive and the dev sim chain.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ee.agent.bootconfig import write_config_drive
from ee.vm.cpplan import CpPlan
from ee.vm.domain import NAME_RE, OVMF_CODE, OVMF_VARS, domain_xml
from ee.vm.errors import VmError, VmRefused
from ee.vm.host import DomainInfo, VmHost
from ee.vm.plan import CreateRequest, VmPlan, plan_vm

__all__ = [
    "DEFAULT_ROOT",
    "IMAGE_FILES",
    "Orphan",
    "create_cp_vm",
    "create_vm",
    "delete_vm",
    "find_orphans",
    "free_port",
    "qemu_img_create",
    "serial_tail",
    "wait_cp_ready",
    "wait_registered",
    "write_files_drive",
]

DEFAULT_ROOT = Path("/var/lib/easyenclave/vms")
IMAGE_FILES = ("vmlinuz", "initrd.img", "root.img", "cmdline")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_MILESTONE = re.compile(r"ee-init:|ee-data:|ee-sim-material:|ee-agent: |session: registered|"
                        r"Kernel panic|FATAL|API listen on|Reached target .*Multi-User")



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_image(image: Path) -> str:
    """The image's base cmdline; VmRefused naming what is missing."""
    missing = [n for n in IMAGE_FILES if not (image / n).is_file()]
    if missing:
        raise VmRefused(f"{image} is not a built image (missing {', '.join(missing)}); "
                        f"build one with `eectl image build --out {image}`")
    return (image / "cmdline").read_text().strip()


def _check_host(req: CreateRequest, host: VmHost) -> None:
    if req.tdx and not host.supports_tdx():
        raise VmRefused(f"--tdx: libvirt {host.version()} on this host offers no TDX guests "
                        f"(<launchSecurity type='tdx'> needs libvirt >= 11.0 on a TDX host); "
                        f"nothing was created")
    if req.tpm:
        for path, package in ((OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf")):
            if not path.is_file():
                raise VmRefused(f"--tpm needs {path} (apt-get install {package})")
        if shutil.which("swtpm") is None:
            raise VmRefused("--tpm needs swtpm (apt-get install swtpm swtpm-tools)")
    if req.size.disk_gib and shutil.which("qemu-img") is None:
        raise VmRefused("a data disk needs qemu-img (apt-get install qemu-utils)")


def _qemu_can_reach(path: Path, uid: int, gid: int, *, read: bool) -> bool:
    """Whether QEMU (uid/gid) can traverse to *path* (and read it when *read*)."""
    if uid == 0:
        return True
    chain = [*reversed(path.parents), path] if read else [*reversed(path.parents)]
    for p in chain:
        st = p.stat()
        need = 0o4 if (p == path and read) else 0o1
        if st.st_uid == uid:
            need <<= 6
        elif st.st_gid == gid:
            need <<= 3
        if not st.st_mode & need:
            return False
    return True


def _check_access(req: CreateRequest, host: VmHost) -> None:
    uid, gid = host.qemu_user()
    root = req.root_dir.resolve()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not _qemu_can_reach(existing / "x", uid, gid, read=False):
        raise VmRefused(f"QEMU runs as uid {uid} and cannot reach {root}: make its parent "
                        f"directories traversable (chmod o+x) or use another --root")
    if not _qemu_can_reach(req.image.resolve() / "root.img", uid, gid, read=True):
        raise VmRefused(f"QEMU runs as uid {uid} and cannot read {req.image}/root.img "
                        f"(the image is shared, so it is not relabelled): make it readable "
                        f"(chmod o+r, parents o+x)")


def create_vm(req: CreateRequest, host: VmHost, *, sim_chain: Path | None = None,
              agent_port: int | None = None) -> VmPlan:
    """Plan, write the work dir, define and start the domain. VmRefused (nothing made)
    or VmError (whatever was made is removed again)."""
    base = check_image(req.image)
    plan = plan_vm(req, image_cmdline=base,
                   agent_port=agent_port if agent_port is not None else free_port())
    _check_host(req, host)
    _check_access(req, host)
    if host.info(req.name) is not None:
        raise VmRefused(f"a VM named {req.name} exists already (eectl vm delete {req.name})")
    work = plan.workdir
    if work.path.exists():
        raise VmRefused(f"{work.path} exists already (a leftover? eectl vm delete {req.name})")
    if req.dev and (sim_chain is None or not sim_chain.is_file()):
        raise VmRefused(f"--dev needs the dev CP's sim chain at {sim_chain} (start "
                        f"`ee-cp --dev` first, or set $EE_SIM_DIR to its sim dir)")
    req.root_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    work.path.mkdir(mode=0o711)
    try:
        _write_workdir(req, plan, host, sim_chain)
        host.define_and_start(domain_xml(plan.spec))
    except BaseException:
        shutil.rmtree(work.path, ignore_errors=True)
        raise
    return plan


def _write_workdir(req: CreateRequest, plan: VmPlan, host: VmHost,
                   sim_chain: Path | None) -> None:
    work = plan.workdir
    labels = attrs.asdict(plan.spec.labels)
    _write_private(work.marker, json.dumps({"name": req.name, "labels": labels,
                                            "delivery": plan.delivery}, indent=2) + "\n")
    shutil.copyfile(req.image / "vmlinuz", work.kernel)
    shutil.copyfile(req.image / "initrd.img", work.initrd)
    if plan.spec.data_disk is not None:
        qemu_img_create(plan.spec.data_disk, req.size.disk_gib)
    if plan.delivery == "config-drive":
        write_config_drive(plan.config, work.config_drive)
    if req.measure:  # the nonce the guest's quote binds (ee.vm.measure)
        _write_for_qemu(work.nonce, os.urandom(32).hex().encode(), host)
    if req.dev and sim_chain is not None:
        uid, gid = host.qemu_user()
        fd = os.open(work.sim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(sim_chain.read_bytes())
        os.chown(work.sim, uid, gid)  # QEMU reads it (fw_cfg); nobody else
    # The domain carries the agent config (and its one-time bootstrap token) on the
    # kernel command line: readable by root only.
    _write_private(work.path / "domain.xml", domain_xml(plan.spec))


def qemu_img_create(path: Path, gib: int) -> None:
    """A sparse qcow2 disk of *gib* GiB (the VM's blank /data disk)."""
    done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{gib}G"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise VmError(f"qemu-img create failed: {done.stderr.strip()}")


def write_files_drive(files: Mapping[str, bytes], path: Path, label: str = "EECPBUNDLE") -> None:
    """An ISO9660 drive (Rock Ridge names) holding *files* at its root, mode 0600."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, rock_ridge="1.09")
    try:
        for i, (name, data) in enumerate(sorted(files.items())):
            iso.add_fp(io.BytesIO(data), len(data), iso_path=f"/F{i:03d}.;1", rr_name=name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            iso.write_fp(f)
    finally:
        iso.close()


def create_cp_vm(plan: CpPlan, host: VmHost, image: Path) -> None:
    """Write a CP VM's work dir (kernel, initrd, data disk, the bundle drive, readable
    by QEMU only) and start it; whatever was made is removed again on failure."""
    work = plan.workdir
    if work.path.exists():
        raise VmRefused(f"{work.path} exists already (a leftover? eectl vm delete "
                        f"{plan.spec.name})")
    work.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    work.path.mkdir(mode=0o711)
    try:
        labels = attrs.asdict(plan.spec.labels)
        _write_private(work.marker, json.dumps({"name": plan.spec.name, "labels": labels,
                                                "delivery": "config-drive"}, indent=2) + "\n")
        shutil.copyfile(image / "vmlinuz", work.kernel)
        shutil.copyfile(image / "initrd.img", work.initrd)
        if plan.spec.data_disk is not None:
            qemu_img_create(plan.spec.data_disk, plan.disk_gib)
        write_files_drive(plan.drive_files, work.config_drive)
        uid, gid = host.qemu_user()
        os.chown(work.config_drive, uid, gid)
        _write_private(work.path / "domain.xml", domain_xml(plan.spec))
        host.define_and_start(domain_xml(plan.spec))
    except BaseException:
        shutil.rmtree(work.path, ignore_errors=True)
        raise


def _write_for_qemu(path: Path, data: bytes, host: VmHost) -> None:
    """A new 0600 file that only QEMU (and root) reads (a fw_cfg item)."""
    uid, gid = host.qemu_user()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return path.resolve() != root.resolve()


def delete_vm(name: str, host: VmHost, root_dir: Path) -> list[str]:
    """Destroy and undefine *name* and remove its work dir; what was removed."""
    if not NAME_RE.match(name):
        raise VmError(f"{name!r} is not a VM name ({NAME_RE.pattern})")
    done: list[str] = []
    info = host.info(name)
    work = root_dir / name
    if info is not None and Path(info.labels.workdir).resolve() != work.resolve():
        raise VmError(f"domain {name} names work dir {info.labels.workdir}, not {work}; "
                      "not touching it")
    if host.destroy(name):
        done.append(f"domain {name}")
    if work.exists():
        if not _inside(work, root_dir):
            raise VmError(f"work dir {work} is not under {root_dir}; not removing it")
        if not (work / "vm.json").is_file():
            raise VmError(f"{work} holds no vm.json: not a VM work dir; not removing it")
        shutil.rmtree(work)
        done.append(f"work dir {work}")
    return done


def workdirs(root_dir: Path) -> list[Path]:
    """Work dirs under *root_dir* (those holding our ``vm.json``)."""
    if not root_dir.is_dir():
        return []
    return sorted(d for d in root_dir.iterdir() if (d / "vm.json").is_file())


@attrs.frozen
class Orphan:
    name: str
    domain: bool  # a libvirt domain (else only a work dir)
    reason: str


def find_orphans(domains: Iterable[DomainInfo], dirs: Iterable[str],
                 known: Mapping[str, str], *, now: float, min_age_s: float,
                 api: str | None = None) -> list[Orphan]:
    """VMs no CP knows: our agent domains whose name is no agent's ``vm_name`` (older
    than *min_age_s*: a VM still booting is not an orphan), and work dirs without a
    domain. *known* maps vm_name → the agent's status at the CP. With *api*, only the
    domains made for that CP (``labels.api``) are judged: a CP cannot vouch for another
    CP's agents, and a CP VM (``role: cp``) is never an orphan of the agents' CP."""
    out: list[Orphan] = []
    names = set()
    for d in domains:
        names.add(d.name)
        if d.labels.role != "agent" or (api is not None and d.labels.api is not None
                                        and d.labels.api.rstrip("/") != api.rstrip("/")):
            continue
        if d.name in known:
            continue
        age = now - d.labels.created
        if age < min_age_s:
            continue
        out.append(Orphan(d.name, True, f"no agent {d.name} at the CP ({d.state}, "
                                        f"{int(age)}s old)"))
    for name in dirs:
        if name not in names:
            out.append(Orphan(name, False, "work dir without a domain"))
    return sorted(out, key=lambda o: o.name)


def serial_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no serial output)"
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


async def cp_agent(api: str, token: str | None, vm_name: str) -> dict[str, Any] | None:
    """The CP's view of the agent called *vm_name* (None: the CP does not know it)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=10) as client:
        r = await client.get("/api/v2/agents")
        if r.status_code != 200:
            raise VmError(f"GET {api}/api/v2/agents: {r.status_code} {r.text[:200]}")
        agents: list[dict[str, Any]] = r.json().get("agents", [])
    mine = [a for a in agents if a.get("vm_name") == vm_name]
    online = [a for a in mine if a.get("status") == "online"]
    found = online or mine
    return found[0] if found else None


class _SerialFollower:
    """The complete lines a VM's serial log gained since the last call (ANSI codes
    removed; a line still being written waits for its newline)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path, self.offset, self.partial = path, offset, ""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read(1 << 20)
        except FileNotFoundError:
            chunk = b""
        self.offset += len(chunk)
        text = self.partial + _ANSI.sub("", chunk.decode("utf-8", "replace"))
        *complete, self.partial = text.split("\n")
        return complete


async def wait_registered(plan: VmPlan, host: VmHost, *, api: str, token: str | None,
                          timeout_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Follow the serial log (milestones through *say*) and the CP until the agent is
    online; VmError with the last serial lines when the domain stops or time runs out."""
    name, serial = plan.spec.name, plan.workdir.serial
    follow = _SerialFollower(serial)
    started = trio.current_time()
    try:
        with trio.fail_after(timeout_s):
            while True:
                for line in follow.new_lines():
                    if _MILESTONE.search(line):
                        say(f"[{trio.current_time() - started:5.0f}s] {line.strip()[:160]}")
                info = await trio.to_thread.run_sync(host.info, name)
                if info is None or info.state != "running":
                    raise VmError(f"{name} stopped ({info.state if info else 'gone'}) before "
                                  f"its agent registered; last serial lines:\n"
                                  f"{serial_tail(serial)}")
                try:
                    agent = await cp_agent(api, token, name)
                except httpx.HTTPError as exc:
                    say(f"CP at {api} unreachable: {exc}")
                    agent = None
                if agent is not None and agent.get("status") == "online":
                    say(f"[{trio.current_time() - started:5.0f}s] {name} registered "
                        f"(agent {agent.get('agent_id')})")
                    return agent
                await trio.sleep(2)
    except trio.TooSlowError:
        raise VmError(f"{name} did not register within {timeout_s:.0f}s; last serial "
                      f"lines:\n{serial_tail(serial)}") from None


async def wait_cp_ready(name: str, serial: Path, host: VmHost, *, api: str, timeout_s: float,
                        say: Callable[[str], None], new_lines_only: bool = False) -> None:
    """Until the CP VM's ``/api/v2/ready`` answers 200 through its forwarded port; the
    CP VM's ``ee-cp-vm`` lines go to *say* (only those written from now on with
    *new_lines_only*: a re-run's). VmError with the last serial lines when the domain
    stops or time runs out."""
    try:
        offset = (await trio.Path(serial).stat()).st_size if new_lines_only else 0
    except OSError:
        offset = 0
    follow = _SerialFollower(serial, offset)
    started = trio.current_time()
    try:
        with trio.fail_after(timeout_s):
            while True:
                for line in follow.new_lines():
                    if "ee-cp-vm" in line or _MILESTONE.search(line):
                        say(f"[{trio.current_time() - started:5.0f}s] {line.strip()[:160]}")
                info = await trio.to_thread.run_sync(host.info, name)
                if info is None or info.state != "running":
                    raise VmError(f"{name} stopped ({info.state if info else 'gone'}) before "
                                  f"its CP was ready; last serial lines:\n"
                                  f"{serial_tail(serial)}")
                try:
                    async with httpx.AsyncClient(timeout=5) as client:
                        r = await client.get(f"{api}/api/v2/ready")
                    if r.status_code == 200:
                        say(f"[{trio.current_time() - started:5.0f}s] CP at {api} is ready")
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(3)
    except trio.TooSlowError:
        raise VmError(f"the CP in {name} was not ready within {timeout_s:.0f}s; last serial "
                      f"lines:\n{serial_tail(serial)}") from None
