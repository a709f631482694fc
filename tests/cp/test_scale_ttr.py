"""Time-to-ready at scale (issue 17): the CP's per-agent work after a restart.

The history writer drains events in batches (one thread hop, one transaction each) and
drops only a bad event, never its batch; the billing tick renders only the agents that
run a replica, not every agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from ee.cp import billing as billing_mod
from ee.cp.events import Event
from ee.cp.records import HistoryRow, RecordStore, RecordStoreError, RejectionTally
from ee.cp.server import HISTORY_BATCH, ControlPlane, _drain

TIMEOUT = 30


def _event(seq: int, kind: str, subject: str = "s", **data: Any) -> Event:
    return Event(seq, 1_700_000_000.0 + seq, kind, subject, data)


def _registration(seq: int, vm: str, outcome: str = "admitted", **more: Any) -> Event:
    return _event(seq, "registration", vm, vm_name=vm, datacenter="gcp:a",
                  node_size="tiny", outcome=outcome, **more)


def test_drain_takes_only_what_is_queued_in_order() -> None:
    tx, rx = trio.open_memory_channel[Event](1000)
    for seq in range(300):
        tx.send_nowait(_event(seq, "k"))
    assert [e.seq for e in _drain(rx, HISTORY_BATCH)] == list(range(HISTORY_BATCH))
    assert [e.seq for e in _drain(rx, HISTORY_BATCH)] == list(range(HISTORY_BATCH, 300))
    assert _drain(rx, HISTORY_BATCH) == []  # nothing queued: returns, does not wait
    tx.send_nowait(_event(300, "k"))
    tx.close()
    assert [e.seq for e in _drain(rx, HISTORY_BATCH)] == [300]
    assert _drain(rx, HISTORY_BATCH) == []  # closed and empty


async def test_a_batch_keeps_order_and_drops_only_a_bad_event(tmp_path: Path) -> None:
    tally = RejectionTally()
    batch = [
        _event(1, "agent.registered", "ag-1"),
        _registration(2, "vm-1", agent_id="ag-1"),
        _event(3, "agent.odd", "ag-2", blob=object()),  # not JSON: dropped alone
        _registration(4, "vm-2", "rejected", reasons=["QUOTE_BAD"]),  # counted, no row
        _event(5, "registration.rejected", "vm-2"),  # live only
        _registration(6, "vm-3", datacenter_extra=1),  # unknown field: dropped alone
        _event(7, "agent.ready", "ag-1"),
    ]
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(tmp_path / "r.sqlite3") as store:
            await ControlPlane._record(store, tally, batch)
            events = await store.recent_events()
            registrations = await store.registrations()
    assert [(e.kind, e.subject) for e in reversed(events)] == [
        ("agent.registered", "ag-1"), ("agent.ready", "ag-1")]
    assert [r.vm_name for r in registrations] == ["vm-1"]
    assert [(c.code, c.count) for c in tally.take()] == [("QUOTE_BAD", 1)]


class _RefusesPoison:
    """The real store, but the database refuses any batch holding a row about
    ``poison`` (as a CHECK constraint or a full disk would)."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.calls: list[int] = []

    async def append_history(self, rows: Sequence[HistoryRow]) -> int:
        self.calls.append(len(rows))
        if any("poison" in row.values for row in rows):
            raise RecordStoreError("test", "refused")
        return await self.store.append_history(rows)


async def test_a_batch_the_store_refuses_is_retried_row_by_row(tmp_path: Path) -> None:
    batch = [_event(n, "k", "poison" if n == 3 else f"s{n}") for n in range(6)]
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(tmp_path / "r.sqlite3") as store:
            refusing = _RefusesPoison(store)
            await ControlPlane._record(refusing, RejectionTally(), batch)  # type: ignore[arg-type]
            events = await store.recent_events()
    assert refusing.calls == [6, 1, 1, 1, 1, 1, 1]
    assert [e.subject for e in reversed(events)] == ["s0", "s1", "s2", "s4", "s5"]


