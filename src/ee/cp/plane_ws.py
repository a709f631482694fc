"""The agent plane's websocket server: wsproto driven directly over the Trio stream.

Theory of operation. A CP holds one websocket per agent, 10,000 and more of them, and
nearly all of them are idle between heartbeats. trio-websocket gives each connection
a background reader task, a memory channel, a nursery, three events and a lock, and
keeps the handshake's HTTP parser for the connection's whole life. Here a connection
is one task, the one that serves it:

* ``serve`` accepts streams from Trio listeners and runs ``_connection`` per stream in
  the handler nursery: the opening handshake (HTTP/1.1 upgrade, parsed by wsproto's
  ``H11Handshake`` under ``connect_timeout``; a malformed request is answered with
  wsproto's 4xx and closed), then the plane's handler with a :class:`PlaneRequest`
  (``accept`` or ``reject``). After ``accept`` only the frame codec (wsproto's
  ``Connection``) is kept.
* :class:`PlaneSocket` has no reader task: ``get_message`` reads the stream itself,
  in the caller's task (the plane's connection task is the one reader), answers pings,
  completes close handshakes and returns the next whole message. Any task may send
  (``send_message``, under the socket's one lock, which callers may also hold to keep
  an order across an await: ``Session.send``).
* Limits: a message over ``max_message_size`` is refused with close 1009 while it is
  still arriving (never buffered whole); a protocol error (bad framing, bad UTF-8) is
  closed with the code wsproto names (1002, 1007); a peer that goes away is close 1006.
  Reads take at most ``RECEIVE_BYTES`` at a time.
* Closing (``aclose``): send a close frame, then wait up to ``CLOSE_WAIT_S`` for the
  peer's reply (read here, or by the reader if one is reading), then close the stream.
  Every later call raises ``ConnectionClosed`` with the reason.

The exceptions are trio-websocket's (``ConnectionClosed`` carrying a ``CloseReason``),
so code written against either reads the same. Exception boundary: anything the
handler (or this module) raises for one connection is given to ``on_fault`` and only
that stream is closed; nothing reaches the listener's nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import trio
import wsproto.utilities
from trio_websocket import CloseReason, ConnectionClosed
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake

log = logging.getLogger("ee.cp.plane_ws")

RECEIVE_BYTES: Final = 16 * 1024  # per read: a heartbeat is ~300 bytes
CLOSE_WAIT_S: Final = 2.0  # for the peer's close frame after ours
ABNORMAL: Final = 1006

_Broken = (trio.BrokenResourceError, trio.ClosedResourceError)


class PlaneSocket:
    """One accepted server-side websocket (see the module docstring)."""

    __slots__ = ("_closed", "_peer_closed", "_proto", "_reader", "_size", "_stream",
                 "max_message_size", "parts", "remote", "send_lock")

    def __init__(self, stream: trio.abc.Stream, proto: Connection, max_message_size: int,
                 remote: str) -> None:
        self._stream = stream
        self._proto = proto
        self.max_message_size = max_message_size
        self.remote = remote
        self.send_lock = trio.Lock()
        self._closed: CloseReason | None = None
        self._peer_closed: trio.Event | None = None  # made by aclose() while one reads
        self._reader: trio.lowlevel.Task | None = None  # the task that reads (one per socket)
        self.parts: list[str | bytes | bytearray] = []
        self._size = 0

    @property
    def closed(self) -> CloseReason | None:
        return self._closed

    # ---- sending ---------------------------------------------------------------------

    async def send_message(self, message: str | bytes) -> None:
        async with self.send_lock:
            await self.send_locked(message)

    async def send_locked(self, message: str | bytes) -> None:
        """Send with ``send_lock`` already held by the caller."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        event = TextMessage(data=message) if isinstance(message, str) else (
            BytesMessage(data=message))
        await self._write(self._encode(event))

    def _encode(self, event: Event) -> bytes:
        try:
            return self._proto.send(event)
        except wsproto.utilities.LocalProtocolError:  # the connection is closing
            self._lost()
            assert self._closed is not None
            raise ConnectionClosed(self._closed) from None

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (*_Broken, trio.BusyResourceError):
            self._lost()
            assert self._closed is not None
            raise ConnectionClosed(self._closed) from None

    async def _send_control(self, event: Event) -> None:
        """A pong or close frame, in order with the messages other tasks send."""
        async with self.send_lock:
            await self._write(self._encode(event))

    # ---- receiving -------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next whole message; ``ConnectionClosed`` once the connection is closed."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        self._reader = trio.lowlevel.current_task()
        while True:
            for event in self._proto.events():
                message = await self._on_event(event)
                if message is not None and self._closed is None:
                    return message  # (none after a close: they are dropped)
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except _Broken:
                data = b""
            if not data:
                self._lost()
                assert self._closed is not None
                raise ConnectionClosed(self._closed)
            try:
                self._proto.receive_data(bytes(data))
            except wsproto.utilities.LocalProtocolError:  # data after the close
                self._lost()

    async def _on_event(self, event: Event) -> str | bytes | None:
        if isinstance(event, TextMessage | BytesMessage):
            self._size += len(event.data)
            if self._size > self.max_message_size:
                self.parts.clear()
                await self._refuse(1009, f"message over {self.max_message_size} bytes")
                return None
            self.parts.append(event.data)
            if not event.message_finished:
                return None
            parts, self.parts, self._size = self.parts, [], 0
            if isinstance(event, TextMessage):
                return "".join(parts)  # type: ignore[arg-type]
            return b"".join(parts)  # type: ignore[arg-type]
        if isinstance(event, Ping):
            try:
                await self._send_control(event.response())
            except ConnectionClosed:
                pass
            return None
        if isinstance(event, CloseConnection):
            await self._on_close(event)
        return None  # pongs: we send no pings

    async def _on_close(self, event: CloseConnection) -> None:
        state = self._proto.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: reply, then close
            self._closed = self._closed or CloseReason(event.code, event.reason or None)
            try:
                await self._send_control(event.response())
            except ConnectionClosed:
                pass
        elif state is ConnectionState.OPEN:  # wsproto refused a frame (code 1002/1007)
            await self._refuse(event.code, event.reason or "protocol error")
            return
        # else: the reply to our close (CLOSED)
        self._closed = self._closed or CloseReason(event.code, event.reason or None)
        if self._peer_closed is not None:
            self._peer_closed.set()
        await trio.aclose_forcefully(self._stream)

    async def _refuse(self, code: int, reason: str) -> None:
        """Close on our side for something the peer sent; ``get_message`` then raises."""
        self._closed = self._closed or CloseReason(code, reason)
        if self._proto.state is ConnectionState.OPEN:
            try:
                await self._send_control(CloseConnection(code=code, reason=reason))
            except ConnectionClosed:
                pass
        await trio.aclose_forcefully(self._stream)

    def _lost(self) -> None:
        if self._closed is None:
            self._closed = CloseReason(ABNORMAL, None)
        if self._peer_closed is not None:
            self._peer_closed.set()

    # ---- closing ---------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with *code*: close frame, the peer's reply (bounded wait), stream closed."""
        if self._closed is not None:
            await trio.aclose_forcefully(self._stream)  # idempotent
            return
        self._closed = CloseReason(code, reason)
        try:
            if self._proto.state is ConnectionState.OPEN:
                try:
                    await self._send_control(CloseConnection(code=code, reason=reason))
                except ConnectionClosed:
                    return
                with trio.move_on_after(CLOSE_WAIT_S):
                    reader = self._reader
                    if reader is not None and reader is not trio.lowlevel.current_task():
                        # Another task reads (now or after what it is doing): it sees
                        # the reply and sets the event. Two readers would collide.
                        self._peer_closed = trio.Event()
                        await self._peer_closed.wait()
                    else:
                        await self._drain()
        finally:
            await trio.aclose_forcefully(self._stream)

    async def _drain(self) -> None:
        """Read (and drop) until the peer's close frame or the end of the stream."""
        while True:
            for _event in self._proto.events():
                pass
            if self._proto.state is ConnectionState.CLOSED:
                return
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (*_Broken, trio.BusyResourceError):
                return
            if not data:
                return
            try:
                self._proto.receive_data(bytes(data))
            except wsproto.utilities.LocalProtocolError:
                return


