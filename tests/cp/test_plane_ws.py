"""The agent plane's own websocket layer (``ee.cp.plane_ws``) against hostile peers.

Each test serves a tiny handler on a real loopback listener and talks to it with
trio-websocket (the agents' client) or raw TCP; the layer must refuse what it must
(oversized messages, bad UTF-8, bad HTTP, silence) with the right close, keep one
connection's fault to that connection, and keep serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_websocket

from ee.cp import plane_ws
from ee.cp.plane_ws import PlaneRequest

LIMIT = 4096


class Echo:
    """Echoes every message; records how each connection ended."""

    def __init__(self) -> None:
        self.ended: list[int | None] = []
        self.faults: list[BaseException] = []
        self.largest = 0
        self.sockets: list[plane_ws.PlaneSocket] = []

    async def handle(self, request: PlaneRequest) -> None:
        if request.path != "/ws":
            await request.reject(404, body=b"nothing here")
            return
        if request.remote == "-":
            raise AssertionError("the peer's address is unknown")
        ws = await request.accept()
        self.sockets.append(ws)
        try:
            while True:
                message = await ws.get_message()
                self.largest = max(self.largest, len(message))
                if message == "boom":
                    raise RuntimeError("a bug in the handler")
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            self.ended.append(exc.reason.code if exc.reason else None)


@asynccontextmanager
async def serving(echo: Echo, connect_timeout: float = 5) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(lambda task_status: plane_ws.serve(
            echo.handle, listeners, handler_nursery=nursery, max_message_size=LIMIT,
            connect_timeout=connect_timeout, disconnect_timeout=2,
            on_fault=echo.faults.append, task_status=task_status))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def connect(port: int) -> Any:
    return trio_websocket.open_websocket("127.0.0.1", port, "/ws", use_ssl=False)


async def still_serving(port: int) -> None:
    async with connect(port) as ws:
        await ws.send_message("still here")
        assert await ws.get_message() == "still here"


async def test_messages_pings_and_a_normal_close() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo) as port:
            async with connect(port) as ws:
                for message in ("hello", b"\x00\x01bytes", "x" * LIMIT):
                    await ws.send_message(message)
                    assert await ws.get_message() == message
                await ws.ping(b"are you there")  # returns once the pong came back
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert echo.ended == [1000] and echo.faults == []


async def test_an_oversized_message_is_closed_1009_before_it_is_buffered() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo) as port:
            async with connect(port) as ws:
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.send_message("y" * (LIMIT * 64))
                    await ws.get_message()
                assert closed.value.reason.code == 1009
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert echo.largest == 0  # the handler never saw any of it
            assert echo.ended == [1009]
            await still_serving(port)


async def test_bad_utf8_is_closed_1007() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            answer = await stream.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 101")
            # A masked text frame whose payload is not UTF-8.
            payload = b"\xff\xfe"
            mask = b"\x01\x02\x03\x04"
            await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(
                b ^ mask[i % 4] for i, b in enumerate(payload)))
            reply = await stream.receive_some(4096)
            assert reply[0] == 0x88 and int.from_bytes(reply[2:4], "big") == 1007
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert echo.ended == [1007] and echo.faults == []
            await still_serving(port)


async def test_bad_http_and_wrong_paths_are_answered_not_crashed() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo) as port:
            for request in (b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n",
                            b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade
                            b"\x16\x03\x01 not http at all\r\n\r\n",
                            b"GET /ws HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n"):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    await stream.send_all(request)
                except trio.BrokenResourceError:
                    pass  # refused while we were still sending: fine
                answer = b""
                try:
                    while chunk := await stream.receive_some(4096):
                        answer += chunk
                except trio.BrokenResourceError:
                    pass
                assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:80]
                await stream.aclose()
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket("127.0.0.1", port, "/elsewhere",
                                                         use_ssl=False):
                    pass
            assert rejected.value.status_code == 404
            assert echo.faults == []
            await still_serving(port)


async def test_a_silent_peer_is_dropped_after_the_connect_timeout() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo, connect_timeout=0.5) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /ws HTTP/1.1\r\n")  # and then nothing
            assert await stream.receive_some(4096) == b""  # closed by the server
            await stream.aclose()
            await still_serving(port)


async def test_a_handler_fault_ends_only_its_connection() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo) as port:
            async with connect(port) as bystander:
                for _ in range(3):
                    with pytest.raises(trio_websocket.ConnectionClosed):
                        async with connect(port) as ws:
                            await ws.send_message("boom")
                            await ws.get_message()
                await bystander.send_message("ok")
                assert await bystander.get_message() == "ok"
            assert [type(f) for f in echo.faults] == [RuntimeError] * 3


async def test_a_close_from_another_task_reaches_the_peer_with_its_code() -> None:
    echo = Echo()
    with trio.fail_after(20):
        async with serving(echo) as port:
            async with connect(port) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                server_side = echo.sockets[0]
                await server_side.aclose(1001, "gone quiet")  # the reader is reading
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await server_side.send_message("after the close")
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert echo.ended == [1001]
