"""A small client for the two Google Cloud REST APIs EasyEnclave uses, and their auth.

Theory of operation
-------------------

**Credentials.** A service-account key file (``$GOOGLE_APPLICATION_CREDENTIALS``: JSON
with ``type: service_account``, ``client_email``, ``private_key`` (PEM RSA),
``token_uri``) is exchanged for an OAuth access token by the JWT-bearer grant
(RFC 7523, Google's "OAuth 2.0 for server to server applications"): a JWT
``{iss: client_email, scope, aud: token_uri, iat, exp: iat + 3600}`` signed RS256 with
``cryptography`` is POSTed as ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer
&assertion=JWT``; the answer's ``access_token`` is used as a Bearer token until a
minute before ``expires_in`` runs out. Endpoints are https only; plain http is accepted
for loopback hosts alone (the tests' stand-in), so a key file can never send an
assertion in clear over a network.

**Cloud Storage, resumable upload** (JSON API ``upload/storage/v1/b/BUCKET/o
?uploadType=resumable``): a POST with the object's metadata opens a session (its URI
in ``Location``); the file goes up in PUTs of ``CHUNK`` bytes (a multiple of 256 KiB)
with ``Content-Range: bytes A-B/TOTAL``; the server answers 308 with ``Range:
bytes=0-N`` (what it has) until the last chunk, then 200/201 with the object. After a
failed PUT (5xx, 429, a dropped connection) the client asks where the session stands
(a PUT with ``Content-Range: bytes */TOTAL``) and resumes from the server's offset —
never from its own idea of it. Attempts are bounded; waits back off with Trio sleeps.
The finished object's ``size`` and ``md5Hash`` must equal the local file's.

**Compute Engine**: ``images.insert``/``get``, ``instances.insert``/``delete``/``list``
(``compute/v1``); mutations return an Operation, polled (bounded) until ``DONE``, whose
``error`` becomes `GcpOperationFailed`.

Errors say whose fault: `GcpConfigError` (the key file or an endpoint is unusable),
`GcpAuthError` (the token endpoint refused), `GcpApiError` (an API answered non-2xx:
status and Google's error message), `GcpOperationFailed`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "CHUNK",
    "COMPUTE_URL",
    "SCOPE",
    "STORAGE_URL",
    "GcpApiError",
    "GcpAuthError",
    "GcpClient",
    "GcpConfigError",
    "GcpError",
    "GcpOperationFailed",
    "ServiceAccount",
    "TokenSource",
    "check_endpoint",
    "client_from_env",
    "jwt_assertion",
    "load_service_account",
    "valid_resource_name",
]

STORAGE_URL = "https://storage.googleapis.com"
COMPUTE_URL = "https://compute.googleapis.com/compute/v1"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CHUNK = 8 * 1024 * 1024  # a multiple of 256 KiB, as GCS requires for non-final chunks
MAX_KEY_FILE = 64 * 1024
MAX_RESPONSE = 4 * 1024 * 1024
_NAME = re.compile(r"\A[a-z]([-a-z0-9]*[a-z0-9])?\Z")


class GcpError(Exception):
    """Base of the GCP client's errors; ``str()`` is one printable line."""


class GcpConfigError(GcpError):
    """The credentials file or an endpoint is unusable (the operator's to fix)."""


class GcpAuthError(GcpError):
    """The token endpoint refused the assertion or answered nonsense."""


