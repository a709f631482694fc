"""The deployment lifecycle as a transition table, and the pure derivation of a
deployment's state from what its replicas report.

::

    pending → placing → starting → running
                 │          │         │
                 └──────────┴─────────┴──▶ failed        (placement or replicas gave up)
    any live state ──undeploy──▶ stopping ⇄ stopped   (back to stopping if a replica
                                                       of a stopped one turns up)

``running → placing`` and ``running → starting`` happen when a replica is lost or
restarts (its agent went offline, the workload failed) and is being replaced;
``failed → placing`` when a tenant's redeploy or a returning agent gives it another go.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

DeploymentState = Literal["pending", "placing", "starting", "running", "failed",
                          "stopping", "stopped"]

LIVE: Final = ("pending", "placing", "starting", "running", "failed")

TRANSITIONS: Final[frozenset[tuple[str, str]]] = frozenset({
    ("pending", "placing"),
    ("placing", "starting"),
    ("placing", "running"),  # every replica adopted already running (after a CP restart)
    ("placing", "failed"),
    ("starting", "running"),
    ("starting", "placing"),
    ("starting", "failed"),
    ("running", "starting"),
    ("running", "placing"),
    ("running", "failed"),
    ("failed", "placing"),
    ("failed", "starting"),
    ("failed", "running"),
    *((s, "stopping") for s in LIVE),
    ("stopping", "stopped"),
    # A stopped deployment found still running somewhere (an agent that was away when
    # it was undeployed comes back): stop it again.
    ("stopped", "stopping"),
})


class IllegalDeploymentTransition(ValueError):
    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"illegal deployment transition {current} -> {target}")


def transition(current: str, target: str) -> str:
    if current == target or (current, target) in TRANSITIONS:
        return target
    raise IllegalDeploymentTransition(current, target)


def derive(desired: str, wanted: int, replica_states: Iterable[str], *,
           gave_up: bool) -> str:
    """The state a deployment is in, given its replicas' states (pure)."""
    states = list(replica_states)
    if desired == "stopped":
        return "stopping" if states else "stopped"
    if gave_up:
        return "failed"
    running = sum(1 for s in states if s == "running")
    if running >= wanted:
        return "running"
    if len(states) < wanted:
        return "placing"
    return "starting"
