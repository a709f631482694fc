"""REST conventions of the tenant API, as pure values and functions (no I/O, no Trio).

Timestamps. Every instant in tenant JSON is RFC 3339 in UTC (``rfc3339``), e.g.
``2026-12-01T07:40:37Z``; an instant given by a client (``?since=``) may carry any UTC
offset and fractional seconds and is normalised to UTC (``parse_rfc3339``).

Pagination. List routes take ``limit`` (1..``MAX_LIMIT``, default ``DEFAULT_LIMIT``)
and ``cursor``, and answer ``next_cursor`` (null on the last page). Items are in a
stable order by a string key (the app name, the version, the deployment id); a cursor
names the last key of the page it ends. It is opaque to clients and *bound*: an
HMAC-SHA256 under a key of this CP process over (account, list, last key). A cursor
from another account, another list, an edited one or one from a CP that has since
restarted is refused (400 ``bad_cursor``: list again from the start). So a cursor
never lets one tenant page through what another sees, and a client cannot forge one.

Idempotency. Creating routes (create an app, add a version, deploy) accept an
``Idempotency-Key`` header (1..``MAX_KEY_CHARS`` of ``[A-Za-z0-9._:-]``). Keys are
scoped to the account: two tenants using one key never meet. The first request with a
key is run and its answer (status, body, ``Location``) kept if it is a success (2xx),
with a fingerprint of the request (method, path, content type, body bytes); a repeat
with the same fingerprint gets that answer again (``Idempotent-Replayed: true``) without
running anything; a repeat with another fingerprint is 409 ``idempotency_conflict``; a
repeat while the first is still running is 409 ``idempotency_in_progress`` (retry). A
refusal (4xx, 5xx) is not kept: the request may be retried with the same key once its
cause is fixed. Keys live in this CP process's memory for ``IDEMPOTENCY_TTL_S`` (24 h),
at most ``MAX_KEYS_PER_ACCOUNT`` per account and ``MAX_KEYS`` in all, and at most
``MAX_KEPT_BYTES_PER_ACCOUNT`` / ``MAX_KEPT_BYTES`` of kept answers (the oldest go
first; an answer larger than an account's budget is not kept); a CP restart forgets
them. This is enough for the purpose — a client retrying a request whose answer it lost
— and never blocks a request: a forgotten key runs the request again, which the creating
routes refuse as a conflict (409 ``conflict``: the app or version exists) where
repeating it would matter, except a deploy, which makes a second deployment.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import attrs

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 500
IDEMPOTENCY_TTL_S: Final = 24 * 3600.0
MAX_KEYS_PER_ACCOUNT: Final = 1000
MAX_KEYS: Final = 20_000
MAX_KEY_CHARS: Final = 255
#: Bytes of kept answers (a version's answer carries its compose file, up to 1 MiB),
#: per account and in all; an answer over the account's budget is not kept.
MAX_KEPT_BYTES_PER_ACCOUNT: Final = 16 << 20
MAX_KEPT_BYTES: Final = 256 << 20
_KEY = re.compile(r"\A[A-Za-z0-9._:-]{1,255}\Z")  # MAX_KEY_CHARS
_LIMIT = re.compile(r"\A[0-9]{1,4}\Z")
_RFC3339 = re.compile(  # ASCII digits only (``\d`` would take any script's digits)
    r"\A(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z",
    re.ASCII)


class RestError(Exception):
    """A request that breaks one of these conventions: a 400 with ``code`` and ``field``."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


# ---- timestamps ----------------------------------------------------------------------

def rfc3339(unix: float) -> str:
    """*unix* (seconds) as RFC 3339 UTC, to the second: ``2026-12-01T07:40:37Z``."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_field(value: object) -> object:
    """A stored instant (unix seconds, or already a string) as RFC 3339; others as is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return rfc3339(float(value))
    return value


