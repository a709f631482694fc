"""Placement: which agents a deployment's replicas go to, and why the others don't.

Pure and deterministic: no Trio, no clock, no I/O. ``place(request, agents)`` reads a
snapshot of the CP's agent view and returns a ``Placement``: the decision together with
its diagnostics, which is also the preflight answer (API.md). The same request and the
same set of agents, given in any order, always give the same ``Placement``; agent ids
must be unique within one call.

Eligibility. Every agent is checked against every rule and *all* the rules it breaks
are reported, in this fixed order (the order of ``Reason``):

    OFFLINE, STALE, QUARANTINED   status is not ``online``
    NOT_ATTESTED                  its attestation verdict is not a pass
    DRAINING                      an operator asked for no new placements
    NODE_SIZE_MISMATCH            ``constraints.node_size`` names another size
    DATACENTER_NOT_ALLOWED        ``constraints.datacenter`` names another datacenter
    NO_GPU                        ``constraints.gpu`` and the node has no GPU
    EXCLUDED                      listed in ``constraints.exclude_agents``
    BUSY                          runs another deployment (one workload per VM/TD);
                                  the rejection keeps which (``holders``), shown only
                                  through the caller's ``HolderName`` (no tenant sees
                                  another tenant's deployment ids)
    RESERVED                      held for another reservation or deployment

An agent already running *this* deployment is an existing replica, not BUSY. An agent
held for this request's reservation id or deployment id is not RESERVED. An agent that
breaks no rule is a candidate. So a GPU workload can only ever land on a GPU node.

Ranking. Candidates are ordered by, in turn:

1. existing replicas of this deployment first (re-placing keeps replicas where they
   are: no churn);
2. then agents reserved for this request;
3. then, for a workload that asked for no GPU, nodes without one (GPUs stay free);
4. then spread over datacenters: within each tier formed by 1-3, datacenters take
   turns in name order, each turn giving the datacenter's next agent. Turns count the
   candidates already ranked in that datacenter, earlier tiers included, so with two
   existing replicas in ``a`` the next ones go to ``b``, ``c``, … before ``a`` again.
   A candidate's ``spread_round`` is that count;
5. then agent id (the order within one datacenter).

Equivalently, the ranking is the sort by ``(not existing_replica, not reserved,
spare_gpu, spread_round, datacenter, agent_id)`` once ``spread_round`` is assigned as in
4. The first ``replicas`` candidates are chosen: distinct agents by construction. When
there are fewer candidates than replicas, all of them are chosen, ``placeable`` is false
and ``shortfall`` says how many are missing; ``Placement.require`` turns that into
``PlacementImpossible`` for the deployment endpoint (409 with the diagnostics).
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

import attrs

AgentStatus = Literal["online", "stale", "offline", "quarantined"]
STATUSES: Final[tuple[AgentStatus, ...]] = ("online", "stale", "offline", "quarantined")
MAX_REPLICAS: Final = 100
MAX_EXCLUDED_AGENTS: Final = 1000


class Reason(enum.StrEnum):
    """Why an agent cannot take a replica. Definition order is the reporting order."""

    OFFLINE = "OFFLINE"
    STALE = "STALE"
    QUARANTINED = "QUARANTINED"
    NOT_ATTESTED = "NOT_ATTESTED"
    DRAINING = "DRAINING"
    NODE_SIZE_MISMATCH = "NODE_SIZE_MISMATCH"
    DATACENTER_NOT_ALLOWED = "DATACENTER_NOT_ALLOWED"
    NO_GPU = "NO_GPU"
    EXCLUDED = "EXCLUDED"
    BUSY = "BUSY"
    RESERVED = "RESERVED"


_STATUS_REASON: Final[Mapping[str, Reason]] = {
    "offline": Reason.OFFLINE,
    "stale": Reason.STALE,
    "quarantined": Reason.QUARANTINED,
}


def _name(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")


def _optional_name(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _name(inst, attribute, value)


def _flag(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be a bool, not {value!r}")


def _names(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    assert isinstance(value, tuple | frozenset)  # checked by instance_of first
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{attribute.name} must hold non-empty strings, not {value!r}")


def _replicas(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {value!r}")
    if not 1 <= value <= MAX_REPLICAS:
        raise ValueError(f"{attribute.name} must be in 1..{MAX_REPLICAS}, not {value}")


@attrs.frozen
class AgentInfo:
    """What placement needs from the CP's view of one agent."""

    agent_id: str = attrs.field(validator=_name)
    datacenter: str = attrs.field(validator=_name)
    node_size: str = attrs.field(validator=_name)
    gpu: bool = attrs.field(validator=_flag)
    status: AgentStatus = attrs.field(validator=attrs.validators.in_(STATUSES))
    attested: bool = attrs.field(validator=_flag)
    draining: bool = attrs.field(validator=_flag)
    deployments: tuple[str, ...] = attrs.field(
        validator=[attrs.validators.instance_of(tuple), _names]
    )
    # A capacity-pool reservation id or deployment id this agent is held for.
    reserved_for: str | None = attrs.field(default=None, validator=_optional_name)


