"""Supervision with OTP semantics: child specs, strategies, intensity, chaos hooks."""

from ee.supervisors.bookkeeping import (
    NO_BACKOFF,
    Backoff,
    Restart,
    RestartPlan,
    RestartWindow,
    Strategy,
    plan_restart,
    wants_restart,
)
from ee.supervisors.supervisor import (
    ChildExists,
    ChildSpec,
    NotRunning,
    StartFailed,
    Supervisor,
    SupervisorError,
    SupervisorGaveUp,
    actor_spec,
)
from ee.supervisors.tree import TreeNode

__all__ = [
    "NO_BACKOFF",
    "Backoff",
    "ChildExists",
    "ChildSpec",
    "NotRunning",
    "Restart",
    "RestartPlan",
    "RestartWindow",
    "StartFailed",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorGaveUp",
    "TreeNode",
    "actor_spec",
    "plan_restart",
    "wants_restart",
]
