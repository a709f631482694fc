"""The billing ledger's SQL: postings, charge passes, meter runs, holds, and the proof.

Theory of operation
-------------------
Everything here is a plain function of an open :class:`~ee.cp.store.backend.Conn`,
run in the store's worker thread (``RecordStore._call``); each write is one database
transaction, so a crash (kill -9 included) leaves either all of it or none of it.

*Postings.* A :class:`Posting` is a transaction to write: an idempotency key, a kind,
who did it, a memo, and entries that sum to zero per currency (checked by
:func:`check_posting` before anything is written). :func:`post` inserts the
transaction row ``ON CONFLICT (idempotency_key) DO NOTHING``: the UNIQUE constraint,
not memory, decides whether this call is the first with that key. The first call
writes the entries and moves the cached balances; a later call gets the first one's
transaction back (``created=False``), or :class:`IdempotencyConflict` when the key was
used for a different posting. Rows are never updated or deleted (the migration's
triggers refuse it); :func:`reverse` is the correction: a new transaction with the
opposite entries whose ``corrects`` names the original.

*Charge passes.* :func:`charge` writes a batch of :class:`WindowCharge` (one per
deployment, replica and minute window) in one transaction: for each window, the
``usage_windows`` row goes first, ``ON CONFLICT DO NOTHING``; only a window whose row
this pass inserted gets its charge transaction (key ``usage:<usage id>``, entries
tenant -amount, provider +share, platform +fee). So no window is ever charged twice,
whatever runs concurrently (two CPs on one PostgreSQL, a pass restarted after a
crash). Windows are taken in key order and cached balances moved last, once per
(account, currency), in account order: concurrent writers lock in the same order and
do not deadlock (a lost race is retried anyway, see ``Retryable``). On PostgreSQL each
window is one statement (data-modifying CTEs) sent pipelined by ``executemany``.

*Meter runs* (``meter_runs``) are what the meter saw: see ``ee.cp.billing``.

*The proof.* :func:`verify` replays the whole ledger and returns every violated
invariant with its offending rows: transactions that do not sum to zero or have fewer
than two entries; cached balances that differ from the sum of entries; a window
charged twice; a usage window whose charge is missing or of another amount; a charge
without its window; a window charged that no run saw running; a window a run saw
running (before its last sighting, or through it once closed) left uncharged.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from ee.cp.store.backend import INTEGRITY_ERRORS, Conn, Dialect

CURRENCIES: Final = frozenset({"USD"})
MAX_AMOUNT: Final = 10**12  # minor units in one entry: ten billion dollars
KINDS: Final = ("charge", "credit", "payment", "correction")

PLATFORM_REVENUE: Final = "platform:revenue"
PLATFORM_PROMOTIONS: Final = "platform:promotions"  # the source of admin credits
EXTERNAL_PAYMENTS: Final = "external:payments"  # money in from the payment processor


def tenant_account(account_id: str) -> str:
    return f"tenant:{account_id}"


def provider_account(account_id: str) -> str:
    return f"provider:{account_id}"


class LedgerError(ValueError):
    """A posting that must not be written (the caller's fault)."""


class IdempotencyConflict(LedgerError):
    """The key was used before, for a different posting."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for a different "
                         "transaction")
        self.key = key


class NoSuchTransaction(LedgerError):
    """A correction names a transaction that does not exist."""

    def __init__(self, txn_id: int) -> None:
        super().__init__(f"no transaction {txn_id}")
        self.txn_id = txn_id


class AlreadyCorrected(LedgerError):
    """The transaction was already corrected (by another key): one correction each,
    enforced by the unique index ``ledger_transactions_corrects`` (migration 0006)."""

    def __init__(self, txn_id: int, by: int | None) -> None:
        super().__init__(f"transaction {txn_id} was already corrected"
                         + (f" by transaction {by}" if by is not None else ""))
        self.txn_id = txn_id
        self.by = by


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@attrs.frozen
class Entry:
    account: str
    currency: str
    amount: int


@attrs.frozen
class Posting:
    key: str
    kind: str
    actor: str
    entries: tuple[Entry, ...]
    memo: str = ""
    corrects: int | None = None
    data: Mapping[str, Any] = attrs.field(factory=dict)


def check_posting(p: Posting) -> None:
    """Raise :class:`LedgerError` unless *p* may be written (pure)."""
    if not p.key or len(p.key) > 200:
        raise LedgerError("the idempotency key must be 1..200 characters")
    if p.kind not in KINDS:
        raise LedgerError(f"unknown transaction kind {p.kind!r}")
    if not p.actor:
        raise LedgerError("a transaction needs an actor")
    if len(p.entries) < 2:
        raise LedgerError("a transaction needs at least two entries")
    sums: dict[str, int] = defaultdict(int)
    for e in p.entries:
        if not _int(e.amount) or e.amount == 0 or abs(e.amount) > MAX_AMOUNT:
            raise LedgerError(f"entry amount must be a non-zero integer of at most "
                              f"{MAX_AMOUNT} minor units, got {e.amount!r}")
        if e.currency not in CURRENCIES:
            raise LedgerError(f"unknown currency {e.currency!r}")
        if not e.account or not isinstance(e.account, str):
            raise LedgerError("an entry needs an account")
        sums[e.currency] += e.amount
    unbalanced = {c: s for c, s in sums.items() if s != 0}
    if unbalanced:
        raise LedgerError(f"entries do not sum to zero per currency: {unbalanced}")


@attrs.frozen
class Posted:
    txn_id: int
    key: str
    kind: str
    at: str
    actor: str
    memo: str
    corrects: int | None
    entries: tuple[Entry, ...]
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return {"txn_id": self.txn_id, "idempotency_key": self.key, "kind": self.kind,
                "at": self.at, "actor": self.actor, "memo": self.memo,
                "corrects": self.corrects,
                "entries": [{"account": e.account, "currency": e.currency,
                             "amount_minor": e.amount} for e in self.entries]}


def _move_balances(conn: Conn, deltas: Mapping[tuple[str, str], int]) -> None:
    rows = [(a, c, d) for (a, c), d in sorted(deltas.items()) if d != 0]
    if rows:
        conn.executemany(
            "INSERT INTO ledger_balances (account, currency, balance) VALUES (?, ?, ?)"
            " ON CONFLICT (account, currency) DO UPDATE"
            " SET balance = ledger_balances.balance + excluded.balance", rows)


def _entries_of(conn: Conn, txn_id: int) -> tuple[Entry, ...]:
    rows = conn.execute("SELECT account, currency, amount FROM ledger_entries"
                        " WHERE txn_id = ? ORDER BY entry_id", (txn_id,)).fetchall()
    return tuple(Entry(str(a), str(c), int(n)) for a, c, n in rows)


def find(conn: Conn, key: str) -> Posted | None:
    row = conn.execute("SELECT txn_id, idempotency_key, kind, at, actor, memo, corrects"
                       " FROM ledger_transactions WHERE idempotency_key = ?",
                       (key,)).fetchone()
    if row is None:
        return None
    txn_id = int(row[0])
    return Posted(txn_id, str(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]),
                  None if row[6] is None else int(row[6]), _entries_of(conn, txn_id), False)


def _same(p: Posting, found: Posted) -> bool:
    def norm(entries: Iterable[Entry]) -> list[tuple[str, str, int]]:
        return sorted((e.account, e.currency, e.amount) for e in entries)

    return (found.kind == p.kind and norm(found.entries) == norm(p.entries)
            and found.corrects == p.corrects)


def post_in(conn: Conn, p: Posting, at: str,
            audit: tuple[str, str, str, Mapping[str, Any]] | None = None) -> Posted:
    """Inside a transaction: write *p* (checked) unless its key exists; *audit*
    (actor, action, target, data) is written with it, only when it is new."""
    check_posting(p)
    row = conn.execute(
        "INSERT INTO ledger_transactions (idempotency_key, kind, at, actor, memo, corrects,"
        " data) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING"
        " RETURNING txn_id",
        (p.key, p.kind, at, p.actor, p.memo, p.corrects,
         json.dumps(dict(p.data), sort_keys=True))).fetchone()
    if row is None:
        found = find(conn, p.key)
        assert found is not None  # the conflict was on this key
        if not _same(p, found):
            raise IdempotencyConflict(p.key)
        return found
    txn_id = int(row[0])
    conn.executemany("INSERT INTO ledger_entries (txn_id, account, currency, amount)"
                     " VALUES (?, ?, ?, ?)",
                     [(txn_id, e.account, e.currency, e.amount) for e in p.entries])
    deltas: dict[tuple[str, str], int] = defaultdict(int)
    for e in p.entries:
        deltas[(e.account, e.currency)] += e.amount
    _move_balances(conn, deltas)
    if audit is not None:
        actor, action, target, data = audit
        conn.execute("INSERT INTO audit (at, actor, action, target, data)"
                     " VALUES (?, ?, ?, ?, ?)",
                     (at, actor, action, target,
                      json.dumps({**data, "txn_id": txn_id}, sort_keys=True)))
    return Posted(txn_id, p.key, p.kind, at, p.actor, p.memo, p.corrects, p.entries, True)


def post(conn: Conn, p: Posting, at: str,
         audit: tuple[str, str, str, Mapping[str, Any]] | None = None) -> Posted:
    with conn.transaction():
        return post_in(conn, p, at, audit)


def reverse(conn: Conn, txn_id: int, key: str, actor: str, memo: str, at: str) -> Posted:
    """A correction: the opposite of transaction *txn_id*, referencing it. A
    transaction is corrected at most once: :class:`AlreadyCorrected` when another key
    did it (the same key again is the same correction), :class:`NoSuchTransaction`
    when there is no *txn_id*."""

    def corrected_by() -> int | None:
        row = conn.execute("SELECT txn_id FROM ledger_transactions WHERE corrects = ?"
                           " AND idempotency_key <> ?", (txn_id, key)).fetchone()
        return None if row is None else int(row[0])

    try:
        with conn.transaction():
            row = conn.execute("SELECT kind FROM ledger_transactions WHERE txn_id = ?",
                               (txn_id,)).fetchone()
            if row is None:
                raise NoSuchTransaction(txn_id)
            by = corrected_by()
            if by is not None:
                raise AlreadyCorrected(txn_id, by)
            entries = tuple(Entry(e.account, e.currency, -e.amount)
                            for e in _entries_of(conn, txn_id))
            return post_in(conn, Posting(key, "correction", actor, entries, memo, txn_id),
                           at, (actor, "billing.correction", str(txn_id), {"memo": memo}))
    except INTEGRITY_ERRORS:  # a concurrent correction won the unique index
        if find(conn, key) is None and (by := corrected_by()) is not None:
            raise AlreadyCorrected(txn_id, by) from None
        raise


# --- charge passes ---------------------------------------------------------------------


@attrs.frozen
class WindowCharge:
    """One (deployment, replica, minute window) to charge: the tenant pays ``amount``,
    of which ``fee`` goes to the platform and the rest to ``provider``."""

    deployment_id: str
    replica_id: str
    window: int
    account_id: str
    node_size: str
    provider: str  # a ledger account
    price_version: int
    amount: int
    fee: int
    currency: str = "USD"

    def entries(self) -> list[tuple[str, int]]:
        out = [(tenant_account(self.account_id), -self.amount),
               (self.provider, self.amount - self.fee), (PLATFORM_REVENUE, self.fee)]
        return [(a, n) for a, n in out if n != 0]


@attrs.frozen
class RunAdvance:
    """After the pass: run (deployment, replica, started) is charged through ``window``."""

    deployment_id: str
    replica_id: str
    started_window: int
    window: int


@attrs.frozen
class PassResult:
    windows: int  # windows this pass wrote (not those another writer had)
    amount: int  # minor units charged by this pass


_PG_CHARGE: Final = """
WITH u AS (
    INSERT INTO usage_windows (deployment_id, replica_id, window_start, account_id,
        node_size, provider, price_version, amount_minor, currency)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id),
t AS (
    INSERT INTO ledger_transactions (idempotency_key, kind, at, actor, memo, data)
    SELECT 'usage:' || u.id, 'charge', ?, ?, ?, ? FROM u WHERE ?::bigint > 0
    RETURNING txn_id),
e AS (
    INSERT INTO ledger_entries (txn_id, account, currency, amount)
    SELECT t.txn_id, v.account, ?, v.amount FROM t CROSS JOIN
        (VALUES (?::text, ?::bigint), (?::text, ?::bigint), (?::text, ?::bigint))
        AS v (account, amount)
    WHERE v.amount <> 0)
SELECT count(*) FROM u
"""


def charge(conn: Conn, charges: Sequence[WindowCharge], advances: Sequence[RunAdvance],
           actor: str, at: str) -> PassResult:
    """Write one charge pass (see the module docstring); one database transaction."""
    with conn.transaction():
        return charge_in(conn, charges, advances, actor, at)


def charge_in(conn: Conn, charges: Sequence[WindowCharge], advances: Sequence[RunAdvance],
              actor: str, at: str) -> PassResult:
    """:func:`charge`, inside the caller's transaction."""
    ordered = sorted(charges, key=lambda c: (c.deployment_id, c.replica_id, c.window))
    for c in ordered:
        if not (_int(c.amount) and _int(c.fee) and 0 <= c.fee <= c.amount <= MAX_AMOUNT):
            raise LedgerError(f"bad window charge {c!r}")
        if c.currency not in CURRENCIES:
            raise LedgerError(f"unknown currency {c.currency!r}")
    if conn.dialect is Dialect.POSTGRESQL:
        owned = _charge_pg(conn, ordered, actor, at)
    else:
        owned = _charge_sqlite(conn, ordered, actor, at)
    deltas: dict[tuple[str, str], int] = defaultdict(int)
    for c in owned:
        for account, amount in c.entries():
            deltas[(account, c.currency)] += amount
    _move_balances(conn, deltas)
    conn.executemany(
        "UPDATE meter_runs SET charged_through = ? WHERE deployment_id = ?"
        " AND replica_id = ? AND started_window = ? AND charged_through < ?",
        [(a.window, a.deployment_id, a.replica_id, a.started_window, a.window)
         for a in sorted(advances, key=lambda a: (a.deployment_id, a.replica_id,
                                                   a.started_window))])
    return PassResult(len(owned), sum(c.amount for c in owned))


def _memo(c: WindowCharge) -> tuple[str, str]:
    memo = f"{c.deployment_id} {c.replica_id} window {c.window}"
    data = json.dumps({"deployment_id": c.deployment_id, "replica_id": c.replica_id,
                       "window": c.window, "node_size": c.node_size,
                       "price_version": c.price_version}, sort_keys=True)
    return memo, data


def _charge_sqlite(conn: Conn, ordered: Sequence[WindowCharge], actor: str, at: str
                   ) -> list[WindowCharge]:
    owned = []
    raw = conn.raw
    entries: list[tuple[int, str, str, int]] = []
    for c in ordered:
        row = raw.execute(
            "INSERT INTO usage_windows (deployment_id, replica_id, window_start, account_id,"
            " node_size, provider, price_version, amount_minor, currency)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            (c.deployment_id, c.replica_id, c.window, c.account_id, c.node_size,
             c.provider, c.price_version, c.amount, c.currency)).fetchone()
        if row is None:
            continue
        owned.append(c)
        if c.amount == 0:
            continue
        memo, data = _memo(c)
        (txn_id,) = raw.execute(
            "INSERT INTO ledger_transactions (idempotency_key, kind, at, actor, memo, data)"
            " VALUES (?, 'charge', ?, ?, ?, ?) RETURNING txn_id",
            (f"usage:{row[0]}", at, actor, memo, data)).fetchone()
        entries.extend((txn_id, account, c.currency, amount)
                       for account, amount in c.entries())
    raw.executemany("INSERT INTO ledger_entries (txn_id, account, currency, amount)"
                    " VALUES (?, ?, ?, ?)", entries)
    return owned


