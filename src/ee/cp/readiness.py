"""Rehydration readiness (pure): is the CP's rebuilt picture complete enough to decide?

After a restart the CP knows nothing until agents reconnect. It is ready when any of:
the agents seen reach ``quorum_count``; the agents seen among those named in the last
signed checkpoint reach ``quorum_fraction`` of them; or ``settle_timeout_s`` has passed
since start. With no checkpoint and no count there is nothing to wait for.
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


def assess(quorum: Quorum, seen: Collection[str], expected: Collection[str],
           elapsed_s: float) -> Readiness:
    seen_expected = len(set(seen) & set(expected)) if expected else len(seen)
    n_expected = len(expected)

    def result(ready: bool, reason: str) -> Readiness:
        return Readiness(ready, reason, len(seen), n_expected, elapsed_s)

    if quorum.quorum_count is not None and len(seen) >= quorum.quorum_count:
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
