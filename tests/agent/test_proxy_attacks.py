"""Attacks on the agent's HTTP port and proxy, over a raw socket.

The agent here is the real :class:`ee.agent.server.Agent` with its real HTTP app served
by Hypercorn on port 0 (``serve_http``); only its workload is a loopback HTTP server
(:class:`Upstream`, parsed with h11) instead of a Docker container, so the tests see
byte for byte what the workload receives. A second loopback server, ``elsewhere``,
stands for every address the proxy must never reach; each attack aims at it.

The pure checks (``check_request_target``, ``check_request_headers``, ``carries_secret``,
``upstream_headers``, ``response_headers``, ``TokenBucket``) are tested line by line at
the end.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio
import trio.testing

from ee.agent.http import (
    ClientRateLimit,
    HttpLimits,
    RequestRefused,
    TokenBucket,
    carries_secret,
    check_request_headers,
    check_request_target,
    client_key,
    is_agent_path,
    response_headers,
    serve_http,
    upstream_headers,
)
from ee.agent.server import Agent
from ee.agent.workload import DeploymentStatus

from .agentkit import agent_config, eventually

COMPOSE_HASH = "sha256:" + "ab" * 32
TENANT_APP = "acct-7f3a9c.shop"  # the CP names apps <account id>.<name>
DEPLOYMENT_ID = "dep-c0ffee"


# --- the parts -------------------------------------------------------------------------


@attrs.define
class Seen:
    """One request as the loopback server parsed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


