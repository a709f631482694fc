"""A local stand-in for the parts of the Cloudflare API v4 the CP's tunnels use.

Real HTTP on loopback (a threading ``http.server``), with the response envelope of the
real API (``{"success", "errors", "messages", "result"}``), bearer-token auth, and
failure switches: ``fail[step] = status`` makes the next call of that step answer
with that status and an error (once), ``garbage.add(step)`` makes it answer non-JSON.
Steps: ``find_tunnel``, ``create_tunnel``, ``configure``, ``token``, ``find_dns``,
``create_dns``, ``update_dns``. ``calls`` records ``(method, path)`` of every request.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROUTES = [
    ("GET", re.compile(r"\A/client/v4/accounts/(?P<acc>[^/]+)/cfd_tunnel\Z"), "find_tunnel"),
    ("POST", re.compile(r"\A/client/v4/accounts/(?P<acc>[^/]+)/cfd_tunnel\Z"), "create_tunnel"),
    ("PUT", re.compile(r"\A/client/v4/accounts/(?P<acc>[^/]+)/cfd_tunnel/(?P<id>[^/]+)"
                       r"/configurations\Z"), "configure"),
    ("GET", re.compile(r"\A/client/v4/accounts/(?P<acc>[^/]+)/cfd_tunnel/(?P<id>[^/]+)/token\Z"),
     "token"),
    ("GET", re.compile(r"\A/client/v4/zones/(?P<zone>[^/]+)/dns_records\Z"), "find_dns"),
    ("POST", re.compile(r"\A/client/v4/zones/(?P<zone>[^/]+)/dns_records\Z"), "create_dns"),
    ("PUT", re.compile(r"\A/client/v4/zones/(?P<zone>[^/]+)/dns_records/(?P<id>[^/]+)\Z"),
     "update_dns"),
]


class CloudflareStandIn:
    def __init__(self, account_id: str = "acc1", zone_id: str = "zone1",
                 token: str = "cf-test-token") -> None:
        self.account_id = account_id
        self.zone_id = zone_id
        self.token = token
        self.tunnels: dict[str, dict[str, Any]] = {}
        self.dns: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}
        self.garbage: set[str] = set()
        self.lock = threading.Lock()
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/client/v4"

    # -- the API -----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, auth: str | None,
               body: Any) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.lock:
            self.calls.append((method, url.path))
            if auth != f"Bearer {self.token}":
                return 403, _err(10000, "Authentication error")
            routed = [(step, m) for verb, pattern, step in ROUTES
                      if verb == method and (m := pattern.match(url.path))]
            if not routed:
                return 404, _err(7003, "No route for that URI")
            step, match = routed[0]
            params = match.groupdict()
            if params.get("acc", self.account_id) != self.account_id or \
                    params.get("zone", self.zone_id) != self.zone_id:
                return 404, _err(7003, "Could not route: unknown account or zone")
            if step in self.garbage:
                self.garbage.discard(step)
                return 200, "<html>not json</html>"
            status = self.fail.pop(step, None)
            if status is not None:
                return status, _err(1000 + status, f"stand-in failure of {step}")
            return getattr(self, f"_{step}")(params, query, body)

    def _find_tunnel(self, _p: dict[str, str], q: dict[str, str], _b: Any) -> tuple[int, Any]:
        found = [t for t in self.tunnels.values()
                 if ("name" not in q or t["name"] == q["name"]) and t["deleted_at"] is None]
        return 200, _ok(found)

    def _create_tunnel(self, _p: dict[str, str], _q: dict[str, str], b: Any) -> tuple[int, Any]:
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            return 400, _err(1001, "name is required")
        if any(t["name"] == b["name"] for t in self.tunnels.values()):
            return 409, _err(1013, "You already have a tunnel with this name")
        tunnel_id = secrets.token_hex(16)
        self.tunnels[tunnel_id] = {"id": tunnel_id, "name": b["name"], "deleted_at": None,
                                   "config_src": b.get("config_src", "local"),
                                   "token": f"tok-{tunnel_id}", "config": None}
        return 200, _ok(self.tunnels[tunnel_id])

    def _configure(self, p: dict[str, str], _q: dict[str, str], b: Any) -> tuple[int, Any]:
        tunnel = self.tunnels.get(p["id"])
        if tunnel is None:
            return 404, _err(1003, "tunnel not found")
        tunnel["config"] = b["config"]
        return 200, _ok({"tunnel_id": p["id"], "config": b["config"], "version": 1})

    def _token(self, p: dict[str, str], _q: dict[str, str], _b: Any) -> tuple[int, Any]:
        tunnel = self.tunnels.get(p["id"])
        if tunnel is None:
            return 404, _err(1003, "tunnel not found")
        return 200, _ok(tunnel["token"])

    def _find_dns(self, _p: dict[str, str], q: dict[str, str], _b: Any) -> tuple[int, Any]:
        found = [r for r in self.dns.values()
                 if r["name"] == q.get("name") and r.get("type") == q.get("type", r.get("type"))]
        return 200, _ok(found)

    def _create_dns(self, _p: dict[str, str], _q: dict[str, str], b: Any) -> tuple[int, Any]:
        if any(r["name"] == b["name"] for r in self.dns.values()):
            return 400, _err(81053, "An A, AAAA, or CNAME record with that host already exists")
        record_id = secrets.token_hex(16)
        self.dns[record_id] = {"id": record_id, **b}
        return 200, _ok(self.dns[record_id])

    def _update_dns(self, p: dict[str, str], _q: dict[str, str], b: Any) -> tuple[int, Any]:
        if p["id"] not in self.dns:
            return 404, _err(81044, "Record does not exist")
        self.dns[p["id"]] = {"id": p["id"], **b}
        return 200, _ok(self.dns[p["id"]])

    # -- serving -----------------------------------------------------------------------

    @contextmanager
    def serving(self) -> Iterator[CloudflareStandIn]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                status, doc = standin.handle(self.command, self.path,
                                             self.headers.get("Authorization"), body)
                data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *_args: Any) -> None:
                pass

        with serve_handler(Handler) as port:
            self.port = port
            yield self


@contextmanager
def serve_handler(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve *handler* on a loopback port in a thread (the port), until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _ok(result: Any) -> dict[str, Any]:
    return {"success": True, "errors": [], "messages": [], "result": result}


def _err(code: int, message: str) -> dict[str, Any]:
    return {"success": False, "errors": [{"code": code, "message": message}], "messages": [],
            "result": None}