def _charge_pg(conn: Conn, ordered: Sequence[WindowCharge], actor: str, at: str
               ) -> list[WindowCharge]:
    params = []
    for c in ordered:
        memo, data = _memo(c)
        triple = [(tenant_account(c.account_id), -c.amount),
                  (c.provider, c.amount - c.fee), (PLATFORM_REVENUE, c.fee)]
        params.append((c.deployment_id, c.replica_id, c.window, c.account_id, c.node_size,
                       c.provider, c.price_version, c.amount, c.currency,
                       at, actor, memo, data, c.amount, c.currency,
                       *(x for pair in triple for x in pair)))
    if not params:
        return []
    sql = _PG_CHARGE.replace("?", "%s")
    owned = []
    with conn.raw.cursor() as cur:
        cur.executemany(sql, params, returning=True)
        i = 0
        while True:
            row = cur.fetchone()
            if row is not None and int(row[0]) > 0:
                owned.append(ordered[i])
            i += 1
            if not cur.nextset():
                break
    return owned


# --- meter runs -----------------------------------------------------------------------


@attrs.frozen
class Run:
    deployment_id: str
    replica_id: str
    started_window: int
    account_id: str
    node_size: str
    provider: str
    seen_window: int
    charged_through: int
    closed: bool


_RUN_COLUMNS: Final = ("deployment_id, replica_id, started_window, account_id, node_size,"
                       " provider, seen_window, charged_through, closed")