class Upstream:
    """A loopback HTTP/1.1 server that records every connection and request."""

    def __init__(self, reads: bool = True) -> None:
        self.reads = reads  # False: accept connections, never read from them
        self.port = 0
        self.connections = 0
        self.requests: list[Seen] = []
        self.held = 0  # requests for /hold waiting for release
        self.release = trio.Event()

    async def serve(self, task_status: trio.TaskStatus[Upstream] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        if not self.reads:
            await trio.sleep_forever()
        conn = h11.Connection(h11.SERVER)
        seen: Seen | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    seen = Seen(event.method.decode(), event.target.decode("latin-1"),
                                [(k.decode(), v.decode("latin-1")) for k, v in event.headers],
                                b"")
                elif isinstance(event, h11.Data):
                    body.extend(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert seen is not None
                    seen.body = bytes(body)
                    self.requests.append(seen)
                    if seen.target == "/hold":
                        self.held += 1
                        await self.release.wait()
                    await stream.send_all(conn.send(self._answer(seen)) or b"")
                    await stream.send_all(conn.send(h11.Data(data=b"upstream-ok")) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return
                else:
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError):
            return
        finally:
            await stream.aclose()

    def _answer(self, seen: Seen) -> h11.Response:
        if seen.target == "/redirect":
            return h11.Response(status_code=302, headers=[
                ("Location", f"http://127.0.0.1:{self.port + 0}/elsewhere"),
                ("Content-Length", "11")])
        return h11.Response(status_code=200, headers=[
            ("Content-Length", "11"),
            ("Connection", "close, X-Upstream-Private"),
            ("X-Upstream-Private", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic realm=x"),
            ("Upgrade", "h2c"),
            ("Trailer", "X-Checksum"),
            ("X-Kept", "end-to-end"),
        ])


class LoopbackWorkloadAgent(Agent):
    """The real agent, whose current deployment answers on a loopback port."""

    def __init__(self, *args: Any, workload_port: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workload_port = workload_port
        self.agent_id = "ag-0123"

    def current_status(self) -> DeploymentStatus | None:
        return DeploymentStatus(deployment_id=DEPLOYMENT_ID, state="running", app=TENANT_APP,
                                version="v7", compose_hash=COMPOSE_HASH,
                                upstream=("127.0.0.1", self.workload_port))

    def deployment_statuses(self) -> list[DeploymentStatus]:
        status = self.current_status()
        assert status is not None
        return [status]

    def upstream(self) -> tuple[str, int] | None:
        return ("127.0.0.1", self.workload_port)


@attrs.define
class Setup:
    agent: LoopbackWorkloadAgent
    port: int
    workload: Upstream
    elsewhere: Upstream

    def untouched(self) -> None:
        """Nothing reached the workload or anywhere else."""
        assert self.elsewhere.connections == 0
        assert self.workload.connections == 0, self.workload.requests


@asynccontextmanager
async def agent_port(tmp_path: Path, limits: HttpLimits | None = None,
                     workload: Upstream | None = None) -> AsyncIterator[Setup]:
    async with trio.open_nursery() as nursery:
        workload = await nursery.start((workload or Upstream()).serve)
        assert workload is not None
        elsewhere: Upstream = await nursery.start(Upstream().serve)
        agent = LoopbackWorkloadAgent(agent_config(tmp_path / "agent"),
                                      workload_port=workload.port, http_limits=limits)
        stop = trio.Event()
        binds = await nursery.start(partial(serve_http, agent, stop))
        try:
            yield Setup(agent, int(binds[0].rsplit(":", 1)[1]), workload, elsewhere)
        finally:
            stop.set()
            nursery.cancel_scope.cancel()


@attrs.define
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    @property
    def code(self) -> str:
        error = json.loads(self.body)["error"]
        assert set(error) == {"code", "message", "details"}
        code: str = error["code"]
        return code


class Reader:
    """h11 as a client that sent a GET: collects one response from raw bytes."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.conn.send(h11.Request(method="GET", target="/", headers=[("Host", "agent")]))
        self.conn.send(h11.EndOfMessage())
        self.response: h11.Response | None = None
        self.body = bytearray()

    def feed(self, data: bytes) -> Answer | None:
        """The whole response once it is in, else None (needs more data)."""
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert self.response is not None
                return Answer(self.response.status_code,
                              [(k.decode(), v.decode("latin-1"))
                               for k, v in self.response.headers], bytes(self.body))


def parse_answer(data: bytes) -> Answer:
    reader = Reader()
    answer = reader.feed(data) or reader.feed(b"")
    assert answer is not None, data[:300]
    return answer


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data.extend(chunk)
    return bytes(data)


async def raw(port: int, request: bytes, timeout: float = 10) -> Answer:
    """Send *request* as is on a fresh connection; read one whole response."""
    with trio.fail_after(timeout):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            reader = Reader()
            while True:
                answer = reader.feed(await stream.receive_some(65536))
                if answer is not None:
                    return answer


def head(line: str, *headers: str, host: str = "agent") -> bytes:
    lines = [line, f"Host: {host}", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- request-target and header tricks ---------------------------------------------------


def _tricks(other: int, secret: str) -> list[tuple[str, bytes, int, str]]:
    """(name, raw request, status, reason code); *other* is the port to reach."""
    elsewhere = f"127.0.0.1:{other}"
    return [
        ("userinfo", head(f"GET @{elsewhere}/x HTTP/1.1"), 400, "userinfo_in_target"),
        ("userinfo-creds", head(f"GET user:pw@{elsewhere}/x HTTP/1.1"), 400,
         "userinfo_in_target"),
        ("absolute", head(f"GET http://{elsewhere}/x HTTP/1.1"), 400, "absolute_form"),
        ("absolute-own-route", head(f"GET http://{elsewhere}/.ee/health HTTP/1.1"), 400,
         "absolute_form"),
        ("absolute-host-elsewhere", head(f"GET http://{elsewhere}/x HTTP/1.1", host=elsewhere),
         400, "absolute_form"),
        ("absolute-https", head(f"POST https://{elsewhere}/x HTTP/1.1"), 400, "absolute_form"),
        ("scheme-relative", head(f"GET //{elsewhere}/path HTTP/1.1"), 400, "scheme_relative"),
        ("authority-form", head(f"GET {elsewhere} HTTP/1.1"), 400, "authority_form"),
        ("connect", head(f"CONNECT {elsewhere} HTTP/1.1", host=elsewhere), 400,
         "connect_refused"),
        ("connect-path", head("CONNECT /x HTTP/1.1"), 400, "connect_refused"),
        ("options-asterisk", head("OPTIONS * HTTP/1.1"), 400, "asterisk_form"),
        ("query-only", head("GET ?x=1 HTTP/1.1"), 400, "not_origin_form"),
        ("backslash", head(f"GET /\\\\{elsewhere}/x HTTP/1.1"), 400, "backslash"),
        ("backslash-inner", head("GET /a\\..\\b HTTP/1.1"), 400, "backslash"),
        ("encoded-backslash", head("GET /a%5C..%5Cb HTTP/1.1"), 400, "backslash"),
        ("dot-dot", head("GET /a/../.ee/logs HTTP/1.1"), 400, "dot_segment"),
        ("encoded-dot-dot", head("GET /a/%2e%2E/b HTTP/1.1"), 400, "dot_segment"),
        ("encoded-slash-dot-dot", head("GET /a%2F..%2Fapi%2Flogs HTTP/1.1"), 400,
         "dot_segment"),
        ("single-dot", head("GET /a/./b HTTP/1.1"), 400, "dot_segment"),
        ("encoded-nul", head("GET /a%00b HTTP/1.1"), 400, "control_character"),
        ("encoded-crlf", head("GET /a%0d%0aX-Injected:%20y HTTP/1.1"), 400,
         "control_character"),
        ("bad-percent", head("GET /a%zz HTTP/1.1"), 400, "bad_percent_encoding"),
        ("quote-char", head('GET /a"b HTTP/1.1'), 400, "bad_character"),
        ("fragment", head("GET /a#frag HTTP/1.1"), 400, "fragment"),
        ("host-userinfo", head("GET /x HTTP/1.1", host=f"agent@{elsewhere}"), 400, "bad_host"),
        ("host-path", head("GET /x HTTP/1.1", host=f"{elsewhere}/x"), 400, "bad_host"),
        ("host-backslash", head("GET /x HTTP/1.1", host=f"{elsewhere}\\x"), 400, "bad_host"),
        ("smuggle-cl-te", head("POST /x HTTP/1.1", "Content-Length: 4",
                               "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400,
         "ambiguous_framing"),
        ("smuggle-te-cl", head("POST /x HTTP/1.1", "Transfer-Encoding: chunked",
                               "Content-Length: 40") + b"0\r\n\r\n", 400,
         "ambiguous_framing"),
        ("connection-names-authorization",
         head("GET /x HTTP/1.1", "Authorization: Bearer tenant-token",
              "Connection: keep-alive, Authorization"), 400, "connection_names_header"),
        ("connection-names-xff", head("GET /x HTTP/1.1", "Connection: X-Forwarded-For"), 400,
         "connection_names_header"),
        ("secret-bearer", head("GET /api/stat HTTP/1.1", f"Authorization: Bearer {secret}"),
         400, "agent_secret_refused"),
        ("secret-lowercase-scheme", head("GET /x HTTP/1.1", f"authorization: bearer {secret}"),
         400, "agent_secret_refused"),
        ("secret-other-header", head("GET /x HTTP/1.1", f"X-Agent-Secret: {secret}"), 400,
         "agent_secret_refused"),
        ("secret-cookie", head("GET /x HTTP/1.1", f"Cookie: a=1; s={secret}"), 400,
         "agent_secret_refused"),
        ("secret-query", head(f"GET /x?token={secret} HTTP/1.1"), 400, "agent_secret_refused"),
        ("websocket", head("GET /ws HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                           "Sec-WebSocket-Version: 13").replace(b"Connection: close\r\n", b""),
         501, "websocket_unsupported"),
    ]


async def test_proxy_tricks_are_refused_and_reach_nothing(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with agent_port(tmp_path) as env:
            for name, request, status, code in _tricks(env.elsewhere.port, env.agent.secret):
                answer = await raw(env.port, request)
                assert (answer.status, answer.code) == (status, code), (name, answer)
                assert env.agent.secret not in answer.body.decode(), name
                env.untouched()
            # A pipelined request behind the refused one is never served. (Hypercorn may
            # close such a connection before our 400 is out: it races its close against
            # the send; either way nothing is forwarded.)
            with trio.fail_after(10):
                async with await trio.open_tcp_stream("127.0.0.1", env.port) as stream:
                    await stream.send_all(
                        head("POST /x HTTP/1.1", "Transfer-Encoding: chunked",
                             "Content-Length: 40").replace(b"Connection: close\r\n", b"")
                        + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: agent\r\n\r\n")
                    data = await read_to_eof(stream)
            if data:
                answer = parse_answer(data)
                assert (answer.status, answer.code) == (400, "ambiguous_framing")
            env.untouched()
            # An h2c upgrade turns the connection into HTTP/2 (Hypercorn does that before
            # any app code); the same gate refuses the request inside it.
            with trio.fail_after(10):
                async with await trio.open_tcp_stream("127.0.0.1", env.port) as stream:
                    await stream.send_all(head(
                        f"GET http://127.0.0.1:{env.elsewhere.port}/x HTTP/1.1",
                        "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings",
                        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                    ).replace(b"Connection: close\r\n", b""))
                    frames = b""
                    while b'"absolute_form"' not in frames:
                        frames += await stream.receive_some(65536)
            assert frames.startswith(b"HTTP/1.1 101 ")
            env.untouched()
            # Hypercorn's h11 refuses these before the agent's code runs (a bare 4xx/5xx,
            # no JSON body); they reach nothing either.
            for request in (
                head("POST /x HTTP/1.1", "Content-Length: 5", "Content-Length: 6"),
                head("POST /x HTTP/1.1", "Transfer-Encoding: gzip, chunked"),
                head("POST /x HTTP/1.1", "Transfer-Encoding: chunked",
                     "Transfer-Encoding: chunked"),
                head("GET /x HTTP/1.1", "Host: other"),
                head("GET /x HTTP/1.1", "Transfer-Encoding : chunked"),
                "GET /é HTTP/1.1\r\nHost: agent\r\n\r\n".encode(),
            ):
                answer = await raw(env.port, request)
                assert answer.status in (400, 501), request
                env.untouched()
            # After all that, an honest request still works (and reaches only the workload).
            answer = await raw(env.port, head("GET /fine HTTP/1.1"))
            assert (answer.status, answer.body) == (200, b"upstream-ok")
            assert [r.target for r in env.workload.requests] == ["/fine"]
            assert env.elsewhere.connections == 0


async def test_what_the_workload_receives(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with agent_port(tmp_path) as env:
            other = f"127.0.0.1:{env.elsewhere.port}"
            target = "/shop/@scope/pkg;v=1?q=a|b&path=%2Fetc&at=@x:1&list=[1]"
            answer = await raw(env.port, head(
                f"POST {target} HTTP/1.1",
                "Authorization: Bearer tenant-own-token",  # the workload's own auth passes
                "Connection: keep-alive, TE, Upgrade, Keep-Alive",
                "Keep-Alive: timeout=100", "TE: trailers", "Upgrade: h2c, foo/1",
                "Proxy-Authorization: Basic eDp5", "Proxy-Connection: keep-alive",
                "X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: https",
                "X-Forwarded-Host: spoofed.example", "Content-Length: 5",
                host=other) + b"hello")
            assert (answer.status, answer.body) == (200, b"upstream-ok")
            # Hop-by-hop response headers (and the ones Connection names) stay behind.
            for name in ("x-upstream-private", "keep-alive", "proxy-authenticate", "upgrade",
                         "trailer"):
                assert answer.header(name) == [], (name, answer.headers)
            assert answer.header("x-kept") == ["end-to-end"]

            [seen] = env.workload.requests
            assert (seen.method, seen.target, seen.body) == ("POST", target, b"hello")
            assert seen.header("host") == [other]  # kept; it chose no destination
            assert seen.header("authorization") == ["Bearer tenant-own-token"]
            for name in ("te", "upgrade", "keep-alive", "proxy-authorization",
                         "proxy-connection"):
                assert seen.header(name) == [], (name, seen.headers)
            assert seen.header("connection") in ([], ["close"], ["keep-alive"])
            assert seen.header("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
            # The peer is loopback (where the tunnel connects from): its proto/host stay.
            assert seen.header("x-forwarded-proto") == ["https"]
            assert seen.header("x-forwarded-host") == ["spoofed.example"]
            assert env.elsewhere.connections == 0

            # A redirect is passed back, never followed.
            answer = await raw(env.port, head("GET /redirect HTTP/1.1"))
            assert answer.status == 302
            assert [r.target for r in env.workload.requests][-1] == "/redirect"
            assert len(env.workload.requests) == 2 and env.elsewhere.connections == 0


async def test_agent_namespace_is_never_proxied_and_old_paths_reach_the_workload(
        tmp_path: Path) -> None:
    """The agent's routes live under /.ee: nothing there (known or not, raw or encoded,
    any method) reaches the workload; the old /api/... paths are the workload's now."""
    with trio.fail_after(60):
        async with agent_port(tmp_path) as env:
            for method, target in (("GET", "/.ee/no-such-route"), ("POST", "/.ee/health"),
                                   ("GET", "/.ee"), ("GET", "/.ee/"), ("PUT", "/.ee/logs"),
                                   ("GET", "/%2Eee/secret-thing"), ("GET", "/%2eee/x?y=1"),
                                   ("DELETE", "/.ee/control/x")):
                answer = await raw(env.port, head(f"{method} {target} HTTP/1.1"))
                assert answer.status in (404, 405), (method, target, answer)
                if answer.status == 404:
                    assert answer.code == "unknown_agent_route", (target, answer)
                env.untouched()
            # an encoded /.ee/health is still the agent's own health, not the workload's
            answer = await raw(env.port, head("GET /%2Eee/health HTTP/1.1"))
            assert answer.status == 200 and json.loads(answer.body)["status"] == "healthy"
            env.untouched()
            # The workload's own /api/health, /api/logs: proxied (no aliases shadow them).
            for target in ("/api/health", "/api/logs?tail=5", "/api/state-snapshot",
                           "/.eel/x", "/x/.ee/y"):
                answer = await raw(env.port, head(f"GET {target} HTTP/1.1"))
                assert (answer.status, answer.body) == (200, b"upstream-ok"), target
            assert [r.target for r in env.workload.requests] == [
                "/api/health", "/api/logs?tail=5", "/api/state-snapshot", "/.eel/x",
                "/x/.ee/y"]
            assert env.elsewhere.connections == 0


def test_is_agent_path() -> None:
    for path in (b"/.ee", b"/.ee/", b"/.ee/health", b"/%2Eee/health", b"/%2e%65e/x"):
        assert is_agent_path(path), path
    for path in (b"/", b"/api/health", b"/.eel", b"/.EE/health", b"/x/.ee", b"/ee/health"):
        assert not is_agent_path(path), path


async def test_public_health_names_no_tenant(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with agent_port(tmp_path) as env:
            answer = await raw(env.port, head("GET /.ee/health HTTP/1.1"))
            assert answer.status == 200
            body = json.loads(answer.body)
            assert body == {"status": "healthy", "compose_hash": COMPOSE_HASH,
                            "deployments": [{"state": "running",
                                             "compose_hash": COMPOSE_HASH}]}
            text = answer.body.decode()
            for private in ("acct-7f3a9c", TENANT_APP, DEPLOYMENT_ID, env.agent.vm_name,
                            "ag-0123", "v7"):
                assert private not in text
            wrong = await raw(env.port, head("GET /.ee/health HTTP/1.1",
                                             "Authorization: Bearer not-the-secret"))
            assert json.loads(wrong.body) == body

            full = await raw(env.port, head("GET /.ee/health HTTP/1.1",
                                            f"Authorization: Bearer {env.agent.secret}"))
            view = json.loads(full.body)
            assert view["vm_name"] == env.agent.vm_name and view["agent_id"] == "ag-0123"
            [shown] = view["deployments"]
            assert (shown["deployment_id"], shown["app"]) == (DEPLOYMENT_ID, TENANT_APP)
            assert env.untouched() is None


async def test_attested_health_is_rate_limited(tmp_path: Path) -> None:
    limits = HttpLimits(attest_burst=2, attest_rate_per_s=0.001)  # no refill in this test
    with trio.fail_after(60):
        async with agent_port(tmp_path, limits) as env:
            path = f"GET /.ee/health?attest=true&nonce={'ab' * 16} HTTP/1.1"
            for _ in range(2):
                answer = await raw(env.port, head(path))
                assert answer.status == 200 and "quote" in json.loads(answer.body)["attestation"]
            answer = await raw(env.port, head(path))
            assert (answer.status, answer.code) == (429, "rate_limited")
            [retry] = answer.header("retry-after")
            assert int(retry) >= 1
            assert json.loads(answer.body)["error"]["details"]["retry_after_s"] == int(retry)
            # Refusals that cost nothing are not counted, and the plain health still answers.
            bad = await raw(env.port, head("GET /.ee/health?attest=true&nonce=zz HTTP/1.1"))
            assert (bad.status, bad.code) == (400, "bad_nonce")
            assert (await raw(env.port, head("GET /.ee/health HTTP/1.1"))).status == 200


async def test_an_upload_waits_for_the_workload(tmp_path: Path) -> None:
    """A fast client and a workload that reads nothing: the agent buffers about its
    window (1 MiB), not the upload; the rest waits in the client (TCP pushes back)."""
    total = 256 << 20
    sent = 0
    with trio.fail_after(120):
        async with agent_port(tmp_path, workload=Upstream(reads=False)) as env:
            async with await trio.open_tcp_stream("127.0.0.1", env.port) as stream:
                await stream.send_all(head("POST /upload HTTP/1.1", f"Content-Length: {total}"))

                async def push() -> None:
                    nonlocal sent
                    chunk = bytes(1 << 16)
                    while sent < total:
                        await stream.send_all(chunk)
                        sent += len(chunk)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(push)
                    await trio.testing.wait_all_tasks_blocked(cushion=0.5)
                    nursery.cancel_scope.cancel()
            assert env.workload.connections == 1
    # What sits in kernel socket buffers (two connections) and the window, no more.
    assert sent < 64 << 20, sent


async def test_slow_requests_do_not_starve_the_others(tmp_path: Path) -> None:
    """120 requests the workload sits on; the next one is still proxied at once."""
    with trio.fail_after(60):
        async with agent_port(tmp_path) as env:
            answers: list[Answer] = []

            async def held() -> None:
                answers.append(await raw(env.port, head("GET /hold HTTP/1.1"), timeout=60))

            async with trio.open_nursery() as nursery:
                for _ in range(120):
                    nursery.start_soon(held)
                await eventually(lambda: env.workload.held == 120, timeout=30)
                answer = await raw(env.port, head("GET /fine HTTP/1.1"))
                assert (answer.status, answer.body) == (200, b"upstream-ok")
                env.workload.release.set()
            assert [a.status for a in answers] == [200] * 120


# --- slow clients (Trio time: the autojump clock skips the waiting) ---------------------


async def test_a_slow_request_head_is_cut_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = HttpLimits(header_timeout_s=2.0)  # Hypercorn's own default would be 5 s
    async with agent_port(tmp_path, limits) as env:
        async with await trio.open_tcp_stream("127.0.0.1", env.port) as stream:
            start = trio.current_time()
            with trio.fail_after(4):
                await stream.send_all(b"GET /x HTTP/1.1\r\nHost: agent\r\nX-Slow: ")
                data = await read_to_eof(stream)
            assert data == b""  # closed without a word
            assert trio.current_time() - start >= 2.0
        env.untouched()


async def _slow_body(port: int, declared: int, first: bytes,
                     drip: Callable[[], bytes] | None = None, every: float = 0.5) -> Answer:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head("POST /upload HTTP/1.1", f"Content-Length: {declared}")
                              + first)

        async def dripping() -> None:
            assert drip is not None
            try:
                while True:
                    await trio.sleep(every)
                    await stream.send_all(drip())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            if drip is not None:
                nursery.start_soon(dripping)
            data = await read_to_eof(stream)
            nursery.cancel_scope.cancel()
    return parse_answer(data)


async def test_a_stalled_request_body_is_cut_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = HttpLimits(body_idle_timeout_s=1.0, body_timeout_s=1000.0)
    async with agent_port(tmp_path, limits) as env:
        with trio.fail_after(10):  # the default idle timeout (30 s) would fail this
            answer = await _slow_body(env.port, declared=100, first=b"0123456789")
        assert (answer.status, answer.code) == (408, "body_timeout")
        assert env.workload.requests == []  # the workload never got a complete request
        assert env.elsewhere.connections == 0


async def test_a_dripping_request_body_is_cut_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = HttpLimits(body_idle_timeout_s=1.0, body_timeout_s=3.0)
    async with agent_port(tmp_path, limits) as env:
        start = trio.current_time()
        with trio.fail_after(20):  # one byte per 0.5 s never trips the idle timeout
            answer = await _slow_body(env.port, declared=10_000, first=b"x",
                                      drip=lambda: b"y", every=0.5)
        assert (answer.status, answer.code) == (408, "body_timeout")
        assert 3.0 <= trio.current_time() - start < 5.0
        assert env.workload.requests == []


# --- the pure checks, line by line -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "raw_path", "query", "expected"),
    [
        ("GET", b"/", b"", "/"),
        ("GET", b"/a/b", b"x=1&y=2", "/a/b?x=1&y=2"),
        ("POST", b"/@scope/pkg", b"", "/@scope/pkg"),
        ("GET", b"/a%2Fb/c%20d", b"q=%2F..%2F", "/a%2Fb/c%20d?q=%2F..%2F"),
        ("GET", b"/a|b^c[d]", b"e=[1]", "/a|b^c[d]?e=[1]"),
        ("GET", b"/.well-known/x", b"", "/.well-known/x"),
        ("GET", b"/a..b/...", b"", "/a..b/..."),
        ("DELETE", b"/x:y@z", b"", "/x:y@z"),
        ("OPTIONS", b"/", b"", "/"),
    ],
)
def test_origin_form_targets_pass(method: str, raw_path: bytes, query: bytes,
                                  expected: str) -> None:
    assert check_request_target(method, raw_path, query) == expected


@pytest.mark.parametrize(
    ("method", "raw_path", "query", "code"),
    [
        ("CONNECT", b"host:443", b"", "connect_refused"),
        ("connect", b"/x", b"", "connect_refused"),
        ("OPTIONS", b"*", b"", "asterisk_form"),
        ("GET", b"http://h/x", b"", "absolute_form"),
        ("GET", b"HTTPS://h:1/x", b"", "absolute_form"),
        ("GET", b"@h:1/x", b"", "userinfo_in_target"),
        ("GET", b"u:p@h/x", b"", "userinfo_in_target"),
        ("GET", b"h:8080", b"", "authority_form"),
        ("GET", b"", b"x=1", "not_origin_form"),
        ("GET", b"x/y", b"", "not_origin_form"),
        ("GET", b"//h/x", b"", "scheme_relative"),
        ("GET", b"/a\\b", b"", "backslash"),
        ("GET", b"/a", b"b=\\", "backslash"),
        ("GET", b"/a%5cb", b"", "backslash"),
        ("GET", b"/a#b", b"", "fragment"),
        ("GET", b"/a b", b"", "bad_character"),
        ("GET", b"/a<b>", b"", "bad_character"),
        ("GET", b"/a{b}", b"", "bad_character"),
        ("GET", b"/\xc3\xa9", b"", "bad_character"),
        ("GET", b"/a%g0", b"", "bad_percent_encoding"),
        ("GET", b"/a%4", b"", "bad_percent_encoding"),
        ("GET", b"/a", b"q=%", "bad_percent_encoding"),
        ("GET", b"/a%00", b"", "control_character"),
        ("GET", b"/a%0A", b"", "control_character"),
        ("GET", b"/a%7f", b"", "control_character"),
        ("GET", b"/a", b"q=%0d", "control_character"),
        ("GET", b"/..", b"", "dot_segment"),
        ("GET", b"/a/./b", b"", "dot_segment"),
        ("GET", b"/a/%2e%2e/b", b"", "dot_segment"),
        ("GET", b"/a/.%2E", b"", "dot_segment"),
        ("GET", b"/a%2F..%2Fb", b"", "dot_segment"),
        ("GET", b"/a%2f.", b"", "dot_segment"),
        ("GET", b"/" + b"a" * 8192, b"", "target_too_long"),
    ],
)
def test_other_targets_are_refused(method: str, raw_path: bytes, query: bytes,
                                   code: str) -> None:
    with pytest.raises(RequestRefused) as info:
        check_request_target(method, raw_path, query)
    assert info.value.code == code
    assert info.value.status == (414 if code == "target_too_long" else 400)


def test_httpx_sends_a_passed_target_unchanged() -> None:
    """What the check passes is exactly what reaches the workload (httpx re-encodes
    some characters and folds dot segments; none of those pass the check)."""
    allowed = "-._~!$&'()*+,;=:@/%41|^[]"
    for target in (f"/{allowed}?{allowed}?", "/a%2Fb/%2e.x", "/@evil:1/x?u=a@b:2"):
        checked = check_request_target("GET", *target.encode().split(b"?", 1))
        url = httpx.URL(scheme="http", host="10.1.2.3", port=8080, raw_path=checked.encode())
        assert (url.host, url.port, url.raw_path.decode()) == ("10.1.2.3", 8080, checked)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], "ambiguous_framing"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")], "ambiguous_framing"),
        ([(b"host", b"a"), (b"host", b"b")], "bad_host"),
        ([(b"host", b"a@b")], "bad_host"),
        ([(b"host", b"a/b")], "bad_host"),
        ([(b"host", b"a\\b")], "bad_host"),
        ([(b"host", b"a:b")], "bad_host"),
        ([(b"host", b"")], "bad_host"),
        ([(b"connection", b"close, authorization")], "connection_names_header"),
        ([(b"connection", b"keep-alive"), (b"connection", b"cookie")],
         "connection_names_header"),
        ([(b"connection", b"x-forwarded-for")], "connection_names_header"),
    ],
)
def test_bad_headers_are_refused(headers: list[tuple[bytes, bytes]], code: str) -> None:
    with pytest.raises(RequestRefused) as info:
        check_request_headers(headers)
    assert info.value.code == code


