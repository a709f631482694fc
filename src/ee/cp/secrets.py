"""Tenant secrets on the CP: the sealed vault, the release policy, and the releaser.

Theory of operation
-------------------
**Vault** (:class:`SecretVault`). Values live in the durable business store (the
``accounts`` record store, migration ``0004_secrets``), so a wipe of the history store
loses nothing, and only sealed (``ee.protocol.sealing``): AES-GCM under a random data
key that is stored wrapped by the *wrapping key*, a 0600 file in the CP's data dir
beside its bootstrap key (``secrets-wrap.key``, made once). One row per (app, secret);
a new version overwrites the sealed value of the last, so an old value is not kept.
Plaintext exists only for the moment a release is sealed to an agent.

**Policy** (:class:`ReleasePolicy`, per app; defaults in brackets): the replica runs
the app version's own compose hash, as the CP's deployment view and the agent's own
listing both say [always]; the agent's verdict is one of ``verdicts`` [``pass``]; its
TCB status is one of ``tcb_statuses`` [``UpToDate``]; its node size and datacenter are
allowed [any]; and at least ``min_attested_replicas`` replicas of the deployment pass
all of that [1]. An agent that is quarantined, offline or stale passes nothing.
:func:`judge_replica` is the pure decision, one reason code per refusal.

**Releaser** (:class:`SecretReleaser`, a child of the CP's supervision tree). It holds
no state that matters across restarts: what it delivered to which agent process is
memory, and a CP restart simply releases again (the agent accepts an equal version
with a fresh nonce). It wakes on bus events that can change a decision (deployment
and replica changes, agent status, quarantine, re-attestation, secret updates) and on
a periodic sweep, and each pass reads the current picture through the same asks the
tenant routes use (deployment views, agent views). An agent's event wakes it only when
that agent is *watched* (a replica the last pass judged, or the holder of a delivered
secret; ``wakes``): while 10,000 agents join, their events cost it nothing. A pass
renders the views of the replicas it judges only, never of every agent, and the events
of a burst (within ``coalesce_s`` of the first, or during a pass) are one pass. For
each running replica of a deployment whose version names secrets:

* passes the policy → each named secret whose stored version the agent process does
  not hold is sealed to the X25519 key that agent process proved (``secrets_key``,
  signed by the session key its quote binds; asked once per session, verified here)
  with a fresh nonce, and sent as a signed ``secret_release``; a re-attestation
  (``agent.reattested``) makes it release again with a fresh nonce;
* fails it → whatever was delivered there is revoked (``secret_revoke``), once.

Every release, refusal and revocation is a ``secret.*`` event and a row of the
tenant's audit trail (who, which replica, which secret version, why): never a value.
A refusal is recorded when its reason changes, not on every pass.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
import trio

from ee.protocol.canonical import canonical_json, strict_json_loads
from ee.protocol.messages import (
    SECRET_NAME,
    ErrorMessage,
    Message,
    SecretAck,
    SecretRelease,
    SecretRevoke,
    SecretsKey,
    SecretsKeyRequest,
)
from ee.protocol.sealing import (
    new_data_key,
    open_at_rest,
    release_aad,
    seal_at_rest,
    seal_release,
    secrets_key_document,
    unwrap_data_key,
    wrap_data_key,
)
from ee.protocol.signing import SignatureError, public_key_from_bytes, verify_document

__all__ = [
    "MAX_SECRET_BYTES",
    "PolicyError",
    "ReleasePolicy",
    "SecretReleaser",
    "SecretVault",
    "judge_replica",
    "load_or_create_wrapping_key",
]

log = logging.getLogger("ee.cp.secrets")

MAX_SECRET_BYTES: Final = 64 * 1024
MAX_SECRETS_PER_APP: Final = 100
WRAP_KEY_FILE: Final = "secrets-wrap.key"
_DATA_KEY_ID: Final = "k1"


# ---- the wrapping key ----------------------------------------------------------------

def load_or_create_wrapping_key(data_dir: Path) -> bytes:
    """The 32-byte wrapping key in ``<data_dir>/secrets-wrap.key`` (made 0600 once)."""
    path = data_dir / WRAP_KEY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = new_data_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_wrapping_key(data_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(key.hex().encode() + b"\n")
        return key
    key = bytes.fromhex(raw.decode("ascii").strip())
    if len(key) != 32:
        raise ValueError(f"{path}: not a 32-byte key")
    return key


# ---- the release policy --------------------------------------------------------------

class PolicyError(ValueError):
    def __init__(self, field: str, code: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


def _strings(value: object, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value or len(value) > 64
            or not all(isinstance(v, str) and 0 < len(v) <= 200 for v in value)):
        raise PolicyError(field, "bad_request", f"'{field}' must be a non-empty list of "
                          "strings (at most 64)")
    return tuple(value)


@attrs.frozen
class ReleasePolicy:
    verdicts: tuple[str, ...] = ("pass",)
    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    node_sizes: tuple[str, ...] | None = None
    datacenters: tuple[str, ...] | None = None
    min_attested_replicas: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"verdicts": list(self.verdicts), "tcb_statuses": list(self.tcb_statuses),
                "node_sizes": None if self.node_sizes is None else list(self.node_sizes),
                "datacenters": None if self.datacenters is None else list(self.datacenters),
                "min_attested_replicas": self.min_attested_replicas,
                "compose_hash": "version"}

    @classmethod
    def from_json(cls, doc: object, *, known_sizes: Iterable[str],
                  normalise_datacenter: Callable[[str], str]) -> ReleasePolicy:
        """A tenant's policy document; :class:`PolicyError` naming the field."""
        if not isinstance(doc, Mapping):
            raise PolicyError("policy", "bad_request", "the policy must be a JSON object")
        allowed = {"verdicts", "tcb_statuses", "node_sizes", "datacenters",
                   "min_attested_replicas", "compose_hash"}
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise PolicyError(unknown[0], "bad_request", f"unknown policy field {unknown[0]!r}")
        if doc.get("compose_hash", "version") != "version":
            raise PolicyError("compose_hash", "bad_request",
                              "'compose_hash' can only be 'version' (the version's own hash)")
        verdicts = _strings(doc.get("verdicts"), "verdicts") or ("pass",)
        if not set(verdicts) <= {"pass", "warn"}:
            raise PolicyError("verdicts", "bad_request", "'verdicts' may hold pass and warn")
        tcb = _strings(doc.get("tcb_statuses"), "tcb_statuses") or ("UpToDate",)
        sizes = _strings(doc.get("node_sizes"), "node_sizes")
        known = set(known_sizes)
        for size in sizes or ():
            if size not in known:
                raise PolicyError("node_sizes", "unknown_node_size",
                                  f"unknown node size {size!r} (known: "
                                  f"{', '.join(sorted(known))})")
        dcs = _strings(doc.get("datacenters"), "datacenters")
        try:
            dcs = None if dcs is None else tuple(normalise_datacenter(d) for d in dcs)
        except ValueError as exc:
            raise PolicyError("datacenters", "bad_datacenter", str(exc)) from None
        minimum = doc.get("min_attested_replicas", 1)
        if (not isinstance(minimum, int) or isinstance(minimum, bool)
                or not 1 <= minimum <= 100):
            raise PolicyError("min_attested_replicas", "bad_request",
                              "'min_attested_replicas' must be an integer 1..100")
        return cls(verdicts=verdicts, tcb_statuses=tcb, node_sizes=sizes, datacenters=dcs,
                   min_attested_replicas=minimum)


