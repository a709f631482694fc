"""The launch order lifecycle table and its moves (pure)."""

from __future__ import annotations

import pytest

from ee.capacity import (
    FINAL,
    TRANSITIONS,
    IllegalOrderTransition,
    LaunchOrder,
    OrderState,
    by_state,
    check_transition,
    count_in_flight,
)
from ee.capacity.orders import ORDER_CONFLICT, ORDER_NOT_YOURS, ORDER_UNKNOWN, OrderRefusal

S = OrderState


def order(state: OrderState = S.OPEN, order_id: str = "lo-1") -> LaunchOrder:
    return LaunchOrder(order_id=order_id, datacenter="gcp:us-central1",
                       node_size="standard", state=state, created_at=0.0, updated_at=0.0)


def test_table_allows_exactly_its_transitions() -> None:
    for a in S:
        for b in S:
            if (a, b) in TRANSITIONS:
                assert check_transition("lo-1", a, b) is b
            else:
                with pytest.raises(IllegalOrderTransition) as info:
                    check_transition("lo-1", a, b)
                assert info.value.current is a and info.value.target is b
    # Final states are final; nothing skips the claim.
    assert not any(a in FINAL for a, _ in TRANSITIONS)
    for bad in [(S.OPEN, S.FULFILLED), (S.OPEN, S.PROVISIONING), (S.OPEN, S.FAILED),
                (S.PROVISIONING, S.OPEN), (S.CLAIMED, S.CANCELLED),
                (S.PROVISIONING, S.CANCELLED)]:
        assert bad not in TRANSITIONS


def test_claim_then_fulfil_passes_through_provisioning() -> None:
    o = order().claim(10.0, ttl=60.0, token_sha256="h", by="acct-1")
    assert (o.state, o.claims, o.claimed_by, o.claimed_at, o.deadline) == (
        S.CLAIMED, 1, "acct-1", 10.0, 70.0)
    done = o.fulfil(20.0, "vm-7")
    assert (done.state, done.vm_name, done.finished_at, done.deadline) == (
        S.FULFILLED, "vm-7", 20.0, None)
    with pytest.raises(IllegalOrderTransition):
        done.fulfil(21.0, "vm-8")
    with pytest.raises(IllegalOrderTransition):
        done.fail(21.0, "late")


def test_claim_expiry_returns_to_open_and_forgets_the_claim() -> None:
    o = order().claim(10.0, ttl=60.0, token_sha256="h", by="acct-1")
    reopened = o.expire_claim(70.0)
    assert reopened.state is S.OPEN
    assert (reopened.claimed_by, reopened.claimed_at, reopened.deadline,
            reopened.token_sha256) == (None, None, None, None)
    again = reopened.claim(80.0, ttl=60.0, token_sha256="h2", by="acct-2")
    assert again.claims == 2 and again.token_sha256 == "h2"
    # An open order cannot be fulfilled: the provisioner whose claim expired is told so.
    with pytest.raises(IllegalOrderTransition):
        reopened.fulfil(75.0, "vm-late")


def test_provisioning_fail_and_cancel() -> None:
    o = order().claim(0.0, ttl=60.0, token_sha256="h", by=None)
    p = o.provisioning(5.0, ttl=600.0, vm_name="vm-1")
    assert (p.state, p.deadline, p.vm_name) == (S.PROVISIONING, 605.0, "vm-1")
    f = p.fail(9.0, "quota exceeded")
    assert (f.state, f.error, f.finished_at) == (S.FAILED, "quota exceeded", 9.0)
    assert o.fail(1.0, "").error == "failed"  # claimed -> failed directly, never empty
    c = order().cancel(3.0, "target dropped")
    assert (c.state, c.error) == (S.CANCELLED, "target dropped")
    with pytest.raises(IllegalOrderTransition):
        p.cancel(3.0, "no")


def test_in_flight_counts_live_orders_and_fulfilled_within_grace() -> None:
    live = [order(), order(S.CLAIMED), order(S.PROVISIONING)]
    assert all(o.in_flight(100.0, 30.0) for o in live)
    fulfilled = order().claim(0, ttl=9, token_sha256="h", by=None).fulfil(50.0, "vm")
    assert fulfilled.in_flight(79.9, 30.0)
    assert not fulfilled.in_flight(80.0, 30.0)
    assert not fulfilled.registered(60.0, "vm").in_flight(61.0, 30.0)
    assert not order().cancel(1, "x").in_flight(1.0, 30.0)
    assert count_in_flight([*live, fulfilled], 79.0, 30.0) == 4
    assert by_state([*live, fulfilled])["fulfilled"] == 1
    assert set(by_state([])) == {s.value for s in S}


def test_json_round_trip_and_view_hides_the_token_hash() -> None:
    o = order().claim(1.0, ttl=5, token_sha256="abc", by="p").provisioning(2.0, ttl=9)
    assert LaunchOrder.from_json(o.to_json()) == o
    view = o.view(iso=lambda t: f"T{t}")
    assert "token_sha256" not in view
    assert view["state"] == "provisioning" and view["claimed_at"] == "T1.0"


def test_order_validation_and_refusal_codes() -> None:
    with pytest.raises(ValueError):
        order(order_id="bad id/with slash")
    with pytest.raises(ValueError):
        order().claim(0, ttl=1, token_sha256="h", by=None).fulfil(1, "x" * 2000)
    assert OrderRefusal(ORDER_UNKNOWN, "m").http_status == 404
    assert OrderRefusal(ORDER_CONFLICT, "m").http_status == 409
    assert OrderRefusal(ORDER_NOT_YOURS, "m").http_status == 403
