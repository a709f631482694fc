"""The CP's record store: SQLite (embedded default) or PostgreSQL, in a worker thread.

Theory of operation
-------------------
What lives here (DESIGN.md §2): *history* (events, admitted registrations, refused
registrations aggregated per minute and refusal code) and the *audit trail*; later
migrations add the durable business records (accounts, hashed API keys, the billing
ledger). Nothing here is runtime state. Liveness, placement and
readiness never read the store, so today deleting the file loses history and the audit
trail, nothing else: the next :meth:`RecordStore.open` creates an empty store.

Backends: a file path (or ``:memory:``) opens SQLite through the standard library; a
``postgresql://`` URL opens PostgreSQL through psycopg 3. Both run the same portable SQL
through :mod:`ee.cp.store.backend` (placeholders, DDL substitutions, per-dialect blocks,
error translation); the tests run the store on both.

One :class:`RecordStore` owns one connection. Every call on it runs in
``trio.to_thread.run_sync`` under a ``CapacityLimiter(1)``: the connection is used by
one worker thread at a time (hence ``check_same_thread=False``) and the event loop
never waits on disk. Worker threads are not abandoned on cancellation, so a call
either completes or never started; the limiter is held until the thread is done.

Transactions are explicit: the connection runs in autocommit mode
(``isolation_level=None``), a single INSERT is its own transaction, and anything
larger (a migration, a ledger posting, a batch of history rows from the CP's history
writer: :meth:`RecordStore.append_history`, one thread hop and one commit for up to a
few hundred events) is ``BEGIN IMMEDIATE … COMMIT`` through ``Conn.transaction``.
A row is validated, by building its frozen record from exactly the column values to be
stored, *before* it is written, so an invalid record is never
stored and what a write returns equals what a later read gives. The tables' CHECK
constraints are a second line of defence. Concurrent CP tasks serialise on the limiter;
another process on the same file waits up to ``busy_timeout``.

Opening a store: (SQLite) create the parent directory, drop orphaned ``-wal``/``-shm``/
``-journal`` files of a deleted database, connect, set ``busy_timeout``,
``foreign_keys=ON`` and ``journal_mode=WAL``; (PostgreSQL) connect in autocommit mode
with a ``lock_timeout``; then migrate. Migrations are the packaged
``ee/cp/migrations/NNNN_name.sql`` files (:func:`packaged_migrations`), versions
increasing (a gap is allowed: a version another branch owns lands later and is applied
then); each pending one runs, with its ``schema_migrations`` row, in one transaction
that also re-reads the applied set (under an advisory lock on PostgreSQL), so two
processes opening the same new store do not both apply it.
A store is refused with :class:`RecordStoreError` when it is not a SQLite database,
is a SQLite database of something else, records a schema version newer than this code
knows, or records a different name for a version (an edited migration).

History is kept for a configurable time: :func:`prune_history_forever` deletes rows
older than the retention (:func:`history_cutoff`, a pure decision) on a Trio timer.

Values: timestamps are stored as fixed-width RFC 3339 UTC text
(``2026-01-02T03:04:05.000006Z``), so text order is time order and the ``at``
indexes serve ranges; callers pass an aware ``datetime`` or ``None`` for "now" (wall
clock: right for records, while scheduling uses Trio time elsewhere). JSON columns hold
:func:`~ee.protocol.canonical.canonical_json`. Reads return newest first (``at``, then
``id``, descending).

Errors say whose fault they are: ``ValueError``/``TypeError`` for a bad argument (the
caller's), :class:`RecordStoreError` for the file or the database (every engine
error is translated at the thread boundary, naming the path, a URL without password), and
``trio.ClosedResourceError`` for a call after :meth:`RecordStore.close` (ours).
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeVar, get_args

import attrs
import trio

from ee.cp.store.backend import DB_ERRORS, Conn, Dialect, connect, ddl, is_url, redact
from ee.protocol.canonical import canonical_json

__all__ = [
    "MEMORY",
    "OUTCOMES",
    "SEVERITIES",
    "AuditRecord",
    "EventRecord",
    "HistoryRow",
    "Migration",
    "Outcome",
    "RecordStore",
    "RecordStoreError",
    "RegistrationRecord",
    "RejectionCount",
    "RejectionTally",
    "Severity",
    "event_row",
    "history_cutoff",
    "packaged_migrations",
    "prune_history_forever",
    "registration_row",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

Severity = Literal["debug", "info", "warning", "error", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
Outcome = Literal["admitted", "rejected"]
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

MEMORY: Final = ":memory:"
"""Path of a private in-memory store (tests): gone when closed."""

_MIGRATION_FILE = re.compile(r"\A(\d{4})_([a-z0-9_]+)\.sql\Z")
_MIGRATION_NAME = re.compile(r"\A[a-z0-9_]+\Z")
_SIDE_FILES = ("-wal", "-shm", "-journal")


class RecordStoreError(Exception):
    """The record store at *path* cannot be opened or used (the file's or the DB's fault)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"record store {path}: {detail}")
        self.path = path
        self.detail = detail


