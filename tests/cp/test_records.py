"""The CP record store: migrations, refusals, round trips, concurrency, loss of the file."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from ee.cp.records import (
    MEMORY,
    EventRecord,
    HistoryRow,
    Migration,
    RecordStore,
    RecordStoreError,
    event_row,
    packaged_migrations,
    registration_row,
)

TIMEOUT = 30
T0 = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cp" / "records.db"


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the file directly, as an operator with the sqlite3 CLI would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    return {str(name) for (name,) in rows(path, "SELECT name FROM sqlite_master")}


def step(version: int, name: str, sql: str) -> Migration:
    return Migration(version=version, name=name, sql=sql)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


# --- migrations -----------------------------------------------------------------------


def test_packaged_migrations_are_numbered_from_one() -> None:
    migrations = packaged_migrations()
    versions = [m.version for m in migrations]
    assert versions[0] == 1 and versions == sorted(set(versions))
    assert migrations[0].name == "initial"
    assert "CREATE TABLE schema_migrations" in migrations[0].sql


async def test_open_creates_parent_dir_and_applies_migrations(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        store = await RecordStore.open(db)
        latest = packaged_migrations()[-1].version
        assert store.schema_version == latest
        assert store.path == str(db)
        await store.close()

        assert {"schema_migrations", "events", "registrations", "audit"} <= tables(db)
        assert {"events_at", "events_kind_at", "events_subject_at"} <= tables(db)
        applied = rows(db, "SELECT version, name, applied_at FROM schema_migrations")
        assert [(v, n) for v, n, _ in applied] == [
            (m.version, m.name) for m in packaged_migrations()
        ]
        for _, _, applied_at in applied:
            when = datetime.fromisoformat(str(applied_at))
            assert when.tzinfo is not None
            assert abs(datetime.now(UTC) - when) < timedelta(minutes=5)
        assert rows(db, "PRAGMA journal_mode") == [("wal",)]


async def test_reopen_is_idempotent_and_keeps_records(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(db) as store:
            await store.append_event("cp.started", "cp")
        before = rows(db, "SELECT * FROM schema_migrations")

        async with await RecordStore.open(db) as store:
            assert store.schema_version == packaged_migrations()[-1].version
            assert [e.kind for e in await store.recent_events()] == ["cp.started"]
        assert rows(db, "SELECT * FROM schema_migrations") == before


async def test_new_migrations_apply_in_order_on_reopen(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        base = packaged_migrations()
        n = base[-1].version
        await (await RecordStore.open(db)).close()
        later = (
            *base,
            step(n + 1, "widgets", "CREATE TABLE widgets (id INTEGER PRIMARY KEY, name TEXT);"),
            step(n + 2, "widget_keys", "ALTER TABLE widgets ADD COLUMN key_hash TEXT;"),
        )
        async with await RecordStore.open(db, migrations=later) as store:
            assert store.schema_version == n + 2
        assert rows(db, "SELECT version, name FROM schema_migrations ORDER BY version")[-2:] == [
            (n + 1, "widgets"),
            (n + 2, "widget_keys"),
        ]
        columns = [row[1] for row in rows(db, "PRAGMA table_info(widgets)")]
        assert columns == ["id", "name", "key_hash"]


async def test_failing_migration_rolls_back_to_previous_version(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        base = packaged_migrations()
        n = base[-1].version
        broken = step(n + 1, "broken", "CREATE TABLE half (x);\nINSERT INTO nowhere VALUES (1);")
        with pytest.raises(RecordStoreError, match="no such table: nowhere") as info:
            await RecordStore.open(db, migrations=(*base, broken))
        assert str(db) in str(info.value)
        assert "half" not in tables(db)
        assert max(v for (v,) in rows(db, "SELECT version FROM schema_migrations")) == n

        async with await RecordStore.open(db) as store:  # the shipped code still opens it
            assert store.schema_version == n


async def test_migration_that_commits_is_refused(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        rogue = step(packaged_migrations()[-1].version + 1, "rogue", "CREATE TABLE r (x); COMMIT;")
        with pytest.raises(RecordStoreError, match="ends the transaction"):
            await RecordStore.open(db, migrations=(*packaged_migrations(), rogue))


async def test_migration_list_must_start_at_one_and_be_unique() -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ValueError, match="start at 1 and be unique"):
            await RecordStore.open(MEMORY, migrations=(step(2, "b", ""),))
        with pytest.raises(ValueError, match="start at 1 and be unique"):
            await RecordStore.open(MEMORY, migrations=(step(1, "a", ""), step(1, "b", "")))


async def test_a_gap_is_filled_when_its_migration_lands_later(db: Path) -> None:
    """Branches number migrations independently (0004 elsewhere, 0005 here): a store
    migrated past a gap gets the missing version applied when the code has it."""
    with trio.fail_after(TIMEOUT):
        base = packaged_migrations()
        n = base[-1].version
        late = step(n + 1, "late", "CREATE TABLE late (x INTEGER);")
        after = step(n + 2, "after", "CREATE TABLE after_gap (x INTEGER);")
        async with await RecordStore.open(db, migrations=(*base, after)) as store:
            assert store.schema_version == n + 2
        assert "late" not in tables(db)
        async with await RecordStore.open(db, migrations=(*base, late, after)) as store:
            assert store.schema_version == n + 2
        assert {"late", "after_gap"} <= tables(db)
        versions = [v for (v,) in rows(db, "SELECT version FROM schema_migrations")]
        assert sorted(versions)[-2:] == [n + 1, n + 2]


async def test_newer_schema_is_refused(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        await (await RecordStore.open(db)).close()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute(
                "INSERT INTO schema_migrations VALUES (999, 'from_the_future', '2030-01-01Z')"
            )
        conn.close()
        with pytest.raises(RecordStoreError, match=r"schema version 999 is newer") as info:
            await RecordStore.open(db)
        assert str(db) in str(info.value)


async def test_edited_migration_is_refused(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        await (await RecordStore.open(db)).close()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE schema_migrations SET name = 'renamed' WHERE version = 1")
        conn.close()
        with pytest.raises(RecordStoreError, match="applied as 'renamed'"):
            await RecordStore.open(db)


async def test_non_sqlite_file_is_refused_and_left_alone(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        db.parent.mkdir(parents=True)
        garbage = b"this is a config file, not a database\n" * 200
        await trio.Path(db).write_bytes(garbage)
        with pytest.raises(RecordStoreError) as info:
            await RecordStore.open(db)
        message = str(info.value)
        assert str(db) in message
        assert "not a database" in message
        assert await trio.Path(db).read_bytes() == garbage


async def test_foreign_sqlite_database_is_refused(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        db.parent.mkdir(parents=True)
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE somebody_elses (x)")
        conn.close()
        with pytest.raises(RecordStoreError, match="not a record store"):
            await RecordStore.open(db)
        assert tables(db) == {"somebody_elses"}


async def test_directory_in_the_way_is_a_record_store_error(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        (tmp_path / "records.db").mkdir()
        with pytest.raises(RecordStoreError, match=r"records\.db"):
            await RecordStore.open(tmp_path / "records.db")


# --- losing the file --------------------------------------------------------------------


async def test_deleted_file_reopens_empty(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(db) as store:
            await store.append_event("agent.registered", "agent-1")
            await store.append_audit("admin", "app.create", "app/web")
        assert sorted(p.name for p in db.parent.iterdir()) == ["records.db"]  # clean close

        await trio.Path(db).unlink()
        async with await RecordStore.open(db) as store:
            assert store.schema_version == packaged_migrations()[-1].version
            assert await store.recent_events() == []
            assert await store.audit() == []
            assert (await store.append_event("cp.started", "cp")).id == 1


async def test_deleted_file_with_stale_sidecars_reopens_empty(db: Path) -> None:
    """A CP that crashed leaves -wal/-shm behind; deleting just the database is enough."""
    with trio.fail_after(TIMEOUT):
        store = await RecordStore.open(db)
        await store.append_event("agent.registered", "agent-1")
        await store.close()
        await trio.Path(db).unlink()
        for suffix in ("-wal", "-shm"):
            await trio.Path(f"{db}{suffix}").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 4092)
        async with await RecordStore.open(db) as store:
            assert await store.recent_events() == []


# --- events -----------------------------------------------------------------------------


async def test_events_round_trip_newest_first_with_filters() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            stored = [
                await store.append_event("agent.registered", "agent-1", {"n": 1}, at=at(1)),
                await store.append_event("agent.stale", "agent-1", {"n": 2}, "warning", at(3)),
                await store.append_event("agent.registered", "agent-2", {"n": 3}, at=at(2)),
                await store.append_event("agent.registered", "agent-1", {"n": 4}, at=at(4)),
            ]
            assert [e.id for e in stored] == [1, 2, 3, 4]

            everything = await store.recent_events()
            assert [e.data["n"] for e in everything] == [4, 2, 3, 1]  # by `at`, not id
            assert sorted(everything, key=lambda e: e.id) == stored  # returned == read back

            registered = await store.recent_events(kind="agent.registered")
            assert [e.data["n"] for e in registered] == [4, 3, 1]
            assert [e.data["n"] for e in await store.recent_events(subject="agent-1")] == [
                4,
                2,
                1,
            ]
            both = await store.recent_events(kind="agent.registered", subject="agent-1")
            assert [e.data["n"] for e in both] == [4, 1]
            assert [e.data["n"] for e in await store.recent_events(limit=2)] == [4, 2]
            assert await store.recent_events(limit=0) == []
            assert await store.recent_events(kind="nothing") == []
            assert stored[1].severity == "warning"
            assert stored[0].severity == "info"


async def test_event_values_are_normalised() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            plus_two = timezone(timedelta(hours=2))
            event = await store.append_event(
                "deploy.started", "app/web", {"b": (1, 2), "a": {"z": None}},
                at=datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=plus_two),
            )  # fmt: skip
            assert event.at == T0
            assert event.at.utcoffset() == timedelta(0)
            assert event.data == {"a": {"z": None}, "b": [1, 2]}  # as JSON has it
            assert isinstance(event, EventRecord)
            (read,) = await store.recent_events()
            assert read == event

            before = datetime.now(UTC)
            now = await store.append_event("cp.started", "cp")
            assert before <= now.at <= datetime.now(UTC)
            assert now.data == {}


async def test_same_instant_orders_by_id() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            for n in range(3):
                await store.append_event("tick", "cp", {"n": n}, at=T0)
            assert [e.data["n"] for e in await store.recent_events()] == [2, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"at": datetime(2026, 1, 1)}, ValueError, "timezone-aware"),
        ({"severity": "loud"}, ValueError, "severity"),
        ({"data": {"x": math.nan}}, ValueError, "JSON"),
        ({"data": {"x": object()}}, TypeError, "JSON"),
        ({"data": [1, 2]}, TypeError, "mapping"),
        ({"kind": ""}, ValueError, "kind"),
    ],
)
async def test_invalid_events_are_refused_and_not_stored(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            args: dict[str, object] = {"kind": "k", "subject": "s", **kwargs}
            with pytest.raises(error, match=match):
                await store.append_event(**args)  # type: ignore[arg-type]
            assert await store.recent_events() == []


async def test_negative_limit_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            with pytest.raises(ValueError, match="limit"):
                await store.recent_events(limit=-1)


# --- registrations ----------------------------------------------------------------------


async def test_registrations_round_trip_with_filter_and_limit() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            rejected = await store.record_registration(
                vm_name="vm-a",
                datacenter="gcp:us-central1",
                node_size="tiny",
                outcome="rejected",
                reasons=["mrtd: not in allowlist", "tcb_status: OutOfDate"],
                mrtd="ab" * 48,
                tcb_status="OutOfDate",
                at=at(1),
            )
            admitted = await store.record_registration(
                vm_name="vm-a",
                datacenter="gcp:us-central1",
                node_size="tiny",
                outcome="admitted",
                agent_id="agent-7",
                mrtd="cd" * 48,
                tcb_status="UpToDate",
                at=at(2),
            )
            other = await store.record_registration(
                vm_name="vm-b",
                datacenter="baremetal:chicago-h100",
                node_size="llm",
                outcome="rejected",
                reasons=("verification: bad quote signature",),
                at=at(3),
            )
            assert rejected.reasons == ("mrtd: not in allowlist", "tcb_status: OutOfDate")
            assert rejected.agent_id is None
            assert other.mrtd is None and other.tcb_status is None

            assert await store.registrations() == [other, admitted, rejected]
            assert await store.registrations(vm_name="vm-a") == [admitted, rejected]
            assert await store.registrations(limit=1, vm_name="vm-a") == [admitted]
            assert await store.registrations(vm_name="vm-z") == []


async def test_rejection_without_reasons_is_refused_and_not_stored() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            with pytest.raises(ValueError, match="at least one reason"):
                await store.record_registration(
                    vm_name="vm-a", datacenter="gcp:x", node_size="tiny", outcome="rejected"
                )
            with pytest.raises(ValueError, match="outcome"):
                await store.record_registration(
                    vm_name="vm-a",
                    datacenter="gcp:x",
                    node_size="tiny",
                    outcome="maybe",  # type: ignore[arg-type]
                )
            with pytest.raises(TypeError, match="reasons"):
                await store.record_registration(
                    vm_name="vm-a",
                    datacenter="gcp:x",
                    node_size="tiny",
                    outcome="rejected",
                    reasons="one string",
                )
            assert await store.registrations() == []


async def test_rejection_before_the_vm_said_anything_is_stored() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            record = await store.record_registration(
                vm_name="-", datacenter="", node_size="", outcome="rejected",
                reasons=["BAD_FRAME", "first frame was not register"],
            )  # fmt: skip
            assert await store.registrations() == [record]


async def test_damaged_row_is_a_record_store_error(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(db) as store:
            await store.append_event("k", "s", {"ok": True})
            conn = sqlite3.connect(db)
            with conn:
                conn.execute("UPDATE events SET data = 'not json'")
            conn.close()
            with pytest.raises(RecordStoreError, match="unreadable events row"):
                await store.recent_events()


# --- audit ------------------------------------------------------------------------------


async def test_audit_round_trip_with_filters_and_limit() -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            first = await store.append_audit(
                "admin", "app.create", "app/web", {"image": "web:1"}, at=at(1)
            )
            second = await store.append_audit("key:abc", "deploy", "app/web", at=at(2))
            third = await store.append_audit("admin", "trust.update", "policy", at=at(3))
            assert first.data == {"image": "web:1"} and second.data == {}

            assert await store.audit() == [third, second, first]
            assert await store.audit(actor="admin") == [third, first]
            assert await store.audit(target="app/web") == [second, first]
            assert await store.audit(actor="admin", target="app/web") == [first]
            assert await store.audit(limit=1) == [third]
            with pytest.raises(ValueError, match="actor"):
                await store.append_audit("", "x", "y")
            assert len(await store.audit()) == 3


# --- concurrency and lifecycle ----------------------------------------------------------


async def test_concurrent_appends_all_land(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(db) as store:
            ids: list[int] = []

            async def append(n: int) -> None:
                ids.append((await store.append_event("load", f"task-{n}", {"n": n})).id)

            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(append, n)

            assert len(ids) == len(set(ids)) == 100
            events = await store.recent_events(limit=1000)
            assert sorted(e.data["n"] for e in events) == list(range(100))
            assert sorted(e.id for e in events) == sorted(ids)
        assert rows(db, "SELECT count(*) FROM events") == [(100,)]


# --- history batches (the CP's history writer) -------------------------------------------


def _mixed_batch(n: int) -> list[HistoryRow]:
    """*n* rows, every third a registration, the rest events, numbered in order."""
    return [registration_row(vm_name=f"vm-{i}", datacenter="gcp:a", node_size="tiny",
                             outcome="admitted", agent_id=f"ag-{i}", at=at(i))
            if i % 3 == 0 else event_row("load", f"s-{i}", {"i": i}, at=at(i))
            for i in range(n)]


async def test_a_history_batch_lands_in_order(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(db) as store:
            assert await store.append_history(_mixed_batch(300)) == 300
            assert await store.append_history([]) == 0
    events = rows(db, "SELECT id, subject, data FROM events ORDER BY id")
    assert [subject for _, subject, _ in events] == [
        f"s-{i}" for i in range(300) if i % 3]
    assert [i for i, _, _ in events] == list(range(1, 201))  # ids in batch order
    assert rows(db, "SELECT vm_name FROM registrations ORDER BY id") == [
        (f"vm-{i}",) for i in range(0, 300, 3)]


async def test_a_batch_is_stored_whole_or_not_at_all(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(db) as store:
            batch = _mixed_batch(10)
            # A row the database refuses (severity, by its CHECK constraint), after good
            # rows; columns: at, kind, subject, severity, data.
            good = event_row("load", "s", severity="info")
            assert good.values[3] == "info"
            bad = attrs.evolve(good, values=(*good.values[:3], "bogus", good.values[4]))
            with pytest.raises(RecordStoreError):
                await store.append_history([*batch, bad])
            assert await store.recent_events() == []
            assert await store.registrations() == []
            assert await store.append_history(batch) == 10


def test_history_rows_are_validated_when_built() -> None:
    with pytest.raises(ValueError):
        event_row("", "s")
    with pytest.raises(TypeError):
        event_row("k", "s", {"x": object()})
    with pytest.raises(ValueError):
        registration_row(vm_name="vm", datacenter="", node_size="", outcome="rejected")


async def test_closing_mid_way_loses_no_acknowledged_batch(db: Path) -> None:
    """Batches written concurrently with close(): every batch whose call returned is in
    the file, whole; every later call fails (ours: ClosedResourceError), storing nothing."""
    acknowledged: list[int] = []
    refused: list[int] = []
    with trio.fail_after(TIMEOUT):
        store = await RecordStore.open(db)

        ten = trio.Event()

        async def writer(w: int) -> None:
            for b in range(20):
                batch = [event_row("load", f"w{w}-b{b}", {"k": k}) for k in range(50)]
                try:
                    await store.append_history(batch)
                except trio.ClosedResourceError:
                    refused.append(w * 100 + b)
                    return
                acknowledged.append(w * 100 + b)
                if len(acknowledged) >= 10:
                    ten.set()

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)
            await ten.wait()
            await store.close()
    assert refused and acknowledged
    stored = rows(db, "SELECT subject, count(*) FROM events GROUP BY subject")
    assert dict(stored) == {f"w{n // 100}-b{n % 100}": 50 for n in acknowledged}


async def test_close_is_idempotent_and_later_calls_fail(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        store = await RecordStore.open(db)
        await store.close()
        await store.close()
        assert "closed" in repr(store)
        with pytest.raises(trio.ClosedResourceError):
            await store.append_event("k", "s")
        with pytest.raises(trio.ClosedResourceError):
            await store.audit()


async def test_close_works_from_a_cancelled_scope(db: Path) -> None:
    with trio.fail_after(TIMEOUT):
        store = await RecordStore.open(db)
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.close()
        with pytest.raises(trio.ClosedResourceError):
            await store.recent_events()


async def test_memory_stores_are_private() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            await RecordStore.open(MEMORY) as one,
            await RecordStore.open(MEMORY) as two,
        ):
            await one.append_event("k", "s")
            assert await two.recent_events() == []


def test_store_cannot_be_built_by_hand() -> None:
    with pytest.raises(TypeError, match=r"RecordStore\.open"):
        RecordStore()


# --- refused registrations, aggregated; retention ---------------------------------------


def test_rejection_tally_counts_per_minute_and_code_and_stays_bounded() -> None:
    from ee.cp.records import RejectionTally

    t0 = T0.replace(second=0, microsecond=0).timestamp()
    tally = RejectionTally(max_keys=3)
    for i in range(50):
        tally.add("BAD_URL", t0 + i % 59, f"vm-{i}", "url scheme must be http or https")
    tally.add("BAD_URL", t0 + 60, "vm-next-minute", "r")
    tally.add("KEY_CHANGED", t0 + 1, "vm-k", "r")
    tally.add("DRIFT", t0 + 2, "vm-d", "r")  # a fourth (minute, code): folds into OTHER
    counts = tally.take()
    assert [(c.at.timestamp() - t0, c.code, c.count) for c in counts] == [
        (0, "BAD_URL", 50), (0, "KEY_CHANGED", 1), (0, "OTHER", 1), (60, "BAD_URL", 1)]
    assert counts[0].sample_vm_name == "vm-49"
    assert tally.take() == [] and len(tally) == 0


async def test_rejection_counts_add_up_in_the_store() -> None:
    from ee.cp.records import RejectionTally

    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            tally = RejectionTally()
            for _ in range(4):
                tally.add("BAD_VM_NAME", at(0).timestamp(), "bad name", "why")
            await store.add_rejections(tally.take())
            tally.add("BAD_VM_NAME", at(0).timestamp(), "other", "why")
            tally.add("BAD_URL", at(1).timestamp(), "vm-u", "scheme")
            await store.add_rejections(tally.take())
            await store.add_rejections([])
            got = [(c.at, c.code, c.count, c.sample_vm_name) for c in await store.rejections()]
    minute = at(0).replace(second=0, microsecond=0)
    assert got == [(minute + timedelta(minutes=1), "BAD_URL", 1, "vm-u"),
                   (minute, "BAD_VM_NAME", 5, "other")]


def test_history_cutoff_decision() -> None:
    from ee.cp.records import history_cutoff

    now = T0.timestamp()
    assert history_cutoff(now, 3600) == T0 - timedelta(hours=1)
    assert history_cutoff(now, None) is None
    assert history_cutoff(now, 0) is None  # 0: keep history forever


async def test_prune_history_deletes_only_old_history() -> None:
    from ee.cp.records import RejectionCount

    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(MEMORY) as store:
            for minutes in (-120, -30, 0):
                await store.append_event("e", str(minutes), at=at(minutes))
                await store.record_registration(vm_name=f"vm{minutes}", datacenter="",
                                                node_size="", outcome="admitted",
                                                at=at(minutes))
                await store.add_rejections([RejectionCount(
                    at(minutes), "BAD_URL", 1, "vm", "why")])
            await store.append_audit("admin", "old", "x", at=at(-10_000))

            async def kept() -> list[str]:
                subjects = [e.subject for e in await store.recent_events()]
                assert [r.vm_name for r in await store.registrations()] == [
                    f"vm{s}" for s in subjects]
                assert len(await store.rejections()) == len(subjects)
                return subjects

            assert await store.prune_history(at(-60)) == 3
            assert await kept() == ["0", "-30"]
            assert await store.prune_history(at(-30)) == 0  # strictly older only
            assert await store.prune_history(at(1)) == 6
            assert await kept() == []
            assert [a.action for a in await store.audit()] == ["old"]  # not history


async def test_history_is_pruned_on_trio_time(autojump_clock: trio.abc.Clock) -> None:
    from ee.cp.records import prune_history_forever

    calls: list[tuple[float, datetime]] = []

    class Store:
        async def prune_history(self, before: datetime) -> int:
            calls.append((trio.current_time() - start, before))
            return 0

    start = trio.current_time()

    def wall() -> float:  # the unix clock, moving with Trio's
        return at(0).timestamp() + trio.current_time() - start

    with trio.fail_after(10 * 3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prune_history_forever, Store(), 3600.0, 600.0, wall)
            await trio.sleep(75 * 60)
            nursery.cancel_scope.cancel()
        assert calls == [(m * 60.0, at(m - 60)) for m in range(0, 80, 10)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prune_history_forever, Store(), 0.0, 600.0, wall)
            await trio.sleep(3600)  # retention 0: keep forever, never prune
            nursery.cancel_scope.cancel()
        assert len(calls) == 8 and trio.current_time() - start == 135 * 60
