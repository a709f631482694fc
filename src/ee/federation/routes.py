"""HTTP routes of federation on the CP's main API (the link itself is the mTLS listener).

Master: ``POST /api/v2/federation/join-tokens`` (admin), ``POST /api/v2/federation/join``
(public: a proof of a single-use join token, ``pki.join_body``; the token itself is
refused), ``GET /api/v2/federation/snapshot``
(admin: the signed desired state), ``PUT /api/v2/federation/desired`` (admin).
Both roles: ``GET /api/v2/federation/status`` (admin).

Asking a dc (ee.federation.rpc), master only: ``GET
/api/v2/datacenters/{label}/agents/{agent_id}/attestation`` (admin: the full proof of
one federated agent, checked against the digest its dc reported). Both attestation
routes send a fresh 32-byte nonce of the master's; the dc answers each agent's new quote
bound to it, which the master verifies itself (``rpc.check_evidence``, with this CP's
judge, off the event loop): ``verified_by_master`` per agent (a refused one is also
event ``federation.proof_refused``). The tenant routes
``GET /api/v2/deployments/{id}/logs`` and ``/attestation`` call ``tenant_logs`` /
``tenant_attestation`` first: a deployment this master placed in a dc is answered by
that dc (same ownership check as a direct one; ``follow`` is refused there with 409
``federated_follow_unsupported``), any other falls through to the direct route.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import Response, g
from quart_trio import QuartTrio

from ee.actors.datacenter import DescribeDatacenter
from ee.cp.errors import (
    ApiError,
    Who,
    guard,
    json_object,
    json_response,
    request_body,
    require_admin,
    structure_request,
)
from ee.cp.nodes import LabelError
from ee.federation.dc import DcFederation
from ee.federation.master import (
    JoinRefused,
    JoinRequest,
    JoinTokenRequest,
    MasterFederation,
    ReportedAgent,
)
from ee.federation.rpc import (
    ADMIN_ASKER,
    ANSWER_TIMEOUT_S,
    PROOF_MISMATCH,
    RpcError,
    check_evidence,
    proof_digest,
)
from ee.federation.trust import BAD_POLICY, PolicyError, desired_policy
from ee.federation.wire import MAX_ID_CHARS
from ee.protocol.strict import printable
from ee.runtime import ActorError

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane

FOLLOW_UNSUPPORTED = "federated_follow_unsupported"
BAD_RESPONSE = "bad_response"  # a dc's answer that is not the shape asked for

# A join refusal's status: an unknown token or a bad proof is not authenticated (401), a
# malformed key is a bad request (400); the rest (an unbound re-join, a label mismatch)
# forbidden.
JOIN_STATUS: Final = {"join_token_invalid": 401, "bad_key": 400}


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
    """The attestation view of a dc-placed deployment: each replica's proof as its dc
    holds it, and its fresh evidence as this master verified it (``verified_by_master``)."""
    found = _placed_for(cp, account_id, deployment_id)
    if found is None:
        return None
    fed, key = found
    label = fed.intent_datacenter(deployment_id)
    assert label is not None
    nonce, args = _fresh_args(fed)
    body = await fed.ask(label, "attestation", deployment_id=deployment_id, args=args,
                         asker=account_id)
    # Only the replicas the dc reported for this deployment (its placement reports, as
    # the deployment view shows them), each once: a dc cannot make the master verify
    # (and emit an event for) thousands of made-up replicas in one answer.
    view = fed.view(key, deployment_id) or {}
    known = {str(r.get("agent_id")) for r in view.get("replicas") or ()}
    replicas: list[dict[str, Any]] = []
    for r in body.get("replicas") or ():
        if isinstance(r, dict) and r.get("agent_id") in known \
                and all(r.get("agent_id") != seen.get("agent_id") for seen in replicas):
            replicas.append(r)
    checked = [_runs(deployment_id, await _verified(cp, fed, label, nonce, r))
               for r in replicas]
    return {"deployment_id": deployment_id, "compose_hash": view.get("compose_hash"),
            "attested": bool(body.get("attested")) and bool(checked),
            "datacenter": label, "replicas": checked,
            "all_verified_by_master": bool(checked) and all(
                r["verified_by_master"]["ok"] for r in checked)}


def _runs(deployment_id: str, replica: dict[str, Any]) -> dict[str, Any]:
    """*replica* with ``runs_deployment``: its verified evidence's runtime log (replayed
    against the quoted RTMR3) names *deployment_id*. Without it the proof says only that
    a genuine TD answered, not that this deployment runs there (the dc's word)."""
    verdict = replica["verified_by_master"]
    runs = bool(verdict["ok"]) and any(isinstance(d, dict)
                                       and d.get("deployment_id") == deployment_id
                                       for d in verdict.get("deploys") or ())
    return {**replica, "runs_deployment": runs}


async def agent_attestation(cp: Any, fed: MasterFederation, label: str, agent_id: str
                            ) -> dict[str, Any]:
    """The full proof of one federated agent, checked against the digest its dc reported
    up (``matches``), and its fresh evidence as this master verified it."""
    if label not in fed.enrolled:
        raise RpcError(404, "not_found", f"no federated datacenter {label[:80]!r}")
    reported = await _reported(fed, label, agent_id)
    nonce, args = _fresh_args(fed)
    body = await fed.ask(label, "attestation", agent_id=agent_id, args=args,
                         asker=ADMIN_ASKER)
    proof = body.get("proof")
    digest = None if not isinstance(proof, dict) else await trio.to_thread.run_sync(
        proof_digest, proof)
    said = None if reported is None else reported.get("proof_sha256")
    checked = await _verified(cp, fed, label, nonce, {**body, "agent_id": agent_id},
                              reported)
    return {"datacenter": label, "agent_id": agent_id, "proof": proof,
            "proof_sha256": digest, "reported_sha256": said,
            "matches": digest is not None and said == digest,
            "evidence": body.get("evidence"),
            "verified_by_master": checked["verified_by_master"]}


def _fresh_args(fed: MasterFederation) -> tuple[bytes, dict[str, Any]]:
    """A new nonce, and the ask's args: the dc must have the agent's quote in time to
    answer within this master's ask timeout."""
    nonce = secrets.token_bytes(32)
    within = min(max(fed.settings.ask_timeout_s * 0.6, 0.1), ANSWER_TIMEOUT_S / 2)
    return nonce, {"nonce": nonce.hex(), "within_s": within}


async def _reported(fed: MasterFederation, label: str, agent_id: str
                    ) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] | None = await fed.registry.ref(f"dc/{label}").ask(
            ReportedAgent(agent_id), timeout=5)
    except ActorError:
        return None  # then the evidence is checked against the dc's summary only
    return found


