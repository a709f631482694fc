"""The actor mailbox (``ee.runtime.registry.Mailbox``): bounded, FIFO, one reader;
writers wait for room; closing hands back what was queued and wakes every waiter."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ee.runtime.registry import Envelope, Mailbox


def env(n: int) -> Envelope:
    return Envelope(n, None)


async def test_fifo_bounded_and_writers_wait_for_room(autojump_clock: trio.abc.Clock) -> None:
    box = Mailbox(2)
    box.send_nowait(env(1))
    box.send_nowait(env(2))
    with pytest.raises(trio.WouldBlock):
        box.send_nowait(env(3))
    sent: list[int] = []
    async with trio.open_nursery() as nursery:
        async def writer(n: int) -> None:
            await box.send(env(n))
            sent.append(n)
        nursery.start_soon(writer, 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [] and len(box) == 2
        got = [(await box.receive()).message for _ in range(4)]
    assert got == [1, 2, 3, 4] and sent == [3, 4] and len(box) == 0


async def test_a_cancelled_writer_leaves_nothing_behind(autojump_clock: trio.abc.Clock) -> None:
    box = Mailbox(1)
    box.send_nowait(env(1))
    with trio.move_on_after(1):
        await box.send(env(2))
    assert (await box.receive()).message == 1
    with trio.move_on_after(1):  # nothing else is queued: the reader waits
        await box.receive()
        raise AssertionError("the cancelled writer's item arrived")


async def test_close_returns_the_queue_and_wakes_every_waiter(
        autojump_clock: trio.abc.Clock) -> None:
    box = Mailbox(1)
    box.send_nowait(env(1))
    errors: list[type[BaseException]] = []

    async def writer() -> None:
        try:
            await box.send(env(2))
        except trio.ClosedResourceError as exc:
            errors.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert [e.message for e in box.close()] == [1, 2]
    assert errors == [trio.ClosedResourceError]
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(env(3))
    with pytest.raises(trio.EndOfChannel):
        await box.receive()

    idle = Mailbox(1)
    ended: list[bool] = []

    async def reader() -> None:
        with pytest.raises(trio.EndOfChannel):
            await idle.receive()
        ended.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):  # one reader only
            await idle.receive()
        idle.close()
    assert ended == [True]
