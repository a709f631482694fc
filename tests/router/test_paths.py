"""The router forwards exactly the path it classified, or refuses it (400 ``bad_path``);
hostile framing and admin bodies get a 400, never a 500.

The upstream here is a raw HTTP/1.1 listener that records each request target it
receives, so a test sees the path the stack would see; the client side is a raw socket,
so the path reaches the router unnormalised (httpx would resolve ``..`` itself)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from h11kit import Server, serving
from routerkit import ADMIN, config_doc

from ee.router.decision import RolloutConfig, path_refusal
from ee.router.server import Router, RouterSettings

BAD_PATHS = ("/api/v2/admin/../apps", "//_ee/router/config", "/api/v2/apps/../admin/x",
             "/api/v2/%61dmin/x", "/api/v2/admin%2Fx", "/api/v2/admin%2fx", "/api/v2/./apps",
             "/api/v2/apps/%2e%2e/admin", "/api/v2//admin/tree", "/api/v2/apps\\..\\admin",
             "/api/v2/apps/%zz", "/api/v2/apps/.")
GOOD_PATHS = ("/api/v2/apps", "/api/v2/apps/a%20b", "/api/v2/apps/..x/.y", "/.well-known/x")


@asynccontextmanager
async def recording_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    body = b'{"ok": true}'
    server = Server(lambda req, _: (200, [("content-length", str(len(body))),
                                          ("connection", "close")], [body]))
    async with serving(server) as url:
        yield url, server.targets


@asynccontextmanager
async def router_on(tmp: Path, upstream: str, routers: list[Router] | None = None
                    ) -> AsyncIterator[str]:
    """An ee-router with *upstream* as both stacks (appended to *routers*)."""
    path = tmp / "rollout.json"
    path.write_text(json.dumps(config_doc()))
    settings = RouterSettings(listen="127.0.0.1:0", old=upstream, new=upstream,
                              config_path=path, admin_token=ADMIN, guard_interval_s=0)
    router = Router(settings, RolloutConfig())
    if routers is not None:
        routers.append(router)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(router.run, shutdown)
        try:
            yield bound[0]
        finally:
            shutdown.set()


async def raw_request(url: str, head: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[-1]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_path_refusal_names_each_bad_path(path: str) -> None:
    assert path_refusal(path) is not None


async def check_paths(url: str, seen: list[bytes]) -> None:
    """Every bad path refused 400 ``bad_path`` (nothing reaches the upstream); every good
    one forwarded byte for byte (duplicates ignored: workerd may retry a fetch)."""
    for path in BAD_PATHS:
        for method in ("GET", "POST"):
            status, body = await raw_request(url, (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n").encode())
            assert status == 400, (path, body)
            assert json.loads(body)["error"]["code"] == "bad_path"
    assert seen == []
    for path in GOOD_PATHS:
        status, body = await raw_request(url, (
            f"GET {path}?q=%2e%2e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ).encode())
        assert status == 200, (path, body)
    assert list(dict.fromkeys(seen)) == [f"{p}?q=%2e%2e".encode() for p in GOOD_PATHS]


async def test_a_path_is_forwarded_verbatim_or_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with recording_upstream() as (upstream, seen), \
                router_on(tmp_path, upstream) as url:
            await check_paths(url, seen)


async def test_both_length_headers_get_a_400_and_reach_no_stack(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with recording_upstream() as (upstream, seen), \
                router_on(tmp_path, upstream) as url:
            status, body = await raw_request(url, (
                b"POST /api/v2/apps HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
            assert status == 400, body
            assert json.loads(body)["error"]["code"] == "bad_request"
            assert seen == []


async def test_an_unreachable_stack_is_a_502(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with router_on(tmp_path, "http://127.0.0.1:9") as url, \
                httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/api/v2/apps", content=b"{}")
            assert r.status_code == 502
            assert r.json()["error"]["code"] == "upstream_unavailable"


async def test_decide_refuses_bad_bodies_with_400(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with router_on(tmp_path, "http://127.0.0.1:9") as url, \
                httpx.AsyncClient(base_url=url,
                                  headers={"Authorization": f"Bearer {ADMIN}"}) as c:
            for body in (b"not json", b'[["A", "\\ud800"]]', b"\xff\xfe", b'{"a": 1}'):
                r = await c.post("/_ee/router/decide", content=body)
                assert r.status_code == 400, (body, r.text)
                assert r.json()["error"]["code"] == "bad_request"
            r = await c.post("/_ee/router/decide", json=[["A", "account:x"]])
            assert r.status_code == 200


async def test_a_websocket_on_a_bad_path_is_refused_before_any_stack(tmp_path: Path) -> None:
    import trio_websocket

    with trio.fail_after(30):
        async with recording_upstream() as (upstream, seen), \
                router_on(tmp_path, upstream) as url:
            ws = url.replace("http://", "ws://")
            with pytest.raises(trio_websocket.HandshakeError):
                async with trio_websocket.open_websocket_url(
                        ws + "/api/v2/agents/../federation/connect", connect_timeout=5):
                    pass
            assert seen == []


async def test_header_lines_pass_as_they_came_but_a_cohort_header_comes_once(
        tmp_path: Path) -> None:
    """Repeated header lines reach the stack all of them, in order; a repeated header
    the cohort is read from (Authorization, X-EE-Agent, X-EE-DC) is a 400 that reaches
    no stack: the router would route by one value and the stack might act on another."""
    body = b'{"ok": true}'
    server = Server(lambda req, _: (200, [("content-length", str(len(body)))], [body]))
    with trio.fail_after(30):
        async with serving(server) as upstream, router_on(tmp_path, upstream) as url:
            for name in ("Authorization", "X-EE-Agent", "X-EE-DC"):
                status, answer = await raw_request(url, (
                    f"GET /api/v2/apps HTTP/1.1\r\nHost: x\r\n{name}: Bearer a\r\n"
                    f"{name}: Bearer b\r\nConnection: close\r\n\r\n").encode())
                assert status == 400, answer
                assert json.loads(answer)["error"]["code"] == "bad_request"
            assert server.targets == []
            status, _ = await raw_request(url, (
                b"GET /api/v2/health HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\n"
                b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n"
                b"Connection: close\r\n\r\n"))
            assert status == 200
            [head] = server.heads
            assert [v for k, v in head if k == b"cookie"] == [b"a=1", b"b=2"]
            assert [v for k, v in head if k == b"x-forwarded-for"] == [
                b"10.0.0.1, 10.0.0.2, 127.0.0.1"]
            assert [v for k, v in head if k == b"host"] == [upstream.split("//")[1].encode()]
