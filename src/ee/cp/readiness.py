"""Rehydration readiness (pure): is the CP's rebuilt picture complete enough to decide?

After a restart the CP knows nothing until agents reconnect. It is ready when any of:
the agents seen reach ``quorum_count``; the agents seen among those named in the last
signed checkpoint reach ``quorum_fraction`` of them; or ``settle_timeout_s`` has passed
since start. With no checkpoint and no count there is nothing to wait for.

``Tally`` counts the agents seen as they come back (O(1) each), so asking whether the
CP is ready costs nothing however many agents there are; ``assess`` is the same
decision over whole sets.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import attrs


@attrs.frozen
class Quorum:
    quorum_count: int | None = None
    quorum_fraction: float = 0.8
    settle_timeout_s: float = 60.0


@attrs.frozen
class Readiness:
    ready: bool
    reason: str
    seen: int
    expected: int
    elapsed_s: float

    def to_dict(self) -> dict[str, object]:
        return {"ready": self.ready, "reason": self.reason, "agents_seen": self.seen,
                "agents_expected": self.expected, "elapsed_s": round(self.elapsed_s, 3)}


class Tally:
    """The agents seen since start, and how many of them the checkpoint named."""

    __slots__ = ("expected", "seen", "seen_expected")

    def __init__(self, expected: Collection[str]) -> None:
        self.expected = frozenset(expected)
        self.seen: set[str] = set()
        self.seen_expected = 0

    def see(self, agent_id: str) -> None:
        if agent_id not in self.seen:
            self.seen.add(agent_id)
            if agent_id in self.expected:
                self.seen_expected += 1

    def assess(self, quorum: Quorum, elapsed_s: float) -> Readiness:
        return decide(quorum, len(self.seen),
                      self.seen_expected if self.expected else len(self.seen),
                      len(self.expected), elapsed_s)


def assess(quorum: Quorum, seen: Collection[str], expected: Collection[str],
           elapsed_s: float) -> Readiness:
    seen_expected = len(set(seen) & set(expected)) if expected else len(seen)
    return decide(quorum, len(seen), seen_expected, len(expected), elapsed_s)


def decide(quorum: Quorum, n_seen: int, seen_expected: int, n_expected: int,
           elapsed_s: float) -> Readiness:
    def result(ready: bool, reason: str) -> Readiness:
        return Readiness(ready, reason, n_seen, n_expected, elapsed_s)

    if quorum.quorum_count is not None and n_seen >= quorum.quorum_count:
        return result(True, f"quorum count {quorum.quorum_count} reached")
    if n_expected:
        needed = math.ceil(quorum.quorum_fraction * n_expected)
        if seen_expected >= needed:
            return result(True, f"{seen_expected}/{n_expected} checkpointed agents back")
    elif quorum.quorum_count is None:
        return result(True, "no checkpoint: nothing to wait for")
    if elapsed_s >= quorum.settle_timeout_s:
        return result(True, f"settle timeout {quorum.settle_timeout_s:g}s passed")
    return result(False, "waiting for agents to reconnect")
