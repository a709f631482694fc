"""`eectl capacity`: warm capacity per (datacenter, node size) against its targets.

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
    verify.set_defaults(handler=verify_clouds)


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
    try:
        with client_from_args(args) as client:
            pools = client.get("/api/v2/capacity/pools")["pools"]
    except CtlError as exc:
        print(f"eectl capacity verify-clouds: {exc}", file=sys.stderr)
        return exc.exit_code
    if not pools:
        print("no capacity pools have targets")
        return 0
    print(pools_table(pools))
    short = [p for p in pools if p.get("shortfall", 0) > 0]
    if short:
        names = ", ".join(f"{p['datacenter']}/{p['node_size']} ({p['shortfall']})"
                          for p in short)
        print(f"short: {names}", file=sys.stderr)
        return 1
    return 0
