"""The CP's event bus: one ``emit`` for actors and endpoints, fanned out to the record
store (history) and to live subscribers (the admin events websocket, the console).

``emit`` never blocks and never fails: events are history, not liveness. A subscriber
that does not keep up loses events (and is told how many); the record writer has a
bounded queue and counts what it had to drop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

log = logging.getLogger("ee.cp.events")


@attrs.frozen
class Event:
    seq: int
    at: float  # unix time
    kind: str
    subject: str
    data: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "kind": self.kind,
            "subject": self.subject,
            "data": dict(self.data),
        }


class EventBus:
    def __init__(self, *, history_queue: int = 10_000, subscriber_queue: int = 1000) -> None:
        self._seq = 0
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()
        self._subscriber_queue = subscriber_queue
        self._history_tx, self.history_rx = trio.open_memory_channel[Event](history_queue)
        self.dropped_history = 0
        self.recent: list[Event] = []

    def emit(self, kind: str, subject: str, data: Mapping[str, Any] | None = None) -> None:
        self._seq += 1
        event = Event(self._seq, time.time(), kind, subject, dict(data or {}))
        self.recent.append(event)
        if len(self.recent) > 500:
            del self.recent[:100]
        try:
            self._history_tx.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped_history += 1
            if self.dropped_history % 1000 == 1:  # the first, then every 1,000th
                log.warning("history queue full: %d events not written to the history "
                            "store so far (ee_event_history_dropped_total)",
                            self.dropped_history)
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.discard(channel)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        send, receive = trio.open_memory_channel[Event](self._subscriber_queue)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()

    def close(self) -> None:
        self._history_tx.close()


__all__ = ["Event", "EventBus"]
