"""HTTP routes of federation on the CP's main API (the link itself is the mTLS listener).

Master: ``POST /api/v2/federation/join-tokens`` (admin), ``POST /api/v2/federation/join``
(public: the single-use token is the credential), ``GET /api/v2/federation/snapshot``
(admin: the signed desired state), ``PUT /api/v2/federation/desired`` (admin).
Both roles: ``GET /api/v2/federation/status`` (admin).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from quart import Response, g
from quart_trio import QuartTrio

from ee.actors.datacenter import DescribeDatacenter
from ee.cp.errors import (
    ApiError,
    Who,
    guard,
    json_response,
    request_body,
    require_admin,
    structure_request,
)
from ee.federation.dc import DcFederation
from ee.federation.master import (
    DesiredRequest,
    JoinRefused,
    JoinRequest,
    JoinTokenRequest,
    MasterFederation,
)
from ee.runtime import ActorError

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane


def register(app: QuartTrio, cp: ControlPlane) -> None:
    fed: MasterFederation | DcFederation | None = getattr(cp, "federation", None)
    if fed is None:
        return

    def need_master() -> MasterFederation:
        if not isinstance(fed, MasterFederation):
            raise ApiError(409, "not_master", "this route exists on a master CP only")
        return fed

    @app.get("/api/v2/federation/status")
    @guard(Who.ADMIN)
    async def federation_status() -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        if isinstance(fed, DcFederation):
            return json_response(fed.status())
        assert isinstance(fed, MasterFederation)
        dcs = []
        for label in sorted(fed.enrolled):
            try:
                dcs.append(await cp.registry.ref(f"dc/{label}").ask(DescribeDatacenter(),
                                                                    timeout=5))
            except ActorError:
                continue
        return json_response({"role": "master", "listen": fed.advertised(),
                              "snapshot_version": fed.desired.version, "datacenters": dcs})

    if not isinstance(fed, MasterFederation):
        return

    @app.post("/api/v2/federation/join-tokens")
    @guard(Who.ADMIN)
    async def join_token() -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        body = await request_body(JoinTokenRequest, required=False)
        return json_response(need_master().issue_token(body.datacenter, body.ttl_s), 201)

    @app.post("/api/v2/federation/join")
    @guard(Who.PUBLIC)
    async def join() -> Response:
        raw = g.get("public_body", b"")
        try:
            doc: Any = json.loads(raw or b"null")
        except ValueError:
            raise ApiError(400, "bad_request", "the body is not JSON") from None
        req = structure_request(doc, JoinRequest)
        try:
            out = await need_master().join(req)
        except JoinRefused as exc:
            cp.events.emit("federation.refused", req.datacenter[:80],
                           {"code": exc.code, "detail": exc.detail})
            raise ApiError(403, exc.code, exc.detail) from None
        return json_response(out)

    @app.get("/api/v2/federation/snapshot")
    @guard(Who.ADMIN)
    async def snapshot() -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        return json_response(json.loads(need_master().snapshot_frame()))

    @app.put("/api/v2/federation/desired")
    @guard(Who.ADMIN)
    async def desired() -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        body = await request_body(DesiredRequest)
        snap = await need_master().set_desired(body.policy)
        return json_response({"version": snap.version})