def _run(row: Sequence[Any]) -> Run:
    return Run(str(row[0]), str(row[1]), int(row[2]), str(row[3]), str(row[4]),
               str(row[5]), int(row[6]), int(row[7]), bool(row[8]))


def open_runs(conn: Conn) -> list[Run]:
    rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM meter_runs WHERE closed = 0"
                        " ORDER BY deployment_id, replica_id, started_window").fetchall()
    return [_run(r) for r in rows]


def runs_to_charge(conn: Conn) -> list[Run]:
    """Runs with windows left to charge (open, or closed and not charged through)."""
    rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM meter_runs WHERE closed = 0"
                        " OR charged_through < seen_window"
                        " ORDER BY deployment_id, replica_id, started_window").fetchall()
    return [_run(r) for r in rows]


def observe(conn: Conn, new: Sequence[Run], seen: Sequence[tuple[Run, int]],
            closed: Sequence[Run]) -> None:
    """One meter observation, in one transaction (see :func:`observe_in`)."""
    with conn.transaction():
        observe_in(conn, new, seen, closed)


def observe_in(conn: Conn, new: Sequence[Run], seen: Sequence[tuple[Run, int]],
               closed: Sequence[Run]) -> None:
    """Start *new* runs, move the last sighting of *seen* runs forward, close *closed*
    ones (inside the caller's transaction)."""
    conn.executemany(
        f"INSERT INTO meter_runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)"
        " ON CONFLICT DO NOTHING",
        [(r.deployment_id, r.replica_id, r.started_window, r.account_id, r.node_size,
          r.provider, r.seen_window, r.charged_through) for r in new])
    key = " WHERE deployment_id = ? AND replica_id = ? AND started_window = ?"
    conn.executemany(
        "UPDATE meter_runs SET seen_window = ?" + key + " AND seen_window < ?",
        [(w, r.deployment_id, r.replica_id, r.started_window, w) for r, w in seen])
    conn.executemany("UPDATE meter_runs SET closed = 1" + key,
                     [(r.deployment_id, r.replica_id, r.started_window) for r in closed])


