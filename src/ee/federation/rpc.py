"""Request/response over the federation link: the master asks a dc CP.

The link carries sequenced, spooled events up and signed snapshots down; this adds one
more exchange, ephemeral on both ends. The master sends a signed ``request`` frame
(``wire.Request``: a random 128-bit id, a ``kind``, a deployment or agent id, ``args``)
and the dc answers with a signed ``response`` frame (``wire.Response``) carrying the
same id. Nothing of it is spooled or sequenced: a request lost with its link is an
error for the asker (``datacenter_unavailable``), never a retry.

Master (``MasterRpc``): every request id is opened in the ``Outstanding`` table under
the dc it was sent to, at most ``per_dc`` at once (503 ``datacenter_busy``), and at most
``per_asker`` of them for one asker (an account, or the admin: 429 ``too_many_asks``), so
one tenant polling attestation cannot keep another's logs waiting, and tenants together
at most ``per_dc - per_asker`` (503 ``datacenter_busy``: the admin keeps its share); the
asker waits ``timeout_s`` of Trio time (``datacenter_timeout``) or until the dc's link
closes (``datacenter_unavailable``). A response is applied only when its id is open *for the
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

import base64
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

from ee.actors.agent import ProveNow
from ee.actors.app import GetDeployment
from ee.actors.directory import AgentDirectory, AgentRecord
from ee.actors.identity import Identity, key_sha256
from ee.attestation import QuoteFormatError
from ee.attestation.eventlog import EventLogFormatError, RuntimeLogError, parse_runtime_log
from ee.attestation.tpm import qualifying_data
from ee.cp.errors import ApiError
from ee.cp.registration import Judge, log_mismatches
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
from ee.protocol.messages import Attestation
from ee.protocol.reportdata import registration_report_data
from ee.protocol.strict import make_converter, problems
from ee.runtime import ActorError, Registry

log = logging.getLogger("ee.federation")

KINDS: Final = ("logs", "attestation")
MAX_TAIL: Final = 10_000  # as the direct logs route
DEFAULT_TIMEOUT_S: Final = 10.0
MAX_OUTSTANDING_PER_DC: Final = 16
MAX_OUTSTANDING_PER_ASKER: Final = 4  # of those, one account's (or the admin's)
ADMIN_ASKER: Final = "admin"
MAX_ANSWERING: Final = 32  # requests a dc answers at once (beyond: dc_busy)
ANSWER_TIMEOUT_S: Final = 30.0  # the dc gives up on its own sources after this
#: Slack over MAX_RESPONSE_BYTES for the envelope around a response body.
ENVELOPE_SLACK: Final = 4096

# Errors of an ask, at the master (HTTP status, code).
DATACENTER_UNAVAILABLE: Final = "datacenter_unavailable"
DATACENTER_TIMEOUT: Final = "datacenter_timeout"
DATACENTER_BUSY: Final = "datacenter_busy"
TOO_MANY_ASKS: Final = "too_many_asks"
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
                         headers={"Retry-After": "5"} if status in (429, 503, 504) else None)


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
    """Request ids open per dc (and per asker), and the ones closed lately (for
    ``response_late``)."""

    def __init__(self, per_dc: int, remember: int = 4096,
                 per_asker: int = MAX_OUTSTANDING_PER_ASKER) -> None:
        self.per_dc = per_dc
        self.per_asker = min(per_asker, per_dc)
        # What tenants hold together: the admin keeps its share (an operator debugging a
        # dc is not locked out by a few tenants polling it), when that leaves tenants
        # more than one tenant's share; a smaller table is shared as one.
        rest = per_dc - self.per_asker
        self.tenants_cap = rest if rest > self.per_asker else per_dc
        self.remember = remember
        self.open: dict[str, str] = {}  # id -> dc label
        self.askers: dict[str, str] = {}  # id -> who asked
        self.closed: OrderedDict[str, str] = OrderedDict()

    def count(self, label: str) -> int:
        return sum(1 for dc in self.open.values() if dc == label)

    def full(self, label: str, asker: str = ADMIN_ASKER) -> str | None:
        """Why *asker* may not open one more request to *label* (``datacenter_busy``:
        the dc's cap, or the tenants' when *asker* is one; ``too_many_asks``), or None."""
        if self.count(label) >= self.per_dc:
            return DATACENTER_BUSY
        mine = tenants = 0
        for rid, dc in self.open.items():
            if dc == label:
                who = self.askers.get(rid)
                mine += who == asker
                tenants += who != ADMIN_ASKER
        if mine >= self.per_asker:
            return TOO_MANY_ASKS
        return DATACENTER_BUSY if asker != ADMIN_ASKER and tenants >= self.tenants_cap \
            else None

    def start(self, label: str, rid: str, asker: str = ADMIN_ASKER) -> bool:
        """Open *rid* for *label*; False when ``full`` or *rid* was seen."""
        if self.full(label, asker) is not None or rid in self.open or rid in self.closed:
            return False
        self.open[rid] = label
        self.askers[rid] = asker
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
        self.askers.pop(rid, None)
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
                 per_dc: int = MAX_OUTSTANDING_PER_DC,
                 per_asker: int = MAX_OUTSTANDING_PER_ASKER) -> None:
        self.seal = seal
        self.refuse = refuse
        self.timeout_s = timeout_s
        self.table = Outstanding(per_dc, per_asker=per_asker)
        self.links: dict[str, Send] = {}
        self._waiters: dict[str, _Waiter] = {}

    async def ask(self, label: str, kind: str, *, deployment_id: str | None = None,
                  agent_id: str | None = None, args: Mapping[str, Any] | None = None,
                  timeout_s: float | None = None, usable: bool = True,
                  asker: str = ADMIN_ASKER) -> dict[str, Any]:
        """The dc's answer body, or ``RpcError`` (unavailable, busy, too many of
        *asker*'s, timeout, its code). *usable*: False when the dc is degraded (asked
        nothing then). *asker*: the account asking (its share of ``per_dc``)."""
        send = self.links.get(label)
        if send is None or not usable:
            raise RpcError(503, DATACENTER_UNAVAILABLE, f"datacenter {label} is not "
                           "connected to this master" if send is None else
                           f"datacenter {label} is degraded", label)
        rid = secrets.token_hex(16)
        full = self.table.full(label, asker)
        if full == TOO_MANY_ASKS:
            raise RpcError(429, TOO_MANY_ASKS, f"{self.table.per_asker} of your requests to "
                           f"datacenter {label} are outstanding; retry when one is answered",
                           label)
        if full is not None or not self.table.start(label, rid, asker):
            raise RpcError(503, DATACENTER_BUSY, f"too many requests to datacenter {label} "
                           f"are outstanding (at most {self.table.per_dc}, "
                           f"{self.table.tenants_cap} of them tenants')", label)
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


_strict = make_converter(forbid_extra_keys=True)  # JSON types as they are, no coercion


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
        args = _strict.structure(req.args, LogsArgs)
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
    try:
        args = _strict.structure(req.args, AttestationArgs)
    except Exception as exc:  # cattrs raises exception groups of any builtin kind
        raise _Refuse(BAD_REQUEST, f"attestation args: {_why(exc)}"[:300]) from None
    nonce = None if args.nonce is None else bytes.fromhex(args.nonce)
    budget = [MAX_EVIDENCE_BUDGET]
    if req.agent_id is not None and req.deployment_id is None:
        record = src.directory.get(req.agent_id)
        if record is None or record.identity is None \
                or record.identity.datacenter != label:
            raise _Refuse(UNKNOWN_AGENT, f"no agent {req.agent_id[:80]!r} in {label}")
        body = {"datacenter": label, **_proofed(record)}
        if nonce is not None:
            body["evidence"] = await _fresh(src, record, nonce, args.within_s, budget)
        return body
    key = _intent_app(req, label, desired)
    assert req.deployment_id is not None
    view = None
    if f"app/{key}" in src.registry:
        view = await src.registry.ref(f"app/{key}").ask(GetDeployment(req.deployment_id),
                                                        timeout=5)
    if view is None:
        raise _Refuse(NOT_PLACED_HERE, "the deployment does not run here (yet)")
    records = [src.directory.get(str(r["agent_id"])) for r in view.get("replicas", [])]
    fresh: list[dict[str, Any] | None] = [None] * len(records)
    if nonce is not None:
        async def one(i: int, record: AgentRecord | None) -> None:
            fresh[i] = await _fresh(src, record, nonce, args.within_s, budget)

        async with trio.open_nursery() as nursery:
            for i, record in enumerate(records[:MAX_FRESH_REPLICAS]):
                nursery.start_soon(one, i, record)
        for i in range(MAX_FRESH_REPLICAS, len(records)):
            fresh[i] = _no_evidence(PROOF_TOO_LARGE, f"only the first {MAX_FRESH_REPLICAS} "
                                    "replicas are proven afresh per request")
    replicas = []
    for r, record, evidence in zip(view.get("replicas", []), records, fresh, strict=True):
        replica = {**src.replica_attestation(r, record), **_proofed(record)}
        replicas.append(replica if evidence is None else {**replica, "evidence": evidence})
    return {"deployment_id": req.deployment_id, "compose_hash": view.get("compose_hash"),
            "attested": bool(replicas) and all(r["attested"] for r in replicas),
            "datacenter": label, "replicas": replicas}


# ---- fresh proofs: the dc asks its agent, the master verifies ---------------------------
#
# The summary above is the dc's word. With a ``nonce`` (32 random bytes the master chose,
# hex) in the request's args, the dc also asks the agent itself for a new quote bound to
# it (``ProveNow``: ``attest`` over the agent's session, verified by the dc as any
# re-attestation; a failing one quarantines the agent there) and answers the raw
# evidence next to its summary. The master then verifies that evidence itself
# (``check_evidence``, in a worker thread) with its own judge, trust roots, collateral
# and policy: REPORTDATA must bind *its* nonce and the key the dc admitted (else
# ``stale_proof``: a replayed quote or one made for another nonce), the logs must replay
# to the quoted registers (``log_mismatch``), the quoted MRTD must be the one the dc
# reported for that agent (``proof_mismatch``). Its outcome is ``verified_by_master``.

NONCE_HEX: Final = r"[0-9a-f]{64}"
PROVE_WITHIN_S: Final = 5.0  # default bound of the agent round trip at the dc
MAX_QUOTE_BYTES: Final = 16 * 1024  # a TDX quote is ~5 KiB, a vTPM evidence bundle less
MAX_PROOF_EVENT_LOG_BYTES: Final = 128 * 1024
MAX_PROOF_RUNTIME_LOG_CHARS: Final = 64 * 1024
#: Raw evidence bytes one answer may carry (under MAX_RESPONSE_BYTES after base64).
MAX_EVIDENCE_BUDGET: Final = 512 * 1024
MAX_FRESH_REPLICAS: Final = 8
# Outcome codes of a fresh proof (``verified_by_master.code``; the dc's own are
# agent_offline, proof_busy, agent_no_answer, proof_too_large).
NO_PROOF: Final = "no_proof"
BAD_PROOF: Final = "bad_proof"
PROOF_TOO_LARGE: Final = "proof_too_large"
STALE_PROOF: Final = "stale_proof"
PROOF_MISMATCH: Final = "proof_mismatch"
LOG_MISMATCH: Final = "log_mismatch"
AGENT_NO_ANSWER: Final = "agent_no_answer"
VERIFY_ERROR: Final = "verify_error"


@attrs.frozen
class AttestationArgs:
    nonce: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.matches_re(NONCE_HEX)))
    within_s: float = attrs.field(default=PROVE_WITHIN_S, validator=[
        attrs.validators.ge(0.1), attrs.validators.le(ANSWER_TIMEOUT_S / 2)])


@attrs.frozen
class Evidence:
    """What the dc sends of one fresh proof (as the master structures it)."""

    provider: str = attrs.field(validator=attrs.validators.max_len(16))
    quote: str = attrs.field(validator=attrs.validators.max_len(MAX_QUOTE_BYTES * 2))
    public_key: str = attrs.field(validator=attrs.validators.matches_re(r"[0-9a-f]{64}"))
    event_log: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.max_len(MAX_PROOF_EVENT_LOG_BYTES * 2)))
    runtime_log: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.max_len(MAX_PROOF_RUNTIME_LOG_CHARS)))
    dc_verdict: dict[str, Any] = attrs.field(factory=dict)


def _why(exc: BaseException) -> str:
    return "; ".join(f"{f or '.'}: {r}" for f, r in problems(exc)[:3])


def _no_evidence(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail[:300]}


async def _fresh(src: DcSources, record: AgentRecord | None, nonce: bytes, within_s: float,
                 budget: list[int]) -> dict[str, Any]:
    """The agent's fresh evidence for *nonce*, or why there is none (``error``)."""
    ident = None if record is None else record.identity
    if record is None or ident is None:
        return _no_evidence("agent_offline", "the agent is not known here")
    try:
        with trio.fail_after(within_s):
            pending = await src.registry.ref(f"agent/{record.agent_id}").ask(
                ProveNow(nonce), timeout=within_s)
            await pending.done.wait()
    except trio.TooSlowError:
        return _no_evidence(AGENT_NO_ANSWER, f"the agent did not answer within {within_s}s")
    except ActorError as exc:
        return _no_evidence("agent_offline", f"the agent's actor did not answer: {exc}")
    if pending.error is not None or pending.answer is None:
        return _no_evidence(pending.error or AGENT_NO_ANSWER, pending.detail)
    a = pending.answer
    runtime = a.runtime_log
    size = len(a.quote) + len(a.event_log or b"") + len(runtime or "")
    if len(a.quote) > MAX_QUOTE_BYTES or len(a.event_log or b"") > MAX_PROOF_EVENT_LOG_BYTES \
            or len(runtime or "") > MAX_PROOF_RUNTIME_LOG_CHARS or size > budget[0]:
        return _no_evidence(PROOF_TOO_LARGE, f"the evidence ({size} bytes) is over the caps")
    budget[0] -= size
    refusal = pending.refusal
    return {"provider": a.provider, "quote": base64.b64encode(a.quote).decode(),
            "event_log": None if a.event_log is None else base64.b64encode(
                a.event_log).decode(),
            "runtime_log": runtime, "public_key": ident.public_key.hex(),
            "dc_verdict": {"ok": refusal is None,
                           "code": None if refusal is None else str(refusal.code),
                           "reasons": [] if refusal is None else list(refusal.reasons)}}


