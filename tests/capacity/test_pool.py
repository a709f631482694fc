"""Pool targets, counting, orders_to_open, reservations, reconcile and bootstrap tokens
(pure: no Trio, time passed in)."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ee.capacity import (
    TOKEN_EXPIRED,
    TOKEN_FOREIGN,
    TOKEN_UNKNOWN,
    TOKEN_USED,
    AgentView,
    LaunchOrder,
    OrderState,
    PoolCounts,
    PoolKey,
    PoolKeyError,
    PoolSettings,
    PoolState,
    PoolTarget,
    Reservation,
    TargetError,
    TokenBook,
    TokenEntry,
    choose_agent,
    classify,
    failure_backoff,
    issue_token,
    orders_to_cancel,
    orders_to_open,
    pool_of_token,
    reconcile,
    release_reservations,
    reserved_for,
    token_sha256,
)
from ee.cp.nodes import Vocabulary

DC, SIZE = "gcp:us-central1", "standard"
KEY = PoolKey(DC, SIZE)
S = OrderState
GRACE = 60.0


def target(min_warm: int = 3, **kw: Any) -> PoolTarget:
    return PoolTarget(min_warm=min_warm, dispatch=kw.pop("dispatch", True),
                      reason=kw.pop("reason", "test"), **kw)


def agent(agent_id: str, **kw: Any) -> AgentView:
    base: dict[str, Any] = {"vm_name": f"vm-{agent_id}", "datacenter": DC, "node_size": SIZE,
                            "status": "online", "draining": False, "verdict": "pass",
                            "health": "healthy", "deployments": ()}
    base.update(kw)
    return AgentView(agent_id=agent_id, **base)


def order(order_id: str, state: OrderState = S.OPEN, created_at: float = 0.0,
          **kw: Any) -> LaunchOrder:
    return LaunchOrder(order_id=order_id, datacenter=DC, node_size=SIZE, state=state,
                       created_at=created_at, updated_at=created_at, **kw)


def ids(prefix: str = "lo") -> Any:
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter)}"


# ---- target and key validation --------------------------------------------------------

def test_target_from_json_defaults_and_strictness() -> None:
    t = PoolTarget.from_json({"min_warm": 2, "dispatch": True, "reason": " warm for demo "})
    assert t == PoolTarget(min_warm=2, dispatch=True, reason="warm for demo",
                           max_total=None, require_attested=True)
    assert PoolTarget(**t.to_json()) == t
    full = PoolTarget.from_json({"min_warm": 0, "max_total": 5, "require_attested": False,
                                 "dispatch": False, "reason": "r"})
    assert (full.max_total, full.require_attested) == (5, False)


@pytest.mark.parametrize(("body", "field"), [
    ([], ""),
    ({"min_warm": 1, "dispatch": True, "reason": "r", "colour": "red"}, "colour"),
    ({"dispatch": True, "reason": "r"}, "min_warm"),
    ({"min_warm": 1, "reason": "r"}, "dispatch"),
    ({"min_warm": 1, "dispatch": True}, "reason"),
    ({"min_warm": True, "dispatch": True, "reason": "r"}, "min_warm"),
    ({"min_warm": -1, "dispatch": True, "reason": "r"}, "min_warm"),
    ({"min_warm": "3", "dispatch": True, "reason": "r"}, "min_warm"),
    ({"min_warm": 3, "max_total": 2, "dispatch": True, "reason": "r"}, "max_total"),
    ({"min_warm": 0, "max_total": 0, "dispatch": True, "reason": "r"}, "max_total"),
    ({"min_warm": 1, "dispatch": "yes", "reason": "r"}, "dispatch"),
    ({"min_warm": 1, "dispatch": True, "require_attested": 1, "reason": "r"},
     "require_attested"),
    ({"min_warm": 1, "dispatch": True, "reason": "  "}, "reason"),
    ({"min_warm": 1, "dispatch": True, "reason": "x" * 501}, "reason"),
])
def test_target_errors_name_the_field(body: object, field: str) -> None:
    with pytest.raises(TargetError) as info:
        PoolTarget.from_json(body)
    assert info.value.field == field
    assert field in str(info.value)


def test_pool_key_from_request_uses_the_vocabulary() -> None:
    vocab = Vocabulary()

    def key(datacenter: str, node_size: str) -> PoolKey:
        return PoolKey.from_request(datacenter, node_size, node_sizes=vocab.sizes,
                                    normalise_label=vocab.normalise_label)

    assert key("Google:us-central1", "standard") == KEY
    assert KEY.actor_name == "pool/gcp:us-central1/standard"
    with pytest.raises(PoolKeyError) as info:
        key("gcp:us-central1", "huge")
    assert (info.value.field, info.value.code) == ("node_size", "UNKNOWN_NODE_SIZE")
    with pytest.raises(PoolKeyError) as info:
        key("no-colon", "tiny")
    assert (info.value.field, info.value.code) == ("datacenter", "BAD_DATACENTER")


# ---- counting ----------------------------------------------------------------------------

def test_classify_puts_each_agent_in_one_bucket() -> None:
    agents = [
        agent("a1"), agent("a2"),                       # warm
        agent("a3"),                                    # reserved (below)
        agent("a4", deployments=("d1",)),               # deployed
        agent("a5", status="stale"), agent("a6", status="quarantined", verdict="fail"),
        agent("a7", draining=True), agent("a8", health="unhealthy"),
        agent("a9", verdict=None),                      # unavailable (not attested)
        agent("a10", status="offline"),                 # offline
    ]
    held = [Reservation("r1", "a3", "d9", 0.0, 100.0),
            Reservation("r2", "a1", None, 0.0, 5.0)]  # expired at t=10: a1 is warm
    c = classify(agents, target(), held, 10.0)
    assert c.to_json() == {"warm": 2, "reserved": 1, "deployed": 1, "unavailable": 5,
                           "offline": 1, "total": 9}
    assert c.shortfall(target(5)) == 3 and c.shortfall(target(1)) == 0
    assert c.shortfall(None) == 0
    # Not requiring attestation makes the unattested idle agent warm.
    relaxed = classify(agents, target(require_attested=False), held, 10.0)
    assert (relaxed.warm, relaxed.unavailable) == (3, 4)


def test_agent_view_from_an_agent_actor_view() -> None:
    from poolkit import agent_view

    view = AgentView.from_view(agent_view("x", deployments=("d",), verdict="warn"))
    assert view == agent("x", deployments=("d",), verdict="warn", vm_name="vm-x")
    assert AgentView.from_view({**agent_view("y"), "vm_name": None}) is None


# ---- orders_to_open ------------------------------------------------------------------------

def counts(warm: int, total: int | None = None, vm_names: frozenset[str] = frozenset()
           ) -> PoolCounts:
    return PoolCounts(warm=warm, total=warm if total is None else total, vm_names=vm_names)


def test_orders_to_open_is_the_shortfall_minus_orders_in_flight() -> None:
    t = target(5)
    assert orders_to_open(t, counts(1), [], 0.0, GRACE) == 4
    flying = [order("o1"), order("o2", S.CLAIMED), order("o3", S.PROVISIONING)]
    assert orders_to_open(t, counts(1), flying, 0.0, GRACE) == 1
    done = [order("o4", S.FULFILLED, finished_at=100.0, vm_name="vm-new")]
    assert orders_to_open(t, counts(1), flying + done, 150.0, GRACE) == 0  # within grace
    assert orders_to_open(t, counts(1), flying + done, 160.0, GRACE) == 1  # grace over
    # Its VM registered (seen among the agents): counted as an agent, not in flight.
    assert orders_to_open(t, counts(2, vm_names=frozenset({"vm-new"})), flying + done,
                          150.0, GRACE) == 0
    finished = [order("o5", S.FAILED, finished_at=1.0), order("o6", S.CANCELLED)]
    assert orders_to_open(t, counts(1), finished, 0.0, GRACE) == 4
    assert orders_to_open(target(5, dispatch=False), counts(1), [], 0.0, GRACE) == 0
    assert orders_to_open(None, counts(0), [], 0.0, GRACE) == 0
    assert orders_to_open(t, counts(7), [], 0.0, GRACE) == 0


def test_orders_to_open_respects_max_total() -> None:
    t = target(5, max_total=6)
    assert orders_to_open(t, counts(1, total=4), [], 0.0, GRACE) == 2
    assert orders_to_open(t, counts(1, total=4), [order("o1")], 0.0, GRACE) == 1
    assert orders_to_open(t, counts(0, total=6), [], 0.0, GRACE) == 0


@given(min_warm=st.integers(0, 40), warm=st.integers(0, 40), live=st.integers(0, 40),
       extra=st.integers(0, 40), cap=st.none() | st.integers(0, 80))
def test_orders_to_open_then_nothing_more(min_warm: int, warm: int, live: int, extra: int,
                                          cap: int | None) -> None:
    """Opening what it says makes it say 0; never more than the shortfall in flight."""
    max_total = None if cap is None else max(cap, min_warm, 1)
    t = target(min_warm, max_total=max_total)
    c = counts(warm, total=warm + extra)
    orders = [order(f"o{i}") for i in range(live)]
    n = orders_to_open(t, c, orders, 0.0, GRACE)
    shortfall = max(0, min_warm - warm)
    assert n == (max(0, shortfall - live) if max_total is None
                 else max(0, min(shortfall, max_total - c.total) - live))
    more = orders + [order(f"n{i}") for i in range(n)]
    assert orders_to_open(t, c, more, 0.0, GRACE) == 0
    assert live + n <= max(live, shortfall)  # never more in flight than the shortfall


def test_surplus_open_orders_are_cancelled_newest_first() -> None:
    orders = [order("o1", created_at=1), order("o2", created_at=2), order("o3", created_at=3),
              order("o4", S.CLAIMED)]
    assert orders_to_cancel(target(5), counts(1), orders, 0.0, GRACE) == []
    assert orders_to_cancel(target(3), counts(1), orders, 0.0, GRACE) == ["o3", "o2"]
    # Dispatch off: every open order goes; the claimed one is left to finish.
    assert orders_to_cancel(target(5, dispatch=False), counts(1), orders, 0.0, GRACE) == [
        "o3", "o2", "o1"]
    assert orders_to_cancel(None, counts(0), orders[3:], 0.0, GRACE) == []


def test_failure_backoff_grows_with_consecutive_failures() -> None:
    ok = order("a", S.FULFILLED, finished_at=5.0)
    f1 = order("b", S.FAILED, finished_at=10.0)
    f2 = order("c", S.FAILED, finished_at=20.0)
    assert failure_backoff([ok], 30.0, 600.0) is None
    assert failure_backoff([ok, f1], 30.0, 600.0) == 40.0
    assert failure_backoff([ok, f1, f2], 30.0, 600.0) == 80.0
    assert failure_backoff([f1, f2, order("d", S.FULFILLED, finished_at=25.0)],
                           30.0, 600.0) is None
    many = [order(f"f{i}", S.FAILED, finished_at=float(i)) for i in range(50)]
    assert failure_backoff(many, 30.0, 600.0) == 49.0 + 600.0


# ---- reservations ------------------------------------------------------------------------

def test_choose_agent_is_deterministic_and_skips_held_and_unfit() -> None:
    agents = [agent("c"), agent("b", draining=True), agent("a", deployments=("d",)),
              agent("d")]
    assert choose_agent(agents, target(), [], 0.0) == "c"
    held = [Reservation("r1", "c", None, 0.0, 10.0)]
    assert choose_agent(agents, target(), held, 0.0) == "d"
    assert choose_agent(agents, target(), held, 10.0) == "c"  # r1 expired
    assert choose_agent(agents[:3], target(), held, 0.0) is None
    assert reserved_for(held, 5.0) == {"c": "r1"} and reserved_for(held, 10.0) == {}


def test_reservations_are_released_with_a_reason() -> None:
    agents = [agent("a"), agent("b", status="stale"), agent("c", draining=True),
              agent("d", status="quarantined", verdict="fail"), agent("e", deployments=("x",)),
              agent("f")]
    rs = [Reservation(f"r-{a}", a, None, 0.0, 100.0) for a in "abcdefg"]
    rs[5] = attrs.evolve(rs[5], expires_at=10.0)
    kept, released = release_reservations(rs, agents, target(), 20.0)
    assert list(kept) == ["r-a"]
    assert {r.agent_id: why for r, why in released} == {
        "b": "stale", "c": "draining", "d": "quarantined", "e": "consumed",
        "f": "expired", "g": "gone"}


# ---- reconcile -------------------------------------------------------------------------------

def test_reconcile_opens_exactly_the_shortfall_and_is_idempotent() -> None:
    agents = [agent("a1"), agent("a2", deployments=("d",)),
              agent("x", datacenter="aws:us-east-1")]  # another pool's: ignored
    state = PoolState(KEY, target=target(4))
    step = reconcile(state, agents, 0.0, PoolSettings(), ids())
    assert step.counts.warm == 1
    assert [o.order_id for o in step.opened] == ["lo-1", "lo-2", "lo-3"]
    assert all(o.state is S.OPEN and o.datacenter == DC for o in step.opened)
    again = reconcile(step.state, agents, 1.0, PoolSettings(), ids("other"))
    assert again.opened == () and again.state == step.state
    # Two VMs arrive (registered): the pool now wants one more warm agent, not three.
    more = [*agents, agent("a3"), agent("a4")]
    third = reconcile(step.state, more, 2.0, PoolSettings(), ids("z"))
    assert [o.order_id for o in third.changed] == ["lo-3", "lo-2"]
    assert all(o.state is S.CANCELLED for o in third.changed)
    assert third.opened == ()


def test_reconcile_expires_claims_and_provisioning() -> None:
    settings = PoolSettings(claim_ttl_s=30.0, provision_ttl_s=100.0)
    issued = issue_token(DC, SIZE)
    claimed = order("o1").claim(0.0, ttl=30.0, token_sha256=issued.sha256, by="p")
    prov = order("o2").claim(0.0, ttl=30, token_sha256="h2", by="p").provisioning(
        5.0, ttl=100.0)
    book = TokenBook().add(issued.sha256, TokenEntry("o1", DC, SIZE, expires_at=1000.0))
    state = PoolState(KEY, target=target(2), orders={"o1": claimed, "o2": prov}, tokens=book)
    step = reconcile(state, [], 29.0, settings, ids())
    assert step.changed == () and step.opened == ()
    step = reconcile(state, [], 30.0, settings, ids())
    assert {o.order_id: o.state for o in step.changed} == {"o1": S.OPEN}
    refused = step.state.tokens.consume(issued.token, 31.0, datacenter=DC, node_size=SIZE,
                                        vm_name="vm")
    assert refused.refusal is not None and refused.refusal.code == TOKEN_EXPIRED
    step = reconcile(state, [], 105.0, settings, ids())
    assert step.state.orders["o2"].state is S.FAILED
    assert step.state.orders["o2"].error == "provisioning timed out"
    # o1 is open again, o2 failed: one opening would cover the shortfall of 2 with o1 —
    # but the failure backs off the new one.
    assert step.opened == ()


def test_reconcile_before_ready_only_applies_deadlines() -> None:
    state = PoolState(KEY, target=target(3),
                      reservations={"r": Reservation("r", "gone", None, 0.0, 100.0)})
    step = reconcile(state, [], 1.0, PoolSettings(), ids(), ready=False)
    assert step.opened == () and step.released == () and step.state == state
    step = reconcile(state, [], 1.0, PoolSettings(), ids(), ready=True)
    assert len(step.opened) == 3 and [why for _, why in step.released] == ["gone"]


def test_reconcile_forgets_old_finished_orders() -> None:
    finished = {f"f{i}": order(f"f{i}", S.FAILED, finished_at=float(i)) for i in range(10)}
    state = PoolState(KEY, target=target(0), orders=finished)
    step = reconcile(state, [], 10_000.0, PoolSettings(keep_finished=3), ids())
    assert sorted(step.state.orders) == ["f7", "f8", "f9"]


def test_pool_state_round_trips_through_its_manifest() -> None:
    issued = issue_token(DC, SIZE)
    o = order("o1").claim(1.0, ttl=5, token_sha256=issued.sha256, by="p")
    state = PoolState(KEY, target=target(2, max_total=4), orders={"o1": o},
                      tokens=TokenBook().add(issued.sha256, TokenEntry("o1", DC, SIZE, 9.0)),
                      reservations={"r": Reservation("r", "a", "d", 1.0, 2.0)})
    doc = state.to_doc()
    assert issued.token not in repr(doc)  # only the hash is kept
    assert PoolState.from_doc(KEY, doc) == state
    assert PoolState.from_doc(KEY, None) == PoolState(KEY)
    with pytest.raises(ValueError):
        PoolState.from_doc(PoolKey(DC, "tiny"), doc)
    with pytest.raises(ValueError):
        PoolState.from_doc(KEY, {**doc, "version": 99})


# ---- bootstrap tokens --------------------------------------------------------------------------

def book_with(token_dc: str = DC, token_size: str = SIZE, expires_at: float = 100.0
              ) -> tuple[str, TokenBook]:
    issued = issue_token(token_dc, token_size)
    assert issued.sha256 == token_sha256(issued.token)
    assert issued.token not in repr(issued)
    return issued.token, TokenBook().add(issued.sha256, TokenEntry(
        "o1", token_dc, token_size, expires_at=expires_at))


def test_token_routes_to_its_pool() -> None:
    token, _ = book_with()
    assert pool_of_token(token) == (DC, SIZE)
    for bad in ["", "eebt1..x", "nope.abc.def", "eebt1.!!!.x", "x" * 600,
                "eebt1.bm9zbGFzaA.secret"]:  # "noslash": no pool part
        assert pool_of_token(bad) is None


def test_token_is_single_use() -> None:
    token, book = book_with()
    first = book.consume(token, 1.0, datacenter=DC, node_size=SIZE, vm_name="vm-1",
                         agent_key="k1")
    assert (first.order_id, first.refusal, first.again) == ("o1", None, False)
    assert book.consume(token, 1.0, datacenter=DC, node_size=SIZE,
                        vm_name="vm-1").refusal is None  # the old book is unchanged
    used = first.book
    for vm, key in [("vm-2", "k2"), ("vm-2", "k1"), ("vm-1", "k2"), ("vm-1", None)]:
        second = used.consume(token, 2.0, datacenter=DC, node_size=SIZE, vm_name=vm,
                              agent_key=key)
        assert second.refusal is not None and second.refusal.code == TOKEN_USED, (vm, key)
        assert second.book is used
    # The VM that consumed it re-registering (same name, same key) is recognised.
    again = used.consume(token, 500.0, datacenter=DC, node_size=SIZE, vm_name="vm-1",
                         agent_key="k1")
    assert (again.order_id, again.refusal, again.again) == ("o1", None, True)


def test_token_expiry_revocation_and_forgetting() -> None:
    token, book = book_with(expires_at=100.0)
    late = book.consume(token, 100.0, datacenter=DC, node_size=SIZE, vm_name="vm")
    assert late.refusal is not None and late.refusal.code == TOKEN_EXPIRED
    revoked = book.revoke(token_sha256(token), 50.0)
    gone = revoked.consume(token, 51.0, datacenter=DC, node_size=SIZE, vm_name="vm")
    assert gone.refusal is not None and gone.refusal.code == TOKEN_EXPIRED
    assert book.prune(150.0, 100.0) is book
    forgotten = book.prune(200.0, 100.0).consume(token, 201.0, datacenter=DC,
                                                 node_size=SIZE, vm_name="vm")
    assert forgotten.refusal is not None and forgotten.refusal.code == TOKEN_UNKNOWN


def test_foreign_and_unknown_tokens_are_refused() -> None:
    token, book = book_with()
    other_size = book.consume(token, 1.0, datacenter=DC, node_size="tiny", vm_name="vm")
    assert other_size.refusal is not None and other_size.refusal.code == TOKEN_FOREIGN
    other_dc = book.consume(token, 1.0, datacenter="aws:x", node_size=SIZE, vm_name="vm")
    assert other_dc.refusal is not None and other_dc.refusal.code == TOKEN_FOREIGN
    named = book.name_vm(token_sha256(token), "vm-a")
    wrong_vm = named.consume(token, 1.0, datacenter=DC, node_size=SIZE, vm_name="vm-b")
    assert wrong_vm.refusal is not None and wrong_vm.refusal.code == TOKEN_FOREIGN
    assert named.consume(token, 1.0, datacenter=DC, node_size=SIZE,
                         vm_name="vm-a").order_id == "o1"
    # Tampering with the pool part changes the hash: unknown, not another pool's.
    head, pool, secret = token.split(".")
    tampered = f"{head}.{pool}x.{secret}"
    for bad in [tampered, issue_token(DC, SIZE).token, "garbage"]:
        out = book.consume(bad, 1.0, datacenter=DC, node_size=SIZE, vm_name="vm")
        assert out.refusal is not None and out.refusal.code == TOKEN_UNKNOWN
    assert TokenBook.from_json(book.to_json()) == book
