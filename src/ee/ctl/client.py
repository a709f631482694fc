"""A small synchronous client for the control plane's HTTP API (API.md), used by the
eectl groups that talk to a CP (`console`, `deploy`).

Every failure becomes a ``CtlError`` whose ``str`` is one line fit for an operator:
``CpError`` for an answer in API.md's error shape (or any other 4xx/5xx), and
``CpUnreachable`` when no answer came at all. Where to connect and with which token
is resolved once, by ``client_from_args``: ``--cp`` / ``$EE_CP_URL`` / the default, and
``--token`` / ``--token-file`` / ``$EE_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

DEFAULT_CP_URL = "http://127.0.0.1:8000"

Json = dict[str, Any]


class CtlError(Exception):
    """A failure eectl reports in one line (``str``) and turns into an exit code."""

    exit_code = 1


class CpError(CtlError):
    """The CP answered with an error status (API.md: ``{"error": {code, message, details}}``)."""

    def __init__(self, status: int, code: str, message: str,
                 details: Json | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details: Json = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.status} {self.code})"


class CpUnreachable(CtlError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the CP at {url}: {reason}")
        self.url = url


class UsageError(CtlError):
    exit_code = 2


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "…"


def error_from_response(response: httpx.Response) -> CpError:
    """API.md's error body → CpError; anything else (a proxy's HTML page) → a short line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        details = err.get("details")
        return CpError(response.status_code, str(err.get("code") or "error"),
                       _one_line(str(err.get("message") or response.reason_phrase)),
                       details if isinstance(details, dict) else None)
    text = _one_line(response.text) or response.reason_phrase or "error"
    return CpError(response.status_code, "http_error", text)


def _reason(exc: httpx.TransportError) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        assert nxt is not None
        cause = nxt
    text = str(cause) or str(exc) or type(exc).__name__
    return _one_line(text)


def segment(value: str) -> str:
    """An id or name as one URL path segment."""
    return quote(value, safe="")


class CpClient:
    """The CP's HTTP API. Methods return the decoded JSON body or raise ``CtlError``."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            if body is None:
                response = self._http.request(method, path)
            else:
                response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise CpUnreachable(self.base_url, _reason(exc)) from None
        if response.status_code >= 400:
            raise error_from_response(response)
        if not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise CpError(response.status_code, "bad_response",
                          f"the CP answered {method} {path} with non-JSON") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    # Anyone.

    def health(self) -> Json:
        return dict(self.get("/api/v2/health"))

    # Admin.

    def agents(self) -> list[Json]:
        return list(self.get("/api/v2/agents").get("agents", []))

    def agent(self, agent_id: str) -> Json:
        return dict(self.get(f"/api/v2/agents/{segment(agent_id)}"))

    def drain(self, agent_id: str, draining: bool = True) -> Json:
        return dict(self.post(f"/api/v2/agents/{segment(agent_id)}/drain",
                              {"draining": draining}))

    def vm_names(self) -> list[Json]:
        """VM-name bindings: each name's key (sha256) and state (bound, or held)."""
        return list(self.get("/api/v2/admin/vm-names").get("vm_names", []))

    def release_name(self, vm_name: str) -> Json:
        """Free a bound (or held) VM name for a new session key."""
        return dict(self.post(f"/api/v2/admin/vm-names/{segment(vm_name)}/release"))

    def datacenters(self) -> list[Json]:
        return list(self.get("/api/v2/datacenters").get("datacenters", []))

    def tree(self) -> Json:
        return dict(self.get("/api/v2/admin/tree"))

    def crash(self, name: str) -> Json:
        return dict(self.post("/api/v2/admin/crash", {"name": name}))

    def events_url(self) -> str:
        """The admin events websocket (``ws(s)://…/api/v2/admin/events``)."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/api/v2/admin/events", "", ""))

    # Tenant.

    def apps(self) -> list[Json]:
        body = self.get("/api/v2/apps")
        return list(body.get("apps", []) if isinstance(body, dict) else body)

    def preflight(self, app: str, request: Json) -> Json:
        return dict(self.post(f"/api/v2/apps/{segment(app)}/preflight", request))

    def create_deployment(self, app: str, request: Json) -> Json:
        return dict(self.post(f"/api/v2/apps/{segment(app)}/deployments", request))

    def deployment(self, deployment_id: str) -> Json:
        return dict(self.get(f"/api/v2/deployments/{segment(deployment_id)}"))


def add_cp_options(parser: argparse.ArgumentParser) -> None:
    """``--cp``, ``--token``, ``--token-file`` on a subcommand that talks to a CP."""
    parser.add_argument("--cp", metavar="URL",
                        help=f"CP base URL (default: $EE_CP_URL or {DEFAULT_CP_URL})")
    parser.add_argument("--token", metavar="T", help="API token (default: $EE_TOKEN)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="read the token from FILE (e.g. <data-dir>/admin.token)")


def resolve_token(args: argparse.Namespace, env_var: str = "EE_TOKEN") -> str | None:
    if getattr(args, "token", None):
        return str(args.token)
    token_file = getattr(args, "token_file", None)
    if token_file:
        try:
            return Path(token_file).read_text().strip() or None
        except OSError as exc:
            raise UsageError(
                f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    return os.environ.get(env_var) or None


def resolve_url(args: argparse.Namespace) -> str:
    url = getattr(args, "cp", None) or os.environ.get("EE_CP_URL") or DEFAULT_CP_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--cp must be an http(s) URL, not {url!r}")
    return str(url)


def client_from_args(args: argparse.Namespace) -> CpClient:
    return CpClient(resolve_url(args), resolve_token(args))


__all__ = [
    "DEFAULT_CP_URL",
    "CpClient",
    "CpError",
    "CpUnreachable",
    "CtlError",
    "Json",
    "UsageError",
    "add_cp_options",
    "client_from_args",
    "error_from_response",
    "resolve_token",
    "resolve_url",
]
