"""`eectl capacity`: warm capacity per (datacenter, node size) against its targets.

``provision`` runs a provisioner: it claims launch orders for the given pools with a
provisioner key and turns each into a libvirt VM whose agent registers with the
order's bootstrap token (``ee.capacity.provisioner``; runs until interrupted).

``verify-clouds`` prints every pool with its target, warm/reserved/deployed counts,
open launch orders and shortfall, and exits 1 when any pool is short (0 otherwise), so
it can gate a rollout or page an operator.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ee.ctl._table import table
from ee.ctl.client import CtlError, Json, add_cp_options, client_from_args


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    capacity = groups.add_parser(
        "capacity", help="capacity pools: warm targets, launch orders",
        description="Inspect capacity pools (admin token).")
    commands = capacity.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify-clouds", help="check every pool against its target",
        description="Print each pool against its warm target; exit 1 when any pool is "
                    "short of its target, 0 when all are met.")
    add_cp_options(verify)
    verify.add_argument("--gcp", action="append", default=[], metavar="DATACENTER=PROJECT/ZONE",
                        help="also count this datacenter's agent instances in GCP (credentials "
                             "from $GOOGLE_APPLICATION_CREDENTIALS); repeatable")
    verify.set_defaults(handler=verify_clouds)
    register_provision(commands)


def register_provision(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "provision", help="turn launch orders into libvirt VMs (runs until interrupted)",
        description="Claim launch orders for the pools given with --pool, create a VM per "
                    "order with its bootstrap token, report fulfilment or failure, retry "
                    "with bounded backoff, delete VMs of failed or expired orders.")
    p.add_argument("--cp", required=True, metavar="URL", help="the CP's HTTP API")
    p.add_argument("--key", metavar="KEY", help="provisioner key (default $EE_PROVISIONER_KEY)")
    p.add_argument("--key-file", metavar="FILE", help="read the provisioner key from FILE")
    p.add_argument("--image", metavar="DIR", help="a built agent image (libvirt VMs)")
    p.add_argument("--gcp", metavar="PROJECT/ZONE",
                   help="launch GCP confidential (TDX) instances instead of libvirt VMs, "
                        "from --gcp-image (credentials: $GOOGLE_APPLICATION_CREDENTIALS); "
                        "serves exactly one datacenter")
    p.add_argument("--gcp-image", metavar="IMAGE",
                   help="image or family (default projects/PROJECT/global/images/family/"
                        "easyenclave-agent)")
    p.add_argument("--agent-cp", required=True, metavar="URL",
                   help="the CP's agent plane as VMs dial it (ws:// or wss://)")
    p.add_argument("--pool", action="append", required=True, metavar="DATACENTER/SIZE",
                   help="a pool to serve (repeatable), e.g. local:dev/tiny")
    p.add_argument("--max", type=int, default=4, metavar="N", help="VMs in the making at once")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N")
    p.add_argument("--backoff-max", type=float, default=120.0, metavar="S")
    p.add_argument("--poll", type=float, default=10.0, metavar="S")
    p.add_argument("--poweroff-after", type=float, default=1800.0, metavar="S",
                   help="a VM whose agent cannot reach the CP this long powers off (0: never)")
    p.add_argument("--dev", action="store_true", help="VMs for a dev CP on this host")
    p.add_argument("--accel", choices=("tcg", "kvm"))
    p.add_argument("--memory", metavar="GIB")
    p.add_argument("--vcpus", metavar="N")
    p.add_argument("--disk", metavar="GIB")
    p.add_argument("--connect", default="qemu:///system", metavar="URI")
    p.add_argument("--root", metavar="DIR", help="VM work dirs (default $EE_VM_ROOT or "
                                                 "/var/lib/easyenclave/vms)")
    p.set_defaults(handler=provision)


def provision(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ee.attestation.providers.sim import SIM_FILE, shared_sim_dir
    from ee.capacity.provisioner import (
        ProvisionerSettings,
        pools_from_text,
    )
    from ee.ctl.client import UsageError
    from ee.image.qemu import choose_accel
    from ee.vm.launcher import LibvirtLauncher
    from ee.vm.manage import DEFAULT_ROOT

    try:
        key = args.key or os.environ.get("EE_PROVISIONER_KEY")
        if args.key_file:
            key = Path(args.key_file).read_text().strip()
        if not key:
            raise UsageError("a provisioner key is needed: --key, --key-file or "
                             "$EE_PROVISIONER_KEY")
        settings = ProvisionerSettings(
            pools=pools_from_text(args.pool), max_vms=args.max,
            max_attempts=args.max_attempts, backoff_max_s=args.backoff_max,
            backoff_base_s=min(5.0, args.backoff_max), poll_interval_s=args.poll)
        if bool(args.gcp) == bool(args.image):
            raise UsageError("give --image DIR (libvirt VMs) or --gcp PROJECT/ZONE")
    except (ValueError, OSError, CtlError) as exc:
        print(f"eectl capacity provision: {exc}", file=sys.stderr)
        return 2
    if args.gcp:
        return _provision_gcp(args, key, settings)
    launcher = LibvirtLauncher(
        uri=args.connect, image=Path(args.image).resolve(),
        root_dir=Path(args.root or os.environ.get("EE_VM_ROOT") or DEFAULT_ROOT),
        cp=args.agent_cp, api=args.cp, dev=args.dev,
        accel=args.accel or choose_accel(),
        poweroff_after_s=args.poweroff_after or None,
        sim_chain=shared_sim_dir() / SIM_FILE if args.dev else None,
        memory_gib=args.memory, vcpus=args.vcpus, disk_gib=args.disk)

    print(f"provisioning {', '.join('/'.join(p) for p in settings.pools)} from {args.cp} "
          f"(accel {launcher.accel}, at most {settings.max_vms} at once)", flush=True)
    return _run_provisioner(args.cp, key, settings, lambda: launcher)


def _run_provisioner(cp: str, key: str, settings: Any, make_launcher: Any,
                     extra: Any = None) -> int:
    """Run a supervised provisioner with the launcher *make_launcher* builds (inside the
    event loop, given *extra*'s entered value) until interrupted."""
    import contextlib

    import httpx
    import trio

    from ee.capacity.provisioner import Provisioner, supervised

    async def main() -> None:
        async with httpx.AsyncClient(base_url=cp, timeout=30, headers={
                "Authorization": f"Bearer {key}"}) as client, \
                (extra() if extra else contextlib.nullcontext()) as entered:
            launcher = make_launcher(entered) if extra else make_launcher()
            prov = Provisioner(client, launcher, settings,
                               say=lambda line: print(line, flush=True))
            await supervised(prov).run()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 0
    return 0


def _gcp_target(text: str) -> tuple[str, str]:
    project, sep, zone = text.partition("/")
    if not sep or not project or not zone:
        raise ValueError(f"{text!r}: expected PROJECT/ZONE")
    return project, zone


def _provision_gcp(args: argparse.Namespace, key: str, settings: Any) -> int:
    import httpx

    from ee.capacity.gcp import GcpLaunchConfig, GcpLauncher, ProvisionerLauncher
    from ee.cloud.gcp import GcpError, client_from_env

    datacenters = {dc for dc, _ in settings.pools}
    try:
        project, zone = _gcp_target(args.gcp)
        if len(datacenters) != 1:
            raise ValueError("--gcp serves one datacenter: give its pools only")
    except ValueError as exc:
        print(f"eectl capacity provision: {exc}", file=sys.stderr)
        return 2
    config = GcpLaunchConfig(
        project=project, zone=zone, datacenter=datacenters.pop(), cp_url=args.agent_cp,
        image=args.gcp_image or f"projects/{project}/global/images/family/easyenclave-agent")

    print(f"provisioning {', '.join('/'.join(p) for p in settings.pools)} from {args.cp} "
          f"as GCP instances in {project}/{zone}", flush=True)
    try:
        return _run_provisioner(
            args.cp, key, settings,
            lambda http: ProvisionerLauncher(GcpLauncher(client_from_env(http), config)),
            extra=lambda: httpx.AsyncClient(timeout=httpx.Timeout(60, connect=20)))
    except GcpError as exc:
        print(f"eectl capacity provision: {exc}", file=sys.stderr)
        return 2


def gcp_counts(targets: list[str]) -> tuple[list[str], bool]:
    """``verify-clouds --gcp``: one line per datacenter with its instances by status,
    and whether every cloud answered."""
    import httpx
    import trio

    from ee.capacity.gcp import GcpLaunchConfig, GcpLauncher, count_instances
    from ee.cloud.gcp import GcpError, client_from_env

    lines: list[str] = []
    ok = True

    async def main() -> None:
        nonlocal ok
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=20)) as http:
            client = client_from_env(http)
            for target in targets:
                dc, sep, where = target.partition("=")
                try:
                    if not sep or not dc:
                        raise ValueError(f"--gcp {target!r}: expected DATACENTER=PROJECT/ZONE")
                    project, zone = _gcp_target(where)
                    launcher = GcpLauncher(client, GcpLaunchConfig(
                        project=project, zone=zone, image="-", cp_url="wss://-",
                        datacenter=dc))
                    counts = await count_instances(launcher)
                except (GcpError, ValueError) as exc:
                    lines.append(f"{dc or target}: {exc}")
                    ok = False
                    continue
                lines.append(f"{dc}: {counts['total']} instances" + "".join(
                    f", {k} {v}" for k, v in sorted(counts.items()) if k != "total"))

    trio.run(main)
    return lines, ok


