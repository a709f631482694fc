"""Capacity pools: warm targets, the counting of agents, reservations and the decision
of how many launch orders to open (pure; the actor in ``ee.actors.pool`` does the I/O).

Theory of operation. A pool is one (datacenter, node size). Its **target** is operator
intent: keep ``min_warm`` agents warm, never run more than ``max_total`` VMs, and —
when ``dispatch`` is on — ask provisioners for VMs through launch orders. Everything
else is counted, never stored as a number:

* An agent of the pool is **warm** when it is online, healthy, not draining, runs no
  deployment, is attested (when the target requires it) and no live reservation holds
  it; **reserved** when it would be warm but a reservation holds it; **deployed**
  when it runs a deployment; **unavailable** when it is idle but not fit (stale,
  quarantined, draining, unhealthy, not attested); **offline** when it is gone.
  ``total`` is every VM that is not offline (what ``max_total`` caps).
* ``shortfall = max(0, min_warm - warm)``. Reserved agents do not count as warm: they
  are about to be taken by a deployment, so the pool replenishes as soon as capacity is
  committed rather than after it is used.
* An order is **in flight** while it may still bring a VM the pool does not count yet:
  open, claimed or provisioning, or fulfilled less than ``grace_s`` ago — and its VM
  has not registered (token presented, or its ``vm_name`` seen among the agents).
* ``orders_to_open = max(0, shortfall - in_flight)``, further capped so that
  ``total + in_flight + opened ≤ max_total``; zero without a target or with dispatch
  off, and zero while failures back off (consecutive failed orders delay the next
  opening exponentially). Open orders beyond what the target still wants are
  cancelled (newest first); claimed or provisioning ones are left to finish.

Reconciliation (``reconcile``) is one pure step from (state, agents, now) to a new
state plus what changed: expire claims (back to open, token revoked) and provisioning
timeouts (failed), release reservations that expired or whose agent is no longer fit
or now runs a deployment, count, cancel surplus, open the shortfall, forget old
finished orders and tokens. Running it twice with the same inputs opens nothing the
second time — which is what makes a crash between "decided" and "saved" harmless.

Reservations hold a warm agent for a placement in progress (``choose_agent`` picks the
lowest agent id among the warm ones, so the choice is deterministic). They expire and
are released when their agent goes stale, offline, is drained or quarantined, or takes
a deployment (consumed). Placement sees them through ``AgentInfo.reserved_for``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final

import attrs

from ee.capacity.orders import LaunchOrder, OrderState, by_state, rfc3339
from ee.capacity.tokens import TokenBook

MAX_WARM: Final = 10_000
MAX_REASON: Final = 500
ATTESTED_VERDICTS: Final = frozenset({"pass", "warn"})
DOC_VERSION: Final = 1


# ---- pool identity ---------------------------------------------------------------------

class PoolKeyError(ValueError):
    """A pool named by a client does not exist in this CP's vocabulary (HTTP 400).

    ``field`` is ``datacenter`` or ``node_size``; ``code`` is the registration's code
    for the same mistake (``BAD_DATACENTER`` / ``UNKNOWN_NODE_SIZE``).
    """

    def __init__(self, field: str, code: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.code = code
        self.reason = reason


@attrs.frozen(order=True)
class PoolKey:
    datacenter: str
    node_size: str

    @property
    def ident(self) -> str:
        """``<datacenter>/<node_size>``: the manifest id and the tail of the actor name."""
        return f"{self.datacenter}/{self.node_size}"

    @property
    def actor_name(self) -> str:
        return f"pool/{self.ident}"

    @classmethod
    def from_request(cls, datacenter: str, node_size: str, *, node_sizes: Collection[str],
                     normalise_label: Callable[[str], str]) -> PoolKey:
        """Validate a client's pool name against the CP vocabulary.

        *normalise_label* is ``Vocabulary.normalise_label`` (raises ``ValueError`` on a
        malformed label); *node_sizes* the configured preset names.
        """
        if node_size not in node_sizes:
            raise PoolKeyError("node_size", "UNKNOWN_NODE_SIZE",
                               f"node size {node_size!r} is not one of: "
                               + ", ".join(sorted(node_sizes)))
        try:
            label = normalise_label(datacenter)
        except ValueError as exc:
            raise PoolKeyError("datacenter", "BAD_DATACENTER", str(exc)) from None
        return cls(label, node_size)


# ---- target ----------------------------------------------------------------------------

class TargetError(ValueError):
    """A pool target sent by a client is malformed (HTTP 400); ``field`` names the key."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def _count(obj: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TargetError(key, "must be an integer")
    if not minimum <= value <= MAX_WARM:
        raise TargetError(key, f"must be in {minimum}..{MAX_WARM}")
    return value