async def _verified(cp: Any, fed: MasterFederation, label: str, nonce: bytes,
                    item: dict[str, Any], reported: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """*item* (an agent's proof answer or a replica) with ``verified_by_master``: its
    evidence checked against this master's nonce, judge, and the MRTD its dc reported."""
    if reported is None and isinstance(item.get("agent_id"), str):
        reported = await _reported(fed, label, item["agent_id"])
    mrtd = None if reported is None or reported.get("mrtd") is None \
        else str(reported["mrtd"])
    key = None if reported is None or reported.get("session_key_sha256") is None \
        else str(reported["session_key_sha256"])

    def check() -> dict[str, Any]:
        proof = item.get("proof")
        if isinstance(proof, dict) and proof.get("datacenter") != label:
            # A dc answers for its own agents only: a quote of a TD it can reach, named
            # as another datacenter's agent, is not that agent's proof.
            return {"ok": False, "code": PROOF_MISMATCH, "reasons": [
                f"the proof names datacenter {str(proof.get('datacenter'))[:80]!r}, "
                f"not {label[:80]!r}"], "mrtd": None, "tcb_status": None, "deploys": []}
        return check_evidence(cp.judge(), nonce, item, mrtd, now=time.time(),
                              reported_key=key)

    verdict = await trio.to_thread.run_sync(check, limiter=fed.verify_limiter)
    if not verdict["ok"]:
        fed.emit("federation.proof_refused", label,
                 {"agent_id": str(item.get("agent_id"))[:120], "code": verdict["code"],
                  "reasons": verdict["reasons"][:3]})
    return {**item, "verified_by_master": verdict}


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
        return json_response(await agent_attestation(cp, master_fed, label, agent_id))

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
        try:  # a stranger's body: deep nesting or a lone surrogate is a 400, never a 500
            doc: Any = json.loads(raw or b"null")
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except RecursionError:
            raise ApiError(400, "bad_request", "the body's JSON is nested too deeply") from None
        except ValueError:  # UnicodeError included
            raise ApiError(400, "bad_request", "the body is not JSON (UTF-8)") from None
        master_fed = need_master()
        if isinstance(doc, dict) and "token" in doc:
            # An old dc (or a hand-made body) sent the secret itself: never accepted, so
            # no client can keep sending it to whoever answers at its upstream URL.
            detail = ("the join takes a proof of the token (token_id, proof), never the "
                      "token itself: upgrade the client (ee-cp --role dc, eectl)")
            said = doc.get("datacenter")
            master_fed.refuse_stranger(printable(said, 80) if isinstance(said, str) else None,
                                       "bad_request", detail)
            raise ApiError(400, "bad_request", detail, {"field": "token"})
        req = structure_request(doc, JoinRequest)
        try:
            out = await master_fed.join(req)
        except LabelError as exc:
            master_fed.refuse_stranger(req.datacenter[:80], "bad_datacenter", str(exc)[:200])
            raise ApiError(400, "bad_datacenter", str(exc)[:200],
                           {"field": "datacenter"}) from None
        except JoinRefused as exc:
            master_fed.refuse_stranger(req.datacenter[:80], exc.code, exc.detail)
            raise ApiError(JOIN_STATUS.get(exc.code, 403), exc.code, exc.detail) from None
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
        try:  # strict: unknown keys and oversized documents are refused (trust.py)
            policy = desired_policy(await json_object(required=False))
        except PolicyError as exc:
            raise ApiError(400, BAD_POLICY, str(exc)[:300], {"field": exc.field}) from None
        snap = await master_fed.set_desired(policy)
        return json_response({"version": snap.version, "policy": policy.to_json()})
