"""`eectl billing`: prove the ledger's invariants.

``verify`` replays the whole ledger and checks every invariant (transactions sum to
zero per currency, cached balances equal the sum of entries, no window charged twice,
every window a run was seen running charged, no charge without its window); it prints
the offending rows and exits 1 when any fails, 0 when all hold. It asks a running CP
(``--cp URL --token ADMIN``: ``GET /api/v2/admin/billing/verify``) or reads the store
itself (``--database``: a ``postgresql://`` URL or a SQLite file), which works with
no CP running (after a crash, before a restart).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import trio

from ee.ctl._table import table
from ee.ctl.client import CtlError, Json, add_cp_options, client_from_args


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    billing = groups.add_parser("billing", help="billing ledger: verify its invariants",
                                description="Billing ledger tools.")
    commands = billing.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify", help="replay the ledger and prove its invariants",
        description="Replay the whole ledger and prove its invariants; exit 1 naming the "
                    "offending rows when any fails. Ask a CP (--cp/--token) or read the "
                    "store directly (--database).")
    add_cp_options(verify)
    verify.add_argument("--database", metavar="URL",
                        help="read this store instead of asking a CP: postgresql://… or "
                             "the SQLite file (DATA_DIR/accounts.sqlite3)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=verify_command)


def _from_database(target: str) -> Json:
    from ee.cp.records import RecordStore, RecordStoreError
    from ee.cp.store import ledger
    from ee.cp.store.backend import is_url

    if not is_url(target) and not Path(target).is_file():
        raise CtlError(f"no store at {target} (give the SQLite file or a postgresql:// URL)")

    async def run() -> Json:
        try:
            store = await RecordStore.open(target)
        except RecordStoreError as exc:
            raise CtlError(str(exc)) from None
        async with store:
            problems = await store._call(ledger.verify)
            summary = await store._call(ledger.summary)
        return {"ok": not problems, "problems": [p.to_dict() for p in problems],
                "summary": summary}

    return trio.run(run)


def report(result: Json) -> str:
    lines = []
    summary: dict[str, Any] = result.get("summary") or {}
    lines.append(", ".join(f"{k} {v}" for k, v in summary.items()))
    for problem in result.get("problems", []):
        lines.append(f"FAIL {problem['code']}: {problem['message']}")
        rows = problem.get("rows") or []
        if rows:
            lines.append(table(tuple(f"c{i}" for i in range(len(rows[0]))),
                               [tuple(r) for r in rows]))
    if result.get("ok"):
        lines.append("ok: every invariant holds")
    return "\n".join(lines)


def verify_command(args: argparse.Namespace) -> int:
    try:
        if args.database:
            result = _from_database(args.database)
        else:
            with client_from_args(args) as client:
                result = client.get("/api/v2/admin/billing/verify")
    except CtlError as exc:
        print(f"eectl billing verify: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(report(result))
    return 0 if result.get("ok") else 1


def billing_overview(view: Json) -> str:
    """The console's ``billing``: tenant balances with their hold, the last passes."""
    holds = {h["account_id"]: h for h in view.get("holds", [])}
    rows = []
    for a in view.get("accounts", []):
        hold = holds.get(a["account_id"])
        state = ("SUSPENDED" if hold and hold.get("suspended_at")
                 else "LOW" if hold else "ok")
        rows.append((a["account_id"], a["balance_minor"], a["currency"], state,
                     (hold or {}).get("low_since") or "-"))
    out = [table(("ACCOUNT", "BALANCE_MINOR", "CUR", "STATE", "LOW_SINCE"), rows)
           if rows else "no tenant balances yet"]
    passes = view.get("last_passes", [])
    if passes:
        out.append(table(("LAST PASS AT", "CP", "WINDOWS", "AMOUNT_MINOR", "MS"),
                         [(p["at"], p["cp"], p["windows"], p["amount_minor"],
                           p["duration_ms"]) for p in passes]))
    else:
        out.append("no charge pass yet")
    suspended = sorted(a for a, h in holds.items() if h.get("suspended_at"))
    out.append(f"suspended accounts: {', '.join(suspended) if suspended else 'none'}")
    return "\n".join(out)
