"""The agent lifecycle as a transition table (pure; no Trio, no clock).

::

    connecting ──admitted──▶ registered ──snapshot applied──▶ ready
        │                                                     │  ▲
        └──rejected──▶ offline ◀──disconnect / too old── stale ◀┘  │ heartbeat
                          │                                  └──────┘
                          └──reconnect──▶ connecting
    ready | stale ──failed re-attestation──▶ quarantined ──disconnect──▶ offline

Any transition not in ``TRANSITIONS`` raises ``IllegalTransition`` — loudly, so a bug
shows up as an error rather than as an agent in an impossible state. Draining is not a
state but a flag on the agent (an operator's "no new placements"), kept across every
state.

``status_for_age`` turns heartbeat age into the state a live session should be in;
``api_status`` maps a state to the API's ``online | stale | offline | quarantined``.
"""

from __future__ import annotations

import enum
from typing import Final


class AgentState(enum.Enum):
    CONNECTING = "connecting"
    REGISTERED = "registered"
    READY = "ready"
    STALE = "stale"
    OFFLINE = "offline"
    QUARANTINED = "quarantined"


S = AgentState

TRANSITIONS: Final[frozenset[tuple[AgentState, AgentState]]] = frozenset({
    (S.OFFLINE, S.CONNECTING),
    (S.CONNECTING, S.REGISTERED),
    (S.CONNECTING, S.OFFLINE),
    (S.REGISTERED, S.READY),
    (S.REGISTERED, S.OFFLINE),
    (S.READY, S.STALE),
    (S.READY, S.OFFLINE),
    (S.READY, S.QUARANTINED),
    (S.STALE, S.READY),
    (S.STALE, S.OFFLINE),
    (S.STALE, S.QUARANTINED),
    (S.QUARANTINED, S.OFFLINE),
    # A session replaced by a newer one of the same VM re-enters registration.
    (S.READY, S.CONNECTING),
    (S.STALE, S.CONNECTING),
    (S.QUARANTINED, S.CONNECTING),
    (S.REGISTERED, S.CONNECTING),
})


class IllegalTransition(ValueError):
    def __init__(self, current: AgentState, target: AgentState) -> None:
        super().__init__(f"illegal agent transition {current.value} -> {target.value}")
        self.current = current
        self.target = target


def transition(current: AgentState, target: AgentState) -> AgentState:
    """*target* if the table allows ``current → target`` (or they are equal)."""
    if current is target or (current, target) in TRANSITIONS:
        return target
    raise IllegalTransition(current, target)


def status_for_age(current: AgentState, age: float, stale_after: float,
                   offline_after: float) -> AgentState:
    """The state heartbeat *age* calls for, for an agent that is ready or stale."""
    if current not in (S.READY, S.STALE):
        return current
    if age >= offline_after:
        return S.OFFLINE
    if age >= stale_after:
        return S.STALE
    return S.READY


_API: Final[dict[AgentState, str]] = {
    S.CONNECTING: "offline",
    S.REGISTERED: "online",
    S.READY: "online",
    S.STALE: "stale",
    S.OFFLINE: "offline",
    S.QUARANTINED: "quarantined",
}


def api_status(state: AgentState) -> str:
    return _API[state]
