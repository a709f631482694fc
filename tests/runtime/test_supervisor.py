"""Supervisor behaviour under the autojump clock: strategies, restart types,
intensity and escalation, backoff, start/stop order, dynamic children, leaks."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import trio
from actorkit import Add, Boom, Counter, Get, Source

from ee.runtime import ActorDead, Registry
from ee.supervisors import (
    NO_BACKOFF,
    Backoff,
    ChildExists,
    ChildSpec,
    Restart,
    StartFailed,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    actor_spec,
)

Clock = trio.abc.Clock  # every test below runs on pytest-trio's autojump clock


class Worker:
    """A plain (non-actor) child that records its life and can be told to exit."""

    def __init__(self, name: str, log: list[str], *, fail_start: bool = False,
                 ignore_stop: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail_start = fail_start
        self.ignore_stop = ignore_stop
        self.incarnations = 0
        self.next_start = trio.Event()  # set (and replaced) at each start
        self._exit: trio.Event | None = None
        self._error: BaseException | None = None

    async def run(self, task_status: trio.TaskStatus[str]) -> None:
        self.incarnations += 1
        if self.fail_start:
            self.log.append(f"failstart {self.name}")
            raise RuntimeError(f"{self.name} cannot start")
        self._exit = trio.Event()
        self._error = None
        self.log.append(f"start {self.name}")
        self.next_start.set()
        self.next_start = trio.Event()
        task_status.started(self.name)
        try:
            await self._exit.wait()
        finally:
            self.log.append(f"stop {self.name}")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if not self.ignore_stop and self._exit is not None:
            self._exit.set()

    def exit(self, error: BaseException | None = None) -> None:
        assert self._exit is not None
        self._error = error
        self._exit.set()

    def spec(self, restart: Restart = Restart.PERMANENT, shutdown: float = 5.0) -> ChildSpec:
        return ChildSpec(id=self.name, start=self.run, restart=restart, shutdown=shutdown,
                         stop=self.stop)


def workers(log: list[str], *names: str) -> dict[str, Worker]:
    return {n: Worker(n, log) for n in names}


async def settle() -> None:
    await trio.sleep(1)


@pytest.mark.parametrize(
    ("strategy", "restarted"),
    [(Strategy.ONE_FOR_ONE, {"b": 2, "a": 1, "c": 1}),
     (Strategy.ONE_FOR_ALL, {"a": 2, "b": 2, "c": 2}),
     (Strategy.REST_FOR_ONE, {"a": 1, "b": 2, "c": 2})],
)
async def test_strategies(
    strategy: Strategy, restarted: dict[str, int], autojump_clock: Clock
) -> None:
    log: list[str] = []
    w = workers(log, "a", "b", "c")
    sup = Supervisor("s", [x.spec() for x in w.values()], strategy=strategy,
                     backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        log.clear()
        w["b"].exit(RuntimeError("b died"))
        await settle()
        assert {n: x.incarnations for n, x in w.items()} == restarted
        if strategy is Strategy.ONE_FOR_ALL:
            assert log == ["stop b", "stop c", "stop a", "start a", "start b", "start c"]
        if strategy is Strategy.REST_FOR_ONE:
            assert log == ["stop b", "stop c", "start b", "start c"]
        sup.request_stop()


async def test_restart_types_on_normal_and_abnormal_exit(autojump_clock: Clock) -> None:
    log: list[str] = []
    perm, trans, temp, trans2 = (Worker(n, log) for n in ("perm", "trans", "temp", "trans2"))
    sup = Supervisor("s", [perm.spec(Restart.PERMANENT), trans.spec(Restart.TRANSIENT),
                           temp.spec(Restart.TEMPORARY), trans2.spec(Restart.TRANSIENT)],
                     backoff=NO_BACKOFF, max_restarts=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        perm.exit()  # normal exit of a permanent child: restarted
        trans.exit()  # normal exit of a transient child: removed
        temp.exit(RuntimeError("x"))  # temporary: never restarted
        trans2.exit(RuntimeError("y"))  # abnormal exit of transient: restarted
        await settle()
        assert sup.child_ids() == ["perm", "trans2"]
        assert (perm.incarnations, trans.incarnations, temp.incarnations,
                trans2.incarnations) == (2, 1, 1, 2)
        sup.request_stop()


async def test_intensity_exactly_at_limit_survives_one_past_gives_up(autojump_clock: Clock) -> None:
    log: list[str] = []
    w = Worker("w", log)
    sup = Supervisor("s", [w.spec()], max_restarts=3, period=100.0, backoff=NO_BACKOFF)
    with pytest.RaisesGroup(SupervisorGaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            for _ in range(3):
                w.exit(RuntimeError("crash"))
                await settle()
            assert w.incarnations == 4  # three restarts allowed
            assert sup.running
            w.exit(RuntimeError("crash"))  # the fourth exceeds the intensity
            await settle()
            pytest.fail("supervisor should have given up")
    err = info.value.exceptions[0]
    assert isinstance(err, SupervisorGaveUp)
    assert err.child == "w" and isinstance(err.cause, RuntimeError)
    assert log[-1] == "stop w" and w.incarnations == 4


async def test_intensity_window_slides(autojump_clock: Clock) -> None:
    log: list[str] = []
    w = Worker("w", log)
    sup = Supervisor("s", [w.spec()], max_restarts=2, period=10.0, backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for _ in range(6):  # one crash every 6 s: never more than 2 in 10 s
            w.exit(RuntimeError("crash"))
            await trio.sleep(6)
        assert sup.running and w.incarnations == 7
        sup.request_stop()


async def test_children_crashing_together_count_as_one_restart(autojump_clock: Clock) -> None:
    # OTP flushes the exits of the children a restart plan stops: children that die
    # together are one restart, not one each.
    log: list[str] = []
    w = workers(log, "a", "b", "c")
    sup = Supervisor("s", [x.spec() for x in w.values()], strategy=Strategy.ONE_FOR_ALL,
                     max_restarts=1, period=100.0, backoff=NO_BACKOFF)
    survived_the_pair = False
    with pytest.RaisesGroup(SupervisorGaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            # Both exits are queued before the control loop handles either: the two
            # children run in the same scheduler batch, in either order (one_for_all
            # makes the order irrelevant; rest_for_one is covered by the test below).
            w["a"].exit(RuntimeError("together 1"))
            w["b"].exit(RuntimeError("together 2"))
            await settle()
            assert [x.incarnations for x in w.values()] == [2, 2, 2]
            survived_the_pair = True
            w["c"].exit(RuntimeError("later"))  # the second restart in 100 s exceeds 1
            await settle()
            pytest.fail("supervisor should have given up")
    assert survived_the_pair, "two exits flushed by one plan must count as one restart"
    gave_up = info.value.exceptions[0]
    assert isinstance(gave_up, SupervisorGaveUp) and "later" in repr(gave_up.cause)


@pytest.mark.parametrize("strategy", [Strategy.ONE_FOR_ALL, Strategy.REST_FOR_ONE])
async def test_sibling_crashing_while_the_plan_stops_others_is_flushed(
    strategy: Strategy, autojump_clock: Clock
) -> None:
    log: list[str] = []
    w = workers(log, "a", "b", "c", "d")
    w["d"].ignore_stop = True  # stopping d takes its whole 5 s grace
    sup = Supervisor("s", [x.spec(shutdown=5.0) for x in w.values()], strategy=strategy,
                     max_restarts=1, period=100.0, backoff=NO_BACKOFF)

    async def crash_during_the_stop_of_d() -> None:
        await trio.sleep(1)
        assert log == ["stop b"]  # d is still being stopped, c not reached yet
        w["c"].exit(RuntimeError("c died on its own"))

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        log.clear()
        nursery.start_soon(crash_during_the_stop_of_d)
        w["b"].exit(RuntimeError("b died"))
        await trio.sleep(10)
        assert sup.running, "c's exit was flushed by b's plan: one restart"
        assert w["c"].incarnations == w["d"].incarnations == 2
        assert sup.snapshot().children[2].last_error == "RuntimeError('c died on its own')"
        sup.request_stop()


async def test_escalation_through_two_levels(autojump_clock: Clock) -> None:
    log: list[str] = []
    w = Worker("w", log)
    inner = Supervisor("inner", [w.spec()], max_restarts=0, period=10.0, backoff=NO_BACKOFF)
    middle = Supervisor("middle", [inner.as_child()], max_restarts=1, period=10.0,
                        backoff=NO_BACKOFF)
    root = Supervisor("root", [middle.as_child()], max_restarts=0, period=10.0,
                      backoff=NO_BACKOFF)
    with pytest.RaisesGroup(SupervisorGaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            w.exit(RuntimeError("first"))  # inner gives up; middle restarts inner
            await settle()
            assert root.running and w.incarnations == 2
            tree = root.snapshot()
            assert tree.children[0].children[0].restarts == 1  # inner, restarted once
            w.exit(RuntimeError("second"))  # inner gives up; middle exceeds; root exceeds
            await settle()
            pytest.fail("root should have given up")
    root_failure = info.value.exceptions[0]
    assert isinstance(root_failure, SupervisorGaveUp) and root_failure.supervisor == "root"
    middle_failure = root_failure.cause
    assert isinstance(middle_failure, SupervisorGaveUp)
    assert middle_failure.supervisor == "middle"
    assert isinstance(middle_failure.cause, SupervisorGaveUp)
    assert middle_failure.cause.supervisor == "inner"


async def test_backoff_delays_follow_the_schedule_and_reset_after_health(
    autojump_clock: Clock,
) -> None:
    log: list[str] = []
    w = Worker("w", log)
    backoff = Backoff(base=1.0, factor=2.0, maximum=8.0, jitter=0.0, reset_after=30.0)
    sup = Supervisor("s", [w.spec()], max_restarts=100, period=1.0, backoff=backoff)

    async def crash_and_time_restart() -> float:
        started = w.next_start
        t0 = trio.current_time()
        w.exit(RuntimeError("x"))
        await started.wait()
        return trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        delays = [await crash_and_time_restart() for _ in range(5)]
        assert delays == pytest.approx([1.0, 2.0, 4.0, 8.0, 8.0])
        await trio.sleep(31)  # healthy for longer than reset_after
        assert await crash_and_time_restart() == pytest.approx(1.0)
        sup.request_stop()


async def test_backoff_jitter_is_bounded(autojump_clock: Clock) -> None:
    import random

    log: list[str] = []
    w = Worker("w", log)
    backoff = Backoff(base=2.0, factor=1.0, maximum=2.0, jitter=0.5)
    sup = Supervisor("s", [w.spec()], max_restarts=100, period=1.0, backoff=backoff,
                     rng=random.Random(7))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        seen = []
        for _ in range(10):
            started = w.next_start
            t0 = trio.current_time()
            w.exit(RuntimeError("x"))
            await started.wait()
            seen.append(trio.current_time() - t0)
        assert all(1.0 - 1e-9 <= d <= 3.0 + 1e-9 for d in seen)
        assert len({round(d, 3) for d in seen}) > 3  # jitter actually varies the delay
        sup.request_stop()


async def test_start_order_stop_order_and_start_failure(autojump_clock: Clock) -> None:
    log: list[str] = []
    w = workers(log, "a", "b", "c")
    sup = Supervisor("s", [x.spec() for x in w.values()])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        sup.request_stop()
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]

    log.clear()
    a, bad, c = Worker("a", log), Worker("bad", log, fail_start=True), Worker("c", log)
    sup = Supervisor("s", [a.spec(), bad.spec(), c.spec()])
    async with trio.open_nursery() as nursery:
        with pytest.raises(StartFailed) as info:
            await nursery.start(sup.run)  # a start failure raises out of start() itself
    assert info.value.child == "bad"
    assert log == ["start a", "failstart bad", "stop a"]
    assert c.incarnations == 0


async def test_shutdown_grace_then_cancel(autojump_clock: Clock) -> None:
    log: list[str] = []
    stubborn = Worker("stubborn", log, ignore_stop=True)
    polite = Worker("polite", log)
    sup = Supervisor("s", [polite.spec(shutdown=2.0), stubborn.spec(shutdown=3.0)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        t0 = trio.current_time()
        sup.request_stop()
    # The stubborn child (stopped first, reverse order) used its full 3 s grace.
    assert trio.current_time() - t0 == pytest.approx(3.0)
    assert log[-2:] == ["stop stubborn", "stop polite"]


async def test_crash_never_corrupts_a_sibling(autojump_clock: Clock) -> None:
    registry = Registry()
    sources = {n: Source() for n in ("x", "y")}
    sup = Supervisor("s", [actor_spec(registry, n, lambda n=n: Counter(sources[n]))
                           for n in ("x", "y")], backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        x, y = registry.ref("x"), registry.ref("y")
        await y.ask(Add(41))
        await x.tell(Boom())
        await settle()
        assert await y.ask(Get()) == 41
        assert sources["y"].starts == 1 and sources["x"].starts == 2
        sup.request_stop()


async def test_dynamic_children_and_tree_snapshot(autojump_clock: Clock) -> None:
    registry = Registry()
    agents = Supervisor("agents", backoff=NO_BACKOFF, max_restarts=10)
    root = Supervisor("root", [agents.as_child()])

    def make(i: int) -> Callable[[], Counter]:
        return lambda: Counter(Source())

    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        for i in range(1000):
            await agents.start_child(actor_spec(registry, f"agent/{i}", make(i),
                                                restart=Restart.TRANSIENT))
        assert len(registry.names("agent/")) == 1000
        with pytest.raises(ChildExists):
            await agents.start_child(actor_spec(registry, "agent/5", make(5)))
        await registry.ref("agent/7").tell(Boom())
        await settle()
        tree = root.snapshot()
        node = next(n for n in tree.walk() if n.name == "agent/7")
        assert (node.kind, node.state, node.restarts) == ("actor", "running", 1)
        assert node.last_error is not None and "boom" in node.last_error
        assert node.mailbox_depth == 0
        assert tree.to_dict()["children"][0]["name"] == "agents"
        assert await agents.terminate_child("agent/7")
        assert "agent/7" not in registry
        root.request_stop()
    assert len(registry) == 0


async def test_no_leaked_tasks_channels_or_names_after_shutdown(autojump_clock: Clock) -> None:
    registry = Registry()
    sup = Supervisor("root", [
        actor_spec(registry, f"a/{i}", lambda: Counter(Source())) for i in range(20)
    ], strategy=Strategy.ONE_FOR_ALL, backoff=NO_BACKOFF)
    refs = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        refs = [registry.ref(n) for n in registry.names()]
        await refs[3].tell(Boom())
        await settle()
        sup.request_stop()
    assert len(registry) == 0
    assert not sup.running and sup.child_ids() == []
    # Every mailbox is closed: senders are told the actor is dead.
    for ref in refs:
        with pytest.raises(ActorDead):
            ref.try_tell(Get())
    # No task of ours is left: the only child nurseries are gone with the test's own.
    me = trio.lowlevel.current_task()
    assert all(not n.child_tasks for n in me.child_nurseries)


async def test_crash_of_a_plain_worker_records_the_injected_error(autojump_clock: Clock) -> None:
    log: list[str] = []
    w = Worker("w", log)
    sup = Supervisor("s", [w.spec()], backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert sup.started_value("w") == "w" and sup.started_value("nobody") is None
        assert sup.crash("w")
        assert not sup.crash("nobody")
        await settle()
        node = sup.snapshot().children[0]
        assert node.restarts == 1 and "ChaosCrash" in (node.last_error or "")
        sup.request_stop()


async def test_supervisor_cancelled_from_outside_releases_names(autojump_clock: Clock) -> None:
    registry = Registry()
    sup = Supervisor("s", [actor_spec(registry, "a", lambda: Counter(Source()),
                                      shutdown=math.inf)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert "a" in registry
        nursery.cancel_scope.cancel()
    assert len(registry) == 0
