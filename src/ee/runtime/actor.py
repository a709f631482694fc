"""Actors: one task, one bounded mailbox, handlers chosen by message type.

An ``Actor`` subclass declares handlers with ``@handler(MessageType)``; the runtime
reads its mailbox one envelope at a time and awaits the matching handler, so the
actor's state is touched by exactly one task and needs no locks. A handler's return
value answers an ``ask``; a handler that raises fails that ask with ``ActorCrashed``
and then crashes the incarnation (its supervisor decides what happens next).

``started()`` is the recovery hook. It runs before the incarnation reports itself
started, at the first start and at every restart, and it is the one place where an
actor rebuilds its state from its sources: a restart never resumes from a copy of the
dead incarnation's memory. ``stopping()`` runs on a graceful stop, after the current
message.

``ActorHost`` keeps an actor alive under a name across incarnations: it claims the
name's mailbox on first start, runs a fresh actor object from the factory on each
(re)start, and releases the name only when told the actor is gone for good.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, TypeVar

import trio

from ee.runtime.errors import ActorCrashed, ActorDead, UnhandledMessage
from ee.runtime.registry import ActorRef, Envelope, Registry, Slot

log = logging.getLogger("ee.runtime")

_Handler = Callable[[Any, Any], Awaitable[Any]]
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def handler(message_type: type) -> Callable[[_F], _F]:
    """Mark an ``async def`` method as the handler for *message_type* (and subclasses)."""

    def mark(fn: _F) -> _F:
        setattr(fn, "__ee_handles__", message_type)  # noqa: B010
        return fn

    return mark


class Actor:
    """Base class. Subclasses add state in ``__init__``/``started`` and ``@handler`` methods."""

    _handlers: ClassVar[dict[type, _Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[type, _Handler] = {}
        for base in reversed(cls.__mro__[1:]):
            table.update(getattr(base, "_handlers", {}))
        for value in cls.__dict__.values():
            handles = getattr(value, "__ee_handles__", None)
            if handles is not None:
                table[handles] = value
        cls._handlers = table

    # Set by the runtime before started() runs.
    _slot: Slot
    _nursery: trio.Nursery
    _stop_requested: bool = False

    @property
    def ref(self) -> ActorRef:
        return self._slot.registry.ref(self._slot.name)

    @property
    def name(self) -> str:
        return self._slot.name

    @property
    def registry(self) -> Registry:
        return self._slot.registry

    async def started(self) -> None:
        """Recovery hook: rebuild state from its sources. Runs at every (re)start."""

    async def stopping(self) -> None:
        """Runs once on a graceful stop, after the message being handled."""

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a helper task that lives and dies with this incarnation.

        A helper that raises crashes the actor, like a handler that raises: its
        exception is the incarnation's exit reason, and the ask being answered at that
        moment fails with ``ActorCrashed`` carrying it (not ``ActorDead``: the handler
        was merely cancelled, the helper's exception is why).
        """
        self._nursery.start_soon(self._helper, fn, args)

    async def _helper(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            # Crash the incarnation with this cause, as a chaos injection does; if no
            # incarnation runs any more (teardown), let the nursery see it as usual.
            if not self._slot.crash(exc):
                raise

    def request_stop(self) -> None:
        """Graceful stop trigger: finish the current message, run ``stopping``, return.

        An idle actor is woken by a ``_WAKE`` envelope (no cancel scope per receive: an
        idle actor costs no scope); when the mailbox is full the actor is not idle and
        sees the flag after its current message."""
        self._stop_requested = True
        slot = getattr(self, "_slot", None)
        if slot is not None and not slot.closed:
            try:
                slot.mailbox.send_nowait(_WAKE)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def _find_handler(self, message_type: type) -> _Handler | None:
        handlers = self._handlers
        for klass in message_type.__mro__:
            fn = handlers.get(klass)
            if fn is not None:
                return fn
        return None

    async def _dispatch(self, envelope: Envelope) -> None:
        message, reply = envelope.message, envelope.reply
        if reply is not None and reply.abandoned:
            return  # the asker already got AskTimeout; don't act on a stale request
        fn = self._find_handler(type(message))
        if fn is None:
            if reply is not None:
                reply.fail(UnhandledMessage(self.name, message))
            else:
                log.warning("actor %s dropped unhandled %s", self.name, type(message).__name__)
            return
        try:
            result = await fn(self, message)
        except BaseException as exc:
            if reply is not None:
                cause = self._slot.injected or exc
                if isinstance(cause, Exception):
                    reply.fail(ActorCrashed(self.name, cause))
                else:
                    reply.fail(ActorDead(self.name, "stopped while handling the request"))
            raise
        self._slot.processed += 1
        if reply is not None:
            reply.resolve(result)

    async def _loop(self) -> None:
        receive = self._slot.mailbox
        while not self._stop_requested:
            try:
                envelope = await receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if envelope is _WAKE:
                continue  # a stop request (or one left over from an earlier incarnation)
            await self._dispatch(envelope)


#: Wakes an idle actor so that it sees its stop flag (never dispatched).
_WAKE: Final = Envelope(None, None)


async def _run_incarnation(
    slot: Slot, actor: Actor, task_status: trio.TaskStatus[ActorRef]
) -> None:
    actor._slot = slot
    failure: BaseException | None = None
    try:
        # The nursery's own cancel scope is the incarnation's (crash injection cancels
        # it): one scope per actor, not two.
        async with trio.open_nursery() as nursery:
            slot.incarnation_scope = nursery.cancel_scope
            actor._nursery = nursery
            try:
                await actor.started()
                task_status.started(actor.ref)
                await actor._loop()
                await actor.stopping()
            except Exception as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    finally:
        slot.incarnation_scope = None
    injected, slot.injected = slot.injected, None
    if injected is not None:  # set only by crash(), which cancelled the incarnation
        raise injected
    if failure is not None:
        raise failure


class ActorHost:
    """Runs successive incarnations of one named actor over one mailbox."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        factory: Callable[[], Actor],
        *,
        mailbox_size: int = 256,
    ) -> None:
        Registry.check_name(name)
        self.registry = registry
        self.name = name
        self.factory = factory
        self.mailbox_size = mailbox_size
        self._slot: Slot | None = None
        self._actor: Actor | None = None

    async def run(self, task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one incarnation; claims the name on first use (``NameTaken`` if held)."""
        if self._slot is None or self._slot.closed:
            self._slot = self.registry._claim(self.name, self.mailbox_size)
        actor = self.factory()
        self._actor = actor
        try:
            await _run_incarnation(self._slot, actor, task_status)
        finally:
            self._actor = None

    def request_stop(self) -> None:
        if self._actor is not None:
            self._actor.request_stop()

    def release(self, detail: str = "stopped") -> None:
        """The actor is gone for good: fail queued asks, free the name."""
        if self._slot is not None:
            self._slot.close(detail)
            self._slot = None

    # Probe for supervision-tree snapshots and chaos.
    def mailbox_depth(self) -> int | None:
        return None if self._slot is None else self._slot.mailbox_depth()

    def crash(self, error: BaseException) -> bool:
        return self._slot is not None and self._slot.crash(error)