@attrs.frozen
class PoolTarget:
    """What the operator wants of one pool (PUT /api/v2/capacity/pools/{dc}/{size})."""

    min_warm: int = attrs.field(validator=[attrs.validators.instance_of(int),
                                           attrs.validators.ge(0)])
    dispatch: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    reason: str = attrs.field(validator=attrs.validators.instance_of(str))
    max_total: int | None = None
    require_attested: bool = True

    def __attrs_post_init__(self) -> None:
        if self.max_total is not None and self.max_total < self.min_warm:
            raise TargetError("max_total", f"must be at least min_warm ({self.min_warm})")

    @classmethod
    def from_json(cls, obj: object) -> PoolTarget:
        """Parse a client's body strictly: unknown keys and wrong types are refused."""
        if not isinstance(obj, dict):
            raise TargetError("", "the body must be a JSON object")
        unknown = sorted(str(k) for k in obj if k not in _TARGET_KEYS)
        if unknown:
            raise TargetError(unknown[0], "unknown field")
        for key in ("min_warm", "dispatch", "reason"):
            if key not in obj:
                raise TargetError(key, "required")
        min_warm = _count(obj, "min_warm", minimum=0)
        max_total = None
        if obj.get("max_total") is not None:
            max_total = _count(obj, "max_total", minimum=1)
            if max_total < min_warm:
                raise TargetError("max_total", f"must be at least min_warm ({min_warm})")
        for key in ("dispatch", "require_attested"):
            if key in obj and not isinstance(obj[key], bool):
                raise TargetError(key, "must be a boolean")
        reason = obj["reason"]
        if not isinstance(reason, str) or not reason.strip():
            raise TargetError("reason", "must be a non-empty string saying why")
        if len(reason) > MAX_REASON:
            raise TargetError("reason", f"at most {MAX_REASON} characters")
        return cls(min_warm=min_warm, max_total=max_total,
                   require_attested=obj.get("require_attested", True),
                   dispatch=obj["dispatch"], reason=reason.strip())

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


_TARGET_KEYS: Final = frozenset(a.name for a in attrs.fields(PoolTarget))


# ---- agents, as a pool sees them --------------------------------------------------------

@attrs.frozen
class AgentView:
    """The part of an AgentActor view (``AgentActor.view()``) a pool counts with."""

    agent_id: str
    vm_name: str
    datacenter: str
    node_size: str
    status: str  # online | stale | offline | quarantined
    draining: bool
    verdict: str | None  # pass | warn | fail | None
    health: str  # healthy | unhealthy | starting | unknown
    deployments: tuple[str, ...] = ()

    @classmethod
    def from_view(cls, view: Mapping[str, Any]) -> AgentView | None:
        """From the CP's agent view dict; None for an agent not identified yet."""
        if not view.get("vm_name") or not view.get("datacenter"):
            return None
        attestation = view.get("attestation") or {}
        health = view.get("health") or {}
        return cls(
            agent_id=str(view["agent_id"]), vm_name=str(view["vm_name"]),
            datacenter=str(view["datacenter"]), node_size=str(view["node_size"]),
            status=str(view["status"]), draining=bool(view.get("draining")),
            verdict=attestation.get("verdict"), health=str(health.get("status", "unknown")),
            deployments=tuple(str(d["deployment_id"]) for d in view.get("deployment") or ()))

    def unfit(self, require_attested: bool) -> str | None:
        """Why this idle agent cannot be warm (None: it can). Also the release reason."""
        if self.status != "online":
            return self.status  # stale | offline | quarantined
        if self.draining:
            return "draining"
        if require_attested and self.verdict not in ATTESTED_VERDICTS:
            return "not_attested"
        if self.health != "healthy":
            return "unhealthy"
        return None