def _refused(code: str, *reasons: str, mrtd: str | None = None,
             tcb_status: str | None = None) -> dict[str, Any]:
    return {"ok": False, "code": code, "reasons": [r[:500] for r in reasons[:20]],
            "mrtd": mrtd, "tcb_status": tcb_status, "deploys": []}


def check_evidence(judge: Judge, nonce: bytes, body: Mapping[str, Any],
                   reported_mrtd: str | None, *, now: float,
                   reported_key: str | None = None) -> dict[str, Any]:
    """The master's own verdict on the fresh evidence in *body* (a proof answer or one
    replica of it), for the *nonce* it chose: ``verified_by_master``. Pure apart from the
    judge's collateral; CPU-bound (call from a worker thread). Never raises.
    *reported_mrtd*/*reported_key*: what the dc reported up for the agent before (its
    spooled view); the evidence must match both, so a dc cannot answer for one agent
    with another genuine TD's quote."""
    try:
        return _check(judge, nonce, body, reported_mrtd, now, reported_key)
    except Exception as exc:  # the evidence is the dc's: fail closed, never a 500
        log.error("fresh proof could not be verified", exc_info=exc)
        return _refused(VERIFY_ERROR, "the evidence could not be verified (logged)")


def _check(judge: Judge, nonce: bytes, body: Mapping[str, Any], reported_mrtd: str | None,
           now: float, reported_key: str | None = None) -> dict[str, Any]:
    doc, proof = body.get("evidence"), body.get("proof")
    if not isinstance(doc, dict):
        return _refused(NO_PROOF, "the datacenter sent no evidence")
    if doc.get("error") is not None:
        return _refused(str(doc["error"])[:64], str(doc.get("detail") or ""))
    if not isinstance(proof, dict):
        return _refused(NO_PROOF, "the datacenter sent no summary to check the evidence by")
    try:
        ev = _strict.structure(doc, Evidence)
        quote = base64.b64decode(ev.quote, validate=True)
        event_log = None if ev.event_log is None else base64.b64decode(ev.event_log,
                                                                       validate=True)
        public_key = bytes.fromhex(ev.public_key)
        answer = Attestation(provider=ev.provider, quote=quote,  # type: ignore[arg-type]
                             event_log=event_log, runtime_log=ev.runtime_log)
    except Exception as exc:  # cattrs raises exception groups of any builtin kind
        return _refused(BAD_PROOF, f"the evidence does not parse: {_why(exc)}")
    if len(quote) > MAX_QUOTE_BYTES or len(event_log or b"") > MAX_PROOF_EVENT_LOG_BYTES:
        return _refused(PROOF_TOO_LARGE, "the evidence is over the caps")
    said_mrtd = str(proof.get("mrtd"))
    if key_sha256(public_key) != proof.get("session_key_sha256") \
            or (reported_key is not None and key_sha256(public_key) != reported_key) \
            or ev.provider != proof.get("provider") \
            or body.get("agent_id", proof.get("agent_id")) != proof.get("agent_id"):
        return _refused(PROOF_MISMATCH, "the evidence's key, provider or agent is not "
                        "the one the datacenter admitted for this agent")
    identity = Identity(
        agent_id=str(proof.get("agent_id")), vm_name=str(proof.get("vm_name")),
        node_size=str(proof.get("node_size")), datacenter=str(proof.get("datacenter")),
        gpu=False, public_key=public_key, provider=ev.provider, mrtd=said_mrtd,
        tcb_status=None, verdict="pass", violations=(), verified_at=now,
        ak_name=None if proof.get("ak_name") is None else str(proof["ak_name"]))
    # The quoted values, for the codes and the view (the verdict is the judge's below).
    tcb_status = None
    try:
        if ev.provider == "tpm":
            if judge.tpm is None:
                return _refused("attestation_failed", "this master trusts no EK CA")
            tpm = judge.tpm.verify(quote, expected_qualifying_data=qualifying_data(
                nonce, public_key), now=now)
            fresh, mrtd = tpm.qualifying_ok, tpm.measurement
        else:
            result = judge.verifier.verify(quote, now=now, collateral=judge.collateral)
            report = result.quote.report
            fresh = report.report_data == registration_report_data(nonce, public_key)
            mrtd, tcb_status = report.mr_td.hex(), result.tcb_status
    except QuoteFormatError as exc:
        return _refused("bad_quote", str(exc))
    if not fresh:
        return _refused(STALE_PROOF, "the quote does not bind this master's nonce and the "
                        "agent's key: it was made for another request", mrtd=mrtd)
    if mrtd != said_mrtd or (reported_mrtd is not None and mrtd != reported_mrtd):
        return _refused(PROOF_MISMATCH, f"the quoted MRTD {mrtd} is not the one the "
                        f"datacenter reported ({said_mrtd})", mrtd=mrtd,
                        tcb_status=tcb_status)
    deploys: list[dict[str, str]] = []
    if ev.provider != "tpm":
        try:
            logs = log_mismatches(answer, report, require=judge.policy.require_event_log)
            if answer.runtime_log:
                deploys = [{"deployment_id": e.deployment_id, "app": e.app,
                            "version": e.version, "compose_hash": e.compose_hash}
                           for e in parse_runtime_log(answer.runtime_log.encode())]
        except (EventLogFormatError, RuntimeLogError) as exc:
            return _refused("bad_event_log", str(exc), mrtd=mrtd, tcb_status=tcb_status)
        if logs:
            return _refused(LOG_MISMATCH, *logs, mrtd=mrtd, tcb_status=tcb_status)
    refusal = judge.reattest_answer(answer, nonce, identity, now=now)
    if refusal is not None:
        return _refused(refusal.code.lower(), *refusal.reasons, mrtd=mrtd,
                        tcb_status=tcb_status)
    return {"ok": True, "code": None, "reasons": [], "mrtd": mrtd, "tcb_status": tcb_status,
            "deploys": deploys}


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
