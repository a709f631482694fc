"""The agent's HTTP port (Quart-Trio on Hypercorn): its own routes, then the workload.

Own routes (API.md, "Agent HTTP"):

- ``GET /api/health``: liveness and what runs; with ``?attest=true&nonce=<hex>`` it
  adds a quote whose REPORTDATA is ``health_report_data(nonce, compose hash)``, so a
  client can check which code answers it (compose hashes are ``"sha256:<hex>"``;
  the quote binds the digest bytes);
- ``GET /api/state-snapshot``, ``/api/logs``, ``/api/stats``, ``/api/control/challenge``:
  need ``Authorization: Bearer <per-agent secret>`` (compared in constant time).

Every other path and method is reverse-proxied to the current deployment's exposed
container (``ComposeRunner.upstream``) through httpx, streaming both ways: the request
body is forwarded as it arrives (with its ``Content-Length`` when it had one) and the
response body as the workload produces it. Hop-by-hop headers are dropped and
``X-Forwarded-*`` added. No workload, or one that does not answer, is a 502 with a JSON
error; a connect failure also makes the agent re-inspect the deployment, so a dead
container shows up as ``failed`` at once. Errors are ``{"error": {"code", "message",
"details"}}``, never a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ee.agent.server import Agent
from ee.agent.workload import DeploymentStatus, UnknownDeployment
from ee.protocol.messages import body_to_dict
from ee.protocol.reportdata import health_report_data

__all__ = ["make_app", "serve_http"]

log = logging.getLogger("ee.agent.http")

PROXY_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
MAX_NONCE_BYTES = 64


class AgentHttpError(Exception):
    """A refusal with a status, code and message (mapped to the JSON error shape)."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    return _json({"error": {"code": code, "message": message, "details": details or {}}}, status)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _hop_by_hop(connection_values: list[str]) -> set[str]:
    """Hop-by-hop names, including those the ``Connection`` header(s) list."""
    names = set(HOP_BY_HOP)
    for value in connection_values:
        names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return names


