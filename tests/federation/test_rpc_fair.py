"""Asks to a dc are shared between askers: one account holds at most ``per_asker`` of
the ``per_dc`` requests open to a dc, so a tenant polling attestation cannot keep
another tenant's logs (or the admin's asks) waiting."""

from __future__ import annotations

import json

import trio
import trio.testing

from ee.federation.rpc import (
    DATACENTER_BUSY,
    TOO_MANY_ASKS,
    MasterRpc,
    Outstanding,
    RpcError,
)

A = "sim:dc-a"


def test_outstanding_table_shares_a_dc_between_askers() -> None:
    t = Outstanding(per_dc=4, per_asker=2)
    assert t.start(A, "1", "acct-1") and t.start(A, "2", "acct-1")
    assert t.full(A, "acct-1") == TOO_MANY_ASKS
    assert not t.start(A, "3", "acct-1")
    assert t.full(A, "acct-2") is None and t.start(A, "3", "acct-2")
    assert t.full("sim:dc-b", "acct-1") is None  # per dc
    t.finish("1")
    assert t.full(A, "acct-1") is None  # room again for acct-1
    assert t.start(A, "4", "acct-1") and t.start(A, "5", "acct-2")
    assert t.full(A, "acct-3") == DATACENTER_BUSY  # the dc's own cap still holds
    assert Outstanding(per_dc=1, per_asker=4).per_asker == 1


async def test_one_account_cannot_take_every_slot(
        autojump_clock: trio.testing.MockClock) -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    rpc = MasterRpc(lambda f: json.dumps({"id": f.id}), lambda *a: None, timeout_s=10,
                    per_dc=4, per_asker=2)
    rpc.link_up(A, send)
    refused: list[tuple[str, int, str]] = []

    async def ask(asker: str) -> None:
        try:
            await rpc.ask(A, "attestation", deployment_id="d", asker=asker)
        except RpcError as exc:
            refused.append((asker, exc.status, exc.code))

    async with trio.open_nursery() as nursery:
        for _ in range(5):  # one tenant polling hard
            nursery.start_soon(ask, "acct-greedy")
        await trio.testing.wait_all_tasks_blocked()
        assert len(sent) == 2  # only its share went out
        assert refused == [("acct-greedy", 429, TOO_MANY_ASKS)] * 3
        nursery.start_soon(ask, "acct-other")  # another tenant still gets through
        nursery.start_soon(ask, "admin")
        await trio.testing.wait_all_tasks_blocked()
        assert len(sent) == 4
    # the four that went out timed out (nobody answered): 504 each, nothing else refused
    assert sorted(r for r in refused if r[2] != TOO_MANY_ASKS) == sorted(
        [("acct-greedy", 504, "datacenter_timeout")] * 2
        + [("acct-other", 504, "datacenter_timeout"), ("admin", 504, "datacenter_timeout")])
