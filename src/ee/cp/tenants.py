"""Tenant-facing routes: accounts, API keys, apps, versions, preflight, deployments,
their logs (also followed, as Server-Sent Events) and their replicas' attestation.

Auth: ``Authorization: Bearer ee_<key id>_<secret>``. Only SHA-256 of the secret is
stored; a key is shown once, at account creation or rotation. Every tenant route needs
a tenant key; another tenant's app or deployment is answered 404 (not 403: its
existence is not disclosed). Provisioner keys may do nothing here. Placement-type
requests (preflight, deploy) answer 503 ``not_ready`` until rehydration is complete.

REST conventions (``ee.cp.rest``): every 201/202 carries ``Location``; list routes page
with ``limit``/``cursor`` (account-bound cursors) and answer ``next_cursor``;
``GET /api/v2/deployments`` filters by ``?app=``; creating routes take an
``Idempotency-Key``; a body field not in the route's shape is a 400 ``unknown_field``
naming it; every instant is RFC 3339 UTC.

Env is write-only. A version's ``env`` values are part of its workload hash (so a
change of value is a new hash) and are sent to the agents that run it, but no view
ever shows them: a version answers ``env_names`` (sorted) instead. The values are still
kept in the CP's signed manifests and sent with every deploy; real secrets belong in
the app's sealed secrets (released only to attested replicas), whose values are in no
hash and no view.

Workload hash. A version's ``compose_hash`` (the field keeps its name) is
``ee.protocol.compose.workload_hash`` of its compose document, build context, env
(names and values), ``expose_port``, ``expose_service``, ``health_path`` and the names
of the secrets it receives; the agent computes the same before it runs anything, and
binds it into attested health quotes.

Build contexts. The JSON form carries ``build_context`` as base64. The raw form stages
the gzip tar first, ``PUT /api/v2/apps/{name}/versions/{version}/context`` with
``Content-Type: application/gzip`` (validated off the event loop under the same caps),
then ``POST /api/v2/apps/{name}/versions`` with ``"build_context_staged": true`` takes
it. A staged context is kept in memory for ``STAGED_TTL_S``, at most
``MAX_STAGED_PER_ACCOUNT`` per account (the oldest is dropped) and ``MAX_STAGED_BYTES``
in all: over that, the oldest of the account holding the most goes (fair share: no
tenant keeps another out), and 429 ``staging_full`` only when the caller would hold
the most with nothing older of its own to drop; a CP restart forgets it.

Deleting. ``DELETE /api/v2/apps/{name}`` is refused with 409 ``deployed`` while a
deployment that is not ``stopped`` uses the app; ``DELETE
/api/v2/apps/{name}/versions/{v}`` while one needs the version (as its version, its
previous version, an end of its update, or a replica's: decided by the app actor,
``DeleteVersion``). Deleting an app deletes its versions (every manifest of them on
disk), its stopped deployments and its sealed secrets (its secret policy and audit
trail stay, under the app key).

Logs. The app actor names the agents that hold a deployment's logs; the route asks
them itself, concurrently, each bounded (``fetch_logs``): a slow agent never holds the
app. Followers (SSE) are capped per account and in all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import wraps
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from ee.actors import app as app_actor
from ee.actors.agent import FetchLogs
from ee.actors.directory import ATTESTED_VERDICTS, AgentRecord
from ee.cp import rest
from ee.cp.errors import (
    ApiError,
    Who,
    bearer_token,
    guard,
    json_object,
    json_response,
    not_found,
    require_admin,
)
from ee.cp.records import (
    add_api_key,
    create_account,
    find_api_key,
    get_account,
    revoke_api_keys,
)
from ee.federation import routes as federated
from ee.placement import Constraints, ConstraintsError
from ee.protocol.compose import (
    BuildContext,
    BuildContextError,
    ComposeError,
    compose_services,
    load_build_context,
    validate_compose,
    workload_hash,
)
from ee.protocol.dockerfile import check_build_dockerfiles, dockerfile_paths
from ee.protocol.messages import SECRET_NAME
from ee.protocol.workload_policy import (
    WorkloadPolicyError,
    check_compose,
    check_env,
    check_health_path,
)
from ee.runtime import ActorDead, ActorError

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane

P = ParamSpec("P")
R = TypeVar("R")

APP_NAME = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")
VERSION = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
MAX_CONTEXT_BYTES = 16 << 20
MAX_REPLICAS = 100
#: Build contexts validated at once (each a worker thread holding one upload).
CONTEXT_CHECKS = 2
#: Staged raw build contexts: how long they are kept, how many per account, all bytes.
STAGED_TTL_S = 15 * 60.0
MAX_STAGED_PER_ACCOUNT = 4
MAX_STAGED_BYTES = 128 << 20
GZIP_TYPES = ("application/gzip", "application/x-gzip")
#: Log following (SSE): poll interval, longest stream, streams per account and in all.
FOLLOW_POLL_S = 1.0
FOLLOW_MAX_S = 15 * 60.0
#: How long one agent's logs may take (agents are asked concurrently).
LOG_FETCH_TIMEOUT_S = 10.0
FOLLOW_KEEPALIVE_S = 15.0
MAX_FOLLOWS_PER_ACCOUNT = 4
MAX_FOLLOWS = 64
#: A deployment "uses" its app and version unless it is in one of these states.
RELEASED_STATES = ("stopped",)
SERVICE_NAME = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}\Z")


@attrs.frozen
class TenantQuotas:
    """Per-account caps on stored versions (count, and compose + build context bytes)."""

    max_versions: int = 200
    max_stored_bytes: int = 512 << 20


DEFAULT_QUOTAS = TenantQuotas()


def _bad(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, {"field": field} if field else {})



def new_api_key() -> tuple[str, str, str]:
    """(key id, full key shown once, SHA-256 of its secret)."""
    key_id = "k" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, f"ee_{key_id}_{secret}", hashlib.sha256(secret.encode()).hexdigest()


KeyEntry = tuple[str, str, str]  # (secret's SHA-256, account id, account kind)


class KeyRefused(Exception):
    """An API key that names no live account; ``malformed``: not an ``ee_`` key at all."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


@attrs.frozen
class KeyHolder:
    key_id: str
    account_id: str
    kind: str  # "tenant" | "provider" | ...