def make_app(agent: Agent, client: httpx.AsyncClient) -> QuartTrio:
    app = QuartTrio("ee.agent")
    app.config["MAX_CONTENT_LENGTH"] = None  # the workload decides what it accepts
    app.config["BODY_TIMEOUT"] = None
    app.config["RESPONSE_TIMEOUT"] = None

    def require_secret() -> None:
        token = _bearer(request.headers.get("Authorization"))
        if token is None or not hmac.compare_digest(
            token.encode("utf-8"), agent.secret.encode("utf-8")
        ):
            raise AgentHttpError(
                401,
                "unauthenticated",
                "this route needs 'Authorization: Bearer <agent secret>'",
            )

    @app.errorhandler(AgentHttpError)
    async def on_agent_error(exc: AgentHttpError) -> Response:
        return _error(exc.status, exc.code, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        return _error(status, name, exc.description or exc.name or "error")

    @app.errorhandler(Exception)
    async def on_crash(exc: Exception) -> Response:
        log.exception("agent HTTP handler failed")
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    @app.get("/api/health")
    async def health() -> Response:
        status = agent.current_status()
        health = agent.health()
        body: dict[str, Any] = {
            "status": health.status,
            "detail": health.detail,
            "vm_name": agent.vm_name,
            "agent_id": agent.agent_id,
            "deployments": [_deployment_view(d) for d in agent.runner.deployments()],
            "compose_hash": status.compose_hash if status else None,
            "cp_connected": agent.link is not None,
            "tunnel": agent.tunnel.status.to_json() if agent.tunnel else None,
        }
        if request.args.get("attest", "").lower() in ("1", "true", "yes"):
            body["attestation"] = await _attest(agent, status.compose_hash if status else None)
        return _json(body)

    @app.get("/api/state-snapshot")
    async def state_snapshot() -> Response:
        require_secret()
        body = body_to_dict(agent.snapshot())
        body.update(agent_id=agent.agent_id, vm_name=agent.vm_name,
                    current_deployment=agent.current)
        return _json(body)

    @app.get("/api/logs")
    async def logs() -> Response:
        require_secret()
        deployment_id = request.args.get("deployment_id") or None
        raw_tail = request.args.get("tail", "200")
        if not re.fullmatch(r"[0-9]{1,5}", raw_tail) or not 1 <= int(raw_tail) <= 10_000:
            raise AgentHttpError(400, "bad_tail", "tail must be an integer 1..10000",
                                 {"tail": raw_tail})
        try:
            found = await agent.logs(deployment_id, int(raw_tail))
        except UnknownDeployment:
            raise AgentHttpError(404, "unknown_deployment",
                                 f"no deployment {deployment_id!r} on this agent") from None
        current = agent.current_status()
        name = deployment_id or (current.deployment_id if current else None)
        return _json({"deployment_id": name, "logs": found})

    @app.get("/api/stats")
    async def stats() -> Response:
        require_secret()
        return _json(await agent.stats())

    @app.get("/api/control/challenge")
    async def control_challenge() -> Response:
        require_secret()
        nonce, ttl = agent.challenges.issue(trio.current_time())
        return _json({
            "nonce": nonce.hex(),
            "ttl_seconds": ttl,
            "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        })

    @app.route("/", defaults={"path": ""}, methods=PROXY_METHODS)
    @app.route("/<path:path>", methods=PROXY_METHODS)
    async def proxy(path: str) -> Response:
        return await _proxy(agent, client)

    return app


def _deployment_view(status: DeploymentStatus) -> dict[str, Any]:
    view: dict[str, Any] = {
        "deployment_id": status.deployment_id,
        "app": status.app,
        "version": status.version,
        "state": status.state,
        "compose_hash": status.compose_hash,
    }
    if status.error is not None:
        view["error"] = status.error
    return view


async def _attest(agent: Agent, compose_hash: str | None) -> dict[str, Any]:
    raw = request.args.get("nonce", "")
    try:
        nonce = bytes.fromhex(raw)
    except ValueError:
        raise AgentHttpError(400, "bad_nonce", "nonce must be hex", {"nonce": raw[:200]}) from None
    if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise AgentHttpError(400, "bad_nonce",
                             f"nonce must be 1..{MAX_NONCE_BYTES} bytes of hex",
                             {"nonce_bytes": len(nonce)})
    if compose_hash is None:
        raise AgentHttpError(409, "no_workload",
                             "no deployment with a compose hash runs here; nothing to attest to")
    try:
        report_data = health_report_data(nonce, compose_hash)
    except (ValueError, binascii.Error):
        raise AgentHttpError(409, "no_workload", "the current compose hash is unusable") from None
    quote = await agent.quotes.quote(report_data)
    return {
        "provider": agent.quotes.name,
        "nonce": nonce.hex(),
        "compose_hash": compose_hash,
        "report_data": report_data.hex(),
        "quote": base64.b64encode(quote).decode("ascii"),
    }


async def _proxy(agent: Agent, client: httpx.AsyncClient) -> Response:
    status = agent.current_status()
    upstream = agent.upstream()
    if status is None or upstream is None:
        detail = {"deployment_id": status.deployment_id, "state": status.state} if status else {}
        message = ("no workload is deployed on this agent" if status is None
                   else f"workload {status.deployment_id} is {status.state}, not running")
        return _error(502, "no_workload", message, detail)

    host, port = upstream
    raw_path = request.scope.get("raw_path") or request.path.encode("utf-8")
    target = f"http://{host}:{port}{raw_path.decode('latin-1')}"
    query = request.scope.get("query_string") or b""
    if query:
        target += "?" + query.decode("latin-1")

    drop = _hop_by_hop(request.headers.getlist("Connection"))
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
    client_addr = (request.scope.get("client") or ("", 0))[0]
    previous = request.headers.get("X-Forwarded-For")
    headers.append(("X-Forwarded-For", f"{previous}, {client_addr}" if previous else client_addr))
    headers.append(("X-Forwarded-Proto", request.scheme))
    if request.host:
        headers.append(("X-Forwarded-Host", request.host))

    has_body = request.headers.get("Content-Length") not in (None, "0") or (
        "chunked" in request.headers.get("Transfer-Encoding", "").lower())

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.body:
            yield chunk

    outgoing = client.build_request(
        request.method, target, headers=headers, content=body() if has_body else None)
    try:
        answer = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        log.info("proxy to %s failed: %s", target, exc)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            try:
                await agent.runner.refresh(status.deployment_id)
            except UnknownDeployment:
                pass
        return _error(502, "workload_unreachable",
                      f"the workload did not answer: {type(exc).__name__}: {exc}",
                      {"deployment_id": status.deployment_id})

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        finally:
            await answer.aclose()

    drop_out = _hop_by_hop(answer.headers.get_list("connection"))
    out_headers = [(k, v) for k, v in answer.headers.multi_items() if k.lower() not in drop_out]
    response = Response(stream(), status=answer.status_code)
    response.headers.clear()
    for key, value in out_headers:
        response.headers.add(key, value)
    response.timeout = None
    return response


async def serve_http(
    agent: Agent, shutdown: trio.Event, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    """Serve the agent's HTTP port until *shutdown* is set (graceful, then returns)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [agent.config.listen]
    config.graceful_timeout = 5
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    timeout = httpx.Timeout(connect=5.0, read=None, write=None, pool=10.0)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                 follow_redirects=False) as client:
        app = make_app(agent, client)
        await serve(app, config, shutdown_trigger=shutdown.wait,
                    task_status=task_status)
