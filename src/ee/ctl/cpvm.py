"""`eectl cp bootstrap`: a control-plane VM from the image's ``cp`` profile, then the first
(bootstrap) agent VM dialling it. Idempotent: a re-run reuses what exists.

    eectl cp bootstrap NAME --image DIR --bundle DATA_DIR [--bundle-pubkey FILE]
          [--control-plane-image REF@sha256:DIGEST] [--size standard] [--memory GIB]
          [--vcpus N] [--disk GIB] [--api-port P] [--plane-port P] [--wait-ready]
          [--agent NAME --agent-image DIR | --no-agent] [--agent-size tiny]
          [--dry-run] [--timeout S] [--accel tcg|kvm] [--connect URI] [--root DIR]

Order, each step refusing before it makes anything (:mod:`ee.vm.cpplan`): the
control_plane_image must carry a digest (the flag, else the cp profile's
``control_plane_image``); the bundle must pass the CP's own start-up check
(`ee.cp.bootstrap.load`), and only a dev bundle may ship its CP key on the drive; an
existing VM of that name must be this CP (same image). ``--dry-run`` prints the domain
XML and the config drive's files and makes nothing. Exit codes: 0 done, 1 refused or
failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from functools import partial
from pathlib import Path

import trio

from ee.attestation.providers.sim import SIM_FILE
from ee.cp import bootstrap
from ee.cp.bootstrap import BootstrapError
from ee.ctl.client import CtlError, UsageError
from ee.image.errors import ProfileError
from ee.image.profile import load_profile
from ee.image.qemu import choose_accel
from ee.vm.cpplan import CpPlan, CpRequest, domain_cmdline, existing_cp, plan_cp_vm
from ee.vm.domain import domain_xml
from ee.vm.errors import VmError, VmRefused
from ee.vm.host import VmHost
from ee.vm.manage import (
    DEFAULT_ROOT,
    check_image,
    create_cp_vm,
    create_vm,
    free_port,
    wait_cp_ready,
    wait_registered,
)
from ee.vm.plan import CreateRequest
from ee.vm.sizes import PRESETS, SizeError, resolve_size

__all__ = ["SIM_DIR_RE", "bundle_files", "register", "sim_material"]

#: what ee-cp-vm accepts as the dev bundle's sim_dir (it mounts the sim material there)
SIM_DIR_RE = re.compile(r"\A(?:/[A-Za-z0-9._-]+)+\Z")

DEFAULT_URI = "qemu:///system"


def _cp_group(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> (
        argparse._SubParsersAction[argparse.ArgumentParser]):
    """The ``eectl cp`` command list (made by `ee.ctl.cpbundle`)."""
    cp = groups.choices["cp"]
    for action in cp._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("eectl cp has no command list")  # a wiring bug, not input


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = _cp_group(groups).add_parser(
        "bootstrap", help="a CP VM from the cp profile, then its first agent VM",
        description=__doc__.split("\n\n")[2] if __doc__ else None)
    b.add_argument("name", help="the CP VM's name")
    b.add_argument("--image", required=True, metavar="DIR", help="a build of the cp profile")
    b.add_argument("--bundle", required=True, metavar="DATA_DIR",
                   help="the CP's data dir: bootstrap.json, its signature, the CP key")
    b.add_argument("--bundle-pubkey", metavar="FILE",
                   help="the offline key a production bundle is signed with")
    b.add_argument("--control-plane-image", metavar="REF@sha256:DIGEST",
                   help="the CP container image (default: the cp profile's)")
    b.add_argument("--size", choices=tuple(PRESETS), default="standard")
    b.add_argument("--memory", metavar="GIB")
    b.add_argument("--vcpus", metavar="N")
    b.add_argument("--disk", metavar="GIB", help="the /data disk (default 8)", default="8")
    b.add_argument("--api-port", type=int, metavar="P", help="host loopback port of the API")
    b.add_argument("--plane-port", type=int, metavar="P",
                   help="host loopback port of the agent plane")
    b.add_argument("--wait-ready", action="store_true", help="wait for the CP's /ready")
    b.add_argument("--agent", metavar="NAME", help="the bootstrap agent VM (default NAME-agent-1)")
    b.add_argument("--no-agent", action="store_true", help="no bootstrap agent")
    b.add_argument("--agent-image", metavar="DIR",
                   help="a build of the agent profile (needed unless --no-agent)")
    b.add_argument("--agent-size", choices=tuple(PRESETS), default="tiny")
    b.add_argument("--dry-run", action="store_true",
                   help="print the domain and the config drive's files; make nothing")
    b.add_argument("--timeout", type=float, default=900.0, metavar="S")
    b.add_argument("--accel", choices=("tcg", "kvm"))
    b.add_argument("--connect", default=DEFAULT_URI, metavar="URI")
    b.add_argument("--root", metavar="DIR",
                   help=f"work dirs (default $EE_VM_ROOT or {DEFAULT_ROOT})")
    b.set_defaults(handler=_bootstrap)


def bundle_files(data_dir: Path, pubkey: Path | None) -> tuple[dict[str, bytes], bool]:
    """The drive's files and whether the bundle is a dev one, after the CP's own check
    (VmRefused with its reason; a production bundle is refused, see the module doc)."""
    signer = None
    try:
        if pubkey is not None:
            signer = bootstrap.load_bundle_pubkey(pubkey)
        peek = bootstrap.read_unverified(data_dir / bootstrap.BUNDLE)
        dev = peek.get("environment") == "dev"
        loaded = bootstrap.load(data_dir, dev=dev, bundle_pubkey=signer)
    except BootstrapError as exc:
        raise VmRefused(f"the CP would refuse this bundle: {exc}") from None
    if not dev:
        raise VmRefused("a production bundle's CP key would travel on a config drive the "
                        "host can read; a production CP VM must make its key inside the VM "
                        "(not supported yet). Use a dev bundle (ee-cp --dev makes one) here")
    names = sorted(p.name for p in data_dir.iterdir()
                   if p.is_file() and (p.name.startswith(bootstrap.BUNDLE)
                                       or p.name == str(peek.get("cp_key", {}).get(
                                           "file", bootstrap.CP_KEY))))
    files = {n: (data_dir / n).read_bytes() for n in names}
    if loaded.sim_dir is not None:
        files[SIM_FILE] = sim_material(loaded.sim_dir)
    return files, dev


def sim_material(sim_dir: str) -> bytes:
    """The dev bundle's sim TD chain (``bundle.dev.sim_dir``), which the CP in the VM
    reads at that same path (ee-cp-vm mounts it there read-only); VmRefused when the
    path is not one the guest script accepts or the chain is missing."""
    if not SIM_DIR_RE.match(sim_dir) or "/../" in sim_dir + "/" or "/./" in sim_dir + "/":
        raise VmRefused(f"bundle.dev.sim_dir {sim_dir!r} is refused: the CP VM mounts it at "
                        f"that path, so it must be absolute and plain ({SIM_DIR_RE.pattern})")
    try:
        return (Path(sim_dir) / SIM_FILE).read_bytes()
    except OSError as exc:
        raise VmRefused(f"the dev bundle's sim material {sim_dir}/{SIM_FILE} is "
                        f"unreadable ({exc.strerror}); the CP in the VM needs it") from None


def _cp_image(args: argparse.Namespace) -> str | None:
    if args.control_plane_image:
        return str(args.control_plane_image)
    try:
        return load_profile("cp").control_plane_image
    except ProfileError:
        return None


def _image_profile(image: Path) -> str | None:
    """The profile an image was built from (its manifest.json), None when unknown."""
    try:
        profile = json.loads((image / "manifest.json").read_text()).get("profile")
    except (OSError, ValueError, AttributeError):
        return None
    return profile if isinstance(profile, str) else None


def _plan(args: argparse.Namespace, root: Path) -> CpPlan:
    size = resolve_size(args.size, dict(os.environ), memory_gib=args.memory,
                        vcpus=args.vcpus, disk_gib=args.disk)
    image = Path(args.image).resolve()
    base = check_image(image)
    profile = _image_profile(image)
    if profile != "cp":
        raise VmRefused(f"{image} is a build of the {profile!r} profile; a CP VM boots the "
                        f"cp profile (eectl image build --profile cp --out DIR)")
    files, _dev = bundle_files(Path(args.bundle),
                               Path(args.bundle_pubkey) if args.bundle_pubkey else None)
    req = CpRequest(name=args.name, image=image, size=size, root_dir=root,
                    cp_image=_cp_image(args) or "", bundle_files=files,
                    api_port=args.api_port or free_port(),
                    plane_port=args.plane_port or free_port(),
                    accel=args.accel or choose_accel(), created=int(time.time()))
    return plan_cp_vm(req, image_cmdline=base)


def _bootstrap(args: argparse.Namespace) -> int:
    root = Path(args.root or os.environ.get("EE_VM_ROOT") or DEFAULT_ROOT)
    try:
        if args.no_agent and (args.agent or args.agent_image):
            raise UsageError("--agent/--agent-image and --no-agent exclude each other")
        if not args.no_agent and not args.agent_image:
            raise UsageError("the bootstrap agent needs --agent-image DIR (a build of the "
                             "agent profile), or pass --no-agent")
        plan = _plan(args, root)
        if args.dry_run:
            print(domain_xml(plan.spec), end="")
            print("config drive: " + ", ".join(sorted(plan.drive_files)))
            return 0
        with VmHost(args.connect) as host:
            info = host.info(args.name)
            cmdline = None
            if info is not None:
                xml = Path(info.labels.workdir) / "domain.xml"
                cmdline = domain_cmdline(xml.read_text() if xml.is_file() else None)
            reused = existing_cp(info, cmdline, plan.cp_image)
            if reused:
                assert info is not None
                print(f"CP VM {args.name} exists ({info.state}); not recreated")
                api, plane = info.labels.api, info.labels.cp
                serial = Path(info.labels.workdir) / plan.workdir.serial.name
            else:
                create_cp_vm(plan, host, Path(args.image).resolve())
                api, plane = plan.spec.labels.api, plan.spec.labels.cp
                serial = plan.workdir.serial
                print(f"created CP VM {args.name}: API {api}, agent plane {plane}",
                      flush=True)
            deadline = time.monotonic() + args.timeout
            if args.wait_ready and api:
                trio.run(partial(wait_cp_ready, args.name, serial, host, api=api,
                                 timeout_s=args.timeout, say=_say, new_lines_only=reused))
            if not args.no_agent and plane and api:
                _bootstrap_agent(args, host, root, api=api, plane=plane,
                                 wait_s=max(60.0, deadline - time.monotonic()))
    except (VmError, SizeError, CtlError, ValueError, OSError) as exc:
        print(f"eectl cp bootstrap: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, CtlError) else 1
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def _bootstrap_agent(args: argparse.Namespace, host: VmHost, root: Path, *, api: str,
                     plane: str, wait_s: float) -> None:
    """The first agent VM, dialling the CP VM's plane with the bundle's sim chain; with
    ``--wait-ready``, until the CP lists it online (the bundle dir's admin token)."""
    agent = args.agent or f"{args.name}-agent-1"
    if host.info(agent) is not None:
        print(f"bootstrap agent VM {agent} exists; not recreated")
        return
    size = resolve_size(args.agent_size, dict(os.environ))
    data = Path(args.bundle)
    sim_dir = (bootstrap.read_unverified(data / bootstrap.BUNDLE).get("dev") or {}).get(
        "sim_dir")
    req = CreateRequest(name=agent, image=Path(args.agent_image).resolve(), size=size,
                        root_dir=root, cp=plane, api=api, dev=True,
                        accel=args.accel or choose_accel(), created=int(time.time()))
    vm = create_vm(req, host, sim_chain=Path(sim_dir) / SIM_FILE if sim_dir else None)
    print(f"created bootstrap agent VM {agent} (dials {plane})", flush=True)
    if args.wait_ready:
        try:
            token: str | None = (data / bootstrap.ADMIN_TOKEN).read_text().strip()
        except OSError:
            token = None
        trio.run(partial(wait_registered, vm, host, api=api, token=token, timeout_s=wait_s,
                         say=_say))
