"""Supervisors with Erlang/OTP semantics on Trio.

Theory of operation (after OTP's ``supervisor.erl``):

* A supervisor owns an ordered list of children, each described by a ``ChildSpec``
  (id, start function, restart type, shutdown grace). Children run as tasks in the
  supervisor's own nursery; nothing a child starts can outlive the supervisor.
* **Start**: children start one by one in spec order. A child is *started* when it
  calls ``task_status.started()``; an exception before that is a start failure. At
  init a start failure stops the children already started (reverse order) and the
  supervisor fails with ``StartFailed`` — as ``supervisor:init`` fails in OTP.
* **Exit**: a child that exits on its own sends an event to the supervisor's control
  loop (one task, so decisions are serialised like OTP's single supervisor process).
  The restart type says whether it is restarted (``bookkeeping.wants_restart``); the
  strategy says which siblings go with it (``bookkeeping.plan_restart``). A sibling the
  plan stops that had already exited on its own has its exit flushed (OTP's
  ``terminate_children``): children that crash together are one restart. Each restart
  is counted in one window for the whole supervisor; the restart that exceeds
  ``max_restarts`` within ``period`` seconds makes the supervisor stop all its
  children and raise ``SupervisorGaveUp`` to *its* parent, which treats that as an
  abnormal exit of a child — escalation, level by level, until some supervisor's
  intensity absorbs it or the root fails.
* Unlike OTP, restarts wait an exponential, jittered backoff (per child, reset after a
  healthy period) so a crash loop does not spin; the control loop stays responsive
  while a restart waits (it is a timer task, not a sleep in the loop).
* **Stop**: in reverse start order, each child is asked to stop through its spec's
  ``stop`` trigger and given ``shutdown`` seconds (``math.inf`` for sub-supervisors,
  as OTP advises ``infinity``); then its scope is cancelled. Cancellation is the last
  resort, only for children we own. A child leaving for good gets its ``release``
  hook called exactly once (an actor closes its mailbox and frees its name then).
* **Dynamic children** (one per agent, thousands) are added with ``start_child`` from
  any task and behave like static ones (OTP's ``simple_one_for_one`` is the
  one_for_one case). A restarted supervisor starts again from its static specs and
  then its ``populate`` hook, which re-adds dynamic children from their sources (the
  CP's apps supervisor reloads one AppActor per signed app manifest this way).
* **Chaos**: ``crash(name)`` injects an exception into a named child anywhere below:
  actors get it raised inside their own task (failing the ask they were answering),
  other children have their scope cancelled and the injected exception recorded as
  their exit reason.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from ee.runtime import ActorHost, ChaosCrash, Registry
from ee.runtime.actor import Actor
from ee.supervisors.bookkeeping import (
    Backoff,
    Restart,
    RestartWindow,
    Strategy,
    plan_restart,
    wants_restart,
)
from ee.supervisors.tree import TreeNode

log = logging.getLogger("ee.supervisors")

StartFn = Callable[[trio.TaskStatus[Any]], Awaitable[object]]


class Probe(Protocol):
    def mailbox_depth(self) -> int | None: ...


class SupervisorError(Exception):
    pass


class StartFailed(SupervisorError):
    def __init__(self, supervisor: str, child: str, cause: BaseException) -> None:
        super().__init__(f"supervisor {supervisor!r}: child {child!r} failed to start: {cause!r}")
        self.supervisor = supervisor
        self.child = child
        self.cause = cause


class SupervisorGaveUp(SupervisorError):
    """Restart intensity exceeded: the supervisor stopped its children and failed."""

    def __init__(self, supervisor: str, child: str, cause: BaseException | None) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: restart intensity exceeded "
            f"(last: child {child!r} exited with {cause!r})"
        )
        self.supervisor = supervisor
        self.child = child
        self.cause = cause


class ChildExists(SupervisorError):
    def __init__(self, supervisor: str, child: str) -> None:
        super().__init__(f"supervisor {supervisor!r} already has a child {child!r}")


class NotRunning(SupervisorError):
    def __init__(self, supervisor: str) -> None:
        super().__init__(f"supervisor {supervisor!r} is not running")


def _check_shutdown(_: object, __: object, value: float) -> None:
    if value < 0:
        raise ValueError("shutdown grace must be >= 0 seconds (math.inf for infinity)")


@attrs.frozen
class ChildSpec:
    """What a supervisor needs to run one child.

    ``start(task_status)`` runs the child and calls ``task_status.started(value)`` once
    it is up. ``stop()`` (optional) asks it to finish gracefully; it then gets
    ``shutdown`` seconds before its scope is cancelled. ``release()`` (optional) runs
    once when the child leaves the supervisor for good.
    """

    id: str
    start: StartFn
    restart: Restart = Restart.PERMANENT
    shutdown: float = attrs.field(default=5.0, validator=_check_shutdown)
    stop: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    kind: str = "worker"
    probe: Any = None


def actor_spec(
    registry: Registry,
    name: str,
    factory: Callable[[], Actor],
    *,
    restart: Restart = Restart.PERMANENT,
    shutdown: float = 5.0,
    mailbox_size: int = 256,
) -> ChildSpec:
    """A child spec running actor *name* (fresh object from *factory* per incarnation)."""
    host = ActorHost(registry, name, factory, mailbox_size=mailbox_size)
    return ChildSpec(
        id=name,
        start=host.run,
        restart=restart,
        shutdown=shutdown,
        stop=host.request_stop,
        release=host.release,
        kind="actor",
        probe=host,
    )


class _State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Child:
    __slots__ = (
        "attempts",
        "deliberate",
        "done",
        "incarnation",
        "injected",
        "last_error",
        "restarts",
        "scope",
        "spec",
        "started_at",
        "state",
        "value",
    )

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.state = _State.STARTING
        self.restarts = 0
        self.attempts = 0
        self.last_error: str | None = None
        self.scope: trio.CancelScope | None = None
        self.done = trio.Event()
        self.done.set()
        self.deliberate = False
        self.injected: BaseException | None = None
        self.started_at = 0.0
        self.incarnation = 0
        self.value: object = None


class _StartedProbe:
    """Wraps a TaskStatus to learn whether the child reached ``started()``."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.called = False

    def started(self, value: object = None) -> None:
        self.called = True
        self.inner.started(value)