def record_pass(conn: Conn, at: str, cp: str, result: PassResult, duration_ms: int) -> None:
    conn.execute("INSERT INTO charge_passes (at, cp, windows, amount, duration_ms)"
                 " VALUES (?, ?, ?, ?, ?)", (at, cp, result.windows, result.amount,
                                             duration_ms))


def last_passes(conn: Conn, limit: int = 5) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT at, cp, windows, amount, duration_ms FROM charge_passes"
                        " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [{"at": r[0], "cp": r[1], "windows": int(r[2]), "amount_minor": int(r[3]),
             "duration_ms": int(r[4])} for r in rows]


# --- price books ----------------------------------------------------------------------


def price_books(conn: Conn, limit: int = 100) -> list[tuple[int, str, str, dict[str, Any]]]:
    rows = conn.execute("SELECT version, created_at, actor, doc FROM price_books"
                        " ORDER BY version DESC LIMIT ?", (limit,)).fetchall()
    return [(int(v), str(at), str(actor), json.loads(doc)) for v, at, actor, doc in rows]


def add_price_book(conn: Conn, doc: Mapping[str, Any], actor: str, at: str,
                   only_if_none: bool = False) -> int:
    """Store *doc* as the next version (or, with *only_if_none*, as version 1 when no
    book exists yet; the existing latest version otherwise)."""
    with conn.transaction():
        (latest,) = conn.execute("SELECT COALESCE(max(version), 0) FROM price_books"
                                 ).fetchone()
        if only_if_none and latest:
            return int(latest)
        version = int(latest) + 1
        row = conn.execute("INSERT INTO price_books (version, created_at, actor, doc)"
                           " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING version",
                           (version, at, actor, json.dumps(dict(doc), sort_keys=True))
                           ).fetchone()
        if row is None:  # a concurrent writer took this version: ours is the next pass
            raise LedgerError("a concurrent price change took this version; retry")
        return version