def members(agents: Iterable[AgentView], key: PoolKey) -> list[AgentView]:
    """The agents of pool *key*, by agent id."""
    return sorted((a for a in agents if a.datacenter == key.datacenter
                   and a.node_size == key.node_size), key=lambda a: a.agent_id)


# ---- reservations ----------------------------------------------------------------------

@attrs.frozen
class Reservation:
    reservation_id: str
    agent_id: str
    deployment_id: str | None  # a hint: which deployment it is held for
    created_at: float
    expires_at: float

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Reservation:
        return cls(**{a.name: doc[a.name] for a in attrs.fields(cls)})


def held(reservations: Iterable[Reservation], now: float) -> dict[str, Reservation]:
    """Agent id → the live reservation holding it."""
    return {r.agent_id: r for r in reservations if r.live(now)}


def reserved_for(reservations: Iterable[Reservation], now: float) -> dict[str, str]:
    """Agent id → reservation id, for ``AgentInfo.reserved_for`` in placement."""
    return {a: r.reservation_id for a, r in held(reservations, now).items()}


def warm_agents(agents: Iterable[AgentView], target: PoolTarget | None,
                reservations: Iterable[Reservation], now: float) -> list[AgentView]:
    """Warm agents (idle, fit, not held), by agent id."""
    require = target.require_attested if target is not None else True
    taken = held(reservations, now)
    return sorted((a for a in agents if not a.deployments and a.unfit(require) is None
                   and a.agent_id not in taken), key=lambda a: a.agent_id)


def choose_agent(agents: Iterable[AgentView], target: PoolTarget | None,
                 reservations: Iterable[Reservation], now: float) -> str | None:
    """The warm agent a new reservation takes: the lowest agent id (deterministic)."""
    warm = warm_agents(agents, target, reservations, now)
    return warm[0].agent_id if warm else None


def release_reservations(
    reservations: Iterable[Reservation], agents: Iterable[AgentView],
    target: PoolTarget | None, now: float,
) -> tuple[dict[str, Reservation], list[tuple[Reservation, str]]]:
    """Split reservations into those kept and those released, with why.

    Reasons: ``expired``, ``gone`` (agent unknown), ``stale``/``offline``/
    ``quarantined``, ``draining``, ``not_attested``, ``unhealthy``, ``consumed`` (the
    agent now runs a deployment).
    """
    require = target.require_attested if target is not None else True
    by_id = {a.agent_id: a for a in agents}
    kept: dict[str, Reservation] = {}
    released: list[tuple[Reservation, str]] = []
    for r in sorted(reservations, key=lambda r: r.reservation_id):
        agent = by_id.get(r.agent_id)
        reason: str | None
        if not r.live(now):
            reason = "expired"
        elif agent is None:
            reason = "gone"
        elif agent.deployments:
            reason = "consumed"
        else:
            reason = agent.unfit(require)
        if reason is None:
            kept[r.reservation_id] = r
        else:
            released.append((r, reason))
    return kept, released


# ---- counting and deciding ---------------------------------------------------------------

