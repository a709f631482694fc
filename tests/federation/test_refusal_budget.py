"""Refusal events are budgeted per source: an enrolled dc flooding bad frames gets a
burst of ``federation.refused`` events, then a few a minute with a ``suppressed`` count,
and neither strangers' refusals nor another dc's are crowded out by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ee.federation.master import (
    STRANGER_EVENT_BURST,
    STRANGER_EVENTS_PER_S,
    FederationSettings,
    MasterFederation,
)
from ee.runtime import Registry

Emitted = list[tuple[str, str, dict[str, Any]]]


def recording_master(tmp: Path) -> tuple[MasterFederation, Emitted]:
    """A master's federation (no processes) and the events it emits."""
    events: Emitted = []
    fed = MasterFederation(tmp, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda kind, subject, data: events.append((kind, subject, data)),
                           metrics=CollectorRegistry())
    return fed, events


async def test_one_dcs_flood_suppresses_only_its_own_refusals(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    fed, events = recording_master(tmp_path)
    for i in range(1000):
        fed.refuse("sim:dc-a", "bad_frame", f"frame {i}")
    flood = [e for e in events if e[1] == "sim:dc-a"]
    assert len(flood) == int(STRANGER_EVENT_BURST)
    fed.refuse("sim:dc-b", "sequence_gap", "its first")
    fed.refuse_stranger(None, "join_token_invalid", "a stranger")
    assert [e[1] for e in events[-2:]] == ["sim:dc-b", "?"]  # each its own budget
    await trio.sleep(1 / STRANGER_EVENTS_PER_S)
    fed.refuse("sim:dc-a", "bad_frame", "after a while")
    assert events[-1][1] == "sim:dc-a"
    assert events[-1][2]["suppressed"] == 1000 - int(STRANGER_EVENT_BURST)
