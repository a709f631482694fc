"""Capacity routes: pool targets and views (admin), launch orders (admin to list,
provisioner keys to claim and report). The decisions are in ``ee.capacity`` and the
CapacityPoolActors; this module only checks auth and input and maps answers to HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from ee.capacity.orders import OrderRefusal, rfc3339
from ee.cp.errors import ApiError, json_object, json_response, not_found
from ee.cp.tenants import Auth

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane




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
    async def pools() -> Response:
        auth.admin_only()
        return json_response({"pools": await cp.pools.describe_all()})

    @app.get("/api/v2/capacity/launch-orders")
    async def orders() -> Response:
        auth.admin_only()
        out: list[dict[str, Any]] = []
        for key in cp.pools.keys():  # noqa: SIM118 (a PoolDirectory, not a dict)
            out.extend(await cp.registry.ref(key.actor_name).ask(
                pool_actor.ListOrders(include_finished=True), timeout=10))
        return json_response({"orders": out})

    @app.post("/api/v2/capacity/launch-orders/claim")
    async def claim() -> Response:
        await auth.authenticate(("provisioner",))
        body = await json_object()
        dc, size = body.get("datacenter"), body.get("node_size")
        if not isinstance(dc, str) or not isinstance(size, str):
            raise ApiError(400, "bad_request", "body must be {datacenter, node_size}")
        key = key_of(dc, size)
        if key.actor_name not in cp.registry:
            return Response(b"", status=204)
        grant = await cp.registry.ref(key.actor_name).ask(
            pool_actor.Claim(claimed_by=g.account_id), timeout=30)
        if grant is None:
            return Response(b"", status=204)
        cp.events.emit("order.claim", grant.order.order_id, {"by": g.account_id})
        return json_response(grant.to_json())

    async def report(order_id: str, make: Any) -> Response:
        await auth.authenticate(("provisioner",))
        body = await json_object()
        ref = await cp.pools.find_order(order_id)
        if ref is None:
            raise not_found("launch order", order_id)
        answer = await ref.ask(make(body), timeout=30)
        if isinstance(answer, OrderRefusal):
            raise ApiError(answer.http_status, answer.code.lower(), answer.message)
        assert isinstance(answer, LaunchOrder)
        return json_response(answer.view(rfc3339))

    def text(body: dict[str, Any], field: str, *, required: bool = True) -> str | None:
        value = body.get(field)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > 1000:
            raise ApiError(400, "bad_request",
                           f"'{field}' must be a non-empty string of at most 1000 characters",
                           {"field": field})
        return value

    @app.post("/api/v2/capacity/launch-orders/<order_id>/fulfil")
    async def fulfil(order_id: str) -> Response:
        return await report(order_id, lambda b: pool_actor.Fulfil(
            order_id, str(text(b, "vm_name")), by=g.account_id))

    @app.post("/api/v2/capacity/launch-orders/<order_id>/fail")
    async def fail(order_id: str) -> Response:
        return await report(order_id, lambda b: pool_actor.Fail(
            order_id, str(text(b, "error")), by=g.account_id))

    @app.post("/api/v2/capacity/launch-orders/<order_id>/provisioning")
    async def provisioning(order_id: str) -> Response:
        return await report(order_id, lambda b: pool_actor.Provisioning(
            order_id, by=g.account_id, vm_name=text(b, "vm_name", required=False)))
