"""A scripted HTTP/1.1 server on h11 for the router's tests: what a stack receives
(method, target, body, headers) and what it answers, connection by connection."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import trio
import trio.lowlevel

Answer = tuple[int, list[tuple[str, str]], list[bytes]]


@attrs.define
class Server:
    """A scripted HTTP/1.1 server: ``answer(request, body)`` gives (status, headers,
    body chunks) or None to close the connection without answering."""

    answer: Callable[[h11.Request, bytes], Answer | None]
    targets: list[bytes] = attrs.field(factory=list)  # as they arrive
    heads: list[list[tuple[bytes, bytes]]] = attrs.field(factory=list)  # header lines
    requests: list[tuple[bytes, bytes, bytes, dict[bytes, bytes]]] = attrs.field(factory=list)
    connections: int = 0
    hang_up_after_answer: bool = False  # as a keep-alive timeout would, silently
    hang_up_mid_answer: bool = False  # after the chunks, before the answer is complete
    after_first_chunk: trio.Event | None = None  # the rest of the answer waits for it

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                    self.targets.append(bytes(event.target))
                    self.heads.append([(bytes(k), bytes(v)) for k, v in event.headers])
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    self.requests.append((request.method, request.target, bytes(body),
                                          dict(request.headers)))
                    answer = self.answer(request, bytes(body))
                    if answer is None:
                        return
                    status, headers, chunks = answer
                    await stream.send_all(conn.send(h11.Response(
                        status_code=status, headers=headers)) or b"")
                    for i, chunk in enumerate(chunks):
                        await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                        await trio.lowlevel.checkpoint()
                        if i == 0 and self.after_first_chunk is not None:
                            await self.after_first_chunk.wait()
                    if self.hang_up_mid_answer:
                        return
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    if conn.our_state is h11.MUST_CLOSE or self.hang_up_after_answer:
                        return
                    conn.start_next_cycle()


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()
