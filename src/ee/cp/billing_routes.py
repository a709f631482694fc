"""Billing routes: a tenant's balance, usage and ledger; admin credits, corrections,
prices, earnings and the ledger proof; the payment processor's webhook.

Money moves only through here and the meter (``ee.cp.billing``): a tenant key can read
its own account and nothing else, and cannot credit itself (credits are admin routes,
payments need the webhook's HMAC). Every request body is a frozen class structured
strictly (``errors.request_body``); every refusal is a 4xx with a reason code, checked
before anything is written. Pages are newest first, at most ``MAX_PAGE`` rows, with a
``next_before`` cursor (the smallest id in the page).

The webhook (``POST /api/v2/billing/payments``, no bearer token) carries
``EE-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``; a
signature older or newer than ``webhook_tolerance_s`` is refused (a captured request
cannot be replayed later), and the payment's ``event_id`` is its idempotency key (a
replay inside the window is the same transaction, not a second payment).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from ee.cp.billing import Prices, WebhookSecretError, at_text, read_webhook_secret
from ee.cp.errors import (
    ApiError,
    Who,
    guard,
    json_response,
    not_found,
    request_body,
    structure_request,
)
from ee.cp.records import get_account
from ee.cp.store import ledger
from ee.cp.store.ledger import (
    AlreadyCorrected,
    Entry,
    IdempotencyConflict,
    LedgerError,
    NoSuchTransaction,
    Posting,
)
from ee.protocol.strict import check

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane
    from ee.cp.tenants import Auth

MAX_PAGE: Final = 500
DEFAULT_PAGE: Final = 100
_KEY = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,199}\Z")
_DIGITS = re.compile(r"\A[0-9]{1,18}\Z")
_SIGNATURE = re.compile(r"\At=([0-9]{1,12}),v1=([0-9a-f]{64})\Z")


def _amount(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) \
        and 0 < value <= ledger.MAX_AMOUNT


def _reason(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= 500 \
        and value.isprintable()


_AMOUNT = check(_amount, f"must be an integer 1..{ledger.MAX_AMOUNT} (minor units)")
_CURRENCY = check(lambda v: v in ledger.CURRENCIES,
                  f"must be one of {', '.join(sorted(ledger.CURRENCIES))}")
_REASON = check(_reason, "must be 1..500 printable characters")
# Request keys are stored behind a prefix ("correction:" is the longest, 11) and a
# stored key is at most 200 characters: 180 leaves room for every prefix.
MAX_REQUEST_KEY: Final = 180
_REQUEST_KEY = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,179}\Z")  # MAX_REQUEST_KEY
_IDEMPOTENCY = check(lambda v: bool(_REQUEST_KEY.match(v)),
                     f"must be 1..{MAX_REQUEST_KEY} characters of [A-Za-z0-9._:-]")
_ACCOUNT_ID = check(lambda v: bool(_KEY.match(v)),
                    "must be 1..200 characters of [A-Za-z0-9._:-]")


@attrs.frozen
class CreditRequest:
    """``POST /api/v2/admin/accounts/{account_id}/credits``."""

    amount_minor: int = attrs.field(validator=_AMOUNT)
    currency: str = attrs.field(validator=_CURRENCY)
    reason: str = attrs.field(validator=_REASON)
    idempotency_key: str = attrs.field(validator=_IDEMPOTENCY)


@attrs.frozen
class CorrectionRequest:
    """``POST /api/v2/admin/ledger/{txn_id}/corrections``: reverse a transaction."""

    reason: str = attrs.field(validator=_REASON)
    idempotency_key: str = attrs.field(validator=_IDEMPOTENCY)


@attrs.frozen
class PaymentEvent:
    """The payment processor's webhook body (signed)."""

    event_id: str = attrs.field(validator=_IDEMPOTENCY)
    account_id: str = attrs.field(validator=_ACCOUNT_ID)
    amount_minor: int = attrs.field(validator=_AMOUNT)
    currency: str = attrs.field(validator=_CURRENCY)


