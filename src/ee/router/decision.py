"""The rollout decision: which CP stack (``old`` or ``new``) answers a request.

Theory of operation. A rollout moves traffic from the stable stack (``old``) to the
candidate (``new``) one *cohort* at a time, per *traffic class*, so a cohort never sees
its writes on one stack and its reads on the other, and raising a percentage only ever
moves cohorts forwards. The decision is pure (no I/O, no clock) and is implemented twice,
here and in ``deploy/cloudflare/worker.js``; ``tests/router/test_worker.py`` feeds both
the same 100,000 keys x classes and requires identical answers. Keep them in step.

1. **Kill switch first.** ``kill_switch: true`` sends everything to ``old``, whatever
   the percentages say (reason ``kill_switch``).
2. **Traffic class** from method + path, first matching row of ``CLASS_TABLE`` wins:
   ``A`` public/tenant reads (GET/HEAD), ``B`` tenant writes (apps, versions, deploy,
   capacity claims), ``C`` the agent plane (its websocket), ``D`` admin and billing,
   ``E`` federation. Each class has its own percentage and rolls independently.
3. **Cohort key** (``cohort_key``): ``account:<account id>`` for tenant traffic (the
   key's *account*, resolved by the router; never the raw key, so all of an account's
   keys, and the key that replaces a rotated one, land together); ``agent:<vm_name>``
   for the agent plane (header ``X-EE-Agent`` on the websocket upgrade);
   ``dc:<dc id>`` for federation (header ``X-EE-DC``); ``operator:<digest>`` for an
   admin token; ``client:<address>`` for callers without credentials. A request
   without a usable cohort key goes to ``old`` (reason ``no_cohort``).
4. **Bucket** = the first 8 bytes of SHA-256(UTF-8 cohort key), read big-endian, mod
   10,000. A class at ``pct`` percent sends buckets ``< pct * 100`` to ``new``. So the
   same key always lands on the same stack at a given percentage, and raising the
   percentage only moves keys from ``old`` to ``new``, never back (monotone).

Percentages are numbers in [0, 100] with at most two decimals (one bucket is 0.01 %),
so both implementations compute the same integer threshold without rounding.
Misclassification is not a security matter: both stacks authenticate every request;
the class only chooses which one answers.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

STACKS: Final = ("old", "new")
CLASSES: Final = ("A", "B", "C", "D", "E")
BUCKETS: Final = 10_000
STAGES: Final = (0, 2, 5, 10, 25, 50, 100)
"""The rollout ladder ``eectl rollout step`` / ``back`` walks."""
STACK_HEADER: Final = "X-EE-CP-Stack"
AGENT_HEADER: Final = "X-EE-Agent"
DC_HEADER: Final = "X-EE-DC"

#: (methods or "*", path regex, class): first match wins. Mirrored in worker.js.
CLASS_TABLE: Final[tuple[tuple[str, str, str], ...]] = (
    ("*", r"^/api/v2/federation(/|$)", "E"),
    ("*", r"^/api/v2/agents/connect$", "C"),
    ("*", r"^/api/v2/(admin|billing|datacenters)(/|$)", "D"),
    ("*", r"^/api/v2/agents(/|$)", "D"),
    ("POST", r"^/api/v2/accounts$", "D"),
    ("*", r"^/api/v2/capacity/pools(/|$)", "D"),
    ("GET", r"^/api/v2/capacity/launch-orders$", "D"),
    ("GET HEAD", r"^/", "A"),
    ("*", r"^/", "B"),
)
_COMPILED: Final = tuple((m.split() if m != "*" else None, re.compile(p), c)
                         for m, p, c in CLASS_TABLE)
_SLASHES: Final = re.compile(r"/{2,}")
EXTRA_FIELDS: Final = ("changed_at", "drill", "guardrails")
"""Fields the decision ignores and keeps: soak clocks, the drill result, guardrails."""
_NAME: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


class ConfigError(ValueError):
    """A rollout config document that does not validate (the message names the field)."""


def _percent(value: Any, where: str) -> int:
    """A percentage as basis points (0..10,000), refusing more than two decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not 0 <= value <= 100:
        raise ConfigError(f"{where}: a percentage must be a number in [0, 100]")
    points = round(value * 100)
    if abs(points - value * 100) > 1e-6:
        raise ConfigError(f"{where}: at most two decimals (one bucket is 0.01 %)")
    return int(points)