# --- balances, holds, pages -----------------------------------------------------------


def balance(conn: Conn, account: str, currency: str = "USD") -> int:
    row = conn.execute("SELECT balance FROM ledger_balances WHERE account = ?"
                       " AND currency = ?", (account, currency)).fetchone()
    return 0 if row is None else int(row[0])


def balances(conn: Conn, prefix: str) -> list[tuple[str, str, int]]:
    rows = conn.execute("SELECT account, currency, balance FROM ledger_balances"
                        " WHERE substr(account, 1, ?) = ? ORDER BY account, currency",
                        (len(prefix), prefix)).fetchall()
    return [(str(a), str(c), int(b)) for a, c, b in rows]


def holds(conn: Conn) -> dict[str, tuple[int, int | None]]:
    rows = conn.execute("SELECT account_id, low_since, suspended_at FROM billing_holds"
                        ).fetchall()
    return {str(a): (int(s), None if x is None else int(x)) for a, s, x in rows}


def suspended(conn: Conn, account_id: str) -> bool:
    row = conn.execute("SELECT suspended_at FROM billing_holds WHERE account_id = ?",
                       (account_id,)).fetchone()
    return row is not None and row[0] is not None


def set_hold(conn: Conn, account_id: str, low_since: int, suspended_at: int | None) -> None:
    conn.execute("INSERT INTO billing_holds (account_id, low_since, suspended_at)"
                 " VALUES (?, ?, ?) ON CONFLICT (account_id) DO UPDATE"
                 " SET suspended_at = excluded.suspended_at",
                 (account_id, low_since, suspended_at))