def test_good_headers_pass() -> None:
    for headers in (
        [(b"host", b"agent.example:8080"), (b"content-length", b"5")],
        [(b"host", b"[::1]:80"), (b"transfer-encoding", b"chunked")],
        [(b"host", b"10.0.0.1")],
        [(b"connection", b"keep-alive, Upgrade, TE"), (b"connection", b"close")],
        [],
    ):
        check_request_headers(headers)


def test_the_secret_is_found_wherever_it_hides() -> None:
    secret = "Zk3_-q" * 6
    assert carries_secret([(b"authorization", f"Bearer {secret}".encode())], "/", secret)
    assert carries_secret([(b"cookie", f"a=b; s={secret}".encode())], "/", secret)
    assert carries_secret([], f"/x?t={secret}&u=1", secret)
    assert not carries_secret([(b"authorization", f"Bearer {secret}x".encode())], "/", secret)
    assert not carries_secret([(b"authorization", f"Bearer {secret[:-1]}".encode())], "/",
                              secret)
    odd = "p@ss word with spaces!!"  # a hand-made secret outside the urlsafe alphabet
    assert carries_secret([(b"authorization", f"Bearer {odd}".encode())], "/", odd)
    assert carries_secret([(b"x-secret", f" {odd} ".encode())], "/", odd)
    # wrapped: percent-encoded in the target, or as Basic credentials
    encoded = "".join(f"%{ord(c):02X}" for c in secret)
    assert carries_secret([], f"/x?t={encoded}", secret)
    basic = base64.b64encode(f"admin:{secret}".encode()).decode()
    assert carries_secret([(b"authorization", f"Basic {basic}".encode())], "/", secret)
    assert not carries_secret([(b"authorization", b"Basic !!notbase64")], "/%zz", secret)


