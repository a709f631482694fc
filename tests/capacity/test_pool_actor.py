"""CapacityPoolActor under a supervisor, with a stand-in agent directory and manifest
store (poolkit), on the autojump clock: claims, expiry, tokens, reservations,
restarts and chaos."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from poolkit import DC, KEY, SIZE, Events, FakeAgentDirectory, MemoryManifests, make_deps

from ee.actors.pool import (
    Claim,
    ClaimGrant,
    Describe,
    Fail,
    Fulfil,
    Holds,
    ListOrders,
    PoolDeps,
    PoolDirectory,
    Provisioning,
    Reconcile,
    ReleaseReservation,
    Reserve,
    SetTarget,
    TokenAccepted,
    present_token,
)
from ee.capacity import (
    TOKEN_EXPIRED,
    TOKEN_FOREIGN,
    TOKEN_UNKNOWN,
    TOKEN_USED,
    LaunchOrder,
    OrderState,
    PoolKey,
    PoolSettings,
    PoolTarget,
    Reservation,
    TokenRefusal,
)
from ee.capacity.orders import ORDER_CONFLICT, ORDER_NOT_YOURS, ORDER_UNKNOWN, OrderRefusal
from ee.runtime import ActorCrashed, ActorDead, AskTimeout, Registry
from ee.supervisors import Backoff, Supervisor

NAME = KEY.actor_name


def target(min_warm: int, **kw: Any) -> PoolTarget:
    return PoolTarget(min_warm=min_warm, dispatch=kw.pop("dispatch", True),
                      reason="test", **kw)


@asynccontextmanager
async def running(deps: PoolDeps, *, start: bool = True
                  ) -> AsyncIterator[tuple[Registry, Supervisor, PoolDirectory]]:
    """A ``capacity`` supervisor (the CP's, in miniature) with the pool started."""
    registry = Registry()
    sup = Supervisor("capacity", max_restarts=100_000, period=1.0,
                     backoff=Backoff(base=0.001, maximum=0.01, jitter=0.5),
                     rng=random.Random(7))
    directory = PoolDirectory(registry, sup, deps)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            if start:
                await directory.ensure(KEY)
            yield registry, sup, directory
            sup.request_stop()
    assert NAME not in registry  # nothing left behind


async def ask(registry: Registry, msg: object) -> Any:
    return await registry.ref(NAME).ask(msg, timeout=30)


def live_orders(view: dict[str, Any]) -> int:
    by = view["orders_by_state"]
    return int(by["open"] + by["claimed"] + by["provisioning"])


async def test_target_opens_exactly_the_shortfall(autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(), MemoryManifests(), Events()
    for a in ("a1", "a2"):
        agents.add(a)
    agents.add("a3", deployments=("d1",))
    agents.add("a4", node_size="tiny")  # another pool's agent
    async with running(make_deps(agents, store, events)) as (registry, _, directory):
        view = await ask(registry, SetTarget(target(5)))
        assert (view["warm"], view["deployed"], view["total"], view["shortfall"]) == (
            2, 1, 3, 3)
        assert view["pending_orders"] == view["orders_in_flight"] == 3
        assert len(events.kinds("order.opened")) == 3
        for _ in range(5):  # timer passes change nothing
            await trio.sleep(1.0)
        assert len(store.order_ids) == 3
        # A VM registers by itself: one order fewer wanted, the newest is cancelled.
        agents.add("a5")
        view = await ask(registry, Reconcile())
        assert (view["warm"], view["shortfall"], view["pending_orders"]) == (3, 2, 2)
        assert view["orders_by_state"]["cancelled"] == 1
        # Dispatch off: no open order is left waiting for a provisioner.
        view = await ask(registry, SetTarget(target(5, dispatch=False)))
        assert view["pending_orders"] == 0 and view["shortfall"] == 2
        assert [v["datacenter"] for v in await directory.describe_all()] == [DC]
        assert store.docs[("pools", KEY.ident)]["target"]["dispatch"] is False


async def test_concurrent_claims_never_share_an_order(autojump_clock: trio.abc.Clock
                                                      ) -> None:
    agents, store, events = FakeAgentDirectory(latency=0.001), MemoryManifests(), Events()
    async with running(make_deps(agents, store, events)) as (registry, _, _d):
        await ask(registry, SetTarget(target(10)))
        grants: list[ClaimGrant | None] = []

        async def claimer(i: int) -> None:
            await trio.sleep(random.Random(i).uniform(0, 0.01))
            grants.append(await ask(registry, Claim(claimed_by=f"prov-{i % 3}")))

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(claimer, i)
        got = [g for g in grants if g is not None]
        assert len(got) == 10 and grants.count(None) == 50
        assert len({g.order.order_id for g in got}) == 10
        assert len({g.bootstrap_token for g in got}) == 10
        assert all(g.order.state is OrderState.CLAIMED for g in got)
        view = await ask(registry, Describe())
        assert view["orders_by_state"]["claimed"] == 10 and view["orders_by_state"]["open"] == 0
        assert await ask(registry, Claim()) is None
        assert got[0].to_json()["bootstrap_token"] == got[0].bootstrap_token
        assert "token_sha256" not in got[0].to_json()["order"]


async def test_claim_expiry_reopens_the_order_and_revokes_its_token(
        autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(), MemoryManifests(), Events()
    settings = PoolSettings(reconcile_interval_s=5.0, claim_ttl_s=60.0)
    async with running(make_deps(agents, store, events, settings=settings)) as (
            registry, _, _d):
        await ask(registry, SetTarget(target(1)))
        grant = await ask(registry, Claim(claimed_by="prov"))
        assert grant is not None
        await trio.sleep(59.0)
        assert (await ask(registry, Describe()))["orders_by_state"]["claimed"] == 1
        await trio.sleep(6.0)  # past the claim TTL and one timer tick
        view = await ask(registry, Describe())
        assert view["orders_by_state"]["open"] == 1 and view["orders_by_state"]["claimed"] == 0
        assert view["orders_in_flight"] == 1  # the same order, not a new one
        assert len(store.order_ids) == 1
        assert events.kinds("order.claim_expired")[0]["order_id"] == grant.order.order_id
        # The vanished provisioner comes back too late.
        late = await ask(registry, Fulfil(grant.order.order_id, "vm-late", by="prov"))
        assert isinstance(late, OrderRefusal) and late.code == ORDER_CONFLICT
        refused = await present_token(registry, grant.bootstrap_token, vm_name="vm-late",
                                      datacenter=DC, node_size=SIZE)
        assert isinstance(refused, TokenRefusal) and refused.code == TOKEN_EXPIRED
        again = await ask(registry, Claim(claimed_by="prov-2"))
        assert again.order.order_id == grant.order.order_id and again.order.claims == 2
        assert again.bootstrap_token != grant.bootstrap_token


async def test_order_reports_and_the_bootstrap_token(autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(), MemoryManifests(), Events()
    latencies: list[float] = []
    deps = make_deps(agents, store, events, latencies=latencies)
    async with running(deps) as (registry, _, directory):
        await ask(registry, SetTarget(target(2)))
        g1 = await ask(registry, Claim(claimed_by="prov"))
        g2 = await ask(registry, Claim(claimed_by="prov"))
        o1, o2 = g1.order.order_id, g2.order.order_id
        assert await directory.find_order(o1) == registry.ref(NAME)
        assert await directory.find_order("lo-nope") is None
        unknown = await ask(registry, Fulfil("lo-nope", "vm"))
        assert isinstance(unknown, OrderRefusal) and unknown.code == ORDER_UNKNOWN
        theirs = await ask(registry, Fulfil(o1, "vm-1", by="someone-else"))
        assert isinstance(theirs, OrderRefusal) and theirs.code == ORDER_NOT_YOURS
        prov = await ask(registry, Provisioning(o1, by="prov", vm_name="vm-1"))
        assert isinstance(prov, LaunchOrder) and prov.state is OrderState.PROVISIONING
        await trio.sleep(42.0)
        done = await ask(registry, Fulfil(o1, "vm-1", by="prov"))
        assert isinstance(done, LaunchOrder) and done.state is OrderState.FULFILLED
        assert await ask(registry, Fulfil(o1, "vm-1", by="prov")) == done  # idempotent
        failed = await ask(registry, Fail(o2, "quota exceeded", by="prov"))
        assert isinstance(failed, LaunchOrder) and failed.state is OrderState.FAILED

        # Registration: wrong VM, wrong pool, then the right one, then a reuse.
        wrong_vm = await present_token(registry, g1.bootstrap_token, vm_name="vm-x",
                                       datacenter=DC, node_size=SIZE)
        assert isinstance(wrong_vm, TokenRefusal) and wrong_vm.code == TOKEN_FOREIGN
        wrong_pool = await present_token(registry, g1.bootstrap_token, vm_name="vm-1",
                                         datacenter=DC, node_size="tiny")
        assert isinstance(wrong_pool, TokenRefusal) and wrong_pool.code == TOKEN_FOREIGN
        ok = await present_token(registry, g1.bootstrap_token, vm_name="vm-1",
                                 datacenter=DC, node_size=SIZE, agent_key="k1")
        assert ok == TokenAccepted(o1)
        assert latencies == [42.0]
        reused = await present_token(registry, g1.bootstrap_token, vm_name="vm-2",
                                     datacenter=DC, node_size=SIZE, agent_key="k2")
        assert isinstance(reused, TokenRefusal) and reused.code == TOKEN_USED
        reconnect = await present_token(registry, g1.bootstrap_token, vm_name="vm-1",
                                        datacenter=DC, node_size=SIZE, agent_key="k1")
        assert reconnect == TokenAccepted(o1, again=True) and latencies == [42.0]
        failed_token = await present_token(registry, g2.bootstrap_token, vm_name="vm-9",
                                           datacenter=DC, node_size=SIZE)
        assert isinstance(failed_token, TokenRefusal) and failed_token.code == TOKEN_EXPIRED
        head, pool, secret = g1.bootstrap_token.split(".")
        for bad in ["junk", f"{head}.{pool}.{secret}x"]:
            out = await present_token(registry, bad, vm_name="v", datacenter=DC,
                                      node_size=SIZE)
            assert isinstance(out, TokenRefusal) and out.code == TOKEN_UNKNOWN
        # No pool actor for the token's pool: unknown.
        from ee.capacity import issue_token

        stray = issue_token("aws:us-east-1", "tiny").token
        out = await present_token(registry, stray, vm_name="v", datacenter="aws:us-east-1",
                                  node_size="tiny")
        assert isinstance(out, TokenRefusal) and out.code == TOKEN_UNKNOWN
        # The registered VM is no longer in flight; the failed order is replaced after
        # the failure backoff.
        agents.add("new", vm_name="vm-1")
        view = await ask(registry, Reconcile())
        assert view["warm"] == 1 and view["orders_in_flight"] == 0
        await trio.sleep(PoolSettings().failure_backoff_s + 1.0)
        view = await ask(registry, Describe())
        assert view["orders_by_state"]["open"] == 1
        orders = await ask(registry, ListOrders(include_finished=False))
        assert [o["state"] for o in orders] == ["open"]


async def test_concurrent_reservations_get_distinct_agents(
        autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(latency=0.002), MemoryManifests(), Events()
    for i in range(8):
        agents.add(f"a{i}")
    agents.add("busy", deployments=("d0",))
    settings = PoolSettings(reconcile_interval_s=1.0, reservation_ttl_s=30.0)
    async with running(make_deps(agents, store, events, settings=settings)) as (
            registry, _, directory):
        await ask(registry, SetTarget(target(0)))
        results: list[Reservation | None] = []

        async def reserver(i: int) -> None:
            await trio.sleep(random.Random(i).uniform(0, 0.02))
            results.append(await ask(registry, Reserve(deployment_id=f"dep-{i}")))

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(reserver, i)
        got = [r for r in results if r is not None]
        assert len(got) == 8 and results.count(None) == 22
        assert sorted(r.agent_id for r in got) == [f"a{i}" for i in range(8)]
        holds = await directory.holds()
        assert holds == {r.agent_id: r.reservation_id for r in got}
        view = await ask(registry, Describe())
        assert (view["warm"], view["reserved"]) == (0, 8)

        by_agent = {r.agent_id: r for r in got}
        agents.update("a0", draining=True)
        agents.update("a1", status="stale")
        agents.update("a2", status="quarantined", verdict="fail")
        agents.update("a3", deployments=(by_agent["a3"].deployment_id,))
        assert await ask(registry, ReleaseReservation(by_agent["a4"].reservation_id))
        assert not await ask(registry, ReleaseReservation("rsv-none"))
        await trio.sleep(1.5)  # a timer pass
        view = await ask(registry, Describe())
        assert (view["reserved"], view["warm"]) == (3, 1)  # a5..a7 held; a4 free again
        reasons = {d["agent_id"]: d["reason"] for d in events.kinds("reservation.released")}
        assert reasons == {"a0": "draining", "a1": "stale", "a2": "quarantined",
                           "a3": "consumed", "a4": "released"}
        await trio.sleep(31.0)  # TTL
        view = await ask(registry, Describe())
        assert (view["reserved"], view["warm"]) == (0, 4)
        assert await directory.holds() == {}


async def test_restart_rebuilds_the_same_numbers_without_new_orders(
        autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(), MemoryManifests(), Events()
    for i in range(4):
        agents.add(f"a{i}")
    agents.add("d", deployments=("x",))
    agents.add("s", status="stale")
    settings = PoolSettings(reconcile_interval_s=1.0, reservation_ttl_s=600.0)

    async def picture(registry: Registry) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return await ask(registry, Describe()), await ask(registry, ListOrders())

    async with running(make_deps(agents, store, events, settings=settings)) as (
            registry, sup, _d):
        await ask(registry, SetTarget(target(6, max_total=12)))
        r = await ask(registry, Reserve("dep-1"))
        grant = await ask(registry, Claim(claimed_by="p"))
        await ask(registry, Fulfil(grant.order.order_id, "vm-n", by="p"))
        before = await picture(registry)
        assert (before[0]["warm"], before[0]["reserved"], before[0]["shortfall"]) == (3, 1, 3)
        saved_orders = set(store.order_ids)
        assert len(saved_orders) == 3  # 2 short at first, 1 more once a1 was reserved
        for _ in range(3):
            assert sup.crash(NAME)
            await trio.sleep(0.5)
            assert await picture(registry) == before
        assert await ask(registry, Holds()) == {r.agent_id: r.reservation_id}
        assert store.order_ids == saved_orders

    # A whole-CP restart: a new registry, supervisor and deps over the same sources.
    async with running(make_deps(agents, store, events, settings=settings)) as (
            registry, _, directory):
        assert directory.keys() == [KEY]
        assert await picture(registry) == before
        assert store.order_ids == saved_orders
        # A second reserve still avoids the agent held before the restart.
        r2 = await ask(registry, Reserve("dep-2"))
        assert r2.agent_id != r.agent_id


async def test_not_ready_opens_nothing(autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(), MemoryManifests(), Events()
    async with running(make_deps(agents, store, events, ready=False)) as (registry, _, _d):
        view = await ask(registry, SetTarget(target(3)))
        assert view["shortfall"] == 3 and view["pending_orders"] == 0
        await trio.sleep(10)
        assert store.order_ids == set()


async def test_chaos_crashing_the_pool_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    """Crash the pool actor at random — mid-reconcile, mid-save — while reserves, claims
    and timer passes run. Afterwards: every order ever opened is still needed (none
    duplicated), and every acknowledged reservation is still held."""
    rng = random.Random(20261129)
    agents, store = FakeAgentDirectory(latency=0.003), MemoryManifests(latency=0.002)
    events = Events()
    for i in range(12):
        agents.add(f"a{i:02d}")
    settings = PoolSettings(reconcile_interval_s=0.05, reservation_ttl_s=10_000.0,
                            claim_ttl_s=10_000.0)
    acked: list[Reservation] = []
    claims: list[ClaimGrant] = []
    stats = {"crashes": 0, "crashed_asks": 0}
    run_for = 60.0

    async with running(make_deps(agents, store, events, settings=settings)) as (
            registry, sup, _d):
        await ask(registry, SetTarget(target(20)))

        async def chaos() -> None:
            while trio.current_time() < run_for:
                await trio.sleep(rng.uniform(0.001, 0.02))
                if sup.crash(NAME):
                    stats["crashes"] += 1

        async def client(seed: int) -> None:
            local = random.Random(seed)
            while trio.current_time() < run_for:
                await trio.sleep(local.uniform(0.01, 0.3))
                msg: object = local.choice([Reconcile(), Reconcile(), Reserve(f"d{seed}"),
                                            Claim(claimed_by="p"), Describe()])
                if isinstance(msg, Reserve) and len(acked) >= 6:
                    msg = Reconcile()
                try:
                    answer = await registry.ref(NAME).ask(msg, timeout=5)
                except (ActorCrashed, AskTimeout, ActorDead):
                    stats["crashed_asks"] += 1
                    continue
                if isinstance(answer, Reservation):
                    acked.append(answer)
                elif isinstance(answer, ClaimGrant):
                    claims.append(answer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(chaos)
            for seed in range(6):
                nursery.start_soon(client, seed)
        await trio.sleep(1.0)  # let the last restart land
        view = await ask(registry, Reconcile())

        assert stats["crashes"] > 500 and stats["crashed_asks"] > 20
        # No lost reservation: each acknowledged one is held, on its own agent.
        holds = await ask(registry, Holds())
        assert len({r.agent_id for r in acked}) == len(acked) >= 3
        assert {r.agent_id: r.reservation_id for r in acked}.items() <= holds.items()
        # No duplicate order: everything ever opened is exactly what is still wanted.
        # (Agents never change here, so the shortfall only grew with reservations.)
        assert view["shortfall"] == 20 - (12 - len(holds))
        assert view["orders_in_flight"] == view["shortfall"]
        assert len(store.order_ids) == view["shortfall"]
        assert view["orders_by_state"]["cancelled"] == 0
        # Claims granted were distinct orders, and their orders are claimed.
        assert len({c.order.order_id for c in claims}) == len(claims)
        # The saved manifest is the actor's state.
        saved = store.docs[("pools", KEY.ident)]
        assert {o["order_id"] for o in saved["orders"]} == store.order_ids
        assert {r["reservation_id"] for r in saved["reservations"]} == set(holds.values())


async def test_directory_starts_pools_on_demand(autojump_clock: trio.abc.Clock) -> None:
    agents, store, events = FakeAgentDirectory(), MemoryManifests(), Events()
    other = PoolKey("baremetal:chicago-h100", "llm")
    async with running(make_deps(agents, store, events), start=False) as (
            _registry, sup, directory):
        assert directory.keys() == []
        refs: list[Any] = []
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(lambda: _append(refs, directory.ensure(KEY)))
        assert len(set(refs)) == 1 and len(sup) == 1
        await directory.populate([KEY, other])
        assert directory.keys() == sorted([KEY, other])
        await sup.terminate_child(other.actor_name)


async def _append(out: list[Any], awaitable: Any) -> None:
    out.append(await awaitable)
