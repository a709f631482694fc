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

What the tenant reads at the master (``MasterFederation.view``) is shaped like a direct
deployment's: the dc's ``placement`` event carries its local deployment's replicas
(agent, VM, state, compose hash, node size, error, URL; at most ``MAX_REPLICAS``, strings
capped), version, update, history and failures. The master's dc actor refuses a
report naming an agent that dc never reported as its own (``foreign_agents``: nothing
applied), and ``shown_replicas`` fails a replica whose compose hash is not its version's
as the intent says (shown failed, never counted running or billed).

Updates go down the same way: ``PATCH``/rollback at the master (``updated_intent``)
sets the intent's version, replicas and previous version and bumps its ``generation``;
the dc applies a generation it has not applied yet with its AppActor's own
``UpdateDeployment``/``RollbackDeployment`` (the rolling update of a direct deployment)
and reports progress like any outcome.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import attrs

from ee.actors.deployment import hash_problem
from ee.cp.registration import MAX_URL, agent_url
from ee.placement import MAX_REPLICAS, Constraints, Reason, Request

FEDERATED_ACCOUNT: Final = "federated"  # the dc-side account every intent runs under
OUTCOMES: Final = ("placed", "running", "unsatisfiable", "failed", "stopped")

# Reason codes of a datacenter the master did not choose (besides ee.placement's).
DC_DEGRADED: Final = "DATACENTER_DEGRADED"
DC_NO_CAPACITY: Final = "NO_CAPACITY"
DC_NOT_ALLOWED: Final = "DATACENTER_NOT_ALLOWED"
DC_UNSATISFIABLE: Final = "DATACENTER_UNSATISFIABLE"  # the dc said so (its codes follow)
# A dc reporting on a deployment the master did not give it (event + refusal).
FOREIGN_DEPLOYMENT: Final = "foreign_deployment"
# A dc's ``unsatisfiable`` for a deployment it placed, then could not keep placed (a
# replica failed and no agent there fits any more) for ``reconcile.STUCK_AFTER_S``:
# the count of replicas it cannot place. The master re-routes it when another dc fits,
# else leaves it there (its dc keeps trying, as a direct deployment would).
UNPLACED_REPLICAS: Final = "UNPLACED_REPLICAS"


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
           tried: Iterable[str] = (), created_at: float = 0.0) -> dict[str, Any]:
    """One deployment intent as the snapshot carries it."""
    return {"app": app_key, "datacenter": datacenter, "version": dict(version),
            "replicas": replicas, "desired": "running", "tried": sorted(tried),
            "constraints": {"node_size": constraints.node_size, "gpu": constraints.gpu,
                            "exclude_agents": sorted(constraints.exclude_agents)},
            "created_at": created_at, "generation": 0, "change": "create",
            "previous_version": None, "previous": None,
            "history": [{"version": version["version"], "from": created_at, "to": None}]}


SLIM_FIELDS: Final = ("version", "compose_hash", "expose_port", "health_path")