@attrs.frozen
class Refusal:
    code: str
    reason: str


def judge_replica(policy: ReleasePolicy, *, deployment_id: str, expected_hash: str | None,
                  replica: Mapping[str, Any], agent: Mapping[str, Any] | None
                  ) -> Refusal | None:
    """May this replica's agent receive the deployment's secrets? (pure)"""
    if agent is None:
        return Refusal("AGENT_UNKNOWN", "the replica's agent is not known to this CP")
    status = agent.get("status")
    if status == "quarantined":
        return Refusal("AGENT_QUARANTINED", "the agent is quarantined: "
                       + "; ".join(agent["attestation"].get("quarantine_reasons") or []))
    if status != "online":
        return Refusal("AGENT_NOT_ONLINE", f"the agent is {status}")
    att = agent.get("attestation") or {}
    if att.get("verdict") not in policy.verdicts:
        return Refusal("VERDICT", f"attestation verdict {att.get('verdict')!r} is not one of "
                       f"{', '.join(policy.verdicts)}")
    if att.get("tcb_status") not in policy.tcb_statuses:
        return Refusal("TCB_STATUS", f"TCB status {att.get('tcb_status')!r} is not one of "
                       f"{', '.join(policy.tcb_statuses)}")
    if policy.node_sizes is not None and agent.get("node_size") not in policy.node_sizes:
        return Refusal("NODE_SIZE", f"node size {agent.get('node_size')!r} is not allowed")
    if policy.datacenters is not None and agent.get("datacenter") not in policy.datacenters:
        return Refusal("DATACENTER", f"datacenter {agent.get('datacenter')!r} is not allowed")
    state = replica.get("state")
    # A replica whose environment needs secrets says what it will run (``starting``
    # with its compose hash) and waits for them: it is judged like a running one.
    if state not in ("running", "starting") or (
            state == "starting" and not replica.get("compose_hash")):
        return Refusal("NOT_RUNNING", f"the replica is {state}")
    if expected_hash is None or replica.get("compose_hash") != expected_hash:
        return Refusal("COMPOSE_HASH", f"the replica reports {replica.get('compose_hash')}, "
                       f"the version is {expected_hash}")
    listed = [d for d in agent.get("deployment") or []
              if d.get("deployment_id") == deployment_id]
    if not listed or any(d.get("compose_hash") != expected_hash for d in listed):
        return Refusal("COMPOSE_HASH", "the agent's own listing of the deployment does not "
                       "show the version's compose hash")
    return None