@attrs.frozen
class PoolCounts:
    warm: int = 0
    reserved: int = 0
    deployed: int = 0
    unavailable: int = 0
    offline: int = 0
    total: int = 0  # every VM not offline
    vm_names: frozenset[str] = frozenset()  # every agent's VM name (registered VMs)

    def shortfall(self, target: PoolTarget | None) -> int:
        return 0 if target is None else max(0, target.min_warm - self.warm)

    def to_json(self) -> dict[str, int]:
        return {"warm": self.warm, "reserved": self.reserved, "deployed": self.deployed,
                "unavailable": self.unavailable, "offline": self.offline,
                "total": self.total}


def classify(agents: Iterable[AgentView], target: PoolTarget | None,
             reservations: Iterable[Reservation], now: float) -> PoolCounts:
    """Count a pool's agents (give only the pool's members; see the module docstring)."""
    require = target.require_attested if target is not None else True
    taken = held(reservations, now)
    warm = reserved = deployed = unavailable = offline = 0
    names: set[str] = set()
    for a in agents:
        names.add(a.vm_name)
        if a.status == "offline":
            offline += 1
        elif a.deployments:
            deployed += 1
        elif a.unfit(require) is not None:
            unavailable += 1
        elif a.agent_id in taken:
            reserved += 1
        else:
            warm += 1
    total = warm + reserved + deployed + unavailable
    return PoolCounts(warm, reserved, deployed, unavailable, offline, total,
                      frozenset(names))


def in_flight(orders: Iterable[LaunchOrder], counts: PoolCounts, now: float,
              grace_s: float) -> list[LaunchOrder]:
    """Orders still standing for a VM the pool does not count yet."""
    return [o for o in orders
            if o.in_flight(now, grace_s) and (o.vm_name is None
                                               or o.vm_name not in counts.vm_names)]


def orders_to_open(target: PoolTarget | None, counts: PoolCounts,
                   orders: Iterable[LaunchOrder], now: float, grace_s: float) -> int:
    """How many launch orders to open now: the shortfall not yet covered by orders in
    flight, capped by ``max_total``; 0 without a target or with dispatch off."""
    if target is None or not target.dispatch:
        return 0
    flying = len(in_flight(orders, counts, now, grace_s))
    wanted = max(0, counts.shortfall(target) - flying)
    if target.max_total is not None:
        wanted = min(wanted, max(0, target.max_total - counts.total - flying))
    return wanted


def orders_to_cancel(target: PoolTarget | None, counts: PoolCounts,
                     orders: Iterable[LaunchOrder], now: float, grace_s: float) -> list[str]:
    """Open orders the target no longer wants (newest first), by id."""
    flying = in_flight(orders, counts, now, grace_s)
    wanted = 0
    if target is not None and target.dispatch:
        wanted = counts.shortfall(target)
        if target.max_total is not None:
            wanted = min(wanted, max(0, target.max_total - counts.total))
    surplus = len(flying) - wanted
    if surplus <= 0:
        return []
    open_ = sorted((o for o in flying if o.state is OrderState.OPEN),
                   key=lambda o: (o.created_at, o.order_id), reverse=True)
    return [o.order_id for o in open_[:surplus]]


def failure_backoff(orders: Iterable[LaunchOrder], base_s: float, cap_s: float) -> float | None:
    """When the next order may open after consecutive failures (None: no failures).

    Counts failed orders finished after the last fulfilled one; the delay after the
    last failure is ``min(cap_s, base_s · 2^(n-1))``.
    """
    finished = sorted((o for o in orders
                       if o.state in (OrderState.FAILED, OrderState.FULFILLED)
                       and o.finished_at is not None),
                      key=lambda o: (o.finished_at or 0.0, o.order_id))
    streak = 0
    last = 0.0
    for order in reversed(finished):
        if order.state is not OrderState.FAILED:
            break
        streak += 1
        last = max(last, order.finished_at or 0.0)
    if streak == 0:
        return None
    delay: float = min(cap_s, base_s * 2.0 ** min(streak - 1, 30))
    return last + delay


# ---- the pool's whole state and one reconcile step ---------------------------------------

