"""The CP's HTTP surface (Quart-Trio on Hypercorn): health, readiness, admin views,
metrics and the admin events websocket.

Every route answers JSON; every failure goes through ``errors.from_exception`` and
comes out in API.md's error shape with a 4xx/5xx status — never a stack trace. Admin
routes need ``Authorization: Bearer <admin token>`` (compared in constant time
against the hash in the bootstrap bundle).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ee import __version__
from ee.actors.agent import Describe, SetDrain
from ee.actors.datacenter import DescribeDatacenter
from ee.cp.errors import (
    ApiError,
    bearer_token,
    from_exception,
    json_object,
    json_response,
    not_found,
    require_admin,
)
from ee.runtime import ActorError

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane

P = ParamSpec("P")
R = TypeVar("R")



def make_app(cp: ControlPlane) -> QuartTrio:
    app = QuartTrio("ee.cp")
    app.config["MAX_CONTENT_LENGTH"] = cp.config.max_request_bytes

    def admin(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            require_admin(cp.bootstrap.admin_token_ok)
            return await fn(*args, **kwargs)

        return wrapper

    @app.before_request
    async def read_body_first() -> None:
        # Read the whole (size-capped) body before any answer: answering a request
        # whose body is still unread (e.g. 401 before the body) can leave a kept-alive
        # connection hanging under Hypercorn.
        await request.get_data()

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return json_response(exc.body(), exc.status)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name or "error"
        if status == 404:
            message = f"no route {request.method} {request.path}"
        return json_response(ApiError(status, code, message).body(), status)

    @app.errorhandler(Exception)
    async def any_error(exc: Exception) -> Response:
        err = from_exception(exc)
        return json_response(err.body(), err.status)

    @app.get("/api/v2/health")
    async def health() -> Response:
        return json_response({"status": "ok", "role": cp.config.role, "version": __version__,
                      "cluster_id": cp.bootstrap.cluster_id})

    @app.get("/api/v2/ready")
    async def ready() -> Response:
        state = cp.readiness()
        return json_response(state.to_dict(), 200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        await cp.refresh_metrics()
        return Response(cp.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/api/v2/agents")
    @admin
    async def list_agents() -> Response:
        views = await cp.describe_agents()
        status = request.args.get("status")
        if status:
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
        body = await json_object(required=False)
        draining = True
        if "draining" in body:
            if not isinstance(body["draining"], bool):
                raise ApiError(400, "bad_request", "'draining' must be true or false")
            draining = body["draining"]
        try:
            view = await cp.registry.ref(f"agent/{agent_id}").ask(SetDrain(draining),
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
                out.append(await cp.registry.ref(name).ask(DescribeDatacenter(), timeout=5))
            except ActorError:
                continue
        return json_response({"datacenters": out})

    @app.get("/api/v2/admin/tree")
    @admin
    async def tree() -> Response:
        return json_response(cp.root.snapshot().to_dict())

    @app.post("/api/v2/admin/crash")
    @admin
    async def crash() -> Response:
        body = await json_object()
        if not isinstance(body.get("name"), str):
            raise ApiError(400, "bad_request", "body must be {\"name\": \"<actor or child>\"}")
        name = body["name"]
        if not cp.root.crash(name):
            raise not_found("running actor or child", name)
        cp.events.emit("chaos.crash", name, {"by": "admin"})
        return json_response({"crashed": name}, 202)

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

    from ee.cp import capacity_routes, tenants

    auth = tenants.register(app, cp)
    capacity_routes.register(app, cp, auth)
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
    await serve(app, config, shutdown_trigger=shutdown.wait,
                task_status=task_status)
