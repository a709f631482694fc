"""The agent's HTTP port (Quart-Trio on Hypercorn): its own routes, then the workload.

Theory of operation
-------------------
Anyone on the network reaches this port, so every request passes one gate before any
route sees it: :class:`RequestGuard`, an ASGI wrapper around the Quart app that runs
two pure checks on what Hypercorn parsed off the wire.

- :func:`check_request_target` takes the method and the raw request target (the ASGI
  scope's ``raw_path`` and ``query_string``, exactly the bytes of the request line) and
  returns the origin-form target ``/path?query`` or raises :class:`RequestRefused`
  (400 with a reason code). Only origin-form passes: no absolute form
  (``http://other/``), no authority form (``host:port``, ``@host:port/…``), no asterisk
  form (``OPTIONS *``), no ``CONNECT``, no scheme-relative ``//host/path``, no
  backslash, no dot segment (raw or percent-encoded, ``%2F..`` included), no encoded
  control character, no malformed ``%`` escape, no character outside RFC 3986 (plus
  ``|^[]``, which browsers send raw), no fragment.
- :func:`check_request_headers` refuses ambiguous framing (``Content-Length`` *and*
  ``Transfer-Encoding``: a smuggling vector, RFC 9112 §6.3), a ``Host`` that is not
  ``host[:port]`` (``@``, ``/``, ``\\``…), and a ``Connection`` header naming anything
  but hop-by-hop tokens (``Connection: Authorization`` would make a proxy strip an
  end-to-end header).

h11 itself already refuses some things before the gate (two ``Host`` headers,
conflicting ``Content-Length``, any ``Transfer-Encoding`` but ``chunked``, non-ASCII
request lines); websocket handshakes reach the gate as a websocket scope and are
refused with 501 ``websocket_unsupported``.

Own routes (API.md, "Agent HTTP"), all under :data:`AGENT_PREFIX` (``/.ee``), out of
the workload's namespace: an app's own ``/api/health`` or ``/api/logs`` reaches the app
through the proxy (the agent's routes lived at ``/api/...`` before; there are no
aliases there, as they would shadow the workload). No request under ``/.ee/`` (raw or
percent-encoded) is ever proxied: an unknown one is a 404 ``unknown_agent_route``.

- ``GET /.ee/health``: public liveness: status, the compose hashes and states of what
  runs, and with ``?attest=true&nonce=<hex>`` a quote whose REPORTDATA is
  ``health_report_data(nonce, compose hash)``, served with the logs that explain its
  RTMRs: ``event_log`` (the firmware's CCEL, base64, RTMR0..2; null off TDX) and
  ``runtime_digests`` (the RTMR3 runtime events' SHA-384 digests, in order: anyone can
  replay them to the quoted RTMR3) and, for a caller with the agent secret only (the
  events name apps, versions and deployments), ``runtime_log`` (the events themselves,
  :mod:`ee.agent.rtmr3`); both null when RTMR3 is not measured. The logs are read
  *before* the quote is taken, so a deploy that lands in between makes the replay fall
  short of the quoted RTMR3 and the client asks again; quotes are rate-limited per
  client (IPv4 address or IPv6 /64) and under a global ceiling by a
  :class:`ClientRateLimit` (429 ``rate_limited`` with ``Retry-After``). Nothing that names a
  tenant or a deployment is public (apps are named ``<account id>.<name>``); a caller
  with the agent secret gets the operator view (vm name, agent id, deployment ids,
  apps, versions, errors, CP link, tunnel);
- ``GET /.ee/state-snapshot``, ``/.ee/logs`` (``deployment_id``, ``tail``, ``since``,
  ``service``; lines carry Docker's timestamps; an undeployed deployment's logs come
  from the retention store), ``/.ee/stats``, ``/.ee/control/challenge``: need
  ``Authorization: Bearer <per-agent secret>`` (compared in constant time).

Every other path and method is reverse-proxied to the current deployment's exposed
container (``HttpHost.upstream()``; never anything the client sent) through httpx,
streaming both ways, redirects not followed. The upstream URL is built from the
upstream's address and the checked origin-form target only. A request that carries the
agent secret in any header or in its target (also percent-encoded, or inside Basic
credentials) is refused (400 ``agent_secret_refused``)
rather than handed to the tenant's code. Hop-by-hop headers (and those ``Connection``
names) are dropped both ways; ``X-Forwarded-For`` is appended to and
``X-Forwarded-Proto``/``-Host`` set (kept from a loopback peer, i.e. the tunnel).

Time limits (:class:`HttpLimits`): the request head must arrive within
``header_timeout_s`` (Hypercorn's keep-alive timer, which also closes idle
connections); a proxied request body may pause at most ``body_idle_timeout_s`` between
chunks and must end within ``body_timeout_s`` (408 ``body_timeout``, connection
closed); the workload must connect within ``upstream_connect_timeout_s`` and may pause
at most ``upstream_read_timeout_s`` while answering. Memory: a request body is read
at most :data:`BODY_WINDOW_BYTES` ahead of what the workload has taken
(:class:`BodyWindow`; the client waits on TCP beyond that), and response bodies
stream, so neither size costs the agent memory. Upstream connections are not pooled
under a cap, so slow requests cannot starve the others of connections.

No workload, or one that does not answer, is a 502 with a JSON error; a connect
failure also makes the agent re-inspect the deployment, so a dead container shows up
as ``failed`` at once. Errors are ``{"error": {"code", "message", "details"}}``, never
a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, cast
from urllib.parse import unquote, unquote_to_bytes

import attrs
import httpx
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    HTTPScope,
    Scope,
    WebsocketCloseEvent,
    WebsocketResponseBodyEvent,
    WebsocketResponseStartEvent,
    WebsocketScope,
)
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ee.agent.config import HttpLimits
from ee.agent.rtmr3 import AttestationLogs, Rtmr3Error
from ee.agent.workload import DeploymentStatus, UnknownDeployment
from ee.attestation.eventlog import RUNTIME_EVENT_FIELDS
from ee.protocol.messages import Health, LogLine, LogsRequest, Snapshot, body_to_dict
from ee.protocol.reportdata import health_report_data

__all__ = [
    "AGENT_PREFIX",
    "HOP_BY_HOP",
    "AgentHttpError",
    "ClientRateLimit",
    "HttpHost",
    "HttpLimits",
    "RequestGuard",
    "RequestRefused",
    "TokenBucket",
    "carries_secret",
    "check_request_headers",
    "check_request_target",
    "client_key",
    "is_agent_path",
    "make_app",
    "response_headers",
    "serve_http",
    "upstream_headers",
]

log = logging.getLogger("ee.agent.http")

PROXY_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: the agent's own routes live under this prefix; everything else is the workload's
AGENT_PREFIX = "/.ee"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)
# What a Connection header may name: its own options and the hop-by-hop headers.
CONNECTION_TOKENS = HOP_BY_HOP | {"close"}
# Set by the agent from what it knows; a client's copy is replaced unless the peer is
# loopback (the tunnel, which set them for the real client).
FORWARDED_BY_US = frozenset({"x-forwarded-proto", "x-forwarded-host"})
MAX_NONCE_BYTES = 64
MAX_TARGET_BYTES = 8192
BODY_WINDOW_BYTES = 1 << 20  # request body read ahead of the workload, per request
BODY_WINDOW_KEY = "ee.body_window"

# RFC 3986 pchar / "/" / "?" (unreserved, sub-delims, ":", "@", "%"), plus "|^[]"
# which browsers send unescaped. Everything else in a target is refused.
_TARGET_CHARS = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%|^\[\]]*")
_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_ENCODED_CONTROL = re.compile(rb"%(?:[01][0-9A-Fa-f]|7[Ff])")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*:")
_AUTHORITY = re.compile(rb"[^/@?]*:[0-9]*")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{1,5})?")
# The secret is token_urlsafe; other characters split header values into candidates.
_SECRET_SPLIT = re.compile(r"[^A-Za-z0-9_\-]+")


class AgentHttpError(Exception):
    """A refusal with a status, code and message (mapped to the JSON error shape)."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