def test_forwarded_headers() -> None:
    incoming = [(b"host", b"app.example"), (b"connection", b"keep-alive, x-drop-me"),
                (b"x-drop-me", b"1"), (b"te", b"trailers"), (b"upgrade", b"websocket"),
                (b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-proto", b"https"),
                (b"X-Forwarded-Host", b"spoof"), (b"accept", b"*/*")]
    remote = upstream_headers(incoming, client="198.51.100.7", scheme="http",
                              loopback_peer=False)
    assert remote == [("host", "app.example"), ("accept", "*/*"),
                      ("X-Forwarded-For", "1.1.1.1, 198.51.100.7"),
                      ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "app.example")]
    tunnel = upstream_headers(incoming, client="127.0.0.1", scheme="http", loopback_peer=True)
    assert ("x-forwarded-proto", "https") in tunnel and ("X-Forwarded-Host", "spoof") in tunnel
    assert ("X-Forwarded-Proto", "http") not in tunnel

    answer = [("Connection", "close, X-Private"), ("X-Private", "1"), ("Keep-Alive", "5"),
              ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert response_headers(answer) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_token_bucket_arithmetic() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(10.0) == pytest.approx(0.5)
    assert bucket.take(10.25) == pytest.approx(0.25)  # half a token came back meanwhile
    assert bucket.take(10.5) == 0.0
    assert bucket.take(100.0) == 0.0  # refilled, but never past the burst
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0)


