"""API errors, request bodies, and the one place that maps exceptions to HTTP answers.

Every answer that is not a success is ``{"error": {"code", "message", "details"}}``
(API.md). Request bodies are structured into frozen attrs classes by one strict cattrs
converter (``request_body``): a wrong JSON type, a missing field or an unknown field is
a 400 naming the field in ``details.field``, never a guess and never a 500.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from quart import Response, request

from ee.protocol.strict import make_converter, problems
from ee.runtime import ActorCrashed, ActorDead, AskTimeout, MailboxFull

log = logging.getLogger("ee.cp.http")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class ApiError(Exception):
    """A refusal: status, reason code, human message, details (and response headers).

    ``close_connection`` marks an answer given before the request body was read: it
    carries ``Connection: close`` so that neither side reads the unread body as the
    next request.
    """

    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None, *,
                 headers: Mapping[str, str] | None = None,
                 close_connection: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = dict(headers or {})
        self.close_connection = close_connection

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    def response(self) -> Response:
        answer = json_response(self.body(), self.status)
        for name, value in self.headers.items():
            answer.headers[name] = value
        if self.close_connection:
            answer.headers["Connection"] = "close"
        return answer


class Who(enum.Enum):
    """Who may call a route; the gate checks it on headers, before the body."""

    PUBLIC = "public"
    ANY = "any"  # any valid credential; the route checks the kind (the default)
    ADMIN = "admin"
    TENANT = "tenant"
    PROVISIONER = "provisioner"


def guard(who: Who) -> Callable[[F], F]:
    """Mark a view function with who may call it (read by the gate)."""

    def mark(fn: F) -> F:
        setattr(fn, "__ee_who__", who)  # noqa: B010
        return fn

    return mark


def who_may_call(view: object) -> Who:
    return getattr(view, "__ee_who__", Who.ANY) if view is not None else Who.PUBLIC


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it is."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(token_ok: Callable[[str], bool]) -> None:
    """401 without a bearer token, 403 when it is not the admin token."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise ApiError(401, "unauthenticated",
                       "this route needs 'Authorization: Bearer <admin token>'")
    if not token_ok(token):
        raise ApiError(403, "forbidden", "the token is not the admin token")


async def json_object(*, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong with it.

    Refuses (never 500s on) bodies that are not UTF-8, not JSON, nested too deeply, not
    an object, or carry strings that are not valid Unicode (lone surrogates).
    """
    raw = await request.get_data(as_text=False)
    if not raw and not required:
        return {}
    try:
        body = json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeError:
        raise ApiError(400, "bad_request", "the body is not valid UTF-8 / Unicode") from None
    except RecursionError:
        raise ApiError(400, "bad_request", "the body's JSON is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


_requests = make_converter(forbid_extra_keys=True)


def structure_request(body: object, cls: type[T]) -> T:
    """*body* (parsed JSON) as a *cls*, or a 400 naming the first bad field."""
    try:
        return _requests.structure(body, cls)
    except Exception as exc:  # cattrs raises exception groups of any builtin kind
        found = problems(exc)
        field, reason = found[0]
        details: dict[str, Any] = {"field": field} if field else {}
        if len(found) > 1:
            details["problems"] = [{"field": f, "reason": r} for f, r in found]
        message = f"'{field}': {reason}" if field else reason
        raise ApiError(400, "bad_request", message, details) from None


async def request_body(cls: type[T], *, required: bool = True) -> T:
    """The request body structured into *cls* (a frozen attrs class).

    An empty body is ``{}`` when not *required* (every field then takes its default).
    """
    return structure_request(await json_object(required=required), cls)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {ident!r}")


def from_exception(exc: BaseException) -> ApiError:
    """Map any exception escaping a route to an ApiError (never a stack trace)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ActorDead):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, ActorCrashed):
        # The actor is being restarted by its supervisor; the request may be retried.
        log.error("actor crashed while answering a request: %s", exc.cause)
        return ApiError(503, "actor_restarting",
                        f"{exc.name} crashed while answering and is restarting; retry",
                        {"retry_after_s": 1})
    if isinstance(exc, AskTimeout | MailboxFull):
        return ApiError(503, "busy", f"the control plane is overloaded: {exc}")
    log.exception("unhandled error in a route", exc_info=exc)
    return ApiError(500, "internal", "internal error; see the CP log")
