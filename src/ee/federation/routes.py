"""HTTP routes of federation on the CP's main API (the link itself is the mTLS listener).

Master: ``POST /api/v2/federation/join-tokens`` (admin), ``POST /api/v2/federation/join``
(public: the single-use token is the credential), ``GET /api/v2/federation/snapshot``
(admin: the signed desired state), ``PUT /api/v2/federation/desired`` (admin).
Both roles: ``GET /api/v2/federation/status`` (admin).

Asking a dc (ee.federation.rpc), master only: ``GET
/api/v2/datacenters/{label}/agents/{agent_id}/attestation`` (admin: the full proof of
one federated agent, checked against the digest its dc reported). The tenant routes
``GET /api/v2/deployments/{id}/logs`` and ``/attestation`` call ``tenant_logs`` /
``tenant_attestation`` first: a deployment this master placed in a dc is answered by
that dc (same ownership check as a direct one; ``follow`` is refused there with 409
``federated_follow_unsupported``), any other falls through to the direct route.
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
from ee.cp.nodes import LabelError
from ee.federation.dc import DcFederation
from ee.federation.master import (
    DesiredRequest,
    JoinRefused,
    JoinRequest,
    JoinTokenRequest,
    MasterFederation,
)
from ee.federation.wire import MAX_ID_CHARS
from ee.runtime import ActorError

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane

FOLLOW_UNSUPPORTED = "federated_follow_unsupported"
BAD_RESPONSE = "bad_response"  # a dc's answer that is not the shape asked for


def _placed_for(cp: Any, account_id: str, deployment_id: str
                ) -> tuple[MasterFederation, str] | None:
    """(the master, the app key) when *deployment_id* is *account_id*'s and this master
    placed it in a dc; None otherwise (the direct route answers)."""
    fed = getattr(cp, "federation", None)
    key = cp.deployment_index.get(deployment_id)
    if not isinstance(fed, MasterFederation) or key is None \
            or not key.startswith(f"{account_id}.") \
            or fed.intent_datacenter(deployment_id) is None:
        return None
    return fed, key


async def tenant_logs(cp: Any, account_id: str, deployment_id: str, *, tail: int,
                      since: str | None, service: str | None,
                      follow: bool) -> dict[str, Any] | None:
    """The logs view of a dc-placed deployment, asked of its dc (None: not one)."""
    found = _placed_for(cp, account_id, deployment_id)
    if found is None:
        return None
    if follow:
        raise ApiError(409, FOLLOW_UNSUPPORTED, "this deployment runs in a federated "
                       "datacenter: its logs cannot be followed; poll without follow "
                       "(with 'since') instead")
    fed, key = found
    view = await fed.deployment_logs(key, deployment_id, {"tail": tail, "since": since,
                                                          "service": service})
    if view is not None:
        _check_logs(view, str(view.get("datacenter")))
    return view


def _check_logs(view: dict[str, Any], label: str) -> None:
    """A dc's logs answer has the direct route's shape (the tenant route filters it
    line by line), else 502 ``bad_response``: the dc's word is untrusted."""
    replicas = view.get("replicas", [])
    if not isinstance(replicas, list) or not all(
            isinstance(r, dict) and isinstance(r.get("lines", []), list)
            and all(isinstance(line, dict) for line in r.get("lines", []))
            for r in replicas):
        raise ApiError(502, BAD_RESPONSE, f"datacenter {label[:80]} answered logs that "
                       "are not a list of replicas with lines", {"datacenter": label})


async def tenant_attestation(cp: Any, account_id: str, deployment_id: str
                             ) -> dict[str, Any] | None:
    """The attestation view (with each replica's proof) of a dc-placed deployment."""
    found = _placed_for(cp, account_id, deployment_id)
    if found is None:
        return None
    fed, key = found
    return await fed.deployment_attestation(key, deployment_id)


def register(app: QuartTrio, cp: ControlPlane) -> None:
    """Every route exists on every role; on the wrong one it answers 409 with a code."""
    fed: MasterFederation | DcFederation | None = getattr(cp, "federation", None)

    def need_master() -> MasterFederation:
        if not isinstance(fed, MasterFederation):
            raise ApiError(409, "not_master", "this route is a master CP's (--role master)")
        return fed

    @app.get("/api/v2/federation/status")
    @guard(Who.ADMIN)
    async def federation_status() -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        if isinstance(fed, DcFederation):
            return json_response(fed.status())
        if fed is None:
            raise ApiError(409, "not_federated", "this CP is standalone (no --role)")
        dcs = []
        for label in sorted(fed.enrolled):
            try:
                dcs.append(await cp.registry.ref(f"dc/{label}").ask(DescribeDatacenter(),
                                                                    timeout=5))
            except ActorError:
                continue
        return json_response({"role": "master", "listen": fed.advertised(),
                              "snapshot_version": fed.desired.version, "datacenters": dcs})

    @app.get("/api/v2/datacenters/<label>/agents/<agent_id>/attestation")
    @guard(Who.ADMIN)
    async def federated_agent_attestation(label: str, agent_id: str) -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        master_fed = need_master()
        if len(label) > MAX_ID_CHARS or len(agent_id) > MAX_ID_CHARS:
            raise ApiError(404, "not_found", "no such federated agent")
        return json_response(await master_fed.agent_attestation(label, agent_id))

    @app.post("/api/v2/federation/join-tokens")
    @guard(Who.ADMIN)
    async def join_token() -> Response:
        require_admin(cp.bootstrap.admin_token_ok)
        master_fed = need_master()
        body = await request_body(JoinTokenRequest, required=False)
        try:
            return json_response(master_fed.issue_token(body.datacenter, body.ttl_s), 201)
        except LabelError as exc:
            raise ApiError(400, "bad_datacenter", str(exc)[:200],
                           {"field": "datacenter"}) from None

    @app.post("/api/v2/federation/join")
    @guard(Who.PUBLIC)
    async def join() -> Response:
        raw = g.get("public_body", b"")
        try:
            doc: Any = json.loads(raw or b"null")
        except ValueError:
            raise ApiError(400, "bad_request", "the body is not JSON") from None
        master_fed = need_master()
        req = structure_request(doc, JoinRequest)
        try:
            out = await master_fed.join(req)
        except LabelError as exc:
            raise ApiError(400, "bad_datacenter", str(exc)[:200],
                           {"field": "datacenter"}) from None
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
        master_fed = need_master()
        body = await request_body(DesiredRequest)
        snap = await master_fed.set_desired(body.policy)
        return json_response({"version": snap.version})
