"""Actors, mailboxes, refs and the registry."""

from __future__ import annotations

import attrs
import pytest
import trio
from actorkit import Add, Boom, Counter, Get, Sleep, Source

from ee.runtime import (
    Actor,
    ActorCrashed,
    ActorDead,
    ActorHost,
    ActorRef,
    AskTimeout,
    ChaosCrash,
    MailboxFull,
    NameTaken,
    Registry,
    UnhandledMessage,
    handler,
)
from ee.supervisors import NO_BACKOFF, Backoff, Supervisor, actor_spec


async def test_tell_and_ask_dispatch_by_type() -> None:
    registry = Registry()
    source = Source()
    async with trio.open_nursery() as nursery:
        host = ActorHost(registry, "counter/a", lambda: Counter(source))
        ref = await nursery.start(host.run)
        assert ref == registry.ref("counter/a")
        await ref.tell(Add(2))
        ref.try_tell(Add(3))
        assert await ref.ask(Get()) == 5
        host.request_stop()
    host.release()
    assert "counter/a" not in registry


@attrs.frozen
class Base:
    pass


@attrs.frozen
class Derived(Base):
    pass


class ByBase(Actor):
    @handler(Base)
    async def on_base(self, msg: Base) -> str:
        return type(msg).__name__


async def test_handler_matches_subclasses_and_refuses_unknown_types() -> None:
    registry = Registry()
    async with trio.open_nursery() as nursery:
        host = ActorHost(registry, "b", ByBase)
        ref = await nursery.start(host.run)
        assert await ref.ask(Derived()) == "Derived"
        with pytest.raises(UnhandledMessage):
            await ref.ask(Get())
        # The actor survived the unhandled ask.
        assert await ref.ask(Base()) == "Base"
        host.request_stop()
    host.release()


def test_actor_ref_has_no_public_constructor() -> None:
    with pytest.raises(TypeError):
        ActorRef()
    with pytest.raises(ActorDead):
        Registry().ref("nobody")


async def test_name_taken_and_name_syntax() -> None:
    registry = Registry()
    async with trio.open_nursery() as nursery:
        first = ActorHost(registry, "agent/x", lambda: Counter(Source()))
        await nursery.start(first.run)
        second = ActorHost(registry, "agent/x", lambda: Counter(Source()))
        with pytest.raises(NameTaken):
            await nursery.start(second.run)
        first.request_stop()
    first.release()
    with pytest.raises(ValueError, match="invalid actor name"):
        ActorHost(registry, "bad name/", lambda: Counter(Source()))