def sign_payment(secret: bytes, body: bytes, t: int) -> str:
    """The ``EE-Signature`` header value for *body* sent at unix time *t*."""
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def check_signature(secret: bytes, header: str | None, body: bytes, now: float,
                    tolerance_s: int) -> None:
    """Raise a 401 unless *header* signs *body* with *secret*, inside the window."""
    match = _SIGNATURE.match(header or "")
    if match is None:
        raise ApiError(401, "bad_signature",
                       "the 'EE-Signature: t=<unix>,v1=<hex hmac-sha256>' header is "
                       "missing or malformed")
    t = int(match[1])
    if abs(now - t) > tolerance_s:
        raise ApiError(401, "stale_signature",
                       f"the signature's time is more than {tolerance_s} s from now",
                       {"tolerance_s": tolerance_s})
    expected = sign_payment(secret, body, t).split(",v1=", 1)[1]
    if not hmac.compare_digest(expected, match[2]):
        raise ApiError(401, "bad_signature", "the signature does not match the body")


def _page_args() -> tuple[int, int | None]:
    limit_text = request.args.get("limit", str(DEFAULT_PAGE))
    before_text = request.args.get("before")
    if not _DIGITS.match(limit_text) or not 1 <= int(limit_text) <= MAX_PAGE:
        raise ApiError(400, "bad_request", f"'limit' must be an integer 1..{MAX_PAGE}",
                       {"field": "limit", "max": MAX_PAGE})
    before = None
    if before_text is not None:
        if not _DIGITS.match(before_text) or int(before_text) < 1:
            raise ApiError(400, "bad_request", "'before' must be a positive integer "
                           "(a page's next_before)", {"field": "before"})
        before = int(before_text)
    return int(limit_text), before


def _csv_cell(value: object) -> object:
    """Text that a spreadsheet would run as a formula is quoted with a leading '."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


LEDGER_CSV_COLUMNS: Final = ("at", "kind", "amount_minor", "currency", "memo",
                             "idempotency_key")


def tenant_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as its tenant sees it: no platform-wide ids (``entry_id``,
    ``txn_id``, ``corrects``, the ``usage:<id>`` key of a charge, which counts every
    tenant's windows); a charge's memo names its deployment, replica and window."""
    key = row["idempotency_key"]
    return {"at": row["at"], "kind": row["kind"], "amount_minor": row["amount_minor"],
            "currency": row["currency"], "memo": row["memo"],
            "idempotency_key": None if str(key).startswith("usage:") else key}


def ledger_csv(entries: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LEDGER_CSV_COLUMNS)
    for e in entries:
        writer.writerow([_csv_cell(e[c]) if c != "amount_minor" else e[c]
                         for c in LEDGER_CSV_COLUMNS])
    return out.getvalue()


