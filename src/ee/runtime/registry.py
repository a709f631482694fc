"""Names, mailboxes and refs.

A *slot* is what a name owns: the bounded mailbox (a ``Mailbox``: a Trio memory
channel's semantics for one reader, at a fraction of its memory) and the
bookkeeping of whichever incarnation of the actor currently reads it. The slot outlives
incarnations: when an actor crashes and its supervisor restarts it, the new incarnation
reads the same mailbox, so messages told during the restart reach it and asks queued
behind the crash are answered by it. Only when the actor stops for good does the slot
close: senders then get ``ActorDead`` and every ask still queued is failed with
``ActorDead`` (never left hanging).

An ``ActorRef`` is the handle callers hold. It cannot be built by hand: the registry
hands it out. It names an actor rather than pointing at an incarnation, and re-resolves
through the registry when the slot it last saw has closed, so a ref stays valid across
restarts and even across a stop-and-register-again under the same name.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any, Final

import outcome
import trio

from ee.runtime.errors import (
    ActorCrashed,
    ActorDead,
    AskTimeout,
    MailboxFull,
    NameTaken,
)

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.:@+\-]+(/[A-Za-z0-9_.:@+\-]+)*$")


class Reply:
    """The answer slot of one ``ask``: filled once, by the handler or by the runtime."""

    __slots__ = ("_error", "_event", "_value", "abandoned")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.abandoned = False

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, value: Any) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Envelope:
    __slots__ = ("message", "reply")

    def __init__(self, message: object, reply: Reply | None) -> None:
        self.message = message
        self.reply = reply


class Mailbox:
    """A bounded FIFO with one reader (the actor) and any number of writers.

    What a Trio memory channel gives an actor, for a fraction of its memory (a CP holds
    one mailbox per agent): no queue while empty, no waiting-room until a writer has to
    wait. ``send_nowait`` raises ``trio.WouldBlock`` when full and
    ``trio.ClosedResourceError`` once closed; ``send`` waits for room (cancellable);
    ``receive`` raises ``trio.EndOfChannel`` once closed. ``close`` hands back what was
    still queued and fails every waiting writer with ``trio.ClosedResourceError``.
    """

    __slots__ = ("_getter", "_items", "_putters", "capacity", "closed")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.closed = False
        self._items: deque[Envelope] | None = None
        self._getter: trio.lowlevel.Task | None = None
        self._putters: OrderedDict[trio.lowlevel.Task, Envelope] | None = None

    def __len__(self) -> int:
        return len(self._items) if self._items else 0

    def send_nowait(self, item: Envelope) -> None:
        if self.closed:
            raise trio.ClosedResourceError("mailbox closed")
        if self._getter is not None:
            getter, self._getter = self._getter, None
            trio.lowlevel.reschedule(getter, outcome.Value(item))
            return
        if len(self) >= self.capacity:
            raise trio.WouldBlock
        if self._items is None:
            self._items = deque()
        self._items.append(item)

    async def send(self, item: Envelope) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.send_nowait(item)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        task = trio.lowlevel.current_task()
        if self._putters is None:
            self._putters = OrderedDict()
        self._putters[task] = item

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self._putters is not None:
                self._putters.pop(task, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def receive(self) -> Envelope:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._items:
            item = self._items.popleft()
            self._admit_putter()
            if not self._items:
                self._items = None  # an idle mailbox holds no queue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        if self.closed:
            raise trio.EndOfChannel
        if self._getter is not None:
            raise trio.BusyResourceError("a mailbox has one reader")
        task = trio.lowlevel.current_task()
        self._getter = task

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._getter = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def _admit_putter(self) -> None:
        """Room was made: the longest-waiting writer's item joins the queue."""
        if not self._putters:
            return
        task, item = self._putters.popitem(last=False)
        if not self._putters:
            self._putters = None
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        trio.lowlevel.reschedule(task, outcome.Value(None))

    def receive_nowait(self) -> Envelope:
        if not self._items:
            raise trio.EndOfChannel if self.closed else trio.WouldBlock
        item = self._items.popleft()
        self._admit_putter()
        return item

    def close(self) -> list[Envelope]:
        """Refuse new items; wake the reader (``EndOfChannel``) and every waiting writer
        (``ClosedResourceError``); return what was still queued, oldest first."""
        self.closed = True
        left = list(self._items or ())
        self._items = None
        for task, item in (self._putters or {}).items():
            left.append(item)
            trio.lowlevel.reschedule(task, outcome.Error(
                trio.ClosedResourceError("mailbox closed")))
        self._putters = None
        if self._getter is not None:
            getter, self._getter = self._getter, None
            trio.lowlevel.reschedule(getter, outcome.Error(trio.EndOfChannel()))
        return left


