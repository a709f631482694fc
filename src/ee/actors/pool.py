"""CapacityPoolActor: one (datacenter, node size) pool — its warm target, its
reservations and its launch orders. The decisions are ``ee.capacity`` (pure); this
actor fetches the agents' views, applies them, and persists the result.

Sources of truth, and how a (re)start rebuilds from them:

* the pool's manifest (``deps.load``): target, launch orders, bootstrap token hashes
  and reservations — desired and operational state, written (``deps.save``) *before*
  a change is acknowledged or acted on, so a restart neither forgets an acknowledged
  reservation nor opens an order twice;
* the agents (``deps.agent_views``): who is warm, reserved, deployed. Nothing about
  warm capacity is stored as a number.

Every change follows one pattern: compute the new ``PoolState`` (pure), save it, then
adopt it and emit events. A crash before the save loses an unacknowledged change; a
crash after it leaves a saved change the restarted incarnation adopts. Either way the
state it rebuilds is one that was (or was about to be) acknowledged, never half of it.
Handlers never raise on a caller's mistake: they answer ``OrderRefusal`` /
``TokenRefusal`` values (a raise would crash the actor).

Integration (the CP owns the wiring):

* Tree: a dynamic ``capacity`` supervisor; ``PoolDirectory(registry, supervisor, deps)``
  starts pools on demand (``ensure``) and, as the supervisor's ``populate`` hook,
  again from every saved pool manifest (``populate(keys)``). Manifests: kind
  ``"pools"`` (``MANIFEST_KIND``, to add to ``ManifestStore.KINDS``), id
  ``PoolKey.ident``; ``deps.load(ident)`` returns that manifest's spec or None.
* Clock: ``deps.clock`` values are persisted (deadlines, token expiry), so the CP
  passes ``time.time``; CP tests on the autojump clock pass ``trio.current_time``.
  ``deps.ready`` is the readiness quorum: before it, no order is opened or cancelled
  and no reservation released on a half-rebuilt picture.
* ``PUT /api/v2/capacity/pools/{dc}/{size}``: ``PoolKey.from_request`` (400 on a bad
  label or size), ``PoolTarget.from_json`` (400 naming the field), then
  ``ensure(key)`` and ``ask(SetTarget(target))`` → pool view.
* ``GET /api/v2/capacity/pools``: ``directory.describe_all()``;
  ``GET /api/v2/capacity/launch-orders``: ``ask(ListOrders())`` on each pool.
* ``POST …/launch-orders/claim`` ``{datacenter,node_size}`` (provisioner key only):
  ``ask(Claim(claimed_by=account_id))`` → ``ClaimGrant`` (200 ``grant.to_json()``) or
  None (204). ``…/{id}/fulfil``, ``…/{id}/fail`` (and optionally
  ``…/{id}/provisioning``): the order id names its pool (``PoolDirectory.find_order``),
  then ``ask(Fulfil(...))`` etc. → ``LaunchOrder`` or ``OrderRefusal``
  (``http_status``).
* Registration: after attestation admits a VM that presented ``bootstrap_token``,
  ``present_token(registry, token, vm_name=…, datacenter=…, node_size=…,
  agent_key=…)`` → ``TokenAccepted`` or ``TokenRefusal`` (refuse the registration
  with its code).
* Placement: ``directory.holds()`` → agent id → reservation id for
  ``AgentInfo.reserved_for``; a deploy that wants warm capacity asks
  ``Reserve(deployment_id)`` and places with ``Request(reservation=...)``, then
  ``ReleaseReservation`` (or leaves it: the agent taking a deployment consumes it).
* Metrics: the pool view has warm/reserved/shortfall and ``orders_by_state``;
  ``deps.observe_claim_to_registered`` gets each order's claim→registered seconds.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs
import trio

from ee.capacity.orders import (
    ORDER_CONFLICT,
    ORDER_NOT_YOURS,
    ORDER_UNKNOWN,
    TOKEN_STATES,
    IllegalOrderTransition,
    LaunchOrder,
    OrderRefusal,
    OrderState,
    rfc3339,
)
from ee.capacity.pool import (
    AgentView,
    PoolKey,
    PoolSettings,
    PoolState,
    PoolTarget,
    Reservation,
    Step,
    choose_agent,
    classify,
    expire_orders,
    held,
    members,
    pool_view,
    reconcile,
    reserved_for,
)
from ee.capacity.tokens import (
    TOKEN_EXPIRED,
    TOKEN_UNKNOWN,
    TokenEntry,
    TokenRefusal,
    issue_token,
    pool_of_token,
)
from ee.runtime import Actor, ActorDead, ActorError, ActorRef, Registry, handler
from ee.supervisors import ChildExists, ChildSpec, Restart, Supervisor, actor_spec

log = logging.getLogger("ee.actors.pool")

MANIFEST_KIND = "pools"


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


@attrs.frozen
class PoolDeps:
    # pool ident ("<dc>/<size>") -> its saved manifest spec, or None for a new pool
    load: Callable[[str], Awaitable[Mapping[str, Any] | None]]
    save: Callable[[str, str, dict[str, Any]], Awaitable[None]]  # ("pools", ident, doc)
    agent_views: Callable[[], Awaitable[list[dict[str, Any]]]]  # AgentActor.view() dicts
    emit: Callable[[str, str, Mapping[str, Any]], None]
    settings: PoolSettings = PoolSettings()
    # The pool's clock: its values are persisted (deadlines, expiries), so production
    # passes wall time; tests pass trio.current_time to run TTLs on the autojump clock.
    clock: Callable[[], float] = time.time
    ready: Callable[[], bool] = lambda: True  # CP rehydration quorum met?
    new_id: Callable[[str], str] = _new_id  # prefix ("lo", "rsv") -> fresh id
    observe_claim_to_registered: Callable[[float], None] = lambda _seconds: None
    # The views of one pool's agents only (the CP: from the agent directory, O(pool));
    # when given, used instead of ``agent_views``.
    agent_views_for: Callable[[PoolKey], Awaitable[list[dict[str, Any]]]] | None = None


# ---- messages ------------------------------------------------------------------------

@attrs.frozen
class SetTarget:
    target: PoolTarget


@attrs.frozen
class Describe:
    pass


@attrs.frozen
class ListOrders:
    include_finished: bool = True


@attrs.frozen
class HasOrder:
    order_id: str


@attrs.frozen
class Holds:
    """→ agent id → reservation id of live reservations (placement's ``reserved_for``);
    with ``by_deployment``, the deployment a reservation was made for where it names
    one (so that deployment's placement may use the agent)."""

    by_deployment: bool = False


@attrs.frozen
class Reserve:
    deployment_id: str | None = None
    ttl_s: float | None = None  # default: settings.reservation_ttl_s


@attrs.frozen
class ReleaseReservation:
    reservation_id: str


@attrs.frozen
class Claim:
    claimed_by: str | None = None  # the provisioner's account id


@attrs.frozen
class Provisioning:
    order_id: str
    by: str | None = None
    vm_name: str | None = None


@attrs.frozen
class Fulfil:
    order_id: str
    vm_name: str
    by: str | None = None


@attrs.frozen
class Fail:
    order_id: str
    error: str
    by: str | None = None


@attrs.frozen
class TokenPresented:
    token: str = attrs.field(repr=False)
    vm_name: str
    datacenter: str
    node_size: str
    agent_key: str | None = None  # e.g. hex SHA-256 of the agent's public key


@attrs.frozen
class Reconcile:
    pass


# ---- answers -------------------------------------------------------------------------

@attrs.frozen
class ClaimGrant:
    order: LaunchOrder
    bootstrap_token: str = attrs.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"order": self.order.view(rfc3339), "bootstrap_token": self.bootstrap_token}


@attrs.frozen
class TokenAccepted:
    order_id: str
    again: bool = False  # the same VM re-registering with its token


# ---- the actor -----------------------------------------------------------------------

class CapacityPoolActor(Actor):
    def __init__(self, key: PoolKey, deps: PoolDeps) -> None:
        self.key = key
        self.deps = deps
        self.state = PoolState(key)

    async def started(self) -> None:
        doc = await self.deps.load(self.key.ident)
        self.state = PoolState.from_doc(self.key, doc)
        self.start_soon(self._ticker)
        await self._reconcile()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.deps.settings.reconcile_interval_s)
            try:
                self.ref.try_tell(Reconcile())
            except ActorError:
                pass  # a Reconcile is already queued (or we are stopping): nothing lost

    # ---- plumbing --------------------------------------------------------------------

    async def _agents(self) -> list[AgentView]:
        views = (await self.deps.agent_views_for(self.key) if self.deps.agent_views_for
                 is not None else await self.deps.agent_views())
        agents = (AgentView.from_view(v) for v in views)
        return members((a for a in agents if a is not None), self.key)

    async def _commit(self, state: PoolState) -> None:
        """Save *state* (if it changed), then adopt it. Nothing is adopted unsaved."""
        if state != self.state:
            await self.deps.save(MANIFEST_KIND, self.key.ident, state.to_doc())
        self.state = state

    def _emit(self, kind: str, data: Mapping[str, Any]) -> None:
        self.deps.emit(kind, self.key.ident, data)

    def _order_event(self, order: LaunchOrder) -> None:
        kind = ("order.claim_expired" if order.state is OrderState.OPEN
                else f"order.{order.state.value}")
        self._emit(kind, {"order_id": order.order_id, "vm_name": order.vm_name,
                          "error": order.error})

    def _announce(self, step: Step) -> None:
        for order in step.opened:
            self._emit("order.opened", {"order_id": order.order_id})
        for order in step.changed:
            self._order_event(order)
        for r, reason in step.released:
            self._emit("reservation.released", {"reservation_id": r.reservation_id,
                                                "agent_id": r.agent_id, "reason": reason})

    def _step(self, state: PoolState, agents: Iterable[AgentView], now: float) -> Step:
        return reconcile(state, agents, now, self.deps.settings,
                         lambda: self.deps.new_id("lo"), ready=self.deps.ready())

    async def _reconcile(self) -> dict[str, Any]:
        agents = await self._agents()
        now = self.deps.clock()
        step = self._step(self.state, agents, now)
        await self._commit(step.state)
        self._announce(step)
        return pool_view(self.state, step.counts, now, self.deps.settings)

    async def _view(self) -> dict[str, Any]:
        agents = await self._agents()
        now = self.deps.clock()
        counts = classify(agents, self.state.target, self.state.reservations.values(), now)
        return pool_view(self.state, counts, now, self.deps.settings)

    async def _expired(self, now: float) -> PoolState:
        """Apply due deadlines (expired claims, provisioning timeouts) and save them."""
        state, changed = expire_orders(self.state, now)
        if changed:
            await self._commit(state)
            for order in changed:
                self._order_event(order)
        return self.state

    # ---- target and views ------------------------------------------------------------

    @handler(SetTarget)
    async def on_set_target(self, msg: SetTarget) -> dict[str, Any]:
        await self._commit(attrs.evolve(self.state, target=msg.target))
        self._emit("pool.target", msg.target.to_json())
        return await self._reconcile()

    @handler(Describe)
    async def on_describe(self, _: Describe) -> dict[str, Any]:
        return await self._view()

    @handler(ListOrders)
    async def on_list_orders(self, msg: ListOrders) -> list[dict[str, Any]]:
        orders = sorted(self.state.orders.values(), key=lambda o: (o.created_at, o.order_id))
        return [o.view(rfc3339) for o in orders if msg.include_finished or not o.final]

    @handler(HasOrder)
    async def on_has_order(self, msg: HasOrder) -> bool:
        return msg.order_id in self.state.orders

    @handler(Holds)
    async def on_holds(self, msg: Holds) -> dict[str, str]:
        now = self.deps.clock()
        if msg.by_deployment:
            return {a: r.deployment_id or r.reservation_id
                    for a, r in held(self.state.reservations.values(), now).items()}
        return reserved_for(self.state.reservations.values(), now)

    @handler(Reconcile)
    async def on_reconcile(self, _: Reconcile) -> dict[str, Any]:
        return await self._reconcile()

    # ---- reservations ----------------------------------------------------------------

    @handler(Reserve)
    async def on_reserve(self, msg: Reserve) -> Reservation | None:
        agents = await self._agents()
        now = self.deps.clock()
        first = self._step(self.state, agents, now)  # frees what is no longer held
        agent_id = choose_agent(agents, first.state.target,
                                first.state.reservations.values(), now)
        if agent_id is None:
            await self._commit(first.state)
            self._announce(first)
            return None
        ttl = msg.ttl_s if msg.ttl_s is not None else self.deps.settings.reservation_ttl_s
        reservation = Reservation(reservation_id=self.deps.new_id("rsv"), agent_id=agent_id,
                                  deployment_id=msg.deployment_id, created_at=now,
                                  expires_at=now + ttl)
        held = attrs.evolve(first.state, reservations={
            **first.state.reservations, reservation.reservation_id: reservation})
        second = self._step(held, agents, now)  # replenish what was just taken
        await self._commit(second.state)
        self._announce(first)
        self._announce(second)
        self._emit("reservation.made", reservation.to_json())
        return reservation

    @handler(ReleaseReservation)
    async def on_release(self, msg: ReleaseReservation) -> bool:
        reservation = self.state.reservations.get(msg.reservation_id)
        if reservation is None:
            return False
        rest = {k: v for k, v in self.state.reservations.items() if k != msg.reservation_id}
        await self._commit(attrs.evolve(self.state, reservations=rest))
        self._emit("reservation.released", {"reservation_id": msg.reservation_id,
                                            "agent_id": reservation.agent_id,
                                            "reason": "released"})
        return True

    # ---- launch orders ---------------------------------------------------------------

    @handler(Claim)
    async def on_claim(self, msg: Claim) -> ClaimGrant | None:
        now = self.deps.clock()
        state = await self._expired(now)
        waiting = sorted((o for o in state.orders.values() if o.state is OrderState.OPEN),
                         key=lambda o: (o.created_at, o.order_id))
        if not waiting:
            return None
        s = self.deps.settings
        issued = issue_token(self.key.datacenter, self.key.node_size)
        order = waiting[0].claim(now, ttl=s.claim_ttl_s, token_sha256=issued.sha256,
                                 by=msg.claimed_by)
        tokens = state.tokens.add(issued.sha256, TokenEntry(
            order.order_id, self.key.datacenter, self.key.node_size,
            expires_at=now + s.token_ttl_s))
        await self._commit(attrs.evolve(state.with_order(order), tokens=tokens))
        self._emit("order.claimed", {"order_id": order.order_id, "by": msg.claimed_by})
        return ClaimGrant(order, issued.token)

    async def _report(self, order_id: str, by: str | None,
                      apply: Callable[[LaunchOrder, float], LaunchOrder],
                      same: Callable[[LaunchOrder], bool]) -> LaunchOrder | OrderRefusal:
        now = self.deps.clock()
        state = await self._expired(now)
        order = state.orders.get(order_id)
        if order is None:
            return OrderRefusal(ORDER_UNKNOWN, f"no launch order {order_id} in pool "
                                               f"{self.key.ident}")
        if by is not None and order.claimed_by is not None and order.claimed_by != by:
            return OrderRefusal(ORDER_NOT_YOURS, f"launch order {order_id} is claimed by "
                                                 "another provisioner")
        if same(order):
            return order  # a repeated report: idempotent
        try:
            new = apply(order, now)
        except IllegalOrderTransition as exc:
            return OrderRefusal(ORDER_CONFLICT, f"{exc} (the claim may have expired)")
        except (TypeError, ValueError) as exc:  # a caller's bad value: refuse, don't crash
            return OrderRefusal(ORDER_CONFLICT, f"report refused: {exc}")
        tokens = state.tokens
        if new.state in (OrderState.FAILED, OrderState.CANCELLED):
            tokens = tokens.revoke(new.token_sha256, now)
        elif new.vm_name is not None:
            tokens = tokens.name_vm(new.token_sha256, new.vm_name)
        await self._commit(attrs.evolve(state.with_order(new), tokens=tokens))
        self._order_event(new)
        return new

    @handler(Provisioning)
    async def on_provisioning(self, msg: Provisioning) -> LaunchOrder | OrderRefusal:
        ttl = self.deps.settings.provision_ttl_s
        return await self._report(
            msg.order_id, msg.by,
            lambda o, now: o.provisioning(now, ttl=ttl, vm_name=msg.vm_name),
            lambda o: False)

    @handler(Fulfil)
    async def on_fulfil(self, msg: Fulfil) -> LaunchOrder | OrderRefusal:
        return await self._report(
            msg.order_id, msg.by, lambda o, now: o.fulfil(now, msg.vm_name),
            lambda o: o.state is OrderState.FULFILLED and o.vm_name == msg.vm_name)

    @handler(Fail)
    async def on_fail(self, msg: Fail) -> LaunchOrder | OrderRefusal:
        return await self._report(
            msg.order_id, msg.by, lambda o, now: o.fail(now, msg.error),
            lambda o: o.state is OrderState.FAILED)

    # ---- bootstrap tokens ------------------------------------------------------------

    @handler(TokenPresented)
    async def on_token(self, msg: TokenPresented) -> TokenAccepted | TokenRefusal:
        now = self.deps.clock()
        state = await self._expired(now)
        outcome = state.tokens.consume(msg.token, now, datacenter=msg.datacenter,
                                       node_size=msg.node_size, vm_name=msg.vm_name,
                                       agent_key=msg.agent_key)
        if outcome.refusal is not None:
            self._emit("token.refused", {"vm_name": msg.vm_name, "code": outcome.refusal.code})
            return outcome.refusal
        assert outcome.order_id is not None
        if outcome.again:
            return TokenAccepted(outcome.order_id, again=True)
        order = state.orders.get(outcome.order_id)
        if order is None or order.state not in TOKEN_STATES:
            refusal = TokenRefusal(TOKEN_EXPIRED, "the launch order of this bootstrap token "
                                                  "is no longer live")
            self._emit("token.refused", {"vm_name": msg.vm_name, "code": refusal.code})
            return refusal
        if order.state is OrderState.CLAIMED:
            order = order.provisioning(now, ttl=self.deps.settings.provision_ttl_s,
                                       vm_name=msg.vm_name)
        order = order.registered(now, msg.vm_name)
        await self._commit(attrs.evolve(state.with_order(order), tokens=outcome.book))
        if order.claimed_at is not None:
            self.deps.observe_claim_to_registered(max(0.0, now - order.claimed_at))
        self._emit("order.registered", {"order_id": order.order_id, "vm_name": msg.vm_name})
        return TokenAccepted(order.order_id)


