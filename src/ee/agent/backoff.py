"""Backoff decisions, pure (no Trio): fed the clock and a jitter draw from outside.

:func:`backoff_delay` is bounded exponential backoff with *equal jitter*: the ceiling
doubles from ``base`` up to ``cap`` with each consecutive failure, and the delay is
drawn from the upper half of the ceiling, so a fleet that lost its CP at once spreads
its reconnects out, while no agent ever retries in a hot loop. :class:`ReconnectPolicy`
counts consecutive failed attempts for the session loop and says when to give up.
"""

from __future__ import annotations

import attrs

__all__ = ["GiveUp", "ReconnectPolicy", "backoff_delay"]


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """The delay after failed attempt number *attempt* (1-based); *jitter* in [0, 1].

    The ceiling is ``min(cap, base * 2**(attempt-1))``; the delay lies in
    ``[ceiling/2, ceiling]``.
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    jitter = min(1.0, max(0.0, jitter))
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 64))
    return ceiling / 2 + ceiling / 2 * jitter


@attrs.frozen
class GiveUp:
    reason: str


@attrs.define
class ReconnectPolicy:
    """Counts consecutive failed attempts and decides the next wait (see module doc)."""

    base: float
    cap: float
    max_attempts: int | None = None
    unreachable_after: float | None = None
    last_reached: float = 0.0
    failures: int = 0

    def reached(self, now: float) -> None:
        """The CP was reached (a session was registered) at *now*."""
        self.failures = 0
        self.last_reached = now

    def failed(self, now: float, jitter: float) -> float | GiveUp:
        """One more failed attempt: the delay before the next one, or :class:`GiveUp`."""
        self.failures += 1
        if self.max_attempts is not None and self.failures >= self.max_attempts:
            return GiveUp(f"{self.failures} consecutive connection attempts failed")
        unreachable = self.check_unreachable(now)
        if unreachable is not None:
            return unreachable
        return backoff_delay(self.failures, self.base, self.cap, jitter)

    def check_unreachable(self, now: float) -> GiveUp | None:
        if self.unreachable_after is not None and now - self.last_reached >= (
            self.unreachable_after
        ):
            return GiveUp(f"the CP was not reached for {now - self.last_reached:.0f} s")
        return None
