"""Capacity routes: pool targets and views (admin), launch orders (admin to list,
provisioner keys to claim and report). The decisions are in ``ee.capacity`` and the
CapacityPoolActors; this module only checks auth and input and maps answers to HTTP.
Request bodies are the frozen classes below, structured strictly at the edge
(``errors.request_body``: unknown fields and wrong types are a 400 naming the field).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from quart import Response, g
from quart_trio import QuartTrio

from ee.actors import pool as pool_actor
from ee.capacity import (
    LaunchOrder,
    PoolKey,
    PoolKeyError,
    PoolTarget,
    TargetError,
)
from ee.capacity.orders import MAX_TEXT, OrderRefusal, rfc3339
from ee.cp.errors import ApiError, Who, guard, json_object, json_response, not_found, request_body
from ee.protocol.strict import check

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane
    from ee.cp.tenants import Auth

def _text(value: str) -> bool:
    return bool(value.strip()) and len(value) <= MAX_TEXT


_TEXT = check(_text, f"must be a non-empty string of at most {MAX_TEXT} characters")


@attrs.frozen
class ClaimRequest:
    """``POST /api/v2/capacity/launch-orders/claim``: the pool to claim an order from."""

    datacenter: str
    node_size: str


@attrs.frozen
class FulfilRequest:
    """``POST …/launch-orders/{id}/fulfil``: the VM booted for the order."""

    vm_name: str = attrs.field(validator=_TEXT)


@attrs.frozen
class FailRequest:
    """``POST …/launch-orders/{id}/fail``: why the order could not be fulfilled."""

    error: str = attrs.field(validator=_TEXT)


@attrs.frozen
class ProvisioningRequest:
    """``POST …/launch-orders/{id}/provisioning``: the VM is being made (name if known)."""

    vm_name: str | None = attrs.field(default=None, validator=_TEXT)


def register(app: QuartTrio, cp: ControlPlane, auth: Auth) -> None:
    def key_of(datacenter: str, node_size: str) -> PoolKey:
        vocab = cp.config.vocabulary
        try:
            return PoolKey.from_request(datacenter, node_size, node_sizes=vocab.sizes,
                                        normalise_label=vocab.normalise_label)
        except PoolKeyError as exc:
            raise ApiError(400, "bad_request", exc.reason,
                           {"field": exc.field, "code": exc.code}) from None

    @app.put("/api/v2/capacity/pools/<datacenter>/<node_size>")
    @guard(Who.ADMIN)
    async def set_target(datacenter: str, node_size: str) -> Response:
        auth.admin_only()
        key = key_of(datacenter, node_size)
        try:
            target = PoolTarget.from_json(await json_object())
        except TargetError as exc:
            raise ApiError(400, "bad_request", str(exc), {"field": exc.field}) from None
        ref = await cp.pools.ensure(key)
        view = await ref.ask(pool_actor.SetTarget(target), timeout=30)
        return json_response(view)

    @app.get("/api/v2/capacity/pools")
    @guard(Who.ADMIN)
    async def pools() -> Response:
        auth.admin_only()
        return json_response({"pools": await cp.pools.describe_all()})

    @app.get("/api/v2/capacity/launch-orders")
    @guard(Who.ADMIN)
    async def orders() -> Response:
        auth.admin_only()
        out: list[dict[str, Any]] = []
        for key in cp.pools.keys():  # noqa: SIM118 (a PoolDirectory, not a dict)
            out.extend(await cp.registry.ref(key.actor_name).ask(
                pool_actor.ListOrders(include_finished=True), timeout=10))
        return json_response({"orders": out})

    @app.post("/api/v2/capacity/launch-orders/claim")
    @guard(Who.PROVISIONER)
    async def claim() -> Response:
        await auth.authenticate(("provisioner",))
        body = await request_body(ClaimRequest)
        key = key_of(body.datacenter, body.node_size)
        if key.actor_name not in cp.registry:
            return Response(b"", status=204)
        grant = await cp.registry.ref(key.actor_name).ask(
            pool_actor.Claim(claimed_by=g.account_id), timeout=30)
        if grant is None:
            return Response(b"", status=204)
        cp.events.emit("order.claim", grant.order.order_id, {"by": g.account_id})
        return json_response(grant.to_json())

    async def report(order_id: str, message: object) -> Response:
        ref = await cp.pools.find_order(order_id)
        if ref is None:
            raise not_found("launch order", order_id)
        answer = await ref.ask(message, timeout=30)
        if isinstance(answer, OrderRefusal):
            raise ApiError(answer.http_status, answer.code.lower(), answer.message)
        assert isinstance(answer, LaunchOrder)
        return json_response(answer.view(rfc3339))

    @app.post("/api/v2/capacity/launch-orders/<order_id>/fulfil")
    @guard(Who.PROVISIONER)
    async def fulfil(order_id: str) -> Response:
        await auth.authenticate(("provisioner",))
        body = await request_body(FulfilRequest)
        return await report(order_id, pool_actor.Fulfil(order_id, body.vm_name,
                                                        by=g.account_id))

    @app.post("/api/v2/capacity/launch-orders/<order_id>/fail")
    @guard(Who.PROVISIONER)
    async def fail(order_id: str) -> Response:
        await auth.authenticate(("provisioner",))
        body = await request_body(FailRequest)
        return await report(order_id, pool_actor.Fail(order_id, body.error, by=g.account_id))

    @app.post("/api/v2/capacity/launch-orders/<order_id>/provisioning")
    @guard(Who.PROVISIONER)
    async def provisioning(order_id: str) -> Response:
        await auth.authenticate(("provisioner",))
        body = await request_body(ProvisioningRequest, required=False)
        return await report(order_id, pool_actor.Provisioning(
            order_id, by=g.account_id, vm_name=body.vm_name))