def pools_table(pools: list[Json]) -> str:
    rows = []
    for p in sorted(pools, key=lambda p: (p["datacenter"], p["node_size"])):
        target: dict[str, Any] = p.get("target") or {}
        rows.append((p["datacenter"], p["node_size"], target.get("min_warm", "-"),
                     "on" if target.get("dispatch") else "off", p.get("warm", 0),
                     p.get("reserved", 0), p.get("deployed", 0), p.get("pending_orders", 0),
                     p.get("shortfall", 0), "SHORT" if p.get("shortfall", 0) > 0 else "ok"))
    return table(("DATACENTER", "SIZE", "MIN_WARM", "DISPATCH", "WARM", "RESERVED",
                  "DEPLOYED", "ORDERS", "SHORTFALL", "STATUS"), rows)


def orders_table(orders: list[Json]) -> str:
    rows = [(o.get("order_id"), o.get("datacenter"), o.get("node_size"), o.get("state"),
             o.get("claimed_by") or "-", o.get("vm_name") or "-", o.get("updated_at") or "-")
            for o in sorted(orders, key=lambda o: str(o.get("order_id")))]
    return table(("ORDER", "DATACENTER", "SIZE", "STATE", "CLAIMED_BY", "VM", "UPDATED"),
                 rows)


def verify_clouds(args: argparse.Namespace) -> int:
    from ee.cloud.gcp import GcpError

    try:
        with client_from_args(args) as client:
            pools = client.get("/api/v2/capacity/pools")["pools"]
    except CtlError as exc:
        print(f"eectl capacity verify-clouds: {exc}", file=sys.stderr)
        return exc.exit_code
    clouds_ok = True
    if args.gcp:
        try:
            lines, clouds_ok = gcp_counts(args.gcp)
        except (GcpError, OSError, ValueError) as exc:  # credentials missing, unreadable
            print(f"eectl capacity verify-clouds: GCP: {exc}", file=sys.stderr)
            return 1
        for line in lines:
            print(f"gcp {line}")
    if not pools:
        print("no capacity pools have targets")
        return 0 if clouds_ok else 1
    print(pools_table(pools))
    short = [p for p in pools if p.get("shortfall", 0) > 0]
    if short:
        names = ", ".join(f"{p['datacenter']}/{p['node_size']} ({p['shortfall']})"
                          for p in short)
        print(f"short: {names}", file=sys.stderr)
        return 1
    return 0 if clouds_ok else 1
