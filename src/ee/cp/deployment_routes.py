"""Tenant routes that change a running deployment, and the tenant event stream.

* ``PATCH /api/v2/deployments/{id}`` ``{"version": V}`` and/or ``{"replicas": N}``:
  a rolling update and/or a scale, acknowledged (202, ``Location``) once the new
  desired state is in the deployment's signed manifest; the same version and replica
  count is a no-op (200). Unknown fields are refused (400).
* ``POST /api/v2/deployments/{id}/rollback``: back to the previous version (202).
* ``GET /api/v2/events`` (websocket): the events of the caller's own apps and
  deployments only (``?app=NAME`` narrows to one app), authenticated by the tenant API
  key (``Authorization: Bearer``, or ``?token=`` for clients that cannot set headers).

Theory of operation of the event filter (``tenant_event``): the CP's event bus carries
everyone's events. A tenant sees an event only when its kind is one of the tenant
kinds (``TENANT_KINDS``) *and* the app it concerns is one of the caller's: a subject
that is a deployment id (deployment and replica events, a replica's secret releases
and revocations, a suspension) is looked up in the CP's deployment index; otherwise
the subject of app and secret events is the app key (``<account>.<name>``); the app
actor also names its app in every deployment and replica event, which covers a
deployment the index has not recorded yet. Any other kind (agents, registrations, billing of other
accounts, operations) never reaches a tenant, whatever its subject looks like. The key
is checked again every ``RECHECK_S``: a stream opened with a key since revoked closes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from quart import Response, g, websocket
from quart_trio import QuartTrio

from ee.actors import app as app_actor
from ee.cp import rest
from ee.cp.errors import (
    ApiError,
    Who,
    bearer_token,
    guard,
    json_object,
    json_response,
    not_found,
    request_body,
)
from ee.cp.events import Event
from ee.cp.tenants import APP_NAME, MAX_REPLICAS, VERSION, KeyRefused, resolve_api_key
from ee.protocol.strict import check

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane
    from ee.cp.tenants import Auth

#: Event kinds a tenant may see (of its own apps and deployments only).
TENANT_KINDS: Final = ("app.", "deployment.", "replica.", "secret.", "billing.suspended")
#: Kinds whose subject is the app key; the others' subject is a deployment id.
_APP_SUBJECT: Final = ("app.", "secret.")
#: Kinds only the app actor emits, naming its app in ``data["app"]``.
_APP_NAMED: Final = ("deployment.", "replica.")
RECHECK_S: Final = 30.0  # how often an open stream's key is checked again
#: Open tenant event streams, per account and in all (each is a subscriber every event
#: is fanned out to, with its own queue): more are closed at once with 1013.
MAX_STREAMS_PER_ACCOUNT: Final = 4
MAX_STREAMS: Final = 256
REPLAY: Final = 20  # recent events sent when a stream opens


@attrs.frozen
class DeploymentPatch:
    """``PATCH /api/v2/deployments/{id}``: the new version and/or replica count."""

    version: str | None = attrs.field(default=None, validator=check(
        lambda v: bool(VERSION.match(v)), "must be a version name"))
    replicas: int | None = attrs.field(default=None, validator=check(
        lambda v: 1 <= v <= MAX_REPLICAS, f"must be 1..{MAX_REPLICAS}"))


def tenant_event(event: Event, account: str, owner_of: Callable[[str], str | None],
                 app: str | None = None) -> dict[str, Any] | None:
    """*event* as the tenant *account* may see it, or None when it is not theirs (pure).

    *owner_of*: deployment id -> app key (the CP's index); *app*: only this app."""
    if not event.kind.startswith(TENANT_KINDS):
        return None
    app_key = owner_of(event.subject)  # a deployment's (also a replica's secret.*)
    if app_key is None and event.kind.startswith(_APP_SUBJECT):
        app_key = event.subject
    named = event.data.get("app")
    if app_key is None and event.kind.startswith(_APP_NAMED) and isinstance(named, str):
        app_key = named
    if app_key is None or not app_key.startswith(f"{account}."):
        return None
    if app is not None and app_key != f"{account}.{app}":
        return None
    out = event.to_dict()
    claimed = out["data"].get("claimed_app")
    if claimed is not None and claimed != app_key:
        # What an agent claimed a stray runs under: never another app's key.
        out["data"]["claimed_app"] = "another app"
    return out


async def account_for_key(store: Any, token: str | None) -> str | None:
    """The tenant account a live API key belongs to, else None (no cache: the events
    stream re-checks with it, so a revoked key ends the stream)."""
    if token is None:
        return None
    try:
        holder = await resolve_api_key(store, token)
    except KeyRefused:
        return None
    return holder.account_id if holder.kind == "tenant" else None


def register(app: QuartTrio, cp: ControlPlane, auth: Auth) -> None:
    streams: dict[str, int] = {}  # account -> open event streams

    def dep_ref(deployment_id: str) -> Any:
        key = cp.deployment_index.get(deployment_id)
        if key is None or not key.startswith(f"{g.account_id}.") or \
                f"app/{key}" not in cp.registry:
            raise not_found("deployment", deployment_id)
        return cp.registry.ref(f"app/{key}")

    async def may_change(deployment_id: str) -> Any:
        await auth.authenticate(("tenant",))
        ref = dep_ref(deployment_id)
        auth.require_ready()
        if await cp.billing.suspended(g.account_id):
            raise ApiError(402, "payment_required", "the account is suspended for "
                           "insufficient funds; a credit lifts the suspension")
        return ref

    def answer(deployment_id: str, result: dict[str, Any] | None) -> Response:
        if result is None:
            raise not_found("deployment", deployment_id)
        error = result.get("error")
        if error == "unknown_version":
            raise ApiError(404, "not_found", "no such version of the deployment's app",
                           {"field": "version"})
        if error == "stopped":
            raise ApiError(409, "conflict", "the deployment is stopped; deploy again")
        if error == "no_previous_version":
            raise ApiError(409, "no_previous_version",
                           "the deployment has no previous version to go back to")
        if error == "snapshot_full":
            raise ApiError(409, "snapshot_full", "the federation's desired state has no room "
                           "for this version (its compose and build context are too large)")
        view = cp.with_urls(result["view"])
        if not result["changed"]:
            return json_response(view, 200)
        response = json_response(view, 202)
        response.headers["Location"] = f"/api/v2/deployments/{deployment_id}"
        return response

    @app.patch("/api/v2/deployments/<deployment_id>")
    @guard(Who.TENANT)
    async def update_deployment(deployment_id: str) -> Response:
        ref = await may_change(deployment_id)
        body = await request_body(DeploymentPatch)
        if body.version is None and body.replicas is None:
            raise ApiError(400, "bad_request", "give 'version' and/or 'replicas'")
        result = await ref.ask(app_actor.UpdateDeployment(
            deployment_id, body.version, body.replicas), timeout=60)
        return answer(deployment_id, result)

    @app.post("/api/v2/deployments/<deployment_id>/rollback")
    @guard(Who.TENANT)
    async def rollback_deployment(deployment_id: str) -> Response:
        ref = await may_change(deployment_id)
        rest.check_fields(await json_object(required=False), ())  # takes no fields
        result = await ref.ask(app_actor.RollbackDeployment(deployment_id), timeout=60)
        return answer(deployment_id, result)

    @app.websocket("/api/v2/events")
    async def tenant_events() -> None:
        token = bearer_token(websocket.headers.get("Authorization")) \
            or websocket.args.get("token")
        store = cp.accounts
        account = await account_for_key(store, token) if store is not None else None
        if account is None:
            await websocket.close(1008, "a tenant API key is required")
            return
        only = websocket.args.get("app")
        if only is not None and not APP_NAME.match(only):
            await websocket.close(1008, "'app' must be an app name")
            return
        await websocket.accept()
        if streams.get(account, 0) >= MAX_STREAMS_PER_ACCOUNT or \
                sum(streams.values()) >= MAX_STREAMS:
            await websocket.close(1013, f"too many event streams are open (at most "
                                  f"{MAX_STREAMS_PER_ACCOUNT} per account): retry later")
            return
        streams[account] = streams.get(account, 0) + 1
        try:
            await stream_events(account, token, store, only)
        finally:
            left = streams[account] - 1
            if left:
                streams[account] = left
            else:
                del streams[account]

    async def stream_events(account: str, token: str | None, store: Any,
                            only: str | None) -> None:
        def mine(event: Event) -> dict[str, Any] | None:
            return tenant_event(event, account, cp.deployment_index.get, only)

        async with cp.events.subscribe() as stream, trio.open_nursery() as nursery:

            async def recheck() -> None:
                while True:
                    await trio.sleep(RECHECK_S)
                    if await account_for_key(store, token) != account:
                        await websocket.close(1008, "the API key was revoked")
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(recheck)
            replay = [e for e in (mine(x) for x in list(cp.events.recent)) if e]
            for seen in replay[-REPLAY:]:
                await websocket.send(json.dumps(seen))
            async for event in stream:
                out = mine(event)
                if out is not None:
                    await websocket.send(json.dumps(out))
