"""Pure, deterministic placement of deployment replicas on agents, with diagnostics."""

from ee.placement.core import (
    MAX_EXCLUDED_AGENTS,
    MAX_REPLICAS,
    AgentInfo,
    AgentStatus,
    Candidate,
    Constraints,
    ConstraintsError,
    Placement,
    PlacementImpossible,
    Reason,
    Rejection,
    Request,
    place,
)

__all__ = [
    "MAX_EXCLUDED_AGENTS",
    "MAX_REPLICAS",
    "AgentInfo",
    "AgentStatus",
    "Candidate",
    "Constraints",
    "ConstraintsError",
    "Placement",
    "PlacementImpossible",
    "Reason",
    "Rejection",
    "Request",
    "place",
]