def register(app: QuartTrio, cp: ControlPlane, auth: Auth) -> None:
    def store() -> Any:
        if cp.accounts is None:
            raise ApiError(503, "unavailable", "the account store is not available yet")
        return cp.accounts

    async def db(work: Any) -> Any:
        try:
            return await cp.billing._db(work)
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc),
                           {"idempotency_key": exc.key}) from None
        except LedgerError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    async def tenant_account(account_id: str) -> None:
        account = await get_account(store(), account_id)
        if account is None:
            raise not_found("account", account_id)
        if account.kind != "tenant":
            raise ApiError(400, "not_a_tenant",
                           f"account {account_id!r} is a {account.kind} account; only "
                           "tenant accounts hold a balance", {"field": "account_id"})

    def posted(result: ledger.Posted) -> Response:
        return json_response({"transaction": result.to_dict(), "created": result.created},
                             201 if result.created else 200)

    # ---- tenant ----------------------------------------------------------------------

    @app.get("/api/v2/accounts/me/balance")
    @guard(Who.TENANT)
    async def my_balance() -> Response:
        account_id = await auth.authenticate(("tenant",))
        currency = cp.billing.settings.prices.currency
        amount = await db(lambda c: ledger.balance(c, ledger.tenant_account(account_id),
                                                   currency))
        hold = (await db(ledger.holds)).get(account_id)
        return json_response({
            "account_id": account_id, "balance_minor": amount, "currency": currency,
            "low_balance": hold is not None,
            "suspended": hold is not None and hold[1] is not None})

    @app.get("/api/v2/accounts/me/usage")
    @guard(Who.TENANT)
    async def my_usage() -> Response:
        account_id = await auth.authenticate(("tenant",))
        limit, before = _page_args()
        deployment_id = request.args.get("deployment_id")
        if deployment_id is not None and not _KEY.match(deployment_id):
            raise ApiError(400, "bad_request", "'deployment_id' is not a deployment id",
                           {"field": "deployment_id"})
        rows = await db(lambda c: ledger.usage_page(c, account_id, limit, before,
                                                    deployment_id))
        for row in rows:
            row["window_start"] = at_text(row.pop("window") * 60)
        return json_response({"usage": rows, "next_before": rows[-1]["id"]
                              if len(rows) == limit else None})

    @app.get("/api/v2/accounts/me/ledger")
    @guard(Who.TENANT)
    async def my_ledger() -> Response:
        account_id = await auth.authenticate(("tenant",))
        limit, before = _page_args()
        fmt = request.args.get("format", "json")
        if fmt not in ("json", "csv"):
            raise ApiError(400, "bad_request", "'format' must be json or csv",
                           {"field": "format"})
        rows = await db(lambda c: ledger.ledger_page(c, ledger.tenant_account(account_id),
                                                     limit, before))
        next_before = rows[-1]["entry_id"] if len(rows) == limit else None
        rows = [tenant_entry(r) for r in rows]
        if fmt == "csv":
            answer = Response(ledger_csv(rows), content_type="text/csv; charset=utf-8")
            if next_before is not None:
                answer.headers["EE-Next-Before"] = str(next_before)
            return answer
        return json_response({"entries": rows, "next_before": next_before})

    # ---- admin -----------------------------------------------------------------------

    @app.post("/api/v2/admin/accounts/<account_id>/credits")
    @guard(Who.ADMIN)
    async def credit(account_id: str) -> Response:
        auth.admin_only()
        body = await request_body(CreditRequest)
        await tenant_account(account_id)
        posting = Posting(f"credit:{body.idempotency_key}", "credit", "admin", (
            Entry(ledger.tenant_account(account_id), body.currency, body.amount_minor),
            Entry(ledger.PLATFORM_PROMOTIONS, body.currency, -body.amount_minor)),
            body.reason, data={"account_id": account_id})
        now = at_text(time.time())
        result = await db(lambda c: ledger.post(c, posting, now, (
            "admin", "billing.credit", account_id,
            {"amount_minor": body.amount_minor, "currency": body.currency,
             "reason": body.reason, "idempotency_key": body.idempotency_key})))
        if result.created:
            cp.events.emit("billing.credit", account_id, {
                "amount_minor": body.amount_minor, "currency": body.currency,
                "reason": body.reason, "txn_id": result.txn_id})
        return posted(result)

    @app.post("/api/v2/admin/ledger/<txn_id>/corrections")
    @guard(Who.ADMIN)
    async def correct(txn_id: str) -> Response:
        auth.admin_only()
        body = await request_body(CorrectionRequest)
        if not _DIGITS.match(txn_id):
            raise not_found("transaction", txn_id)
        now = at_text(time.time())
        try:
            result = await cp.billing._db(lambda c: ledger.reverse(
                c, int(txn_id), f"correction:{body.idempotency_key}", "admin", body.reason,
                now))
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc),
                           {"idempotency_key": exc.key}) from None
        except NoSuchTransaction:
            raise not_found("transaction", txn_id) from None
        except AlreadyCorrected as exc:
            raise ApiError(409, "already_corrected", str(exc),
                           {"txn_id": exc.txn_id, "corrected_by": exc.by}) from None
        except LedgerError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        if result.created:
            cp.events.emit("billing.correction", txn_id, {"txn_id": result.txn_id,
                                                          "reason": body.reason})
        return posted(result)

    @app.get("/api/v2/admin/prices")
    @guard(Who.ADMIN)
    async def prices() -> Response:
        auth.admin_only()
        current = await cp.billing.price_book()
        books = await db(ledger.price_books)
        return json_response({"current": current.to_dict(), "versions": [
            {"version": v, "created_at": at, "actor": actor, **doc}
            for v, at, actor, doc in books]})

    @app.put("/api/v2/admin/prices")
    @guard(Who.ADMIN)
    async def set_prices() -> Response:
        auth.admin_only()
        body = await request_body(Prices)
        await cp.billing.price_book()  # version 1 is the configured book
        now = at_text(time.time())
        version = await db(lambda c: ledger.add_price_book(c, body.to_dict(), "admin", now))
        await store().append_audit("admin", "billing.prices", str(version), body.to_dict())
        cp.events.emit("billing.prices", str(version), body.to_dict())
        return json_response({"version": version, **body.to_dict()}, 201)

    @app.get("/api/v2/admin/earnings")
    @guard(Who.ADMIN)
    async def earnings() -> Response:
        auth.admin_only()
        providers = await db(lambda c: ledger.balances(c, "provider:"))
        platform = await db(lambda c: ledger.balances(c, "platform:"))
        return json_response({
            "providers": [{"account_id": a.removeprefix("provider:"), "currency": cur,
                           "earned_minor": b} for a, cur, b in providers],
            "platform": [{"account": a, "currency": cur, "balance_minor": b}
                         for a, cur, b in platform]})

    @app.get("/api/v2/admin/billing")
    @guard(Who.ADMIN)
    async def overview() -> Response:
        auth.admin_only()
        tenants = await db(lambda c: ledger.balances(c, "tenant:"))
        holds = await db(ledger.holds)
        passes = await db(ledger.last_passes)
        return json_response({
            "accounts": [{"account_id": a.removeprefix("tenant:"), "currency": cur,
                          "balance_minor": b} for a, cur, b in tenants],
            "holds": [{"account_id": a, "low_since": at_text(s),
                       "suspended_at": None if x is None else at_text(x)}
                      for a, (s, x) in sorted(holds.items())],
            "last_passes": passes, "summary": await db(ledger.summary)})

    @app.get("/api/v2/admin/billing/verify")
    @guard(Who.ADMIN)
    async def verify() -> Response:
        auth.admin_only()
        problems = await db(ledger.verify)
        return json_response({"ok": not problems,
                              "problems": [p.to_dict() for p in problems],
                              "summary": await db(ledger.summary)})

    # ---- the payment processor -------------------------------------------------------

    @app.post("/api/v2/billing/payments")
    @guard(Who.PUBLIC)
    async def payment() -> Response:
        settings = cp.billing.settings
        if not settings.webhook_secret_file:
            raise ApiError(404, "not_found", "no payment webhook is configured")
        try:
            secret = await trio.to_thread.run_sync(read_webhook_secret,
                                                   settings.webhook_secret_file)
        except WebhookSecretError:  # changed since start: refuse rather than trust it
            raise ApiError(503, "webhook_misconfigured",
                           "the payment webhook's secret is missing or too short; the "
                           "operator must fix billing.webhook_secret_file") from None
        raw = g.get("public_body", b"")  # read (and capped) by the gate
        assert isinstance(raw, bytes)
        check_signature(secret, request.headers.get("EE-Signature"), raw, time.time(),
                        settings.webhook_tolerance_s)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ApiError(400, "bad_request", "the body is not JSON") from None
        event = structure_request(doc, PaymentEvent)
        await tenant_account(event.account_id)
        posting = Posting(f"payment:{event.event_id}", "payment", "webhook", (
            Entry(ledger.tenant_account(event.account_id), event.currency,
                  event.amount_minor),
            Entry(ledger.EXTERNAL_PAYMENTS, event.currency, -event.amount_minor)),
            f"payment {event.event_id}", data={"account_id": event.account_id})
        now = at_text(time.time())
        result = await db(lambda c: ledger.post(c, posting, now, (
            "webhook", "billing.payment", event.account_id,
            {"event_id": event.event_id, "amount_minor": event.amount_minor})))
        if result.created:
            cp.events.emit("billing.payment", event.account_id, {
                "event_id": event.event_id, "amount_minor": event.amount_minor,
                "txn_id": result.txn_id})
        return posted(result)