class RequestRefused(AgentHttpError):
    """A request the agent will not route or forward (400 unless said otherwise)."""

    def __init__(self, code: str, message: str, status: int = 400,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, message, details)


class BodyTimeout(Exception):
    """The client sent its request body too slowly (raised into the upstream send)."""


class BodyWindow:
    """Flow control for one request body: at most *limit* bytes read ahead.

    Hypercorn hands the app body chunks as fast as the client sends them, and Quart's
    ``request.body`` keeps every chunk until it is read; behind a workload that reads
    slowly (or not at all) a client could park its whole upload in the agent's memory.
    The guard's ``receive`` waits while more than *limit* bytes are received but not
    yet forwarded; Hypercorn then stops reading the socket and TCP pushes back.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ahead = 0
        self._room = trio.Event()

    def received(self, size: int) -> None:
        self.ahead += size

    def forwarded(self, size: int) -> None:
        self.ahead -= size
        if self.ahead <= self.limit:
            self._room.set()
            self._room = trio.Event()

    async def wait_for_room(self) -> None:
        while self.ahead > self.limit:
            await self._room.wait()


# --- pure checks (no I/O; tested line by line) ----------------------------------------


def check_request_target(method: str, raw_path: bytes, query_string: bytes = b"") -> str:
    """The origin-form target ``/path[?query]``, or :class:`RequestRefused`.

    *raw_path* and *query_string* are the ASGI scope's: the request line's target split
    at the first ``?``. The result is what the upstream request is built from.
    """
    if method.upper() == "CONNECT":
        raise RequestRefused("connect_refused", "CONNECT is not served: this is no forward proxy")
    target = raw_path + (b"?" + query_string if query_string else b"")
    shown = target[:200].decode("latin-1")
    if len(target) > MAX_TARGET_BYTES:
        raise RequestRefused("target_too_long", f"request target over {MAX_TARGET_BYTES} bytes",
                             414, {"bytes": len(target)})
    if not raw_path.startswith(b"/"):
        if raw_path == b"*":
            code, what = "asterisk_form", "'*' (asterisk form)"
        elif _SCHEME.match(raw_path) and b"//" in raw_path:
            code, what = "absolute_form", "an absolute URI"
        elif b"@" in raw_path.split(b"/", 1)[0]:
            code, what = "userinfo_in_target", "'user@host' (authority with userinfo)"
        elif _AUTHORITY.fullmatch(raw_path):
            code, what = "authority_form", "'host:port' (authority form)"
        else:
            code, what = "not_origin_form", "not a path"
        raise RequestRefused(code, f"the request target is {what}; only /path?query is served",
                             details={"target": shown})
    if raw_path.startswith(b"//"):
        raise RequestRefused("scheme_relative", "the path starts with '//' (a host, to some "
                             "parsers)", details={"target": shown})
    if b"\\" in target or b"%5c" in target.lower():
        raise RequestRefused("backslash", "backslashes (raw or %5C) are refused in targets",
                             details={"target": shown})
    if b"#" in target:
        raise RequestRefused("fragment", "a fragment ('#') is never sent to a server",
                             details={"target": shown})
    if not _TARGET_CHARS.fullmatch(target):
        bad = next(chr(b) for b in target if not _TARGET_CHARS.fullmatch(bytes([b])))
        raise RequestRefused("bad_character", f"character {bad!r} must be percent-encoded",
                             details={"target": shown})
    if _PERCENT.search(target):
        raise RequestRefused("bad_percent_encoding", "'%' must be followed by two hex digits",
                             details={"target": shown})
    if _ENCODED_CONTROL.search(target):
        raise RequestRefused("control_character", "encoded control characters are refused",
                             details={"target": shown})
    segments = unquote_to_bytes(raw_path).split(b"/")
    if any(segment in (b".", b"..") for segment in segments):
        raise RequestRefused("dot_segment", "'.' and '..' segments (raw or encoded) are refused",
                             details={"target": shown})
    return target.decode("ascii")


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.lower() == name]


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def check_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse ambiguous framing, a malformed Host, and Connection naming real headers."""
    headers = list(headers)
    names = {k.lower() for k, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise RequestRefused("ambiguous_framing",
                             "both Content-Length and Transfer-Encoding (request smuggling)")
    hosts = _values(headers, b"host")
    if len(hosts) > 1 or any(not _HOST.fullmatch(h) for h in hosts):
        raise RequestRefused("bad_host", "Host must be one 'host[:port]'",
                             details={"host": [h[:200] for h in hosts]})
    named = [t for t in _tokens(_values(headers, b"connection")) if t not in CONNECTION_TOKENS]
    if named:
        raise RequestRefused("connection_names_header",
                             "Connection may name only hop-by-hop headers",
                             details={"names": named[:20]})


def carries_secret(headers: Iterable[tuple[bytes, bytes]], target: str, secret: str) -> bool:
    """Whether any header value or the target holds *secret* (constant-time compares)."""
    wanted = secret.encode("utf-8")
    found = False
    texts = [v.decode("latin-1") for _, v in headers] + [target]
    for text in [*texts, *(form for raw in texts for form in _decoded_forms(raw))]:
        candidates = [*_SECRET_SPLIT.split(text), text.strip(), _bearer(text) or ""]
        for candidate in candidates:
            found |= hmac.compare_digest(candidate.encode("latin-1", "replace"), wanted)
    return found


def _decoded_forms(text: str) -> list[str]:
    """What *text* says once decoded the ways a client might have wrapped the secret:
    percent-encoding (``%5F`` for ``_``), and Basic credentials (``user:secret``)."""
    forms = [unquote(text, errors="replace")] if "%" in text else []
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() == "basic" and token.strip():
        try:
            forms.append(base64.b64decode(token.strip(), validate=True).decode("latin-1"))
        except (ValueError, binascii.Error):
            pass
    return forms


def upstream_headers(
    headers: Iterable[tuple[bytes, bytes]], *, client: str, scheme: str, loopback_peer: bool
) -> list[tuple[str, str]]:
    """The headers to send the workload: hop-by-hop gone, ``X-Forwarded-*`` ours."""
    headers = list(headers)
    drop = HOP_BY_HOP | set(_tokens(_values(headers, b"connection")))
    if not loopback_peer:
        drop |= FORWARDED_BY_US
    out: list[tuple[str, str]] = []
    previous: list[str] = []
    host = ""
    for key, value in headers:
        name, text = key.decode("latin-1"), value.decode("latin-1")
        lower = name.lower()
        if lower == "host":
            host = text
        if lower == "x-forwarded-for":
            previous.append(text)
        elif lower not in drop:
            out.append((name, text))
    names = {k.lower() for k, _ in out}
    out.append(("X-Forwarded-For", ", ".join([*previous, client])))
    if "x-forwarded-proto" not in names:
        out.append(("X-Forwarded-Proto", scheme))
    if host and "x-forwarded-host" not in names:
        out.append(("X-Forwarded-Host", host))
    return out


def response_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The workload's response headers minus hop-by-hop ones (and those it names)."""
    drop = HOP_BY_HOP | set(_tokens(v for k, v in headers if k.lower() == "connection"))
    return [(k, v) for k, v in headers if k.lower() not in drop]


@attrs.define
class TokenBucket:
    """At most *burst* at once, refilled at *rate* per second; fed Trio time."""

    rate: float = attrs.field(validator=attrs.validators.gt(0.0))
    burst: float = attrs.field(validator=attrs.validators.ge(1.0))
    _tokens: float = attrs.field(init=False)
    _at: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.burst

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    def refund(self) -> None:
        """Give back the token just taken (the request did not go ahead after all)."""
        self._tokens = min(self.burst, self._tokens + 1)


def client_key(address: str) -> str:
    """The rate-limit key of a peer address: the IPv4 address, or the IPv6 /64 (one
    host usually owns a whole /64); anything unparseable is its own key."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@attrs.define
class ClientRateLimit:
    """A :class:`TokenBucket` per client key, plus one global ceiling; fed Trio time.

    One noisy client empties only its own bucket (legitimate verifiers keep theirs);
    the global bucket bounds the total work however many addresses take part. The
    per-client table holds at most *max_clients* keys, least recently used evicted
    first (an evicted client starts again with a full burst: the global ceiling still
    holds). A request refused by its own bucket costs the global bucket nothing, and
    one refused by the global bucket costs the client nothing.
    """

    rate: float = attrs.field(validator=attrs.validators.gt(0.0))
    burst: float = attrs.field(validator=attrs.validators.ge(1.0))
    global_rate: float = attrs.field(validator=attrs.validators.gt(0.0))
    global_burst: float = attrs.field(validator=attrs.validators.ge(1.0))
    max_clients: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    _clients: dict[str, TokenBucket] = attrs.field(init=False, factory=dict)
    _global: TokenBucket = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._global = TokenBucket(rate=self.global_rate, burst=self.global_burst)

    def take(self, key: str, now: float) -> float:
        """0.0 when the request may go ahead, else the seconds to wait."""
        bucket = self._clients.pop(key, None)  # re-inserted last: dicts keep order
        if bucket is None:
            bucket = TokenBucket(rate=self.rate, burst=self.burst)
            while len(self._clients) >= self.max_clients:
                del self._clients[next(iter(self._clients))]
        self._clients[key] = bucket
        wait = bucket.take(now)
        if wait > 0:
            return wait
        wait = self._global.take(now)
        if wait > 0:
            bucket.refund()
        return wait

    def __len__(self) -> int:
        return len(self._clients)


# --- what the HTTP app needs from the agent ---------------------------------------------


class _Quotes(Protocol):
    @property
    def name(self) -> str: ...

    async def quote(self, report_data: bytes) -> bytes: ...


class _Challenges(Protocol):
    def issue(self, now: float) -> tuple[bytes, float]: ...


class HttpHost(Protocol):
    """The agent as its HTTP port sees it (``ee.agent.server.Agent`` is one)."""

    @property
    def secret(self) -> str: ...
    @property
    def vm_name(self) -> str: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def current(self) -> str | None: ...
    @property
    def cp_connected(self) -> bool: ...
    @property
    def quotes(self) -> _Quotes: ...
    @property
    def challenges(self) -> _Challenges: ...
    @property
    def http_limits(self) -> HttpLimits: ...
    @property
    def listen(self) -> str: ...

    def current_status(self) -> DeploymentStatus | None: ...
    def deployment_statuses(self) -> list[DeploymentStatus]: ...
    def upstream(self) -> tuple[str, int] | None: ...
    def health(self) -> Health: ...
    def snapshot(self) -> Snapshot: ...
    def tunnel_view(self) -> dict[str, Any] | None: ...
    async def recheck(self, deployment_id: str) -> None: ...
    async def log_lines(self, request: LogsRequest
                        ) -> tuple[str | None, dict[str, list[LogLine]]]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def attestation_logs(self) -> AttestationLogs: ...


# --- the gate ---------------------------------------------------------------------------

_JSON_HEADERS = [(b"content-type", b"application/json")]


def _error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"error": {"code": code, "message": message,
                                 "details": details or {}}}).encode("utf-8")


class RequestGuard:
    """ASGI wrapper: every request passes the pure checks before the app sees it."""

    def __init__(self, app: ASGIFramework) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] == "http":
            try:
                check_request_target(scope["method"], scope["raw_path"], scope["query_string"])
                check_request_headers(scope["headers"])
            except RequestRefused as exc:
                _log_refusal(scope, exc)
                body = _error_body(exc.code, exc.message, exc.details)
                await send(HTTPResponseStartEvent(
                    type="http.response.start", status=exc.status,
                    headers=[*_JSON_HEADERS, (b"content-length", str(len(body)).encode()),
                             (b"connection", b"close")]))
                await send(HTTPResponseBodyEvent(type="http.response.body", body=body,
                                                 more_body=False))
                return
            window = BodyWindow(BODY_WINDOW_BYTES)
            cast(dict[str, Any], scope)[BODY_WINDOW_KEY] = window
            await self.app(scope, partial(_receive_within, window, receive),
                           partial(_send_shielding_the_end, send))
            return
        await self.app(scope, receive, send)

    async def _refuse_websocket(self, scope: WebsocketScope, receive: ASGIReceiveCallable,
                                send: ASGISendCallable) -> None:
        exc = RequestRefused("websocket_unsupported",
                             "websocket upgrades are not proxied to the workload", 501)
        _log_refusal(scope, exc)
        await receive()  # websocket.connect
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send(WebsocketCloseEvent(type="websocket.close", code=1008, reason=exc.code))
            return
        body = _error_body(exc.code, exc.message)
        await send(WebsocketResponseStartEvent(
            type="websocket.http.response.start", status=exc.status,
            headers=[*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]))
        await send(WebsocketResponseBodyEvent(type="websocket.http.response.body", body=body,
                                              more_body=False))


async def _receive_within(window: BodyWindow, receive: ASGIReceiveCallable
                          ) -> ASGIReceiveEvent:
    await window.wait_for_room()
    message = await receive()
    if message["type"] == "http.request":
        window.received(len(message.get("body", b"")))
    return message


async def _send_shielding_the_end(send: ASGISendCallable, message: ASGISendEvent) -> None:
    """Send the last body message shielded from cancellation.

    Hypercorn closes a ``Connection: close`` (or half-read) connection from inside this
    send; Quart-Trio cancels the request's tasks as soon as Hypercorn reports the
    disconnect that close causes, which would cancel the close half-way and leave the
    socket open for as long as the client likes (found by the slow-body tests).
    Hypercorn shields its own socket writes the same way.
    """
    if message["type"] == "http.response.body" and not message.get("more_body", False):
        with trio.CancelScope(shield=True):
            await send(message)
    else:
        await send(message)


def _log_refusal(scope: HTTPScope | WebsocketScope, exc: AgentHttpError) -> None:
    client = (scope.get("client") or ("?", 0))[0]
    log.warning("refused a request from %s: %s %s (%s)", client, exc.status, exc.code,
                exc.message)


# --- the Quart app ----------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    return _json({"error": {"code": code, "message": message, "details": details or {}}}, status)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def make_app(agent: HttpHost, client: httpx.AsyncClient) -> QuartTrio:
    """The Quart app (serve it behind :class:`RequestGuard`, as :func:`serve_http` does)."""
    app = QuartTrio("ee.agent")
    limits = agent.http_limits
    app.config["MAX_CONTENT_LENGTH"] = None  # the workload decides what it accepts
    app.config["BODY_TIMEOUT"] = limits.body_timeout_s
    app.config["RESPONSE_TIMEOUT"] = None
    attest_bucket = ClientRateLimit(
        rate=limits.attest_rate_per_s, burst=limits.attest_burst,
        global_rate=limits.attest_global_rate_per_s, global_burst=limits.attest_global_burst,
        max_clients=limits.attest_clients)

    def has_secret() -> bool:
        token = _bearer(request.headers.get("Authorization"))
        return token is not None and hmac.compare_digest(
            token.encode("utf-8"), agent.secret.encode("utf-8"))

    def require_secret() -> None:
        if not has_secret():
            raise AgentHttpError(
                401,
                "unauthenticated",
                "this route needs 'Authorization: Bearer <agent secret>'",
            )

    @app.errorhandler(AgentHttpError)
    async def on_agent_error(exc: AgentHttpError) -> Response:
        response = _error(exc.status, exc.code, exc.message, exc.details)
        if exc.status == 429 and "retry_after_s" in exc.details:
            response.headers["Retry-After"] = str(exc.details["retry_after_s"])
        return response

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        return _error(status, name, exc.description or exc.name or "error")

    @app.errorhandler(Exception)
    async def on_crash(exc: Exception) -> Response:
        log.exception("agent HTTP handler failed")
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    @app.get(f"{AGENT_PREFIX}/health")
    async def health() -> Response:
        status = agent.current_status()
        health = agent.health()
        compose_hash = status.compose_hash if status else None
        body: dict[str, Any] = {
            "status": health.status,
            "compose_hash": compose_hash,
            "deployments": [{"state": d.state, "compose_hash": d.compose_hash}
                            for d in agent.deployment_statuses()],
        }
        if has_secret():  # the operator view
            body.update(
                detail=health.detail,
                vm_name=agent.vm_name,
                agent_id=agent.agent_id,
                deployments=[_deployment_view(d) for d in agent.deployment_statuses()],
                cp_connected=agent.cp_connected,
                tunnel=agent.tunnel_view(),
            )
        if request.args.get("attest", "").lower() in ("1", "true", "yes"):
            body["attestation"] = await _attest(agent, compose_hash, attest_bucket,
                                                operator=has_secret())
        return _json(body)

    @app.get(f"{AGENT_PREFIX}/state-snapshot")
    async def state_snapshot() -> Response:
        require_secret()
        body = body_to_dict(agent.snapshot())
        body.update(agent_id=agent.agent_id, vm_name=agent.vm_name,
                    current_deployment=agent.current)
        return _json(body)

    @app.get(f"{AGENT_PREFIX}/logs")
    async def logs() -> Response:
        require_secret()
        deployment_id = request.args.get("deployment_id") or None
        raw_tail = request.args.get("tail", "200")
        if not re.fullmatch(r"[0-9]{1,5}", raw_tail) or not 1 <= int(raw_tail) <= 10_000:
            raise AgentHttpError(400, "bad_tail", "tail must be an integer 1..10000",
                                 {"tail": raw_tail})
        try:  # the session request's own checks (since: RFC 3339 UTC, service: a name)
            query = LogsRequest(deployment_id=deployment_id, tail=int(raw_tail),
                                since=request.args.get("since") or None,
                                service=request.args.get("service") or None)
        except ValueError as exc:
            raise AgentHttpError(400, "bad_query", str(exc)[:300]) from None
        try:
            name, found = await agent.log_lines(query)
        except UnknownDeployment:
            raise AgentHttpError(404, "unknown_deployment",
                                 f"no deployment {deployment_id!r} on this agent") from None
        return _json({
            "deployment_id": name,
            "logs": {key: "".join(ln.text + "\n" for ln in lines) for key, lines in found.items()},
            "lines": [{"service": ln.service, "at": ln.at, "text": ln.text}
                      for lines in found.values() for ln in lines],
        })

    @app.get(f"{AGENT_PREFIX}/stats")
    async def stats() -> Response:
        require_secret()
        return _json(await agent.stats())

    @app.get(f"{AGENT_PREFIX}/control/challenge")
    async def control_challenge() -> Response:
        require_secret()
        nonce, ttl = agent.challenges.issue(trio.current_time())
        return _json({
            "nonce": nonce.hex(),
            "ttl_seconds": ttl,
            "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        })

    @app.route("/", defaults={"path": ""}, methods=PROXY_METHODS)
    @app.route("/<path:path>", methods=PROXY_METHODS)
    async def proxy(path: str) -> Response:
        return await _proxy(agent, client)

    return app


def _deployment_view(status: DeploymentStatus) -> dict[str, Any]:
    view: dict[str, Any] = {
        "deployment_id": status.deployment_id,
        "app": status.app,
        "version": status.version,
        "state": status.state,
        "compose_hash": status.compose_hash,
    }
    if status.error is not None:
        view["error"] = status.error
    if status.phase is not None:
        view.update(phase=status.phase, exit_code=status.exit_code,
                    log_tail=list(status.log_tail))
    return view


async def _attest(agent: HttpHost, compose_hash: str | None,
                  bucket: ClientRateLimit, *, operator: bool) -> dict[str, Any]:
    raw = request.args.get("nonce", "")
    try:
        nonce = bytes.fromhex(raw)
    except ValueError:
        raise AgentHttpError(400, "bad_nonce", "nonce must be hex", {"nonce": raw[:200]}) from None
    if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise AgentHttpError(400, "bad_nonce",
                             f"nonce must be 1..{MAX_NONCE_BYTES} bytes of hex",
                             {"nonce_bytes": len(nonce)})
    if compose_hash is None:
        raise AgentHttpError(409, "no_workload",
                             "no deployment with a compose hash runs here; nothing to attest to")
    try:
        report_data = health_report_data(nonce, compose_hash)
    except (ValueError, binascii.Error):
        raise AgentHttpError(409, "no_workload", "the current compose hash is unusable") from None
    wait = bucket.take(_rate_key(), trio.current_time())
    if wait > 0:
        retry = max(1, math.ceil(wait))
        log.warning("attested health refused: rate limit (retry in %ss)", retry)
        raise AgentHttpError(429, "rate_limited", "too many attested health requests; retry later",
                             {"retry_after_s": retry})
    try:
        logs = await agent.attestation_logs()  # before the quote: see the module docstring
    except Rtmr3Error as exc:
        log.error("attested health: cannot read the event logs: %s", exc)
        raise AgentHttpError(503, "event_log_unavailable",
                             "the agent cannot read its event logs; retry later") from None
    quote = await agent.quotes.quote(report_data)
    return {
        "provider": agent.quotes.name,
        "nonce": nonce.hex(),
        "compose_hash": compose_hash,
        "report_data": report_data.hex(),
        "quote": base64.b64encode(quote).decode("ascii"),
        "event_log": None if logs.event_log is None
        else base64.b64encode(logs.event_log).decode("ascii"),
        "runtime_digests": None if logs.runtime_log is None
        else [e.digest.hex() for e in logs.runtime_log],
        "runtime_log": None if logs.runtime_log is None or not operator
        else [{k: getattr(e, k) for k in RUNTIME_EVENT_FIELDS} for e in logs.runtime_log],
    }


def _rate_key() -> str:
    """The client of this request for rate limiting: the peer, or (peer on loopback:
    the tunnel) the last ``X-Forwarded-For`` entry, which the tunnel appended."""
    peer = str((request.scope.get("client") or ("", 0))[0])
    if _is_loopback(peer):
        forwarded = ",".join(request.headers.getlist("X-Forwarded-For")).split(",")
        if forwarded[-1].strip():
            return client_key(forwarded[-1])
    return client_key(peer)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_agent_path(raw_path: bytes) -> bool:
    """Whether a request path lies in the agent's own namespace (``/.ee`` and below,
    raw or percent-encoded): such a request is answered by the agent, never proxied."""
    path = unquote_to_bytes(raw_path)
    return path == AGENT_PREFIX.encode() or path.startswith(AGENT_PREFIX.encode() + b"/")


async def _proxy(agent: HttpHost, client: httpx.AsyncClient) -> Response:
    scope = cast(HTTPScope, request.scope)
    # The guard checked this already; the URL is built from this call's result only.
    target = check_request_target(scope["method"], scope["raw_path"], scope["query_string"])
    if is_agent_path(scope["raw_path"]):
        raise AgentHttpError(404, "unknown_agent_route",
                             f"no agent route {scope['method']} {target[:200]} (paths under "
                             f"{AGENT_PREFIX}/ are the agent's and never reach the workload)")
    if carries_secret(scope["headers"], target, agent.secret):
        raise RequestRefused("agent_secret_refused",
                             "this request carries the agent secret; it is not forwarded to "
                             "the workload (is the path an agent route?)")
    status = agent.current_status()
    upstream = agent.upstream()
    if status is None or upstream is None:
        detail = {"state": status.state} if status else {}
        message = ("no workload is deployed on this agent" if status is None
                   else f"the workload is {status.state}, not running")
        return _error(502, "no_workload", message, detail)

    host, port = upstream
    url = httpx.URL(scheme="http", host=host, port=port, raw_path=target.encode("ascii"))
    client_addr = (scope.get("client") or ("", 0))[0]
    headers = upstream_headers(scope["headers"], client=client_addr, scheme=scope["scheme"],
                               loopback_peer=_is_loopback(client_addr))
    names = {k.lower() for k, _ in scope["headers"]}
    has_body = b"transfer-encoding" in names or any(
        k.lower() == b"content-length" and v.strip() != b"0" for k, v in scope["headers"])
    limits = agent.http_limits

    window: BodyWindow | None = cast(dict[str, Any], scope).get(BODY_WINDOW_KEY)

    async def body() -> AsyncIterator[bytes]:
        chunks = request.body.__aiter__()
        deadline = trio.current_time() + limits.body_timeout_s
        while True:
            wait_until = min(deadline, trio.current_time() + limits.body_idle_timeout_s)
            with trio.move_on_at(wait_until) as waited:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if waited.cancelled_caught:
                raise BodyTimeout()
            yield chunk
            if window is not None:
                window.forwarded(len(chunk))

    outgoing = client.build_request(
        request.method, url, headers=headers, content=body() if has_body else None)
    try:
        answer = await client.send(outgoing, stream=True, follow_redirects=False)
    except BodyTimeout:
        log.info("request body from %s too slow; cut off", client_addr)
        response = _error(408, "body_timeout",
                          f"the request body did not arrive in time (at most "
                          f"{limits.body_idle_timeout_s:g}s between chunks, "
                          f"{limits.body_timeout_s:g}s in all)")
        response.headers["Connection"] = "close"
        return response
    except httpx.HTTPError as exc:
        log.info("proxy to %s failed: %s", url, exc)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            await agent.recheck(status.deployment_id)
        return _error(502, "workload_unreachable",
                      f"the workload did not answer: {type(exc).__name__}")

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.info("workload response from %s broke off: %s", url, exc)
        finally:
            await answer.aclose()

    response = Response(stream(), status=answer.status_code)
    response.headers.clear()
    for key, value in response_headers(answer.headers.multi_items()):
        response.headers.add(key, value)
    response.timeout = None
    return response


async def serve_http(
    agent: HttpHost, shutdown: trio.Event, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    """Serve the agent's HTTP port until *shutdown* is set (graceful, then returns)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    limits = agent.http_limits
    config = Config()
    config.bind = [agent.listen]
    config.graceful_timeout = 5
    config.keep_alive_timeout = limits.header_timeout_s  # also bounds reading a request head
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    timeout = httpx.Timeout(connect=limits.upstream_connect_timeout_s,
                            read=limits.upstream_read_timeout_s,
                            write=limits.body_timeout_s, pool=10.0)
    # No cap on upstream connections: a pool limit would let a hundred slow clients
    # starve everyone else (each proxied request holds one for its whole life).
    pool = httpx.Limits(max_connections=None, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=timeout, limits=pool, trust_env=False,
                                 follow_redirects=False) as client:
        app = RequestGuard(cast(ASGIFramework, make_app(agent, client)))
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