# ---- the vault -----------------------------------------------------------------------

class _Store(Protocol):
    async def _call(self, work: Callable[[sqlite3.Connection], Any]) -> Any: ...


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@attrs.frozen
class SecretInfo:
    name: str
    version: int
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "updated_at": self.updated_at}


class SecretVault:
    """Sealed secrets, policies and the audit trail in the durable store."""

    def __init__(self, store: Callable[[], _Store | None], wrapping_key: bytes) -> None:
        self._store = store
        self._wrapping_key = wrapping_key
        self._data_key: bytes | None = None
        self._key_lock = trio.Lock()

    @property
    def available(self) -> bool:
        return self._store() is not None

    def _db(self) -> _Store:
        store = self._store()
        if store is None:
            raise RuntimeError("the durable store is not available")
        return store

    async def _key(self) -> bytes:
        async with self._key_lock:
            if self._data_key is None:
                self._data_key = await self._load_or_create_data_key()
            return self._data_key

    async def _load_or_create_data_key(self) -> bytes:
        fresh = new_data_key()
        wrapped = base64.b64encode(wrap_data_key(self._wrapping_key, fresh)).decode()

        def work(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT wrapped FROM secret_data_keys WHERE key_id = ?",
                               (_DATA_KEY_ID,)).fetchone()
            if row is not None:
                return str(row[0])
            conn.execute("INSERT INTO secret_data_keys (key_id, wrapped, created_at) "
                         "VALUES (?, ?, ?)", (_DATA_KEY_ID, wrapped, _now()))
            return wrapped

        stored = await self._db()._call(work)
        return unwrap_data_key(self._wrapping_key, base64.b64decode(stored))

    async def put(self, app_key: str, name: str, value: bytes) -> SecretInfo | None:
        """Store a new version; None when the app already has too many secrets."""
        key = await self._key()
        at = _now()
        current = {s.name: s.version for s in await self.infos(app_key)}
        if name not in current and len(current) >= MAX_SECRETS_PER_APP:
            return None
        version = current.get(name, 0) + 1
        sealed = await trio.to_thread.run_sync(
            lambda: seal_at_rest(key, value, app=app_key, name=name, version=version))
        text = base64.b64encode(sealed).decode()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM secrets WHERE app_key = ? AND name = ?", (app_key, name))
            conn.execute("INSERT INTO secrets (app_key, name, version, key_id, sealed, "
                         "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (app_key, name, version, _DATA_KEY_ID, text, at))

        await self._db()._call(work)
        return SecretInfo(name, version, at)

    async def infos(self, app_key: str) -> list[SecretInfo]:
        rows = await self._db()._call(lambda conn: conn.execute(
            "SELECT name, version, updated_at FROM secrets WHERE app_key = ? ORDER BY name",
            (app_key,)).fetchall())
        return [SecretInfo(str(r[0]), int(r[1]), str(r[2])) for r in rows]

    async def apps(self) -> list[str]:
        rows = await self._db()._call(lambda conn: conn.execute(
            "SELECT DISTINCT app_key FROM secrets").fetchall())
        return [str(r[0]) for r in rows]

    async def delete(self, app_key: str, name: str) -> bool:
        count = await self._db()._call(lambda conn: conn.execute(
            "DELETE FROM secrets WHERE app_key = ? AND name = ?", (app_key, name)).rowcount)
        return bool(count)

    async def open(self, app_key: str, name: str) -> tuple[int, bytes] | None:
        """(version, plaintext) of a secret; None when there is none."""
        row = await self._db()._call(lambda conn: conn.execute(
            "SELECT version, sealed FROM secrets WHERE app_key = ? AND name = ?",
            (app_key, name)).fetchone())
        if row is None:
            return None
        key = await self._key()
        version, sealed = int(row[0]), base64.b64decode(row[1])
        value = await trio.to_thread.run_sync(
            lambda: open_at_rest(key, sealed, app=app_key, name=name, version=version))
        return version, value

    async def policy_doc(self, app_key: str) -> dict[str, Any] | None:
        row = await self._db()._call(lambda conn: conn.execute(
            "SELECT policy FROM secret_policies WHERE app_key = ?", (app_key,)).fetchone())
        if row is None:
            return None
        doc = strict_json_loads(str(row[0]))
        return doc if isinstance(doc, dict) else None

    async def set_policy(self, app_key: str, policy: ReleasePolicy) -> None:
        text = canonical_json(policy.to_json()).decode()
        at = _now()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM secret_policies WHERE app_key = ?", (app_key,))
            conn.execute("INSERT INTO secret_policies (app_key, policy, updated_at) "
                         "VALUES (?, ?, ?)", (app_key, text, at))

        await self._db()._call(work)

    async def audit(self, app_key: str, action: str, *, actor: str, secret: str | None = None,
                    version: int | None = None, deployment_id: str | None = None,
                    agent_id: str | None = None, code: str | None = None,
                    reason: str = "") -> dict[str, Any]:
        row = {"audit_id": secrets.token_hex(12), "at": _now(), "app_key": app_key,
               "action": action, "secret": secret, "version": version,
               "deployment_id": deployment_id, "agent_id": agent_id, "actor": actor,
               "code": code, "reason": reason[:500]}
        sql = (f"INSERT INTO secret_audit ({', '.join(row)}) "
               f"VALUES ({', '.join('?' * len(row))})")
        await self._db()._call(lambda conn: conn.execute(sql, tuple(row.values())))
        return row

    async def audit_trail(self, app_key: str, limit: int = 200) -> list[dict[str, Any]]:
        columns = ("at", "action", "secret", "version", "deployment_id", "agent_id", "actor",
                   "code", "reason")
        rows = await self._db()._call(lambda conn: conn.execute(
            f"SELECT {', '.join(columns)} FROM secret_audit WHERE app_key = ? "
            "ORDER BY at DESC, audit_id DESC LIMIT ?", (app_key, limit)).fetchall())
        return [dict(zip(columns, r, strict=True)) for r in rows]


# ---- the releaser --------------------------------------------------------------------

class SecretLink(Protocol):
    """An agent's live session, as the agent plane's ``Session`` offers it."""

    @property
    def session_id(self) -> int: ...

    @property
    def identity(self) -> Any: ...

    async def request(self, msg: Message, timeout: float) -> Message: ...


@attrs.frozen
class ReleaserDeps:
    vault: SecretVault
    emit: Callable[[str, str, Mapping[str, Any]], None]
    link_for: Callable[[str], SecretLink | None]
    #: the views of these agent ids (those known), read without asking an actor
    agent_views: Callable[[Collection[str]], list[dict[str, Any]]]
    #: app key -> [(deployment view, version spec)] of its deployments
    deployments: Callable[[str], Awaitable[list[tuple[dict[str, Any], dict[str, Any]]]]]
    #: app key -> its policy (the stored one, or the default)
    policy: Callable[[str], Awaitable[ReleasePolicy]]
    sweep_interval_s: float = 10.0
    request_timeout_s: float = 10.0
    coalesce_s: float = 0.1


WAKE_KINDS: Final = ("deployment.", "replica.", "agent.status", "agent.quarantined",
                     "agent.connected", "agent.reattested", "secret.updated",
                     "secret.deleted", "secret.policy")
#: Of those, the kinds whose subject is an agent id: they wake the releaser only for
#: an agent it watches (a replica of a deployment of an app with secrets, or one that
#: holds a delivered secret). Any other agent's event changes no decision.
AGENT_KINDS: Final = ("agent.",)


def _rotation(spec: Mapping[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Per secret name, what the version asks on rotation: (on_rotate, signal)."""
    out: dict[str, tuple[str, str | None]] = {}
    for entry in spec.get("secrets") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            out[entry["name"]] = (str(entry.get("on_rotate", "none")), entry.get("signal"))
    return out


def _wanted(spec: Mapping[str, Any]) -> list[str]:
    """The secret names a version asks for (validated at upload)."""
    out = []
    for entry in spec.get("secrets") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) \
                and SECRET_NAME.match(entry["name"]):
            out.append(entry["name"])
    return out


class SecretReleaser:
    """Releases and revokes secrets (see the module docstring)."""

    def __init__(self, deps: ReleaserDeps) -> None:
        self.deps = deps
        #: (agent id, deployment id, name) -> (session id, version) delivered
        self.delivered: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.keys: dict[str, tuple[int, bytes]] = {}  # agent id -> (session id, X25519)
        self.refused: dict[tuple[str, str], str] = {}  # (agent, deployment) -> last code
        self._app_of: dict[str, str] = {}  # deployment id -> app key (delivered ones)
        #: agents whose events can change a decision: the replicas the last pass judged
        #: (of apps with secrets) and the holders of delivered secrets
        self.watched: set[str] = set()
        self._wake = trio.Event()
        self.passes = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self, subscribe: Callable[[], Any],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with subscribe() as events, trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, events)
            task_status.started()
            while True:
                with trio.move_on_after(self.deps.sweep_interval_s):
                    await self._wake.wait()
                    # Woken: let the rest of a burst land (a deployment's replicas
                    # changing together), so it is one pass, not one per event.
                    await trio.sleep(self.deps.coalesce_s)
                self._wake = trio.Event()
                try:
                    await self.sweep()
                except Exception:  # one bad pass must not stop releases (logged)
                    log.exception("secret release pass failed")

    async def _listen(self, events: Any) -> None:
        async for event in events:
            if event.kind == "agent.reattested":
                self._forget_agent(event.subject, keep_key=True)
            elif event.kind in ("agent.quarantined", "agent.disconnected"):
                self.keys.pop(event.subject, None)
            if self.wakes(event.kind, event.subject):
                self._wake.set()

    def wakes(self, kind: str, subject: str) -> bool:
        """Does an event of *kind* about *subject* call for a pass? (pure, O(1))"""
        if not kind.startswith(WAKE_KINDS):
            return False
        return not kind.startswith(AGENT_KINDS) or subject in self.watched

    def _forget_agent(self, agent_id: str, *, keep_key: bool) -> None:
        for key in [k for k in self.delivered if k[0] == agent_id]:
            del self.delivered[key]
        if not keep_key:
            self.keys.pop(agent_id, None)

    async def sweep(self) -> None:
        """One pass over every app that has secrets or delivered ones. It renders the
        views of only the agents it judges (the replicas of those apps' deployments):
        O(those replicas), never O(agents)."""
        if not self.deps.vault.available:  # starting or stopping: the next pass does it
            return
        self.passes += 1
        todo = sorted(set(await self.deps.vault.apps()) | set(self._app_of.values()))
        deployments = {app_key: await self.deps.deployments(app_key) for app_key in todo}
        replicas = {replica["agent_id"] for deps in deployments.values()
                    for dep, _ in deps for replica in dep.get("replicas") or []}
        self.watched |= replicas  # events about them during this pass wake the next one
        views = {v["agent_id"]: v for v in self.deps.agent_views(replicas)} if replicas else {}
        for app_key in todo:
            await self._app(app_key, deployments[app_key], views)
        self.watched = replicas | {k[0] for k in self.delivered}

    async def _app(self, app_key: str,
                   deployments: list[tuple[dict[str, Any], dict[str, Any]]],
                   views: Mapping[str, dict[str, Any]]) -> None:
        stored = {s.name: s.version for s in await self.deps.vault.infos(app_key)}
        policy = await self.deps.policy(app_key)
        seen: set[tuple[str, str]] = set()
        for dep, spec in deployments:
            dep_id = dep["deployment_id"]
            wanted = [n for n in _wanted(spec) if n in stored]
            expected = spec.get("compose_hash")
            verdicts = {}
            for replica in dep.get("replicas") or []:
                agent_id = replica["agent_id"]
                seen.add((agent_id, dep_id))
                verdicts[agent_id] = judge_replica(
                    policy, deployment_id=dep_id, expected_hash=expected, replica=replica,
                    agent=views.get(agent_id))
            passing = [a for a, r in verdicts.items() if r is None]
            if dep.get("desired") == "stopped":
                verdicts = {a: Refusal("DEPLOYMENT_STOPPED", "the deployment is stopping")
                            for a in verdicts}
            elif 0 < len(passing) < policy.min_attested_replicas:
                for agent_id in passing:
                    verdicts[agent_id] = Refusal(
                        "TOO_FEW_ATTESTED_REPLICAS",
                        f"{len(passing)} replica(s) pass the policy, it asks for "
                        f"{policy.min_attested_replicas}")
            for agent_id, refusal in verdicts.items():
                if not _wanted(spec):
                    continue
                if refusal is None:
                    self.refused.pop((agent_id, dep_id), None)
                    await self._release(app_key, dep_id, agent_id, wanted, stored,
                                        _rotation(spec))
                    await self._revoke_gone(app_key, dep_id, agent_id, set(wanted))
                else:
                    await self._refuse(app_key, dep_id, agent_id, refusal)
        # Delivered to a replica that is no longer one (moved, stopped): revoke.
        for agent_id, dep_id, _ in list(self.delivered):
            if self._app_of.get(dep_id) == app_key and (agent_id, dep_id) not in seen:
                await self._refuse(app_key, dep_id, agent_id,
                                   Refusal("NOT_A_REPLICA", "no longer a replica"))

    async def _agent_key(self, agent_id: str, link: SecretLink) -> bytes | None:
        cached = self.keys.get(agent_id)
        if cached is not None and cached[0] == link.session_id:
            return cached[1]
        nonce = secrets.token_bytes(32)
        reply = await link.request(SecretsKeyRequest(nonce=nonce), self.deps.request_timeout_s)
        if not isinstance(reply, SecretsKey):
            return None
        try:
            verify_document(secrets_key_document(nonce, reply.public_key), reply.signature,
                            public_key_from_bytes(link.identity.public_key))
        except (SignatureError, ValueError):
            self.deps.emit("secret.key_refused", agent_id, {
                "code": "KEY_PROOF_INVALID",
                "reason": "the secrets key is not signed by the attested session key"})
            return None
        self.keys[agent_id] = (link.session_id, reply.public_key)
        return reply.public_key

    async def _write(self, link: SecretLink, msg: SecretRelease | SecretRevoke) -> Message:
        # Signed like every CP write: the agent plane's Session.send signs releases and
        # revocations under its send lock, so the envelope's seq follows the wire order.
        return await link.request(msg, self.deps.request_timeout_s)

    async def _release(self, app_key: str, dep_id: str, agent_id: str, wanted: list[str],
                       stored: Mapping[str, int],
                       rotation: Mapping[str, tuple[str, str | None]] | None = None) -> None:
        """Release what *agent_id*'s replica lacks, one secret at a time; each answer is
        awaited (an agent restarting its services on rotation answers when done), so
        replicas are rotated one after another, never all at once."""
        link = self.deps.link_for(agent_id)
        if link is None:
            return
        todo = [n for n in wanted
                if self.delivered.get((agent_id, dep_id, n)) != (link.session_id, stored[n])]
        if not todo:
            return
        try:
            recipient = await self._agent_key(agent_id, link)
        except Exception as exc:  # the session went away, or the agent refused
            log.info("no secrets key from %s: %s", agent_id, exc)
            return
        if recipient is None:
            await self._refuse(app_key, dep_id, agent_id,
                               Refusal("KEY_PROOF_INVALID", "no valid secrets key proof"))
            return
        for name in todo:
            opened = await self.deps.vault.open(app_key, name)
            if opened is None:
                continue
            version, value = opened
            nonce = secrets.token_bytes(32)
            aad = release_aad(deployment_id=dep_id, name=name, version=version, nonce=nonce,
                              recipient=recipient)
            ephemeral, sealed = await trio.to_thread.run_sync(seal_release, recipient, value, aad)
            del value
            on_rotate, signal = (rotation or {}).get(name, ("none", None))
            msg = SecretRelease(deployment_id=dep_id, name=name, version=version, nonce=nonce,
                                recipient=recipient, ephemeral_key=ephemeral, sealed=sealed,
                                on_rotate=on_rotate,  # type: ignore[arg-type]
                                signal=signal)  # type: ignore[arg-type]
            try:
                reply = await self._write(link, msg)
            except Exception as exc:
                log.info("secret %s not released to %s: %s", name, agent_id, exc)
                continue
            if isinstance(reply, SecretAck) and reply.state == "applied":
                self.delivered[(agent_id, dep_id, name)] = (link.session_id, version)
                self._app_of[dep_id] = app_key
                await self._record(app_key, "released", agent_id, dep_id, name, version,
                                   None, "the replica passes the release policy")
            else:
                code = (reply.code if isinstance(reply, SecretAck) else
                        reply.code if isinstance(reply, ErrorMessage) else "NO_ACK")
                await self._record(app_key, "refused", agent_id, dep_id, name, version,
                                   f"AGENT_{code}", getattr(reply, "reason", "") or
                                   getattr(reply, "message", ""))

    async def _revoke_gone(self, app_key: str, dep_id: str, agent_id: str,
                           wanted: set[str]) -> None:
        """Delivered secrets that were deleted (or the version no longer names)."""
        for key in [k for k in self.delivered if k[:2] == (agent_id, dep_id)
                    and k[2] not in wanted]:
            await self._revoke(app_key, dep_id, agent_id, key[2], "SECRET_DELETED",
                               "the secret was deleted")

    async def _refuse(self, app_key: str, dep_id: str, agent_id: str, refusal: Refusal) -> None:
        delivered = [k for k in self.delivered if k[:2] == (agent_id, dep_id)]
        for key in delivered:
            await self._revoke(app_key, dep_id, agent_id, key[2], refusal.code, refusal.reason)
        if self.refused.get((agent_id, dep_id)) != refusal.code:
            self.refused[(agent_id, dep_id)] = refusal.code
            if not delivered:
                # What this CP process does not know it delivered (released before a CP
                # restart, or before a re-attestation reset the bookkeeping) may still be
                # held: revoke everything of the deployment on that agent (idempotent).
                await self._revoke_all(dep_id, agent_id, refusal.code)
            await self._record(app_key, "refused", agent_id, dep_id, None, None,
                               refusal.code, refusal.reason)

    async def _revoke_all(self, dep_id: str, agent_id: str, code: str) -> None:
        link = self.deps.link_for(agent_id)
        if link is None:
            return  # no session: the agent wipes its secrets when it restarts
        try:
            await self._write(link, SecretRevoke(deployment_id=dep_id, name=None, reason=code))
        except Exception as exc:
            log.info("revoke of %s on %s not delivered: %s", dep_id, agent_id, exc)

    async def _revoke(self, app_key: str, dep_id: str, agent_id: str, name: str, code: str,
                      reason: str) -> None:
        version = self.delivered.pop((agent_id, dep_id, name))[1]
        link = self.deps.link_for(agent_id)
        sent = "no session: the agent wipes its secrets when it restarts"
        if link is not None:
            try:
                reply = await self._write(link, SecretRevoke(deployment_id=dep_id, name=name,
                                                             reason=code))
                sent = f"agent answered {getattr(reply, 'state', reply.TYPE)}"
            except Exception as exc:
                sent = f"revoke not delivered: {type(exc).__name__}"
        await self._record(app_key, "revoked", agent_id, dep_id, name, version, code,
                           f"{reason} ({sent})")

    async def _record(self, app_key: str, action: str, agent_id: str, dep_id: str,
                      name: str | None, version: int | None, code: str | None,
                      reason: str) -> None:
        data = {"app": app_key, "agent_id": agent_id, "deployment_id": dep_id,
                "secret": name, "version": version, "code": code, "reason": reason[:300]}
        self.deps.emit(f"secret.{action}", dep_id, data)
        try:
            await self.deps.vault.audit(app_key, action, actor="cp", secret=name,
                                        version=version, deployment_id=dep_id,
                                        agent_id=agent_id, code=code, reason=reason)
        except Exception as exc:  # the audit row is durable state; the event is out
            log.warning("secret audit row not written: %s", exc)

