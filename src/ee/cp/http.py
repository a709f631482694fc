"""The CP's HTTP surface (Quart-Trio on Hypercorn): health, readiness, admin views,
metrics and the admin events websocket.

Every route answers JSON; every failure goes through ``errors.from_exception`` and
comes out in API.md's error shape with a 4xx/5xx status — never a stack trace. Admin
routes need ``Authorization: Bearer <admin token>`` (compared in constant time
against the hash in the bootstrap bundle).

Theory of operation of the request gate (``gate``, run before every route):

* **Credentials before bodies.** Who may call a route is known from its headers
  alone, so the gate decides it before a single byte of the body is read: a route
  marked ``guard(Who.ADMIN)``, ``guard(Who.TENANT)`` or ``guard(Who.PROVISIONER)``
  checks exactly that; any other non-public route needs *some* valid credential (the
  admin token or a live API key; the route itself then checks the kind). A refusal
  here is answered at once, with ``Connection: close``: the unread body must not be
  taken for the next request, and the connection is not worth keeping for a caller
  without credentials.
* **Small bodies for strangers.** Public routes (``Who.PUBLIC``) and unknown routes
  (404, 405) read at most ``ANONYMOUS_BODY_BYTES`` within ``ANONYMOUS_BODY_TIMEOUT_S``;
  more is a 413, slower a 408, and either closes the connection. Authenticated callers
  get ``max_request_bytes`` (and Quart's body timeout).
* **Bodies are read before the route answers** (for authenticated callers): a route
  that answered with the body half-read would have to close the connection too.
* **Large bodies are counted.** A body over ``LARGE_BODY_BYTES``, or of unknown length
  (chunked), takes a slot of its caller (``LARGE_BODIES_PER_CALLER``) and of the CP
  (``LARGE_BODIES``) before a byte of it is read, held until the request is answered
  (``teardown_request``): one tenant opening many uploads of ``max_request_bytes``
  cannot fill the CP's memory. No slot free: 429 ``too_many_uploads`` (connection
  closed, the body unread).
* **Answers sent before the body was read must close the connection.** Hypercorn does
  close it (the client is still mid-request), but it runs that close inside the app's
  task, which Quart-Trio cancels as soon as the response is out: the close was
  cancelled and the connection hung, kept open with the rest of the body unread.
  ``serve_http`` therefore shields the sending of a response's last chunk (bounded by
  ``FINAL_SEND_GRACE_S``) so Hypercorn's close runs to completion.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

import attrs
import trio
from quart import Response, g, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.routing.exceptions import WebsocketMismatch

from ee import __version__
from ee.actors.agent import Describe, SetDrain
from ee.actors.datacenter import DescribeDatacenter
from ee.cp.errors import (
    ApiError,
    Who,
    bearer_token,
    from_exception,
    guard,
    json_response,
    not_found,
    request_body,
    require_admin,
    who_may_call,
)
from ee.cp.metrics import count_http
from ee.cp.rest import RestError
from ee.placement.core import STATUSES
from ee.runtime import ActorError

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane
    from ee.cp.tenants import Auth

P = ParamSpec("P")
R = TypeVar("R")

ANONYMOUS_BODY_BYTES: Final = 16 << 10
"""The most body a caller without credentials may send (public and unknown routes)."""
ANONYMOUS_BODY_TIMEOUT_S = 10.0
"""How long such a body may take to arrive (then 408, connection closed)."""
FINAL_SEND_GRACE_S: Final = 10.0
"""How long the last chunk of a response (and Hypercorn's close after it) may take."""
LARGE_BODY_BYTES: Final = 1 << 20
"""A body over this (or of unknown length: chunked) is a *large* one."""
LARGE_BODIES_PER_CALLER: Final = 2
LARGE_BODIES: Final = 16
"""Requests with a large body in flight, per caller (account, or the admin) and in all
(each may hold up to ``max_request_bytes`` until it is answered); more are 429."""


@attrs.frozen
class DrainRequest:
    """``POST /api/v2/agents/{id}/drain`` (no body drains)."""

    draining: bool = True


# What injected 500s spare: the route that turns them off, and /metrics, through which a
# guardrail observes them (a drill whose 5xx also fail the scrape at random observes
# nothing for a pass and resets the breach clock: the drill itself would be flaky).
CHAOS_SPARED: Final = frozenset({"/api/v2/admin/chaos/errors", "/metrics"})


@attrs.frozen
class ChaosErrorsRequest:
    """``POST /api/v2/admin/chaos/errors`` (dev only): answer this share of requests 500."""

    rate: float = attrs.field(validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])