def slimmed(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """A stopped intent without its workload (compose, build context, env values): what
    the view, the history and the dc's stop still need, so stopped deployments do not
    fill the signed desired state (which is capped: a full one refuses new placements
    for everyone). None when there is nothing to drop."""
    version = doc.get("version")
    if doc.get("desired") != "stopped" or not isinstance(version, Mapping):
        return None
    slim = {k: version[k] for k in SLIM_FIELDS if k in version}
    slim["compose"] = ""  # what an intent's version must carry; never run when stopped
    if slim == dict(version):
        return None
    return {**doc, "version": slim}


MAX_HISTORY = 50  # eras an intent keeps (as the AppActor does)


def iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def updated_intent(doc: Mapping[str, Any], version: Mapping[str, Any] | None,
                   replicas: int | None, reason: Literal["update", "rollback"],
                   now: float) -> dict[str, Any] | str:
    """*doc* moved to *version* (a version spec, None: keep) and/or *replicas*: the new
    intent, ``"unchanged"``, or the refusal code a direct deployment would answer."""
    if doc.get("desired") != "running" or doc.get("unplaced") is not None:
        return "stopped"
    old = doc["version"]
    new = dict(version) if version is not None else old
    count = replicas if replicas is not None else int(doc["replicas"])
    if new.get("version") == old.get("version") and count == doc["replicas"]:
        return "unchanged"
    moved = new.get("version") != old.get("version")
    out = {**doc, "replicas": count, "generation": int(doc.get("generation") or 0) + 1,
           "change": reason, "moved": moved}  # moved: this change sets a new version
    if moved:
        eras = [{**e, "to": now} if e.get("to") is None else e
                for e in doc.get("history") or ()]
        out.update(version=new, previous_version=old.get("version"),
                   previous={"version": old.get("version"),
                             "compose_hash": old.get("compose_hash")},
                   history=[*eras, {"version": new["version"], "from": now,
                                    "to": None}][-MAX_HISTORY:])
    return out


def intent_hashes(doc: Mapping[str, Any]) -> dict[str, str]:
    """Version -> compose hash, of the versions an intent's replicas may run (its own,
    and during an update the one it moves from)."""
    out: dict[str, str] = {}
    for v in (doc.get("previous"), doc.get("version")):
        if isinstance(v, Mapping) and isinstance(v.get("version"), str) \
                and isinstance(v.get("compose_hash"), str):
            out[v["version"]] = v["compose_hash"]
    return out


REPLICA_STATES: Final = ("pending", "pulling", "building", "starting", "running",
                          "failed", "stopping", "stopped")
UPDATE_STATES: Final = ("rolling", "done", "rolled_back", "failed")
MAX_TEXT: Final = 300  # an error / failure line as the master keeps it
MAX_LINES: Final = 20  # a failure's last lines


@attrs.frozen
class ReportedReplica:
    """One replica of a dc's local deployment, as the dc reports it."""

    agent_id: str
    state: str
    version: str
    compose_hash: str | None = None
    vm_name: str | None = None
    node_size: str | None = None
    error: str | None = None
    # Where the replica's agent answers (its HTTP API, proxying to the workload), as
    # the dc says: the dc's word, checked only for shape (``reported_url``).
    url: str | None = None


@attrs.frozen
class Outcome:
    deployment_id: str
    outcome: Literal["placed", "running", "unsatisfiable", "failed", "stopped"]
    reasons: Mapping[str, int]
    running: int
    error: str | None = None
    # The dc's local deployment (absent in an older dc's report: nothing to show).
    version: str | None = None
    replicas: tuple[ReportedReplica, ...] = ()
    failure: Mapping[str, Any] | None = None
    failures: int = 0
    update: Mapping[str, Any] | None = None
    generation: int = 0  # the intent generation the dc has applied


class OutcomeError(ValueError):
    pass


def _text(value: object, what: str, cap: int, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise OutcomeError(f"{what} must be a string")
    return value[:cap]


def _count(value: object, what: str, top: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise OutcomeError(f"{what} must be a count")
    return value


def reported_url(value: object) -> str | None:
    """A replica URL as a dc reports it, or None. It is the dc's word (the master cannot
    check that the agent answers there, or at all): only its shape is checked, as a
    registration checks an agent's own (``registration.agent_url``: a string, http:// or
    https://, at most ``MAX_URL`` printable ASCII characters, no user info, query or
    fragment). Anything else is dropped to None, never refused: the rest of the report
    still counts."""
    if not isinstance(value, str) or len(value) > MAX_URL:
        return None
    try:
        return agent_url(value)
    except ValueError:
        return None


def _replicas(value: object) -> tuple[ReportedReplica, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_REPLICAS:
        raise OutcomeError(f"replicas must be a list of at most {MAX_REPLICAS}")
    out: list[ReportedReplica] = []
    for r in value:
        if not isinstance(r, dict):
            raise OutcomeError("a replica must be an object")
        agent_id = _text(r.get("agent_id"), "replica agent_id", 200, optional=False)
        state = r.get("state")
        if state not in REPLICA_STATES:
            raise OutcomeError(f"replica state must be one of {', '.join(REPLICA_STATES)}")
        if not agent_id or len(str(r.get("agent_id"))) > 200:
            raise OutcomeError("replica agent_id must be 1..200 characters")
        out.append(ReportedReplica(
            agent_id, str(state),
            _text(r.get("version"), "replica version", 120, optional=False) or "",
            _text(r.get("compose_hash"), "replica compose_hash", 100),
            _text(r.get("vm_name"), "replica vm_name", 120),
            _text(r.get("node_size"), "replica node_size", 40),
            _text(r.get("error"), "replica error", MAX_TEXT),
            reported_url(r.get("url"))))
    if len({r.agent_id for r in out}) != len(out):
        raise OutcomeError("replicas must name each agent once")
    return tuple(out)


def _failure(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OutcomeError("failure must be an object or null")
    lines = value.get("lines") or []
    code = value.get("exit_code")
    if not isinstance(lines, list) or (code is not None and (
            not isinstance(code, int) or isinstance(code, bool))):
        raise OutcomeError("failure needs lines (a list) and an integer exit_code")
    return {"phase": _text(value.get("phase"), "failure phase", 40),
            "exit_code": code,
            "lines": [_text(x, "failure line", MAX_TEXT, optional=False)
                      for x in lines[-MAX_LINES:]],
            "agent_id": _text(value.get("agent_id"), "failure agent_id", 200),
            "version": _text(value.get("version"), "failure version", 120)}


def _update(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("state") not in UPDATE_STATES \
            or value.get("reason") not in ("update", "rollback"):
        raise OutcomeError("update must be an object with a known state and reason")
    return {"state": value["state"], "reason": value["reason"],
            "from_version": _text(value.get("from_version"), "update from_version", 120,
                                  optional=False),
            "to_version": _text(value.get("to_version"), "update to_version", 120,
                                optional=False),
            "started_at": _text(value.get("started_at"), "update started_at", 40),
            "finished_at": _text(value.get("finished_at"), "update finished_at", 40),
            "error": _text(value.get("error"), "update error", MAX_TEXT)}


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
                   None if error is None else error[:500],
                   _text(data.get("version"), "version", 120),
                   _replicas(data.get("replicas")), _failure(data.get("failure")),
                   _count(data.get("failures") or 0, "failures", 1000),
                   _update(data.get("update")),
                   _count(data.get("generation") or 0, "generation", 2**31))


def foreign_replicas(outcome: Outcome, agents: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Replica agents the reporting dc never reported as its own, or reported with
    another node size (the report must not bill a size the agent is not)."""
    return [r.agent_id[:80] for r in outcome.replicas
            if r.agent_id not in agents
            or (r.node_size is not None and r.node_size != agents[r.agent_id].get("node_size"))]


def sized(outcome: Outcome, agents: Mapping[str, Mapping[str, Any]]) -> Outcome:
    """*outcome* with each replica's node size as the dc reported the agent (what
    billing meters; ``foreign_replicas`` passed first)."""
    return attrs.evolve(outcome, replicas=tuple(
        attrs.evolve(r, node_size=str(agents[r.agent_id].get("node_size")))
        for r in outcome.replicas))


AGENT_OFFLINE: Final = "agent_offline"  # a replica on an agent its dc says is gone
NODE_SIZE_MISMATCH: Final = "node_size_mismatch"  # not the size the tenant asked for


def shown_replicas(outcome: Outcome, hashes: Mapping[str, str],
                   agents: Mapping[str, Mapping[str, Any]] | None = None,
                   node_size: str | None = None) -> list[dict[str, Any]]:
    """The replicas as a direct deployment's view lists them. A replica whose compose
    hash is not the one the intent gives its version is failed (never counted), and so
    is one on an agent the dc now reports offline or no longer reports (*agents*: the
    dc's agent views; None: not checked), as a direct deployment's replica on an offline
    agent is, and one on another node size than the tenant asked for (*node_size*, the
    intent's constraint: it would bill a size the tenant never chose). A replica shown
    failed or stopped has no URL (nothing of the deployment answers there); the others
    carry the URL their dc reported (``reported_url``)."""
    out = []
    for r in sorted(outcome.replicas, key=lambda r: r.agent_id):
        state, error = r.state, r.error
        expected = hashes.get(r.version)
        problem = hash_problem(r.state, r.compose_hash, expected)
        status = None if agents is None else \
            (agents.get(r.agent_id) or {}).get("status", "offline")
        if r.state not in ("failed", "stopped") and (expected is None or problem):
            state = "failed"
            error = (f"{problem.value if problem else 'compose_hash_mismatch'}: reported "
                     f"{r.compose_hash or 'none'}, version {r.version[:80]} is "
                     f"{expected or 'not the intent'}")
        elif r.state not in ("failed", "stopped") and status == "offline":
            state = "failed"
            error = f"{AGENT_OFFLINE}: the datacenter reports agent {r.agent_id[:80]} offline"
        elif r.state not in ("failed", "stopped") and node_size is not None \
                and r.node_size != node_size:
            state = "failed"
            error = (f"{NODE_SIZE_MISMATCH}: agent {r.agent_id[:80]} is "
                     f"{str(r.node_size)[:40]}, the deployment asks for {node_size[:40]}")
        out.append({"agent_id": r.agent_id, "state": state, "version": r.version,
                    "compose_hash": r.compose_hash, "error": error,
                    "failure": None, "node_size": r.node_size,
                    "url": None if state in ("failed", "stopped") else r.url})
    return out


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