async def test_token_bucket_on_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=1.0, burst=5)
    granted = 0
    with trio.move_on_after(60):
        while True:
            wait = bucket.take(trio.current_time())
            if wait:
                await trio.sleep(wait)
            else:
                granted += 1
    assert 64 <= granted <= 66  # the burst, then one a second


def test_http_limits_validate() -> None:
    assert HttpLimits().attest_burst == 5 and HttpLimits().attest_rate_per_s == 1.0
    for bad in ({"header_timeout_s": 0}, {"body_timeout_s": -1}, {"attest_burst": 0}):
        with pytest.raises(ValueError):
            HttpLimits(**bad)  # type: ignore[arg-type]


async def test_one_noisy_client_does_not_starve_the_others(tmp_path: Path) -> None:
    """The attest rate limit is per client: one that keeps its bucket empty gets 429s,
    another verifier (here through the loopback tunnel, keyed on the X-Forwarded-For
    the tunnel appended) still gets quotes."""
    limits = HttpLimits(attest_burst=2, attest_rate_per_s=0.001)
    path = f"GET /.ee/health?attest=true&nonce={'ab' * 16} HTTP/1.1"
    noisy, verifier = "X-Forwarded-For: 203.0.113.5", "X-Forwarded-For: 10.0.0.1, 198.51.100.7"
    with trio.fail_after(60):
        async with agent_port(tmp_path, limits) as env:
            for _ in range(2):
                assert (await raw(env.port, head(path, noisy))).status == 200
            for _ in range(3):
                answer = await raw(env.port, head(path, noisy))
                assert (answer.status, answer.code) == (429, "rate_limited")
            answer = await raw(env.port, head(path, verifier))
            assert answer.status == 200, answer.body
            assert "quote" in json.loads(answer.body)["attestation"]