class GcpApiError(GcpError):
    """An API call answered with a non-success status."""

    def __init__(self, method: str, url: str, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{method} {url}: HTTP {status}: {message}")


class GcpOperationFailed(GcpError):
    """A Compute operation finished with an error (or did not finish in time)."""


def valid_resource_name(name: str, max_len: int = 63) -> bool:
    """A Compute resource name (RFC 1035 label: ``[a-z]([-a-z0-9]*[a-z0-9])?``)."""
    return len(name) <= max_len and bool(_NAME.match(name))


def check_endpoint(url: str) -> str:
    """*url* without a trailing slash, if it is https, or http to a loopback host."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if parsed.scheme == "https" and host:
        return url.rstrip("/")
    if parsed.scheme == "http":
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return url.rstrip("/")
    raise GcpConfigError(f"endpoint {url!r} must be https (plain http only to loopback)")


@attrs.frozen(repr=False)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey
    token_uri: str
    project_id: str | None

    def __repr__(self) -> str:
        return f"ServiceAccount({self.client_email!r})"


def load_service_account(path: Path) -> ServiceAccount:
    """Read a service-account key file (GcpConfigError on any problem)."""
    try:
        raw = path.read_bytes()[: MAX_KEY_FILE + 1]
    except OSError as exc:
        raise GcpConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_FILE:
        raise GcpConfigError(f"{path}: larger than {MAX_KEY_FILE} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise GcpConfigError(f"{path}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("type") != "service_account":
        raise GcpConfigError(f"{path}: not a service-account key (type service_account)")
    fields = {k: doc.get(k) for k in ("client_email", "private_key", "token_uri")}
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if missing:
        raise GcpConfigError(f"{path}: missing {', '.join(missing)}")
    try:
        key = serialization.load_pem_private_key(str(fields["private_key"]).encode(), None)
    except (ValueError, TypeError):
        raise GcpConfigError(f"{path}: private_key is not an unencrypted PEM key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise GcpConfigError(f"{path}: private_key is not an RSA key")
    project = doc.get("project_id")
    return ServiceAccount(str(fields["client_email"]), key,
                          check_endpoint(str(fields["token_uri"])),
                          project if isinstance(project, str) and project else None)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_assertion(account: ServiceAccount, scope: str, now: int,
                  lifetime: int = 3600) -> str:
    """The RS256-signed JWT the JWT-bearer grant exchanges for a token."""
    header = {"alg": "RS256", "typ": "JWT"}
    claims = {"iss": account.client_email, "scope": scope, "aud": account.token_uri,
              "iat": now, "exp": now + lifetime}
    signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, claims))
    signature = account.private_key.sign(signing_input.encode(), padding.PKCS1v15(),
                                         hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def _json(response: httpx.Response) -> Any:
    if len(response.content) > MAX_RESPONSE:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    doc = _json(response)
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if isinstance(err, str):
            desc = doc.get("error_description")
            return f"{err}: {desc}"[:300] if isinstance(desc, str) else err[:300]
    return response.text[:200].replace("\n", " ") or response.reason_phrase


class TokenSource:
    """Access tokens for *account* by the JWT-bearer grant, cached until near expiry.

    *clock* gives unix seconds for the JWT's iat/exp (wall time: the token endpoint
    checks it); expiry bookkeeping uses ``trio.current_time()``."""

    def __init__(self, account: ServiceAccount, http: httpx.AsyncClient, *,
                 scope: str = SCOPE, clock: Callable[[], float] | None = None) -> None:
        import time

        self.account = account
        self.http = http
        self.scope = scope
        self.clock = clock if clock is not None else time.time
        self._token: str | None = None
        self._expires = -math.inf
        self._lock = trio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._token is not None and trio.current_time() < self._expires:
                return self._token
            assertion = jwt_assertion(self.account, self.scope, int(self.clock()))
            try:
                response = await self.http.post(
                    self.account.token_uri,
                    data={"grant_type": JWT_BEARER, "assertion": assertion})
            except httpx.HTTPError as exc:
                raise GcpAuthError(f"token endpoint {self.account.token_uri}: {exc}") from None
            doc = _json(response)
            if response.status_code != 200 or not isinstance(doc, dict):
                raise GcpAuthError(f"token endpoint refused ({response.status_code}): "
                                   f"{_error_message(response)}")
            token, expires = doc.get("access_token"), doc.get("expires_in", 3600)
            if not isinstance(token, str) or not token or not isinstance(expires, int):
                raise GcpAuthError("token endpoint answered without access_token/expires_in")
            self._token = token
            self._expires = trio.current_time() + max(0, expires - 60)
            return token

    def invalidate(self) -> None:
        self._token = None


@attrs.frozen
class Retry:
    """Bounded retries with exponential backoff (Trio sleeps: tests run them instantly)."""

    attempts: int = 6
    base_s: float = 1.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.base_s * 2**attempt))


TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _md5_b64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


class GcpClient:
    """Cloud Storage + Compute Engine calls with a token from *tokens*."""

    def __init__(self, http: httpx.AsyncClient, tokens: TokenSource, *,
                 storage_url: str = STORAGE_URL, compute_url: str = COMPUTE_URL,
                 retry: Retry = Retry(), chunk: int = CHUNK,
                 operation_timeout_s: float = 900.0) -> None:
        if chunk <= 0 or chunk % (256 * 1024):
            raise GcpConfigError("the upload chunk must be a positive multiple of 256 KiB")
        self.http = http
        self.tokens = tokens
        self.storage_url = check_endpoint(storage_url)
        self.compute_url = check_endpoint(compute_url)
        self.retry = retry
        self.chunk = chunk
        self.operation_timeout_s = operation_timeout_s

    # -- plumbing --

    async def _request(self, method: str, url: str, *, ok: tuple[int, ...] = (200,),
                       **kw: Any) -> httpx.Response:
        """One call, retried on transient failures and once on a 401 (token expired)."""
        refreshed = False
        for attempt in range(self.retry.attempts):
            headers = {**kw.pop("headers", {}), "Authorization":
                       f"Bearer {await self.tokens.token()}"}
            try:
                response = await self.http.request(method, url, headers=headers, **kw)
            except httpx.TransportError as exc:
                if attempt + 1 == self.retry.attempts:
                    raise GcpApiError(method, url, 0, f"transport: {exc}") from None
                await trio.sleep(self.retry.delay(attempt))
                kw["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            kw["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
            if response.status_code in ok:
                return response
            if response.status_code == 401 and not refreshed:
                refreshed = True
                self.tokens.invalidate()
                continue
            if response.status_code in TRANSIENT and attempt + 1 < self.retry.attempts:
                await trio.sleep(self.retry.delay(attempt))
                continue
            raise GcpApiError(method, url, response.status_code, _error_message(response))
        raise GcpApiError(method, url, 0, "retries exhausted")

    async def _get_or_none(self, url: str) -> dict[str, Any] | None:
        response = await self._request("GET", url, ok=(200, 404))
        if response.status_code == 404:
            return None
        doc = _json(response)
        if not isinstance(doc, dict):
            raise GcpApiError("GET", url, response.status_code, "answer is not a JSON object")
        return doc

    # -- Cloud Storage --

    def _object_url(self, bucket: str, name: str) -> str:
        return (f"{self.storage_url}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/"
                f"{urllib.parse.quote(name, safe='')}")

    async def get_object(self, bucket: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(self._object_url(bucket, name))

    async def upload(self, bucket: str, name: str, path: Path,
                     metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Upload *path* as gs://bucket/name by a resumable session; the object resource.

        Resumes after failed chunks from the offset the server reports; GcpApiError
        when the attempts run out or the stored object differs from the file."""
        total = (await trio.Path(path).stat()).st_size
        md5 = await trio.to_thread.run_sync(_md5_b64, path)
        start = (f"{self.storage_url}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}"
                 f"/o?uploadType=resumable&name={urllib.parse.quote(name, safe='')}")
        opened = await self._request(
            "POST", start, json={"name": name, "metadata": dict(metadata or {})},
            headers={"X-Upload-Content-Type": "application/gzip",
                     "X-Upload-Content-Length": str(total)})
        session = opened.headers.get("Location")
        if not session:
            raise GcpApiError("POST", start, opened.status_code, "no upload session Location")
        if _origin(check_endpoint(session)) != _origin(self.storage_url):
            raise GcpApiError("POST", start, opened.status_code,
                              "the upload session is on another host")
        offset, failures, result = 0, 0, None
        while result is None:
            body = await trio.to_thread.run_sync(_read_at, path, offset, self.chunk)
            last = offset + len(body) == total
            content_range = (f"bytes {offset}-{offset + len(body) - 1}/{total}" if body
                             else f"bytes */{total}")
            try:
                response = await self.http.put(session, content=body, headers={
                    "Content-Range": content_range,
                    "Authorization": f"Bearer {await self.tokens.token()}"})
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code in (200, 201):
                result = _json(response)
                break
            if response is not None and response.status_code == 308 and not last:
                committed = self._committed(response, offset + len(body), total)
                if committed > offset:
                    offset = committed
                    continue
                # a 308 that does not advance counts as a failure (bounded below)
            if response is not None and response.status_code not in TRANSIENT | {308}:
                raise GcpApiError("PUT", "upload session", response.status_code,
                                  _error_message(response))
            failures += 1
            if failures >= self.retry.attempts:
                raise GcpApiError("PUT", "upload session", 0,
                                  f"upload failed {failures} times at byte {offset}")
            await trio.sleep(self.retry.delay(failures - 1))
            resumed = await self._session_offset(session, total)
            if resumed is None:  # the session already holds everything
                result = await self.get_object(bucket, name)
            else:
                offset = resumed
        if not isinstance(result, dict):
            raise GcpApiError("PUT", "upload session", 0, "no object resource at the end")
        if str(result.get("size")) != str(total) or result.get("md5Hash") != md5:
            raise GcpApiError("PUT", "upload session", 0,
                              f"stored object differs from {path} (size/md5)")
        return result

    @staticmethod
    def _committed(response: httpx.Response, fallback: int, total: int) -> int:
        """The bytes the server says it holds (a 308's ``Range``); GcpApiError when that
        is past the end of the file."""
        match = re.fullmatch(r"bytes=0-(\d{1,20})", response.headers.get("Range", ""))
        if match is None:
            return 0 if "Range" not in response.headers else fallback
        committed = int(match.group(1)) + 1
        if committed > total:
            raise GcpApiError("PUT", "upload session", response.status_code,
                              f"the server claims {committed} bytes of a {total}-byte file")
        return committed

    async def _session_offset(self, session: str, total: int) -> int | None:
        """Where the server stands (bytes it has), None when the upload is complete."""
        for attempt in range(self.retry.attempts):
            try:
                response = await self.http.put(session, content=b"", headers={
                    "Content-Range": f"bytes */{total}",
                    "Authorization": f"Bearer {await self.tokens.token()}"})
            except httpx.TransportError:
                await trio.sleep(self.retry.delay(attempt))
                continue
            if response.status_code in (200, 201):
                return None
            if response.status_code == 308:
                return self._committed(response, 0, total)
            if response.status_code not in TRANSIENT:
                raise GcpApiError("PUT", "upload session status", response.status_code,
                                  _error_message(response))
            await trio.sleep(self.retry.delay(attempt))
        raise GcpApiError("PUT", "upload session status", 0, "retries exhausted")

    # -- Compute Engine --

    def _project(self, project: str) -> str:
        return f"{self.compute_url}/projects/{urllib.parse.quote(project, safe='')}"

    async def wait(self, operation: dict[str, Any], project: str) -> dict[str, Any]:
        """Poll a (global or zonal) operation until DONE (bounded); its final state."""
        deadline = trio.current_time() + self.operation_timeout_s
        op, delay = operation, 1.0
        while op.get("status") != "DONE":
            if trio.current_time() > deadline:
                raise GcpOperationFailed(f"operation {op.get('name')} not done in "
                                         f"{self.operation_timeout_s:.0f}s")
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)
            name = urllib.parse.quote(str(op.get("name", "")), safe="")
            zone = str(op.get("zone", "")).rsplit("/", 1)[-1]
            scope = f"zones/{urllib.parse.quote(zone, safe='')}" if zone else "global"
            got = await self._get_or_none(f"{self._project(project)}/{scope}/operations/{name}")
            if got is None:
                raise GcpOperationFailed(f"operation {op.get('name')} vanished")
            op = got
        error = op.get("error")
        if error:
            errors = error.get("errors", []) if isinstance(error, dict) else []
            text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors
                             if isinstance(e, dict)) or str(error)[:300]
            raise GcpOperationFailed(f"operation {op.get('name')} failed: {text}")
        return op

    async def _mutate(self, method: str, url: str, project: str,
                      body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        response = await self._request(method, url, json=body)
        op = _json(response)
        if not isinstance(op, dict):
            raise GcpApiError(method, url, response.status_code, "answer is not an Operation")
        return await self.wait(op, project)

    async def get_image(self, project: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(
            f"{self._project(project)}/global/images/{urllib.parse.quote(name, safe='')}")

    async def insert_image(self, project: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._mutate("POST", f"{self._project(project)}/global/images", project,
                                  body)

    def _zone(self, project: str, zone: str) -> str:
        return f"{self._project(project)}/zones/{urllib.parse.quote(zone, safe='')}"

    async def insert_instance(self, project: str, zone: str,
                              body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._mutate("POST", f"{self._zone(project, zone)}/instances", project,
                                  body)

    async def delete_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        return await self._mutate(
            "DELETE",
            f"{self._zone(project, zone)}/instances/{urllib.parse.quote(name, safe='')}",
            project)

    async def list_instances(self, project: str, zone: str, filter: str | None = None,
                             max_pages: int = 100) -> list[dict[str, Any]]:
        """Every instance in the zone (matching *filter*), following page tokens."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(max_pages):
            params = {k: v for k, v in (("filter", filter), ("pageToken", token)) if v}
            response = await self._request("GET", f"{self._zone(project, zone)}/instances",
                                           params=params)
            doc = _json(response)
            if not isinstance(doc, dict):
                raise GcpApiError("GET", "instances", response.status_code, "not JSON")
            out += [i for i in doc.get("items", []) if isinstance(i, dict)]
            token = doc.get("nextPageToken")
            if not token:
                return out
        raise GcpApiError("GET", "instances", 0, f"more than {max_pages} pages")


def client_from_env(http: httpx.AsyncClient, env: Mapping[str, str] | None = None,
                    **kw: Any) -> GcpClient:
    """A client from ``$GOOGLE_APPLICATION_CREDENTIALS`` (a service-account key file) and
    the endpoint overrides ``$EE_GCP_STORAGE_URL`` / ``$EE_GCP_COMPUTE_URL``."""
    env = dict(os.environ) if env is None else env
    path = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        raise GcpConfigError("GOOGLE_APPLICATION_CREDENTIALS is not set "
                             "(a service-account key file)")
    account = load_service_account(Path(path))
    return GcpClient(http, TokenSource(account, http),
                     storage_url=env.get("EE_GCP_STORAGE_URL") or STORAGE_URL,
                     compute_url=env.get("EE_GCP_COMPUTE_URL") or COMPUTE_URL, **kw)
