"""A datacenter CP's side of federation: enrolment, the durable outbox, the uplink.

Supervision subtree (a child of the CP's root)::

    federation (one_for_one)
    ├── outbox      agent changes (from the agent directory) → sequenced spool events
    ├── uplink      mTLS websocket to the master: hello, events, acks, replays, snapshots
    ├── stats       this CP's own metrics → a ``stats`` event (ee.federation.metrics)
    └── reconciler  the snapshot's deployment intents → local deployments, ``placement``
                    outcome events (ee.federation.reconcile)

Enrolment (``enroll``, once, before the CP starts): the dc makes its own TLS key and
Ed25519 signing key, and proves to the master that it holds a master-issued join token
(``eej_SECRET.PIN``) without sending its secret: the token's id and an HMAC keyed by the
secret's hash over its label and both public keys (``pki.join_body``). It gets back a
certificate from the cluster CA (CN = its label), the CA certificate and the master's
signing key, which it pins. Whoever answers at ``--upstream`` learns nothing it could
join with: the proof enrols only the keys this dc holds. Everything lives in
``DATA_DIR/federation``. The answer is hostile until checked (``pki.check_answer``): the
CA and master key must match the master pin the token carries or ``--master-pin``
names, the certificate must be the CA's for this label and this dc's key; only then is
anything written. Without ``--dev`` a pin is required and the upstream must be https
(verified; ``--upstream-ca`` for a private CA).
Offline (no join route reachable from the dc): ``write_request`` keeps fresh keys in
``federation/pending`` and writes their public halves; the operator has the master sign
them (``eectl federation issue``); ``install_bundle`` checks the bundle like a join
answer, against a pin given on the command line, then moves the keys into place.

Up: every change of one of this datacenter's agents (status, verdict, capacity,
deployment states) is coalesced per agent and appended to the SQLite spool as an
``agents`` event with the next sequence; on every (re)connection a ``resync`` event
with the full picture follows the spooled ones, so a master that lost its memory
converges. The uplink sends from the first unacknowledged sequence, the master acks
(the spool forgets) or asks for a replay from a sequence (the uplink rewinds). While the
master is away nothing is lost: the spool grows and is sent when the link returns; the
dc keeps admitting, re-attesting and reconciling on its own meanwhile. Each failure of
the uplink says why (``why_down``: type, message or cause, the master's refusal on that
link); a new reason is logged at WARNING at once, the same one at most once a minute
with a count (``next_down``), and ``status`` keeps the last one and when.

Down: a snapshot is applied only when its signature verifies with the pinned master key
and its version is newer than the one running; it is kept signed in the spool (so a
restart runs the same version) and acknowledged upstream with a ``snapshot_applied``
event. Anything else is refused with a reason code and an event.

Stats: every ``stats_interval_s`` while linked, when they changed, and at each
(re)connection in any case (a restarted master knows none), the cumulative figures of this
CP's own metrics registry (registrations, attestation latency, deployments, deploy queue
delay, agents by status: ``metrics.dc_stats``) are spooled as a ``stats`` event. Not while
the master is away: only the latest matters, and the reconnection sends it.

Requests: a verified ``request`` frame of the master is answered on the same link by a
``response`` (ee.federation.rpc ``answer``: logs of the master's intents placed here,
attestation proofs of this dc's agents), at most ``MAX_ANSWERING`` at once, each in its
own task so the link keeps reading. Nothing of it is spooled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import cattrs
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from trio_websocket import (
    ConnectionClosed,
    ConnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

from ee.actors.directory import AgentDirectory, AgentRecord
from ee.actors.identity import key_sha256
from ee.federation import pki
from ee.federation.master import FederationSettings
from ee.federation.metrics import FederationMetrics, dc_stats
from ee.federation.placement import iso
from ee.federation.reconcile import DcReconciler, LocalApps, local_state
from ee.federation.rpc import (
    DC_BUSY,
    DC_ERROR,
    MAX_ANSWERING,
    DcSources,
    answer,
    proof_digest,
    proof_of,
)
from ee.federation.spool import Spool
from ee.federation.trust import (
    BAD_POLICY,
    DATACENTER_CLOSED,
    FederationPolicy,
    PolicyError,
    ReleaseHooks,
    check_carried,
    closed_intents,
    read_policy,
    release_sync,
    unknown_fields,
    without,
)
from ee.federation.wire import (
    BAD_FRAME,
    HELLO_REQUIRED,
    MAX_EVENTS_PER_FRAME,
    MAX_FRAME_BYTES,
    SNAPSHOT_STALE,
    Ack,
    Event,
    Events,
    Hello,
    Refused,
    Replay,
    Request,
    Response,
    Snapshot,
    WireError,
    down_frame,
    judge_snapshot,
    open_envelope,
    seal,
    unstructure,
)
from ee.protocol.signing import (
    KeyFileError,
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
)
from ee.protocol.strict import printable
from ee.supervisors import ChildSpec, Supervisor

log = logging.getLogger("ee.federation")

Emit = Callable[[str, str, Any], None]
MAX_IN_FLIGHT = 20 * MAX_EVENTS_PER_FRAME  # events sent but not acked
FRAME_DATA_BYTES = MAX_FRAME_BYTES // 2  # events' data per frame (room for the envelope)


class EnrolError(Exception):
    pass


@attrs.frozen
class Enrollment:
    label: str
    upstream: str
    stream_url: str
    master_key: str  # hex Ed25519
    cluster_id: str
    master_pin: str = ""  # the pin the answer was checked against ("" : dev, none given)

    @classmethod
    def load(cls, directory: Path) -> Enrollment | None:
        path = directory / "enrollment.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


REQUEST_FORMAT = "ee/v2/federation/enroll-request/1"
BUNDLE_FORMAT = "ee/v2/federation/enroll-bundle/1"
MAX_ANSWER_BYTES = 64 * 1024
_PEM: Any = attrs.validators.max_len(16_000)


@attrs.frozen
class JoinAnswer:
    """The master's join answer (and the body of an offline bundle), hostile until
    ``pki.check_answer`` has passed."""

    datacenter: str = attrs.field(validator=attrs.validators.max_len(120))
    certificate: str = attrs.field(validator=_PEM)
    ca: str = attrs.field(validator=_PEM)
    master_key: str = attrs.field(validator=attrs.validators.matches_re(r"[0-9a-f]{64}"))
    stream_url: str = attrs.field(
        validator=attrs.validators.matches_re(r"wss://[A-Za-z0-9.\-\[\]:]{1,300}/[!-~]{0,300}"))
    cluster_id: str = attrs.field(validator=attrs.validators.max_len(200))


@attrs.frozen
class EnrollRequest:
    """What ``--enroll-request`` writes: the public halves of the dc's keys."""

    format: str = attrs.field(validator=attrs.validators.in_([REQUEST_FORMAT]))
    datacenter: str = attrs.field(validator=attrs.validators.max_len(120))
    tls_public_key: str = attrs.field(validator=attrs.validators.max_len(2000))
    signing_key: str = attrs.field(validator=attrs.validators.matches_re(r"[0-9a-f]{64}"))


