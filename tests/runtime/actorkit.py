"""Small actors shared by the runtime and supervisor tests."""

from __future__ import annotations

import attrs
import trio

from ee.runtime import Actor, handler


@attrs.frozen
class Get:
    pass


@attrs.frozen
class Add:
    n: int


@attrs.frozen
class Boom:
    reason: str = "boom"


@attrs.frozen
class Sleep:
    seconds: float


class Source:
    """Where a Counter's state 'really' lives, like an agent's snapshot for AgentActor."""

    def __init__(self) -> None:
        self.value = 0
        self.starts = 0


class Counter(Actor):
    """Keeps a running total; on (re)start rebuilds it from its Source."""

    def __init__(self, source: Source, events: list[str] | None = None) -> None:
        self.source = source
        self.events = events
        self.total = -1

    async def started(self) -> None:
        self.source.starts += 1
        self.total = self.source.value
        if self.events is not None:
            self.events.append(f"start {self.name}")

    async def stopping(self) -> None:
        if self.events is not None:
            self.events.append(f"stop {self.name}")

    @handler(Get)
    async def on_get(self, _: Get) -> int:
        return self.total

    @handler(Add)
    async def on_add(self, msg: Add) -> int:
        self.total += msg.n
        self.source.value = self.total
        return self.total

    @handler(Boom)
    async def on_boom(self, msg: Boom) -> None:
        raise RuntimeError(msg.reason)

    @handler(Sleep)
    async def on_sleep(self, msg: Sleep) -> str:
        await trio.sleep(msg.seconds)
        return "slept"