def test_client_keys() -> None:
    assert client_key("203.0.113.5") == "203.0.113.5"
    assert client_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == (
        "2001:db8:1:2::/64")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key(" 198.51.100.7") == "198.51.100.7"
    assert client_key("not-an-ip" * 20) == ("not-an-ip" * 20)[:64]


def test_client_rate_limit_per_client_global_ceiling_and_lru() -> None:
    limit = ClientRateLimit(rate=1.0, burst=2, global_rate=1.0, global_burst=3, max_clients=2)
    assert [limit.take("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert limit.take("a", 0.0) == pytest.approx(1.0)  # a's own bucket is empty
    assert limit.take("b", 0.0) == 0.0  # b is not affected ...
    assert limit.take("c", 0.0) == pytest.approx(1.0)  # ... but the global ceiling is hit
    assert len(limit) == 2  # "a" (least recently used) was evicted for "c"
    assert limit.take("b", 1.0) == 0.0  # the global bucket refilled one
    with pytest.raises(ValueError):
        ClientRateLimit(rate=1, burst=1, global_rate=0, global_burst=1)


async def test_client_rate_limit_on_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    """A noisy client asking as fast as it may for a minute, a polite one once a
    second: the polite one is never refused; the global ceiling holds for both."""
    # The global burst has room for the noisy client's burst and the polite one's first
    # ask: which of the two Trio runs first at t=0 is not fixed.
    limit = ClientRateLimit(rate=1.0, burst=5, global_rate=3.0, global_burst=8)
    granted = {"noisy": 0, "polite": 0}
    refused_polite = 0

    async def noisy() -> None:
        while True:
            wait = limit.take("noisy", trio.current_time())
            if wait:
                await trio.sleep(0.01)
            else:
                granted["noisy"] += 1

    async def polite() -> None:
        nonlocal refused_polite
        while True:
            if limit.take("polite", trio.current_time()):
                refused_polite += 1
            else:
                granted["polite"] += 1
            await trio.sleep(1.0)

    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(noisy)
            nursery.start_soon(polite)
    assert refused_polite == 0 and granted["polite"] >= 60
    assert 64 <= granted["noisy"] <= 66  # its burst, then one a second