async def resolve_api_key(store: Any, token: str,
                          cache: dict[str, KeyEntry] | None = None) -> KeyHolder:
    """Whose live API key *token* is (constant-time compare), else KeyRefused.

    The one check of an API key: the HTTP routes pass their *cache* (cleared on
    revocation), the events websocket none (it re-checks a long-lived stream).
    """
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "ee":
        raise KeyRefused("malformed API key", malformed=True)
    _, key_id, secret = parts
    entry = cache.get(key_id) if cache is not None else None
    if entry is None:
        record = await find_api_key(store, key_id)
        if record is None:
            raise KeyRefused("unknown or revoked API key")
        account = await get_account(store, record.account_id)
        if account is None:
            raise KeyRefused("the key's account is gone")
        entry = (record.secret_sha256, account.account_id, account.kind)
        if cache is not None:
            cache[key_id] = entry
    digest, account_id, kind = entry
    if not hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), digest):
        raise KeyRefused("unknown or revoked API key")
    return KeyHolder(key_id, account_id, kind)


@attrs.frozen
class Auth:
    """The tenant module's auth checks, shared with other route modules."""

    authenticate: Callable[[tuple[str, ...]], Awaitable[str]]  # allowed kinds -> account
    admin_only: Callable[[], None]
    require_ready: Callable[[], None]


