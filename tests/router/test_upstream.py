"""The router's h11 client to a stack (ee.router.upstream): connection reuse, streaming
both ways, and the one retry it allows (never for a request with a body)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import h11
import httpx
import pytest
import trio
from h11kit import Answer, Server, serving

from ee.router.server import Router
from ee.router.upstream import Upstream, UpstreamError


def ok(body: bytes = b'{"ok": true}') -> Answer:
    return 200, [("content-length", str(len(body)))], [body]


async def read(up: Upstream, method: bytes = b"GET", target: bytes = b"/x",
               body: list[bytes] | None = None, headers: list[tuple[bytes, bytes]] | None = None
               ) -> tuple[int, list[tuple[bytes, bool]]]:
    async def gen() -> AsyncIterator[bytes]:
        for chunk in body or []:
            yield chunk

    answer = await up.request(method, target, headers or [],
                              gen() if body is not None else None,
                              content_length=False)
    try:
        return answer.status_code, [c async for c in answer.chunks()]
    finally:
        await answer.aclose()


async def test_connections_are_reused_and_the_answer_ends_with_its_last_bytes() -> None:
    server = Server(lambda req, body: ok())
    with trio.fail_after(10):
        async with serving(server) as url:
            up = Upstream(url + "/prefix/")
            for _ in range(5):
                status, chunks = await read(up, target=up.target(b"/api/v2/x", b"a=1"))
                assert status == 200 and chunks == [(b'{"ok": true}', True)]
            assert up.opened == 1 and server.connections == 1
            assert {r[1] for r in server.requests} == {b"/prefix/api/v2/x?a=1"}
            assert server.requests[0][3][b"host"] == url.split("//")[1].encode()
            await up.aclose()


async def test_bodies_stream_both_ways() -> None:
    big = [bytes([i]) * 50_000 for i in range(8)]
    server = Server(lambda req, body: (200, [("transfer-encoding", "chunked")],
                                       big if req.method == b"GET" else [body]))
    with trio.fail_after(10):
        async with serving(server) as url:
            up = Upstream(url)
            status, chunks = await read(up)
            assert status == 200
            assert b"".join(c for c, _ in chunks) == b"".join(big)
            assert [last for _, last in chunks][-1] is True and len(chunks) > 1
            _, chunks = await read(up, b"POST", body=[b"abc", b"", b"def"])
            assert b"".join(c for c, _ in chunks) == b"abcdef"
            assert server.requests[-1][3][b"transfer-encoding"] == b"chunked"
            assert up.opened == 1
            await up.aclose()


async def test_a_connection_close_answer_is_never_pooled() -> None:
    server = Server(lambda req, body: (200, [("content-length", "2"), ("connection", "close")],
                                       [b"ok"]))
    with trio.fail_after(10):
        async with serving(server) as url:
            up = Upstream(url)
            for _ in range(3):
                assert (await read(up))[0] == 200
            assert up.opened == 3  # "Connection: close" is honoured, never pooled
            await up.aclose()


async def test_an_idle_connection_the_stack_closed_is_not_used() -> None:
    server = Server(lambda req, body: ok(), hang_up_after_answer=True)
    with trio.fail_after(10):
        async with serving(server) as url:
            up = Upstream(url)
            assert (await read(up))[0] == 200
            await trio.sleep(0.1)  # the close arrives
            # a write (never retried) finds a good connection: the dead one was seen
            assert (await read(up, b"POST", body=[b"once"]))[0] == 200
            assert up.opened == 2 and len(server.requests) == 2
            await up.aclose()


async def test_a_reused_connection_that_dies_is_retried_only_without_a_body() -> None:
    """The race a pool cannot avoid: the stack closes a kept-alive connection just as
    it is taken. A read is sent again on a new connection; a write never is (it may
    have been processed: a replay could apply it twice)."""
    drop = {"next": False}

    def answer(req: h11.Request, body: bytes) -> Answer | None:
        if drop["next"]:
            drop["next"] = False
            return None  # read the request, then close without a word
        return ok()

    server = Server(answer)
    with trio.fail_after(10):
        async with serving(server) as url:
            up = Upstream(url)
            assert (await read(up))[0] == 200
            drop["next"] = True
            assert (await read(up))[0] == 200  # retried on a new connection
            assert up.opened == 2 and [r[0] for r in server.requests] == [b"GET"] * 3
            drop["next"] = True
            with pytest.raises(UpstreamError):
                await read(up, b"POST", body=[b"pay once"])
            posts = [r for r in server.requests if r[0] == b"POST"]
            assert len(posts) == 1  # not replayed
            await up.aclose()


async def test_an_unreachable_stack_and_a_bad_header_are_upstream_errors() -> None:
    with trio.fail_after(10):
        up = Upstream("http://127.0.0.1:9")
        with pytest.raises(UpstreamError):
            await read(up)
        server = Server(lambda req, body: ok())
        async with serving(server) as url:
            up = Upstream(url)
            with pytest.raises(UpstreamError):
                await read(up, headers=[(b"x-bad", b"a\r\nInjected: 1")])
            assert server.requests == []
            await up.aclose()
    with pytest.raises(ValueError):
        Upstream("ftp://x")


async def test_an_answer_that_breaks_off_drops_the_caller_and_counts_as_a_5xx(
        tmp_path: Path) -> None:
    from test_paths import router_on

    server = Server(lambda req, body: (200, [("content-length", "100")], [b"only ten b"]),
                    hang_up_mid_answer=True)
    routers: list[Router] = []
    with trio.fail_after(30):
        async with serving(server) as upstream, \
                router_on(tmp_path, upstream, routers) as url:
            async with httpx.AsyncClient(base_url=url) as c:
                with pytest.raises(httpx.HTTPError):
                    await c.get("/api/v2/health")
            old = routers[0].counters["old"]
            assert (old.answers, old.errors_5xx) == (1, 1)


async def test_the_router_relays_each_chunk_as_it_comes(tmp_path: Path) -> None:
    """Streaming, not buffering: the caller has the first chunk of an answer while the
    stack still holds back the rest."""
    from test_paths import router_on

    rest = trio.Event()
    server = Server(lambda req, body: (200, [("transfer-encoding", "chunked")],
                                       [b"first;", b"second"]), after_first_chunk=rest)
    with trio.fail_after(30):
        async with serving(server) as upstream, router_on(tmp_path, upstream) as url, \
                httpx.AsyncClient(base_url=url) as c, \
                c.stream("GET", "/api/v2/events-like") as r:
            chunks = r.aiter_raw()
            assert await chunks.__anext__() == b"first;"
            rest.set()
            assert b"".join([c async for c in chunks]) == b"second"


async def test_requests_in_flight_are_capped_and_a_closed_answer_frees_its_slot() -> None:
    """``max_busy`` exchanges at once: the next waits, then fails like an unreachable
    stack (no connection opened for it); closing an answer, or a failed request, frees
    the slot."""
    server = Server(lambda req, body: ok())
    with trio.fail_after(10):
        async with serving(server) as url:
            up = Upstream(url, max_busy=2, connect_timeout_s=0.5)
            held = [await up.request(b"GET", b"/a", []), await up.request(b"GET", b"/b", [])]
            with pytest.raises(UpstreamError, match="2 requests already in flight"):
                await up.request(b"GET", b"/c", [])
            assert up.opened == 2
            for answer in held:
                assert [c async for c in answer.chunks()] == [(b'{"ok": true}', True)]
                await answer.aclose()
            for _ in range(3):  # the slots are back (and reused: no new connection)
                status, _ = await read(up)
                assert status == 200
            assert up.opened == 2
            dead = Upstream("http://127.0.0.1:9", max_busy=1, connect_timeout_s=0.5)
            for _ in range(2):  # a refused connection gives its slot back
                with pytest.raises(UpstreamError, match="cannot connect"):
                    await dead.request(b"GET", b"/", [])
            await up.aclose()
