"""Launch orders: the lifecycle of one request for a new VM, as a transition table.

::

    open ──claim──▶ claimed ──provisioning──▶ provisioning ──fulfil──▶ fulfilled
     │  ▲             │  │                        │
     │  └claim expiry─┘  └──fail──▶ failed ◀──fail─┴──provisioning timeout
     └──target dropped──▶ cancelled

A pool opens an order when it is short of warm agents; a provisioner (an account of
kind ``provisioner``) claims it and gets a one-time bootstrap token; it reports
``provisioning`` (optional, extends the claim into the provisioning window), then
``fulfilled`` with the VM name, or ``failed``. A claim that is neither advanced nor
reported before ``claim_expires_at`` goes back to ``open`` (its token revoked) so a
vanished provisioner never strands capacity. ``fulfilled``, ``failed`` and
``cancelled`` are final.

A fulfil report on a ``claimed`` order passes through ``provisioning`` (two table
steps: the VM was evidently provisioned). Any other move not in ``TRANSITIONS``
raises ``IllegalOrderTransition``.

``registered_at`` is not a state: it records that the order's VM presented its
bootstrap token at registration (which may come before or after the provisioner's
fulfil report). From then on the VM is an agent the pool counts itself, so the order
stops counting as capacity in flight.

Pure: no Trio, no clock — every ``now`` is passed in (seconds of the pool's clock).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs


class OrderState(enum.StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    PROVISIONING = "provisioning"
    FULFILLED = "fulfilled"
    FAILED = "failed"
    CANCELLED = "cancelled"


_S = OrderState

TRANSITIONS: Final[frozenset[tuple[OrderState, OrderState]]] = frozenset({
    (_S.OPEN, _S.CLAIMED),
    (_S.OPEN, _S.CANCELLED),
    (_S.CLAIMED, _S.OPEN),  # claim expired
    (_S.CLAIMED, _S.PROVISIONING),
    (_S.CLAIMED, _S.FAILED),
    (_S.PROVISIONING, _S.FULFILLED),
    (_S.PROVISIONING, _S.FAILED),  # reported, or provisioning timed out
})

FINAL: Final[frozenset[OrderState]] = frozenset({_S.FULFILLED, _S.FAILED, _S.CANCELLED})
#: States in which the order may still produce a VM.
LIVE: Final[frozenset[OrderState]] = frozenset({_S.OPEN, _S.CLAIMED, _S.PROVISIONING})
#: States in which the order's bootstrap token may be presented.
TOKEN_STATES: Final[frozenset[OrderState]] = frozenset({_S.CLAIMED, _S.PROVISIONING,
                                                        _S.FULFILLED})

_ID = re.compile(r"\A[A-Za-z0-9_.:-]{1,80}\Z")
MAX_TEXT: Final = 1000


def rfc3339(seconds: float) -> str:
    """A pool clock reading (unix seconds in production) as an RFC 3339 UTC string."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class IllegalOrderTransition(ValueError):
    """A move the lifecycle table does not allow (the caller's fault: HTTP 409)."""

    def __init__(self, order_id: str, current: OrderState, target: OrderState) -> None:
        super().__init__(
            f"launch order {order_id}: illegal transition {current.value} -> {target.value}")
        self.order_id = order_id
        self.current = current
        self.target = target


def check_transition(order_id: str, current: OrderState, target: OrderState) -> OrderState:
    """*target* if the table allows ``current → target``; else ``IllegalOrderTransition``."""
    if (current, target) in TRANSITIONS:
        return target
    raise IllegalOrderTransition(order_id, current, target)


