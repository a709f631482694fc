"""Billing under real process deaths and real concurrency: kill -9 in the middle of a
charge pass (SQLite and PostgreSQL), and two real ``ee-cp`` processes charging and
crediting into one PostgreSQL ledger at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ee.cp.records import RecordStore, create_account
from ee.cp.store import ledger
from ee.cp.store.backend import Conn
from pgkit import pg_server  # noqa: F401  (fixture)

WINDOW = 29_100_000  # a unix minute, well in the past of the seeded runs' "now"

CHILD = r"""
import sys, trio
from ee.cp.billing import Billing, BillingDeps, BillingSettings
from ee.cp.nodes import DEFAULT_NODE_SIZES
from ee.cp.records import RecordStore

async def main(target, window):
    store = await RecordStore.open(target)
    async def none():
        return [], set()
    async def stop(_):
        return []
    billing = Billing(BillingSettings(), BillingDeps(
        store=lambda: store, sightings=none, stop_account=stop, emit=lambda *a: None,
        sizes={s.name: s for s in DEFAULT_NODE_SIZES}, cp_name="child",
        wall=lambda: window * 60))
    await billing.price_book()
    print("charging", flush=True)
    await billing.charge_pass(window)
    print("done", flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def seed_runs(conn: Conn, accounts: list[str], runs: int, windows: int,
              first: int = WINDOW - 100) -> None:
    """*runs* closed meter runs (round robin over *accounts*) of *windows* windows each,
    none charged yet: what a CP that saw them running and died before charging left."""
    rows = [(f"dep-{i:06d}", f"ag-{i:06d}", first, accounts[i % len(accounts)], "llm",
             "provider:prov", first + windows - 1, first - 1) for i in range(runs)]
    with conn.transaction():
        conn.executemany(
            "INSERT INTO meter_runs (deployment_id, replica_id, started_window, account_id,"
            " node_size, provider, seen_window, charged_through, closed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)", rows)


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("delay", [0.05, 0.3])
async def test_kill_9_during_a_charge_pass_then_restart_verifies(
        tmp_path: Path, backend: str, delay: float, request: pytest.FixtureRequest) -> None:
    target = (str(tmp_path / "durable.sqlite3") if backend == "sqlite"
              else request.getfixturevalue("pg_server").new_database())
    runs, windows = 4000, 3
    with trio.fail_after(120):
        async with await RecordStore.open(target) as store:
            await store._call(lambda c: seed_runs(c, ["a1", "a2"], runs, windows))
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD, target, str(WINDOW)], stdout=subprocess.PIPE,
            env=env())
        try:
            assert child.stdout is not None
            seen = b""
            while b"charging" not in seen:
                chunk = await child.stdout.receive_some()
                assert chunk, "the child died before charging"
                seen += chunk
            await trio.sleep(delay)
            child.send_signal(signal.SIGKILL)  # kill -9, mid-pass (or just after)
        finally:
            await child.wait()
        async with await RecordStore.open(target) as store:
            summary = await store._call(ledger.summary)
            # One transaction: all of the pass, or none of it.
            assert summary["usage_windows"] in (0, runs * windows), summary
            problems = {p.code for p in await store._call(ledger.verify)}
            assert problems <= {"running_window_uncharged"}, problems
            # Restart: the next pass charges what is due, once.
            from ee.cp.billing import Billing, BillingDeps, BillingSettings
            from ee.cp.nodes import DEFAULT_NODE_SIZES

            async def none() -> tuple[list[Any], set[str]]:
                return [], set()

            async def stop(_: str) -> list[str]:
                return []

            billing = Billing(BillingSettings(), BillingDeps(
                store=lambda: store, sightings=none, stop_account=stop,
                emit=lambda *a: None, sizes={s.name: s for s in DEFAULT_NODE_SIZES},
                wall=lambda: WINDOW * 60))
            await billing.charge_pass(WINDOW)
            await billing.charge_pass(WINDOW)
            assert await store._call(ledger.verify) == []
            assert (await store._call(ledger.summary))["usage_windows"] == runs * windows