@attrs.frozen
class RolloutConfig:
    """``{"kill_switch": bool, "classes": {"A": pct, …}, "shadow": {"A": rate}}``.

    ``points`` holds each class's percentage in basis points; ``shadow`` the share of
    class-A requests mirrored to the other stack. ``extra`` keeps the fields operators'
    tools add (``changed_at``, ``drill``, ``guardrails``) so a round trip loses nothing.
    """

    kill_switch: bool = False
    points: Mapping[str, int] = attrs.field(factory=lambda: dict.fromkeys(CLASSES, 0))
    shadow: Mapping[str, float] = attrs.field(factory=dict)
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, doc: Any) -> RolloutConfig:
        if not isinstance(doc, dict):
            raise ConfigError("the rollout config must be a JSON object")
        unknown = set(doc) - {"kill_switch", "classes", "shadow", *EXTRA_FIELDS}
        if unknown:
            raise ConfigError(f"unknown field(s): {', '.join(sorted(unknown))}")
        kill = doc.get("kill_switch", False)
        if not isinstance(kill, bool):
            raise ConfigError("kill_switch: must be true or false")
        classes = doc.get("classes", {})
        if not isinstance(classes, dict) or set(classes) - set(CLASSES):
            raise ConfigError(f"classes: an object with keys among {', '.join(CLASSES)}")
        points = {c: _percent(classes.get(c, 0), f"classes.{c}") for c in CLASSES}
        shadow = doc.get("shadow", {})
        if not isinstance(shadow, dict) or set(shadow) - {"A"}:
            raise ConfigError("shadow: only class A (reads) may be shadowed")
        rates: dict[str, float] = {}
        for c, rate in shadow.items():
            if isinstance(rate, bool) or not isinstance(rate, int | float) or \
                    not math.isfinite(rate) or not 0 <= rate <= 1:
                raise ConfigError(f"shadow.{c}: a sample rate in [0, 1]")
            rates[c] = float(rate)
        extra = {k: doc[k] for k in EXTRA_FIELDS if k in doc}
        if not isinstance(extra.get("changed_at", {}), dict):
            raise ConfigError("changed_at: an object of class -> unix time")
        return cls(kill, points, rates, extra)

    def percent(self, klass: str) -> float:
        return self.points.get(klass, 0) / 100

    def to_json(self) -> dict[str, Any]:
        classes = {c: (p // 100 if p % 100 == 0 else p / 100) for c, p in self.points.items()}
        return {"kill_switch": self.kill_switch, "classes": classes, "shadow": dict(self.shadow),
                **self.extra}


@attrs.frozen
class Decision:
    stack: str  # "old" | "new"
    klass: str
    cohort: str | None
    bucket: int | None
    reason: str  # kill_switch | no_cohort | ramped | held


_UNRESERVED: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")
_PERCENT: Final = re.compile(r"%(..)?", re.DOTALL)
_DOT_SEGMENT: Final = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


def path_refusal(path: str) -> str | None:
    """Why a request path (as received, percent-encoding intact) is refused, or None.

    The router classifies the very string it forwards, so a path whose meaning a
    URL parser may change on the way (``//`` read as an authority, ``.``/``..``
    segments resolved, ``%61dmin`` decoded to ``admin``, ``%2F`` to ``/``, ``\\`` read
    as ``/``) is refused instead of being classified one way and served another.
    Mirrored in worker.js (``pathRefusal``).
    """
    if not path.startswith("/"):
        return "the path must start with '/'"
    if "//" in path:
        return "the path has an empty segment ('//')"
    if "\\" in path:
        return "the path has a backslash"
    if _DOT_SEGMENT.search(path):
        return "the path has a '.' or '..' segment"
    for m in _PERCENT.finditer(path):
        pair = m.group(1)
        if pair is None or not all(ch in "0123456789abcdefABCDEF" for ch in pair):
            return "the path has a malformed percent-encoding"
        if chr(int(pair, 16)) in _UNRESERVED:
            return f"the path percent-encodes an unreserved character or '/' (%{pair})"
    return None


def classify(method: str, path: str) -> str:
    """The traffic class of a request (``CLASS_TABLE``; runs of ``/`` count as one)."""
    method = method.upper()
    path = _SLASHES.sub("/", path.split("?", 1)[0]) or "/"
    for methods, pattern, klass in _COMPILED:
        if (methods is None or method in methods) and pattern.search(path):
            return klass
    return "B"  # unreachable: the last row matches every path


def bucket(key: str) -> int:
    """First 8 bytes of SHA-256(UTF-8 key), big-endian, mod 10,000."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % BUCKETS


def decide(config: RolloutConfig, klass: str, cohort: str | None) -> Decision:
    if config.kill_switch:
        return Decision("old", klass, cohort, None, "kill_switch")
    if not cohort:
        return Decision("old", klass, cohort, None, "no_cohort")
    b = bucket(cohort)
    if b < config.points.get(klass, 0):
        return Decision("new", klass, cohort, b, "ramped")
    return Decision("old", klass, cohort, b, "held")


def name_or_none(value: str | None) -> str | None:
    """A header-supplied name (vm_name, dc id) if it looks like one, else None."""
    return value if value is not None and _NAME.match(value) else None


def tenant_key_id(authorization: str | None) -> str | None:
    """The key id of ``Authorization: Bearer ee_<key id>_<secret>``, else None."""
    token = bearer(authorization)
    if token is None:
        return None
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "ee" or not _NAME.match(parts[1]):
        return None
    return parts[1]


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def cohort_key(klass: str, headers: Mapping[str, str], *, tenant: str | None,
               client: str | None) -> str | None:
    """The cohort key of a request whose tenant key (if any) resolved to *tenant*.

    *headers* have lower-case names. *tenant* is the cohort the router resolved for
    the request's API key (``account:<id>``, or ``key:<key id>`` for a valid key that
    is not a tenant's, i.e. a provisioner's); None when there is no API key or it did
    not resolve. *client* is the caller's address.
    """
    if klass == "C":
        vm = name_or_none(headers.get(AGENT_HEADER.lower()))
        return f"agent:{vm}" if vm else None
    if klass == "E":
        dc = name_or_none(headers.get(DC_HEADER.lower()))
        return f"dc:{dc}" if dc else None
    if tenant:
        return tenant
    token = bearer(headers.get("authorization"))
    if token is not None:
        if tenant_key_id(headers.get("authorization")) is not None:
            return None  # a tenant key whose account is unknown: the stable stack
        return "operator:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"client:{client}" if client else None


def next_stage(percent: float) -> int | None:
    """The stage after *percent* on the ladder (None at 100)."""
    return next((s for s in STAGES if s > percent), None)


def previous_stage(percent: float) -> int:
    """The stage before *percent* (0 at or below 0)."""
    below = [s for s in STAGES if s < percent]
    return below[-1] if below else 0
