"""A local stand-in for Cloudflare Workers KV: the API v4 value routes eectl uses and
the KV backend protocol workerd's ``kvNamespace`` binding speaks, over one store.

* ``GET|PUT /client/v4/accounts/{acc}/storage/kv/namespaces/{ns}/values/{key}``
  (bearer token; GET answers the raw value, PUT stores the raw body and answers the
  API envelope), as on api.cloudflare.com.
* anything else: workerd's KV backend (``GET /<urlencoded key>``: the value or 404).

``calls`` records ``(method, path)`` of API requests.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from cloudflare_standin import _err, _ok, serve_handler

VALUE = re.compile(r"\A/client/v4/accounts/(?P<acc>[^/]+)/storage/kv/namespaces/(?P<ns>[^/]+)"
                   r"/values/(?P<key>[^/]+)\Z")


class KvStandIn:
    def __init__(self, account_id: str = "acc1", namespace_id: str = "ns1",
                 token: str = "cf-test-token") -> None:
        self.account_id = account_id
        self.namespace_id = namespace_id
        self.token = token
        self.values: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/client/v4"

    def handle(self, method: str, raw: str, auth: str | None,
               body: bytes) -> tuple[int, bytes | dict[str, Any]]:
        path = urlsplit(raw).path
        with self.lock:
            m = VALUE.match(path)
            if m is None:  # workerd's KV backend
                key = unquote(path.lstrip("/"))
                if method == "GET":
                    value = self.values.get(key)
                    return (200, value) if value is not None else (404, b"")
                return 405, b""
            self.calls.append((method, path))
            if auth != f"Bearer {self.token}":
                return 403, _err(10000, "Authentication error")
            if m["acc"] != self.account_id or m["ns"] != self.namespace_id:
                return 404, _err(10013, "namespace not found")
            key = unquote(m["key"])
            if method == "GET":
                value = self.values.get(key)
                return (200, value) if value is not None else (404, _err(10009, "key not found"))
            if method == "PUT":
                self.values[key] = body
                return 200, _ok(None)
            return 405, _err(10000, "method not allowed")

    @contextmanager
    def serving(self) -> Iterator[KvStandIn]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, doc = standin.handle(self.command, self.path,
                                             self.headers.get("Authorization"), raw)
                if isinstance(doc, dict):
                    import json
                    data, kind = json.dumps(doc).encode(), "application/json"
                else:
                    data, kind = doc, "application/octet-stream"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _serve

            def log_message(self, *_args: Any) -> None:
                pass

        with serve_handler(Handler) as port:
            self.port = port
            yield self