# ---- the CP's side: finding and starting pools ------------------------------------------

def pool_spec(registry: Registry, key: PoolKey, deps: PoolDeps) -> ChildSpec:
    return actor_spec(registry, key.actor_name, lambda: CapacityPoolActor(key, deps),
                      restart=Restart.PERMANENT, mailbox_size=256)


def key_of(actor_name: str) -> PoolKey | None:
    """The pool an actor name (``pool/<dc>/<size>``) stands for."""
    parts = actor_name.split("/")
    if len(parts) != 3 or parts[0] != "pool":
        return None
    return PoolKey(parts[1], parts[2])


async def present_token(registry: Registry, token: str, *, vm_name: str, datacenter: str,
                        node_size: str, agent_key: str | None = None,
                        timeout: float = 10.0) -> TokenAccepted | TokenRefusal:
    """Registration's check of a bootstrap token: routed to the pool it was issued by.

    A crash or timeout of the pool raises (``ActorError``): not the VM's fault, but
    not a reason to admit it either.
    """
    routed = pool_of_token(token)
    if routed is None:
        return TokenRefusal(TOKEN_UNKNOWN, "not a bootstrap token")
    name = PoolKey(*routed).actor_name
    try:
        ref = registry.ref(name)
    except (ActorDead, ValueError):
        return TokenRefusal(TOKEN_UNKNOWN, "this bootstrap token was never issued here")
    answer: TokenAccepted | TokenRefusal = await ref.ask(
        TokenPresented(token, vm_name, datacenter, node_size, agent_key), timeout=timeout)
    return answer


