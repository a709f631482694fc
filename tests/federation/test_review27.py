"""Review 27 (an attacker's look at the join proof, the per-asker share, the gate
rollback era and the per-source refusal budget).

* A dc's ``update.finished_at`` enters the master's history only as a real UTC instant,
  inside the era it closes: a lying dc cannot make an era end before it began, in the
  future, or on the 45th of the 13th month (the regex alone let those through).
* What a stranger sends as its datacenter label (a public join) goes to the log and to
  the ``federation.refused`` event as one printable line, never a forged log line.
* Tenants together cannot take every slot to a dc: the admin keeps its share.
* A stranger's join finds the token by its public id: no hash per live token.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ee.federation import pki
from ee.federation.master import (
    FederationSettings,
    JoinRefused,
    JoinRequest,
    MasterFederation,
    gate_rollback_eras,
)
from ee.federation.placement import iso
from ee.federation.rpc import ADMIN_ASKER, DATACENTER_BUSY, MasterRpc, Outstanding, RpcError
from ee.protocol.signing import generate_signing_key, public_key_bytes
from ee.runtime import Registry

from .test_refusal_budget import recording_master

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
    fed, events = recording_master(tmp_path)
    forged = "dc-x\n2026-12-01 10:00:00 CRITICAL ee.cp: admin token rotated\x1b[2J"
    fed.refuse_stranger(forged[:80], "join_token_invalid", f"about {forged}")
    fed.refuse(forged[:80], "bad_frame", f"frame {forged}")
    assert len(events) == 2
    for _kind, subject, data in events:
        assert subject.isprintable() and "\n" not in subject, subject
        assert data["detail"].isprintable(), data["detail"]


async def test_tenants_together_cannot_starve_the_admin(
        autojump_clock: trio.testing.MockClock) -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    rpc = MasterRpc(lambda f: json.dumps({"id": f.id}), lambda *a: None, timeout_s=10)
    rpc.link_up(A, send)
    per_dc, per_asker = rpc.table.per_dc, rpc.table.per_asker
    outcome: dict[str, list[str]] = {}

    async def ask(asker: str) -> None:
        try:
            await rpc.ask(A, "attestation", deployment_id="d", asker=asker)
            outcome.setdefault(asker, []).append("ok")
        except RpcError as exc:
            outcome.setdefault(asker, []).append(exc.code)

    async with trio.open_nursery() as nursery:
        for i in range(per_dc // per_asker):  # a few tenants, each within its share
            for _ in range(per_asker):
                nursery.start_soon(ask, f"acct-{i}")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, ADMIN_ASKER)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome.get(ADMIN_ASKER) != [DATACENTER_BUSY], "the admin was starved"
    # (every ask times out: the stand-in dc answers nothing)


def test_outstanding_keeps_the_admins_share() -> None:
    """The pure table: tenants together hold at most per_dc - per_asker of a dc's slots
    (when that leaves them more than one tenant's share); the admin keeps its own."""
    t = Outstanding(per_dc=16, per_asker=4)
    n = 0
    for i in range(8):
        for _ in range(4):
            n += 1
            t.start(A, str(n), f"acct-{i}")
    assert sum(1 for rid in t.open if t.askers[rid] != ADMIN_ASKER) == 12
    assert t.full(A, "acct-9") == DATACENTER_BUSY
    assert t.full(A, ADMIN_ASKER) is None
    for k in range(4):
        assert t.start(A, f"admin-{k}", ADMIN_ASKER)
    assert t.full(A, ADMIN_ASKER) == DATACENTER_BUSY  # per_dc, and its own share
    # A small table (no room for a reserve beside one tenant's share) is shared as before.
    small = Outstanding(per_dc=4, per_asker=2)
    assert small.start(A, "1", "acct-1") and small.start(A, "2", "acct-1")
    assert small.start(A, "3", "acct-2") and small.start(A, "4", "acct-2")


async def test_a_strangers_join_costs_no_hash_per_live_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        autojump_clock: trio.testing.MockClock) -> None:
    """Each public join hashed every live token's id (10,000 tokens: ~6 ms of the event
    loop per stranger's request); the token is found by its public id instead."""
    fed = MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda *_: None, metrics=CollectorRegistry())
    for _ in range(300):
        fed.issue_token(None, 600.0)
    token = fed.issue_token(A, 600.0)["token"]
    hashed: list[str] = []
    real = pki.join_token_id
    monkeypatch.setattr(pki, "join_token_id", lambda h: hashed.append(h) or real(h))
    tls, sign = pki.public_pem(pki.new_key()), public_key_bytes(generate_signing_key()).hex()
    stranger = {**pki.join_body(token, A, tls, sign), "token_id": "0" * 32}
    with pytest.raises(JoinRefused):
        await fed.join(JoinRequest(**stranger))
    assert len(hashed) <= 1, len(hashed)
    # The genuine dc still joins with its token, which is then gone.
    body = pki.join_body(token, A, tls, sign)
    hashed.clear()
    fed._ensure_actor = _nothing  # type: ignore[method-assign]  # no actor tree here
    assert (await fed.join(JoinRequest(**body)))["datacenter"] == A
    with pytest.raises(JoinRefused):
        await fed.join(JoinRequest(**body))
    assert len(fed.tokens) == 300


async def _nothing(label: str) -> None:
    return None