_conv = cattrs.Converter(forbid_extra_keys=True)


_T = TypeVar("_T")


def _structure(doc: Any, cls: type[_T], what: str) -> _T:
    try:
        return _conv.structure(doc, cls)
    except (ValueError, TypeError, KeyError, cattrs.BaseValidationError) as exc:
        detail = ("; ".join(cattrs.transform_error(exc))
                  if isinstance(exc, cattrs.BaseValidationError) else str(exc))
        raise EnrolError(f"{what} is malformed: {detail[:300]}") from None


def _count(value: object) -> int:
    """An intent's ``generation`` as the master said it, or 0 when it is no count (the
    reconciler refuses such an intent; a closed dc still reports it, never crashes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def digest(path: Path) -> str:
    """SHA-256 of a request or bundle file, for the operator to compare at both ends."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pins(token_pin: str | None, given: str | None) -> str | None:
    try:
        pin = pki.normal_pin(given) if given else None
    except pki.PkiError as exc:
        raise EnrolError(f"--master-pin: {exc}") from None
    if pin is not None and token_pin is not None and pin != token_pin:
        raise EnrolError("--master-pin and the join token's pin differ")
    return pin or token_pin


def _keep(directory: Path, answer: JoinAnswer, label: str, upstream: str, pin: str | None,
          tls_key: ec.EllipticCurvePrivateKey, sign_key: Ed25519PrivateKey) -> Enrollment:
    """Check *answer*, then (only then) write the keys, certificates and enrolment."""
    if answer.datacenter != label:
        raise EnrolError(f"the answer is for datacenter {printable(answer.datacenter, 120)}, "
                         f"not {label}")
    try:
        pki.check_answer(pin=pin, label=label, ca_pem=answer.ca,
                         master_key_hex=answer.master_key, cert_pem_text=answer.certificate,
                         tls_public_pem=pki.public_pem(tls_key))
    except pki.PkiError as exc:
        raise EnrolError(f"refusing the enrolment, nothing written: {exc}") from None
    pki.save_key(directory / "dc.key", tls_key)
    save_private_key(directory / "sign.key", sign_key, overwrite=True)
    # Re-encoded from the parsed certificates: exactly what was checked, nothing more.
    pki.write_public(directory / "dc.pem", pki.canonical_pem(answer.certificate).encode())
    pki.write_public(directory / "ca.pem", pki.canonical_pem(answer.ca).encode())
    enrolment = Enrollment(label, upstream, answer.stream_url, answer.master_key,
                           answer.cluster_id, pin or "")
    pki.write_public(directory / "enrollment.json",
                     json.dumps(attrs.asdict(enrolment), indent=1).encode())
    return enrolment