async def test_ask_timeout(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()
    async with trio.open_nursery() as nursery:
        host = ActorHost(registry, "slow", lambda: Counter(Source()))
        ref = await nursery.start(host.run)
        start = trio.current_time()
        with pytest.raises(AskTimeout):
            await ref.ask(Sleep(60), timeout=1.5)
        assert trio.current_time() - start == pytest.approx(1.5)
        # The actor is still alive and answers once it is free.
        assert await ref.ask(Get(), timeout=120) == 0
        host.request_stop()
    host.release()


async def test_mailbox_backpressure_and_mailbox_full(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()
    async with trio.open_nursery() as nursery:
        host = ActorHost(registry, "m", lambda: Counter(Source()), mailbox_size=2)
        ref = await nursery.start(host.run)
        await ref.tell(Sleep(10))  # taken by the actor at once
        await trio.sleep(0.1)
        ref.try_tell(Add(1))
        ref.try_tell(Add(1))
        with pytest.raises(MailboxFull):
            ref.try_tell(Add(1))
        # tell waits for room instead of failing: it returns only after the sleep ends.
        await ref.tell(Add(1))
        assert trio.current_time() >= 10
        assert await ref.ask(Get()) == 3
        host.request_stop()
    host.release()


async def test_handler_crash_fails_the_ask_with_its_cause_and_restart_rebuilds() -> None:
    registry = Registry()
    source = Source()
    sup = Supervisor("root", [actor_spec(registry, "c", lambda: Counter(source))],
                     backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = registry.ref("c")
        await ref.ask(Add(7))
        with pytest.raises(ActorCrashed) as info:
            await ref.ask(Boom("kaput"))
        assert isinstance(info.value.cause, RuntimeError)
        assert "kaput" in str(info.value.cause)
        # Same ref, new incarnation, state rebuilt from the source by started().
        assert await ref.ask(Get()) == 7
        assert source.starts == 2
        sup.request_stop()


async def test_ask_during_restart_reaches_the_new_incarnation(
    autojump_clock: trio.abc.Clock,
) -> None:
    registry = Registry()
    source = Source()
    backoff = Backoff(base=5.0, jitter=0.0)
    sup = Supervisor("root", [actor_spec(registry, "c", lambda: Counter(source))],
                     backoff=backoff)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = registry.ref("c")
        await ref.tell(Boom())
        await trio.sleep(1)  # the actor is dead and waits 5 s before its restart
        assert sup.snapshot().children[0].state == "restarting"
        before = trio.current_time()
        await ref.tell(Add(4))
        assert await ref.ask(Get(), timeout=30) == 4
        assert trio.current_time() - before == pytest.approx(4.0)
        sup.request_stop()


async def test_stop_fails_queued_asks_with_actor_dead(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry()
    sup = Supervisor("root", [actor_spec(registry, "c", lambda: Counter(Source()), shutdown=1)])
    outcomes: list[str] = []

    async def asker() -> None:
        try:
            await ref.ask(Get(), timeout=100)
            outcomes.append("answered")
        except ActorDead:
            outcomes.append("dead")

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = registry.ref("c")
        await ref.tell(Sleep(50))
        await trio.sleep(0.1)
        for _ in range(3):
            nursery.start_soon(asker)
        await trio.sleep(0.1)
        sup.request_stop()
    # The sleep outlived the 1 s grace: the handler was cancelled, the queue failed.
    assert outcomes == ["dead", "dead", "dead"]
    assert len(registry) == 0
    with pytest.raises(ActorDead):
        await ref.tell(Add(1))
    with pytest.raises(ActorDead):
        ref.try_tell(Add(1))


async def test_chaos_injection_fails_the_inflight_ask_with_the_injected_cause(
    autojump_clock: trio.abc.Clock,
) -> None:
    registry = Registry()
    sup = Supervisor("root", [actor_spec(registry, "c", lambda: Counter(Source()))],
                     backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = registry.ref("c")
        caught: list[BaseException] = []

        async def ask_slow() -> None:
            try:
                await ref.ask(Sleep(100), timeout=200)
            except ActorCrashed as exc:
                caught.append(exc.cause)

        nursery.start_soon(ask_slow)
        await trio.sleep(1)
        assert registry.crash("c")
        await trio.sleep(1)
        assert len(caught) == 1 and isinstance(caught[0], ChaosCrash)
        assert sup.snapshot().children[0].restarts == 1
        assert await ref.ask(Get()) == 0
        sup.request_stop()


@attrs.frozen
class HelperFails:
    reason: str


class WithHelper(Actor):
    """Answers HelperFails by starting a helper that raises while the handler waits."""

    @handler(HelperFails)
    async def on_helper_fails(self, msg: HelperFails) -> str:
        async def helper() -> None:
            await trio.sleep(1)
            raise ValueError(msg.reason)

        self.start_soon(helper)
        await trio.sleep(100)  # cancelled when the helper crashes the incarnation
        return "never"

    @handler(Get)
    async def on_get(self, _: Get) -> str:
        return "alive"


async def test_failing_helper_fails_the_inflight_ask_with_its_cause(
    autojump_clock: trio.abc.Clock,
) -> None:
    registry = Registry()
    sup = Supervisor("root", [actor_spec(registry, "h", WithHelper)], backoff=NO_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = registry.ref("h")
        with pytest.raises(ActorCrashed) as info:
            await ref.ask(HelperFails("helper broke"), timeout=50)
        assert isinstance(info.value.cause, ValueError)
        assert str(info.value.cause) == "helper broke"
        # The helper's exception is the incarnation's exit reason, and it restarts.
        assert await ref.ask(Get()) == "alive"
        child = sup.snapshot().children[0]
        assert child.restarts == 1
        assert child.last_error == "ValueError('helper broke')"
        sup.request_stop()