async def test_one_thread_hop_per_batch_not_per_event(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await RecordStore.open(tmp_path / "r.sqlite3") as store:
            counting = _RefusesPoison(store)
            events = [_event(n, "k", f"s{n}") for n in range(HISTORY_BATCH + 1)]
            await ControlPlane._record(counting, RejectionTally(), events)  # type: ignore[arg-type]
            assert counting.calls == [HISTORY_BATCH + 1]
            assert len(await store.recent_events(limit=1000)) == HISTORY_BATCH + 1


# --- billing: render only the agents that run a replica ----------------------------------


class _Registry(dict[str, Any]):
    """App actor name → the deployment it answers (the registry's ``in`` and ``ref``)."""

    def ref(self, name: str) -> _Registry:
        return _Registry(answer=self[name])

    async def ask(self, message: object, timeout: float) -> Any:
        return self["answer"]


def _view(agent: str, status: str = "online") -> dict[str, Any]:
    return {"agent_id": agent, "vm_name": f"vm-{agent}", "datacenter": "gcp:a",
            "node_size": "tiny", "status": status}


async def test_sightings_render_only_replica_agents_and_agree_with_the_full_pass() -> None:
    registry = _Registry({
        "app/acct1.web": {"replicas": [
            {"agent_id": "ag1", "state": "running"},
            {"agent_id": "ag2", "state": "starting"},
            {"agent_id": "ag3", "state": "running"}]},  # its agent is offline
        "app/acct2.fed": {"federated": {"datacenter": "bm:c"}, "replicas_wanted": 1, "replicas": [
            {"agent_id": "dc-ag", "state": "running", "node_size": "tiny"}]}})
    index = {"dep-1": "acct1.web", "dep-2": "acct2.fed"}
    everyone = {a: _view(a, "offline" if a == "ag3" else "online")
                for a in ("ag1", "ag2", "ag3", *(f"idle{n}" for n in range(1000)))}
    rendered: list[str] = []

    async def all_views() -> list[dict[str, Any]]:
        rendered.extend(everyone)
        return list(everyone.values())

    def views_of(ids: Iterable[str]) -> list[dict[str, Any]]:
        wanted = sorted(ids)
        rendered.extend(wanted)
        return [everyone[a] for a in wanted if a in everyone]

    async def orders() -> list[dict[str, Any]]:
        return [{"registered_vm": "vm-ag1", "claimed_by": "acct-prov"}]

    owners = {"bm:c": "acct-dc"}
    full = await billing_mod.cp_sightings(registry, index, all_views, orders, owners)
    assert len(rendered) == len(everyone)
    rendered.clear()
    fast = await billing_mod.cp_sightings(registry, index, None, orders, owners,
                                          agent_ids=lambda: list(everyone),
                                          views_of=views_of)
    assert rendered == ["ag1", "ag3"]  # the running replicas' agents, nobody else
    assert fast == (full[0], full[1])
    assert [(s.replica_id, s.provider) for s in fast[0]] == [
        ("ag1", "provider:acct-prov"), ("dc-ag", "provider:acct-dc")]
    assert "idle7" in fast[1] and "dc-ag" in fast[1]  # present: every agent with a view


def test_history_drops_are_counted_logged_and_exported(
        caplog: pytest.LogCaptureFixture) -> None:
    """A full history queue loses events (emit never blocks): counted, logged at the
    first and every 1,000th, and exported as ee_event_history_dropped_total."""
    from prometheus_client import generate_latest

    from ee.cp.events import EventBus
    from ee.cp.metrics import CpMetrics

    bus = EventBus(history_queue=2)
    with caplog.at_level("WARNING", logger="ee.cp.events"):
        for n in range(1003):
            bus.emit("agent.registered", f"ag{n}")
    assert bus.dropped_history == 1001
    assert len([r for r in caplog.records if "history queue full" in r.getMessage()]) == 2
    metrics = CpMetrics()
    metrics.history_dropped.set(bus.dropped_history)
    assert "ee_event_history_dropped_total 1001.0" in generate_latest(metrics.registry).decode()
