"""Release routes (admin): admit a signed release's measurements into the policy.

* ``POST /api/v2/admin/releases`` with ``{"manifest": {...}, "signature": "<hex>",
  "node_size": "tiny"}`` → 201 ``{"release": {...}, "admitted": true}`` (200 with
  ``"admitted": false`` when the same manifest is already admitted for that node size);
  400 ``bad_release``, 403 ``release_untrusted`` (``ee.cp.releases`` says when).
* ``GET /api/v2/admin/releases`` → ``{"releases": [...], "release_keys": [names]}``.
* ``DELETE /api/v2/admin/releases/{release_id}`` → 200 ``{"withdrawn": {...}}`` (its
  measurements leave the policy; event ``release.withdrawn``), 404 when unknown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from quart import Response
from quart_trio import QuartTrio

from ee.cp.errors import ApiError, Who, guard, json_object, json_response, not_found
from ee.cp.releases import ReleaseRefused, check_admission
from ee.cp.tenants import Auth

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane


def register(app: QuartTrio, cp: ControlPlane, auth: Auth) -> None:
    @app.get("/api/v2/admin/releases")
    @guard(Who.ADMIN)
    async def list_releases() -> Response:
        auth.admin_only()
        return json_response({
            "releases": [r.to_json() for r in cp.releases.values()],
            "release_keys": [name for name, _ in cp.bootstrap.release_keys]})

    @app.post("/api/v2/admin/releases")
    @guard(Who.ADMIN)
    async def admit_release() -> Response:
        auth.admin_only()
        body = await json_object()
        try:
            release = await trio.to_thread.run_sync(
                check_admission, body, cp.bootstrap.release_keys,
                tuple(cp.config.vocabulary.sizes))
        except ReleaseRefused as exc:
            cp.events.emit("release.refused", "releases",
                           {"code": exc.code, "reason": exc.reason})
            raise ApiError(exc.status, exc.code, exc.reason) from None
        added = await cp.admit_release(release)
        return json_response({"release": release.to_json(), "admitted": added},
                             status=201 if added else 200)

    @app.delete("/api/v2/admin/releases/<release_id>")
    @guard(Who.ADMIN)
    async def withdraw_release(release_id: str) -> Response:
        auth.admin_only()
        release = await cp.withdraw_release(release_id)
        if release is None:
            raise not_found("admitted release", release_id)
        return json_response({"withdrawn": release.to_json()})
