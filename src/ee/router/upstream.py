"""The router's HTTP/1.1 client to one CP stack: h11 over a LIFO pool of connections.

Why not httpx here: profiled at 32 requests in flight, half of the router's CPU went
to httpx/httpcore, and a third of it to one thing: each request scans every pooled
connection (``is_idle``/``has_expired``, one ``poll`` syscall per idle connection).
This client does the least a relay needs. Theory of operation:

* A request takes the most recently used idle connection (LIFO: the warm one, and the
  others age out), or opens one. Before reuse an idle connection is checked once: not
  idle longer than ``idle_s`` (below the stacks' keep-alive timeout, Hypercorn's
  default is 5 s), and its socket not readable (readable while idle = the peer closed
  it, or sent junk); otherwise it is closed and the next one is tried.
* The request is sent with the caller's headers (already without hop-by-hop ones) plus
  ``Host``; a body without ``Content-Length`` goes chunked. The body streams chunk by
  chunk; so does the answer (``Response.chunks``, each with whether it is the last, so
  the caller can finish the answer in the same message as its last bytes).
* When both sides of the exchange are ``DONE`` the connection goes back to the pool
  (at most ``max_idle``); anything else (an error, a cancelled or unfinished
  exchange, ``Connection: close``) closes it.
* A request without a body that fails on a *reused* connection before any byte of the
  answer arrived is sent once more on a new connection: the peer closed the idle one
  as we took it (nothing was processed). A request with a body is never replayed.
* At most ``max_busy`` exchanges are in flight per stack (a slot is held from the
  request until its ``Response`` is closed): a flood of clients cannot open unbounded
  connections to a CP through the router. A request that finds no free slot within
  ``connect_timeout_s`` fails like an unreachable stack.
* ``UpstreamError`` is every failure to reach the stack or read its answer; the
  router maps it to 502 (before the answer started) or a dropped connection (after).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import urlsplit

import attrs
import h11
import trio

READ_BYTES: Final = 65536


class UpstreamError(Exception):
    """The stack could not be reached, or its answer broke off."""


@attrs.define(eq=False)
class _Conn:
    stream: trio.abc.Stream
    h11: h11.Connection
    idle_since: float = 0.0

    def readable(self) -> bool:
        """True when the peer has something to say while idle (normally: EOF)."""
        sock = getattr(getattr(self.stream, "transport_stream", self.stream), "socket", None)
        if sock is None:
            return False
        return bool(sock.is_readable())

    def close_now(self) -> None:
        """Close the socket at once (no TLS close_notify: the exchange is over or
        broken, and a peer must cope with a plain close)."""
        sock = getattr(getattr(self.stream, "transport_stream", self.stream), "socket", None)
        if sock is not None:
            sock.close()


class Response:
    """An answer being read. Read it through ``chunks`` and ``aclose`` it (which
    returns the connection to the pool when the exchange completed)."""

    def __init__(self, pool: Upstream, conn: _Conn, head: h11.Response,
                 pending: list[h11.Event]) -> None:
        self.pool = pool
        self.status_code = head.status_code
        self.headers = head.headers  # lower-case names (h11), raw values
        self._conn: _Conn | None = conn
        self._pending = pending

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return bytes(v)
        return None

    async def chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """``(bytes, last)`` until the answer is complete (an empty body: one
        ``(b"", True)``)."""
        conn = self._conn
        assert conn is not None
        data: bytes | None = None
        while True:
            event = await self.pool._next_event(conn, self._pending)
            if isinstance(event, h11.Data):
                if data is not None:
                    yield data, False
                data = bytes(event.data)
                if not self._pending and conn.h11.their_state is h11.SEND_BODY:
                    # nothing more buffered: do not hold these bytes back for the next
                    try:
                        peek = conn.h11.next_event()
                    except h11.RemoteProtocolError as exc:
                        raise UpstreamError(f"the stack's answer: {exc}") from None
                    if peek is h11.NEED_DATA:
                        yield data, False
                        data = None
                    else:
                        self._pending.append(peek)  # type: ignore[arg-type]
            elif isinstance(event, h11.EndOfMessage):
                yield (data or b""), True
                return

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self.pool._busy.release()
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            self.pool._release(conn)
        else:
            conn.close_now()


class Upstream:
    def __init__(self, base: str, *, max_idle: int = 200, max_busy: int = 1000,
                 idle_s: float = 4.0, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 120.0) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an http(s) URL, not {base!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1].encode("ascii")
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: list[_Conn] = []
        self.max_busy = max_busy
        self._busy = trio.Semaphore(max_busy)  # one slot per exchange in flight
        self.opened = 0  # connections opened so far (tests, the benchmark)

    def target(self, raw_path: bytes, query: bytes) -> bytes:
        return self.prefix + raw_path + (b"?" + query if query else b"")

    async def request(self, method: bytes, target: bytes,
                      headers: list[tuple[bytes, bytes]],
                      body: AsyncIterator[bytes] | None = None,
                      content_length: bool = False) -> Response:
        """Send a request and read the head of its answer. *content_length*: *headers*
        carry one (else a body is sent chunked)."""
        head = [(b"host", self.host_header), *headers]
        if body is not None and not content_length:
            head.append((b"transfer-encoding", b"chunked"))
        try:
            request = h11.Request(method=method, target=target, headers=head)
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"cannot send the request: {exc}") from None
        with trio.move_on_after(self.connect_timeout_s) as waited:
            await self._busy.acquire()
        if waited.cancelled_caught:
            raise UpstreamError(f"{self.max_busy} requests already in flight "
                                "to the stack")
        try:
            for attempt in (0, 1):
                conn, reused = await self._take(fresh=attempt > 0)
                try:
                    return await self._exchange(conn, request, body)  # holds the slot
                except _Stale:
                    conn.close_now()
                    if not reused or body is not None or attempt:
                        raise UpstreamError(
                            "the connection closed before any answer") from None
                except BaseException:
                    conn.close_now()
                    raise
            raise AssertionError("unreachable")
        except BaseException:
            self._busy.release()
            raise

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close_now()
        await trio.lowlevel.checkpoint()

    # ---- inside ----------------------------------------------------------------------

    async def _take(self, fresh: bool) -> tuple[_Conn, bool]:
        now = trio.current_time()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if now - conn.idle_since < self.idle_s and not conn.readable():
                return conn, True
            conn.close_now()
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
                if self.ssl is not None:
                    tls = trio.SSLStream(stream, self.ssl, server_hostname=self.host)
                    await tls.do_handshake()
                    stream = tls
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self.opened += 1
        return _Conn(stream, h11.Connection(h11.CLIENT)), False

    async def _exchange(self, conn: _Conn, request: h11.Request,
                        body: AsyncIterator[bytes] | None) -> Response:
        await self._send(conn, request, stale_ok=True)
        if body is not None:
            async for chunk in body:
                await self._send(conn, h11.Data(data=chunk))
        await self._send(conn, h11.EndOfMessage())
        pending: list[h11.Event] = []
        first = True
        while True:
            event = await self._next_event(conn, pending, stale_ok=first)
            first = False
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return Response(self, conn, event, pending)
            raise UpstreamError(f"unexpected {type(event).__name__} before the answer")

    async def _send(self, conn: _Conn, event: h11.Event, stale_ok: bool = False) -> None:
        try:
            data = conn.h11.send(event)
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"cannot send the request: {exc}") from None
        if not data:
            return
        try:
            await conn.stream.send_all(data)
        except (OSError, trio.BrokenResourceError) as exc:
            if stale_ok:
                raise _Stale() from None
            raise UpstreamError(f"sending to the stack: {exc}") from None

    async def _next_event(self, conn: _Conn, pending: list[h11.Event],
                          stale_ok: bool = False) -> h11.Event:
        if pending:
            return pending.pop(0)
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(f"the stack's answer: {exc}") from None
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamError("the stack closed the connection mid-answer")
                return event  # type: ignore[return-value]
            try:
                with trio.fail_after(self.read_timeout_s):
                    data = await conn.stream.receive_some(READ_BYTES)
            except (OSError, trio.BrokenResourceError) as exc:
                if stale_ok:
                    raise _Stale() from None
                raise UpstreamError(f"reading from the stack: {exc}") from None
            except trio.TooSlowError:
                raise UpstreamError(f"no answer within {self.read_timeout_s:g} s") from None
            if not data and stale_ok:
                raise _Stale()
            stale_ok = False  # some of the answer came: never replayed from here on
            try:
                conn.h11.receive_data(bytes(data))
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(f"the stack's answer: {exc}") from None

    def _release(self, conn: _Conn) -> None:
        try:
            conn.h11.start_next_cycle()
        except h11.LocalProtocolError:
            conn.close_now()
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        if len(self._idle) > self.max_idle:
            self._idle.pop(0).close_now()


class _Stale(Exception):
    """A reused connection turned out closed before any of the answer arrived."""
