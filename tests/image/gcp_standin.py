"""A local stand-in of the Google APIs the GCP path uses: real HTTP on loopback.

It implements, as documented, what the client calls and checks what Google checks:

* **OAuth token endpoint** (``POST /token``): the JWT-bearer grant; the assertion must be
  RS256-signed by the service account's key, ``aud`` this endpoint, ``iss`` the
  account, a current ``iat``/``exp`` and a scope; answers ``access_token`` +
  ``expires_in``. Every other route wants ``Authorization: Bearer <a token it issued>``
  (401 otherwise).
* **Cloud Storage JSON API**: object ``GET``; resumable uploads (``POST
  /upload/storage/v1/b/B/o?uploadType=resumable&name=N`` opens a session, ``PUT`` to
  the session URI with ``Content-Range``; 308 + ``Range: bytes=0-N`` while incomplete,
  non-final chunks a multiple of 256 KiB, ``bytes */TOTAL`` asks for the status; the
  final answer is the object with ``size`` and ``md5Hash``).
* **Compute Engine v1**: ``images.get/insert``, ``instances.insert/delete/list`` (with
  ``filter`` on labels and paging), global and zonal Operations (``RUNNING`` on the
  first look, then ``DONE``; failures as ``error.errors``).

Failure injection: `StandIn.upload_faults` is a list consumed one per chunk PUT:
``"ok"``, ``"503"`` (commit half the chunk, then answer 503), ``"drop"`` (close the
connection without an answer, nothing committed), ``"503-all"`` (answer 503 forever);
`StandIn.corrupt_uploads` stores a changed byte, `StandIn.session_base` hands out
upload sessions on another origin.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

QUANTUM = 256 * 1024
REQUIRED_FEATURES = {"UEFI_COMPATIBLE", "TDX_CAPABLE", "GVNIC"}


def new_service_account(base: str, email: str = "ee-publisher@proj.iam.gserviceaccount.com"
                        ) -> tuple[dict[str, str], rsa.RSAPrivateKey]:
    """A service-account key file (as a dict) whose token_uri is the stand-in's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": "proj", "private_key_id": "k1",
            "private_key": pem, "client_email": email, "client_id": "1",
            "token_uri": f"{base}/token"}, key


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attrs.define
class Session:
    bucket: str
    name: str
    total: int
    metadata: dict[str, str]
    data: bytearray = attrs.field(factory=bytearray)


