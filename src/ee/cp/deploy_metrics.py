"""Deployment outcomes and queue delay, from the CP's event stream.

The app actors announce ``deployment.created`` and every ``deployment.state`` change;
this listener turns them into ``ee_deployments_total{outcome}`` and
``ee_deploy_queue_seconds`` (the rollout guardrail ``deploy_success`` compares them),
and each ``order.failed`` of a capacity pool into ``ee_launch_order_failures_total``
(``order_failures``: a counter, where the ``ee_launch_orders`` gauge's delta would miss a
failure made up by an order leaving the failed state in the same interval).
A deployment counts once, by the first outcome it reaches after its creation was
seen: ``healthy`` when it first runs (every wanted replica running; its queue delay is
observed then), ``failed`` when it is given up before that. One stopped before either,
or created before this CP started (rehydrated), is not counted. ``DeployTally`` is the
pure part; at most ``PENDING_MAX`` deployments wait for an outcome (the oldest are
forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import attrs
import trio

from ee.cp.events import Event
from ee.cp.metrics import CpMetrics

PENDING_MAX: Final = 10_000


@attrs.frozen
class Outcome:
    deployment_id: str
    outcome: str  # healthy | failed
    queued_s: float | None  # created -> running (healthy only)


@attrs.define
class DeployTally:
    pending: OrderedDict[str, float] = attrs.field(factory=OrderedDict)

    def see(self, kind: str, subject: str, data: Any, now: float) -> Outcome | None:
        if kind == "deployment.created":
            self.pending[subject] = now
            while len(self.pending) > PENDING_MAX:
                self.pending.popitem(last=False)
            return None
        if kind != "deployment.state" or subject not in self.pending:
            return None
        state = data.get("state") if isinstance(data, dict) else None
        if state == "running":
            return Outcome(subject, "healthy", now - self.pending.pop(subject))
        if state == "failed":
            del self.pending[subject]
            return Outcome(subject, "failed", None)
        if state in ("stopping", "stopped"):
            del self.pending[subject]
        return None


async def run_deploy_metrics(
        subscribe: Callable[[], AbstractAsyncContextManager[trio.MemoryReceiveChannel[Event]]],
        metrics: CpMetrics,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    tally = DeployTally()
    async with subscribe() as events:
        task_status.started()
        async for event in events:
            if event.kind == "order.failed":
                metrics.order_failures.inc()
                continue
            outcome = tally.see(event.kind, event.subject, event.data, trio.current_time())
            if outcome is None:
                continue
            metrics.deployments.labels(outcome.outcome).inc()
            if outcome.queued_s is not None:
                metrics.deploy_queue.observe(outcome.queued_s)