def clear_hold(conn: Conn, account_id: str) -> None:
    conn.execute("DELETE FROM billing_holds WHERE account_id = ?", (account_id,))


def usage_page(conn: Conn, account_id: str, limit: int, before: int | None,
               deployment_id: str | None) -> list[dict[str, Any]]:
    where = "account_id = ?"
    params: list[object] = [account_id]
    if before is not None:
        where += " AND id < ?"
        params.append(before)
    if deployment_id is not None:
        where += " AND deployment_id = ?"
        params.append(deployment_id)
    rows = conn.execute(
        "SELECT id, deployment_id, replica_id, window_start, node_size, price_version,"
        f" amount_minor, currency FROM usage_windows WHERE {where} ORDER BY id DESC"
        " LIMIT ?", (*params, limit)).fetchall()
    return [{"id": int(r[0]), "deployment_id": r[1], "replica_id": r[2],
             "window": int(r[3]), "node_size": r[4], "price_version": int(r[5]),
             "amount_minor": int(r[6]), "currency": r[7]} for r in rows]


def ledger_page(conn: Conn, account: str, limit: int, before: int | None
                ) -> list[dict[str, Any]]:
    where = "e.account = ?"
    params: list[object] = [account]
    if before is not None:
        where += " AND e.entry_id < ?"
        params.append(before)
    rows = conn.execute(
        "SELECT e.entry_id, t.txn_id, t.at, t.kind, t.memo, t.idempotency_key,"
        " t.corrects, e.amount, e.currency FROM ledger_entries e"
        " JOIN ledger_transactions t ON t.txn_id = e.txn_id"
        f" WHERE {where} ORDER BY e.entry_id DESC LIMIT ?", (*params, limit)).fetchall()
    return [{"entry_id": int(r[0]), "txn_id": int(r[1]), "at": r[2], "kind": r[3],
             "memo": r[4], "idempotency_key": r[5],
             "corrects": None if r[6] is None else int(r[6]),
             "amount_minor": int(r[7]), "currency": r[8]} for r in rows]


# --- the proof ------------------------------------------------------------------------


