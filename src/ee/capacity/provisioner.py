"""The provisioner: turns launch orders into booted VMs, behind a :class:`Launcher`.

Theory of operation
-------------------

A provisioner holds a provisioner key (an account of kind ``provisioner``) and a list
of pools (datacenter, node size) it serves. Each pass of its loop:

1. **reap** — VMs this launcher made that are no longer running (an agent that could
   not reach its CP powered its VM off, see ``AgentConfig.unreachable_terminate_after_s``)
   are deleted.
2. **claim** — while fewer than ``max_vms`` orders are being worked on, it claims an
   order per pool (``POST …/launch-orders/claim``; 204: nothing to do) and starts a
   task for it.

One order's task: report ``provisioning`` with the VM name (the name is derived from
the order id, so a retry reuses it), launch the VM with the order's one-time
bootstrap token, retrying a failed launch after a bounded, jittered backoff
(:func:`retry_delay`) up to ``max_attempts`` times (deleting whatever a failed attempt
left), then report ``fulfil`` — or ``fail`` with the last error. When the CP refuses a
report because the order is no longer ours (it expired back to ``open``, timed out to
``failed``, or was taken over: 403/404/409), the VM made for it is deleted: its token
is revoked and a VM nobody ordered must not linger. A report the CP could not answer
(transport error, 5xx) is retried with the same backoff.

A claim answer is untrusted input: :func:`parse_grant` structures it strictly (a
malformed answer — not JSON, no ``bootstrap_token``, an order id outside the CP's id
format — claims nothing and is logged), and :func:`grant_mismatch` refuses an order of
a pool other than the one claimed (reported ``fail``, nothing launched). VM names carry
a digest of the exact order id (:func:`vm_name_for`), so distinct orders never share a
name; a launcher refuses a name that is taken (:class:`NameTaken`) and the provisioner
then fails the order without deleting the VM it did not make.

The decisions — the VM name, the retry delay, what a report answer means — are pure
functions below; :class:`Provisioner` only moves HTTP requests and launcher calls.
Time is Trio's: tests run the loop under the autojump clock with a fake CP transport
or a real ``ee-cp``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import httpx
import trio

from ee.agent.backoff import backoff_delay
from ee.capacity.orders import _ID as ORDER_ID
from ee.supervisors.supervisor import ChildSpec, Supervisor

__all__ = [
    "BadGrant",
    "Grant",
    "LaunchFailed",
    "LaunchRequest",
    "Launcher",
    "NameTaken",
    "Provisioner",
    "ProvisionerSettings",
    "ReportAnswer",
    "classify_report",
    "grant_mismatch",
    "parse_grant",
    "retry_delay",
    "supervised",
    "vm_name_for",
]

log = logging.getLogger("ee.capacity.provisioner")


class LaunchFailed(Exception):
    """One launch attempt failed; the message says why (it goes into the fail report)."""


class NameTaken(LaunchFailed):
    """A VM the launcher did not make for this order holds the name: not retried, and
    the VM is left alone."""


class BadGrant(ValueError):
    """A claim answer that is not a well-formed grant (nothing is claimed)."""


@attrs.frozen
class LaunchRequest:
    order_id: str
    vm_name: str
    datacenter: str
    node_size: str
    bootstrap_token: str = attrs.field(repr=False)


class Launcher(Protocol):
    """What a provisioner needs from a cloud (libvirt here; GCP later)."""

    async def launch(self, request: LaunchRequest) -> None:
        """Create and start the VM (LaunchFailed; may leave a partial VM behind)."""

    async def destroy(self, vm_name: str) -> None:
        """Delete the VM and everything made for it; no error when there is none."""

    async def launched(self) -> Mapping[str, str]:
        """vm_name → state (``running`` or anything else) of the VMs this launcher made."""


@attrs.frozen
class ProvisionerSettings:
    pools: tuple[tuple[str, str], ...]  # (datacenter, node_size)
    max_vms: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    backoff_base_s: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    backoff_max_s: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    poll_interval_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    report_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))


# ---- pure decisions -------------------------------------------------------------------

_UNSAFE = re.compile(r"[^a-z0-9]+")
_TOKEN = re.compile(r"\A[\x21-\x7e]{1,512}\Z")
_POOL_TEXT = re.compile(r"\A[\x21-\x7e]{1,200}\Z")


def vm_name_for(order_id: str, prefix: str = "ee") -> str:
    """A VM name (libvirt and DNS safe, <= 63 chars) derived from the order id: a
    readable slug plus a digest of the exact id, so distinct ids never share a name."""
    slug = _UNSAFE.sub("-", order_id.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(order_id.encode()).hexdigest()[:10]
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


@attrs.frozen
class Grant:
    """A claimed order, as the provisioner acts on it."""

    order_id: str
    datacenter: str
    node_size: str
    bootstrap_token: str = attrs.field(repr=False)


def parse_grant(body: object) -> Grant:
    """The claim answer ``{"order": {...}, "bootstrap_token": ...}`` structured; BadGrant
    when anything is missing, mistyped or outside its format."""
    if not isinstance(body, Mapping):
        raise BadGrant(f"a claim answer is an object, not {type(body).__name__}")
    order, token = body.get("order"), body.get("bootstrap_token")
    if not isinstance(order, Mapping):
        raise BadGrant("the claim answer has no order object")
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise BadGrant("the claim answer has no usable bootstrap_token")
    order_id = order.get("order_id")
    if not isinstance(order_id, str) or not ORDER_ID.match(order_id):
        raise BadGrant(f"order_id {str(order_id)[:100]!r} is not a CP order id")
    fields = {}
    for key in ("datacenter", "node_size"):
        value = order.get(key)
        if not isinstance(value, str) or not _POOL_TEXT.match(value):
            raise BadGrant(f"order {order_id}: {key} {str(value)[:100]!r} is not a pool key")
        fields[key] = value
    return Grant(order_id=order_id, datacenter=fields["datacenter"],
                 node_size=fields["node_size"], bootstrap_token=token)


def grant_mismatch(grant: Grant, datacenter: str, node_size: str) -> str | None:
    """Why *grant* must not be launched for a claim on pool (datacenter, node_size)."""
    if (grant.datacenter, grant.node_size) != (datacenter, node_size):
        return (f"claimed pool {datacenter}/{node_size} but the order is for "
                f"{grant.datacenter}/{grant.node_size}: not launched")
    return None


def retry_delay(attempt: int, settings: ProvisionerSettings, jitter: float) -> float:
    """The wait after failed attempt *attempt* (1-based): exponential, capped, jittered."""
    return backoff_delay(attempt, settings.backoff_base_s, settings.backoff_max_s, jitter)


class ReportAnswer(enum.Enum):
    OK = "ok"
    GONE = "gone"  # the order is not ours any more: delete its VM
    RETRY = "retry"  # no usable answer: ask again


def classify_report(status: int | None) -> ReportAnswer:
    """What a CP answer to a report means (None: no answer at all)."""
    if status is not None and 200 <= status < 300:
        return ReportAnswer.OK
    if status in (403, 404, 409):
        return ReportAnswer.GONE
    return ReportAnswer.RETRY


# ---- the loop -----------------------------------------------------------------------


@attrs.define
class Counters:
    claimed: int = 0
    fulfilled: int = 0
    failed: int = 0
    gone: int = 0
    reaped: int = 0
    launch_attempts: int = 0


class Provisioner:
    def __init__(self, client: httpx.AsyncClient, launcher: Launcher,
                 settings: ProvisionerSettings, *,
                 rng: random.Random | None = None,
                 say: Callable[[str], None] = log.info) -> None:
        self.client = client  # base_url = the CP, Authorization = the provisioner key
        self.launcher = launcher
        self.settings = settings
        self.rng = rng or random.Random()
        self.say = say
        self.active: set[str] = set()  # order ids being worked on
        self.launching: set[str] = set()  # their VM names (never reaped mid-launch)
        self.counters = Counters()
        self._stop = trio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, task_status: trio.TaskStatus[Provisioner] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as orders:
            task_status.started(self)
            while not self._stop.is_set():
                await self.reap()
                await self.claim_all(orders)
                with trio.move_on_after(self.settings.poll_interval_s):
                    await self._stop.wait()
            orders.cancel_scope.cancel()

    async def reap(self) -> None:
        for name, state in sorted((await self.launcher.launched()).items()):
            if state != "running" and name not in self.launching:
                self.say(f"{name} is {state} (powered off?): deleting it")
                await self.launcher.destroy(name)
                self.counters.reaped += 1

    async def claim_all(self, orders: trio.Nursery) -> None:
        for datacenter, node_size in self.settings.pools:
            while len(self.active) < self.settings.max_vms:
                grant = await self._claim(datacenter, node_size)
                if grant is None:
                    break
                self.counters.claimed += 1
                why = grant_mismatch(grant, datacenter, node_size)
                if why is not None:
                    self.say(f"order {grant.order_id}: {why}")
                    self.counters.failed += 1
                    await self._report(grant.order_id, "fail", {"error": why[:1000]})
                    continue
                if grant.order_id in self.active:
                    self.say(f"order {grant.order_id}: claimed again while being worked on")
                    continue
                self.active.add(grant.order_id)
                orders.start_soon(self._order_task, grant)

    async def _claim(self, datacenter: str, node_size: str) -> Grant | None:
        try:
            r = await self.client.post("/api/v2/capacity/launch-orders/claim",
                                       json={"datacenter": datacenter, "node_size": node_size})
        except httpx.TransportError as exc:
            self.say(f"claim {datacenter}/{node_size}: CP unreachable ({exc})")
            return None
        if r.status_code == 204:
            return None
        if r.status_code != 200:
            self.say(f"claim {datacenter}/{node_size}: {r.status_code} {r.text[:200]}")
            return None
        try:
            return parse_grant(r.json())
        except (ValueError, BadGrant) as exc:  # JSONDecodeError is a ValueError
            self.say(f"claim {datacenter}/{node_size}: malformed answer, nothing claimed "
                     f"({str(exc)[:200]})")
            return None

    async def _order_task(self, grant: Grant) -> None:
        order_id = grant.order_id
        try:
            await self._work(grant)
        except Exception as exc:  # one order's bug must not stop the others
            log.exception("order %s: %s", order_id, exc)
        finally:
            self.active.discard(order_id)

    async def _report(self, order_id: str, what: str, body: dict[str, Any]) -> ReportAnswer:
        path = f"/api/v2/capacity/launch-orders/{order_id}/{what}"
        for attempt in range(1, self.settings.report_attempts + 1):
            try:
                r = await self.client.post(path, json=body)
                status: int | None = r.status_code
                detail = r.text[:200]
            except httpx.TransportError as exc:
                status, detail = None, str(exc)
            answer = classify_report(status)
            if answer is not ReportAnswer.RETRY:
                if answer is ReportAnswer.GONE:
                    self.say(f"order {order_id}: {what} refused ({status}): {detail}")
                return answer
            self.say(f"order {order_id}: {what} got no answer ({status or detail}); retrying")
            await trio.sleep(retry_delay(attempt, self.settings, self.rng.random()))
        return ReportAnswer.RETRY

    async def _work(self, grant: Grant) -> None:
        request = LaunchRequest(order_id=grant.order_id, vm_name=vm_name_for(grant.order_id),
                                datacenter=grant.datacenter, node_size=grant.node_size,
                                bootstrap_token=grant.bootstrap_token)
        name = request.vm_name
        self.launching.add(name)
        try:
            await self._launch(request)
        finally:
            self.launching.discard(name)

    async def _launch(self, request: LaunchRequest) -> None:
        order_id, name = request.order_id, request.vm_name
        if await self._report(order_id, "provisioning", {"vm_name": name}) \
                is ReportAnswer.GONE:
            return
        error = ""
        for attempt in range(1, self.settings.max_attempts + 1):
            self.counters.launch_attempts += 1
            try:
                self.say(f"order {order_id}: launching {name} (attempt {attempt})")
                await self.launcher.launch(request)
                error = ""
                break
            except NameTaken as exc:  # not ours: fail the order, leave the VM alone
                error = f"attempt {attempt}/{self.settings.max_attempts}: {exc}"
                self.say(f"order {order_id}: {error}")
                break
            except LaunchFailed as exc:
                error = f"attempt {attempt}/{self.settings.max_attempts}: {exc}"
                self.say(f"order {order_id}: {error}")
                await self.launcher.destroy(name)
                if attempt < self.settings.max_attempts:
                    await trio.sleep(retry_delay(attempt, self.settings, self.rng.random()))
        if error:
            self.counters.failed += 1
            await self._report(order_id, "fail", {"error": error[:1000]})
            return
        answer = await self._report(order_id, "fulfil", {"vm_name": name})
        if answer is ReportAnswer.OK:
            self.counters.fulfilled += 1
            self.say(f"order {order_id}: fulfilled by {name}")
        elif answer is ReportAnswer.GONE:
            self.counters.gone += 1
            self.say(f"order {order_id} expired or was taken: deleting {name}")
            await self.launcher.destroy(name)


def supervised(provisioner: Provisioner, *, max_restarts: int = 5,
               period: float = 300.0) -> Supervisor:
    """A supervisor running *provisioner* (restarted after a crash, with backoff)."""
    return Supervisor("provisioning", [ChildSpec(
        id="provisioner", start=provisioner.run, stop=provisioner.request_stop,
        shutdown=30.0)], max_restarts=max_restarts, period=period)


def pools_from_text(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``DATACENTER/SIZE`` items (``local:dev/tiny``) as pool keys; ValueError when bad."""
    out = []
    for item in items:
        datacenter, sep, size = item.rpartition("/")
        if not sep or not datacenter or not size:
            raise ValueError(f"a pool is DATACENTER/SIZE (local:dev/tiny), got {item!r}")
        out.append((datacenter, size))
    return tuple(out)
