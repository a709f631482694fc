"""Restart bookkeeping, as pure values: no Trio, no clock, no I/O.

The supervisor feeds these functions ``trio.current_time()`` and a random number and
acts on what they return, so every rule below is testable line by line:

* ``wants_restart``: OTP's restart types. ``permanent`` children are always restarted,
  ``transient`` ones only after an abnormal exit, ``temporary`` ones never.
* ``RestartWindow``: restart intensity over the whole supervisor. Like OTP's
  ``add_restart/1``, each restart is stamped; stamps older than ``period`` seconds fall
  out; when more than ``max_restarts`` stamps remain the supervisor gives up.
  ``max_restarts=3`` therefore allows exactly three restarts in any window of
  ``period`` seconds and the fourth escalates.
* ``plan_restart``: which children a strategy stops (in reverse start order) and starts
  again (in start order). Temporary children stopped because of a sibling are removed,
  not restarted, as OTP does. The plan absorbs the children it stops: if one of them
  had already exited on its own (crashed together with *failed*), that exit is flushed
  rather than counted and planned again, so one plan is one restart in the window.
* ``Backoff``: exponential delay with jitter before a restart, per child; the count of
  consecutive failures resets once the child has run ``reset_after`` seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


def wants_restart(restart: Restart, abnormal: bool) -> bool:
    """Whether a child that exited (abnormally or not) is restarted."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return abnormal
    return False


@attrs.frozen
class RestartWindow:
    """Restart stamps within the last ``period`` seconds."""

    max_restarts: int = attrs.field(validator=attrs.validators.ge(0))
    period: float = attrs.field(validator=attrs.validators.gt(0))
    stamps: tuple[float, ...] = ()

    def record(self, now: float) -> tuple[RestartWindow, bool]:
        """Add a restart at *now*; returns the new window and whether intensity is exceeded."""
        kept = (*(t for t in self.stamps if now - t <= self.period), now)
        return attrs.evolve(self, stamps=kept), len(kept) > self.max_restarts


@attrs.frozen
class RestartPlan:
    stop: tuple[str, ...]  # reverse start order
    start: tuple[str, ...]  # start order
    remove: tuple[str, ...]  # stopped for a sibling and not restarted (temporary)


def plan_restart(
    strategy: Strategy, children: Sequence[tuple[str, Restart]], failed: str
) -> RestartPlan:
    """What to stop and start when *failed* (already exited) is to be restarted."""
    ids = [cid for cid, _ in children]
    if failed not in ids:
        raise ValueError(f"unknown child {failed!r}")
    if strategy is Strategy.ONE_FOR_ONE:
        return RestartPlan(stop=(), start=(failed,), remove=())
    index = ids.index(failed)
    affected = list(children) if strategy is Strategy.ONE_FOR_ALL else list(children[index:])
    siblings = [(cid, r) for cid, r in affected if cid != failed]
    stop = tuple(cid for cid, _ in reversed(siblings))
    start = tuple(cid for cid, r in affected if cid == failed or r is not Restart.TEMPORARY)
    remove = tuple(cid for cid, r in siblings if r is Restart.TEMPORARY)
    return RestartPlan(stop=stop, start=start, remove=remove)


@attrs.frozen
class Backoff:
    """``delay = min(maximum, base * factor**(attempt-1)) * (1 ± jitter)``."""

    base: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    maximum: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    jitter: float = attrs.field(
        default=0.2, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )
    reset_after: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))

    def next_attempt(self, attempts: int, ran_for: float) -> int:
        """Consecutive-failure count after a failure of a child that ran *ran_for* seconds."""
        return 1 if ran_for >= self.reset_after else attempts + 1

    def delay(self, attempt: int, unit_random: float) -> float:
        """Delay before restart number *attempt* (>= 1); *unit_random* is in [0, 1)."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        raw = min(self.maximum, self.base * self.factor ** min(attempt - 1, 64))
        return max(0.0, raw * (1.0 + self.jitter * (2.0 * unit_random - 1.0)))


NO_BACKOFF = Backoff(base=0.0, jitter=0.0)