def register(app: QuartTrio, cp: ControlPlane, quotas: TenantQuotas | None = None) -> Auth:
    keys_cache: dict[str, KeyEntry] = {}  # key id -> entry; cleared on revocation
    context_checks = trio.CapacityLimiter(CONTEXT_CHECKS)
    upload_locks: dict[str, trio.Lock] = {}  # account -> serialises quota check + add

    def store() -> Any:
        if cp.accounts is None:
            raise ApiError(503, "unavailable", "the account store is not available yet")
        return cp.accounts

    async def authenticate(allow: tuple[str, ...]) -> str:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise ApiError(401, "unauthenticated",
                           "this route needs 'Authorization: Bearer <API key>'")
        try:
            holder = await resolve_api_key(store(), token, keys_cache)
        except KeyRefused as exc:
            if exc.malformed and cp.bootstrap.admin_token_ok(token):
                raise ApiError(403, "forbidden",
                               "the admin token is not a tenant API key") from None
            raise ApiError(401, "unauthenticated", str(exc)) from None
        account_id, key_id, kind = holder.account_id, holder.key_id, holder.kind
        if kind not in allow:
            raise ApiError(403, "forbidden", f"a {kind} key cannot use this route")
        g.account_id = account_id
        g.key_id = key_id
        return account_id

    def tenant(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            await authenticate(("tenant",))
            return await fn(*args, **kwargs)

        return guard(Who.TENANT)(wrapper)

    def admin_only() -> None:
        require_admin(cp.bootstrap.admin_token_ok)

    def require_ready() -> None:
        state = cp.readiness()
        if not state.ready:
            raise ApiError(503, "not_ready", "the control plane is still rebuilding its "
                           "picture from the agents", state.to_dict())

    def app_ref(name: str) -> Any:
        key = f"{g.account_id}.{name}"
        if f"app/{key}" not in cp.registry:
            raise not_found("app", name)
        return cp.registry.ref(f"app/{key}")

    cursors = rest.Cursors(secrets.token_bytes(32))
    idempotency = rest.IdempotencyKeys()
    app_locks: dict[str, trio.Lock] = {}  # app key -> serialises deploy / delete
    staged: dict[tuple[str, str, str], tuple[bytes, float]] = {}  # (acct, app, v) -> ctx
    follows: dict[str, tuple[str, float]] = {}  # stream token -> (account, ends at)

    def now() -> float:
        return trio.current_time()

    def app_lock(name: str) -> trio.Lock:
        return app_locks.setdefault(f"{g.account_id}.{name}", trio.Lock())

    def page_request(listing: str) -> rest.PageRequest:
        return cursors.request(g.account_id, listing, request.args)

    async def idempotent(run: Callable[[], Awaitable[Response]]) -> Response:
        """Run a creating route once per ``Idempotency-Key`` (``ee.cp.rest``)."""
        key = rest.idempotency_key(request.headers.get("Idempotency-Key"))
        if key is None:
            return await run()
        account = g.account_id
        body = await request.get_data(as_text=False)
        assert isinstance(body, bytes)
        print_ = rest.fingerprint(request.method, request.path,
                                  request.headers.get("Content-Type", ""), body)
        decision = idempotency.begin(account, key, print_, now())
        if isinstance(decision, rest.Conflict):
            message = ("this Idempotency-Key was used with another request"
                       if decision.code == "idempotency_conflict" else
                       "the first request with this Idempotency-Key is still running; retry")
            raise ApiError(409, decision.code, message, {"field": "Idempotency-Key"})
        if isinstance(decision, rest.Replay):
            kept = decision.answer
            replay = Response(kept.body, status=kept.status, content_type=kept.content_type)
            if kept.location:
                replay.headers["Location"] = kept.location
            replay.headers["Idempotent-Replayed"] = "true"
            return replay
        try:
            response = await run()
        except BaseException:
            idempotency.abandon(account, key)
            raise
        data = await response.get_data(as_text=False)
        assert isinstance(data, bytes)
        idempotency.finish(account, key, rest.Answer(
            response.status_code, data, response.content_type or "application/json",
            response.headers.get("Location")))
        return response

    def created(body: Any, location: str, status: int = 201) -> Response:
        answer = json_response(body, status)
        answer.headers["Location"] = location
        return answer

    # ---- accounts ------------------------------------------------------------------

    @app.post("/api/v2/accounts")
    @guard(Who.ADMIN)
    async def create_account_route() -> Response:
        admin_only()
        body = await json_object()
        rest.check_fields(body, ("name", "kind"))
        name = body.get("name")
        kind = body.get("kind", "tenant")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise _bad("'name' must be a non-empty string", "name")
        if kind not in ("tenant", "provisioner"):
            raise _bad("'kind' must be 'tenant' or 'provisioner'", "kind")
        account_id = "acct-" + secrets.token_hex(6)
        account = await create_account(store(), account_id, name.strip(), kind)
        key_id, key, digest = new_api_key()
        await add_api_key(store(), key_id, account_id, digest)
        cp.events.emit("account.created", account_id, {"name": account.name, "kind": kind})
        return created({**account.to_dict(), "api_key": key},
                       f"/api/v2/accounts/{account_id}")

    @app.get("/api/v2/accounts/<account_id>")
    @guard(Who.ADMIN)
    async def get_account_route(account_id: str) -> Response:
        admin_only()
        account = await get_account(store(), account_id)
        if account is None:
            raise not_found("account", account_id)
        return json_response(account.to_dict())

    @app.get("/api/v2/accounts/me")
    @tenant
    async def me() -> Response:
        account = await get_account(store(), g.account_id)
        if account is None:
            raise not_found("account", g.account_id)
        return json_response(account.to_dict())

    @app.post("/api/v2/accounts/me/keys")
    @tenant
    async def rotate() -> Response:
        rest.check_fields(await json_object(required=False), ())  # takes no fields
        key_id, key, digest = new_api_key()
        await add_api_key(store(), key_id, g.account_id, digest)
        revoked = await revoke_api_keys(store(), g.account_id, keep=key_id)
        for kid, (_, account_id, _) in list(keys_cache.items()):
            if account_id == g.account_id and kid != key_id:
                del keys_cache[kid]
        cp.events.emit("account.key_rotated", g.account_id, {"revoked": revoked})
        return created({"api_key": key, "revoked": revoked}, "/api/v2/accounts/me")

    # ---- apps and versions ---------------------------------------------------------

    @app.post("/api/v2/apps")
    @tenant
    async def create_app() -> Response:
        async def run() -> Response:
            body = await json_object()
            rest.check_fields(body, ("name",))
            name = body.get("name")
            if not isinstance(name, str) or not APP_NAME.match(name):
                raise _bad("'name' must match [a-z0-9][a-z0-9-]{0,62}", "name")
            key = f"{g.account_id}.{name}"
            view = await cp.create_app(key, {"app_key": key, "name": name,
                                             "account_id": g.account_id})
            if view is None:
                raise ApiError(409, "conflict", f"app {name!r} already exists")
            return created(_public_app(view), f"/api/v2/apps/{name}")

        return await idempotent(run)

    def own_app_names() -> list[str]:
        prefix = f"app/{g.account_id}."
        return sorted(n[len(prefix):] for n in cp.registry.names(prefix))

    @app.get("/api/v2/apps")
    @tenant
    async def list_apps() -> Response:
        page = page_request("apps")
        names, next_cursor = cursors.page(g.account_id, "apps", own_app_names(), page)
        out = []
        for name in names:
            try:
                out.append(_public_app(await app_ref(name).ask(app_actor.Describe(),
                                                                timeout=5)))
            except (ApiError, ActorDead):
                continue  # deleted meanwhile
        return json_response({"apps": out, "next_cursor": next_cursor})

    @app.get("/api/v2/apps/<name>")
    @tenant
    async def get_app(name: str) -> Response:
        return json_response(_public_app(await app_ref(name).ask(app_actor.Describe(),
                                                                 timeout=5)))

    async def deployments_of(ref: Any) -> list[dict[str, Any]]:
        """The views of an app's deployments (by asking its actor)."""
        described = await ref.ask(app_actor.Describe(), timeout=5)
        out = []
        for dep_id in described.get("deployments", []):
            view = await ref.ask(app_actor.GetDeployment(dep_id), timeout=5)
            if view is not None:
                out.append(view)
        return out

    def refuse_in_use(what: str, users: list[dict[str, Any]]) -> None:
        busy = [d for d in users if d.get("state") not in RELEASED_STATES]
        if busy:
            ids = sorted(str(d["deployment_id"]) for d in busy)
            raise ApiError(409, "deployed", f"{what} is used by deployment(s) "
                           f"{', '.join(ids)}: undeploy them first",
                           {"deployments": ids})

    @app.delete("/api/v2/apps/<name>")
    @tenant
    async def delete_app(name: str) -> Response:
        ref = app_ref(name)
        key = f"{g.account_id}.{name}"
        async with app_lock(name):
            deps = await deployments_of(ref)
            refuse_in_use(f"app {name!r}", deps)
            versions = await ref.ask(app_actor.ListVersions(), timeout=5)
            await cp.apps.terminate_child(f"app/{key}")

            def forget() -> None:  # worker thread: children first, the app last
                for d in deps:
                    cp.manifests.delete("deployments", str(d["deployment_id"]))
                # Every version manifest of the app on disk, not only those listed
                # above: a version added between that listing and the app's end was
                # written (an actor's manifest write completes before it stops), and
                # would come back, after a CP restart, in a new app of this name.
                docs, _ = cp.manifests.load("versions")
                for v in [*versions, *(d for d in docs if d.get("app") == key)]:
                    cp.manifests.delete("versions", f"{key}/{v['version']}")
                cp.manifests.delete("apps", key)

            await trio.to_thread.run_sync(forget)
            for d in deps:
                cp.deployment_index.pop(str(d["deployment_id"]), None)
            # Its sealed secrets go with it: an app made later under the name is new.
            vault = cp.secret_vault
            if vault.available:
                for info in await vault.infos(key):
                    await vault.delete(key, info.name)
                    await vault.audit(key, "deleted", actor=g.account_id, secret=info.name,
                                      reason="app deleted")
            for k in [k for k in staged if k[:2] == (g.account_id, name)]:
                del staged[k]
        cp.events.emit("app.deleted", key, {"versions": len(versions),
                                            "deployments": len(deps)})
        return Response(b"", status=204)

    async def check_quota(spec: dict[str, Any]) -> None:
        limits = quotas or DEFAULT_QUOTAS
        count, stored = 1, _stored_bytes(spec)
        for app_name in cp.registry.names(f"app/{g.account_id}."):
            versions = await cp.registry.ref(app_name).ask(app_actor.ListVersions(), timeout=5)
            count += len(versions)
            stored += sum(_stored_bytes(v) for v in versions)
        if count > limits.max_versions:
            raise ApiError(403, "quota_exceeded",
                           f"the account may keep at most {limits.max_versions} versions",
                           {"quota": "versions", "limit": limits.max_versions})
        if stored > limits.max_stored_bytes:
            raise ApiError(403, "quota_exceeded",
                           f"the account may store at most {limits.max_stored_bytes} bytes "
                           "of compose files and build contexts",
                           {"quota": "stored_bytes", "limit": limits.max_stored_bytes})

    def staged_for(name: str, version: object) -> bytes | None:
        if not isinstance(version, str):
            return None
        entry = staged.get((g.account_id, name, version))
        if entry is None or entry[1] <= now():
            return None
        return entry[0]

    @app.post("/api/v2/apps/<name>/versions")
    @tenant
    async def add_version(name: str) -> Response:
        ref = app_ref(name)

        async def run() -> Response:
            try:
                body = await json_object()
                context = staged_for(name, body.get("version")) \
                    if body.get("build_context_staged") is True else None
                # YAML parse, policy, build context and hash: all CPU work, off the loop.
                spec = await trio.to_thread.run_sync(
                    _checked_version, body, context, time.time(), limiter=context_checks)
            except (ApiError, rest.RestError) as exc:
                cp.events.emit("app.version_refused", f"{g.account_id}.{name}",
                               {"code": exc.code,
                                **(exc.details if isinstance(exc, ApiError)
                                   else {"field": exc.field})})
                raise
            lock = upload_locks.setdefault(g.account_id, trio.Lock())
            async with lock:
                await check_quota(spec)
                result = await ref.ask(app_actor.AddVersion(spec), timeout=30)
            if result is None:
                raise ApiError(409, "conflict", f"version {spec['version']!r} already exists")
            if context is not None:
                staged.pop((g.account_id, name, spec["version"]), None)
            return created(_public_version(result),
                           f"/api/v2/apps/{name}/versions/{spec['version']}")

        return await idempotent(run)

    @app.put("/api/v2/apps/<name>/versions/<version>/context")
    @tenant
    async def stage_context(name: str, version: str) -> Response:
        ref = app_ref(name)
        if not VERSION.match(version):
            raise _bad("the version must match [A-Za-z0-9][A-Za-z0-9._+-]{0,63}", "version")
        if any(v.get("version") == version
               for v in await ref.ask(app_actor.ListVersions(), timeout=5)):
            raise ApiError(409, "conflict", f"version {version!r} exists already (versions "
                           "are immutable): stage a context for a new version")
        media = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media not in GZIP_TYPES:
            raise ApiError(415, "unsupported_media_type", "a build context is sent as "
                           "'Content-Type: application/gzip' (a .tar.gz)",
                           {"field": "Content-Type", "allowed": list(GZIP_TYPES)})
        raw = await request.get_data(as_text=False)
        assert isinstance(raw, bytes)
        if len(raw) > MAX_CONTEXT_BYTES:
            raise ApiError(413, "too_large", f"build context over {MAX_CONTEXT_BYTES} bytes",
                           {"limit": MAX_CONTEXT_BYTES})
        await trio.to_thread.run_sync(_check_staged, raw, limiter=context_checks)
        t = now()
        for k in [k for k, (_, ends) in staged.items() if ends <= t]:
            del staged[k]
        mine = sorted((ends, k) for k, (_, ends) in staged.items() if k[0] == g.account_id)
        slot = (g.account_id, name, version)
        if slot not in staged and len(mine) >= MAX_STAGED_PER_ACCOUNT:
            del staged[mine[0][1]]  # the oldest of this account's goes
        held = {k: (len(b), ends) for k, (b, ends) in staged.items() if k != slot}
        evict = _staging_evictions(held, g.account_id, len(raw), MAX_STAGED_BYTES)
        if evict is None:
            raise ApiError(429, "staging_full", "too many build contexts are staged; "
                           "retry shortly", {"retry_after_s": 60},
                           headers={"Retry-After": "60"})
        for k in evict:
            del staged[k]
        staged[slot] = (raw, t + STAGED_TTL_S)
        return created({"app": name, "version": version, "bytes": len(raw),
                        "sha256": hashlib.sha256(raw).hexdigest(),
                        "expires_in_s": STAGED_TTL_S},
                       f"/api/v2/apps/{name}/versions/{version}/context")

    @app.get("/api/v2/apps/<name>/versions")
    @tenant
    async def list_versions(name: str) -> Response:
        ref = app_ref(name)
        page = page_request(f"versions/{name}")
        versions = {v["version"]: v for v in
                    await ref.ask(app_actor.ListVersions(), timeout=5)}
        chosen, next_cursor = cursors.page(g.account_id, f"versions/{name}",
                                           sorted(versions), page)
        return json_response({"versions": [_public_version(versions[v]) for v in chosen],
                              "next_cursor": next_cursor})

    async def version_spec(ref: Any, version: str) -> dict[str, Any]:
        for v in await ref.ask(app_actor.ListVersions(), timeout=5):
            if v.get("version") == version:
                return dict(v)
        raise not_found("version", version)

    @app.get("/api/v2/apps/<name>/versions/<version>")
    @tenant
    async def get_version(name: str, version: str) -> Response:
        return json_response(_public_version(await version_spec(app_ref(name), version)))

    @app.delete("/api/v2/apps/<name>/versions/<version>")
    @tenant
    async def delete_version(name: str, version: str) -> Response:
        ref = app_ref(name)
        async with app_lock(name):
            # The app actor decides and deletes in one message (``DeleteVersion``): a
            # version a deployment runs, goes back to or is updating from/to is kept.
            result = await ref.ask(app_actor.DeleteVersion(version), timeout=30)
        if result.get("error") == "unknown_version":
            raise not_found("version", version)
        if result.get("error") == "deployed":
            ids = [str(d) for d in result["deployments"]]
            raise ApiError(409, "deployed", f"version {version!r} is used by deployment(s) "
                           f"{', '.join(ids)} (as their version, the version a rollback "
                           "goes back to, or an update's): undeploy them first",
                           {"deployments": ids})
        return Response(b"", status=204)

    # ---- placement and deployments -------------------------------------------------

    def _placement_body(body: dict[str, Any]) -> tuple[str, int, Constraints]:
        rest.check_fields(body, ("version", "replicas", "constraints"))
        version = body.get("version")
        replicas = body.get("replicas", 1)
        if not isinstance(version, str) or not version:
            raise _bad("'version' must be a version string", "version")
        if (not isinstance(replicas, int) or isinstance(replicas, bool)
                or not 1 <= replicas <= MAX_REPLICAS):
            raise _bad(f"'replicas' must be an integer 1..{MAX_REPLICAS}", "replicas")
        raw = body.get("constraints") or {}
        if isinstance(raw, dict):
            rest.check_fields(raw, ("datacenter", "node_size", "gpu", "exclude_agents"),
                              "constraints.")
        try:
            constraints = Constraints.from_json(raw)
        except ConstraintsError as exc:
            raise _bad(str(exc), f"constraints.{exc.field}") from None
        if constraints.node_size and cp.config.vocabulary.size(constraints.node_size) is None:
            raise _bad(f"unknown node size {constraints.node_size!r}", "constraints.node_size")
        return version, replicas, constraints

    @app.post("/api/v2/apps/<name>/preflight")
    @tenant
    async def preflight(name: str) -> Response:
        ref = app_ref(name)
        version, replicas, constraints = _placement_body(await json_object())
        require_ready()
        result = await ref.ask(app_actor.Preflight(version, replicas, constraints), timeout=30)
        if result.get("error") == "unknown_version":
            raise not_found("version", version)
        return json_response(result)

    @app.post("/api/v2/apps/<name>/deployments")
    @tenant
    async def deploy(name: str) -> Response:
        ref = app_ref(name)

        async def run() -> Response:
            version, replicas, constraints = _placement_body(await json_object())
            require_ready()
            if await cp.billing.suspended(g.account_id):
                raise ApiError(402, "payment_required", "the account is suspended for "
                               "insufficient funds; a credit lifts the suspension")
            deployment_id = "dep-" + secrets.token_hex(8)
            async with app_lock(name):
                result = await ref.ask(app_actor.CreateDeployment(
                    deployment_id, version, replicas, constraints), timeout=60)
            if result.get("error") == "unknown_version":
                raise not_found("version", version)
            if result.get("error") == "not_placeable":
                raise ApiError(409, "not_placeable", "no placement satisfies this deployment",
                               result["placement"])
            cp.deployment_index[deployment_id] = f"{g.account_id}.{name}"
            return created({"deployment_id": deployment_id},
                           f"/api/v2/deployments/{deployment_id}", 202)

        return await idempotent(run)

    def dep_ref(deployment_id: str) -> Any:
        key = cp.deployment_index.get(deployment_id)
        if key is None or not key.startswith(f"{g.account_id}.") or \
                f"app/{key}" not in cp.registry:
            raise not_found("deployment", deployment_id)
        return cp.registry.ref(f"app/{key}")

    async def deployment_view(deployment_id: str) -> dict[str, Any]:
        view = await dep_ref(deployment_id).ask(app_actor.GetDeployment(deployment_id),
                                                timeout=5)
        if view is None:
            raise not_found("deployment", deployment_id)
        return dict(view)

    @app.get("/api/v2/deployments")
    @tenant
    async def list_deployments() -> Response:
        app_filter = request.args.get("app")
        if app_filter is not None and not APP_NAME.match(app_filter):
            raise _bad("'app' must be an app name", "app")
        listing = f"deployments/{app_filter or ''}"
        page = page_request(listing)
        prefix = f"{g.account_id}."
        ids = sorted(dep_id for dep_id, key in cp.deployment_index.items()
                     if key.startswith(prefix)
                     and (app_filter is None or key == prefix + app_filter))
        chosen, next_cursor = cursors.page(g.account_id, listing, ids, page)
        out = []
        for dep_id in chosen:
            key = cp.deployment_index.get(dep_id)
            if key is not None and f"app/{key}" in cp.registry:
                try:
                    view = await cp.registry.ref(f"app/{key}").ask(
                        app_actor.GetDeployment(dep_id), timeout=5)
                except ActorDead:
                    continue  # its app was deleted meanwhile
                if view is not None:
                    out.append(view)
        return json_response({"deployments": out, "next_cursor": next_cursor})

    @app.get("/api/v2/deployments/<deployment_id>")
    @tenant
    async def get_deployment(deployment_id: str) -> Response:
        return json_response(cp.with_urls(await deployment_view(deployment_id)))

    @app.delete("/api/v2/deployments/<deployment_id>")
    @tenant
    async def undeploy(deployment_id: str) -> Response:
        view = await dep_ref(deployment_id).ask(app_actor.StopDeployment(deployment_id),
                                                timeout=30)
        if view is None:
            raise not_found("deployment", deployment_id)
        return created(view, f"/api/v2/deployments/{deployment_id}", 202)

    @app.get("/api/v2/deployments/<deployment_id>/attestation")
    @tenant
    async def attestation(deployment_id: str) -> Response:
        remote = await federated.tenant_attestation(cp, g.account_id, deployment_id)
        if remote is not None:
            return json_response(remote)
        view = await deployment_view(deployment_id)
        replicas = [replica_attestation(r, cp.directory.get(str(r["agent_id"])))
                    for r in view.get("replicas", [])]
        return json_response({
            "deployment_id": deployment_id, "compose_hash": view.get("compose_hash"),
            "attested": bool(replicas) and all(r["attested"] for r in replicas),
            "replicas": replicas})

    # ---- logs ------------------------------------------------------------------------

    @app.get("/api/v2/deployments/<deployment_id>/logs")
    @tenant
    async def logs(deployment_id: str) -> Response:
        query = _logs_query(request.args)
        remote = await federated.tenant_logs(
            cp, g.account_id, deployment_id, tail=query.tail, since=query.since,
            service=query.service, follow=query.follow)
        if remote is not None:
            return json_response(_filter_logs(remote, query.since, query.service))
        resume = request.headers.get("Last-Event-ID")
        if query.follow and query.since is None and resume:
            query = attrs.evolve(query, since=rest.parse_rfc3339(resume, "Last-Event-ID"))
        ref = dep_ref(deployment_id)

        async def fetch(tail: int, since: str | None) -> dict[str, Any] | None:
            return await fetch_logs(cp.registry, ref, deployment_id, tail, since,
                                    query.service)

        if not query.follow:
            view = await fetch(query.tail, query.since)
            if view is None:
                raise not_found("deployment", deployment_id)
            return json_response(_filter_logs(view, query.since, query.service))
        await deployment_view(deployment_id)
        token = start_follow(g.account_id)
        stream = _follow(ref, deployment_id, query, fetch,
                         on_end=lambda: follows.pop(token, None))
        response = Response(stream, content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = FOLLOW_MAX_S + 60
        return response

    def start_follow(account: str) -> str:
        t = now()
        for k in [k for k, (_, ends) in follows.items() if ends <= t]:
            del follows[k]
        mine = sum(1 for a, _ in follows.values() if a == account)
        if mine >= MAX_FOLLOWS_PER_ACCOUNT or len(follows) >= MAX_FOLLOWS:
            raise ApiError(429, "too_many_streams", "too many log streams are open "
                           f"(at most {MAX_FOLLOWS_PER_ACCOUNT} per account)",
                           {"limit": MAX_FOLLOWS_PER_ACCOUNT}, headers={"Retry-After": "5"})
        token = secrets.token_hex(8)
        follows[token] = (account, t + FOLLOW_MAX_S + 60)
        return token

    return Auth(authenticate=authenticate, admin_only=admin_only, require_ready=require_ready)


def replica_attestation(replica: dict[str, Any], record: AgentRecord | None
                         ) -> dict[str, Any]:
    """One replica's agent as attested to the CP (what the CP verified at admission and
    at its last re-attestation), for its tenant."""
    ident = record.identity if record is not None else None
    verdict = record.verdict if record is not None else None
    return {
        "agent_id": replica.get("agent_id"), "state": replica.get("state"),
        "compose_hash": replica.get("compose_hash"),
        "agent_status": record.status if record is not None else "offline",
        "attested": verdict in ATTESTED_VERDICTS,
        "attestation": {
            "verdict": verdict,
            "provider": ident.provider if ident else None,
            "mrtd": ident.mrtd if ident else None,
            "tcb_status": ident.tcb_status if ident else None,
            "verified_at": rest.rfc3339(ident.verified_at) if ident else None,
            "violations": list(ident.violations) if ident else [],
        },
        "vm_name": ident.vm_name if ident else None,
        "datacenter": ident.datacenter if ident else None,
        "node_size": ident.node_size if ident else None,
    }


@attrs.frozen
class LogsQuery:
    """``GET /api/v2/deployments/{id}/logs`` query: ``tail``, ``since``, ``service``,
    ``follow``."""

    tail: int = 200
    since: str | None = None
    service: str | None = None
    follow: bool = False


def _logs_query(args: Any) -> LogsQuery:
    tail = args.get("tail", "200")
    if not re.fullmatch(r"[0-9]{1,5}", tail) or not 1 <= int(tail) <= 10_000:
        raise _bad("'tail' must be 1..10000", "tail")
    since = args.get("since")
    if since is not None:
        since = rest.parse_rfc3339(since)
    service = args.get("service")
    if service is not None and not SERVICE_NAME.match(service):
        raise _bad("'service' must be a compose service name", "service")
    follow = args.get("follow", "false")
    if follow not in ("true", "false"):
        raise _bad("'follow' must be true or false", "follow")
    return LogsQuery(int(tail), since, service, follow == "true")


async def fetch_logs(registry: Any, ref: Any, deployment_id: str, tail: int,
                     since: str | None, service: str | None) -> dict[str, Any] | None:
    """A deployment's logs (None: no such deployment). Its app actor only says where
    they are (``LogSources``); each of those agents' actors is then asked here,
    concurrently, each within ``LOG_FETCH_TIMEOUT_S``: a slow or gone agent is an
    ``error`` entry, and never holds the app actor (nor the other agents' answers).
    The agents filter by ``since``/``service``; the route filters again
    (``_filter_logs``), since an agent may not."""
    sources = await ref.ask(app_actor.LogSources(deployment_id), timeout=5)
    if sources is None:
        return None
    agents = [str(a) for a in sources["agents"]]
    found: dict[str, dict[str, Any]] = {}

    async def one(agent_id: str) -> None:
        try:
            lines = await registry.ref(f"agent/{agent_id}").ask(
                FetchLogs(deployment_id, tail, since, service), timeout=LOG_FETCH_TIMEOUT_S)
            found[agent_id] = {"agent_id": agent_id, "lines": lines}
        except ActorError as exc:
            found[agent_id] = {"agent_id": agent_id, "error": f"logs unavailable: {exc}"}

    async with trio.open_nursery() as nursery:
        for agent_id in agents:
            nursery.start_soon(one, agent_id)
    return {"deployment_id": deployment_id, "replicas": [found[a] for a in agents]}


def _filter_logs(view: dict[str, Any], since: str | None,
                 service: str | None) -> dict[str, Any]:
    """Only the lines of *service* at or after *since* (lines without a time are kept
    only when no *since* is given)."""
    floor = rest.instant_key(since) if since is not None else None
    replicas = []
    for replica in view.get("replicas", []):
        lines = replica.get("lines")
        if isinstance(lines, list):
            kept = []
            for line in lines:
                if not isinstance(line, dict):
                    continue
                if service is not None and line.get("service") != service:
                    continue
                if floor is not None:
                    at = rest.instant_key(line.get("at"))
                    if at is None or at < floor:
                        continue
                kept.append(line)
            replica = {**replica, "lines": kept}
        replicas.append(replica)
    return {**view, "replicas": replicas}


def _sse(event: str | None, data: dict[str, Any], ident: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    if ident:
        head += f"id: {ident}\n"
    return f"{head}data: {json.dumps(data)}\n\n".encode()


async def _follow(ref: Any, deployment_id: str, query: LogsQuery,
                  fetch: Callable[[int, str | None], Awaitable[dict[str, Any] | None]],
                  on_end: Callable[[], object]) -> AsyncIterator[bytes]:
    """Server-Sent Events: one ``data: {"at", "service", "agent_id", "text"}`` event a
    line, polled every ``FOLLOW_POLL_S`` with ``since`` = the last instant seen (lines
    at that very instant already sent are skipped); ``event: warning`` when a replica's
    logs cannot be read; a ``: keepalive`` comment when quiet; ``event: end`` with the
    reason (``stopped``, ``gone``, ``max_duration``) last. Lines without a time (an
    agent that does not send them) are sent on the first poll only. A line's event
    ``id`` is its instant, so an ``EventSource`` that reconnects sends it back as
    ``Last-Event-ID`` and resumes there (``since`` is inclusive: lines of that very
    instant come again)."""
    try:
        ends = trio.current_time() + FOLLOW_MAX_S
        since, tail = query.since, query.tail
        last_key = rest.instant_key(since) if since is not None else None
        sent_at_last: set[tuple[str, str, str]] = set()
        warned: dict[str, str] = {}
        quiet = trio.current_time()
        first = True
        reason = "max_duration"
        while trio.current_time() < ends:
            try:
                view = await fetch(tail, since)
                state = await ref.ask(app_actor.GetDeployment(deployment_id), timeout=5)
            except ActorDead:
                reason = "gone"  # the app was deleted
                break
            except ActorError as exc:
                yield _sse("warning", {"error": f"logs unavailable: {exc}"})
                view, state = {}, {}
            if view is None or state is None:
                reason = "gone"
                break
            out: list[bytes] = []
            emitted: list[tuple[int, tuple[str, str, str]]] = []
            for replica in _filter_logs(view, since, query.service).get("replicas", []):
                agent_id = str(replica.get("agent_id"))
                if "error" in replica:
                    if warned.get(agent_id) != replica["error"]:
                        warned[agent_id] = str(replica["error"])
                        out.append(_sse("warning", {"agent_id": agent_id,
                                                    "error": replica["error"]}))
                    continue
                for line in replica.get("lines", []):
                    at = line.get("at")
                    key = rest.instant_key(at)
                    if key is None and not first:
                        continue  # no time: it cannot be told from one sent before
                    ident = (agent_id, str(line.get("service")), str(line.get("text")))
                    if key is not None and last_key is not None and (
                            key < last_key or (key == last_key and ident in sent_at_last)):
                        continue
                    if key is not None:
                        emitted.append((key, ident))
                    out.append(_sse(None, {"at": at, "service": line.get("service"),
                                           "agent_id": agent_id, "text": line.get("text")},
                                    ident=_instant_text(key) if key is not None else None))
            if emitted:
                newest = max(k for k, _ in emitted)
                if newest != last_key:
                    sent_at_last = set()
                    last_key = newest
                    since = _instant_text(newest)
                sent_at_last |= {ident for k, ident in emitted if k == newest}
            tail = 1000
            first = False
            for chunk in out:
                yield chunk
            if out:
                quiet = trio.current_time()
            elif trio.current_time() - quiet >= FOLLOW_KEEPALIVE_S:
                yield b": keepalive\n\n"
                quiet = trio.current_time()
            if state.get("state") == "stopped":
                reason = "stopped"
                break
            await trio.sleep(FOLLOW_POLL_S)
        yield _sse("end", {"reason": reason})
    finally:
        on_end()


def _instant_text(nanos: int) -> str:
    seconds, frac = divmod(nanos, 1_000_000_000)
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{frac:09d}Z"


StagedKey = tuple[str, str, str]  # (account, app, version)


def _staging_evictions(held: Mapping[StagedKey, tuple[int, float]], account: str,
                       size: int, limit: int) -> list[StagedKey] | None:
    """The staged contexts to drop so that *account* can stage *size* more bytes within
    *limit* (*held*: key -> (bytes, expiry)), or None (429). Fair share: the oldest of
    the account holding the most bytes (counting the new one for *account*) goes
    first, so no tenant can keep another out by staging up to the limit; *account*'s
    own only when it is that account, and never so as to make room for itself alone."""
    left = dict(held)
    out: list[StagedKey] = []
    while sum(n for n, _ in left.values()) + size > limit:
        per: dict[str, int] = {account: size}
        for k, (n, _) in left.items():
            per[k[0]] = per.get(k[0], 0) + n
        biggest = max(per, key=lambda a: (per[a], a != account))
        theirs = sorted((ends, k) for k, (_, ends) in left.items() if k[0] == biggest)
        if not theirs:
            return None  # the new one alone is the most: nothing fair to drop
        out.append(theirs[0][1])
        del left[theirs[0][1]]
    return out


def _public_version(spec: dict[str, Any]) -> dict[str, Any]:
    """A version as tenants see it: no build context bytes and no env values (env is
    write-only: its names only, as ``env_names``)."""
    out = {k: v for k, v in spec.items() if k not in ("build_context", "env", "app")}
    out["has_build_context"] = bool(spec.get("build_context"))
    env = spec.get("env")
    out["env_names"] = sorted(env) if isinstance(env, dict) else []
    if "created_at" in out:
        out["created_at"] = rest.rfc3339_field(out["created_at"])
    return out


def _public_app(view: dict[str, Any]) -> dict[str, Any]:
    out = dict(view)
    if "created_at" in out:
        out["created_at"] = rest.rfc3339_field(out["created_at"])
    return out


def _stored_bytes(spec: dict[str, Any]) -> int:
    return len(str(spec.get("compose") or "")) + len(str(spec.get("build_context") or ""))


def _policy_error(exc: WorkloadPolicyError, field: str) -> ApiError:
    """A workload policy refusal: 400 naming the field, the document path and the reason."""
    return ApiError(400, "workload_policy", f"{field}: {exc}",
                    {"field": field, "path": exc.path, "reason": exc.code})


def _checked_version(body: dict[str, Any], staged: bytes | None,
                     now: float) -> dict[str, Any]:  # worker thread
    """A version upload checked whole (fields, compose, policy, context, hash); *staged*
    is the raw build context staged for it, used when the body asks for it."""
    fields = _version_fields(body, staged)
    context = None
    if fields.build_context is not None:
        context = _check_context(fields.build_context, fields.doc)
    return fields.spec(context, now)


def _check_staged(raw: bytes) -> None:  # worker thread
    """A raw build context, checked as a tar (the Dockerfiles are checked with the
    compose file, when a version takes it)."""
    try:
        load_build_context(raw, max_bytes=MAX_CONTEXT_BYTES, keep_contents=False)
    except BuildContextError as exc:
        raise _bad(f"build context: {exc}", "body") from None


def _check_context(raw: bytes, doc: dict[str, Any]) -> BuildContext:  # worker thread
    """The build context, and the Dockerfile of every service that builds from it."""
    try:
        loaded = load_build_context(raw, max_bytes=MAX_CONTEXT_BYTES, keep_contents=False,
                                    keep_paths=frozenset(dockerfile_paths(doc)))
    except BuildContextError as exc:
        raise _bad(f"build_context: {exc}", "build_context") from None
    try:
        check_build_dockerfiles(doc, loaded)
    except WorkloadPolicyError as exc:
        raise _policy_error(exc, "build_context") from None
    return loaded.context


@attrs.frozen
class _VersionFields:
    """A version upload, checked except for its build context (validated off the loop)."""

    version: str
    compose: str
    doc: dict[str, Any]
    build_context_b64: str | None
    build_context: bytes | None
    expose_port: int
    expose_service: str
    health_path: str
    env: dict[str, str]
    secrets: tuple[dict[str, str], ...] = ()

    def spec(self, context: BuildContext | None, now: float) -> dict[str, Any]:
        digest = workload_hash(
            self.doc, context, env=self.env, expose_port=self.expose_port,
            expose_service=self.expose_service, health_path=self.health_path,
            secret_names=[s["name"] for s in self.secrets],
            secret_env={s["env"]: s["name"] for s in self.secrets if s["as"] == "env"})
        out: dict[str, Any] = {
            "version": self.version, "compose": self.compose,
            "build_context": self.build_context_b64, "expose_port": self.expose_port,
            "expose_service": self.expose_service, "health_path": self.health_path,
            "env": self.env, "compose_hash": digest, "created_at": rest.rfc3339(now)}
        if self.secrets:
            out["secrets"] = [dict(s) for s in self.secrets]
        return out


MAX_VERSION_SECRETS = 32


def _version_secrets(value: object) -> tuple[dict[str, str], ...]:
    """A version's ``secrets``: ``[{"name": NAME, "as": "file", "on_rotate": "none" |
    "signal" | "restart", "signal": "SIGHUP"|"SIGUSR1"|"SIGUSR2"}, ...]``, names unique.

    ``"as": "env"`` with ``"env": VAR`` feeds the variable from the secret: the agent
    starts the services only once it is released, and recreates them on rotation (a
    container's environment is fixed when it starts), so ``on_rotate`` is ``restart``."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_VERSION_SECRETS:
        raise _bad(f"'secrets' must be a list of at most {MAX_VERSION_SECRETS} entries",
                   "secrets")
    out: list[dict[str, str]] = []
    for i, entry in enumerate(value):
        field = f"secrets[{i}]"
        if not isinstance(entry, dict):
            raise _bad(f"'{field}' must be an object with 'name' and 'as'", field)
        rest.check_fields(entry, ("name", "as", "env", "on_rotate", "signal"), f"{field}.")
        name = entry.get("name")
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise ApiError(400, "bad_secret_name", f"'{field}.name' must match "
                           "[a-z0-9][a-z0-9_.-]{0,62}", {"field": f"{field}.name"})
        mode = entry.get("as", "file")
        if mode not in ("file", "env"):
            raise _bad(f"'{field}.as' must be \"file\" or \"env\"", f"{field}.as")
        variable = entry.get("env")
        if mode == "file" and variable is not None:
            raise _bad(f"'{field}.env' goes with \"as\": \"env\"", f"{field}.env")
        if mode == "env":
            if not isinstance(variable, str):
                raise _bad(f"'{field}.env' must name an environment variable", f"{field}.env")
            try:
                check_env({variable: ""}, path=f"{field}.env")
            except WorkloadPolicyError as exc:
                raise _policy_error(exc, f"{field}.env") from None
            if any(o.get("env") == variable for o in out):
                raise _bad(f"environment variable {variable!r} is fed twice", f"{field}.env")
            if entry.get("on_rotate", "restart") != "restart":
                raise _bad(f"'{field}.on_rotate': an env secret rotates by restarting the "
                           "services (\"restart\")", f"{field}.on_rotate")
        if any(o["name"] == name for o in out):
            raise _bad(f"secret {name!r} is named twice", field)
        on_rotate = entry.get("on_rotate", "restart" if mode == "env" else "none")
        if on_rotate not in ("none", "signal", "restart"):
            raise _bad(f"'{field}.on_rotate' must be \"none\", \"signal\" or \"restart\"",
                       f"{field}.on_rotate")
        signal = entry.get("signal")
        if (on_rotate == "signal") != (signal is not None) or (
                signal is not None and signal not in ("SIGHUP", "SIGUSR1", "SIGUSR2")):
            raise _bad(f"'{field}.signal': SIGHUP, SIGUSR1 or SIGUSR2, given exactly when "
                       "on_rotate is \"signal\"", f"{field}.signal")
        out.append({"name": name, "as": mode, "on_rotate": on_rotate,
                    **({"signal": signal} if signal else {}),
                    **({"env": str(variable)} if mode == "env" else {})})
    return tuple(out)


VERSION_FIELDS = ("version", "compose", "build_context", "build_context_staged",
                  "expose_port", "expose_service", "health_path", "env", "secrets")


def _version_fields(body: dict[str, Any], staged: bytes | None = None) -> _VersionFields:
    rest.check_fields(body, VERSION_FIELDS)
    version = body.get("version")
    if not isinstance(version, str) or not VERSION.match(version):
        raise _bad("'version' must match [A-Za-z0-9][A-Za-z0-9._+-]{0,63}", "version")
    compose = body.get("compose")
    if not isinstance(compose, str) or not compose.strip():
        raise _bad("'compose' must be the compose file's text", "compose")
    try:
        doc = validate_compose(compose)
    except ComposeError as exc:
        raise _bad(f"compose: {exc}", "compose") from None
    try:
        check_compose(doc, stage="upload")
    except WorkloadPolicyError as exc:
        raise _policy_error(exc, "compose") from None
    services = compose_services(doc)
    context_b64 = body.get("build_context")
    context: bytes | None = None
    if context_b64 is not None:
        if not isinstance(context_b64, str):
            raise _bad("'build_context' must be base64 of a tar.gz", "build_context")
        if len(context_b64) > MAX_CONTEXT_BYTES * 4 // 3 + 4:
            raise ApiError(413, "too_large", f"build context over {MAX_CONTEXT_BYTES} bytes")
        try:
            context = base64.b64decode(context_b64, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("'build_context' is not valid base64", "build_context") from None
    use_staged = body.get("build_context_staged", False)
    if not isinstance(use_staged, bool):
        raise _bad("'build_context_staged' must be true or false", "build_context_staged")
    if use_staged:
        if context_b64 is not None:
            raise _bad("give 'build_context' or 'build_context_staged', not both",
                       "build_context_staged")
        if staged is None:
            raise ApiError(409, "no_staged_context", f"no build context is staged for "
                           f"version {version!r} (PUT it to .../versions/{version}/context "
                           "first; a staged context is kept for "
                           f"{STAGED_TTL_S / 60:.0f} minutes)",
                           {"field": "build_context_staged"})
        context = staged
        context_b64 = base64.b64encode(staged).decode()
    port = body.get("expose_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise _bad("'expose_port' must be a container port 1..65535", "expose_port")
    service = body.get("expose_service") or services[0]
    if not isinstance(service, str) or service not in services:
        raise _bad(f"'expose_service' must be one of the compose services: "
                   f"{', '.join(services)}", "expose_service")
    health = body.get("health_path", "/")
    try:
        check_health_path(health)
    except WorkloadPolicyError as exc:
        raise _bad(f"'health_path': {exc.message}", "health_path") from None
    assert isinstance(health, str)
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise _bad("'env' must be an object of strings", "env")
    try:
        check_env(env)
    except WorkloadPolicyError as exc:
        raise _policy_error(exc, "env") from None
    secrets_list = _version_secrets(body.get("secrets"))
    for i, entry in enumerate(secrets_list):
        if entry.get("env") in env:
            raise _bad(f"'secrets[{i}].env': {entry['env']!r} is also set in the version's "
                       "env", f"secrets[{i}].env")
    return _VersionFields(version=version, compose=compose, doc=doc,
                          build_context_b64=context_b64, build_context=context,
                          expose_port=port, expose_service=service, health_path=health,
                          env=env, secrets=secrets_list)