def _verify(upstream: str, dev: bool, upstream_ca: Path | None) -> ssl.SSLContext | bool:
    if upstream.startswith("https://"):
        try:
            return ssl.create_default_context(
                cafile=str(upstream_ca) if upstream_ca is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise EnrolError(f"--upstream-ca {upstream_ca}: {exc}") from None
    if not dev:
        raise EnrolError(f"--upstream {upstream}: the join must be https:// (plain http "
                         "only with --dev)")
    return False


def _post_capped(url: str, body: dict[str, Any], timeout_s: float,
                 verify: ssl.SSLContext | bool) -> Any:
    """POST *body*; the answer read as it streams in, at most ``MAX_ANSWER_BYTES``
    (uncompressed), within *timeout_s* in all: whoever answers is hostile until checked."""
    import httpx  # here, not at start-up: only enrolment calls the master over HTTP

    deadline = time.monotonic() + timeout_s
    try:
        with httpx.stream("POST", url, json=body, timeout=timeout_s, verify=verify,
                          headers={"Accept-Encoding": "identity"}) as resp:
            content = bytearray()
            for chunk in resp.iter_raw():
                content += chunk
                if len(content) > MAX_ANSWER_BYTES:
                    raise EnrolError(f"the join answer is larger than {MAX_ANSWER_BYTES} "
                                     "bytes")
                if time.monotonic() > deadline:
                    raise EnrolError(f"the join answer took longer than {timeout_s} s")
    except httpx.HTTPError as exc:
        raise EnrolError(f"cannot reach the master at {url}: {exc}") from None
    return httpx.Response(resp.status_code, content=bytes(content))


def enroll(data_dir: Path, upstream: str, label: str, token: str | None,
           timeout_s: float = 15.0, *, dev: bool = False, upstream_ca: Path | None = None,
           pin: str | None = None) -> Enrollment:
    """Join the master once (a no-op when already enrolled for *label*). Without *dev*
    a master pin (in the token or *pin*) and an https upstream are required."""
    directory = data_dir / "federation"
    existing = Enrollment.load(directory)
    if existing is not None and existing.label == label:
        return existing
    if token is None:
        raise EnrolError(f"datacenter {label} is not enrolled with a master yet: give "
                         "--join-token (eectl federation join-token prints one), or "
                         "--enroll-request / --enroll-bundle offline")
    try:
        _secret, token_pin = pki.split_join_token(token)
    except pki.PkiError as exc:
        raise EnrolError(f"--join-token: {exc}") from None
    expected = _pins(token_pin, pin)
    if expected is None and not dev:
        raise EnrolError("the join token carries no master pin (and no --master-pin): "
                         "use a token printed by `eectl federation join-token`")
    verify = _verify(upstream, dev, upstream_ca)
    tls_key = pki.new_key()
    sign_key = generate_signing_key()
    body = pki.join_body(token, label, pki.public_pem(tls_key),
                         public_key_bytes(sign_key).hex())
    resp = _post_capped(upstream.rstrip("/") + "/api/v2/federation/join", body,
                        timeout_s, verify)
    if resp.status_code != 200:
        try:
            err = resp.json().get("error", {})
            detail = f"{err.get('code')}: {err.get('message')}"
        except (ValueError, AttributeError):
            detail = resp.text
        # Whoever answered wrote it: one printable line (no terminal escapes, no forged
        # log lines), capped.
        raise EnrolError(f"the master refused the join ({resp.status_code}): "
                         f"{printable(detail, 300)}")
    try:
        doc = resp.json()
    except ValueError:
        raise EnrolError("the join answer is not JSON") from None
    answer = _structure(doc, JoinAnswer, "the join answer")
    return _keep(directory, answer, label, upstream, expected, tls_key, sign_key)


def write_request(data_dir: Path, label: str, out: Path) -> Path:
    """Offline enrolment, step 1 (at the dc): fresh keys kept in ``federation/pending``
    (an earlier request's are replaced), their public halves written to *out*."""
    directory = data_dir / "federation"
    if Enrollment.load(directory) is not None:
        raise EnrolError(f"{directory} is already enrolled; move it away to re-enrol")
    pending = directory / "pending"
    tls_key = pki.new_key()
    sign_key = generate_signing_key()
    pki.save_key(pending / "dc.key", tls_key)
    save_private_key(pending / "sign.key", sign_key, overwrite=True)
    request = EnrollRequest(REQUEST_FORMAT, label, pki.public_pem(tls_key),
                            public_key_bytes(sign_key).hex())
    pki.write_public(out, json.dumps(attrs.asdict(request), indent=1).encode())
    return out


def read_request(path: Path) -> EnrollRequest:
    try:
        with path.open("rb") as f:  # capped while read: the path may name a FIFO
            raw = f.read(MAX_ANSWER_BYTES + 1)
        if len(raw) > MAX_ANSWER_BYTES:
            raise EnrolError(f"{path}: larger than {MAX_ANSWER_BYTES} bytes")
        doc = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise EnrolError(f"{path}: {exc}") from None
    return _structure(doc, EnrollRequest, f"{path}")


def bundle_doc(answer: dict[str, Any]) -> dict[str, Any]:
    """The offline bundle for a join answer (what ``eectl federation issue`` writes)."""
    return {"format": BUNDLE_FORMAT, **answer}


def install_bundle(data_dir: Path, upstream: str, label: str, bundle: Path,
                   pin: str | None) -> Enrollment:
    """Offline enrolment, step 3 (at the dc): check *bundle* against *pin* and the
    pending keys, then keep it. A no-op when already enrolled for *label*."""
    directory = data_dir / "federation"
    existing = Enrollment.load(directory)
    if existing is not None and existing.label == label:
        return existing
    if not pin:
        raise EnrolError("--enroll-bundle needs --master-pin (printed by "
                         "`eectl federation issue`; carry it apart from the bundle)")
    expected = _pins(None, pin)
    pending = directory / "pending"
    try:
        tls_key = serialization.load_pem_private_key((pending / "dc.key").read_bytes(), None)
        sign_key = load_private_key(pending / "sign.key")
        with bundle.open("rb") as f:  # capped: the path may name anything (a FIFO)
            raw = f.read(MAX_ANSWER_BYTES + 1)
    except (OSError, ValueError, KeyFileError) as exc:
        raise EnrolError(f"no pending enrolment request here (--enroll-request first): "
                         f"{exc}") from None
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
        raise EnrolError(f"{pending / 'dc.key'}: not an EC key")
    if len(raw) > MAX_ANSWER_BYTES:
        raise EnrolError(f"{bundle}: larger than {MAX_ANSWER_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise EnrolError(f"{bundle}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.pop("format", None) != BUNDLE_FORMAT:
        raise EnrolError(f"{bundle}: not an enrolment bundle ({BUNDLE_FORMAT})")
    answer = _structure(doc, JoinAnswer, f"{bundle}")
    enrolment = _keep(directory, answer, label, upstream, expected, tls_key, sign_key)
    shutil.rmtree(pending, ignore_errors=True)  # the keys are in place now
    return enrolment


def agent_view(record: AgentRecord) -> dict[str, Any] | None:
    """What the master learns about one agent (None: nothing to say yet)."""
    ident = record.identity
    if ident is None:
        return None
    proof = proof_of(record)
    return {"status": record.status, "verdict": record.verdict,
            "datacenter": ident.datacenter, "node_size": ident.node_size,
            "free": record.free, "mrtd": ident.mrtd,
            # The attestation outcome's digest; the proof itself on request (rpc).
            "proof_sha256": None if proof is None else proof_digest(proof),
            # the key it was admitted with: a fresh proof must be made with this key
            "session_key_sha256": key_sha256(ident.public_key),
            "deployments": {d.deployment_id: str(d.state) for d in record.deployments}}


DOWN_LOG_EVERY_S: Final = 60.0  # the same uplink failure again: one line this often


def why_down(exc: BaseException, refused: str | None = None) -> str:
    """One printable line saying why the uplink went down: the exception's type and
    message (``BrokenResourceError`` and ``HandshakeError`` have none: their cause, or
    a hint), and the master's last refusal on that link (*refused*), if any."""
    if isinstance(exc, WireError):
        text = f"refused: {exc.code}: {exc.detail}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        cause = exc.__cause__ or exc.__context__
        if not str(exc) and cause is not None and str(cause):
            text += f" ({type(cause).__name__}: {cause})"
        elif not str(exc):
            what = ("no websocket handshake in time" if isinstance(exc, ConnectionTimeout)
                    else "the master closed the connection")
            text += (f" ({what}; if it goes on, is this dc's certificate still pinned at "
                     "the master? a join of this label elsewhere replaces it)")
    if refused is not None:
        text += f"; earlier on that link the master refused: {refused}"
    return printable(text, 300)


@attrs.frozen
class Downs:
    """The uplink's failures since it was last up, as the log tells them."""

    reason: str | None = None  # the last failure's
    failures: int = 0  # in a row
    unlogged: int = 0  # of the same reason since its last line
    logged_at: float = 0.0


def next_down(d: Downs, reason: str, now: float, every: float = DOWN_LOG_EVERY_S
              ) -> tuple[Downs, tuple[int, str] | None]:
    """One more failure: the new state and the log line (level, text) if one is due. A
    new reason is logged at once (WARNING); the same again at most once per *every*
    seconds, with how many failures that line stands for."""
    if reason != d.reason:
        return Downs(reason, d.failures + 1, 0, now), (logging.WARNING, reason)
    unlogged = d.unlogged + 1
    if now - d.logged_at < every:
        return attrs.evolve(d, failures=d.failures + 1, unlogged=unlogged), None
    return Downs(reason, d.failures + 1, 0, now), (
        logging.WARNING, f"{reason} (again, {unlogged} times in {now - d.logged_at:.0f} s; "
        f"{d.failures + 1} failures in a row)")


class DcFederation:
    def __init__(self, data_dir: Path, label: str, settings: FederationSettings, *,
                 directory: AgentDirectory, emit: Emit, metrics: CollectorRegistry,
                 local: LocalApps | None = None, sources: DcSources | None = None) -> None:
        self.dir = data_dir / "federation"
        enrolment = Enrollment.load(self.dir)
        if enrolment is None or enrolment.label != label:
            raise EnrolError(f"datacenter {label} is not enrolled (run with --join-token)")
        self.enrollment = enrolment
        self.sources = sources  # what requests of the master are answered from (rpc)
        self.answering = 0
        self.label = label
        self.settings = settings
        self.directory = directory
        self.emit = emit
        self.metrics = FederationMetrics(metrics)
        self.registry = metrics  # this CP's own figures, for ``stats`` events
        self._stats_now = trio.Event()  # set at each (re)connection
        self._stats_sent: dict[str, Any] | None = None
        self.key = load_private_key(self.dir / "sign.key")
        self.master_key = public_key_from_bytes(bytes.fromhex(enrolment.master_key))
        self.spool = Spool(self.dir / "spool.sqlite3")
        self.snapshot = self._load_snapshot()
        self.connected = False
        self.downs = Downs()  # the uplink's failures since it was last up (next_down)
        self.last_error: str | None = None
        self.last_error_at: str | None = None  # ISO-8601 UTC, wall clock
        self._link_refused: str | None = None  # the master's last refusal on this link
        self.acked = 0
        self.depth = 0
        first, nxt, _ = self.spool.bounds()
        self.acked, self.last_seq = first - 1, nxt - 1
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._last: dict[str, dict[str, Any] | None] = {}
        self._dirty = trio.Event()
        self._appended = trio.Event()
        directory.subscribe(self._changed)
        # The master's deployment intents, run here (ee.federation.reconcile).
        self.reconciler = None if local is None else DcReconciler(
            label, local, self._report_placement, emit)
        self.supervisor = Supervisor("federation", [
            ChildSpec(id="outbox", start=self._run_outbox, shutdown=2.0),
            ChildSpec(id="uplink", start=self._run_uplink, shutdown=2.0),
            ChildSpec(id="stats", start=self._run_stats, shutdown=2.0),
            *([ChildSpec(id="reconciler", start=self._run_reconciler, shutdown=2.0)]
              if self.reconciler is not None else []),
        ], max_restarts=20, period=10.0)

    async def _report_placement(self, data: dict[str, Any]) -> None:
        await self._append("placement", data)

    async def _run_reconciler(self, task_status: trio.TaskStatus[None]) -> None:
        assert self.reconciler is not None
        await self.reconciler.run(lambda: self.snapshot.desired, 5.0, task_status)

    # ---- snapshots ----

    #: What applies the releases a snapshot carries (ee.federation.trust; set by the CP,
    #: None: carried releases are not applied here).
    release_hooks: ReleaseHooks | None = None
    #: The intents this dc is closed to (``trust.closed_intents``), and the releases it
    #: holds because the master carries them (``trust.release_sync``): both kept in
    #: the spool, so a restart runs the same.
    closed: frozenset[str]
    from_master: frozenset[str]
    release_refusals: frozenset[tuple[str, str, str]] = frozenset()  # said already

    def _load_snapshot(self) -> Snapshot:
        self.closed = frozenset(json.loads(self.spool.get_meta("closed_intents") or "[]"))
        self.from_master = frozenset(json.loads(
            self.spool.get_meta("releases_from_master") or "[]"))
        text = self.spool.get_meta("snapshot")
        if text is not None:
            try:
                frame = down_frame(open_envelope(text, self.master_key))
                if isinstance(frame, Snapshot):
                    return attrs.evolve(frame, desired=without(frame.desired, self.closed))
            except WireError as exc:
                log.error("federation: stored snapshot no longer verifies: %s", exc)
        return Snapshot("snapshot", 0, 0.0, {})

    async def offer_snapshot(self, text: str) -> Refused | None:
        """A snapshot frame as received: verify, structure, then ``apply_snapshot``."""
        try:
            body = await trio.to_thread.run_sync(open_envelope, text, self.master_key)
            frame = down_frame(body)
        except WireError as exc:
            self.refuse(exc.code, exc.detail)
            return Refused("refused", exc.code, exc.detail)
        if not isinstance(frame, Snapshot):
            self.refuse(BAD_FRAME, f"expected a snapshot, got {frame.type}")
            return Refused("refused", BAD_FRAME, "expected a snapshot")
        return await self.apply_snapshot(text, frame)

    async def apply_snapshot(self, text: str, frame: Snapshot) -> Refused | None:
        """*frame* is *text*'s verified body. Apply it when newer, else refuse."""
        if not judge_snapshot(self.snapshot.version, frame.version):
            detail = f"version {frame.version} is not newer than {self.snapshot.version}"
            self.refuse(SNAPSHOT_STALE, detail)
            return Refused("refused", SNAPSHOT_STALE, detail)
        # Releases first: a crash before the snapshot is kept applies them again (each
        # step is idempotent) when the master offers this version once more.
        await self._apply_releases(frame.desired.get("releases"))
        said = frame.desired.get("policy") or {}
        try:
            policy = read_policy(said, strict=False)
            if unknown_fields(said):
                log.warning("federation: policy fields this dc does not know (skipped): "
                            "%s", ", ".join(unknown_fields(said))[:300])
        except PolicyError as exc:  # a master of another version: its defaults here
            self.refuse(BAD_POLICY, f"{exc} (the defaults apply)")
            policy = FederationPolicy()
        running = self.reconciler.local.index if self.reconciler is not None else {}
        closed = closed_intents(frame.desired, self.label, policy, running, self.closed)
        await trio.to_thread.run_sync(self.spool.set_meta, "closed_intents",
                                      json.dumps(sorted(closed)))
        await trio.to_thread.run_sync(self.spool.set_meta, "snapshot", text)
        newly, self.closed = closed - self.closed, closed
        self.snapshot = attrs.evolve(frame, desired=without(frame.desired, closed))
        await self._append("snapshot_applied", {"version": frame.version})
        intents = frame.desired.get("deployments") or {}
        for dep_id in sorted(newly):  # the master places it elsewhere
            await self._append("placement", {
                "deployment_id": dep_id, "outcome": "unsatisfiable",
                "reasons": {DATACENTER_CLOSED: 1}, "running": 0,
                "error": "this datacenter takes no new deployments (its federation "
                         "policy: accept_deployments false)",
                **local_state(None, None),
                "generation": _count(intents[dep_id].get("generation"))})
            self.emit("federation.intent_refused", dep_id, {"code": DATACENTER_CLOSED})
        if self.reconciler is not None:
            self.reconciler.nudge()
        self.emit("federation.snapshot_applied", self.label, {
            "version": frame.version, "accept_deployments": policy.accept_deployments})
        return None

    async def _apply_releases(self, carried: object) -> None:
        """Admit the carried releases this CP's own pinned keys verify, withdraw those
        it holds from the master that are carried no more (ee.federation.trust)."""
        hooks = self.release_hooks
        if hooks is None:
            return
        offered, refused = await trio.to_thread.run_sync(
            check_carried, carried, hooks.keys, hooks.node_sizes)
        said = frozenset((r.what, r.code, r.reason) for r in refused)
        for what, code, reason in sorted(said - self.release_refusals):
            self.refuse(code, f"{what}: {reason}")  # once while the master carries it
        self.release_refusals = said
        sync = release_sync(offered, set(hooks.held()), self.from_master)
        written = self.from_master
        if sync.admit:  # written down first: a stop after an admission keeps it the master's
            written = self.from_master | sync.from_master
            await trio.to_thread.run_sync(self.spool.set_meta, "releases_from_master",
                                          json.dumps(sorted(written)))
            self.from_master = written  # and here: a cancelled apply (link drop) too
        local = set()
        for release in sync.admit:
            if not await hooks.admit(release):
                local.add(release.ident)  # admitted here meanwhile: the operator's
        for ident in sync.withdraw:
            await hooks.withdraw(ident)
        from_master = sync.from_master - local
        if from_master != written:
            await trio.to_thread.run_sync(self.spool.set_meta, "releases_from_master",
                                          json.dumps(sorted(from_master)))
        self.from_master = from_master
        if sync.admit or sync.withdraw or refused:
            self.emit("federation.releases_applied", self.label, {
                "admitted": [r.ident for r in sync.admit if r.ident not in local],
                "withdrawn": list(sync.withdraw), "refused": len(refused)})

    def refuse(self, code: str, detail: str) -> None:
        log.warning("federation: refused from the master: %s: %s", code, detail)
        self.emit("federation.refused", "master", {"code": code, "detail": detail[:300]})

    # ---- outbox ----

    def _changed(self, _old: AgentRecord | None, new: AgentRecord | None) -> None:
        if new is None or new.identity is None or new.identity.datacenter != self.label:
            return
        view = agent_view(new)
        if self._last.get(new.agent_id) == view:
            return
        self._last[new.agent_id] = view
        self._pending[new.agent_id] = view
        self._dirty.set()
        if self.reconciler is not None:
            self.reconciler.nudge()

    def full_picture(self) -> dict[str, Any]:
        return {r.agent_id: agent_view(r) for r in self.directory.in_datacenter(self.label)
                if r.identity is not None}

    async def _append(self, kind: str, data: dict[str, Any]) -> int:
        seq = await trio.to_thread.run_sync(self.spool.append, kind, time.time(), data)
        self.last_seq = max(self.last_seq, seq)
        self.depth += 1
        self.metrics.spool_depth.labels(self.label).set(self.depth)
        appended, self._appended = self._appended, trio.Event()
        appended.set()
        return seq

    async def _run_outbox(self, task_status: trio.TaskStatus[None]) -> None:
        _, _, self.depth = await trio.to_thread.run_sync(self.spool.bounds)
        self.metrics.spool_depth.labels(self.label).set(self.depth)
        task_status.started()
        while True:
            await self._dirty.wait()
            await trio.sleep(0.05)  # coalesce a burst into one event
            self._dirty = trio.Event()
            batch, self._pending = self._pending, {}
            if batch:
                await self._append("agents", {"agents": batch})

    # ---- stats (this CP's own metrics, for the master's per-dc dashboards) ----

    async def _run_stats(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            now = self._stats_now
            with trio.move_on_after(self.settings.stats_interval_s):
                await now.wait()
            forced = now.is_set()
            if forced:
                self._stats_now = trio.Event()
            if not self.connected:
                continue  # the reconnection sends the latest
            data = dc_stats(self.registry.collect(), self.directory.status_counts())
            if forced or data != self._stats_sent:
                await self._append("stats", data)
                self._stats_sent = data

    # ---- uplink ----

    async def _run_uplink(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        backoff = 0.2
        while True:
            try:
                await self._link_once()
                backoff = 0.2
            except* (OSError, ssl.SSLError, trio.BrokenResourceError, HandshakeError,
                     ConnectionClosed, WireError, trio.TooSlowError) as g:  # (nurseries group)
                self._down(why_down(g.exceptions[0], self._link_refused))
            if self.connected:
                self.emit("federation.uplink_down", self.label, {})
            self.connected = False
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    def _down(self, reason: str) -> None:
        """Keep *reason* (``status``) and log it when due (``next_down``)."""
        self.last_error, self.last_error_at = reason, iso(time.time())
        self.downs, line = next_down(self.downs, reason, trio.current_time())
        self._link_refused = None  # it was that link's
        if line is not None:
            log.log(line[0], "federation: uplink to %s down: %s", self.enrollment.stream_url,
                    line[1])

    def _ssl(self) -> ssl.SSLContext:
        d = self.dir
        return pki.client_context(d / "dc.pem", d / "dc.key", d / "ca.pem")

    async def _link_once(self) -> None:
        ctx = await trio.to_thread.run_sync(self._ssl)
        async with open_websocket_url(self.enrollment.stream_url, ssl_context=ctx,
                                      max_message_size=MAX_FRAME_BYTES, connect_timeout=10,
                                      disconnect_timeout=2, message_queue_size=4) as ws:
            self.connected = True
            self._link_refused = None
            if self.downs.failures:
                log.info("federation: uplink to %s up again after %d failures",
                         self.enrollment.stream_url, self.downs.failures)
            self.downs = Downs()
            self.emit("federation.uplink_up", self.label, {})
            await self._append("resync", {"agents": self.full_picture()})
            self._stats_now.set()  # a restarted master knows none of this CP's figures
            if self.reconciler is not None:  # after the resync: its agents come first
                self.reconciler.nudge(resend=True)  # a restarted master learns them all
            first, nxt, depth = await trio.to_thread.run_sync(self.spool.bounds)
            self.depth = depth
            state = {"cursor": first}
            lock = trio.Lock()

            async def send(body: Any) -> None:
                text = seal(body, self.key)
                async with lock:
                    await ws.send_message(text)

            await send(Hello("hello", self.label, first, nxt, self.snapshot.version, depth))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, ws, state, send, nursery)
                await self._send_loop(state, send)

    async def _send_loop(self, state: dict[str, int], send: Callable[[Any], Any]) -> None:
        while True:
            appended = self._appended
            batch: list[dict[str, Any]] = []
            if state["cursor"] - self.acked <= MAX_IN_FLIGHT:
                batch = await trio.to_thread.run_sync(self.spool.read, state["cursor"],
                                                      MAX_EVENTS_PER_FRAME, FRAME_DATA_BYTES)
            if batch:
                state["cursor"] = batch[-1]["seq"] + 1
            else:
                with trio.move_on_after(self.settings.heartbeat_s):
                    await appended.wait()
                    continue
            await send(Events("events", self.label, [Event(**e) for e in batch], self.depth,
                              self.snapshot.version, time.time(), self.last_seq))

    async def _receive(self, ws: Any, state: dict[str, int], send: Callable[[Any], Any],
                       nursery: trio.Nursery) -> None:
        while True:
            text = await ws.get_message()
            try:
                body = await trio.to_thread.run_sync(open_envelope, text, self.master_key)
                frame = down_frame(body)
            except WireError as exc:
                self.refuse(exc.code, exc.detail)
                continue
            if isinstance(frame, Ack):
                if frame.upto > self.acked:
                    await trio.to_thread.run_sync(self.spool.ack, frame.upto)
                    self.acked = frame.upto
                    _, _, self.depth = await trio.to_thread.run_sync(self.spool.bounds)
                    self.metrics.spool_depth.labels(self.label).set(self.depth)
                    appended, self._appended = self._appended, trio.Event()
                    appended.set()  # the sender may have waited for the window
                if state["cursor"] <= frame.upto:
                    state["cursor"] = frame.upto + 1
            elif isinstance(frame, Replay):
                self.metrics.replays.labels(self.label).inc()
                self.emit("federation.replay", self.label, {"from": frame.start,
                                                            "reason": frame.reason})
                state["cursor"] = frame.start
                appended, self._appended = self._appended, trio.Event()
                appended.set()
            elif isinstance(frame, Snapshot):
                await self.apply_snapshot(text, frame)
            elif isinstance(frame, Request):
                if self.answering >= MAX_ANSWERING:
                    await send(Response("response", self.label, frame.id, DC_BUSY,
                                        f"{MAX_ANSWERING} requests are being answered"))
                else:
                    self.answering += 1
                    nursery.start_soon(self._answer, frame, send)
            elif isinstance(frame, Refused) and frame.code == HELLO_REQUIRED:
                raise WireError(HELLO_REQUIRED, "the master asks for a new hello")
            elif isinstance(frame, Refused):
                if frame.code in ("sequence_replayed", "sequence_gap"):
                    self.metrics.sequence_errors.labels(self.label).inc()
                log.warning("federation: the master refused: %s: %s", frame.code,
                            frame.detail)
                self._link_refused = printable(frame.code, 80)
                self.emit("federation.refused_upstream", self.label,
                          {"code": frame.code, "detail": frame.detail})

    async def _answer(self, req: Request, send: Callable[[Any], Any]) -> None:
        """Answer one request of the master (ee.federation.rpc); a bug in the answer is
        the dc's error code, never the link's end."""
        try:
            try:
                resp = await answer(req, self.label, self.snapshot.desired, self.sources)
            except Exception:
                log.exception("federation: answering request %s (%s)", req.id, req.kind)
                resp = Response("response", self.label, req.id, DC_ERROR, "internal error")
            await send(resp)
        finally:
            self.answering -= 1

    def status(self) -> dict[str, Any]:
        return {"role": "dc", "datacenter": self.label, "upstream": self.enrollment.upstream,
                "stream_url": self.enrollment.stream_url, "connected": self.connected,
                "spool_depth": self.depth, "acked_seq": self.acked,
                "last_seq": self.last_seq,
                "snapshot_version": self.snapshot.version, "desired": self.snapshot.desired,
                # why the uplink last went down (kept once it is up again), and when
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "uplink_failures": self.downs.failures}  # in a row, since it was last up

    def close(self) -> None:
        self.spool.close()


__all__ = ["DcFederation", "EnrolError", "EnrollRequest", "Enrollment", "JoinAnswer",
           "agent_view", "bundle_doc", "digest", "enroll", "install_bundle", "read_request",
           "unstructure", "write_request"]
