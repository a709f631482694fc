"""A small synchronous client for the control plane's HTTP API (API.md), used by the
eectl groups that talk to a CP (`console`, `deploy`, the tenant commands).

Every failure becomes a ``CtlError`` whose ``str`` is one line fit for an operator:
``CpError`` for an answer in API.md's error shape (or any other 4xx/5xx), and
``CpUnreachable`` when no answer came at all. Where to connect and with which token
is resolved once, by ``client_from_args``: ``--cp`` / ``$EE_CP_URL`` / the default, and
``--token`` / ``--token-file`` / ``$EE_TOKEN``.

Tenant commands resolve theirs with ``tenant_client_from_args`` (options from
``add_tenant_options``), first match wins:

- CP URL: ``--cp``, ``$EE_CP``, ``$EE_CP_URL``, the config file's ``cp``, the default;
- API key: ``--key`` (alias ``--token``), ``--key-file`` (alias ``--token-file``),
  ``$EE_API_KEY``, ``$EE_TOKEN``, the file named by the config file's ``key_file``.

The config file is ``$EE_CONFIG``, else ``$XDG_CONFIG_HOME/easyenclave/config.json``
(``~/.config/easyenclave/config.json``): ``{"cp": URL, "key_file": PATH}``, both
optional; a relative ``key_file`` is relative to the config file's directory. The key
itself never goes in the config file, so the file can be shared.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
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
        # Which events websocket `events_url()` names (the tenant commands set theirs).
        self.events_path = "/api/v2/admin/events"
        self.events_query = ""
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

    def request(self, method: str, path: str, body: Any = None,
                params: dict[str, str] | None = None) -> Any:
        try:
            if body is None:
                response = self._http.request(method, path, params=params)
            else:
                response = self._http.request(method, path, json=body, params=params)
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

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def lines(self, path: str, params: dict[str, str] | None = None) -> Iterator[str]:
        """A streaming GET (no read timeout): its body's lines as they arrive. An error
        status is raised as ``CpError`` before the first line."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout,
                                   headers={"Accept": "text/event-stream"}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise CpUnreachable(self.base_url, _reason(exc)) from None

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
        """The events websocket: ``ws(s)://…/api/v2/admin/events`` unless ``events_path``
        (and ``events_query``) name another, such as the tenant's ``/api/v2/events``."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + self.events_path,
                           self.events_query, ""))

    # Tenant.

    def apps(self) -> list[Json]:
        body = self.get("/api/v2/apps")
        return list(body.get("apps", []) if isinstance(body, dict) else body)

    def paged(self, path: str, key: str, params: dict[str, str] | None = None,
              *, max_pages: int = 1000) -> list[Json]:
        """Every item of a listing, following ``next_cursor`` (``cursor``; the CP's page
        size)."""
        items: list[Json] = []
        query = dict(params or {})
        for _ in range(max_pages):
            body = self.request("GET", path, params=query)
            page = body.get(key) if isinstance(body, dict) else None
            if not isinstance(page, list):
                raise CpError(502, "bad_response", f"the CP's {path} has no {key!r} list")
            items.extend(p for p in page if isinstance(p, dict))
            cursor = body.get("next_cursor")
            if not isinstance(cursor, str) or not cursor:
                return items
            query["cursor"] = cursor
        raise CpError(502, "bad_response", f"{path}: more than {max_pages} pages")

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


# --- tenant credentials ------------------------------------------------------------


def config_path() -> Path:
    explicit = os.environ.get("EE_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "easyenclave" / "config.json"


def load_config(path: Path | None = None) -> Json:
    """The tenant config file (``{}`` when there is none); a broken one is a UsageError."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"config {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not set(doc) <= {"cp", "key_file"} or not all(
            isinstance(v, str) for v in doc.values()):
        raise UsageError(f"config {path} must be {{\"cp\": URL, \"key_file\": PATH}} "
                         "(strings, nothing else)")
    if "key_file" in doc:
        doc["key_file"] = str(path.parent / Path(doc["key_file"]).expanduser())
    return doc


def add_tenant_options(parser: argparse.ArgumentParser) -> None:
    """``--cp``, ``--key``/``--token``, ``--key-file``/``--token-file`` (tenant commands)."""
    group = parser.add_argument_group(
        "control plane", "default: $EE_CP and $EE_API_KEY, else ~/.config/easyenclave/"
                         "config.json {\"cp\": URL, \"key_file\": FILE}")
    group.add_argument("--cp", metavar="URL", help=f"CP base URL (default {DEFAULT_CP_URL})")
    group.add_argument("--key", "--token", dest="token", metavar="KEY",
                       help="tenant API key (prefer --key-file: argv is visible to others)")
    group.add_argument("--key-file", "--token-file", dest="token_file", metavar="FILE",
                       help="read the API key from FILE")


def resolve_tenant(args: argparse.Namespace) -> tuple[str, str | None]:
    """(CP URL, API key or None) by the rules in the module docstring."""
    config = load_config()
    token = resolve_token(args, "EE_API_KEY") or os.environ.get("EE_TOKEN") or None
    if token is None and config.get("key_file"):
        try:
            token = Path(config["key_file"]).read_text().strip() or None
        except OSError as exc:
            raise UsageError(f"cannot read the config's key_file {config['key_file']}: "
                             f"{exc.strerror or exc}") from None
    url = (getattr(args, "cp", None) or os.environ.get("EE_CP") or os.environ.get("EE_CP_URL")
           or config.get("cp") or DEFAULT_CP_URL)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--cp must be an http(s) URL, not {url!r}")
    return str(url), token


def tenant_client_from_args(args: argparse.Namespace, *, timeout: float = 30.0) -> CpClient:
    url, token = resolve_tenant(args)
    if token is None:
        raise UsageError("no API key: give --key-file FILE, set $EE_API_KEY, or write "
                         f"{{\"key_file\": FILE}} to {config_path()}")
    return CpClient(url, token, timeout=timeout)


__all__ = [
    "DEFAULT_CP_URL",
    "CpClient",
    "CpError",
    "CpUnreachable",
    "CtlError",
    "Json",
    "UsageError",
    "add_cp_options",
    "add_tenant_options",
    "client_from_args",
    "config_path",
    "error_from_response",
    "load_config",
    "resolve_tenant",
    "resolve_token",
    "resolve_url",
    "tenant_client_from_args",
]
