"""`eectl vm`: agent VMs over libvirt (create, list, status, delete, prune).

``create`` plans the VM (size preset + environment + flags, agent config on the kernel
cmdline or a config drive), writes its work dir under ``--root`` (default
``$EE_VM_ROOT`` or /var/lib/easyenclave/vms) and starts the domain; ``--wait`` follows
the serial log and the CP until the agent is online. ``--dev`` targets a dev CP on this
host. Exit codes: 0 done, 1 the operation failed or was refused, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from ee.ctl._table import table
from ee.ctl.client import CtlError, UsageError, resolve_token
from ee.image.qemu import choose_accel
from ee.vm.domain import Accel
from ee.vm.errors import VmError
from ee.vm.host import VmHost
from ee.vm.manage import (
    DEFAULT_ROOT,
    cp_agent,
    create_vm,
    delete_vm,
    find_orphans,
    wait_registered,
    workdirs,
)
from ee.vm.plan import CreateRequest, VmPlan
from ee.vm.sizes import PRESETS, SizeError, resolve_size

__all__ = ["register"]

DEFAULT_URI = "qemu:///system"


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root or os.environ.get("EE_VM_ROOT") or DEFAULT_ROOT)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default=DEFAULT_URI, metavar="URI",
                   help=f"libvirt URI (default {DEFAULT_URI})")
    p.add_argument("--root", metavar="DIR",
                   help=f"work dirs (default $EE_VM_ROOT or {DEFAULT_ROOT})")


def _api(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="URL",
                   help="the CP's HTTP API, for the agent's state (default $EE_CP_URL)")
    p.add_argument("--token", metavar="T", help="admin token (default $EE_TOKEN)")
    p.add_argument("--token-file", metavar="FILE", help="read the admin token from FILE")


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = groups.add_parser("vm", help="agent VMs over libvirt",
                           description="Create, list, inspect and delete agent VMs.")
    commands = vm.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = commands.add_parser("create", help="create and start an agent VM")
    c.add_argument("name")
    c.add_argument("--image", required=True, metavar="DIR", help="a built image dir")
    c.add_argument("--size", choices=tuple(PRESETS), default="tiny")
    c.add_argument("--memory", metavar="GIB", help="override the size's memory")
    c.add_argument("--vcpus", metavar="N", help="override the size's vCPUs")
    c.add_argument("--disk", metavar="GIB", help="the /data disk (0: none, tmpfs)")
    c.add_argument("--datacenter", default="local:dev", metavar="LABEL")
    c.add_argument("--cp", metavar="URL", help="the CP's agent plane (ws:// or wss://)")
    c.add_argument("--bootstrap-token", metavar="T")
    c.add_argument("--trust-cp-mrtd", action="append", default=[], metavar="HEX",
                   help="pin the CP's MRTD (repeatable)")
    c.add_argument("--tdx", action=argparse.BooleanOptionalAction, default=False,
                   help="a TDX guest (KVM + libvirt with TDX support)")
    c.add_argument("--tpm", action="store_true", help="OVMF + an emulated TPM 2.0")
    c.add_argument("--measure", action="store_true",
                   help="measurement mode: all config on the measured cmdline")
    c.add_argument("--dev", action="store_true",
                   help="a dev CP on this host: loopback --cp, sim attestation")
    c.add_argument("--accel", choices=("tcg", "kvm"),
                   help="default: $EE_QEMU_ACCEL, else KVM only where it is known good")
    c.add_argument("--agent-port", type=int, metavar="PORT",
                   help="host loopback port forwarded to the agent (default: a free one)")
    c.add_argument("--wait", action="store_true", help="wait until the agent is online")
    c.add_argument("--timeout", type=float, default=900.0, metavar="S")
    _common(c)
    _api(c)
    c.set_defaults(handler=_create)

    ls = commands.add_parser("list", help="our VMs")
    ls.add_argument("--json", action="store_true")
    _common(ls)
    ls.set_defaults(handler=_list)

    st = commands.add_parser("status", help="libvirt state and the CP's view of the agent")
    st.add_argument("name")
    _common(st)
    _api(st)
    st.set_defaults(handler=_status)

    d = commands.add_parser("delete", help="destroy, undefine, remove the work dir")
    d.add_argument("name")
    _common(d)
    d.set_defaults(handler=_delete)

    me = commands.add_parser(
        "measure", help="boot in measurement mode; compare the quoted PCRs with "
                        "`eectl trust measure`",
        description="Boot an image (--image: a new VM, deleted afterwards) or read a VM "
                    "made with `vm create --measure --tpm` (NAME), verify the vTPM quote "
                    "its guest prints, and compare PCR4/PCR9 with the prediction for "
                    "the kernel, initrd, cmdline and memory it booted. Exit 1 on any "
                    "mismatch or when the quote does not verify.")
    me.add_argument("name", nargs="?", help="a VM created with --measure --tpm")
    me.add_argument("--image", metavar="DIR", help="boot this image in a new VM")
    me.add_argument("--size", choices=tuple(PRESETS), default="tiny")
    me.add_argument("--memory", metavar="GIB", help="override the size's memory")
    me.add_argument("--vcpus", metavar="N", help="override the size's vCPUs")
    me.add_argument("--accel", choices=("tcg", "kvm"))
    me.add_argument("--ek-ca", action="append", default=[], metavar="FILE",
                    help="EK CA certificates (PEM; default: libvirt's swtpm_localca)")
    me.add_argument("--timeout", type=float, default=600.0, metavar="S")
    me.add_argument("--keep", action="store_true", help="keep the --image VM")
    _common(me)
    me.set_defaults(handler=_measure)

    pr = commands.add_parser("prune", help="VMs and work dirs no CP knows (dry run)")
    pr.add_argument("--yes", action="store_true", help="delete them")
    pr.add_argument("--min-age", type=float, default=900.0, metavar="S",
                    help="spare domains younger than this (still booting)")
    _common(pr)
    _api(pr)
    pr.set_defaults(handler=_prune)


def _fail(command: str, exc: Exception) -> int:
    print(f"eectl vm {command}: {exc}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, CtlError) else 1


def _accel(args: argparse.Namespace) -> tuple[Accel, str]:
    if args.accel:
        return args.accel, "--accel"
    accel = choose_accel()
    if os.environ.get("EE_QEMU_ACCEL") in ("tcg", "kvm"):
        return accel, "$EE_QEMU_ACCEL"
    return accel, "detected" if accel == "kvm" else "no usable KVM (or PVM-backed /dev/kvm)"


def _api_url(args: argparse.Namespace) -> str | None:
    return str(args.api or os.environ.get("EE_CP_URL") or "") or None


def request_from_args(args: argparse.Namespace, env: dict[str, str]) -> CreateRequest:
    size = resolve_size(args.size, env, memory_gib=args.memory, vcpus=args.vcpus,
                        disk_gib=args.disk)
    accel, _ = _accel(args)
    return CreateRequest(
        name=args.name, image=Path(args.image).resolve(), size=size, root_dir=_root(args),
        datacenter=args.datacenter, cp=args.cp, api=_api_url(args),
        bootstrap_token=args.bootstrap_token, dev=args.dev, tpm=args.tpm, tdx=args.tdx,
        measure=args.measure, accel=accel, created=int(time.time()),
        trusted_cp_mrtds=tuple(args.trust_cp_mrtd))


def _create(args: argparse.Namespace) -> int:
    from ee.attestation.providers.sim import SIM_FILE, shared_sim_dir

    try:
        req = request_from_args(args, dict(os.environ))
        if args.wait and (req.api is None or req.cp is None):
            raise UsageError("--wait needs --cp (agent plane) and --api (or $EE_CP_URL)")
        token = resolve_token(args)
        accel, why = _accel(args)
        with VmHost(args.connect) as host:
            plan = create_vm(req, host, sim_chain=shared_sim_dir() / SIM_FILE,
                             agent_port=args.agent_port)
            _describe(plan, accel, why)
            if args.wait:
                assert req.api is not None
                api = req.api
                started = time.monotonic()

                async def wait() -> dict[str, Any]:
                    return await wait_registered(plan, host, api=api, token=token,
                                                 timeout_s=args.timeout,
                                                 say=lambda line: print(line, flush=True))

                agent = trio.run(wait)
                print(f"{req.name} online as agent {agent.get('agent_id')} after "
                      f"{time.monotonic() - started:.0f}s ({accel})")
    except (VmError, SizeError, CtlError, ValueError) as exc:  # ValueError: a bad field
        return _fail("create", exc)
    return 0


def _describe(plan: VmPlan, accel: Accel, why: str) -> None:
    s = plan.spec
    print(f"created {s.name}: {s.memory_mib} MiB, {s.vcpus} vCPU, accel {accel} ({why}), "
          f"config via {plan.delivery}, work dir {plan.workdir.path}", flush=True)
    if s.agent_port is not None:
        print(f"agent port: http://127.0.0.1:{s.agent_port} -> guest :{s.guest_agent_port}")
    print(f"serial log: {plan.workdir.serial}", flush=True)


def _list(args: argparse.Namespace) -> int:
    try:
        with VmHost(args.connect) as host:
            domains = host.ours()
    except VmError as exc:
        return _fail("list", exc)
    if args.json:
        print(json.dumps([{"name": d.name, "state": d.state, **attrs.asdict(d.labels)}
                          for d in domains], indent=2))
        return 0
    rows = [(d.name, d.state, d.labels.role, d.labels.size, d.labels.datacenter,
             d.labels.agent_port or "-", d.labels.cp or "-") for d in domains]
    print(table(("NAME", "STATE", "ROLE", "SIZE", "DATACENTER", "AGENT_PORT", "CP"), rows))
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        with VmHost(args.connect) as host:
            info = host.info(args.name)
        if info is None:
            raise VmError(f"no VM named {args.name}")
        api = _api_url(args) or info.labels.api
        out: dict[str, Any] = {"name": info.name, "state": info.state,
                               "labels": attrs.asdict(info.labels), "agent": None}
        if api:
            token = resolve_token(args)
            out["agent"] = trio.run(cp_agent, api, token, args.name)
    except (VmError, CtlError) as exc:
        return _fail("status", exc)
    except Exception as exc:  # httpx transport errors: the CP is down
        return _fail("status", VmError(f"cannot ask the CP: {exc}"))
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _delete(args: argparse.Namespace) -> int:
    try:
        with VmHost(args.connect) as host:
            removed = delete_vm(args.name, host, _root(args))
    except VmError as exc:
        return _fail("delete", exc)
    if not removed:
        print(f"eectl vm delete: no VM named {args.name}", file=sys.stderr)
        return 1
    print("removed " + ", ".join(removed))
    return 0


def _measure(args: argparse.Namespace) -> int:
    from ee.ctl.vmmeasure import measure_command

    try:
        if (args.name is None) == (args.image is None):
            raise UsageError("give a VM NAME or --image DIR (one of them)")
        return measure_command(args, _root(args), _accel(args)[0])
    except (VmError, SizeError, CtlError, ValueError, OSError) as exc:
        return _fail("measure", exc)


def _known(api: str, token: str | None) -> dict[str, str]:
    from ee.ctl.client import CpClient

    with CpClient(api, token) as client:
        return {str(a.get("vm_name")): str(a.get("status")) for a in client.agents()}


def _prune(args: argparse.Namespace) -> int:
    root = _root(args)
    try:
        api = _api_url(args)
        if api is None:
            raise UsageError("prune needs the CP that would know the VMs: --api URL")
        known = _known(api, resolve_token(args))
        with VmHost(args.connect) as host:
            orphans = find_orphans(host.ours(), [d.name for d in workdirs(root)], known,
                                   now=time.time(), min_age_s=args.min_age, api=api)
            for o in orphans:
                print(f"{'domain' if o.domain else 'workdir'} {o.name}: {o.reason}")
                if args.yes:
                    print("  removed " + ", ".join(delete_vm(o.name, host, root)))
    except (VmError, CtlError) as exc:
        return _fail("prune", exc)
    if not orphans:
        print("no orphans")
    elif not args.yes:
        print(f"{len(orphans)} orphan(s); run again with --yes to delete them")
    return 0