class Slot:
    """A name's mailbox and the live-incarnation bookkeeping. Internal to the runtime."""

    __slots__ = ("capacity", "closed", "incarnation_scope", "injected", "mailbox", "name",
                 "processed", "registry")

    def __init__(self, registry: Registry, name: str, capacity: int) -> None:
        self.registry = registry
        self.name = name
        self.capacity = capacity
        self.mailbox = Mailbox(capacity)
        self.closed = False
        self.incarnation_scope: trio.CancelScope | None = None
        self.injected: BaseException | None = None
        self.processed = 0

    @property
    def depth(self) -> int:
        return len(self.mailbox)

    def mailbox_depth(self) -> int:
        return 0 if self.closed else self.depth

    def crash(self, error: BaseException) -> bool:
        """Raise *error* inside the running incarnation (chaos, failed helpers).

        False if no incarnation runs. When two crashes race, the first cause wins.
        """
        if self.closed or self.incarnation_scope is None:
            return False
        if self.injected is None:  # the first cause of a crash is the one reported
            self.injected = error
        self.incarnation_scope.cancel()
        return True

    def close(self, detail: str = "stopped") -> None:
        """Stop for good: refuse new messages, fail queued asks, release the name."""
        if self.closed:
            return
        self.closed = True
        for envelope in self.mailbox.close():
            if envelope.reply is not None:
                envelope.reply.fail(ActorDead(self.name, detail))
        self.registry._release(self)


class ActorRef:
    """Address of a named actor. Obtained from ``Registry.ref``; never constructed directly."""

    __slots__ = ("_name", "_registry", "_slot")
    _name: str
    _registry: Registry
    _slot: Slot | None

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("ActorRef cannot be constructed; use Registry.ref(name)")

    @classmethod
    def _bind(cls, registry: Registry, name: str, slot: Slot | None) -> ActorRef:
        ref = object.__new__(cls)
        ref._registry = registry
        ref._name = name
        ref._slot = slot
        return ref

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<ActorRef {self._name}>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ActorRef)
            and other._name == self._name
            and other._registry is self._registry
        )

    def __hash__(self) -> int:
        return hash(self._name)

    def _resolve(self) -> Slot:
        slot = self._slot
        if slot is None or slot.closed:
            slot = self._registry._slots.get(self._name)
            if slot is None:
                raise ActorDead(self._name, "no such actor")
            self._slot = slot
        return slot

    @property
    def alive(self) -> bool:
        try:
            self._resolve()
        except ActorDead:
            return False
        return True

    async def tell(self, message: object) -> None:
        """Deliver *message*, waiting while the mailbox is full (backpressure)."""
        slot = self._resolve()
        try:
            await slot.mailbox.send(Envelope(message, None))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorDead(self._name, "stopped") from None

    def try_tell(self, message: object) -> None:
        """Deliver *message* now or raise ``MailboxFull``; never blocks."""
        slot = self._resolve()
        try:
            slot.mailbox.send_nowait(Envelope(message, None))
        except trio.WouldBlock:
            raise MailboxFull(self._name, slot.capacity) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorDead(self._name, "stopped") from None

    async def ask(self, message: object, timeout: float = 5.0) -> Any:
        """Send *message* and wait for the handler's return value.

        Raises ``AskTimeout`` after *timeout* seconds (waiting for mailbox room counts),
        ``ActorCrashed`` when the handler raised, ``ActorDead`` when the actor stopped
        for good before answering.
        """
        reply = Reply()
        with trio.move_on_after(timeout):
            slot = self._resolve()
            try:
                await slot.mailbox.send(Envelope(message, reply))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise ActorDead(self._name, "stopped") from None
            return await reply.wait()
        reply.abandoned = True
        raise AskTimeout(self._name, message, timeout)


class Registry:
    """Hierarchical names (``agent/<id>``, ``pool/<dc>/<size>``) to live mailboxes."""

    def __init__(self) -> None:
        self._slots: dict[str, Slot] = {}

    @staticmethod
    def check_name(name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError(
                f"invalid actor name {name!r}: use segments of [A-Za-z0-9_.:@+-] separated by '/'"
            )
        return name

    def _claim(self, name: str, capacity: int) -> Slot:
        self.check_name(name)
        if name in self._slots:
            raise NameTaken(name)
        if capacity < 1 or capacity == math.inf:
            raise ValueError("mailbox capacity must be a positive, finite number")
        slot = Slot(self, name, capacity)
        self._slots[name] = slot
        return slot

    def _release(self, slot: Slot) -> None:
        if self._slots.get(slot.name) is slot:
            del self._slots[slot.name]

    def ref(self, name: str) -> ActorRef:
        """A ref to *name*; ``ActorDead`` if no live actor holds it."""
        slot = self._slots.get(name)
        if slot is None:
            raise ActorDead(name, "no such actor")
        return ActorRef._bind(self, name, slot)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def names(self, prefix: str = "") -> list[str]:
        """Live names, sorted; ``prefix`` selects a subtree, e.g. ``"agent/"``."""
        return sorted(n for n in self._slots if n.startswith(prefix))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def crash(self, name: str, error: BaseException | None = None) -> bool:
        """Chaos hook: inject *error* (default ``ChaosCrash``) into actor *name*'s task."""
        from ee.runtime.errors import ChaosCrash

        slot = self._slots.get(name)
        if slot is None:
            raise ActorDead(name, "no such actor")
        return slot.crash(error if error is not None else ChaosCrash(f"chaos: crash {name}"))


__all__ = ["ActorCrashed", "ActorRef", "Envelope", "Registry", "Reply", "Slot"]
