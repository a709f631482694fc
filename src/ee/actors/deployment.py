"""The deployment lifecycle as a transition table, and the pure derivation of a
deployment's state from what its replicas report.

::

    pending → placing → starting → running
       │         │          │         │
       └─────────┴──────────┴─────────┴──▶ failed        (placement or replicas gave up)
    any live state ──undeploy──▶ stopping ⇄ stopped   (back to stopping if a replica
                                                       of a stopped one turns up)

``running → placing`` and ``running → starting`` happen when a replica is lost or
restarts (its agent went offline, the workload failed) and is being replaced;
``failed → placing`` when a tenant's redeploy or a returning agent gives it another go.

Which replicas an agent lists are the deployment's own is decided here too, by two pure
checks the AppActor applies to every listing (a snapshot, a view, a ``deploy_status``):

* ``stray_reason`` — a listing is a replica only on an agent the signed intent placed it
  on (the placement is written to the deployment's manifest before the deploy leaves,
  so a CP that dies between the two still knows) and only under this deployment's own
  app. Anything else is a stray: reported, stopped on that agent, never a member, so it
  can never displace a placed replica or be shown to the tenant.
* ``hash_problem`` — a replica of a placed agent that reports a compose hash other than
  the version's, or claims ``running`` without one, runs code the tenant did not ask
  for: it is marked failed (stopped there, that agent excluded, counted against the
  failure budget) and never counts as running.

And the pure parts of failures and updates: ``failure_text`` (the one line a tenant
reads: phase, exit code, last line), ``timed_out`` (CP-side phase timeouts),
``UPDATE_TRANSITIONS`` (an update's ``rolling → done | rolled_back → failed``) and
``move_plan`` (the next step of a rolling update: wait, surge or in place).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, Literal

DeploymentState = Literal["pending", "placing", "starting", "running", "failed",
                          "stopping", "stopped"]

LIVE: Final = ("pending", "placing", "starting", "running", "failed")

TRANSITIONS: Final[frozenset[tuple[str, str]]] = frozenset({
    ("pending", "placing"),
    # The budget ran out on the first pass (after a CP restart: the failures so far
    # are in the manifest, and an adopted replica turns out failed).
    ("pending", "failed"),
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


class Stray(enum.StrEnum):
    """Why a listed replica is not one of the deployment's (event reason codes)."""

    NOT_PLACED = "NOT_PLACED"  # the intent never placed this deployment on that agent
    WRONG_APP = "WRONG_APP"  # listed under another app than the deployment's


class HashProblem(enum.StrEnum):
    """Why a placed replica does not count as the version's workload."""

    COMPOSE_HASH_MISMATCH = "COMPOSE_HASH_MISMATCH"
    COMPOSE_HASH_MISSING = "COMPOSE_HASH_MISSING"  # claims running, proves nothing


def stray_reason(*, placed: bool, claimed_app: object, app: str) -> Stray | None:
    """None when an agent's listing may be a replica of this deployment (pure)."""
    if claimed_app != app:
        return Stray.WRONG_APP
    if not placed:
        return Stray.NOT_PLACED
    return None


def hash_problem(state: str, reported: str | None, expected: str | None
                 ) -> HashProblem | None:
    """None when a replica's reported compose hash is acceptable (pure).

    A hash, when reported, must be the version's; a replica in flight (pending,
    pulling, building, starting) may not have one yet, a running one must.
    """
    if reported is not None:
        return None if reported == expected else HashProblem.COMPOSE_HASH_MISMATCH
    if state == "running":
        return HashProblem.COMPOSE_HASH_MISSING
    return None


# ---- failures and phase timeouts -------------------------------------------------------

#: How a failure phase reads in a replica's ``error`` (``DeployStatus.phase``).
PHASE_LABELS: Final[dict[str, str]] = {
    "pull": "image pull", "build": "build", "start": "start", "health": "health check",
    "secrets": "secret release", "timeout": "timeout",
}

#: The replica states a CP-side phase timeout applies to (see ``PhaseTimeouts``).
TIMED_STATES: Final = ("pending", "pulling", "building", "starting")


def failure_text(phase: str | None, exit_code: int | None, lines: Iterable[str],
                 error: str | None) -> str:
    """The human ``error`` of a failed replica: where it failed, the exit code, and the
    last line of the failed step's output (or the agent's own message) (pure)."""
    last = next((line.strip() for line in reversed(list(lines)) if line.strip()), None)
    if phase is None:
        return error or last or "failed"
    text = f"{PHASE_LABELS.get(phase, phase)} failed"
    if exit_code is not None:
        text += f" (exit code {exit_code})"
    detail = last or error
    return f"{text}: {detail}" if detail else text


def timed_out(state: str, since: float, now: float, limits: dict[str, float]) -> float | None:
    """The limit a replica in *state* since *since* has overstayed, else None (pure)."""
    limit = limits.get(state)
    if limit is None or now - since < limit:
        return None
    return limit


# ---- updates ---------------------------------------------------------------------------

UpdateState = Literal["rolling", "done", "rolled_back", "failed"]

UPDATE_TRANSITIONS: Final[frozenset[tuple[str, str]]] = frozenset({
    ("rolling", "done"),         # every replica runs the new version
    ("rolling", "rolled_back"),  # a new replica failed its health gate
    ("rolled_back", "failed"),   # the previous version failed too
    ("rolling", "failed"),       # a rollback (explicit) failed its own gate
})


def update_transition(current: str, target: str) -> str:
    if current == target or (current, target) in UPDATE_TRANSITIONS:
        return target
    raise IllegalDeploymentTransition(f"update {current}", target)


def move_plan(*, wanted: int, current: Iterable[str], outdated: Iterable[str],
              free_agent: bool) -> Literal["wait", "surge", "in_place", "stop_old", "none"]:
    """The next step of a rolling update (pure), one replica at a time.

    *current*: the states of the replicas on the deployment's version; *outdated*: those
    of the replicas still on another one. Never fewer serving replicas than before:

    * a new replica is in flight (not yet running, not failed): wait for its health gate;
    * more serving replicas than wanted (a surge replica came up): stop an old one;
    * otherwise move one: onto a free agent first (surge: start new, then stop old),
      else in place on an old replica's agent (stop, start; named volumes kept there).
    """
    cur, old = list(current), list(outdated)
    if not old:
        return "none"
    if any(s in TIMED_STATES for s in cur):
        return "wait"
    running = sum(1 for s in cur if s == "running")
    if running + len(old) > wanted:
        return "stop_old"
    if len(cur) + len(old) > wanted:
        return "wait"  # placed beyond the count and not running: its gate decides
    return "surge" if free_agent else "in_place"
