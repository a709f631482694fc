"""Request/response over the federation link: the master asks a dc CP.

The link carries sequenced, spooled events up and signed snapshots down; this adds one
more exchange, ephemeral on both ends. The master sends a signed ``request`` frame
(``wire.Request``: a random 128-bit id, a ``kind``, a deployment or agent id, ``args``)
and the dc answers with a signed ``response`` frame (``wire.Response``) carrying the
same id. Nothing of it is spooled or sequenced: a request lost with its link is an
error for the asker (``datacenter_unavailable``), never a retry.

Master (``MasterRpc``): every request id is opened in the ``Outstanding`` table under
the dc it was sent to, at most ``per_dc`` at once (``datacenter_busy``); the asker waits
``timeout_s`` of Trio time (``datacenter_timeout``) or until the dc's link closes
(``datacenter_unavailable``). A response is applied only when its id is open *for the
dc whose link it came on* (``Outstanding.judge``): an id never sent to that dc is
``response_unknown``; an id already answered or given up on (a duplicate, a late one)
is ``response_late``; a body over ``MAX_RESPONSE_BYTES`` is ``response_too_large``.
Each is refused like any bad frame (event ``federation.refused``, a ``refused`` frame
back) and the link stays up. The signature was checked before (``open_envelope``).

Dc (``answer``): a request is answered only from what this dc runs for the master:
``logs`` of a deployment that is one of the snapshot's intents placed in this dc (its
local app is ``reconcile.local_key`` under the reserved account), through the same
fetch the direct logs route uses (capped at ``MAX_TAIL`` lines, the body at
``MAX_RESPONSE_BYTES`` by dropping the oldest lines, ``truncated`` then); ``attestation``
of one of this dc's agents, or of such a deployment (its replicas' agents), as the
proof the dc holds (``proof_of``) and its digest (``proof_digest``). The digest is also
in every agent view the dc reports up, so the master can check a proof it fetched
against the outcome it was told. Anything else is an error code and nothing is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import cattrs
import trio
from trio_websocket import ConnectionClosed

from ee.actors.app import GetDeployment
from ee.actors.directory import AgentDirectory, AgentRecord
from ee.actors.identity import key_sha256
from ee.cp.errors import ApiError
from ee.cp.rest import RestError, parse_rfc3339
from ee.federation.reconcile import IntentError, local_key, read_intent
from ee.federation.wire import (
    MAX_RESPONSE_BYTES,
    RESPONSE_LATE,
    RESPONSE_TOO_LARGE,
    RESPONSE_UNKNOWN,
    Request,
    Response,
)
from ee.runtime import ActorError, Registry

log = logging.getLogger("ee.federation")

KINDS: Final = ("logs", "attestation")
MAX_TAIL: Final = 10_000  # as the direct logs route
DEFAULT_TIMEOUT_S: Final = 10.0
MAX_OUTSTANDING_PER_DC: Final = 16
MAX_ANSWERING: Final = 32  # requests a dc answers at once (beyond: dc_busy)
ANSWER_TIMEOUT_S: Final = 30.0  # the dc gives up on its own sources after this
#: Slack over MAX_RESPONSE_BYTES for the envelope around a response body.
ENVELOPE_SLACK: Final = 4096

# Errors of an ask, at the master (HTTP status, code).
DATACENTER_UNAVAILABLE: Final = "datacenter_unavailable"
DATACENTER_TIMEOUT: Final = "datacenter_timeout"
DATACENTER_BUSY: Final = "datacenter_busy"
# Error codes a dc answers with.
NOT_PLACED_HERE: Final = "not_placed_here"
UNKNOWN_AGENT: Final = "unknown_agent"
UNKNOWN_KIND: Final = "unknown_kind"
BAD_REQUEST: Final = "bad_request"
DC_BUSY: Final = "dc_busy"
DC_UNAVAILABLE: Final = "dc_unavailable"  # the dc's own sources did not answer
DC_ERROR: Final = "dc_error"

#: A dc's error code -> the HTTP status the master answers with.
STATUS_OF: Final[Mapping[str, int]] = {
    NOT_PLACED_HERE: 409, UNKNOWN_AGENT: 404, UNKNOWN_KIND: 400, BAD_REQUEST: 400,
    DC_BUSY: 503, DC_UNAVAILABLE: 503, RESPONSE_TOO_LARGE: 502, DC_ERROR: 502}


class RpcError(ApiError):
    """An ask that got no answer, or the dc's error code (an ``ApiError``: the HTTP
    layer answers it as is)."""

    def __init__(self, status: int, code: str, detail: str,
                 datacenter: str | None = None) -> None:
        super().__init__(status, code, detail,
                         {"datacenter": datacenter} if datacenter else None,
                         headers={"Retry-After": "5"} if status in (503, 504) else None)


# ---- proofs ---------------------------------------------------------------------------


def proof_of(record: AgentRecord) -> dict[str, Any] | None:
    """What this CP verified of one agent's attestation (None: not identified)."""
    ident = record.identity
    if ident is None:
        return None
    return {"agent_id": record.agent_id, "vm_name": ident.vm_name,
            "datacenter": ident.datacenter, "node_size": ident.node_size,
            "provider": ident.provider, "mrtd": ident.mrtd, "tcb_status": ident.tcb_status,
            "verdict": record.verdict, "violations": list(ident.violations),
            "quarantine_reasons": list(record.quarantine_reasons),
            "verified_at": ident.verified_at,
            "session_key_sha256": key_sha256(ident.public_key), "ak_name": ident.ak_name}