@attrs.frozen
class CrashRequest:
    """``POST /api/v2/admin/crash``."""

    name: str


def make_app(cp: ControlPlane) -> QuartTrio:
    app = QuartTrio("ee.cp")
    app.asgi_app = count_http(app.asgi_app, cp.metrics)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = cp.config.max_request_bytes
    auth: Auth | None = None  # set once the tenant routes are registered, below
    chaos_errors = [0.0]  # dev only: share of requests answered 500 (rollout drills)

    def admin(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            require_admin(cp.bootstrap.admin_token_ok)  # also checked by the gate
            return await fn(*args, **kwargs)

        return guard(Who.ADMIN)(wrapper)

    async def check_caller(who: Who) -> None:
        """Raise the refusal for a caller that may not call a *who* route (headers only)."""
        if who is Who.ADMIN:
            require_admin(cp.bootstrap.admin_token_ok)
            return
        assert auth is not None
        if who in (Who.TENANT, Who.PROVISIONER):
            await auth.authenticate((who.value,))
            return
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or not cp.bootstrap.admin_token_ok(token):
            await auth.authenticate(("tenant", "provisioner"))

    async def read_anonymous_body() -> None:
        declared = request.content_length
        if declared is not None and declared > ANONYMOUS_BODY_BYTES:
            raise too_large(ANONYMOUS_BODY_BYTES)
        seen = bytearray()
        with trio.move_on_after(ANONYMOUS_BODY_TIMEOUT_S) as slow:
            async for chunk in request.body:
                seen += chunk
                if len(seen) > ANONYMOUS_BODY_BYTES:
                    raise too_large(ANONYMOUS_BODY_BYTES)
        if slow.cancelled_caught:
            raise ApiError(408, "request_timeout", "the request body came too slowly",
                           {"timeout_s": ANONYMOUS_BODY_TIMEOUT_S}, close_connection=True)
        g.public_body = bytes(seen)  # consumed here: a public route reads it from g

    large_slots = trio.CapacityLimiter(LARGE_BODIES)
    caller_slots: dict[str, trio.CapacityLimiter] = {}

    def large_body() -> bool:
        declared = request.content_length
        if declared is not None:
            return declared > LARGE_BODY_BYTES
        if request.http_version in ("1.0", "1.1"):  # no length, not chunked: no body
            return "Transfer-Encoding" in request.headers
        return request.method not in ("GET", "HEAD", "OPTIONS", "DELETE")  # HTTP/2

    def take_large_slot() -> None:
        """A slot for this request's large body (429 when none is free)."""
        caller = str(getattr(g, "account_id", None) or "admin")
        mine = caller_slots.setdefault(caller, trio.CapacityLimiter(LARGE_BODIES_PER_CALLER))
        token = object()
        try:
            mine.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            raise busy_uploads(f"at most {LARGE_BODIES_PER_CALLER} large request bodies "
                               "of one caller at a time") from None
        try:
            large_slots.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            mine.release_on_behalf_of(token)
            raise busy_uploads("too many large request bodies at once") from None
        g.large_slot = (caller, token)

    def busy_uploads(message: str) -> ApiError:
        return ApiError(429, "too_many_uploads", f"{message}; retry shortly",
                        {"retry_after_s": 5}, headers={"Retry-After": "5"},
                        close_connection=True)

    @app.teardown_request
    async def release_large_slot(_: BaseException | None) -> None:
        held = g.pop("large_slot", None)
        if held is None:
            return
        caller, token = held
        large_slots.release_on_behalf_of(token)
        mine = caller_slots[caller]
        mine.release_on_behalf_of(token)
        if mine.borrowed_tokens == 0:
            del caller_slots[caller]

    def too_large(limit: int) -> ApiError:
        return ApiError(413, "too_large", f"the request body is over {limit} bytes",
                        {"limit": limit}, close_connection=True)

    @app.before_request
    async def gate() -> None:
        view = app.view_functions.get(request.endpoint or "") \
            if request.url_rule is not None else None
        who = who_may_call(view)
        if chaos_errors[0] and request.path not in CHAOS_SPARED \
                and random.random() < chaos_errors[0]:
            raise ApiError(500, "chaos", "injected by /api/v2/admin/chaos/errors",
                           close_connection=True)
        if who is Who.PUBLIC:
            await read_anonymous_body()
            return
        try:
            await check_caller(who)
        except ApiError as exc:
            exc.close_connection = True  # answered before the body was read
            raise
        if large_body():
            take_large_slot()
        try:
            await request.get_data()
        except RequestEntityTooLarge:
            raise too_large(cp.config.max_request_bytes) from None

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return exc.response()

    @app.errorhandler(RestError)
    async def rest_error(exc: RestError) -> Response:
        return ApiError(400, exc.code, exc.message,
                        {"field": exc.field} if exc.field else {}).response()

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name or "error"
        headers: dict[str, str] = {}
        details: dict[str, Any] = {}
        if status == 404:
            message = f"no route {request.method} {request.path}"
        if isinstance(exc, WebsocketMismatch):  # an HTTP request to a websocket route
            return ApiError(426, "upgrade_required",
                            f"{request.path} is a websocket: open it with an upgrade",
                            headers={"Upgrade": "websocket"}).response()
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            allowed = sorted(exc.valid_methods)
            headers["Allow"] = ", ".join(allowed)
            details["allowed"] = allowed
            message = f"{request.method} is not allowed on {request.path}; " \
                      f"allowed: {headers['Allow']}"
        # 413 (body over the limit) and 408 (body too slow): the body is still unread.
        close = status in (408, 413)
        return ApiError(status, code, message, details, headers=headers,
                        close_connection=close).response()

    @app.errorhandler(Exception)
    async def any_error(exc: Exception) -> Response:
        return from_exception(exc).response()

    @app.get("/api/v2/health")
    @guard(Who.PUBLIC)
    async def health() -> Response:
        return json_response({"status": "ok", "role": cp.config.role, "version": __version__,
                      "cluster_id": cp.bootstrap.cluster_id})

    @app.get("/api/v2/ready")
    @guard(Who.PUBLIC)
    async def ready() -> Response:
        state = cp.readiness()
        return json_response(state.to_dict(), 200 if state.ready else 503)

    @app.get("/metrics")
    @guard(Who.PUBLIC)
    async def metrics() -> Response:
        await cp.refresh_metrics()
        return Response(cp.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/api/v2/agents")
    @admin
    async def list_agents() -> Response:
        given = request.args.getlist("status")
        status = given[0] if given else None
        if len(given) > 1 or (status is not None and status not in STATUSES):
            raise ApiError(400, "bad_request",
                           f"'status' must be one of {', '.join(STATUSES)} (once)",
                           {"field": "status", "allowed": list(STATUSES)})
        views = await cp.describe_agents()
        if status is not None:
            views = [v for v in views if v["status"] == status]
        return json_response({"agents": views})

    @app.get("/api/v2/agents/<agent_id>")
    @admin
    async def get_agent(agent_id: str) -> Response:
        try:
            view = await cp.registry.ref(f"agent/{agent_id}").ask(Describe(), timeout=5)
        except ActorError:
            raise not_found("agent", agent_id) from None
        return json_response(view)

    @app.post("/api/v2/agents/<agent_id>/drain")
    @admin
    async def drain(agent_id: str) -> Response:
        body = await request_body(DrainRequest, required=False)
        try:
            view = await cp.registry.ref(f"agent/{agent_id}").ask(SetDrain(body.draining),
                                                                  timeout=5)
        except ActorError:
            raise not_found("agent", agent_id) from None
        return json_response(view)

    @app.get("/api/v2/datacenters")
    @admin
    async def datacenters() -> Response:
        out = []
        for name in cp.registry.names("dc/"):
            try:
                view = await cp.registry.ref(name).ask(DescribeDatacenter(), timeout=5)
            except ActorError:
                continue
            view.setdefault("label", view.get("datacenter"))
            view.setdefault("mode", "direct")  # federated: ee.federation.master
            view.setdefault("sync_lag_s", 0.0)
            view.setdefault("spool_depth", 0)
            out.append(view)
        return json_response({"datacenters": out})

    @app.get("/api/v2/admin/tree")
    @admin
    async def tree() -> Response:
        return json_response(cp.root.snapshot().to_dict())

    @app.post("/api/v2/admin/crash")
    @admin
    async def crash() -> Response:
        name = (await request_body(CrashRequest)).name
        if not cp.root.crash(name):
            raise not_found("running actor or child", name)
        cp.events.emit("chaos.crash", name, {"by": "admin"})
        return json_response({"crashed": name}, 202)

    @app.post("/api/v2/admin/chaos/errors")
    @admin
    async def chaos_errors_route() -> Response:
        if not cp.config.dev:
            raise ApiError(403, "dev_only", "injected errors exist only under --dev")
        chaos_errors[0] = (await request_body(ChaosErrorsRequest)).rate
        cp.events.emit("chaos.errors", "http", {"rate": chaos_errors[0], "by": "admin"})
        return json_response({"rate": chaos_errors[0]})

    @app.websocket("/api/v2/admin/events")
    async def events() -> None:
        token = bearer_token(websocket.headers.get("Authorization")) or websocket.args.get("token")
        if token is None or not cp.bootstrap.admin_token_ok(token):
            await websocket.close(1008, "admin token required")
            return
        await websocket.accept()
        async with cp.events.subscribe() as stream:
            for event in list(cp.events.recent[-20:]):
                await websocket.send(json.dumps(event.to_dict()))
            async for event in stream:
                await websocket.send(json.dumps(event.to_dict()))

    from ee.cp import (
        billing_routes,
        capacity_routes,
        deployment_routes,
        identity_routes,
        release_routes,
        secret_routes,
        tenants,
    )

    quotas = tenants.TenantQuotas(max_versions=cp.config.tenant_max_versions,
                                  max_stored_bytes=cp.config.tenant_max_stored_bytes)
    auth = tenants.register(app, cp, quotas=quotas)
    capacity_routes.register(app, cp, auth)
    identity_routes.register(app, cp, auth)
    release_routes.register(app, cp, auth)
    secret_routes.register(app, cp, auth)
    billing_routes.register(app, cp, auth)
    from ee.federation import routes as federation_routes

    federation_routes.register(app, cp)
    deployment_routes.register(app, cp, auth)
    return app


def _shield_final_send(asgi: Any) -> Any:
    """ASGI middleware: the last chunk of an HTTP response (and what Hypercorn does
    right after it, closing the connection of a request whose body is unread) runs
    shielded from the app's cancellation, for at most ``FINAL_SEND_GRACE_S``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await asgi(scope, receive, send)
            return

        async def send_final_shielded(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True) as scope_:
                    scope_.deadline = trio.current_time() + FINAL_SEND_GRACE_S
                    await send(message)
                return
            await send(message)

        await asgi(scope, receive, send_final_shielded)

    return app


async def serve_http(app: QuartTrio, bind: str, shutdown: trio.Event,
                     certfile: str | None, keyfile: str | None,
                     task_status: trio.TaskStatus[list[str]]) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.graceful_timeout = 5
    config.accesslog = None
    config.errorlog = "-"
    if certfile and keyfile:
        config.certfile = certfile
        config.keyfile = keyfile
    await serve(_shield_final_send(app), config, shutdown_trigger=shutdown.wait,
                task_status=task_status)