@attrs.frozen
class PoolSettings:
    reconcile_interval_s: float = 5.0
    claim_ttl_s: float = 300.0  # claimed, not reported: back to open
    provision_ttl_s: float = 1800.0  # provisioning, not fulfilled/failed: failed
    token_ttl_s: float = 3600.0  # a bootstrap token's life, from its claim
    token_remember_s: float = 7 * 86400.0  # expired/used tokens remembered this long
    registration_grace_s: float = 600.0  # fulfilled, not registered: still in flight
    reservation_ttl_s: float = 60.0
    failure_backoff_s: float = 30.0
    failure_backoff_max_s: float = 1800.0
    keep_finished: int = 100  # finished orders kept for the API, per pool


@attrs.frozen
class PoolState:
    """Everything a pool persists (its signed manifest); agents are never stored."""

    key: PoolKey
    target: PoolTarget | None = None
    orders: Mapping[str, LaunchOrder] = attrs.field(factory=dict)
    tokens: TokenBook = attrs.field(factory=TokenBook)
    reservations: Mapping[str, Reservation] = attrs.field(factory=dict)

    def with_order(self, order: LaunchOrder) -> PoolState:
        return attrs.evolve(self, orders={**self.orders, order.order_id: order})

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": DOC_VERSION,
            "datacenter": self.key.datacenter,
            "node_size": self.key.node_size,
            "target": self.target.to_json() if self.target is not None else None,
            "orders": [self.orders[i].to_json() for i in sorted(self.orders)],
            "tokens": self.tokens.to_json(),
            "reservations": [self.reservations[i].to_json()
                             for i in sorted(self.reservations)],
        }

    @classmethod
    def from_doc(cls, key: PoolKey, doc: Mapping[str, Any] | None) -> PoolState:
        """Rebuild from a saved manifest (None or empty: a new pool)."""
        if not doc:
            return cls(key)
        if doc.get("version") != DOC_VERSION:
            raise ValueError(f"pool {key.ident}: unknown manifest version "
                             f"{doc.get('version')!r}")
        if (doc.get("datacenter"), doc.get("node_size")) != (key.datacenter, key.node_size):
            raise ValueError(f"pool {key.ident}: the manifest is for another pool")
        target = doc.get("target")
        orders = [LaunchOrder.from_json(o) for o in doc.get("orders", [])]
        reservations = [Reservation.from_json(r) for r in doc.get("reservations", [])]
        return cls(key=key,
                   target=PoolTarget(**target) if target is not None else None,
                   orders={o.order_id: o for o in orders},
                   tokens=TokenBook.from_json(list(doc.get("tokens", []))),
                   reservations={r.reservation_id: r for r in reservations})


@attrs.frozen
class Step:
    """The outcome of one reconcile step."""

    state: PoolState
    counts: PoolCounts
    opened: tuple[LaunchOrder, ...] = ()
    changed: tuple[LaunchOrder, ...] = ()  # expired claims, timeouts, cancellations
    released: tuple[tuple[Reservation, str], ...] = ()


def expire_orders(state: PoolState, now: float) -> tuple[PoolState, list[LaunchOrder]]:
    """Claims past their deadline go back to open, provisioning past it fails; their
    tokens are revoked."""
    changed: list[LaunchOrder] = []
    orders = dict(state.orders)
    tokens = state.tokens
    for order in state.orders.values():
        if order.deadline is None or now < order.deadline:
            continue
        if order.state is OrderState.CLAIMED:
            new = order.expire_claim(now)
        elif order.state is OrderState.PROVISIONING and order.registered_vm is not None:
            new = order.fulfil(now, order.vm_name or order.registered_vm)  # its VM is here
        elif order.state is OrderState.PROVISIONING:
            new = order.fail(now, "provisioning timed out")
        else:
            continue
        if new.state is not OrderState.FULFILLED:
            tokens = tokens.revoke(order.token_sha256, now)
        orders[order.order_id] = new
        changed.append(new)
    if not changed:
        return state, changed
    return attrs.evolve(state, orders=orders, tokens=tokens), changed