class ConstraintsError(ValueError):
    """Constraints sent by an API client are malformed (the client's fault: 400).

    ``field`` is the offending key, or ``""`` when the value as a whole is wrong.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"constraints{'.' + field if field else ''}: {reason}")
        self.field = field
        self.reason = reason


def _json_name(obj: Mapping[str, object], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConstraintsError(key, "must be a non-empty string")
    return value


@attrs.frozen
class Constraints:
    """Where a deployment may go (API.md, "Constraints")."""

    datacenter: str | None = attrs.field(default=None, validator=_optional_name)
    node_size: str | None = attrs.field(default=None, validator=_optional_name)
    gpu: bool = attrs.field(default=False, validator=_flag)
    exclude_agents: frozenset[str] = attrs.field(
        default=frozenset(), validator=[attrs.validators.instance_of(frozenset), _names]
    )

    @classmethod
    def from_json(cls, obj: object) -> Constraints:
        """Parse a client's ``constraints`` value; ``None`` (absent) means none.

        Strict: unknown keys, wrong types and empty strings raise ``ConstraintsError``.
        ``datacenter`` and ``node_size`` may be ``null``; ``gpu`` must be a boolean.
        """
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise ConstraintsError("", "must be a JSON object")
        unknown = sorted(str(k) for k in obj if k not in _CONSTRAINT_KEYS)
        if unknown:
            raise ConstraintsError(unknown[0], "unknown key")
        gpu = obj.get("gpu", False)
        if not isinstance(gpu, bool):
            raise ConstraintsError("gpu", "must be a boolean")
        excluded = obj.get("exclude_agents", [])
        if not isinstance(excluded, list):
            raise ConstraintsError("exclude_agents", "must be a list of agent ids")
        if len(excluded) > MAX_EXCLUDED_AGENTS:
            raise ConstraintsError("exclude_agents", f"at most {MAX_EXCLUDED_AGENTS} ids")
        if not all(isinstance(a, str) and a for a in excluded):
            raise ConstraintsError("exclude_agents", "must be a list of non-empty strings")
        return cls(
            datacenter=_json_name(obj, "datacenter"),
            node_size=_json_name(obj, "node_size"),
            gpu=gpu,
            exclude_agents=frozenset(excluded),
        )


_CONSTRAINT_KEYS: Final = frozenset(a.name for a in attrs.fields(Constraints))


@attrs.frozen
class Request:
    """Place ``replicas`` replicas of a deployment (``None``: not created yet, preflight)."""

    deployment_id: str | None = attrs.field(validator=_optional_name)
    replicas: int = attrs.field(validator=_replicas)
    constraints: Constraints = attrs.field(
        factory=Constraints, validator=attrs.validators.instance_of(Constraints)
    )
    # The capacity-pool reservation this request consumes, if any.
    reservation: str | None = attrs.field(default=None, validator=_optional_name)


@attrs.frozen
class Candidate:
    """An eligible agent, with its rank (1 = best) and the terms that ranked it."""

    agent_id: str
    rank: int = attrs.field(validator=attrs.validators.ge(1))
    datacenter: str
    existing_replica: bool
    reserved: bool
    spare_gpu: bool  # a GPU node offered to a workload that asked for none
    spread_round: int

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


#: How a caller names the deployment holding a BUSY agent to whoever reads the answer
#: (a tenant sees its own deployment ids, and "another tenant" for the rest).
HolderName = Callable[[str], str]


@attrs.frozen
class Rejection:
    agent_id: str
    reasons: tuple[Reason, ...] = attrs.field(validator=attrs.validators.min_len(1))
    # BUSY: the deployments the agent runs (raw ids: shown only through a HolderName).
    holders: tuple[str, ...] = attrs.field(default=(), eq=False)

    def busy_with(self, name: HolderName) -> list[str]:
        return sorted({name(h) for h in self.holders})

    def to_dict(self, name: HolderName | None = None) -> dict[str, object]:
        """The rejection; with *name*, a BUSY one says who holds the agent
        (``busy_with``). Without it, holders are never shown."""
        out: dict[str, object] = {"agent_id": self.agent_id,
                                  "reasons": [r.value for r in self.reasons]}
        if name is not None and self.holders:
            out["busy_with"] = self.busy_with(name)
        return out


@attrs.frozen
class Placement:
    placeable: bool
    chosen: tuple[str, ...]  # in rank order
    candidates: tuple[Candidate, ...]  # in rank order
    rejected: tuple[Rejection, ...]  # by agent_id
    shortfall: int

    def to_dict(self, name: HolderName | None = None) -> dict[str, object]:
        """The preflight answer (API.md); *name* as in ``Rejection.to_dict``."""
        return {
            "placeable": self.placeable,
            "candidates": [c.to_dict() for c in self.candidates],
            "rejected": [r.to_dict(name) for r in self.rejected],
            "chosen": list(self.chosen),
            "shortfall": self.shortfall,
        }

    def reason_counts(self) -> dict[str, int]:
        """How many rejected agents gave each reason, in ``Reason`` order."""
        counts = {r.value: 0 for r in Reason}
        for rejection in self.rejected:
            for reason in rejection.reasons:
                counts[reason.value] += 1
        return {k: n for k, n in counts.items() if n}

    def why(self, name: HolderName | None = None) -> str:
        """One line saying what placement had to choose from, with the reason codes
        of the rejected agents (a deployment's ``error`` while it cannot be placed);
        with *name*, which deployments hold the BUSY agents."""
        if not self.candidates and not self.rejected:
            return "no agents connected"
        n = len(self.candidates)
        text = f"{n} candidate{'' if n == 1 else 's'}"
        if self.rejected:
            m = len(self.rejected)
            counts = ", ".join(f"{k}: {v}" for k, v in self.reason_counts().items())
            text += f", {m} agent{'' if m == 1 else 's'} rejected ({counts})"
        if name is not None:
            held = sorted({n for r in self.rejected for n in r.busy_with(name)})
            if held:
                text += f"; BUSY agents run {', '.join(held)}"
        return text

    def require(self) -> tuple[str, ...]:
        """The chosen agents, or ``PlacementImpossible`` when not all replicas fit."""
        if not self.placeable:
            raise PlacementImpossible(self)
        return self.chosen


class PlacementImpossible(Exception):
    """Not every replica fits; ``placement`` holds the diagnostics (HTTP 409)."""

    def __init__(self, placement: Placement) -> None:
        super().__init__(f"placement impossible: {placement.shortfall} replica(s) short")
        self.placement = placement


def _claims(request: Request) -> frozenset[str]:
    """The reservation holds this request may use."""
    return frozenset(c for c in (request.reservation, request.deployment_id) if c is not None)


def _reasons(request: Request, claims: frozenset[str], agent: AgentInfo) -> tuple[Reason, ...]:
    c = request.constraints
    reasons: list[Reason] = []
    if agent.status != "online":
        reasons.append(_STATUS_REASON[agent.status])
    if not agent.attested:
        reasons.append(Reason.NOT_ATTESTED)
    if agent.draining:
        reasons.append(Reason.DRAINING)
    if c.node_size is not None and agent.node_size != c.node_size:
        reasons.append(Reason.NODE_SIZE_MISMATCH)
    if c.datacenter is not None and agent.datacenter != c.datacenter:
        reasons.append(Reason.DATACENTER_NOT_ALLOWED)
    if c.gpu and not agent.gpu:
        reasons.append(Reason.NO_GPU)
    if agent.agent_id in c.exclude_agents:
        reasons.append(Reason.EXCLUDED)
    if any(d != request.deployment_id for d in agent.deployments):
        reasons.append(Reason.BUSY)
    if agent.reserved_for is not None and agent.reserved_for not in claims:
        reasons.append(Reason.RESERVED)
    return tuple(reasons)


def place(request: Request, agents: Iterable[AgentInfo]) -> Placement:
    """Decide where ``request``'s replicas go among ``agents`` (see the module docstring)."""
    by_id: dict[str, AgentInfo] = {}
    for agent in agents:
        if agent.agent_id in by_id:
            raise ValueError(f"duplicate agent_id {agent.agent_id!r}")
        by_id[agent.agent_id] = agent
    claims = _claims(request)

    rejected: list[Rejection] = []
    # tier (rules 1-3, False sorts first) -> datacenter -> agents by id
    tiers: dict[tuple[bool, bool, bool], dict[str, deque[AgentInfo]]] = {}
    for agent_id in sorted(by_id):
        agent = by_id[agent_id]
        reasons = _reasons(request, claims, agent)
        if reasons:
            holders = tuple(sorted({d for d in agent.deployments
                                    if d != request.deployment_id}))
            rejected.append(Rejection(agent_id, reasons,
                                      holders if Reason.BUSY in reasons else ()))
            continue
        tier = (
            request.deployment_id not in agent.deployments,
            agent.reserved_for is None,
            agent.gpu and not request.constraints.gpu,
        )
        tiers.setdefault(tier, {}).setdefault(agent.datacenter, deque()).append(agent)

    candidates: list[Candidate] = []
    ranked_in: dict[str, int] = {}  # datacenter -> candidates ranked there so far
    for tier in sorted(tiers):
        queues = tiers[tier]
        turns = [(ranked_in.get(dc, 0), dc) for dc in queues]
        heapq.heapify(turns)
        while turns:
            spread_round, dc = heapq.heappop(turns)
            agent = queues[dc].popleft()
            ranked_in[dc] = spread_round + 1
            candidates.append(
                Candidate(
                    agent_id=agent.agent_id,
                    rank=len(candidates) + 1,
                    datacenter=dc,
                    existing_replica=not tier[0],
                    reserved=not tier[1],
                    spare_gpu=tier[2],
                    spread_round=spread_round,
                )
            )
            if queues[dc]:
                heapq.heappush(turns, (spread_round + 1, dc))

    chosen = tuple(c.agent_id for c in candidates[: request.replicas])
    shortfall = request.replicas - len(chosen)
    return Placement(
        placeable=shortfall == 0,
        chosen=chosen,
        candidates=tuple(candidates),
        rejected=tuple(rejected),
        shortfall=shortfall,
    )