class PlaneRequest:
    """A websocket upgrade request, to accept or reject (the shape of trio-websocket's)."""

    __slots__ = ("_handshake", "_max_message_size", "_stream", "path", "remote",
                 "socket")

    def __init__(self, stream: trio.abc.Stream, handshake: H11Handshake, path: str,
                 remote: str, max_message_size: int) -> None:
        self._stream = stream
        self._handshake: H11Handshake | None = handshake  # dropped once answered
        self._max_message_size = max_message_size
        self.path = path
        self.remote = remote
        self.socket: PlaneSocket | None = None

    def _answer(self) -> H11Handshake:
        handshake, self._handshake = self._handshake, None
        if handshake is None:
            raise RuntimeError("the request was already answered")
        return handshake

    async def accept(self) -> PlaneSocket:
        handshake = self._answer()
        data = handshake.send(AcceptConnection())
        proto = handshake.connection
        assert proto is not None
        self.socket = PlaneSocket(self._stream, proto, self._max_message_size, self.remote)
        await self.socket._write(data)
        return self.socket

    async def reject(self, status: int, *, body: bytes | None = None,
                     extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        handshake = self._answer()
        headers = [*extra_headers]
        if body:
            headers.append((b"Content-Length", str(len(body)).encode()))
        data = handshake.send(RejectConnection(status_code=status, headers=headers,
                                               has_body=bool(body)))
        if body:
            data += handshake.send(RejectData(data=body))
        try:
            await self._stream.send_all(data)
        except _Broken:
            pass
        await trio.aclose_forcefully(self._stream)


Handler = Callable[[PlaneRequest], Awaitable[None]]


def _remote(stream: trio.abc.Stream) -> str:
    sock: Any = getattr(stream, "socket", None)
    if sock is None:  # an SSLStream: the socket is one level down
        sock = getattr(getattr(stream, "transport_stream", None), "socket", None)
    try:
        host, port = sock.getpeername()[:2]
    except (AttributeError, OSError, ValueError, TypeError):
        return "-"
    return f"{host}:{port}"


async def _read_request(stream: trio.abc.Stream, handshake: H11Handshake) -> Request | None:
    """The upgrade request; None when the peer left or sent a bad one (answered)."""
    while True:
        for event in handshake.events():
            if isinstance(event, Request):
                return event
        try:
            data = await stream.receive_some(RECEIVE_BYTES)
        except _Broken:
            return None
        if not data:
            return None
        try:
            handshake.receive_data(bytes(data))
        except wsproto.utilities.RemoteProtocolError as exc:
            if exc.event_hint is not None:
                try:
                    await stream.send_all(handshake.send(exc.event_hint))
                except (*_Broken, wsproto.utilities.LocalProtocolError):
                    pass
            return None


async def serve_connection(stream: trio.abc.Stream, handler: Handler, *,
                           max_message_size: int, connect_timeout: float,
                           disconnect_timeout: float) -> None:
    """One connection: handshake (bounded), the handler, then the close (bounded)."""
    request: PlaneRequest | None = None
    try:
        with trio.move_on_after(connect_timeout):
            handshake = H11Handshake(ConnectionType.SERVER)
            event = await _read_request(stream, handshake)
            if event is not None:
                request = PlaneRequest(stream, handshake, event.target, _remote(stream),
                                       max_message_size)
        if request is None:
            return
        del handshake, event
        await handler(request)
        if request.socket is not None:
            with trio.move_on_after(disconnect_timeout):
                await request.socket.aclose()
    finally:
        await trio.aclose_forcefully(stream)


async def serve(handler: Handler, listeners: Sequence[trio.abc.Listener[Any]],
                *, handler_nursery: trio.Nursery, max_message_size: int,
                connect_timeout: float, disconnect_timeout: float,
                on_fault: Callable[[BaseException], None],
                task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] =
                trio.TASK_STATUS_IGNORED) -> None:
    """Serve *listeners* forever; each connection under its own exception boundary."""

    async def guarded(stream: trio.abc.Stream) -> None:
        try:
            await serve_connection(stream, handler, max_message_size=max_message_size,
                                   connect_timeout=connect_timeout,
                                   disconnect_timeout=disconnect_timeout)
        except Exception as exc:
            on_fault(exc)
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(guarded, list(listeners), handler_nursery=handler_nursery,
                               task_status=task_status)


__all__ = ["CLOSE_WAIT_S", "PlaneRequest", "PlaneSocket", "serve", "serve_connection"]
