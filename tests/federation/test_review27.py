"""Review 27 (an attacker's look at the join proof, the per-asker share, the gate
rollback era and the per-source refusal budget).

* A dc's ``update.finished_at`` enters the master's history only as a real UTC instant,
  inside the era it closes: a lying dc cannot make an era end before it began, in the
  future, or on the 45th of the 13th month (the regex alone let those through).
* What a stranger sends as its datacenter label (a public join) goes to the log and to
  the ``federation.refused`` event as one printable line, never a forged log line.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ee.federation.master import (
    FederationSettings,
    MasterFederation,
    gate_rollback_eras,
)
from ee.federation.placement import iso
from ee.runtime import Registry

A = "sim:dc-a"
ROLLED_BACK = {"state": "rolled_back", "reason": "update", "from_version": "1",
               "to_version": "2", "started_at": "2026-12-01T10:00:00Z",
               "finished_at": "2026-12-01T10:05:00Z", "error": "health gate"}
ERAS = [{"version": "1", "from": "2026-12-01T09:00:00Z", "to": "2026-12-01T10:00:00Z"},
        {"version": "2", "from": "2026-12-01T10:00:00Z", "to": None}]


def _rolled(at: str) -> list[dict[str, Any]]:
    return gate_rollback_eras(ERAS, "1", {**ROLLED_BACK, "finished_at": at})


def test_a_dcs_finished_at_must_be_a_real_date() -> None:
    for impossible in ("2026-13-45T25:61:61Z", "2026-02-30T10:05:00Z", "0000-01-01T00:00:00Z"):
        assert _rolled(impossible) == ERAS, impossible
    assert _rolled("2026-12-01T10:05:00Z")[-1] == {
        "version": "1", "from": "2026-12-01T10:05:00Z", "to": None}


def test_a_dcs_finished_at_cannot_reorder_the_history() -> None:
    # Before the era it closes began: the era ends where it began, never earlier.
    early = _rolled("1999-01-01T00:00:00Z")
    assert early[1]["to"] == early[1]["from"] == "2026-12-01T10:00:00Z"
    assert early[2]["from"] == "2026-12-01T10:00:00Z"
    # In the future (past now): now, never a date that has not come yet.
    late = _rolled("9999-12-31T23:59:59Z")
    assert late[1]["to"] == late[2]["from"] <= iso(time.time())
    for eras in (early, late):
        bounds = [(e["from"], e["to"]) for e in eras]
        assert all(f <= t for f, t in bounds if t is not None), bounds
        assert all(a[1] is not None and a[1] <= b[0]
                   for a, b in itertools.pairwise(bounds)), bounds


async def test_a_strangers_label_is_one_printable_line(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    events: list[tuple[str, str, dict[str, Any]]] = []
    fed = MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda kind, subject, data: events.append((kind, subject, data)),
                           metrics=CollectorRegistry())
    forged = "dc-x\n2026-12-01 10:00:00 CRITICAL ee.cp: admin token rotated\x1b[2J"
    fed.refuse_stranger(forged[:80], "join_token_invalid", f"about {forged}")
    fed.refuse(forged[:80], "bad_frame", f"frame {forged}")
    assert len(events) == 2
    for _kind, subject, data in events:
        assert subject.isprintable() and "\n" not in subject, subject
        assert data["detail"].isprintable(), data["detail"]