def _start_cp(tmp: Path, name: str, database: str) -> tuple[subprocess.Popen[str], str]:
    data = tmp / name
    config = tmp / f"{name}.json"
    config.write_text(json.dumps({"billing": {"interval_s": 0.2,
                                              "max_windows_per_pass": 250}}))
    proc = subprocess.Popen(
        ["ee-cp", "--dev", "--data-dir", str(data), "--listen", "127.0.0.1:0",
         "--agent-listen", "127.0.0.1:0", "--database", database, "--config", str(config),
         "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env())
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"http on ([0-9.]+):([0-9]+)", line)
        if match:
            return proc, f"http://{match[1]}:{match[2]}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"ee-cp {name} did not start: {proc.stderr.read() if proc.stderr else ''}")


def test_two_cp_processes_race_on_one_postgresql_ledger(tmp_path: Path,
                                                        pg_server: Any) -> None:  # noqa: F811
    database = pg_server.new_database()
    runs, windows, credits = 1500, 4, 40

    async def prepare() -> None:
        async with await RecordStore.open(database) as store:
            for account in ("acct-a", "acct-b"):
                await create_account(store, account, account, "tenant")

    trio.run(prepare)
    procs = [_start_cp(tmp_path, name, database) for name in ("cp1", "cp2")]
    try:
        tokens = [(tmp_path / name / "admin.token").read_text().strip()
                  for name in ("cp1", "cp2")]

        async def seed() -> None:
            async with await RecordStore.open(database) as store:
                await store._call(lambda c: seed_runs(c, ["acct-a", "acct-b"], runs,
                                                      windows, first=int(time.time()) // 60
                                                      - 30))

        trio.run(seed)  # both CPs are up: their passes race for the same windows

        def credit(i: int, which: int) -> int:
            _, url = procs[which]
            r = httpx.post(f"{url}/api/v2/admin/accounts/acct-{'ab'[i % 2]}/credits",
                           json={"amount_minor": 100 + i, "currency": "USD",
                                 "reason": "race", "idempotency_key": f"race-{i}"},
                           headers={"Authorization": f"Bearer {tokens[which]}"}, timeout=30)
            assert r.status_code in (200, 201), r.text
            return r.status_code

        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda args: credit(*args),
                                  [(i, w) for i in range(credits) for w in (0, 1)]))
        assert codes.count(201) == credits  # each key once, whichever CP got there first

        async def settled() -> dict[str, Any]:
            async with await RecordStore.open(database) as store:
                with trio.fail_after(90):
                    while True:
                        summary = await store._call(ledger.summary)
                        if summary["usage_windows"] == runs * windows:
                            break
                        await trio.sleep(0.2)
                passes = await store._call(lambda c: c.execute(
                    "SELECT cp, sum(windows) FROM charge_passes GROUP BY cp").fetchall())
                balances = await store._call(lambda c: ledger.balances(c, "tenant:"))
                spent = await store._call(lambda c: c.execute(
                    "SELECT sum(amount_minor) FROM usage_windows").fetchone()[0])
                n_credits = await store._call(lambda c: c.execute(
                    "SELECT count(*) FROM ledger_transactions WHERE kind = 'credit'"
                ).fetchone()[0])
                return {"passes": passes, "balances": balances, "spent": int(spent),
                        "credits": int(n_credits)}

        result = trio.run(settled)
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert result["credits"] == credits
    total = sum(b for _, _, b in result["balances"])
    assert total == sum(100 + i for i in range(credits)) - result["spent"]
    assert sum(int(w) for _, w in result["passes"]) == runs * windows  # none twice
    verify = subprocess.run(["eectl", "billing", "verify", "--database", database],
                            capture_output=True, text=True, env=env(), timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "every invariant holds" in verify.stdout
    print("passes per CP:", result["passes"])