def _prune_finished(orders: Mapping[str, LaunchOrder], counts: PoolCounts, now: float,
                    settings: PoolSettings) -> dict[str, LaunchOrder]:
    keep_ids = {o.order_id for o in in_flight(orders.values(), counts, now,
                                              settings.registration_grace_s)}
    finished = sorted((o for o in orders.values() if o.final and o.order_id not in keep_ids),
                      key=lambda o: (o.finished_at or 0.0, o.order_id), reverse=True)
    drop = {o.order_id for o in finished[settings.keep_finished:]}
    return {i: o for i, o in orders.items() if i not in drop}


def reconcile(state: PoolState, agents: Iterable[AgentView], now: float,
              settings: PoolSettings, new_id: Callable[[], str], *,
              ready: bool = True) -> Step:
    """One reconcile pass (see the module docstring). *agents* may hold other pools'.

    Before the CP is *ready* (agents still reconnecting after a restart) the picture is
    partial: only deadlines are applied; nothing is released, cancelled or opened.
    """
    pool_agents = members(agents, state.key)
    state, changed = expire_orders(state, now)
    if not ready:
        counts = classify(pool_agents, state.target, state.reservations.values(), now)
        return Step(state, counts, (), tuple(changed), ())
    kept, released = release_reservations(state.reservations.values(), pool_agents,
                                          state.target, now)
    if released:
        state = attrs.evolve(state, reservations=kept)
    counts = classify(pool_agents, state.target, state.reservations.values(), now)
    grace = settings.registration_grace_s
    orders = dict(state.orders)
    tokens = state.tokens
    for order_id in orders_to_cancel(state.target, counts, orders.values(), now, grace):
        new = orders[order_id].cancel(now, "the pool no longer needs it")
        orders[order_id] = new
        changed.append(new)
    opened: list[LaunchOrder] = []
    n = orders_to_open(state.target, counts, orders.values(), now, grace)
    allowed_at = failure_backoff(orders.values(), settings.failure_backoff_s,
                                 settings.failure_backoff_max_s)
    if n > 0 and (allowed_at is None or now >= allowed_at):
        for _ in range(n):
            order = LaunchOrder(order_id=new_id(), datacenter=state.key.datacenter,
                                node_size=state.key.node_size, state=OrderState.OPEN,
                                created_at=now, updated_at=now)
            if order.order_id in orders:
                raise ValueError(f"duplicate launch order id {order.order_id}")
            orders[order.order_id] = order
            opened.append(order)
    orders = _prune_finished(orders, counts, now, settings)
    tokens = tokens.prune(now, settings.token_remember_s)
    if orders != state.orders or tokens != state.tokens:
        state = attrs.evolve(state, orders=orders, tokens=tokens)
    return Step(state, counts, tuple(opened), tuple(changed), tuple(released))


def pool_view(state: PoolState, counts: PoolCounts, now: float,
              settings: PoolSettings) -> dict[str, Any]:
    """The API/console form of a pool (``GET /api/v2/capacity/pools`` lists these)."""
    orders = list(state.orders.values())
    flying = in_flight(orders, counts, now, settings.registration_grace_s)
    return {
        "datacenter": state.key.datacenter,
        "node_size": state.key.node_size,
        "target": state.target.to_json() if state.target is not None else None,
        **counts.to_json(),
        "shortfall": counts.shortfall(state.target),
        "pending_orders": sum(1 for o in orders if o.live),
        "orders_in_flight": len(flying),
        "orders_by_state": by_state(orders),
        "reservations": [{**r.to_json(), "created_at": rfc3339(r.created_at),
                          "expires_at": rfc3339(r.expires_at)}
                         for r in sorted(state.reservations.values(),
                                         key=lambda r: r.reservation_id)
                         if r.live(now)],
    }
