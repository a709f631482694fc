"""Tenant-facing routes: accounts, API keys, apps, versions, preflight, deployments.

Auth: ``Authorization: Bearer ee_<key id>_<secret>``. Only SHA-256 of the secret is
stored; a key is shown once, at account creation or rotation. Every tenant route needs
a tenant key; another tenant's app or deployment is answered 404 (not 403: its
existence is not disclosed). Provisioner keys may do nothing here. Placement-type
requests (preflight, deploy) answer 503 ``not_ready`` until rehydration is complete.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from ee.actors import app as app_actor
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
from ee.placement import Constraints, ConstraintsError
from ee.protocol.compose import (
    BuildContext,
    BuildContextError,
    ComposeError,
    compose_services,
    hash_compose_document,
    load_build_context,
    validate_compose,
)
from ee.protocol.dockerfile import check_build_dockerfiles, dockerfile_paths
from ee.protocol.messages import SECRET_NAME
from ee.protocol.workload_policy import (
    WorkloadPolicyError,
    check_compose,
    check_env,
    check_health_path,
)

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


@attrs.frozen
class Auth:
    """The tenant module's auth checks, shared with other route modules."""

    authenticate: Callable[[tuple[str, ...]], Awaitable[str]]  # allowed kinds -> account
    admin_only: Callable[[], None]
    require_ready: Callable[[], None]