def proof_digest(proof: Mapping[str, Any]) -> str:
    """SHA-256 of the proof's canonical JSON (what the dc reports up per agent)."""
    text = json.dumps(proof, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the master's table of outstanding requests (pure) --------------------------------


class Outstanding:
    """Request ids open per dc, and the ones closed lately (for ``response_late``)."""

    def __init__(self, per_dc: int, remember: int = 4096) -> None:
        self.per_dc = per_dc
        self.remember = remember
        self.open: dict[str, str] = {}  # id -> dc label
        self.closed: OrderedDict[str, str] = OrderedDict()

    def count(self, label: str) -> int:
        return sum(1 for dc in self.open.values() if dc == label)

    def start(self, label: str, rid: str) -> bool:
        """Open *rid* for *label*; False when *label* has ``per_dc`` open already."""
        if self.count(label) >= self.per_dc or rid in self.open or rid in self.closed:
            return False
        self.open[rid] = label
        return True

    def judge(self, label: str, rid: str) -> str | None:
        """None: a response from *label* to *rid* applies; else the reason code."""
        if self.open.get(rid) == label:
            return None
        if rid not in self.open and self.closed.get(rid) == label:
            return RESPONSE_LATE
        return RESPONSE_UNKNOWN  # never sent, or sent to another dc

    def finish(self, rid: str) -> None:
        label = self.open.pop(rid, None)
        if label is not None:
            self.closed[rid] = label
            while len(self.closed) > self.remember:
                self.closed.popitem(last=False)

    def of(self, label: str) -> list[str]:
        return [rid for rid, dc in self.open.items() if dc == label]


Send = Callable[[str], Awaitable[None]]


@attrs.define
class _Waiter:
    via: Send  # the link the request went out on
    done: trio.Event = attrs.field(factory=trio.Event)
    outcome: Response | RpcError | None = None


class MasterRpc:
    """The master's asks; ``links`` holds each connected dc's send (of sealed text)."""

    def __init__(self, seal: Callable[[Any], str], refuse: Callable[[str, str, str], None],
                 *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 per_dc: int = MAX_OUTSTANDING_PER_DC) -> None:
        self.seal = seal
        self.refuse = refuse
        self.timeout_s = timeout_s
        self.table = Outstanding(per_dc)
        self.links: dict[str, Send] = {}
        self._waiters: dict[str, _Waiter] = {}

    async def ask(self, label: str, kind: str, *, deployment_id: str | None = None,
                  agent_id: str | None = None, args: Mapping[str, Any] | None = None,
                  timeout_s: float | None = None, usable: bool = True) -> dict[str, Any]:
        """The dc's answer body, or ``RpcError`` (unavailable, busy, timeout, its code).
        *usable*: False when the dc is degraded (asked nothing then)."""
        send = self.links.get(label)
        if send is None or not usable:
            raise RpcError(503, DATACENTER_UNAVAILABLE, f"datacenter {label} is not "
                           "connected to this master" if send is None else
                           f"datacenter {label} is degraded", label)
        rid = secrets.token_hex(16)
        if not self.table.start(label, rid):
            raise RpcError(503, DATACENTER_BUSY, f"too many requests to datacenter {label} "
                           f"are outstanding (at most {self.table.per_dc})", label)
        waiter = self._waiters[rid] = _Waiter(send)
        frame = Request("request", rid, kind, deployment_id, agent_id, dict(args or {}))
        try:
            with trio.move_on_after(self.timeout_s if timeout_s is None else timeout_s):
                try:
                    await send(self.seal(frame))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                        ConnectionClosed) as exc:
                    raise RpcError(503, DATACENTER_UNAVAILABLE,
                                   f"the link to {label} failed: {exc}"[:300], label) from None
                await waiter.done.wait()
        finally:
            self.table.finish(rid)
            self._waiters.pop(rid, None)
        outcome = waiter.outcome
        if outcome is None:
            raise RpcError(504, DATACENTER_TIMEOUT, f"datacenter {label} did not answer "
                           f"within {self.timeout_s if timeout_s is None else timeout_s}s",
                           label)
        if isinstance(outcome, RpcError):
            raise outcome
        if outcome.error is not None:  # a code of the dc's own making is dc_error
            code = outcome.error if outcome.error in STATUS_OF else DC_ERROR
            raise RpcError(STATUS_OF[code], code,
                           f"datacenter {label}: {outcome.detail}"[:300], label)
        return dict(outcome.body or {})

    def answered(self, label: str, frame: Response, size: int) -> tuple[str, str] | None:
        """A response on *label*'s link (signature verified): applied, or why not."""
        code = self.table.judge(label, frame.id)
        if code is not None:
            why = "already answered or given up on" if code == RESPONSE_LATE else \
                "no such request is outstanding for this datacenter"
            return code, f"response {frame.id}: {why}"
        waiter = self._waiters.get(frame.id)
        self.table.finish(frame.id)
        if size > MAX_RESPONSE_BYTES + ENVELOPE_SLACK:
            detail = f"response {frame.id}: {size} bytes, over {MAX_RESPONSE_BYTES}"
            if waiter is not None:
                waiter.outcome = RpcError(502, RESPONSE_TOO_LARGE, detail, label)
                waiter.done.set()
            return RESPONSE_TOO_LARGE, detail
        if waiter is not None:
            waiter.outcome = frame
            waiter.done.set()
        return None

    def link_up(self, label: str, send: Send) -> None:
        self.links[label] = send

    def link_down(self, label: str, send: Send) -> None:
        """*label*'s link (the one with *send*) closed: the asks sent on it fail now
        (its answers cannot come on another link)."""
        if self.links.get(label) is send:
            del self.links[label]  # else a newer link replaced it already
        for rid in self.table.of(label):
            waiter = self._waiters.get(rid)
            if waiter is not None and waiter.via is send and waiter.outcome is None:
                waiter.outcome = RpcError(503, DATACENTER_UNAVAILABLE,
                                          f"the link to datacenter {label} closed", label)
                waiter.done.set()


