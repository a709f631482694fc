"""Tenant routes for secrets (``ee.cp.secrets`` does the sealing and releasing).

``PUT/DELETE /api/v2/apps/{app}/secrets/{secret}``, ``GET /api/v2/apps/{app}/secrets``
(names and versions, never values), ``GET/PUT /api/v2/apps/{app}/secret-policy`` and
``GET /api/v2/apps/{app}/secret-events`` (the audit trail). Another tenant's app is a
404, as everywhere. Bad input is a 4xx with a code: ``bad_secret_name``,
``too_large`` (a value over 64 KiB), ``unknown_node_size``, ``bad_datacenter``,
``too_many_secrets``, ``bad_request``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from quart import Response, g, request
from quart_trio import QuartTrio

from ee.cp.errors import (
    ApiError,
    Who,
    guard,
    json_object,
    json_response,
    not_found,
    request_body,
)
from ee.cp.nodes import LabelError
from ee.cp.secrets import MAX_SECRET_BYTES, PolicyError, ReleasePolicy, SecretVault
from ee.protocol.messages import SECRET_NAME

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane
    from ee.cp.tenants import Auth


@attrs.frozen
class SecretValue:
    """``PUT …/secrets/{secret}``: the new value (UTF-8 text, at most 64 KiB)."""

    value: str


def register(app: QuartTrio, cp: ControlPlane, auth: Auth) -> None:
    def vault() -> SecretVault:
        if cp.accounts is None:
            raise ApiError(503, "unavailable", "the durable store is not available yet")
        return cp.secret_vault

    async def app_key(name: str) -> str:
        await auth.authenticate(("tenant",))
        key = f"{g.account_id}.{name}"
        if f"app/{key}" not in cp.registry:
            raise not_found("app", name)
        return key

    def check_name(secret: str) -> None:
        if not SECRET_NAME.match(secret):
            raise ApiError(400, "bad_secret_name",
                           "a secret name must match [a-z0-9][a-z0-9_.-]{0,62}",
                           {"field": "secret"})

    def normalise(label: str) -> str:
        try:
            return cp.config.vocabulary.normalise_label(label)
        except LabelError as exc:
            raise ValueError(str(exc)) from None

    @app.put("/api/v2/apps/<name>/secrets/<secret>")
    @guard(Who.TENANT)
    async def put_secret(name: str, secret: str) -> Response:
        key = await app_key(name)
        check_name(secret)
        body = await request_body(SecretValue)
        raw = body.value.encode("utf-8")
        if len(raw) > MAX_SECRET_BYTES:
            raise ApiError(413, "too_large", f"a secret value may hold at most "
                           f"{MAX_SECRET_BYTES} bytes", {"field": "value"})
        info = await vault().put(key, secret, raw)
        del raw, body
        if info is None:
            raise ApiError(403, "too_many_secrets", "the app has the maximum number of secrets")
        await vault().audit(key, "updated", actor=g.account_id, secret=secret,
                            version=info.version)
        cp.events.emit("secret.updated", key, {"secret": secret, "version": info.version})
        return json_response(info.to_json(), 201)

    @app.get("/api/v2/apps/<name>/secrets")
    @guard(Who.TENANT)
    async def list_secrets(name: str) -> Response:
        key = await app_key(name)
        return json_response({"secrets": [s.to_json() for s in await vault().infos(key)]})

    @app.delete("/api/v2/apps/<name>/secrets/<secret>")
    @guard(Who.TENANT)
    async def delete_secret(name: str, secret: str) -> Response:
        key = await app_key(name)
        check_name(secret)
        if not await vault().delete(key, secret):
            raise not_found("secret", secret)
        await vault().audit(key, "deleted", actor=g.account_id, secret=secret)
        cp.events.emit("secret.deleted", key, {"secret": secret})
        return json_response({"name": secret, "deleted": True})

    @app.get("/api/v2/apps/<name>/secret-policy")
    @guard(Who.TENANT)
    async def get_policy(name: str) -> Response:
        key = await app_key(name)
        return json_response((await cp.secret_policy(key)).to_json())

    @app.put("/api/v2/apps/<name>/secret-policy")
    @guard(Who.TENANT)
    async def put_policy(name: str) -> Response:
        key = await app_key(name)
        try:
            policy = ReleasePolicy.from_json(await json_object(),
                                             known_sizes=cp.config.vocabulary.sizes,
                                             normalise_datacenter=normalise)
        except PolicyError as exc:
            raise ApiError(400, exc.code, str(exc), {"field": exc.field}) from None
        await vault().set_policy(key, policy)
        cp.events.emit("secret.policy", key, policy.to_json())
        return json_response(policy.to_json())

    @app.get("/api/v2/apps/<name>/secret-events")
    @guard(Who.TENANT)
    async def audit(name: str) -> Response:
        key = await app_key(name)
        limit = request.args.get("limit", "200")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise ApiError(400, "bad_request", "'limit' must be 1..1000", {"field": "limit"})
        return json_response({"events": await vault().audit_trail(key, int(limit))})