def register(app: QuartTrio, cp: ControlPlane, quotas: TenantQuotas | None = None) -> Auth:
    keys_cache: dict[str, tuple[str, str, str]] = {}  # key id -> (hash, account, kind)
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
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "ee":
            if cp.bootstrap.admin_token_ok(token):
                raise ApiError(403, "forbidden", "the admin token is not a tenant API key")
            raise ApiError(401, "unauthenticated", "malformed API key")
        _, key_id, secret = parts
        cached = keys_cache.get(key_id)
        if cached is None:
            record = await find_api_key(store(), key_id)
            if record is None:
                raise ApiError(401, "unauthenticated", "unknown or revoked API key")
            account = await get_account(store(), record.account_id)
            if account is None:
                raise ApiError(401, "unauthenticated", "the key's account is gone")
            cached = (record.secret_sha256, account.account_id, account.kind)
            keys_cache[key_id] = cached
        digest, account_id, kind = cached
        if not hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), digest):
            raise ApiError(401, "unauthenticated", "unknown or revoked API key")
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

    # ---- accounts ------------------------------------------------------------------

    @app.post("/api/v2/accounts")
    @guard(Who.ADMIN)
    async def create_account_route() -> Response:
        admin_only()
        body = await json_object()
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
        return json_response({**account.to_dict(), "api_key": key}, 201)

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
        key_id, key, digest = new_api_key()
        await add_api_key(store(), key_id, g.account_id, digest)
        revoked = await revoke_api_keys(store(), g.account_id, keep=key_id)
        for kid, (_, account_id, _) in list(keys_cache.items()):
            if account_id == g.account_id and kid != key_id:
                del keys_cache[kid]
        cp.events.emit("account.key_rotated", g.account_id, {"revoked": revoked})
        return json_response({"api_key": key, "revoked": revoked}, 201)

    # ---- apps and versions ---------------------------------------------------------

    @app.post("/api/v2/apps")
    @tenant
    async def create_app() -> Response:
        body = await json_object()
        name = body.get("name")
        if not isinstance(name, str) or not APP_NAME.match(name):
            raise _bad("'name' must match [a-z0-9][a-z0-9-]{0,62}", "name")
        key = f"{g.account_id}.{name}"
        view = await cp.create_app(key, {"app_key": key, "name": name,
                                         "account_id": g.account_id})
        if view is None:
            raise ApiError(409, "conflict", f"app {name!r} already exists")
        return json_response(view, 201)

    @app.get("/api/v2/apps")
    @tenant
    async def list_apps() -> Response:
        out = []
        for name in cp.registry.names(f"app/{g.account_id}."):
            out.append(await cp.registry.ref(name).ask(app_actor.Describe(), timeout=5))
        return json_response({"apps": out})

    @app.get("/api/v2/apps/<name>")
    @tenant
    async def get_app(name: str) -> Response:
        return json_response(await app_ref(name).ask(app_actor.Describe(), timeout=5))

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

    @app.post("/api/v2/apps/<name>/versions")
    @tenant
    async def add_version(name: str) -> Response:
        ref = app_ref(name)
        try:
            body = await json_object()
            # YAML parse, policy, build context and hash: all CPU work, off the loop.
            spec = await trio.to_thread.run_sync(
                _checked_version, body, limiter=context_checks)
        except ApiError as exc:
            cp.events.emit("app.version_refused", f"{g.account_id}.{name}",
                           {"code": exc.code, **exc.details})
            raise
        lock = upload_locks.setdefault(g.account_id, trio.Lock())
        async with lock:
            await check_quota(spec)
            result = await ref.ask(app_actor.AddVersion(spec), timeout=30)
        if result is None:
            raise ApiError(409, "conflict", f"version {spec['version']!r} already exists")
        return json_response(_public_version(result), 201)

    @app.get("/api/v2/apps/<name>/versions")
    @tenant
    async def list_versions(name: str) -> Response:
        versions = await app_ref(name).ask(app_actor.ListVersions(), timeout=5)
        return json_response({"versions": [_public_version(v) for v in versions]})

    # ---- placement and deployments -------------------------------------------------

    def _placement_body(body: dict[str, Any]) -> tuple[str, int, Constraints]:
        version = body.get("version")
        replicas = body.get("replicas", 1)
        if not isinstance(version, str) or not version:
            raise _bad("'version' must be a version string", "version")
        if (not isinstance(replicas, int) or isinstance(replicas, bool)
                or not 1 <= replicas <= MAX_REPLICAS):
            raise _bad(f"'replicas' must be an integer 1..{MAX_REPLICAS}", "replicas")
        try:
            constraints = Constraints.from_json(body.get("constraints") or {})
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
        version, replicas, constraints = _placement_body(await json_object())
        require_ready()
        deployment_id = "dep-" + secrets.token_hex(8)
        result = await ref.ask(app_actor.CreateDeployment(deployment_id, version, replicas,
                                                          constraints), timeout=60)
        if result.get("error") == "unknown_version":
            raise not_found("version", version)
        if result.get("error") == "not_placeable":
            raise ApiError(409, "not_placeable", "no placement satisfies this deployment",
                           result["placement"])
        cp.deployment_index[deployment_id] = f"{g.account_id}.{name}"
        return json_response({"deployment_id": deployment_id}, 202)

    def dep_ref(deployment_id: str) -> Any:
        key = cp.deployment_index.get(deployment_id)
        if key is None or not key.startswith(f"{g.account_id}.") or \
                f"app/{key}" not in cp.registry:
            raise not_found("deployment", deployment_id)
        return cp.registry.ref(f"app/{key}")

    @app.get("/api/v2/deployments")
    @tenant
    async def list_deployments() -> Response:
        out = []
        for dep_id, key in sorted(cp.deployment_index.items()):
            if key.startswith(f"{g.account_id}.") and f"app/{key}" in cp.registry:
                view = await cp.registry.ref(f"app/{key}").ask(
                    app_actor.GetDeployment(dep_id), timeout=5)
                if view is not None:
                    out.append(view)
        return json_response({"deployments": out})

    @app.get("/api/v2/deployments/<deployment_id>")
    @tenant
    async def get_deployment(deployment_id: str) -> Response:
        view = await dep_ref(deployment_id).ask(app_actor.GetDeployment(deployment_id),
                                                timeout=5)
        if view is None:
            raise not_found("deployment", deployment_id)
        return json_response(cp.with_urls(view))

    @app.delete("/api/v2/deployments/<deployment_id>")
    @tenant
    async def undeploy(deployment_id: str) -> Response:
        view = await dep_ref(deployment_id).ask(app_actor.StopDeployment(deployment_id),
                                                timeout=30)
        if view is None:
            raise not_found("deployment", deployment_id)
        return json_response(view, 202)

    @app.get("/api/v2/deployments/<deployment_id>/logs")
    @tenant
    async def logs(deployment_id: str) -> Response:
        tail = request.args.get("tail", "200")
        if not re.fullmatch(r"[0-9]{1,5}", tail) or not 1 <= int(tail) <= 10_000:
            raise _bad("'tail' must be 1..10000", "tail")
        view = await dep_ref(deployment_id).ask(
            app_actor.DeploymentLogs(deployment_id, int(tail)), timeout=60)
        if view is None:
            raise not_found("deployment", deployment_id)
        return json_response(view)

    return Auth(authenticate=authenticate, admin_only=admin_only, require_ready=require_ready)