def _order_id(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{attribute.name} must match {_ID.pattern}, not {value!r}")


def _text(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value
                              or len(value) > MAX_TEXT):
        raise ValueError(f"{attribute.name} must be a non-empty string of at most "
                         f"{MAX_TEXT} characters")


@attrs.frozen
class LaunchOrder:
    """One order for one VM of a pool. Times are the pool clock's seconds."""

    order_id: str = attrs.field(validator=_order_id)
    datacenter: str
    node_size: str
    state: OrderState = attrs.field(converter=OrderState)
    created_at: float
    updated_at: float
    claims: int = 0  # how many times it was claimed (a claim may expire)
    claimed_by: str | None = None
    claimed_at: float | None = None
    deadline: float | None = None  # claim expiry (claimed) or provisioning timeout
    token_sha256: str | None = None
    vm_name: str | None = attrs.field(default=None, validator=_text)
    error: str | None = attrs.field(default=None, validator=_text)
    finished_at: float | None = None
    registered_at: float | None = None
    registered_vm: str | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def _move(self, target: OrderState, now: float, **changes: Any) -> LaunchOrder:
        check_transition(self.order_id, self.state, target)
        if target in FINAL:
            changes.setdefault("finished_at", now)
            changes.setdefault("deadline", None)
        return attrs.evolve(self, state=target, updated_at=now, **changes)

    # ---- the moves -------------------------------------------------------------------

    def claim(self, now: float, *, ttl: float, token_sha256: str,
              by: str | None) -> LaunchOrder:
        return self._move(_S.CLAIMED, now, claims=self.claims + 1, claimed_by=by,
                          claimed_at=now, deadline=now + ttl, token_sha256=token_sha256)

    def expire_claim(self, now: float) -> LaunchOrder:
        """Back to ``open``: the claim, its provisioner and its token are forgotten."""
        return self._move(_S.OPEN, now, claimed_by=None, claimed_at=None, deadline=None,
                          token_sha256=None)

    def provisioning(self, now: float, *, ttl: float, vm_name: str | None = None
                     ) -> LaunchOrder:
        return self._move(_S.PROVISIONING, now, deadline=now + ttl,
                          vm_name=vm_name or self.vm_name)

    def fulfil(self, now: float, vm_name: str) -> LaunchOrder:
        order = self
        if order.state is _S.CLAIMED:
            order = order._move(_S.PROVISIONING, now)
        return order._move(_S.FULFILLED, now, vm_name=vm_name)

    def fail(self, now: float, error: str) -> LaunchOrder:
        return self._move(_S.FAILED, now, error=error[:MAX_TEXT] or "failed")

    def cancel(self, now: float, reason: str) -> LaunchOrder:
        return self._move(_S.CANCELLED, now, error=reason[:MAX_TEXT] or "cancelled")

    def registered(self, now: float, vm_name: str) -> LaunchOrder:
        """Its VM registered with the order's token (no state change)."""
        return attrs.evolve(self, registered_at=now, registered_vm=vm_name, updated_at=now)

    # ---- counting --------------------------------------------------------------------

    def in_flight(self, now: float, grace_s: float) -> bool:
        """Does this order still stand for a VM the pool does not count yet?

        Live orders do, until their VM registers; a fulfilled order does for
        ``grace_s`` after fulfilment (the VM is booting and will register).
        """
        if self.registered_at is not None:
            return False
        if self.live:
            return True
        return (self.state is _S.FULFILLED and self.finished_at is not None
                and now < self.finished_at + grace_s)

    # ---- (de)serialisation -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc = attrs.asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LaunchOrder:
        known = {a.name for a in attrs.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def view(self, iso: Callable[[float], str] | None = None) -> dict[str, Any]:
        """The API form (no token hash); *iso* formats the time fields, e.g. ``rfc3339``."""
        doc = self.to_json()
        doc.pop("token_sha256")
        if iso is not None:
            for key in ("created_at", "updated_at", "claimed_at", "deadline", "finished_at",
                        "registered_at"):
                if doc[key] is not None:
                    doc[key] = iso(doc[key])
        return doc


ORDER_UNKNOWN: Final = "ORDER_UNKNOWN"
ORDER_CONFLICT: Final = "ORDER_CONFLICT"
ORDER_NOT_YOURS: Final = "ORDER_NOT_YOURS"


@attrs.frozen
class OrderRefusal:
    """A provisioner's report that cannot be applied, and why (HTTP: 404 / 409 / 403)."""

    code: str = attrs.field(validator=attrs.validators.in_(
        (ORDER_UNKNOWN, ORDER_CONFLICT, ORDER_NOT_YOURS)))
    message: str

    @property
    def http_status(self) -> int:
        return {ORDER_UNKNOWN: 404, ORDER_CONFLICT: 409, ORDER_NOT_YOURS: 403}[self.code]


def count_in_flight(orders: Iterable[LaunchOrder], now: float, grace_s: float) -> int:
    return sum(1 for o in orders if o.in_flight(now, grace_s))


def by_state(orders: Iterable[LaunchOrder]) -> dict[str, int]:
    """Orders counted per state, every state present (metrics, pool views)."""
    counts = {s.value: 0 for s in OrderState}
    for order in orders:
        counts[order.state.value] += 1
    return counts