@attrs.define
class StandIn:
    base: str = ""
    accounts: dict[str, rsa.RSAPublicKey] = attrs.field(factory=dict)
    tokens: set[str] = attrs.field(factory=set)
    objects: dict[tuple[str, str], dict[str, Any]] = attrs.field(factory=dict)
    sessions: dict[str, Session] = attrs.field(factory=dict)
    images: dict[tuple[str, str], dict[str, Any]] = attrs.field(factory=dict)
    instances: dict[tuple[str, str, str], dict[str, Any]] = attrs.field(factory=dict)
    operations: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    upload_faults: list[str] = attrs.field(factory=list)
    log: list[str] = attrs.field(factory=list)  # "METHOD path [content-range]"
    bytes_received: int = 0
    page_size: int = 2
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    _ops: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))
    #: instance insert fails with this operation error (e.g. a quota) when set
    instance_error: dict[str, str] | None = None
    #: a misbehaving server: store the upload with one byte changed
    corrupt_uploads: bool = False
    #: where upload sessions live (None: this server); another origin tests the client
    session_base: str | None = None

    def trust(self, email: str, key: rsa.RSAPrivateKey) -> None:
        self.accounts[email] = key.public_key()

    def operation(self, project: str, zone: str | None, target: str,
                  error: dict[str, str] | None = None) -> dict[str, Any]:
        name = f"operation-{next(self._ops)}"
        op: dict[str, Any] = {"kind": "compute#operation", "name": name, "status": "RUNNING",
                              "targetLink": target, "_project": project, "_polls": 0}
        if zone:
            op["zone"] = f"{self.base}/compute/v1/projects/{project}/zones/{zone}"
        if error:
            op["_error"] = {"errors": [error]}
        self.operations[name] = op
        return {k: v for k, v in op.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- helpers --

    def _send(self, status: int, doc: Any = None, headers: dict[str, str] | None = None) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, reason: str = "invalid") -> None:
        self._send(status, {"error": {"code": status, "message": message,
                                      "errors": [{"reason": reason, "message": message}]}})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorised(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.server.state.tokens:
            return True
        self._body()
        self._error(401, "Request had invalid authentication credentials.", "authError")
        return False

    # -- dispatch --

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        st = self.server.state
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, dict(urllib.parse.parse_qsl(url.query))
        with st.lock:
            st.log.append(f"{method} {path} {self.headers.get('Content-Range', '')}".strip())
        if method == "POST" and path == "/token":
            return self._token()
        if not self._authorised():
            return None
        with st.lock:
            return self._route(method, path, query)

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
        if m and method == "GET":
            obj = self.server.state.objects.get((m[1], urllib.parse.unquote(m[2])))
            return self._send(200, obj) if obj else self._error(404, "No such object", "notFound")
        m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
        if m and method == "POST":
            return self._start_upload(m[1], query)
        m = re.fullmatch(r"/upload/session/([0-9a-f]+)", path)
        if m and method == "PUT":
            return self._put_chunk(m[1])
        m = re.fullmatch(r"/compute/v1/projects/([^/]+)/(global|zones/([^/]+))/(.*)", path)
        if m:
            return self._compute(method, m[1], m[3], m[4], query)
        self._body()
        return self._error(404, f"no route {method} {path}", "notFound")

    # -- OAuth --

    def _token(self) -> None:
        st = self.server.state
        form = dict(urllib.parse.parse_qsl(self._body().decode()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._send(400, {"error": "unsupported_grant_type"})
        try:
            head_b64, claims_b64, sig_b64 = form.get("assertion", "").split(".")
            header, claims = json.loads(_b64d(head_b64)), json.loads(_b64d(claims_b64))
            key = st.accounts[claims["iss"]]
            if header.get("alg") != "RS256":
                raise ValueError("alg")
            key.verify(_b64d(sig_b64), f"{head_b64}.{claims_b64}".encode(),
                       padding.PKCS1v15(), hashes.SHA256())
            now = time.time()
            if claims["aud"] != f"{st.base}/token" or not claims.get("scope") or \
                    not claims["iat"] - 300 <= now < claims["exp"] or \
                    claims["exp"] - claims["iat"] > 3600:
                raise ValueError("claims")
        except (ValueError, KeyError, TypeError, InvalidSignature):
            return self._send(400, {"error": "invalid_grant",
                                    "error_description": "Invalid JWT Signature."})
        token = secrets.token_urlsafe(24)
        st.tokens.add(token)
        return self._send(200, {"access_token": token, "expires_in": 3599,
                                "token_type": "Bearer"})

    # -- Cloud Storage --

    def _start_upload(self, bucket: str, query: dict[str, str]) -> None:
        st = self.server.state
        meta = json.loads(self._body() or b"{}")
        total = self.headers.get("X-Upload-Content-Length")
        if query.get("uploadType") != "resumable" or not query.get("name") or total is None:
            return self._error(400, "resumable upload needs name and X-Upload-Content-Length")
        sid = secrets.token_hex(8)
        st.sessions[sid] = Session(bucket, query["name"], int(total),
                                   dict(meta.get("metadata") or {}))
        where = st.session_base or st.base
        return self._send(200, {}, {"Location": f"{where}/upload/session/{sid}"})

    def _put_chunk(self, sid: str) -> None:
        st = self.server.state
        session = st.sessions.get(sid)
        body = self._body()
        if session is None:
            return self._error(404, "No such upload session", "notFound")
        got = len(session.data)

        def incomplete() -> None:
            headers = {"Range": f"bytes=0-{got - 1}"} if got else {}
            headers["Content-Length"] = "0"
            self._send(308, None, headers)

        rng = self.headers.get("Content-Range", "")
        if re.fullmatch(r"bytes \*/\d+", rng):  # status query
            return self._finish(session) if got == session.total else incomplete()
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", rng)
        if not m or int(m[3]) != session.total or int(m[2]) - int(m[1]) + 1 != len(body):
            return self._error(400, f"bad Content-Range {rng!r}")
        start = int(m[1])
        if start > got:
            return self._error(400, f"chunk starts at {start}, have {got}")
        final = int(m[2]) + 1 == session.total
        if not final and len(body) % QUANTUM:
            return self._error(400, "non-final chunk not a multiple of 256 KiB")
        fault = st.upload_faults.pop(0) if st.upload_faults else "ok"
        if fault == "503-all":
            st.upload_faults.insert(0, fault)
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        st.bytes_received += len(body)
        new = body[got - start:]
        if fault in ("503", "503-all"):
            keep = (len(new) // 2) // QUANTUM * QUANTUM
            session.data += new[:keep]
            return self._error(503, "Backend Error", "backendError")
        session.data += new
        got = len(session.data)
        return self._finish(session) if got == session.total else incomplete()

    def _finish(self, session: Session) -> None:
        st = self.server.state
        data = bytes(session.data)
        if st.corrupt_uploads:
            data = bytes([data[0] ^ 1]) + data[1:]
        obj = {"kind": "storage#object", "bucket": session.bucket, "name": session.name,
               "size": str(len(data)),
               "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
               "metadata": session.metadata}
        st.objects[(session.bucket, session.name)] = obj
        return self._send(200, obj)

    # -- Compute --

    def _compute(self, method: str, project: str, zone: str | None, rest: str,
                 query: dict[str, str]) -> None:
        st = self.server.state
        body = json.loads(self._body() or b"null")
        m = re.fullmatch(r"operations/([^/]+)", rest)
        if m and method == "GET":
            op = st.operations.get(m[1])
            if op is None:
                return self._error(404, "operation not found", "notFound")
            op["_polls"] += 1
            if op["_polls"] >= 1:
                op["status"] = "DONE"
                if "_error" in op:
                    op["error"] = op["_error"]
            return self._send(200, {k: v for k, v in op.items() if not k.startswith("_")})
        if zone is None:
            return self._images(method, project, rest, body)
        return self._instances(method, project, zone, rest, body, query)

    def _images(self, method: str, project: str, rest: str, body: Any) -> None:
        st = self.server.state
        m = re.fullmatch(r"images/([^/]+)", rest)
        if m and method == "GET":
            image = st.images.get((project, m[1]))
            return self._send(200, image) if image else self._error(404, "not found",
                                                                    "notFound")
        if rest == "images" and method == "POST":
            name = body.get("name", "")
            if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
                return self._error(400, f"Invalid value for field 'resource.name': {name!r}")
            if (project, name) in st.images:
                return self._error(409, f"The resource '{name}' already exists",
                                   "alreadyExists")
            features = {f.get("type") for f in body.get("guestOsFeatures", [])}
            source = body.get("rawDisk", {}).get("source", "")
            m2 = re.fullmatch(r"https://storage\.googleapis\.com/([^/]+)/(.+)", source)
            target = f"{st.base}/compute/v1/projects/{project}/global/images/{name}"
            if not m2 or (m2[1], m2[2]) not in st.objects:
                return self._send(200, st.operation(project, None, target, {
                    "code": "INVALID_IMAGE_FILE", "message": f"{source} not found"}))
            if not features >= REQUIRED_FEATURES:
                return self._error(400, f"guestOsFeatures {sorted(features)}")
            st.images[(project, name)] = {**body, "selfLink": target, "status": "READY"}
            return self._send(200, st.operation(project, None, target))
        return self._error(404, f"no route {method} {rest}", "notFound")

    def _instances(self, method: str, project: str, zone: str, rest: str, body: Any,
                   query: dict[str, str]) -> None:
        st = self.server.state
        base = f"{st.base}/compute/v1/projects/{project}/zones/{zone}/instances"
        if rest == "instances" and method == "POST":
            name = body.get("name", "")
            if (project, zone, name) in st.instances:
                return self._error(409, f"The resource '{name}' already exists",
                                   "alreadyExists")
            cc = body.get("confidentialInstanceConfig", {})
            if cc.get("confidentialInstanceType") != "TDX" or \
                    body.get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
                return self._error(400, "TDX needs confidentialInstanceType TDX and "
                                   "onHostMaintenance TERMINATE")
            if st.instance_error:
                return self._send(200, st.operation(project, zone, f"{base}/{name}",
                                                    st.instance_error))
            st.instances[(project, zone, name)] = {**body, "status": "PROVISIONING",
                                                   "selfLink": f"{base}/{name}"}
            return self._send(200, st.operation(project, zone, f"{base}/{name}"))
        m = re.fullmatch(r"instances/([^/]+)", rest)
        if m and method == "DELETE":
            if st.instances.pop((project, zone, m[1]), None) is None:
                return self._error(404, "not found", "notFound")
            return self._send(200, st.operation(project, zone, f"{base}/{m[1]}"))
        if rest == "instances" and method == "GET":
            items = [i for (p, z, _), i in sorted(st.instances.items())
                     if p == project and z == zone and _matches(i, query.get("filter", ""))]
            start = int(query.get("pageToken") or 0)
            page = items[start:start + st.page_size]
            doc: dict[str, Any] = {"kind": "compute#instanceList", "items": page}
            if start + st.page_size < len(items):
                doc["nextPageToken"] = str(start + st.page_size)
            return self._send(200, doc)
        return self._error(404, f"no route {method} {rest}", "notFound")


def _matches(item: dict[str, Any], expr: str) -> bool:
    """The subset of Compute's filter syntax used here: ``labels.K=V AND ...``."""
    for term in filter(None, (t.strip() for t in expr.split(" AND "))):
        m = re.fullmatch(r"labels\.([a-z0-9_-]+)=([a-z0-9_-]*)", term)
        if not m:
            raise ValueError(f"unsupported filter {term!r}")
        if (item.get("labels") or {}).get(m[1]) != m[2]:
            return False
    return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: StandIn


@contextmanager
def gcp_standin() -> Iterator[StandIn]:
    """The stand-in on 127.0.0.1 (a free port) for the duration of the block."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = StandIn(base=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