class PoolDirectory:
    """Starts pool actors on demand under the CP's dynamic ``capacity`` supervisor."""

    def __init__(self, registry: Registry, supervisor: Supervisor, deps: PoolDeps) -> None:
        self.registry = registry
        self.supervisor = supervisor
        self.deps = deps
        self._lock = trio.Lock()

    def keys(self) -> list[PoolKey]:
        found = (key_of(n) for n in self.registry.names("pool/"))
        return sorted(k for k in found if k is not None)

    async def ensure(self, key: PoolKey) -> ActorRef:
        """The pool's ref, starting its actor first if it is not running."""
        async with self._lock:
            if key.actor_name not in self.registry:
                try:
                    await self.supervisor.start_child(pool_spec(self.registry, key, self.deps))
                except ChildExists:
                    pass  # restarting under the supervisor: its name comes back
            return self.registry.ref(key.actor_name)

    async def populate(self, keys: Iterable[PoolKey]) -> None:
        """Start a pool per saved manifest (call from the supervisor's populate hook)."""
        for key in keys:
            await self.ensure(key)

    async def describe_all(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        views: list[dict[str, Any]] = []
        for key in self.keys():
            try:
                views.append(await self.registry.ref(key.actor_name).ask(Describe(),
                                                                          timeout=timeout))
            except ActorError as exc:
                log.info("pool %s: no view (%s)", key.ident, exc)
        return views

    async def holds(self, timeout: float = 10.0, *,
                    by_deployment: bool = False) -> dict[str, str]:
        """Agent id → reservation id over every pool (for ``AgentInfo.reserved_for``)."""
        out: dict[str, str] = {}
        for key in self.keys():
            try:
                out.update(await self.registry.ref(key.actor_name).ask(
                    Holds(by_deployment), timeout=timeout))
            except ActorError as exc:
                log.info("pool %s: no holds (%s)", key.ident, exc)
        return out

    async def find_order(self, order_id: str, timeout: float = 10.0) -> ActorRef | None:
        """The pool holding launch order *order_id* (for fulfil/fail by id)."""
        for key in self.keys():
            try:
                ref = self.registry.ref(key.actor_name)
                if await ref.ask(HasOrder(order_id), timeout=timeout):
                    return ref
            except ActorError:
                continue
        return None
