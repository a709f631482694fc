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

The decisions — the VM name, the retry delay, what a report answer means — are pure
functions below; :class:`Provisioner` only moves HTTP requests and launcher calls.
Time is Trio's: tests run the loop under the autojump clock with a fake CP transport
or a real ``ee-cp``.
"""

from __future__ import annotations

import enum
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import httpx
import trio

from ee.agent.backoff import backoff_delay
from ee.supervisors.supervisor import ChildSpec, Supervisor

__all__ = [
    "LaunchFailed",
    "LaunchRequest",
    "Launcher",
    "Provisioner",
    "ProvisionerSettings",
    "ReportAnswer",
    "classify_report",
    "retry_delay",
    "supervised",
    "vm_name_for",
]

log = logging.getLogger("ee.capacity.provisioner")


class LaunchFailed(Exception):
    """One launch attempt failed; the message says why (it goes into the fail report)."""


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

_UNSAFE = re.compile(r"[^a-z0-9-]+")


def vm_name_for(order_id: str, prefix: str = "ee") -> str:
    """A VM name (libvirt and DNS safe, <= 63 chars) derived from the order id."""
    slug = _UNSAFE.sub("-", order_id.lower()).strip("-")
    return f"{prefix}-{slug}"[:63].rstrip("-")


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
                order = grant["order"]
                self.active.add(order["order_id"])
                self.counters.claimed += 1
                orders.start_soon(self._order_task, order, grant["bootstrap_token"])

    async def _claim(self, datacenter: str, node_size: str) -> dict[str, Any] | None:
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
        grant: dict[str, Any] = r.json()
        return grant

    async def _order_task(self, order: Mapping[str, Any], token: str) -> None:
        order_id = str(order["order_id"])
        try:
            await self._work(order, token)
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

    async def _work(self, order: Mapping[str, Any], token: str) -> None:
        order_id = str(order["order_id"])
        request = LaunchRequest(order_id=order_id, vm_name=vm_name_for(order_id),
                                datacenter=str(order["datacenter"]),
                                node_size=str(order["node_size"]), bootstrap_token=token)
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
                break
            except LaunchFailed as exc:
                error = f"attempt {attempt}/{self.settings.max_attempts}: {exc}"
                self.say(f"order {order_id}: {error}")
                await self.launcher.destroy(name)
                if attempt < self.settings.max_attempts:
                    await trio.sleep(retry_delay(attempt, self.settings, self.rng.random()))
        else:
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