@attrs.frozen
class _Exited:
    child: _Child
    incarnation: int
    error: BaseException | None


@attrs.frozen
class _RestartDue:
    ids: tuple[str, ...]


class _Stop:
    pass


def _describe(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return repr(error)


class Supervisor:
    """A supervisor; run it with ``await nursery.start(sup.run)`` or as a child spec."""

    def __init__(
        self,
        name: str,
        children: list[ChildSpec] | tuple[ChildSpec, ...] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        period: float = 5.0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        populate: Callable[[Supervisor], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.populate = populate
        self.strategy = strategy
        self.static_specs = tuple(children)
        ids = [s.id for s in self.static_specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"supervisor {name!r}: duplicate child ids in {ids}")
        self.max_restarts = max_restarts
        self.period = period
        self.backoff = backoff if backoff is not None else Backoff()
        self.rng = rng if rng is not None else random.Random()
        self._children: dict[str, _Child] = {}
        self._window = RestartWindow(max_restarts, period)
        self._nursery: trio.Nursery | None = None
        self._events_tx, self._events_rx = trio.open_memory_channel[object](math.inf)
        self.total_restarts = 0

    # ----- public API -------------------------------------------------------------

    def as_child(self, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        """This supervisor as a child of another (shutdown grace: infinity)."""
        return ChildSpec(
            id=self.name,
            start=self.run,
            restart=restart,
            shutdown=math.inf,
            stop=self.request_stop,
            kind="supervisor",
            probe=self,
        )

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def child_ids(self) -> list[str]:
        return list(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def request_stop(self) -> None:
        """Graceful stop trigger: stop children in reverse order, then return from run()."""
        self._events_tx.send_nowait(_Stop())

    async def start_child(self, spec: ChildSpec) -> object:
        """Add and start a dynamic child; returns what it passed to ``started()``."""
        if self._nursery is None:
            raise NotRunning(self.name)
        if spec.id in self._children:
            raise ChildExists(self.name, spec.id)
        child = _Child(spec)
        self._children[spec.id] = child
        try:
            return await self._start(child)
        except BaseException as exc:
            self._remove(child)
            if isinstance(exc, Exception):
                raise StartFailed(self.name, spec.id, exc) from exc
            raise

    async def terminate_child(self, child_id: str) -> bool:
        """Stop a child gracefully and remove it; False if there was none."""
        child = self._children.get(child_id)
        if child is None:
            return False
        await self._stop_child(child)
        self._remove(child)
        return True

    def find(self, name: str) -> tuple[Supervisor, str] | None:
        """The supervisor (this one or below) that has a child called *name*."""
        if name in self._children:
            return self, name
        for child in self._children.values():
            if isinstance(child.spec.probe, Supervisor):
                found = child.spec.probe.find(name)
                if found is not None:
                    return found
        return None

    def started_value(self, name: str) -> object:
        """What child *name* (anywhere below) passed to ``started()`` (None if absent)."""
        found = self.find(name)
        if found is None:
            return None
        owner, cid = found
        return owner._children[cid].value

    def crash(self, name: str, error: BaseException | None = None) -> bool:
        """Chaos hook: inject *error* (default ``ChaosCrash``) into child *name* below."""
        found = self.find(name)
        if found is None:
            return False
        owner, cid = found
        child = owner._children[cid]
        if child.state is not _State.RUNNING:
            return False
        error = error if error is not None else ChaosCrash(f"chaos: crash {name}")
        probe = child.spec.probe
        if isinstance(probe, ActorHost):
            return probe.crash(error)
        if child.scope is None:
            return False
        child.injected = error
        child.scope.cancel()
        return True

    def snapshot(self) -> TreeNode:
        return TreeNode(
            name=self.name,
            kind="supervisor",
            state="running" if self.running else "stopped",
            restarts=self.total_restarts,
            strategy=self.strategy.value,
            children=self.snapshot_children(),
        )

    def snapshot_children(self) -> tuple[TreeNode, ...]:
        nodes = []
        for child in self._children.values():
            probe = child.spec.probe
            if isinstance(probe, Supervisor):
                sub = probe.snapshot()
                nodes.append(
                    attrs.evolve(
                        sub,
                        state=child.state.value,
                        restarts=child.restarts,
                        last_error=child.last_error,
                    )
                )
                continue
            depth = probe.mailbox_depth() if probe is not None else None
            nodes.append(
                TreeNode(
                    name=child.spec.id,
                    kind=child.spec.kind,
                    state=child.state.value,
                    restarts=child.restarts,
                    last_error=child.last_error,
                    mailbox_depth=depth,
                )
            )
        return tuple(nodes)

    def mailbox_depth(self) -> int | None:
        return None

    # ----- running ----------------------------------------------------------------

    async def run(
        self, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the static children, supervise them until stopped, then stop them."""
        if self._nursery is not None:
            raise SupervisorError(f"supervisor {self.name!r} is already running")
        self._children = {}
        self._window = RestartWindow(self.max_restarts, self.period)
        self._events_tx, self._events_rx = trio.open_memory_channel[object](math.inf)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    failure = await self._start_static()
                    if failure is None and self.populate is not None:
                        # Dynamic children rebuilt from their sources, at every (re)start.
                        await self.populate(self)
                    if failure is None:
                        task_status.started(self)
                        failure = await self._control_loop()
                finally:
                    # Graceful, reverse-order stop; if we are being cancelled ourselves,
                    # the first await raises and the nursery cancels what is left.
                    await self._stop_all()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            for child in list(self._children.values()):
                self._remove(child)
        if failure is not None:
            raise failure

    async def _start_static(self) -> BaseException | None:
        for spec in self.static_specs:
            child = _Child(spec)
            self._children[spec.id] = child
            try:
                await self._start(child)
            except Exception as exc:
                log.error(
                    "supervisor %s: child %s failed to start: %s",
                    self.name,
                    spec.id,
                    _describe(exc),
                )
                return StartFailed(self.name, spec.id, exc)
        return None

    async def _control_loop(self) -> BaseException | None:
        async for event in self._events_rx:
            if isinstance(event, _Stop):
                return None
            if isinstance(event, _Exited):
                gave_up = await self._on_exit(event)
            elif isinstance(event, _RestartDue):
                gave_up = await self._restart(event.ids)
            else:  # pragma: no cover - internal events only
                raise AssertionError(f"unknown supervisor event {event!r}")
            if gave_up is not None:
                return gave_up
        return None

    async def _start(self, child: _Child) -> object:
        assert self._nursery is not None
        child.state = _State.STARTING
        child.incarnation += 1
        child.value = await self._nursery.start(self._child_task, child, child.incarnation)
        child.state = _State.RUNNING
        child.started_at = trio.current_time()
        return child.value

    async def _child_task(
        self, child: _Child, incarnation: int, task_status: trio.TaskStatus[Any]
    ) -> None:
        probe = _StartedProbe(task_status)
        child.done = trio.Event()
        child.deliberate = False
        child.injected = None
        error: BaseException | None = None
        try:
            with trio.CancelScope() as scope:
                child.scope = scope
                try:
                    await child.spec.start(probe)
                except Exception as exc:
                    if not probe.called:
                        raise
                    error = exc
            if scope.cancelled_caught and child.injected is not None:
                error = child.injected
        finally:
            child.scope = None
            child.done.set()
        if not probe.called:
            raise SupervisorError(f"child {child.spec.id!r} returned before calling started()")
        if child.deliberate or incarnation != child.incarnation:
            return
        self._events_tx.send_nowait(_Exited(child, incarnation, error))

    async def _on_exit(self, event: _Exited) -> BaseException | None:
        child = event.child
        if self._children.get(child.spec.id) is not child or event.incarnation != child.incarnation:
            return None
        abnormal = event.error is not None
        if abnormal:
            assert event.error is not None
            child.last_error = _describe(event.error)
            log.error(
                "supervisor %s: child %s crashed: %s", self.name, child.spec.id,
                child.last_error, exc_info=event.error,
            )
        if child.state is _State.RESTARTING:
            # A sibling's restart plan already stopped this child and will start it
            # again: its own exit is flushed, as OTP's terminate_children does, so
            # children that die together count as one restart.
            return None
        child.state = _State.STOPPED
        if not wants_restart(child.spec.restart, abnormal):
            self._remove(child)
            return None
        return await self._schedule_restart(child, event.error)

    async def _schedule_restart(
        self, child: _Child, error: BaseException | None
    ) -> BaseException | None:
        now = trio.current_time()
        self._window, exceeded = self._window.record(now)
        if exceeded:
            log.error(
                "supervisor %s: restart intensity exceeded (%d in %gs); giving up",
                self.name,
                self.max_restarts,
                self.period,
            )
            return SupervisorGaveUp(self.name, child.spec.id, error)
        plan = plan_restart(
            self.strategy,
            [(c.spec.id, c.spec.restart) for c in self._children.values()],
            child.spec.id,
        )
        for cid in plan.stop:
            sibling = self._children[cid]
            await self._stop_child(sibling)
            sibling.state = _State.RESTARTING
        for cid in plan.remove:
            self._remove(self._children[cid])
        child.attempts = self.backoff.next_attempt(child.attempts, now - child.started_at)
        delay = self.backoff.delay(child.attempts, self.rng.random())
        for cid in plan.start:
            self._children[cid].state = _State.RESTARTING
        assert self._nursery is not None
        self._nursery.start_soon(self._restart_after, delay, plan.start)
        return None

    async def _restart_after(self, delay: float, ids: tuple[str, ...]) -> None:
        await trio.sleep(delay)
        self._events_tx.send_nowait(_RestartDue(ids))

    async def _restart(self, ids: tuple[str, ...]) -> BaseException | None:
        for position, cid in enumerate(ids):
            child = self._children.get(cid)
            if child is None or child.state is not _State.RESTARTING:
                continue
            child.restarts += 1
            self.total_restarts += 1
            try:
                await self._start(child)
            except Exception as exc:
                child.state = _State.STOPPED
                child.last_error = _describe(exc)
                log.warning(
                    "supervisor %s: restart of %s failed: %s", self.name, cid, child.last_error
                )
                now = trio.current_time()
                self._window, exceeded = self._window.record(now)
                if exceeded:
                    return SupervisorGaveUp(self.name, cid, exc)
                rest = ids[position:]
                child.attempts += 1
                for other in rest:
                    if other in self._children:
                        self._children[other].state = _State.RESTARTING
                assert self._nursery is not None
                self._nursery.start_soon(
                    self._restart_after,
                    self.backoff.delay(child.attempts, self.rng.random()),
                    rest,
                )
                return None
        return None

    async def _stop_child(self, child: _Child) -> None:
        if child.done.is_set():
            return
        child.deliberate = True
        child.state = _State.STOPPING
        grace = child.spec.shutdown
        if child.spec.stop is not None and grace > 0:
            child.spec.stop()
            with trio.move_on_after(grace):
                await child.done.wait()
        if not child.done.is_set():
            if child.scope is not None:
                child.scope.cancel()
            await child.done.wait()
        child.state = _State.STOPPED

    async def _stop_all(self) -> None:
        for child in reversed(list(self._children.values())):
            await self._stop_child(child)

    def _remove(self, child: _Child) -> None:
        if self._children.get(child.spec.id) is child:
            del self._children[child.spec.id]
        child.state = _State.STOPPED
        if child.spec.release is not None:
            child.spec.release()