def _public_version(spec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k != "build_context"}
    out["has_build_context"] = bool(spec.get("build_context"))
    return out


def _stored_bytes(spec: dict[str, Any]) -> int:
    return len(str(spec.get("compose") or "")) + len(str(spec.get("build_context") or ""))


def _policy_error(exc: WorkloadPolicyError, field: str) -> ApiError:
    """A workload policy refusal: 400 naming the field, the document path and the reason."""
    return ApiError(400, "workload_policy", f"{field}: {exc}",
                    {"field": field, "path": exc.path, "reason": exc.code})


def _checked_version(body: dict[str, Any]) -> dict[str, Any]:  # worker thread
    """A version upload checked whole (fields, compose, policy, context, hash)."""
    fields = _version_fields(body)
    context = None
    if fields.build_context is not None:
        context = _check_context(fields.build_context, fields.doc)
    return fields.spec(context)


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

    def spec(self, context: BuildContext | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version, "compose": self.compose,
            "build_context": self.build_context_b64, "expose_port": self.expose_port,
            "expose_service": self.expose_service, "health_path": self.health_path,
            "env": self.env, "compose_hash": hash_compose_document(self.doc, context)}
        if self.secrets:
            out["secrets"] = [dict(s) for s in self.secrets]
        return out


MAX_VERSION_SECRETS = 32


def _version_secrets(value: object) -> tuple[dict[str, str], ...]:
    """A version's ``secrets``: ``[{"name": NAME, "as": "file", "on_rotate": "none" |
    "signal" | "restart", "signal": "SIGHUP"|"SIGUSR1"|"SIGUSR2"}, ...]``, names unique.

    ``"as": "env"`` is refused (``unsupported``): a container's environment is fixed
    when it starts, before the CP can release anything to it (a release needs the
    running replica's reported compose hash)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_VERSION_SECRETS:
        raise _bad(f"'secrets' must be a list of at most {MAX_VERSION_SECRETS} entries",
                   "secrets")
    out: list[dict[str, str]] = []
    for i, entry in enumerate(value):
        field = f"secrets[{i}]"
        if not isinstance(entry, dict) or not set(entry) <= {"name", "as", "env",
                                                               "on_rotate", "signal"}:
            raise _bad(f"'{field}' must be an object with 'name' and 'as'", field)
        name = entry.get("name")
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise ApiError(400, "bad_secret_name", f"'{field}.name' must match "
                           "[a-z0-9][a-z0-9_.-]{0,62}", {"field": f"{field}.name"})
        mode = entry.get("as", "file")
        if mode == "env":
            raise ApiError(400, "unsupported", f"'{field}.as': env secrets are not "
                           "supported yet; use \"file\" (/run/secrets/NAME)",
                           {"field": f"{field}.as"})
        if mode != "file" or "env" in entry:
            raise _bad(f"'{field}.as' must be \"file\"", f"{field}.as")
        if any(o["name"] == name for o in out):
            raise _bad(f"secret {name!r} is named twice", field)
        on_rotate = entry.get("on_rotate", "none")
        if on_rotate not in ("none", "signal", "restart"):
            raise _bad(f"'{field}.on_rotate' must be \"none\", \"signal\" or \"restart\"",
                       f"{field}.on_rotate")
        signal = entry.get("signal")
        if (on_rotate == "signal") != (signal is not None) or (
                signal is not None and signal not in ("SIGHUP", "SIGUSR1", "SIGUSR2")):
            raise _bad(f"'{field}.signal': SIGHUP, SIGUSR1 or SIGUSR2, given exactly when "
                       "on_rotate is \"signal\"", f"{field}.signal")
        out.append({"name": name, "as": "file", "on_rotate": on_rotate,
                    **({"signal": signal} if signal else {})})
    return tuple(out)


def _version_fields(body: dict[str, Any]) -> _VersionFields:
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
    return _VersionFields(version=version, compose=compose, doc=doc,
                          build_context_b64=context_b64, build_context=context,
                          expose_port=port, expose_service=service, health_path=health,
                          env=env, secrets=secrets_list)
