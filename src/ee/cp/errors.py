"""API errors and the one place that maps exceptions to HTTP answers (API.md shape)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from quart import Response, request

from ee.runtime import ActorCrashed, ActorDead, AskTimeout, MailboxFull

log = logging.getLogger("ee.cp.http")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


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