@attrs.frozen
class Problem:
    code: str
    message: str
    rows: tuple[tuple[Any, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message,
                "rows": [list(r) for r in self.rows]}


_CHECKS: Final[tuple[tuple[str, str, str], ...]] = (
    ("unbalanced_transaction", "transactions whose entries do not sum to zero per currency"
     " (txn_id, currency, sum)",
     "SELECT txn_id, currency, sum(amount) FROM ledger_entries GROUP BY txn_id, currency"
     " HAVING sum(amount) <> 0 ORDER BY txn_id"),
    ("short_transaction", "transactions with fewer than two entries (txn_id, entries)",
     "SELECT t.txn_id, count(e.entry_id) FROM ledger_transactions t LEFT JOIN"
     " ledger_entries e ON e.txn_id = t.txn_id GROUP BY t.txn_id"
     " HAVING count(e.entry_id) < 2 ORDER BY t.txn_id"),
    ("balance_mismatch", "cached balances that differ from the sum of entries"
     " (account, currency, cached, derived)",
     "SELECT b.account, b.currency, b.balance, COALESCE(d.total, 0) FROM ledger_balances b"
     " LEFT JOIN (SELECT account, currency, sum(amount) AS total FROM ledger_entries"
     " GROUP BY account, currency) d ON d.account = b.account AND d.currency = b.currency"
     " WHERE b.balance <> COALESCE(d.total, 0)"
     " UNION ALL"
     " SELECT d.account, d.currency, NULL, d.total FROM (SELECT account, currency,"
     " sum(amount) AS total FROM ledger_entries GROUP BY account, currency) d"
     " WHERE d.total <> 0 AND NOT EXISTS (SELECT 1 FROM ledger_balances b"
     " WHERE b.account = d.account AND b.currency = d.currency)"),
    ("window_charged_twice", "windows with more than one usage row"
     " (deployment, replica, window, rows)",
     "SELECT deployment_id, replica_id, window_start, count(*) FROM usage_windows"
     " GROUP BY deployment_id, replica_id, window_start HAVING count(*) > 1"),
    ("charge_missing", "usage windows whose charge transaction is missing or of another"
     " amount (usage id, amount, tenant entries)",
     "SELECT u.id, u.amount_minor, COALESCE(sum(e.amount), 0) FROM usage_windows u"
     " LEFT JOIN ledger_transactions t ON t.idempotency_key = 'usage:' || u.id"
     " LEFT JOIN ledger_entries e ON e.txn_id = t.txn_id"
     " AND e.account = 'tenant:' || u.account_id"
     " GROUP BY u.id, u.amount_minor HAVING COALESCE(sum(e.amount), 0) <> -u.amount_minor"
     " ORDER BY u.id"),
    ("charge_without_window", "charge transactions with no usage window (txn_id, key)",
     "SELECT t.txn_id, t.idempotency_key FROM ledger_transactions t WHERE t.kind = 'charge'"
     " AND NOT EXISTS (SELECT 1 FROM usage_windows u"
     " WHERE t.idempotency_key = 'usage:' || u.id) ORDER BY t.txn_id"),
    ("window_not_running", "charged windows no meter run saw running"
     " (deployment, replica, window)",
     "SELECT u.deployment_id, u.replica_id, u.window_start FROM usage_windows u"
     " WHERE NOT EXISTS (SELECT 1 FROM meter_runs r WHERE r.deployment_id = u.deployment_id"
     " AND r.replica_id = u.replica_id"
     " AND u.window_start BETWEEN r.started_window AND r.seen_window)"),
    ("running_window_uncharged", "runs with windows seen running but not charged"
     " (deployment, replica, started, due through, charged windows, due windows)",
     "SELECT r.deployment_id, r.replica_id, r.started_window, r.due, count(u.id),"
     " r.due - r.started_window + 1 FROM (SELECT deployment_id, replica_id, started_window,"
     " CASE WHEN closed = 1 THEN seen_window ELSE seen_window - 1 END AS due"
     " FROM meter_runs) r LEFT JOIN usage_windows u ON u.deployment_id = r.deployment_id"
     " AND u.replica_id = r.replica_id"
     " AND u.window_start BETWEEN r.started_window AND r.due"
     " GROUP BY r.deployment_id, r.replica_id, r.started_window, r.due"
     " HAVING count(u.id) < r.due - r.started_window + 1"),
)

MAX_ROWS: Final = 50


def verify(conn: Conn) -> list[Problem]:
    """Every invariant the ledger must hold, checked from scratch (see the module
    docstring); an empty list means it holds."""
    problems = []
    for code, message, sql in _CHECKS:
        rows = conn.execute(sql).fetchall()
        if rows:
            problems.append(Problem(code, f"{len(rows)} {message}",
                                    tuple(tuple(r) for r in rows[:MAX_ROWS])))
    return problems


def summary(conn: Conn) -> dict[str, int]:
    out = {}
    for name, sql in (("transactions", "SELECT count(*) FROM ledger_transactions"),
                      ("entries", "SELECT count(*) FROM ledger_entries"),
                      ("usage_windows", "SELECT count(*) FROM usage_windows"),
                      ("meter_runs", "SELECT count(*) FROM meter_runs")):
        out[name] = int(conn.execute(sql).fetchone()[0])
    return out