# ---- the dc's answers -----------------------------------------------------------------


FetchLogs = Callable[[Registry, Any, str, int, "str | None", "str | None"],
                     Awaitable["dict[str, Any] | None"]]


@attrs.frozen
class DcSources:
    """What the dc CP lends its answers: where deployments and agents are, and the
    direct routes' own logs fetch and replica attestation view."""

    registry: Registry
    directory: AgentDirectory
    fetch_logs: FetchLogs
    replica_attestation: Callable[[dict[str, Any], AgentRecord | None], dict[str, Any]]


@attrs.frozen
class LogsArgs:
    tail: int = attrs.field(default=200, validator=[attrs.validators.ge(1),
                                                    attrs.validators.le(MAX_TAIL)])
    since: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.max_len(64)))
    service: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.matches_re(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")))


_args = cattrs.Converter(forbid_extra_keys=True)


class _Refuse(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _intent_app(req: Request, label: str, desired: Mapping[str, Any]) -> str:
    """The local app key of the deployment *req* names, when the master placed it here."""
    dep_id = req.deployment_id
    doc = dict(desired.get("deployments") or {}).get(dep_id) if dep_id else None
    try:
        intent = None if dep_id is None or doc is None else read_intent(dep_id, doc, label)
    except IntentError:
        intent = None
    if intent is None:
        raise _Refuse(NOT_PLACED_HERE, f"deployment {str(dep_id)[:80]!r} is not one of "
                      f"the master's deployments placed in {label}")
    return local_key(intent.app)


async def _logs(req: Request, label: str, desired: Mapping[str, Any],
                src: DcSources) -> dict[str, Any]:
    try:
        args = _args.structure(req.args, LogsArgs)
        since = None if args.since is None else parse_rfc3339(args.since)
    except (cattrs.BaseValidationError, ValueError, TypeError, RestError) as exc:
        raise _Refuse(BAD_REQUEST, f"logs args: {exc}"[:300]) from None
    key = _intent_app(req, label, desired)
    assert req.deployment_id is not None
    if f"app/{key}" not in src.registry:
        raise _Refuse(NOT_PLACED_HERE, "the deployment does not run here (yet)")
    view = await src.fetch_logs(src.registry, src.registry.ref(f"app/{key}"),
                                req.deployment_id, args.tail, since, args.service)
    if view is None:
        raise _Refuse(NOT_PLACED_HERE, "the deployment does not run here (yet)")
    return await trio.to_thread.run_sync(fit, view)


def fit(view: dict[str, Any], limit: int = MAX_RESPONSE_BYTES) -> dict[str, Any]:
    """*view* (a logs view) with the oldest lines dropped until it is under *limit*."""
    keep = max((len(r.get("lines") or ()) for r in view.get("replicas", [])), default=0)
    out, truncated = view, False
    while len(json.dumps(out, separators=(",", ":"))) > limit:
        if keep == 0:
            raise _Refuse(RESPONSE_TOO_LARGE, "even without lines the answer is too large")
        keep //= 2
        truncated = True
        out = {**view, "replicas": [
            {**r, "lines": r["lines"][len(r["lines"]) - keep:] if keep else []}
            if isinstance(r.get("lines"), list) else r for r in view.get("replicas", [])]}
    return {**out, "truncated": truncated}


def _proofed(record: AgentRecord | None) -> dict[str, Any]:
    proof = None if record is None else proof_of(record)
    return {"proof": proof, "proof_sha256": None if proof is None else proof_digest(proof)}


async def _attestation(req: Request, label: str, desired: Mapping[str, Any],
                       src: DcSources) -> dict[str, Any]:
    if req.agent_id is not None and req.deployment_id is None:
        record = src.directory.get(req.agent_id)
        if record is None or record.identity is None \
                or record.identity.datacenter != label:
            raise _Refuse(UNKNOWN_AGENT, f"no agent {req.agent_id[:80]!r} in {label}")
        return {"datacenter": label, **_proofed(record)}
    key = _intent_app(req, label, desired)
    assert req.deployment_id is not None
    view = None
    if f"app/{key}" in src.registry:
        view = await src.registry.ref(f"app/{key}").ask(GetDeployment(req.deployment_id),
                                                        timeout=5)
    if view is None:
        raise _Refuse(NOT_PLACED_HERE, "the deployment does not run here (yet)")
    replicas = []
    for r in view.get("replicas", []):
        record = src.directory.get(str(r["agent_id"]))
        replicas.append({**src.replica_attestation(r, record), **_proofed(record)})
    return {"deployment_id": req.deployment_id, "compose_hash": view.get("compose_hash"),
            "attested": bool(replicas) and all(r["attested"] for r in replicas),
            "datacenter": label, "replicas": replicas}


async def answer(req: Request, label: str, desired: Mapping[str, Any],
                 src: DcSources | None) -> Response:
    """The dc's response to *req* (never raises for what the request says)."""
    try:
        if src is None:
            raise _Refuse(DC_UNAVAILABLE, "this dc CP answers no requests")
        with trio.fail_after(ANSWER_TIMEOUT_S):
            if req.kind == "logs":
                body = await _logs(req, label, desired, src)
            elif req.kind == "attestation":
                body = await _attestation(req, label, desired, src)
            else:
                raise _Refuse(UNKNOWN_KIND, f"kind must be one of {', '.join(KINDS)}")
    except _Refuse as exc:
        return Response("response", label, req.id, exc.code, exc.detail[:300])
    except (ActorError, trio.TooSlowError) as exc:
        return Response("response", label, req.id, DC_UNAVAILABLE, str(exc)[:300])
    return Response("response", label, req.id, None, "", body)
