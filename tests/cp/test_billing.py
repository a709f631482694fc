"""Billing: prices and rounding, metering decisions, the ledger's invariants under random
deploy/stop/crash/restart/credit sequences (hypothesis, on SQLite and PostgreSQL),
suspension after the grace period (autojump clock)."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import hypothesis.strategies as st
import pytest
import trio

from ee.cp import billing as billing_mod
from ee.cp.billing import (
    Billing,
    BillingDeps,
    BillingSettings,
    PriceBook,
    Prices,
    Sighting,
    hold_step,
    plan_charges,
    plan_observation,
)
from ee.cp.nodes import DEFAULT_NODE_SIZES, NodeSize
from ee.cp.records import RecordStore
from ee.cp.store import ledger
from ee.cp.store.ledger import Entry, Posting, Run
from pgkit import pg_server, pg_url  # noqa: F401  (fixtures)

SIZES = {s.name: s for s in DEFAULT_NODE_SIZES}
BOOK = PriceBook(1, Prices())
T0 = 29_000_000  # a unix minute (2025)


# --- prices (pure) --------------------------------------------------------------------

def test_default_prices_are_the_documented_hourly_rates() -> None:
    # tiny: 1 vCPU x $0.04 + 2 GiB x $0.005 = $0.05/h = 5 cents an hour.
    assert BOOK.minute_rate(SIZES["tiny"]) * 60 == 5
    # llm: 16 x 0.04 + 128 x 0.005 + 0.50 = $1.78/h.
    assert BOOK.minute_rate(SIZES["llm"]) * 60 == 178
    doubled = PriceBook(2, Prices(sla_multiplier_milli=2000))
    assert doubled.minute_rate(SIZES["tiny"]) == 2 * BOOK.minute_rate(SIZES["tiny"])


@hypothesis.settings(deadline=None)  # a loaded CI machine is no reason to fail
@hypothesis.given(start=st.integers(0, 10**8), n=st.integers(0, 5000),
                  vcpus=st.integers(1, 64), mem=st.integers(1, 1 << 20), gpu=st.booleans(),
                  milli=st.integers(0, 5000))
def test_windows_telescope_to_the_exact_price(start: int, n: int, vcpus: int, mem: int,
                                              gpu: bool, milli: int) -> None:
    size = NodeSize("x", vcpus=vcpus, memory_mb=mem, gpu=gpu)
    book = PriceBook(1, Prices(sla_multiplier_milli=milli))
    amounts = [book.window_amount(size, w) for w in range(start, start + n)]
    assert all(isinstance(a, int) and a >= 0 for a in amounts)
    exact = book.minute_rate(size) * n
    assert exact - 1 < sum(amounts) <= exact + 1  # never off by a cent or more
    assert isinstance(book.minute_rate(size), Fraction)


@hypothesis.settings(deadline=None)
@hypothesis.given(start=st.integers(0, 10**8), n=st.integers(1, 3000),
                  bp=st.integers(0, 10_000), size=st.sampled_from(DEFAULT_NODE_SIZES))
def test_fee_split_is_whole_never_above_the_amount_and_exact_over_time(
        start: int, n: int, bp: int, size: NodeSize) -> None:
    book = PriceBook(1, Prices(platform_fee_bp=bp))
    splits = [book.window_split(size, w) for w in range(start, start + n)]
    assert all(isinstance(f, int) and 0 <= f <= a for a, f in splits)
    total, fees = sum(a for a, _ in splits), sum(f for _, f in splits)
    assert abs(fees - Fraction(bp, 10_000) * total) < 2  # the share, to the cent


@pytest.mark.parametrize("bad", [
    {"vcpu_hour_micro": -1}, {"vcpu_hour_micro": 0.5}, {"vcpu_hour_micro": True},
    {"platform_fee_bp": 10_001}, {"currency": "EUR"},
])
def test_prices_refuse_floats_negatives_and_unknown_currencies(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Prices(**bad)


# --- metering decisions (pure) --------------------------------------------------------

def run(dep: str = "d", rep: str = "a", started: int = 10, seen: int = 12,
        charged: int = 9, closed: bool = False) -> Run:
    return Run(dep, rep, started, "acct", "tiny", "platform:revenue", seen, charged, closed)


def sight(dep: str = "d", rep: str = "a") -> Sighting:
    return Sighting(dep, rep, "acct", "tiny", "platform:revenue")


def test_observation_opens_extends_closes_and_leaves_the_unknown_open() -> None:
    plan = plan_observation([], [sight()], set(), 20, 60)
    assert [(r.started_window, r.seen_window, r.charged_through) for r in plan.new] == [
        (20, 20, 19)]
    plan = plan_observation([run()], [sight()], {"a"}, 20, 60)
    assert plan.seen == ((run(), 20),) and not plan.new and not plan.closed
    # Its agent is here and does not show it running: stopped or lost.
    assert plan_observation([run()], [], {"a"}, 20, 60).closed == (run(),)
    # Its agent is not connected here (a CP restart): neither closed nor extended.
    plan = plan_observation([run()], [], set(), 20, 60)
    assert not plan.closed and not plan.seen and not plan.new
    # Too long unseen: closed at its last sighting; seen again: a new run.
    plan = plan_observation([run()], [sight()], {"a"}, 100, 60)
    assert plan.closed == (run(),) and [r.started_window for r in plan.new] == [100]


def test_charges_run_to_the_last_sighting_of_closed_runs_and_before_now_of_open_ones(
) -> None:
    charges, advances = plan_charges([run(seen=20)], 21, BOOK, SIZES, 10**6)
    assert [c.window for c in charges] == list(range(10, 21))
    charges, advances = plan_charges([run(seen=21)], 21, BOOK, SIZES, 10**6)
    assert [c.window for c in charges] == list(range(10, 21))  # 21 is not complete
    charges, _ = plan_charges([run(seen=21, closed=True)], 21, BOOK, SIZES, 10**6)
    assert charges[-1].window == 21
    charges, advances = plan_charges([run(seen=50), run("e", seen=50)], 51, BOOK, SIZES, 15)
    assert len(charges) == 15 and [(a.deployment_id, a.window) for a in advances] == [("d", 24)]


@pytest.mark.parametrize(("balance", "hold", "now", "expected"), [
    (100, None, 0, "none"),
    (-1, None, 0, "warn"),
    (-1, (0, None), 3599, "keep"),
    (-1, (0, None), 3600, "suspend"),
    (-1, (0, 3600), 9999, "enforce"),
    (0, (0, 3600), 9999, "clear"),
    (0, (0, None), 10, "clear"),
])
def test_hold_table(balance: int, hold: tuple[int, int | None] | None, now: int,
                    expected: str) -> None:
    assert hold_step(balance, 0, hold, now, 3600) == expected


# --- the service against a store -------------------------------------------------------

@attrs.define
class World:
    """What the agents' reports show: replicas truly running, agents connected here."""

    running: set[tuple[str, str]] = attrs.field(factory=set)
    present: set[str] = attrs.field(factory=set)
    stopped: list[str] = attrs.field(factory=list)
    events: list[tuple[str, str, dict[str, Any]]] = attrs.field(factory=list)

    async def sightings(self) -> tuple[list[Sighting], set[str]]:
        shown = [Sighting(d, a, d.split("-")[0], "llm", "provider:prov")
                 for d, a in sorted(self.running) if a in self.present]
        return shown, set(self.present)

    async def stop_account(self, account: str) -> list[str]:
        gone = sorted({d for d, _ in self.running if d.split("-")[0] == account})
        self.running = {(d, a) for d, a in self.running if d not in gone}
        self.stopped.extend(gone)
        return gone

    def emit(self, kind: str, subject: str, data: Any) -> None:
        self.events.append((kind, subject, dict(data)))


