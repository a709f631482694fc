"""Billing benchmarks: one charge pass for N running replicas, and concurrent writers.

Run: ``python tools/bench/billing.py [--replicas 10000] [--writers 2] [--database URL]``.
Without ``--database`` it measures SQLite (a temporary file) and, when the Debian
PostgreSQL binaries are installed, a throwaway PostgreSQL cluster (``tests/pgkit.py``).
Prints numbers; asserts nothing (the goal: a 10,000-replica pass under 2 s on SQLite).

* *charge pass*: N replicas seen running for one complete minute window (N meter runs
  due one window each), then ``Billing.charge_pass``: plan, write N usage windows, N
  charge transactions of 3 entries, the cached balances, in one database transaction;
  then the same pass again (nothing due: the idempotent no-op).
* *concurrent writers* (PostgreSQL): W processes charge the same Nx4 windows at once,
  2000 windows per pass; every window is written once (checked), and the wall time
  gives windows/s for the whole.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from ee.cp.billing import Billing, BillingDeps, BillingSettings
from ee.cp.nodes import DEFAULT_NODE_SIZES
from ee.cp.records import RecordStore
from ee.cp.store import ledger
from ee.cp.store.backend import Conn

WINDOW = 29_200_000


def seed(conn: Conn, runs: int, windows: int, tag: str = "", closed: int = 0) -> None:
    rows = [(f"dep{tag}-{i:06d}", f"ag-{i:06d}", WINDOW - windows, f"acct-{i % 50:03d}",
             "llm", f"provider:prov-{i % 5}", WINDOW - 1, WINDOW - windows - 1)
            for i in range(runs)]
    with conn.transaction():
        conn.executemany(
            "INSERT INTO meter_runs (deployment_id, replica_id, started_window, account_id,"
            " node_size, provider, seen_window, charged_through, closed)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, {closed})", rows)


def billing(store: RecordStore, max_windows: int = 10**6) -> Billing:
    async def none() -> tuple[list[Any], set[str]]:
        return [], set()

    async def stop(_: str) -> list[str]:
        return []

    return Billing(BillingSettings(max_windows_per_pass=max_windows), BillingDeps(
        store=lambda: store, sightings=none, stop_account=stop, emit=lambda *a: None,
        sizes={s.name: s for s in DEFAULT_NODE_SIZES}, cp_name="bench",
        wall=lambda: WINDOW * 60 + 30))


async def charge_pass(target: str, replicas: int) -> dict[str, float]:
    async with await RecordStore.open(target) as store:
        await store._call(lambda c: seed(c, replicas, 1))
        b = billing(store)
        await b.price_book()
        start = time.perf_counter()
        result = await b.charge_pass(WINDOW)
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        again = await b.charge_pass(WINDOW)
        noop = time.perf_counter() - start
        entries = (await store._call(ledger.summary))["entries"]
        problems = await store._call(ledger.verify)
    assert result.windows == replicas and again.windows == 0 and not problems
    return {"seconds": elapsed, "windows_per_s": replicas / elapsed,
            "entries_per_s": entries / elapsed, "entries": entries, "noop_seconds": noop}


def _writer(target: str, passes: list[float]) -> None:
    async def run() -> None:
        async with await RecordStore.open(target) as store:
            b = billing(store, max_windows=2000)
            while True:
                start = time.perf_counter()
                await b.charge_pass(WINDOW)
                passes.append(time.perf_counter() - start)
                if not await store._call(ledger.runs_to_charge):
                    return

    trio.run(run)


def concurrent(target: str, replicas: int, writers: int) -> dict[str, float]:
    async def prepare() -> None:
        async with await RecordStore.open(target) as store:
            # Closed runs (their replicas stopped): done once every window is charged.
            await store._call(lambda c: seed(c, replicas, 4, "c", closed=1))
            await billing(store).price_book()

    trio.run(prepare)
    with multiprocessing.Manager() as manager:
        passes = manager.list()
        procs = [multiprocessing.Process(target=_writer, args=(target, passes))
                 for _ in range(writers)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        elapsed = time.perf_counter() - start
        n_passes = len(passes)

    async def check() -> tuple[int, int]:
        async with await RecordStore.open(target) as store:
            rows = await store._call(lambda c: c.execute(
                "SELECT count(*) FROM usage_windows"
                " WHERE substr(deployment_id, 1, 5) = 'depc-'").fetchone()[0])
            problems = await store._call(ledger.verify)
            return int(rows), len(problems)

    windows, problems = trio.run(check)
    assert windows == replicas * 4 and problems == 0, (windows, problems)
    return {"seconds": elapsed, "windows_per_s": windows / elapsed, "passes": n_passes}


def report(name: str, numbers: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(
        f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in numbers.items()),
        flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=10_000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--database", help="a postgresql:// URL (an empty database)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report(f"sqlite charge pass, {args.replicas} replicas",
               trio.run(charge_pass, str(Path(tmp) / "bench.sqlite3"), args.replicas))
        server = None
        if args.database:
            urls = [args.database, args.database]
        else:
            import pgkit

            if pgkit.pg_bin() is None:
                print("postgresql: not installed, skipped")
                return
            pg_dir = Path(tempfile.mkdtemp(prefix="ee-pg-"))  # traversable by its user
            server = pgkit.PgServer.start(pg_dir)
            urls = [server.new_database(), server.new_database()]
        try:
            report(f"postgresql charge pass, {args.replicas} replicas",
                   trio.run(charge_pass, urls[0], args.replicas))
            report(f"postgresql {args.writers} concurrent writers, "
                   f"{args.replicas * 4} windows",
                   concurrent(urls[1], args.replicas, args.writers))
        finally:
            if server is not None:
                server.stop()
                import shutil

                shutil.rmtree(server.directory, ignore_errors=True)


if __name__ == "__main__":
    main()