# --- records ------------------------------------------------------------------------


def _aware(_: object, attribute: attrs.Attribute[datetime], value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{attribute.name} must be a timezone-aware datetime, got {value!r}")


def _nonempty(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


_str = attrs.validators.instance_of(str)
_opt_str = attrs.validators.optional(_str)
_id = attrs.validators.and_(attrs.validators.instance_of(int), attrs.validators.gt(0))


def _mapping(_: object, attribute: attrs.Attribute[Mapping[str, Any]], value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{attribute.name} must be a mapping, got {type(value).__name__}")


def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class EventRecord:
    """Something that happened, for operators: ``kind`` (``agent.registered``, …) about
    ``subject`` (an agent id, app, datacenter label, …)."""

    id: int = attrs.field(validator=_id)
    at: datetime = attrs.field(validator=_aware)
    kind: str = attrs.field(validator=_nonempty)
    subject: str = attrs.field(validator=_str)
    severity: Severity = attrs.field(validator=attrs.validators.in_(SEVERITIES))
    data: Mapping[str, Any] = attrs.field(validator=_mapping)


def _reasons_given(instance: RegistrationRecord, _: object, value: tuple[str, ...]) -> None:
    if not all(isinstance(r, str) and r for r in value):
        raise ValueError(f"reasons must be non-empty strings, got {value!r}")
    if instance.outcome == "rejected" and not value:
        raise ValueError("a rejected registration must give at least one reason")


@attrs.frozen
class RegistrationRecord:
    """The outcome of one registration attempt. ``reasons`` are the policy's violations:
    why it was rejected, or what was flagged when admitted in ``warn`` mode.
    ``datacenter`` and ``node_size`` are what the VM claimed (empty when it was refused
    before saying); ``agent_id`` is None when no id was assigned (a rejection); ``mrtd``
    and ``tcb_status`` are None when the quote did not yield them."""

    id: int = attrs.field(validator=_id)
    at: datetime = attrs.field(validator=_aware)
    vm_name: str = attrs.field(validator=_nonempty)
    agent_id: str | None = attrs.field(validator=_opt_str)
    datacenter: str = attrs.field(validator=_str)
    node_size: str = attrs.field(validator=_str)
    outcome: Outcome = attrs.field(validator=attrs.validators.in_(OUTCOMES))
    reasons: tuple[str, ...] = attrs.field(converter=_as_tuple, validator=_reasons_given)
    mrtd: str | None = attrs.field(validator=_opt_str)
    tcb_status: str | None = attrs.field(validator=_opt_str)


@attrs.frozen
class AuditRecord:
    """Who (``actor``: an admin token, account, API key id, ``cp`` itself) did what
    (``action``) to what (``target``)."""

    id: int = attrs.field(validator=_id)
    at: datetime = attrs.field(validator=_aware)
    actor: str = attrs.field(validator=_nonempty)
    action: str = attrs.field(validator=_nonempty)
    target: str = attrs.field(validator=_str)
    data: Mapping[str, Any] = attrs.field(validator=_mapping)


R = TypeVar("R", EventRecord, RegistrationRecord, AuditRecord)


@attrs.frozen
class HistoryRow:
    """One validated history row, ready for :meth:`RecordStore.append_history`; built by
    :func:`event_row` or :func:`registration_row` (never by hand)."""

    sql: str
    values: tuple[object, ...]
    draft: EventRecord | RegistrationRecord | AuditRecord = attrs.field(repr=False)


def _history_row(cls: type[R], table: str, values: Mapping[str, object]) -> HistoryRow:
    """Caller's values → a row of *table*, validated by building its record (id 1, not
    yet known) from exactly the column values to be stored; raises ValueError/TypeError
    for a bad argument."""
    row: dict[str, object] = _to_row(values)
    draft = _from_row(cls, ("id", *row), (1, *row.values()))
    sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
    return HistoryRow(sql, tuple(row.values()), draft)


def event_row(kind: str, subject: str, data: Mapping[str, object] | None = None,
              severity: Severity = "info", at: datetime | None = None) -> HistoryRow:
    """The row :meth:`RecordStore.append_event` would store (``at`` None: now)."""
    values = {"at": at, "kind": kind, "subject": subject, "severity": severity}
    return _history_row(EventRecord, "events", {**values, "data": {} if data is None else data})


def registration_row(*, vm_name: str, datacenter: str, node_size: str, outcome: Outcome,
                     reasons: Sequence[str] = (), agent_id: str | None = None,
                     mrtd: str | None = None, tcb_status: str | None = None,
                     at: datetime | None = None) -> HistoryRow:
    """The row :meth:`RecordStore.record_registration` would store (``at`` None: now)."""
    values = {"at": at, "vm_name": vm_name, "agent_id": agent_id, "datacenter": datacenter,
              "node_size": node_size, "outcome": outcome, "reasons": reasons, "mrtd": mrtd,
              "tcb_status": tcb_status}
    return _history_row(RegistrationRecord, "registrations", values)


# --- migrations ---------------------------------------------------------------------


@attrs.frozen
class Migration:
    """One schema step: ``NNNN_name.sql`` as (version, name, SQL text)."""

    version: int = attrs.field(validator=_id)
    name: str = attrs.field(validator=attrs.validators.matches_re(_MIGRATION_NAME))
    sql: str = attrs.field(validator=_str, repr=False)


@functools.cache
def packaged_migrations() -> tuple[Migration, ...]:
    """The migrations shipped in ``ee.cp.migrations``, in version order."""
    found: list[Migration] = []
    for entry in importlib.resources.files("ee.cp.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            raise ValueError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return _in_order(found)


def _in_order(migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    ordered = tuple(sorted(migrations, key=lambda m: m.version))
    versions = [m.version for m in ordered]
    if len(set(versions)) != len(versions) or (versions and versions[0] != 1):
        raise ValueError(f"migration versions must start at 1 and be unique, got {versions}")
    return ordered


def _applied(conn: Conn, path: str) -> dict[int, str]:
    """Versions recorded in ``schema_migrations`` ({} for an empty database)."""
    tables = conn.table_names()
    if "schema_migrations" not in tables:
        if tables:
            raise RecordStoreError(
                path, "is a database but not a record store (no schema_migrations)")
        return {}
    rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    return {int(version): str(name) for version, name in rows}


def _migrate(conn: Conn, path: str, migrations: tuple[Migration, ...]) -> int:
    """Apply pending migrations, one transaction each; return the schema version."""
    known = {m.version: m for m in migrations}
    latest = max(known, default=0)
    while True:
        with conn.transaction():
            conn.lock_migrations()
            applied = _applied(conn, path)
            current = max(applied, default=0)
            unknown = sorted(set(applied) - set(known))
            if unknown:
                raise RecordStoreError(
                    path,
                    f"schema version {unknown[-1]} is newer than this code knows "
                    f"({latest}); run a newer ee, or use another store",
                )
            for version, name in sorted(applied.items()):
                if known[version].name != name:
                    raise RecordStoreError(
                        path,
                        f"schema version {version} was applied as {name!r}, but this code "
                        f"calls it {known[version].name!r} (an edited migration?)",
                    )
            pending = sorted(set(known) - set(applied))
            if not pending:
                return current
            step = known[pending[0]]
            try:
                conn.script(ddl(step.sql, conn.dialect))
            except ValueError as exc:
                raise RecordStoreError(path, f"migration {step.version}: {exc}") from None
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (step.version, step.name, _format_at(_utc(None))),
            )
        log.info("record store %s: applied migration %04d_%s", redact(path), step.version,
                 step.name)


# --- values -------------------------------------------------------------------------


def _utc(at: object) -> datetime:
    """*at* (an aware datetime, or None for now) in UTC."""
    if at is None:
        return datetime.now(UTC)
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"at must be a timezone-aware datetime or None, got {at!r}")
    return at.astimezone(UTC)


def _format_at(at: datetime) -> str:
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _json_text(value: object, what: str) -> str:
    try:
        return canonical_json(value).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what} is not JSON-serialisable: {exc}") from exc


# A record's attrs fields are its table's columns, by name; these few need converting.
_JSON_COLUMNS: Final = frozenset({"data", "reasons"})


def _to_row(values: Mapping[str, object]) -> dict[str, object]:
    """Caller's values → column values: ``at`` to RFC 3339 UTC text, JSON columns to
    canonical JSON. Raises ValueError/TypeError for a bad argument."""
    row = dict(values)
    row["at"] = _format_at(_utc(values["at"]))
    if "data" in row:
        if not isinstance(row["data"], Mapping):
            raise TypeError(f"data must be a mapping, got {type(row['data']).__name__}")
        row["data"] = _json_text(dict(row["data"]), "data")
    if "reasons" in row:
        reasons = row["reasons"]
        if isinstance(reasons, str) or not isinstance(reasons, Iterable):
            raise TypeError(f"reasons must be a sequence of strings, got {reasons!r}")
        row["reasons"] = _json_text(list(reasons), "reasons")
    return row


def _from_row(cls: type[R], columns: Sequence[str], row: Sequence[Any]) -> R:
    """Column values → a (validated) record."""
    values = dict(zip(columns, row, strict=True))
    values["at"] = datetime.fromisoformat(values["at"])
    for column in _JSON_COLUMNS.intersection(values):
        values[column] = json.loads(values[column])
    return cls(**values)


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit must be a non-negative int, got {limit!r}")
    return limit


def _translate(path: str, exc: Exception) -> RecordStoreError:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorname", "")
        if code == "SQLITE_NOTADB":
            return RecordStoreError(path, "is not a database (not a SQLite file)")
        if code == "SQLITE_CORRUPT":
            return RecordStoreError(path, f"database is corrupt: {exc}")
        return RecordStoreError(path, f"{code or type(exc).__name__}: {exc}")
    sqlstate = getattr(exc, "sqlstate", None) or type(exc).__name__
    return RecordStoreError(path, f"{sqlstate}: {' '.join(str(exc).split())}")


# --- opening ------------------------------------------------------------------------


def _connect(
    path: str, migrations: tuple[Migration, ...], busy_timeout: float
) -> tuple[Conn, int]:
    """Worker thread: open, configure and migrate; the connection and schema version."""
    try:
        conn = connect(path, busy_timeout)
    except OSError as exc:
        raise RecordStoreError(path, f"cannot prepare the file: {exc}") from exc
    except DB_ERRORS as exc:
        raise _translate(path, exc) from exc
    try:
        version = _migrate(conn, path, migrations)
    except DB_ERRORS as exc:
        conn.close()
        raise _translate(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn, version


class RecordStore:
    """Handle on an open record store. Obtained from :meth:`open`; never built by hand."""

    __slots__ = ("_conn", "_limiter", "_path", "_schema_version")
    _conn: Conn | None
    _limiter: trio.CapacityLimiter
    _path: str
    _schema_version: int

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("RecordStore cannot be constructed; use await RecordStore.open(path)")

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        migrations: Sequence[Migration] | None = None,
    ) -> RecordStore:
        """Open (creating and migrating as needed) the store at *path*, ``":memory:"``,
        or a ``postgresql://`` URL.

        *migrations* defaults to :func:`packaged_migrations`; tests pass their own.
        Raises :class:`RecordStoreError` when the file cannot be used as a record store.
        """
        path = os.fspath(path)
        if is_url(path):
            busy_timeout = max(busy_timeout, 1.0)
        steps = packaged_migrations() if migrations is None else _in_order(migrations)
        conn, version = await trio.to_thread.run_sync(_connect, path, steps, busy_timeout)
        store = object.__new__(cls)
        store._conn = conn
        store._limiter = trio.CapacityLimiter(1)
        store._path = path
        store._schema_version = version
        return store

    @property
    def path(self) -> str:
        """The file, or the URL without its password."""
        return redact(self._path)

    @property
    def dialect(self) -> Dialect:
        assert self._conn is not None, "record store is closed"
        return self._conn.dialect

    @property
    def schema_version(self) -> int:
        """The schema version the store was at (or migrated to) when opened."""
        return self._schema_version

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"schema {self._schema_version}"
        return f"<RecordStore {self.path} {state}>"

    async def __aenter__(self) -> RecordStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection once in-flight calls are done. Idempotent; shielded, so
        it also closes from a cancelled scope (shutdown)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close_now, limiter=self._limiter)

    def _close_now(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except DB_ERRORS as exc:
                raise _translate(self.path, exc) from exc

    async def _call(self, work: Callable[[Any], T]) -> T:
        """Run ``work(conn)`` in the store's worker thread; *conn* is a
        :class:`~ee.cp.store.backend.Conn` (typed ``Any`` so that callers written
        against ``sqlite3.Connection`` — ``execute``/``fetchone``/``fetchall`` — keep
        working unchanged on both backends)."""

        def run() -> T:
            conn = self._conn  # read in the worker: close() cannot run concurrently
            if conn is None:
                raise trio.ClosedResourceError("record store is closed")
            if conn.broken:  # the server went away: one fresh connection per call
                try:
                    self._conn = conn = connect(self._path, 5.0)
                except DB_ERRORS as exc:
                    raise _translate(self.path, exc) from exc
            try:
                return work(conn)
            except DB_ERRORS as exc:
                raise _translate(self.path, exc) from exc

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def _insert(self, cls: type[R], table: str, values: Mapping[str, object]) -> R:
        """Validate the record (by building it from the row to be stored, the id not yet
        known), then INSERT it; a bad argument raises here and stores nothing."""
        return await self._store_row(_history_row(cls, table, values), cls)

    async def _store_row(self, row: HistoryRow, cls: type[R]) -> R:
        """INSERT one validated *row*; its record of type *cls*, with its id."""
        rowid = await self._call(
            lambda conn: conn.execute(row.sql + " RETURNING id", row.values).fetchone()[0])
        assert isinstance(rowid, int) and isinstance(row.draft, cls)
        return attrs.evolve(row.draft, id=rowid)

    async def append_history(self, rows: Sequence[HistoryRow]) -> int:
        """Store *rows* (from :func:`event_row` / :func:`registration_row`, validated
        already) in order, in one transaction and one worker-thread hop: consecutive rows
        of one table go in one ``executemany``. Either every row is stored or, on
        :class:`RecordStoreError`, none. Returns how many were stored."""
        batch = list(rows)
        if not batch:
            return 0

        def work(conn: Conn) -> int:
            with conn.transaction():
                for sql, run in itertools.groupby(batch, key=lambda r: r.sql):
                    conn.executemany(sql, [r.values for r in run])
            return len(batch)

        return await self._call(work)

    async def _select(
        self, cls: type[R], table: str, limit: int, filters: Mapping[str, str | None]
    ) -> list[R]:
        """The newest *limit* rows of *table* whose columns equal the non-None *filters*."""
        columns = [field.name for field in attrs.fields(cls)]
        used: dict[str, str] = {
            column: value for column, value in filters.items() if value is not None
        }
        where = " AND ".join(f"{column} = ?" for column in used) or "TRUE"
        sql = (
            f"SELECT {', '.join(columns)} FROM {table} WHERE {where}"
            " ORDER BY at DESC, id DESC LIMIT ?"
        )
        params = (*used.values(), _limit(limit))
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        try:
            return [_from_row(cls, columns, row) for row in rows]
        except (TypeError, ValueError) as exc:  # a row edited or damaged outside the CP
            raise RecordStoreError(self.path, f"unreadable {table} row: {exc}") from exc

    # --- events ---------------------------------------------------------------------

    async def append_event(
        self,
        kind: str,
        subject: str,
        data: Mapping[str, object] | None = None,
        severity: Severity = "info",
        at: datetime | None = None,
    ) -> EventRecord:
        """Store an event; returns it with its id."""
        return await self._store_row(event_row(kind, subject, data, severity, at), EventRecord)

    async def recent_events(
        self, limit: int = 100, kind: str | None = None, subject: str | None = None
    ) -> list[EventRecord]:
        """The newest *limit* events, optionally of one *kind* and/or *subject*."""
        return await self._select(EventRecord, "events", limit, {"kind": kind, "subject": subject})

    # --- registrations --------------------------------------------------------------

    async def record_registration(
        self,
        *,
        vm_name: str,
        datacenter: str,
        node_size: str,
        outcome: Outcome,
        reasons: Sequence[str] = (),
        agent_id: str | None = None,
        mrtd: str | None = None,
        tcb_status: str | None = None,
        at: datetime | None = None,
    ) -> RegistrationRecord:
        """Store a registration outcome; returns it with its id."""
        row = registration_row(vm_name=vm_name, datacenter=datacenter, node_size=node_size,
                               outcome=outcome, reasons=reasons, agent_id=agent_id,
                               mrtd=mrtd, tcb_status=tcb_status, at=at)
        return await self._store_row(row, RegistrationRecord)

    async def registrations(
        self, limit: int = 100, vm_name: str | None = None
    ) -> list[RegistrationRecord]:
        """The newest *limit* registration outcomes, optionally of one *vm_name*."""
        return await self._select(RegistrationRecord, "registrations", limit, {"vm_name": vm_name})

    # --- audit ----------------------------------------------------------------------

    async def append_audit(
        self,
        actor: str,
        action: str,
        target: str,
        data: Mapping[str, object] | None = None,
        at: datetime | None = None,
    ) -> AuditRecord:
        """Store an audit entry; returns it with its id."""
        values = {"at": at, "actor": actor, "action": action, "target": target}
        return await self._insert(
            AuditRecord, "audit", {**values, "data": {} if data is None else data}
        )

    async def audit(
        self, limit: int = 100, actor: str | None = None, target: str | None = None
    ) -> list[AuditRecord]:
        """The newest *limit* audit entries, optionally by one *actor* and/or on one
        *target*."""
        return await self._select(AuditRecord, "audit", limit, {"actor": actor, "target": target})


    # --- refused registrations, aggregated -------------------------------------------

    async def add_rejections(self, counts: Iterable[RejectionCount]) -> None:
        """Add *counts* to the per-(minute, code) totals, in one transaction."""
        rows = [(_format_at(c.at), c.code, c.count, c.sample_vm_name, c.sample_reason)
                for c in counts]
        if not rows:
            return

        def work(conn: Conn) -> None:
            with conn.transaction():
                conn.executemany(
                    "INSERT INTO registration_rejections"
                    " (at, code, count, sample_vm_name, sample_reason) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (at, code) DO UPDATE SET"
                    " count = registration_rejections.count + excluded.count,"
                    " sample_vm_name = excluded.sample_vm_name,"
                    " sample_reason = excluded.sample_reason", rows)

        await self._call(work)

    async def rejections(self, limit: int = 100) -> list[RejectionCount]:
        """The newest *limit* (minute, code) totals of refused registrations."""
        params = (_limit(limit),)
        rows = await self._call(lambda conn: conn.execute(
            "SELECT at, code, count, sample_vm_name, sample_reason"
            " FROM registration_rejections ORDER BY at DESC, code LIMIT ?", params).fetchall())
        try:
            return [RejectionCount(datetime.fromisoformat(r[0]), *r[1:]) for r in rows]
        except (TypeError, ValueError) as exc:
            raise RecordStoreError(self.path, f"unreadable rejection row: {exc}") from exc

    # --- retention ------------------------------------------------------------------

    async def prune_history(self, before: datetime) -> int:
        """Delete history (events, registration outcomes, rejection totals) older than
        *before*; the audit trail and business records are kept. Returns rows deleted."""
        cutoff = _format_at(_utc(before))

        def work(conn: Conn) -> int:
            deleted = 0
            with conn.transaction():
                for table in HISTORY_TABLES:
                    deleted += conn.execute(
                        f"DELETE FROM {table} WHERE at < ?", (cutoff,)).rowcount
            return deleted

        return await self._call(work)


HISTORY_TABLES: Final = ("events", "registrations", "registration_rejections")


@attrs.frozen
class RejectionCount:
    """How many registrations were refused with ``code`` in the minute starting ``at``."""

    at: datetime = attrs.field(validator=_aware)
    code: str = attrs.field(validator=_nonempty)
    count: int = attrs.field(validator=_id)
    sample_vm_name: str = attrs.field(validator=_str)
    sample_reason: str = attrs.field(validator=_str)


class RejectionTally:
    """Refused registrations counted per (minute, code) in memory until ``take`` (pure;
    times are unix seconds passed in). Bounded: at most ``max_keys`` (minute, code)
    pairs are kept between takes; beyond that, counts fold into code ``OTHER``."""

    def __init__(self, max_keys: int = 1000) -> None:
        self.max_keys = max_keys
        self._counts: dict[tuple[int, str], list[Any]] = {}

    def add(self, code: str, at: float, vm_name: str, reason: str) -> None:
        minute = int(at // 60) * 60
        key = (minute, code)
        if key not in self._counts and len(self._counts) >= self.max_keys:
            key = (minute, "OTHER")
        entry = self._counts.setdefault(key, [0, "", ""])
        entry[0] += 1
        entry[1], entry[2] = vm_name[:253] or "-", reason[:500]

    def take(self) -> list[RejectionCount]:
        out = [RejectionCount(datetime.fromtimestamp(minute, UTC), code, n, vm, reason)
               for (minute, code), (n, vm, reason) in sorted(self._counts.items())]
        self._counts.clear()
        return out

    def __len__(self) -> int:
        return len(self._counts)


def history_cutoff(now: float, retention_s: float | None) -> datetime | None:
    """Rows older than this (unix *now* minus the retention) are pruned; None keeps
    history forever (retention unset or not positive)."""
    if retention_s is None or retention_s <= 0:
        return None
    return datetime.fromtimestamp(now - retention_s, UTC)


class Prunable(Protocol):
    async def prune_history(self, before: datetime) -> int: ...


async def prune_history_forever(store: Prunable, retention_s: float | None,
                                interval_s: float,
                                wall: Callable[[], float] | None = None) -> None:
    """Prune *store*'s history now and then every *interval_s* (Trio time). *wall*
    gives the unix time the cutoff is computed from (``time.time`` by default)."""
    clock = wall or time.time
    while True:
        cutoff = history_cutoff(clock(), retention_s)
        if cutoff is not None:
            try:
                deleted = await store.prune_history(cutoff)
            except RecordStoreError as exc:
                log.warning("history pruning failed: %s", exc)
            else:
                if deleted:
                    log.info("pruned %d history rows older than %s", deleted,
                             _format_at(cutoff))
        await trio.sleep(interval_s)


# --- accounts and API keys (durable business) ----------------------------------------

AccountKind = Literal["tenant", "provisioner"]
ACCOUNT_KINDS: tuple[AccountKind, ...] = ("tenant", "provisioner")


@attrs.frozen
class AccountRecord:
    account_id: str = attrs.field(validator=_nonempty)
    name: str = attrs.field(validator=_nonempty)
    kind: AccountKind = attrs.field(validator=attrs.validators.in_(ACCOUNT_KINDS))
    created_at: datetime = attrs.field(validator=_aware)
    balance: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"account_id": self.account_id, "name": self.name, "kind": self.kind,
                "created_at": _format_at(self.created_at), "balance": self.balance}


@attrs.frozen
class ApiKeyRecord:
    key_id: str = attrs.field(validator=_nonempty)
    account_id: str = attrs.field(validator=_nonempty)
    secret_sha256: str = attrs.field(validator=_nonempty)
    created_at: datetime = attrs.field(validator=_aware)
    revoked_at: datetime | None = None


def _parse_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def create_account(store: RecordStore, account_id: str, name: str,
                         kind: AccountKind) -> AccountRecord:
    record = AccountRecord(account_id, name, kind, _utc(None))
    at = _format_at(record.created_at)
    await store._call(lambda conn: conn.execute(
        "INSERT INTO accounts (account_id, name, kind, created_at) VALUES (?, ?, ?, ?)",
        (account_id, name, kind, at)))
    return record


async def get_account(store: RecordStore, account_id: str) -> AccountRecord | None:
    # The balance is the ledger's (ee.cp.store.ledger): the cached balance of the
    # account's tenant ledger account, which `eectl billing verify` proves equal to
    # the sum of its entries. The legacy accounts.balance column is not used.
    row = await store._call(lambda conn: conn.execute(
        "SELECT a.account_id, a.name, a.kind, a.created_at, COALESCE(b.balance, 0)"
        " FROM accounts a LEFT JOIN ledger_balances b"
        " ON b.account = 'tenant:' || a.account_id AND b.currency = 'USD'"
        " WHERE a.account_id = ?", (account_id,)).fetchone())
    if row is None:
        return None
    created = _parse_at(row[3])
    assert created is not None
    return AccountRecord(row[0], row[1], row[2], created, int(row[4]))


async def add_api_key(store: RecordStore, key_id: str, account_id: str,
                      secret_sha256: str) -> ApiKeyRecord:
    record = ApiKeyRecord(key_id, account_id, secret_sha256, _utc(None))
    at = _format_at(record.created_at)
    await store._call(lambda conn: conn.execute(
        "INSERT INTO api_keys (key_id, account_id, secret_sha256, created_at) "
        "VALUES (?, ?, ?, ?)", (key_id, account_id, secret_sha256, at)))
    return record


async def find_api_key(store: RecordStore, key_id: str) -> ApiKeyRecord | None:
    """The live (not revoked) key *key_id*, if any."""
    row = await store._call(lambda conn: conn.execute(
        "SELECT key_id, account_id, secret_sha256, created_at FROM api_keys "
        "WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone())
    if row is None:
        return None
    created = _parse_at(row[3])
    assert created is not None
    return ApiKeyRecord(row[0], row[1], row[2], created)


async def revoke_api_keys(store: RecordStore, account_id: str, *, keep: str | None = None
                          ) -> int:
    """Revoke every live key of *account_id* except *keep*; returns how many."""
    at = _format_at(_utc(None))

    def work(conn: Conn) -> int:
        cur = conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE account_id = ? AND revoked_at IS NULL "
            "AND key_id <> ?", (at, account_id, keep or ""))
        return int(cur.rowcount)

    return await store._call(work)
