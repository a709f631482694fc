"""HTTP hygiene of the CP's listener, over raw sockets: credentials are checked on the
headers before any body byte is read, refusals close the connection (and it really
closes: no kept-alive hang), strangers' bodies are capped small, 405 carries ``Allow``,
query enums and request bodies are validated, errors keep their one shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from cpkit import RunningCp, running_cp

from ee.cp import http as cp_http
from ee.cp.http import ANONYMOUS_BODY_BYTES

BIG = 100 << 20  # over the CP's 64 MiB max_request_bytes
UNDER_CAP = 32 << 20  # under it: a server that read bodies first would wait for it
SOCKET_SLACK = 24 << 20  # what kernel buffers on both ends can swallow, at most


@attrs.frozen
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class RawConnection:
    """One TCP connection to the CP, driven byte by byte."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buffer += chunk
        return bool(chunk)

    async def response(self) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                raise AssertionError(f"connection closed before a response: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self._fill():
                raise AssertionError("connection closed inside a response body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self) -> bool:
        """True once the server closed the connection (EOF or reset), reading what is left."""
        try:
            while await self._fill():
                pass
        except trio.BrokenResourceError:
            pass
        return True

    async def stream_body(self, total: int) -> int:
        """Send up to *total* body bytes; how many went out before the server hung up."""
        chunk = b"x" * (1 << 20)
        sent = 0
        try:
            while sent < total:
                await self.stream.send_all(chunk[: total - sent])
                sent += min(len(chunk), total - sent)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return sent


@asynccontextmanager
async def raw(env: RunningCp) -> AsyncIterator[RawConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", env.cp.http_port or 0)
    try:
        yield RawConnection(stream)
    finally:
        await stream.aclose()


def head(method: str, path: str, *, length: int | None = None, token: str | None = None,
         extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: cp", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def assert_error(r: RawResponse, status: int, code: str) -> dict[str, Any]:
    import json

    assert r.status == status, (r.status, r.body)
    error: dict[str, Any] = json.loads(r.body)["error"]
    assert error["code"] == code and error["message"] and isinstance(error["details"], dict)
    return error


async def tenant_and_provisioner_keys(env: RunningCp) -> tuple[str, str]:
    async with env.client() as admin:
        tenant = (await admin.post("/api/v2/accounts", json={"name": "t"})).json()["api_key"]
        prov = (await admin.post("/api/v2/accounts",
                                 json={"name": "p", "kind": "provisioner"})).json()["api_key"]
    return tenant, prov


# --- credentials before bodies ----------------------------------------------------------

REFUSALS = [
    # (route, whose token, status, code)
    ("POST /api/v2/apps", None, 401, "unauthenticated"),
    ("POST /api/v2/apps", "ee_k0123456789abcdef_nope", 401, "unauthenticated"),
    ("POST /api/v2/apps", "garbage", 401, "unauthenticated"),
    ("POST /api/v2/admin/crash", "tenant", 403, "forbidden"),
    ("POST /api/v2/admin/crash", "not-the-admin-token", 403, "forbidden"),
    ("PUT /api/v2/capacity/pools/local:dev/tiny", "provisioner", 403, "forbidden"),
    ("POST /api/v2/capacity/launch-orders/claim", "tenant", 403, "forbidden"),
    ("POST /api/v2/capacity/launch-orders/claim", "admin", 403, "forbidden"),
]


@pytest.mark.parametrize("length", [BIG, UNDER_CAP], ids=["100MiB", "32MiB"])
@pytest.mark.parametrize(("route", "who", "status", "code"), REFUSALS)
async def test_refused_on_headers_before_any_body_byte(
    tmp_path: Path, route: str, who: str | None, status: int, code: str, length: int
) -> None:
    method, path = route.split(" ", 1)
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            tenant, prov = await tenant_and_provisioner_keys(env)
            token = {"tenant": tenant, "provisioner": prov, "admin": env.token}.get(who or "", who)
            async with raw(env) as conn:
                # Headers only: the answer comes although not one body byte was sent.
                await conn.send(head(method, path, length=length, token=token))
                r = await conn.response()
                assert_error(r, status, code)
                assert r.headers.get("connection") == "close"
                # The server hangs up instead of reading the body: of 100/32 MiB only
                # what the kernel buffers hold goes out before the connection breaks.
                sent = await conn.stream_body(length)
                assert await conn.closed_by_server()
                assert sent < min(length, SOCKET_SLACK), sent


async def test_a_tenant_route_refuses_other_kinds_on_headers(tmp_path: Path) -> None:
    # tenants.py's routes are not marked yet: mark one here as they would be.
    from quart import Response

    from ee.cp.errors import Who, guard

    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:

            @env.cp.app.post("/api/v2/test/tenant-only")
            @guard(Who.TENANT)
            async def tenant_only() -> Response:
                return Response(b"{}", content_type="application/json")

            tenant, prov = await tenant_and_provisioner_keys(env)
            for token, status in ((prov, 403), (env.token, 403), ("bad", 401)):
                async with raw(env) as conn:
                    await conn.send(head("POST", "/api/v2/test/tenant-only", length=UNDER_CAP,
                                         token=token))
                    r = await conn.response()
                    assert r.status == status and r.headers.get("connection") == "close"
            async with raw(env) as conn:
                await conn.send(head("POST", "/api/v2/test/tenant-only", length=2, token=tenant)
                                + b"{}")
                assert (await conn.response()).status == 200


async def test_an_accepted_caller_still_gets_the_body_read(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            tenant, _ = await tenant_and_provisioner_keys(env)
            body = b'{"name": "split-body"}'
            async with raw(env) as conn:
                await conn.send(head("POST", "/api/v2/apps", length=len(body), token=tenant))
                await trio.sleep(0.2)  # the body comes later, in its own segment
                await conn.send(body)
                r = await conn.response()
                assert r.status == 201, r.body
                # ... and the connection stays usable (kept alive).
                await conn.send(head("GET", "/api/v2/apps", token=tenant))
                assert (await conn.response()).status == 200


# --- kept-alive clients after a refusal --------------------------------------------------

async def test_a_kept_alive_client_after_a_refusal_does_not_hang(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            async with raw(env) as conn:
                # A refused POST whose body never comes; then the client, ignoring the
                # "Connection: close", sends its next request on the same connection.
                await conn.send(head("POST", "/api/v2/apps", length=64, token="bad"))
                r = await conn.response()
                assert r.status == 401 and r.headers.get("connection") == "close"
                try:
                    await conn.send(head("GET", "/api/v2/health"))
                except trio.BrokenResourceError:
                    pass
                # Never answered as the "body" of the first, never left hanging: closed.
                assert await conn.closed_by_server()
                assert b"HTTP/1.1" not in conn.buffer
            async with raw(env) as conn:
                # The whole refused request sent at once: answered, then closed.
                body = b'{"name": "x"}'
                await conn.send(head("POST", "/api/v2/apps", length=len(body)) + body)
                assert (await conn.response()).status == 401
                assert await conn.closed_by_server()
            # A real keep-alive client (httpx) reconnects and goes on.
            async with httpx.AsyncClient(base_url=env.http, timeout=10) as client:
                for _ in range(20):
                    r = await client.post("/api/v2/apps", content=b'{"name": "x"}')
                    assert r.status_code == 401
                    assert (await client.get("/api/v2/health")).status_code == 200


# --- strangers' bodies -------------------------------------------------------------------

async def test_bodies_without_credentials_are_capped_small(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            async with raw(env) as conn:  # declared too large: refused on the header
                await conn.send(head("POST", "/api/v2/nowhere", length=ANONYMOUS_BODY_BYTES + 1))
                r = await conn.response()
                assert_error(r, 413, "too_large")
                assert r.headers.get("connection") == "close"
                assert await conn.closed_by_server()
            async with raw(env) as conn:  # chunked, no length: refused once over the cap
                chunked = "Transfer-Encoding: chunked\r\n"
                await conn.send(head("POST", "/api/v2/health", extra=chunked))
                chunk = b"x" * 4096
                try:
                    for _ in range(ANONYMOUS_BODY_BYTES // len(chunk) + 2):
                        await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except trio.BrokenResourceError:
                    pass
                r = await conn.response()
                assert_error(r, 413, "too_large")
                assert await conn.closed_by_server()
            async with raw(env) as conn:  # small: read, answered, connection kept
                await conn.send(head("POST", "/api/v2/nowhere", length=2) + b"{}")
                assert_error(await conn.response(), 404, "not_found")
                await conn.send(head("GET", "/api/v2/health"))
                assert (await conn.response()).status == 200


async def test_a_stranger_trickling_a_body_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cp_http, "ANONYMOUS_BODY_TIMEOUT_S", 0.5)
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, raw(env) as conn:
            await conn.send(head("POST", "/api/v2/nowhere", length=100) + b"{")
            r = await conn.response()  # the other 99 bytes never come
            assert_error(r, 408, "request_timeout")
            assert r.headers.get("connection") == "close"
            assert await conn.closed_by_server()


async def test_authenticated_bodies_over_the_limit_are_413_and_closed(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", max_request_bytes=1 << 20) as env:
            tenant, _ = await tenant_and_provisioner_keys(env)
            async with raw(env) as conn:
                await conn.send(head("POST", "/api/v2/apps", length=2 << 20, token=tenant))
                r = await conn.response()
                assert_error(r, 413, "too_large")
                assert r.headers.get("connection") == "close"
                assert await conn.closed_by_server()


# --- 405, query enums, request bodies ------------------------------------------------------

async def test_405_carries_allow(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, env.client(token=None) as anon:
            r = await anon.delete("/api/v2/health")
            assert r.status_code == 405
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            assert "GET" in allowed and "DELETE" not in allowed
            error = r.json()["error"]
            assert error["code"] == "method_not_allowed"
            assert set(error["details"]["allowed"]) == allowed
            r = await anon.get("/api/v2/capacity/launch-orders/claim")
            assert r.status_code == 405 and "POST" in r.headers["allow"]
            r = await anon.get("/api/v2/admin/events")  # a websocket, without the upgrade
            assert r.status_code == 426 and r.headers["upgrade"] == "websocket"
            assert r.json()["error"]["code"] == "upgrade_required"


@pytest.mark.parametrize("status", ["bogus", "", "ONLINE", ["online", "bogus"]])
async def test_agent_status_filter_is_an_enum(tmp_path: Path, status: str | list[str]) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, env.client() as admin:
            r = await admin.get("/api/v2/agents", params={"status": status})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "bad_request" and error["details"]["field"] == "status"
            assert error["details"]["allowed"] == ["online", "stale", "offline", "quarantined"]
            assert "online, stale, offline, quarantined" in error["message"]
            r = await admin.get("/api/v2/agents", params={"status": "online"})
            assert r.status_code == 200 and r.json() == {"agents": []}


@pytest.mark.parametrize(("route", "body", "field"), [
    ("POST /api/v2/admin/crash", {"name": "x", "force": True}, "force"),
    ("POST /api/v2/admin/crash", {"name": 5}, "name"),
    ("POST /api/v2/admin/crash", {}, "name"),
    ("POST /api/v2/agents/ag-x/drain", {"draining": True, "why": "x"}, "why"),
    ("POST /api/v2/agents/ag-x/drain", {"draining": "yes"}, "draining"),
    ("POST /api/v2/capacity/launch-orders/claim",
     {"datacenter": "local:dev", "node_size": "tiny", "count": 2}, "count"),
    ("POST /api/v2/capacity/launch-orders/claim", {"datacenter": "local:dev"}, "node_size"),
    ("POST /api/v2/capacity/launch-orders/lo-x/fulfil", {"vm_name": "v", "ip": "1"}, "ip"),
    ("POST /api/v2/capacity/launch-orders/lo-x/fulfil", {"vm_name": " "}, "vm_name"),
    ("POST /api/v2/capacity/launch-orders/lo-x/fail", {"error": 1}, "error"),
    ("POST /api/v2/capacity/launch-orders/lo-x/provisioning", {"vm": "v"}, "vm"),
])
async def test_request_bodies_are_structured_strictly(
    tmp_path: Path, route: str, body: dict[str, Any], field: str
) -> None:
    method, path = route.split(" ", 1)
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            _, prov = await tenant_and_provisioner_keys(env)
            token = prov if "launch-orders" in path else "admin"
            async with env.client(token=token) as http:
                r = await http.request(method, path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_request" and error["details"]["field"] == field
