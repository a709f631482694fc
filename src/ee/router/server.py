"""``ee-router``: the self-hosted cohort router in front of two CP stacks.

Theory of operation. A raw ASGI app on Hypercorn (Trio worker). Each HTTP request is
classified (``decision.classify``), given a cohort key (``decision.cohort_key``; a
tenant API key is first resolved to its account, see ``AccountResolver``) and decided
(``decision.decide``) against the current ``RolloutConfig``; it is then streamed to the
chosen stack over the router's own h11 connection pool (``upstream.Upstream``: request
body and response body chunk by chunk, never held whole; httpx cost three times the
CPU, see tools/bench/router_cpu.py) and the answer carries ``X-EE-CP-Stack: old|new``.
An answer that breaks off drops the caller's connection. Websockets (the agent plane,
class C, and federation, class E) are decided the same way on the upgrade and then
relayed frame by frame to the chosen stack's websocket (``--old-agents``/``--new-agents``
for the agent plane); an agent keeps its stack across reconnects because its cohort
key is its vm_name (header ``X-EE-Agent``).

The config file is the source of truth: it is polled (content, once a second) and a
valid change replaces the config at once, so the next request already sees it (the
kill switch acts within one request). ``PUT /_ee/router/config`` (admin token) writes
the file atomically and applies it. An invalid file keeps the last good config and is
reported in ``/_ee/router/status``.

Shadow (class A only): a sample of reads is sent again to the *other* stack after the
caller has its answer; status, JSON shape (ids and timestamps masked) and latency are
compared and kept in a bounded log (``GET /_ee/router/shadow``). Only GET/HEAD ever go
to the shadow stack, and a shadow answer is never served.

Guardrails (``guard.Guard``) run every ``--guard-interval`` seconds on what the
router saw per stack plus both stacks' ``/metrics``; a firing trigger steps the
concerned classes back one stage, writes the config and records a ``rollout.step_back``
event carrying the numbers (``GET /_ee/router/events``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import httpx
import trio
import trio_websocket

from ee.router import decision as d
from ee.router.guard import Guard
from ee.router.guardrails import (
    Evaluator,
    Seen,
    StepBack,
    p99,
    triggers_from_json,
)
from ee.router.promotion import promotion_refusal
from ee.router.upstream import Upstream, UpstreamError

log = logging.getLogger("ee.router")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ADMIN_PREFIX: Final = "/_ee/router/"
HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "proxy-connection"})
HOP_BY_HOP_BYTES: Final = frozenset(h.encode() for h in HOP_BY_HOP)
WS_FORWARD: Final = ("authorization", "x-ee-agent", "x-ee-dc", "user-agent")
AGENT_FRAME_BYTES: Final = 2 << 20
"""Largest frame an agent may send through the router (the CP's own limit is 1 MiB)."""
CP_FRAME_BYTES: Final = 80 << 20
"""Largest frame a CP may send down (deploys carry build contexts up to 64 MiB)."""
SHADOW_BODY_BYTES: Final = 1 << 20
SHADOW_CONCURRENCY: Final = 8
ADMIN_BODY_BYTES: Final = 64 << 10
RESOLVE_CACHE: Final = 100_000
RESOLVE_TTL_S: Final = 600.0
LATENCY_SAMPLES: Final = 20_000


@attrs.frozen
class RouterSettings:
    listen: str
    old: str
    new: str
    config_path: Path
    old_agents: str | None = None
    new_agents: str | None = None
    admin_token: str | None = None
    drill_pubkey: Any = None  # Ed25519PublicKey: PUT config enforces the promotion gate
    guard_interval_s: float = 15.0
    poll_interval_s: float = 1.0
    resolve_timeout_s: float = 5.0
    upstream_timeout_s: float = 120.0

    def http_base(self, stack: str) -> str:
        return (self.old if stack == "old" else self.new).rstrip("/")

    def ws_url(self, stack: str, klass: str, path: str, query: bytes) -> str | None:
        if klass == "C":
            base = self.old_agents if stack == "old" else self.new_agents
            if base is None:
                return None
            parts = urlsplit(base)
            url = f"{parts.scheme}://{parts.netloc}{path}"
        else:
            http = urlsplit(self.http_base(stack))
            scheme = "wss" if http.scheme == "https" else "ws"
            url = f"{scheme}://{http.netloc}{path}"
        return url + (f"?{query.decode('latin-1')}" if query else "")


class KeyRefused(Exception):
    """The stable stack refused the caller's API key (401): its answer, to pass on."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class AccountResolver:
    """API key id → cohort (``account:<id>``, or ``key:<id>`` for a provisioner key).

    The key id in ``ee_<key id>_<secret>`` is random and does not name the account, so
    the router asks the stable stack once per key (``GET /api/v2/accounts/me`` with the
    caller's own key), and caches the answer (bounded, with a TTL; a hit must also
    match the whole key's digest). A key the stack refuses (401) is not cached, and
    that refusal is the answer to the caller (``KeyRefused``): junk keys cost the CP
    one request each, as without the router. Lookups run at most ``limit`` at a time;
    a lookup that fails otherwise leaves the request without a cohort (stable stack).
    """

    def __init__(self, client: httpx.AsyncClient, ttl_s: float = RESOLVE_TTL_S,
                 size: int = RESOLVE_CACHE, limit: int = 32) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.size = size
        self.cache: OrderedDict[str, tuple[str, float, str]] = OrderedDict()
        self.limiter = trio.CapacityLimiter(limit)
        self.lookups = 0

    async def resolve(self, authorization: str) -> str | None:
        key_id = d.tenant_key_id(authorization)
        if key_id is None:
            return None
        now = trio.current_time()
        digest = hashlib.sha256(authorization.encode()).hexdigest()
        hit = self.cache.get(key_id)
        if hit is not None and hit[1] > now and hmac.compare_digest(hit[2], digest):
            self.cache.move_to_end(key_id)
            return hit[0]
        async with self.limiter:
            self.lookups += 1
            try:
                resp = await self.client.get("/api/v2/accounts/me",
                                             headers={"Authorization": authorization})
            except httpx.HTTPError as exc:
                log.warning("account lookup failed: %s", exc)
                return None
        cohort: str | None = None
        if resp.status_code == 200:
            try:
                account = resp.json().get("account_id")
            except ValueError:
                account = None
            if isinstance(account, str) and d.name_or_none(account):
                cohort = f"account:{account}"
        elif resp.status_code == 403:
            cohort = f"key:{key_id}"  # the secret matched, the key is not a tenant's
        elif resp.status_code == 401:
            raise KeyRefused(401, resp.content[:4096])
        if cohort is not None:
            self.cache[key_id] = (cohort, now + self.ttl_s, digest)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return cohort


_MASKED_KEY_SUFFIXES: Final = ("id", "_at", "at", "time", "timestamp", "token", "key", "nonce")


def json_shape(value: Any, key: str = "") -> Any:
    """The shape of a JSON value: types instead of scalars; ids/timestamps masked."""
    if isinstance(value, dict):
        return {k: json_shape(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        shapes = []
        for item in value:
            shape = json_shape(item)
            if shape not in shapes:
                shapes.append(shape)
        return shapes
    if key.lower().endswith(_MASKED_KEY_SUFFIXES):
        return "<masked>"
    return type(value).__name__


@attrs.frozen
class ShadowResult:
    path: str
    served_stack: str
    served_status: int
    shadow_status: int | None
    served_s: float
    shadow_s: float | None
    same_status: bool
    same_shape: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class ShadowLog:
    recent: deque[ShadowResult] = attrs.field(factory=lambda: deque(maxlen=500))
    compared: int = 0
    status_diffs: int = 0
    shape_diffs: int = 0
    errors: int = 0
    dropped: int = 0
    served_latency: deque[float] = attrs.field(factory=lambda: deque(maxlen=5000))
    shadow_latency: deque[float] = attrs.field(factory=lambda: deque(maxlen=5000))

    def add(self, r: ShadowResult) -> None:
        self.compared += 1
        self.status_diffs += not r.same_status
        self.shape_diffs += not r.same_shape
        self.errors += r.error is not None
        self.served_latency.append(r.served_s)
        if r.shadow_s is not None:
            self.shadow_latency.append(r.shadow_s)
        self.recent.append(r)

    def report(self) -> dict[str, Any]:
        diffs = [r.to_dict() for r in self.recent if not (r.same_status and r.same_shape)]
        return {"compared": self.compared, "status_diffs": self.status_diffs,
                "shape_diffs": self.shape_diffs, "errors": self.errors,
                "dropped": self.dropped,
                "served_p99_s": p99(list(self.served_latency)),
                "shadow_p99_s": p99(list(self.shadow_latency)),
                "recent_diffs": diffs[-50:]}


@attrs.define
class StackCounters:
    answers: int = 0
    errors_5xx: int = 0
    latencies: list[float] = attrs.field(factory=list)

    def take(self) -> Seen:
        out = Seen(self.answers, self.errors_5xx, tuple(self.latencies))
        self.answers, self.errors_5xx, self.latencies = 0, 0, []
        return out


class BadAdminRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Router:
    def __init__(self, settings: RouterSettings, config: d.RolloutConfig) -> None:
        self.settings = settings
        self.config = config
        self.config_error: str | None = None
        self._config_text: str | None = None
        self.shadow = ShadowLog()
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.counters = {"old": StackCounters(), "new": StackCounters()}
        self.requests: dict[tuple[str, str], int] = {}
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        self.resolver = AccountResolver(
            httpx.AsyncClient(base_url=settings.http_base("old"), limits=limits,
                              timeout=httpx.Timeout(settings.resolve_timeout_s)))
        self.upstreams = {s: Upstream(settings.http_base(s),
                                      read_timeout_s=settings.upstream_timeout_s)
                          for s in d.STACKS}
        self._stack_header = {s: (d.STACK_HEADER.lower().encode(), s.encode())
                              for s in d.STACKS}
        self.guard = Guard({s: f"{settings.http_base(s)}/metrics" for s in d.STACKS},
                           httpx.AsyncClient(), Evaluator(
                               triggers_from_json(config.extra.get("guardrails"))))
        self._shadow_slots = trio.Semaphore(SHADOW_CONCURRENCY)
        self._nursery: trio.Nursery | None = None
        self._random = random.Random()
        self.bound: list[str] = []

    # ---- config ------------------------------------------------------------------

    def load_file(self) -> bool:
        """Re-read the config file; True when it changed and was applied."""
        try:
            text = self.settings.config_path.read_text()
        except OSError as exc:
            self.config_error = f"{self.settings.config_path}: {exc}"
            return False
        if text == self._config_text:
            return False
        self._config_text = text
        try:
            config = d.RolloutConfig.from_json(json.loads(text))
            triggers = triggers_from_json(config.extra.get("guardrails"))
        except (ValueError, d.ConfigError) as exc:
            self.config_error = f"{self.settings.config_path}: {exc}"
            log.error("config not applied: %s", self.config_error)
            return False
        self.config_error = None
        self.apply(config, triggers, source="file")
        return True

    def apply(self, config: d.RolloutConfig, triggers: Any, source: str) -> None:
        before = self.config
        self.config = config
        self.guard.evaluator = attrs.evolve(self.guard.evaluator, triggers=triggers)
        if before.to_json() != config.to_json():
            self.event("rollout.config", {"source": source, "config": config.to_json()})

    def write_file(self, config: d.RolloutConfig) -> None:
        text = json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n"
        path = self.settings.config_path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self._config_text = text

    def event(self, kind: str, body: Mapping[str, Any]) -> None:
        entry = {"kind": kind, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 **body}
        self.events.append(entry)
        log.info("event %s", json.dumps(entry, sort_keys=True))

    # ---- serving -----------------------------------------------------------------

    async def run(self, shutdown: trio.Event,
                  task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        self.load_file()
        if self.config_error is not None:
            raise d.ConfigError(self.config_error)
        config = Config()
        config.bind = [self.settings.listen]
        config.graceful_timeout = 5
        config.accesslog = None
        config.errorlog = "-"
        config.websocket_max_message_size = AGENT_FRAME_BYTES
        config.keep_alive_timeout = 75
        # a relayed answer carries the stack's own Date and Server: not a second pair
        config.include_date_header = False
        config.include_server_header = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_file)
                if self.settings.guard_interval_s > 0:
                    nursery.start_soon(self._guard_loop)

                async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
                    await serve(self.asgi, config,  # type: ignore[arg-type]
                                shutdown_trigger=shutdown.wait, mode="asgi",
                                task_status=task_status)
                    nursery.cancel_scope.cancel()  # served out: the loops end with it

                self.bound = await nursery.start(serving)
                task_status.started(self.bound)
                await shutdown.wait()
                nursery.cancel_scope.deadline = trio.current_time() + 6
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for c in [self.resolver.client, self.guard.client]:
                    await c.aclose()
                for u in self.upstreams.values():
                    await u.aclose()

    async def _watch_file(self) -> None:
        while True:
            await trio.sleep(self.settings.poll_interval_s)
            self.load_file()

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        # classify, route and forward one string: the path exactly as received
        path = (scope.get("raw_path") or scope.get("path", "/").encode()).decode("latin-1")
        refusal = d.path_refusal(path)
        code = "bad_path"
        if refusal is None and kind == "http" and "content-length" in headers \
                and "transfer-encoding" in headers:
            refusal = "both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)"
            code = "bad_request"
        elif refusal is None and len(headers) != len(scope.get("headers", [])):
            refusal = _duplicate_identity(scope.get("headers", []))
            code = "bad_request"
        if refusal is not None:
            log.info("refused %s %r: %s", scope.get("method", "GET"), path, refusal)
            if kind == "http":
                await _json(send, 400, {"error": {"code": code, "message": refusal,
                                                  "details": {}}})
            else:
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind == "http" and path.startswith(ADMIN_PREFIX):
            await self._admin(scope, headers, receive, send)
            return
        method = "GET" if kind == "websocket" else scope["method"]
        klass = d.classify(method, path)
        tenant = None
        if klass not in ("C", "E") and "authorization" in headers:
            try:
                tenant = await self.resolver.resolve(headers["authorization"])
            except KeyRefused as refused:
                if kind == "http":
                    await _raw(send, refused.status, refused.body, "old")
                    return
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})
                return
        client = scope.get("client")
        config = self.config  # one config for the whole request
        cohort = d.cohort_key(klass, headers, tenant=tenant,
                              client=client[0] if client else None)
        choice = d.decide(config, klass, cohort)
        key = (choice.stack, klass)
        self.requests[key] = self.requests.get(key, 0) + 1
        if kind == "websocket":
            await self._websocket(scope, path, headers, choice, receive, send)
        else:
            await self._http(scope, path, headers, choice, config, receive, send)

    async def _http(self, scope: Scope, path: str, headers: dict[str, str],
                    choice: d.Decision, config: d.RolloutConfig, receive: Receive,
                    send: Send) -> None:
        stack = choice.stack
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        has_body = (length is not None and length != "0") or chunked
        # the caller's header lines as they came (repeated ones too), less hop-by-hop
        raw: list[tuple[bytes, bytes]] = scope.get("headers", [])
        fwd = [(k, v) for k, v in raw if k not in HOP_BY_HOP_BYTES]
        client = scope.get("client")
        if client:
            prior = [v for k, v in fwd if k == b"x-forwarded-for"]
            fwd = [(k, v) for k, v in fwd if k != b"x-forwarded-for"]
            fwd.append((b"x-forwarded-for", b", ".join([*prior, client[0].encode("latin-1")])))
        upstream = self.upstreams[stack]
        target = upstream.target(path.encode("latin-1"), scope.get("query_string", b""))
        started = trio.current_time()
        try:
            answer = await upstream.request(
                scope["method"].encode("ascii"), target, fwd,
                _body(receive) if has_body else None, content_length=not chunked)
        except UpstreamError as exc:
            log.info("%s stack: %s", stack, exc)
            self._count(stack, 502, trio.current_time() - started)
            await _json(send, 502, {"error": {
                "code": "upstream_unavailable",
                "message": f"the {stack} CP stack did not answer",
                "details": {"stack": stack}}}, stack)
            return
        sample = choice.klass == "A" and scope["method"] in ("GET", "HEAD") and \
            self._random.random() < config.shadow.get("A", 0.0)
        kept: bytearray | None = bytearray() if sample else None
        try:
            out_headers = [(k, v) for k, v in answer.headers if k not in HOP_BY_HOP_BYTES]
            out_headers.append(self._stack_header[stack])
            await send({"type": "http.response.start", "status": answer.status_code,
                        "headers": out_headers})
            async for chunk, last in answer.chunks():
                if kept is not None:
                    if len(kept) + len(chunk) <= SHADOW_BODY_BYTES:
                        kept += chunk
                    else:
                        kept = None
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        except UpstreamError:
            # the answer broke off: the caller's connection is dropped (raising is how
            # an ASGI app does that), and the stack is counted as having failed it
            self._count(stack, 502, trio.current_time() - started)
            raise
        finally:
            await answer.aclose()
        elapsed = trio.current_time() - started
        self._count(stack, answer.status_code, elapsed)
        if kept is not None and answer.header(b"content-encoding") is None:
            self._start_shadow(scope, fwd, path, choice, answer.status_code, bytes(kept),
                               elapsed)

    def _count(self, stack: str, status: int, elapsed: float) -> None:
        c = self.counters[stack]
        c.answers += 1
        c.errors_5xx += status >= 500
        if len(c.latencies) < LATENCY_SAMPLES:
            c.latencies.append(elapsed)

    def _start_shadow(self, scope: Scope, fwd: list[tuple[bytes, bytes]], path: str,
                      choice: d.Decision, status: int, body: bytes, elapsed: float) -> None:
        if self._nursery is None or scope["method"] not in ("GET", "HEAD"):
            return
        try:
            self._shadow_slots.acquire_nowait()
        except trio.WouldBlock:
            self.shadow.dropped += 1
            return
        self._nursery.start_soon(self._shadow_one, scope["method"], fwd, path,
                                 scope.get("query_string", b""),
                                 choice.stack, status, body, elapsed)

    async def _shadow_one(self, method: str, fwd: list[tuple[bytes, bytes]], path: str,
                          query: bytes, served: str, status: int, body: bytes,
                          elapsed: float) -> None:
        other = "new" if served == "old" else "old"
        upstream = self.upstreams[other]
        try:
            assert method in ("GET", "HEAD")  # never anything that may write
            started = trio.current_time()
            try:
                with trio.fail_after(30):
                    answer = await upstream.request(
                        method.encode("ascii"),
                        upstream.target(path.encode("latin-1"), query), fwd)
                    got = bytearray()
                    try:
                        async for chunk, _ in answer.chunks():
                            got += chunk
                            if len(got) > SHADOW_BODY_BYTES:
                                break  # larger than any served body compared: differs
                    finally:
                        await answer.aclose()
                    theirs = bytes(got) if len(got) <= SHADOW_BODY_BYTES else None
            except (UpstreamError, trio.TooSlowError) as exc:
                self.shadow.add(ShadowResult(path, served, status, None, elapsed, None,
                                             False, False, type(exc).__name__))
                return
            took = trio.current_time() - started
            same_shape = theirs is not None and await trio.to_thread.run_sync(
                _same_shape, body, theirs)
            self.shadow.add(ShadowResult(
                path, served, status, answer.status_code, elapsed, took,
                status == answer.status_code, same_shape))
        finally:
            self._shadow_slots.release()

    async def _websocket(self, scope: Scope, path: str, headers: dict[str, str],
                         choice: d.Decision, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        url = self.settings.ws_url(choice.stack, choice.klass, path,
                                   scope.get("query_string", b""))
        if url is None:
            await send({"type": "websocket.close", "code": 1011})
            return
        extra = [(k.encode(), headers[k].encode("latin-1")) for k in WS_FORWARD if k in headers]
        try:
            async with trio_websocket.open_websocket_url(
                    url, extra_headers=extra, connect_timeout=10, disconnect_timeout=5,
                    max_message_size=CP_FRAME_BYTES) as upstream:
                await send({"type": "websocket.accept",
                            "headers": [(d.STACK_HEADER.lower().encode(),
                                         choice.stack.encode())]})
                await _relay(upstream, receive, send)
        except (trio_websocket.HandshakeError, OSError) as exc:
            log.warning("websocket to %s stack failed: %s", choice.stack, exc)
            await send({"type": "websocket.close", "code": 1011})

    # ---- admin -------------------------------------------------------------------

    async def _admin(self, scope: Scope, headers: dict[str, str], receive: Receive,
                     send: Send) -> None:
        try:
            token = self.settings.admin_token
            given = d.bearer(headers.get("authorization"))
            if token is None:
                raise BadAdminRequest(404, "admin_disabled",
                                      "this router runs without --admin-token-file")
            if given is None or not hmac.compare_digest(given.encode(), token.encode()):
                raise BadAdminRequest(401, "unauthenticated", "the router's admin token "
                                      "is needed ('Authorization: Bearer <token>')")
            what = scope["path"][len(ADMIN_PREFIX):]
            method = scope["method"]
            if what == "config" and method == "GET":
                await _json(send, 200, self.config.to_json())
            elif what == "config" and method == "PUT":
                raw = await _read_capped(receive, ADMIN_BODY_BYTES)
                try:
                    config = d.RolloutConfig.from_json(json.loads(raw))
                    triggers = triggers_from_json(config.extra.get("guardrails"))
                except (ValueError, d.ConfigError) as exc:
                    raise BadAdminRequest(400, "bad_config", str(exc)) from None
                if self.settings.drill_pubkey is not None:
                    refusal = promotion_refusal(
                        self.config, {c: config.percent(c) for c in d.CLASSES},
                        config.extra.get("drill"), self.settings.drill_pubkey, time.time(),
                        new_stack=self.settings.http_base("new"))
                    if refusal is not None:
                        raise BadAdminRequest(409, "promotion_refused", refusal)
                self.write_file(config)
                self.apply(config, triggers, source="admin")
                await _json(send, 200, config.to_json())
            elif what == "status" and method == "GET":
                await _json(send, 200, self.status())
            elif what == "shadow" and method == "GET":
                await _json(send, 200, self.shadow.report())
            elif what == "events" and method == "GET":
                await _json(send, 200, {"events": list(self.events)})
            elif what == "decide" and method == "POST":
                raw = await _read_capped(receive, 4 << 20)
                await _json(send, 200, {"decisions": batch_decide(self.config, raw)})
            else:
                raise BadAdminRequest(404, "not_found", f"no route {method} {scope['path']}")
        except BadAdminRequest as exc:
            await _json(send, exc.status, {"error": {"code": exc.code, "message": exc.message,
                                                     "details": {}}})

    def status(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "config_error": self.config_error,
                "requests": {f"{s}/{c}": n for (s, c), n in sorted(self.requests.items())},
                "breaching": dict(self.evaluator.since),
                "account_lookups": self.resolver.lookups}

    # ---- guardrails --------------------------------------------------------------

    async def _guard_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.guard_interval_s)
            await self.guard_once()

    @property
    def evaluator(self) -> Evaluator:
        return self.guard.evaluator

    async def guard_once(self) -> StepBack | None:
        """One guardrail evaluation over the interval since the last one."""
        seen = {s: self.counters[s].take() for s in d.STACKS}
        config = self.config
        fired = await self.guard.observe(config, seen)
        if fired is not None:
            stepped = fired.apply(self.config, now=time.time())
            self.write_file(stepped)
            self.config = stepped
            self.event("rollout.step_back", fired.to_dict())
        return fired


IDENTITY_HEADERS: Final = (b"authorization", b"x-ee-agent", b"x-ee-dc")
"""Headers the cohort is taken from: the router reads one value, so exactly one may come
(a stack reading another of several could serve one cohort's request as another's)."""


def _duplicate_identity(raw: list[tuple[bytes, bytes]]) -> str | None:
    names = [k.lower() for k, _ in raw]
    for name in IDENTITY_HEADERS:
        if names.count(name) > 1:
            return f"more than one {name.decode()} header"
    return None


def batch_decide(config: d.RolloutConfig, raw: bytes) -> list[list[Any]]:
    """``[[class, cohort key], …]`` → ``[[stack, bucket|null], …]`` (the parity test)."""
    try:
        items = json.loads(raw)
    except ValueError:
        raise BadAdminRequest(400, "bad_request", "a JSON array of [class, key]") from None
    if not isinstance(items, list):
        raise BadAdminRequest(400, "bad_request", "a JSON array of [class, key]")
    out: list[list[Any]] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in d.CLASSES
                and (item[1] is None or isinstance(item[1], str))):
            raise BadAdminRequest(400, "bad_request", "a JSON array of [class, key]")
        try:
            choice = d.decide(config, item[0], item[1])
        except UnicodeEncodeError:  # a lone surrogate in the key
            raise BadAdminRequest(400, "bad_request", "a key must be valid Unicode") from None
        out.append([choice.stack, choice.bucket])
    return out


def _same_shape(a: bytes, b: bytes) -> bool:
    return bool(_shape_of(a) == _shape_of(b))


def _shape_of(body: bytes) -> Any:
    try:
        return json_shape(json.loads(body))
    except ValueError:
        return {"<bytes>": hashlib.sha256(body).hexdigest()}


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise trio.BrokenResourceError("the caller went away mid-body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


async def _read_capped(receive: Receive, cap: int) -> bytes:
    out = bytearray()
    async for chunk in _body(receive):
        out += chunk
        if len(out) > cap:
            raise BadAdminRequest(413, "too_large", f"the body is over {cap} bytes")
    return bytes(out)


async def _json(send: Send, status: int, doc: Any, stack: str | None = None) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if stack is not None:
        headers.append((d.STACK_HEADER.lower().encode(), stack.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _raw(send: Send, status: int, body: bytes, stack: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (d.STACK_HEADER.lower().encode(), stack.encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _relay(upstream: trio_websocket.WebSocketConnection, receive: Receive,
                 send: Send) -> None:
    """Frames both ways until either side closes; the close code crosses over."""
    async with trio.open_nursery() as nursery:

        async def down() -> None:
            try:
                while True:
                    message = await upstream.get_message()
                    key = "text" if isinstance(message, str) else "bytes"
                    await send({"type": "websocket.send", key: message})
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else 1000
                await send({"type": "websocket.close", "code": code,
                            "reason": (exc.reason.reason or "") if exc.reason else ""})
            nursery.cancel_scope.cancel()

        async def up() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    await upstream.aclose(message.get("code", 1000) or 1000)
                    break
                if message.get("text") is not None:
                    await upstream.send_message(message["text"])
                elif message.get("bytes") is not None:
                    await upstream.send_message(message["bytes"])
            nursery.cancel_scope.cancel()

        nursery.start_soon(down)
        nursery.start_soon(up)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ee-router", description=(
        "Cohort router in front of two CP stacks (old = stable, new = candidate)."))
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--old", required=True, metavar="URL", help="the stable stack's HTTP API")
    p.add_argument("--new", required=True, metavar="URL", help="the candidate stack's HTTP API")
    p.add_argument("--old-agents", metavar="WS_URL", help="the stable stack's agent plane")
    p.add_argument("--new-agents", metavar="WS_URL", help="the candidate stack's agent plane")
    p.add_argument("--config", required=True, metavar="FILE",
                   help='{"kill_switch": bool, "classes": {"A": pct, …}, "shadow": {"A": rate}}')
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="enables the /_ee/router/ admin endpoints for this bearer token")
    p.add_argument("--drill-pubkey", metavar="FILE",
                   help="refuse admin config changes that promote a class above 25 %% "
                        "without a passed DB-wipe drill signed by this Ed25519 key")
    p.add_argument("--guard-interval", type=float, default=15.0, metavar="SECONDS",
                   help="guardrail evaluation interval (0: off)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = None
    if args.admin_token_file:
        try:
            token = Path(args.admin_token_file).read_text().strip()
        except OSError as exc:
            print(f"ee-router: --admin-token-file: {exc}", file=sys.stderr)
            return 2
        if len(token) < 16:
            print("ee-router: the admin token must be at least 16 characters", file=sys.stderr)
            return 2
    pubkey = None
    if args.drill_pubkey:
        from ee.protocol.signing import KeyFileError, load_public_key
        try:
            pubkey = load_public_key(args.drill_pubkey)
        except KeyFileError as exc:
            print(f"ee-router: --drill-pubkey: {exc}", file=sys.stderr)
            return 2
    settings = RouterSettings(listen=args.listen, old=args.old, new=args.new,
                              config_path=Path(args.config), old_agents=args.old_agents,
                              new_agents=args.new_agents, admin_token=token,
                              drill_pubkey=pubkey, guard_interval_s=args.guard_interval)
    router = Router(settings, d.RolloutConfig())
    router.load_file()
    if router.config_error is not None:
        print(f"ee-router: {router.config_error}", file=sys.stderr)
        return 2

    async def serve() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(router.run, shutdown)
            print(f"ee-router listening on {', '.join(bound)}", flush=True)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    shutdown.set()
                    break

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