def service(world: World, store: RecordStore, wall: Callable[[], float],
            **settings: Any) -> Billing:
    return Billing(BillingSettings(**settings), BillingDeps(
        store=lambda: store, sightings=world.sightings, stop_account=world.stop_account,
        emit=world.emit, sizes=SIZES, cp_name="test", wall=wall))


async def test_suspension_after_grace_with_the_autojump_clock(
        autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    world = World(running={("acct1-d1", "ag1"), ("acct2-d2", "ag2")}, present={"ag1", "ag2"})

    def wall() -> float:
        return T0 * 60 + trio.current_time()

    async with await RecordStore.open(tmp_path / "durable.sqlite3") as store:
        billing = service(world, store, wall, interval_s=30, grace_s=600)
        await store._call(lambda c: ledger.post(c, Posting(
            "c1", "credit", "admin", (Entry("tenant:acct2", "USD", 10_000),
                                      Entry(ledger.PLATFORM_PROMOTIONS, "USD", -10_000))),
            "x"))

        async def advance(seconds: int) -> None:
            """Trio time passes (autojump); the meter ticks every 30 s meanwhile (the
            tick is awaited here, so the clock never jumps over a tick in a thread)."""
            for _ in range(seconds // 30):
                await trio.sleep(30)
                await billing.tick()

        # Charges start once a window is complete; acct1 has no funds.
        await advance(120)
        kinds = [(k, s) for k, s, _ in world.events]
        assert ("billing.low_balance", "acct1") in kinds
        assert not world.stopped  # grace
        await advance(480)
        assert not world.stopped  # still inside the grace period
        await advance(120)
        assert world.stopped == ["acct1-d1"]  # acct2 has funds: untouched
        assert ("billing.suspended", "acct1-d1") in [(k, s) for k, s, _ in world.events]
        assert ("acct2-d2", "ag2") in world.running
        # A credit clears the hold (and restarts nothing).
        await store._call(lambda c: ledger.post(c, Posting(
            "c2", "credit", "admin", (Entry("tenant:acct1", "USD", 500),
                                      Entry(ledger.PLATFORM_PROMOTIONS, "USD", -500))),
            "x"))
        await advance(60)
        assert ("billing.resumed", "acct1") in [(k, s) for k, s, _ in world.events]
        assert ("acct1-d1", "ag1") not in world.running
        # The loop itself ticks on its interval.
        ticks: list[float] = []
        real_tick = billing.tick

        async def counted() -> Any:
            ticks.append(trio.current_time())
            return await real_tick()

        billing.tick = counted  # type: ignore[method-assign]
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(billing.run)
            await trio.sleep(95)
            nursery.cancel_scope.cancel()
        # It ticks, never before a whole interval has passed (the autojump clock also moves
        # while a tick waits on its database thread, so 95 s give one to three ticks).
        assert ticks and ticks[0] - start >= 30
        assert all(b - a >= 30 for a, b in itertools.pairwise(ticks))
        assert billing.last_pass is not None
        assert await store._call(ledger.verify) == []
        assert await store._call(lambda c: ledger.balance(c, "provider:prov")) > 0


# --- invariants under random histories (hypothesis) -----------------------------------

KEYS = [("acct1-d1", "ag1"), ("acct1-d2", "ag2"), ("acct2-d3", "ag3"), ("acct2-d3", "ag1")]
AGENTS = ["ag1", "ag2", "ag3"]

ops = st.lists(st.one_of(
    st.tuples(st.just("start"), st.sampled_from(KEYS)),
    st.tuples(st.just("stop"), st.sampled_from(KEYS)),
    st.tuples(st.just("hide"), st.sampled_from(AGENTS)),
    st.tuples(st.just("show"), st.sampled_from(AGENTS)),
    st.tuples(st.just("crash"), st.just(None)),
    st.tuples(st.just("restart"), st.just(None)),
    st.tuples(st.just("credit"), st.tuples(st.sampled_from(["acct1", "acct2"]),
                                           st.integers(1, 10_000), st.integers(0, 3))),
    st.tuples(st.just("wait"), st.integers(1, 9)),
), min_size=1, max_size=25)


class Crash(Exception):
    pass


async def replay(target: str, history: list[tuple[str, Any]],
                 monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(present=set(AGENTS))
    minute = [T0]
    truth: dict[tuple[str, str], set[int]] = {k: set() for k in KEYS}  # ran in window
    sighted: dict[tuple[str, str], set[int]] = {k: set() for k in KEYS}
    crash_next = [False]
    real_move = ledger._move_balances

    def move(conn: Any, deltas: Any) -> None:
        if crash_next[0]:
            crash_next[0] = False
            raise Crash("killed mid-charge")
        real_move(conn, deltas)

    monkeypatch.setattr(ledger, "_move_balances", move)
    credits: dict[str, int] = {}
    store = await RecordStore.open(target)
    try:
        billing = service(world, store, lambda: minute[0] * 60 + 30, max_gap_windows=5,
                          grace_s=10**9)
        for op, arg in history:
            if op == "start" and arg[1] in world.present:
                world.running.add(arg)
            elif op == "stop" and arg[1] in world.present:
                world.running.discard(arg)
            elif op == "hide":
                world.present.discard(arg)
            elif op == "show":
                world.present.add(arg)
            elif op == "crash":
                crash_next[0] = True
            elif op == "restart":
                await store.close()
                store = await RecordStore.open(target)
                billing = service(world, store, lambda: minute[0] * 60 + 30,
                                  max_gap_windows=5, grace_s=10**9)
            elif op == "credit":
                account, amount, key = arg
                posting = Posting(f"k{account}{key}", "credit", "admin", (
                    Entry(f"tenant:{account}", "USD", amount),
                    Entry(ledger.PLATFORM_PROMOTIONS, "USD", -amount)))
                try:
                    await store._call(lambda c, p=posting: ledger.post(c, p, "t"))
                    credits.setdefault(posting.key, amount)
                except ledger.IdempotencyConflict:
                    assert credits[posting.key] != amount
            elif op == "wait":  # nothing changes meanwhile: what runs, ran throughout
                for key in world.running:
                    truth[key].update(range(minute[0], minute[0] + arg))
                minute[0] += arg
            for key in world.running:
                truth[key].add(minute[0])
                if key[1] in world.present:
                    sighted[key].add(minute[0])
            try:
                await billing.tick()
            except Crash:
                continue  # rolled back; the next tick (or restart) recovers
            await check(store, truth, sighted, minute[0], credits)
        minute[0] += 1
        crash_next[0] = False
        await billing.tick()
        await check(store, truth, sighted, minute[0], credits)
    finally:
        await store.close()


async def check(store: RecordStore, truth: dict[tuple[str, str], set[int]],
                sighted: dict[tuple[str, str], set[int]], now: int,
                credits: dict[str, int]) -> None:
    problems = await store._call(ledger.verify)
    assert problems == [], problems
    rows = await store._call(lambda c: c.execute(
        "SELECT deployment_id, replica_id, window_start FROM usage_windows").fetchall())
    charged: dict[tuple[str, str], set[int]] = {k: set() for k in truth}
    for dep, rep, window in rows:
        charged[(dep, rep)].add(int(window))
    for key in truth:
        # Never a window that did not run; never skip a window the reports showed
        # running (the current one is charged once complete).
        assert charged[key] <= truth[key], (key, charged[key] - truth[key])
        assert {w for w in sighted[key] if w < now} <= charged[key], key
    total = await store._call(lambda c: sum(
        b for _, _, b in ledger.balances(c, "tenant:")))
    spent = await store._call(lambda c: c.execute(
        "SELECT COALESCE(sum(amount_minor), 0) FROM usage_windows").fetchone()[0])
    assert total == sum(credits.values()) - int(spent)


SETTINGS = hypothesis.settings(max_examples=60, deadline=None, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))


@SETTINGS
@hypothesis.given(history=ops)
def test_ledger_invariants_hold_over_random_histories_sqlite(
        history: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        hypothesis.note(repr(history))
        trio.run(replay, str(Path(tmp) / "durable.sqlite3"), history, mp)


@hypothesis.settings(SETTINGS, max_examples=15)
@hypothesis.given(history=ops)
def test_ledger_invariants_hold_over_random_histories_postgresql(
        pg_server: Any, history: list[tuple[str, Any]]) -> None:  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        trio.run(replay, pg_server.new_database(), history, mp)


def test_module_exports() -> None:
    assert set(billing_mod.__all__) <= set(dir(billing_mod))


# --- what the CP's actors say runs ------------------------------------------------------

class _Ref:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def ask(self, message: Any, timeout: float) -> Any:
        return self.answer(message) if callable(self.answer) else self.answer


class _Registry:
    def __init__(self, refs: dict[str, Any]) -> None:
        self.refs = refs

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def ref(self, name: str) -> _Ref:
        return _Ref(self.refs[name])


async def test_sightings_trust_the_app_actor_and_pay_the_capacity_owner() -> None:
    deployment = {"replicas": [
        {"agent_id": "ag1", "state": "running"},  # its provisioner's order made vm-1
        {"agent_id": "ag2", "state": "running"},  # datacenter owner configured
        {"agent_id": "ag3", "state": "running"},  # nobody: the platform's own capacity
        {"agent_id": "ag4", "state": "starting"},  # not running: not metered
        {"agent_id": "ag5", "state": "running"},  # its agent is offline: lost
    ]}
    registry = _Registry({"app/acct1.web": deployment})

    def view(agent: str, vm: str, dc: str, status: str = "online") -> dict[str, Any]:
        return {"agent_id": agent, "vm_name": vm, "datacenter": dc, "node_size": "tiny",
                "status": status}

    async def agents() -> list[dict[str, Any]]:
        return [view("ag1", "vm-1", "gcp:a"), view("ag2", "vm-2", "bm:chicago"),
                view("ag3", "vm-3", "gcp:a"), view("ag4", "vm-4", "gcp:a"),
                view("ag5", "vm-5", "gcp:a", "offline"),
                view("ag9", "vm-9", "gcp:a")]  # lists the deployment, not a member

    async def orders() -> list[dict[str, Any]]:
        return [{"registered_vm": "vm-1", "claimed_by": "acct-prov"},
                {"vm_name": "vm-3", "claimed_by": None}]

    sightings, present = await billing_mod.cp_sightings(
        registry, {"dep-1": "acct1.web", "dep-gone": "acct1.gone"}, agents, orders,
        {"bm:chicago": "acct-dc"})
    assert [(s.replica_id, s.account_id, s.provider) for s in sightings] == [
        ("ag1", "acct1", "provider:acct-prov"), ("ag2", "acct1", "provider:acct-dc"),
        ("ag3", "acct1", ledger.PLATFORM_REVENUE)]
    assert present == {"ag1", "ag2", "ag3", "ag4", "ag5", "ag9"}


def _sighted_view(agent: str, vm: str, dc: str) -> dict[str, Any]:
    return {"agent_id": agent, "vm_name": vm, "datacenter": dc, "node_size": "tiny",
            "status": "online"}


async def _providers(orders: list[dict[str, Any]]) -> dict[str, str]:
    registry = _Registry({"app/acct1.web": {"replicas": [
        {"agent_id": "ag1", "state": "running"}, {"agent_id": "ag2", "state": "running"}]}})

    async def agents() -> list[dict[str, Any]]:
        return [_sighted_view("ag1", "vm-1", "gcp:a"), _sighted_view("ag2", "vm-2", "bm:c")]

    async def order_list() -> list[dict[str, Any]]:
        return orders

    sightings, _ = await billing_mod.cp_sightings(registry, {"dep-1": "acct1.web"}, agents,
                                                  order_list, {"bm:c": "acct-dc"})
    return {s.replica_id: s.provider for s in sightings}


async def test_a_provisioner_naming_another_agents_vm_at_fulfil_earns_nothing() -> None:
    # The thief fulfilled its own order reporting vm-2 (the datacenter owner's VM) and
    # vm-1 (another provisioner's): vm_name is the provisioner's word, not evidence.
    providers = await _providers([
        {"registered_vm": "vm-1", "vm_name": "vm-1", "claimed_by": "acct-prov"},
        {"vm_name": "vm-2", "claimed_by": "acct-thief"},
        {"vm_name": "vm-1", "claimed_by": "acct-thief"}])
    assert providers == {"ag1": "provider:acct-prov", "ag2": "provider:acct-dc"}
    assert "provider:acct-thief" not in providers.values()


async def test_a_vm_two_orders_name_pays_the_datacenter_owner_or_the_platform() -> None:
    # A later order naming the same registered VM does not take over the earlier one's
    # earnings (nor keep them): neither order is believed.
    providers = await _providers([
        {"registered_vm": "vm-1", "claimed_by": "acct-prov"},
        {"registered_vm": "vm-1", "claimed_by": "acct-late"},
        {"registered_vm": "vm-2", "claimed_by": "acct-prov"},
        {"registered_vm": "vm-2", "claimed_by": None}])
    assert providers == {"ag1": ledger.PLATFORM_REVENUE, "ag2": "provider:acct-dc"}
    assert billing_mod.order_owners([{"registered_vm": "vm-9", "claimed_by": "p"},
                                     {"vm_name": "vm-9", "claimed_by": "q"}]) == {"vm-9": "p"}


@pytest.mark.parametrize("content", [b"", b"   \n", b"short-secret\n", b"x" * 31 + b"\n"])
def test_a_short_webhook_secret_is_refused_at_config(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "webhook.secret"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"must hold 32\.\.4096 bytes"):
        BillingSettings.from_config({"webhook_secret_file": str(path)})
    path.write_bytes(b" " + b"k" * 32 + b"\n")
    settings = BillingSettings.from_config({"webhook_secret_file": str(path)})
    assert billing_mod.read_webhook_secret(str(settings.webhook_secret_file)) == b"k" * 32
    with pytest.raises(ValueError, match="cannot be read"):
        BillingSettings.from_config({"webhook_secret_file": str(tmp_path / "absent")})


@pytest.mark.parametrize("tolerance", [0, -1, 3601, True, "300", 1.5, None])
def test_webhook_tolerance_must_be_an_integer_1_to_3600(tolerance: object) -> None:
    with pytest.raises(ValueError, match="webhook_tolerance_s"):
        BillingSettings.from_config({"webhook_tolerance_s": tolerance})
    assert BillingSettings.from_config({"webhook_tolerance_s": 3600}).webhook_tolerance_s \
        == 3600
