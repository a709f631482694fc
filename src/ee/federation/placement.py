"""Placement across levels: the master picks a datacenter, the dc picks the agent.

The master's AppActor places on its direct agents as always; only when no direct agent
fits and dc CPs are enrolled does it hand the deployment to the federation
(``AppDeps.remote``). ``choose_target`` (pure) then picks a datacenter from what each
``FederatedDatacenterActor`` knows (its online, free, attested agents by node size),
skipping degraded dcs (a dead dc gets no new work) and dcs that already said
``unsatisfiable`` for this deployment.

The intent travels down in the signed desired-state snapshot
(``desired["deployments"][id]``, see ``intent``); the dc's ``DcReconciler`` runs it with
today's AppActors under a reserved account and reports ``placement`` events up
(``check_outcome`` structures them at the master). ``unsatisfiable`` from one dc sends
the intent to the next; none left fails the deployment with every dc's reason codes
(the same ``ee.placement`` codes a direct placement reports).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import attrs

from ee.placement import Constraints, Reason, Request

FEDERATED_ACCOUNT: Final = "federated"  # the dc-side account every intent runs under
OUTCOMES: Final = ("placed", "running", "unsatisfiable", "failed", "stopped")

# Reason codes of a datacenter the master did not choose (besides ee.placement's).
DC_DEGRADED: Final = "DATACENTER_DEGRADED"
DC_NO_CAPACITY: Final = "NO_CAPACITY"
DC_NOT_ALLOWED: Final = "DATACENTER_NOT_ALLOWED"
DC_UNSATISFIABLE: Final = "DATACENTER_UNSATISFIABLE"  # the dc said so (its codes follow)
# A dc reporting on a deployment the master did not give it (event + refusal).
FOREIGN_DEPLOYMENT: Final = "foreign_deployment"


@attrs.frozen
class DcCapacity:
    label: str
    degraded: bool
    free: Mapping[str, int]  # node size -> online, attested, free agents


@attrs.frozen
class Datacenter:
    label: str


@attrs.frozen
class Unsatisfiable:
    codes: Mapping[str, str]  # datacenter -> why it was not chosen


Target = Datacenter | Unsatisfiable


def capacity_of(label: str, degraded: bool,
                agents: Iterable[Mapping[str, Any]]) -> DcCapacity:
    """Free capacity from a dc's agent views (``ee.federation.dc.agent_view``)."""
    free: dict[str, int] = {}
    for view in agents:
        if view.get("status") == "online" and view.get("free") is True \
                and view.get("verdict") in ("pass", "warn"):
            size = str(view.get("node_size"))
            free[size] = free.get(size, 0) + 1
    return DcCapacity(label, degraded, free)


def choose_target(request: Request, dcs: Iterable[DcCapacity],
                  tried: frozenset[str] = frozenset()) -> Target:
    """The datacenter with the most fitting free agents (then by label), or why none."""
    c = request.constraints
    codes: dict[str, str] = {}
    best: tuple[int, str] | None = None
    for dc in sorted(dcs, key=lambda d: d.label):
        if c.datacenter is not None and c.datacenter != dc.label:
            codes[dc.label] = DC_NOT_ALLOWED
        elif dc.label in tried:
            codes[dc.label] = DC_UNSATISFIABLE
        elif dc.degraded:
            codes[dc.label] = DC_DEGRADED
        else:
            fit = dc.free.get(c.node_size, 0) if c.node_size else sum(dc.free.values())
            if fit < request.replicas:
                codes[dc.label] = DC_NO_CAPACITY
            elif best is None or fit > best[0]:
                best = (fit, dc.label)
    if best is not None:
        return Datacenter(best[1])
    return Unsatisfiable(codes)


def intent(app_key: str, version: Mapping[str, Any], replicas: int,
           constraints: Constraints, datacenter: str,
           tried: Iterable[str] = ()) -> dict[str, Any]:
    """One deployment intent as the snapshot carries it."""
    return {"app": app_key, "datacenter": datacenter, "version": dict(version),
            "replicas": replicas, "desired": "running", "tried": sorted(tried),
            "constraints": {"node_size": constraints.node_size, "gpu": constraints.gpu,
                            "exclude_agents": sorted(constraints.exclude_agents)}}


@attrs.frozen
class Outcome:
    deployment_id: str
    outcome: Literal["placed", "running", "unsatisfiable", "failed", "stopped"]
    reasons: Mapping[str, int]
    running: int
    error: str | None = None


class OutcomeError(ValueError):
    pass


def check_outcome(data: Mapping[str, Any]) -> Outcome:
    """A ``placement`` event's data, structured (``OutcomeError`` when malformed)."""
    dep_id, outcome = data.get("deployment_id"), data.get("outcome")
    reasons, running, error = data.get("reasons"), data.get("running"), data.get("error")
    if not isinstance(dep_id, str) or not 0 < len(dep_id) <= 120:
        raise OutcomeError("deployment_id must be a string")
    if outcome not in OUTCOMES:
        raise OutcomeError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if not isinstance(reasons, dict) or len(reasons) > 32 or not all(
            isinstance(k, str) and len(k) <= 40 and isinstance(v, int)
            and not isinstance(v, bool) and v >= 0 for k, v in reasons.items()):
        raise OutcomeError("reasons must map reason codes to counts")
    if not isinstance(running, int) or isinstance(running, bool) or not 0 <= running <= 1000:
        raise OutcomeError("running must be a count")
    if error is not None and not isinstance(error, str):
        raise OutcomeError("error must be a string or null")
    return Outcome(dep_id, outcome, dict(reasons), running,
                   None if error is None else error[:500])


def reason_counts(placement: Mapping[str, Any]) -> dict[str, int]:
    """Reason code -> rejected agents, from a ``Placement.to_dict`` answer."""
    out: dict[str, int] = {}
    for rejection in placement.get("rejected") or ():
        for reason in rejection.get("reasons") or ():
            out[str(reason)] = out.get(str(reason), 0) + 1
    return ordered(out)


def ordered(counts: Mapping[str, int]) -> dict[str, int]:
    """Reason counts in ``ee.placement.Reason`` order (its reporting order)."""
    order = {r.value: i for i, r in enumerate(Reason)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