def parse_rfc3339(text: str, field: str = "since") -> str:
    """*text* (RFC 3339, any offset) as UTC ``YYYY-MM-DDTHH:MM:SS[.fffffffff]Z``."""
    m = _RFC3339.match(text)
    if m is None:
        raise RestError("bad_request", f"'{field}' must be an RFC 3339 timestamp "
                        "(e.g. 2026-12-01T07:40:37Z)", field)
    frac = (m.group(7) or "")[1:]
    base = text[:19].replace("t", "T")
    offset = m.group(8).upper()
    try:
        at = datetime.fromisoformat(base + ("+00:00" if offset == "Z" else offset))
        utc = at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise RestError("bad_request", f"'{field}' is not a valid instant", field) from None
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def instant_key(text: object) -> int | None:
    """An RFC 3339 instant as integer nanoseconds since the epoch, for ordering (RFC 3339
    strings with trimmed fractions, as Docker writes them, do not sort as strings)."""
    if not isinstance(text, str):
        return None
    try:
        normal = parse_rfc3339(text)
    except RestError:
        return None
    whole, _, frac = normal[:-1].partition(".")
    seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


# ---- bodies --------------------------------------------------------------------------

def check_fields(body: Mapping[str, Any], allowed: Iterable[str], prefix: str = "") -> None:
    """Refuse the first field of *body* that is not in *allowed* (400 ``unknown_field``)."""
    known = set(allowed)
    for name in body:
        if name not in known:
            field = f"{prefix}{name}"
            raise RestError("unknown_field", f"unknown field {field!r} (allowed: "
                            f"{', '.join(sorted(known))})", field)


# ---- pagination ----------------------------------------------------------------------

@attrs.frozen
class PageRequest:
    limit: int
    after: str | None


@attrs.frozen
class Cursors:
    """Signs and checks cursors under *secret* (a fresh random key per CP process)."""

    secret: bytes = attrs.field(repr=False)

    def _mac(self, account: str, listing: str, after: str) -> str:
        msg = json.dumps([account, listing, after]).encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]

    def encode(self, account: str, listing: str, after: str) -> str:
        payload = json.dumps({"a": after, "m": self._mac(account, listing, after)})
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    def decode(self, account: str, listing: str, cursor: str) -> str:
        bad = RestError("bad_cursor", "'cursor' is not a cursor this list gave you (it may "
                        "be from before a CP restart): list again from the start", "cursor")
        if len(cursor) > 2048:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            doc = json.loads(raw.decode())
        except (binascii.Error, ValueError, UnicodeError, RecursionError):
            raise bad from None  # RecursionError: a forged cursor of nested arrays
        if not isinstance(doc, dict) or not isinstance(doc.get("a"), str) \
                or not isinstance(doc.get("m"), str) or not doc["m"].isascii():
            raise bad  # compare_digest refuses (TypeError) non-ASCII strings
        if not hmac.compare_digest(doc["m"], self._mac(account, listing, doc["a"])):
            raise bad
        return str(doc["a"])

    def request(self, account: str, listing: str, args: Mapping[str, str]) -> PageRequest:
        """``limit`` and ``cursor`` of a query string (400 on anything else)."""
        limit_text = args.get("limit")
        limit = DEFAULT_LIMIT
        if limit_text is not None:
            if not _LIMIT.match(limit_text) or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise RestError("bad_request", f"'limit' must be 1..{MAX_LIMIT}", "limit")
            limit = int(limit_text)
        cursor = args.get("cursor")
        after = None if cursor is None else self.decode(account, listing, cursor)
        return PageRequest(limit, after)

    def page(self, account: str, listing: str, keys: Sequence[str], req: PageRequest
             ) -> tuple[list[str], str | None]:
        """The keys of one page (from sorted *keys*) and the cursor of the next, if any."""
        start = 0
        if req.after is not None:
            start = next((i for i, k in enumerate(keys) if k > req.after), len(keys))
        chosen = list(keys[start:start + req.limit])
        more = start + req.limit < len(keys)
        return chosen, (self.encode(account, listing, chosen[-1]) if more and chosen else None)


# ---- idempotency ---------------------------------------------------------------------

def idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    if not _KEY.match(header):
        raise RestError("bad_idempotency_key", "'Idempotency-Key' must be 1.."
                        f"{MAX_KEY_CHARS} characters of A-Z a-z 0-9 . _ : -",
                        "Idempotency-Key")
    return header


def fingerprint(method: str, path: str, content_type: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), content_type.encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    h.update(body)
    return h.hexdigest()


@attrs.frozen
class Answer:
    """A kept answer: replayed as it was."""

    status: int
    body: bytes
    content_type: str
    location: str | None


@attrs.frozen
class _Entry:
    fingerprint: str
    expires: float
    answer: Answer | None  # None: the first request is still running


@attrs.frozen
class Run:
    """No answer kept: run the request (then ``finish`` or ``abandon``)."""


@attrs.frozen
class Replay:
    answer: Answer


@attrs.frozen
class Conflict:
    code: str  # idempotency_conflict | idempotency_in_progress


class IdempotencyKeys:
    """The keys of every account (pure: the caller passes the time)."""

    def __init__(self, ttl_s: float = IDEMPOTENCY_TTL_S,
                 per_account: int = MAX_KEYS_PER_ACCOUNT, total: int = MAX_KEYS,
                 bytes_per_account: int = MAX_KEPT_BYTES_PER_ACCOUNT,
                 total_bytes: int = MAX_KEPT_BYTES) -> None:
        self.ttl_s = ttl_s
        self.per_account = per_account
        self.total = total
        self.bytes_per_account = bytes_per_account
        self.total_bytes = total_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # oldest first
        self._counts: dict[str, int] = {}
        self._bytes: dict[str, int] = {}  # account -> bytes of its kept answers
        self.kept_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, account: str, key: str, print_: str, now: float) -> Run | Replay | Conflict:
        self._expire(now)
        entry = self._entries.get((account, key))
        if entry is not None:
            if entry.fingerprint != print_:
                return Conflict("idempotency_conflict")
            if entry.answer is None:
                return Conflict("idempotency_in_progress")
            return Replay(entry.answer)
        while self._counts.get(account, 0) >= self.per_account:
            self._drop(next(k for k in self._entries if k[0] == account))
        while len(self._entries) >= self.total:
            self._drop(next(iter(self._entries)))
        self._entries[(account, key)] = _Entry(print_, now + self.ttl_s, None)
        self._counts[account] = self._counts.get(account, 0) + 1
        return Run()

    def finish(self, account: str, key: str, answer: Answer) -> None:
        entry = self._entries.get((account, key))
        if entry is None:
            return
        size = _size(answer)
        if not 200 <= answer.status < 300 or size > self.bytes_per_account:
            self._drop((account, key))
            return
        self._entries[(account, key)] = attrs.evolve(entry, answer=answer)
        self._bytes[account] = self._bytes.get(account, 0) + size
        self.kept_bytes += size
        while self._bytes[account] > self.bytes_per_account:
            self._drop(next(k for k, e in self._entries.items()
                            if k[0] == account and e.answer is not None
                            and k != (account, key)))
        while self.kept_bytes > self.total_bytes:
            self._drop(next(k for k, e in self._entries.items()
                            if e.answer is not None and k != (account, key)))

    def abandon(self, account: str, key: str) -> None:
        if (account, key) in self._entries and self._entries[(account, key)].answer is None:
            self._drop((account, key))

    def _expire(self, now: float) -> None:
        while self._entries:
            k, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            self._drop(k)

    def _drop(self, k: tuple[str, str]) -> None:
        entry = self._entries.pop(k)
        if entry.answer is not None:
            size = _size(entry.answer)
            self.kept_bytes -= size
            kept = self._bytes[k[0]] - size
            if kept:
                self._bytes[k[0]] = kept
            else:
                del self._bytes[k[0]]
        left = self._counts[k[0]] - 1
        if left:
            self._counts[k[0]] = left
        else:
            del self._counts[k[0]]


def _size(answer: Answer) -> int:
    return len(answer.body) + len(answer.location or "") + len(answer.content_type)
