"""DatacenterActor: per-label aggregate of its agents' status and attestation.

It holds only what the AgentActors report (``StatusReport``, each stamped with Trio
time so a late report never overwrites a newer one). On (re)start it rebuilds from the
agent directory (what every AgentActor last published: no asks); without one, by
asking every agent actor of its label for its view, in a helper task so reports keep
flowing meanwhile. Agents also re-announce themselves when they restart.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ee.actors.agent import Describe, StatusReport
from ee.actors.directory import AgentDirectory
from ee.actors.lifecycle import AgentState
from ee.runtime import Actor, ActorError, handler


@attrs.frozen
class DescribeDatacenter:
    pass


class DatacenterActor(Actor):
    def __init__(self, label: str, directory: AgentDirectory | None = None) -> None:
        self.label = label
        self.directory = directory
        self.agents: dict[str, StatusReport] = {}

    async def started(self) -> None:
        if self.directory is None:
            self.start_soon(self._rebuild)
            return
        stamp = trio.current_time()
        for record in self.directory.in_datacenter(self.label):
            passed = (None if record.state is AgentState.OFFLINE
                      else record.state is not AgentState.QUARANTINED)
            self.agents[record.agent_id] = StatusReport(record.agent_id, record.status,
                                                        passed, stamp)

    async def _rebuild(self) -> None:
        for name in self.registry.names("agent/"):
            stamp = trio.current_time()
            try:
                view = await self.registry.ref(name).ask(Describe(), timeout=5.0)
            except ActorError:
                continue
            if view.get("datacenter") != self.label:
                continue
            status = view["status"]
            passed = None if status == "offline" else status != "quarantined"
            await self.ref.tell(StatusReport(view["agent_id"], status, passed, stamp))

    @handler(StatusReport)
    async def on_report(self, msg: StatusReport) -> None:
        old = self.agents.get(msg.agent_id)
        if old is None or old.at <= msg.at:
            self.agents[msg.agent_id] = msg

    @handler(DescribeDatacenter)
    async def on_describe(self, _: DescribeDatacenter) -> dict[str, Any]:
        counts = {"online": 0, "stale": 0, "offline": 0, "quarantined": 0}
        passed = failed = 0
        for report in self.agents.values():
            counts[report.status] = counts.get(report.status, 0) + 1
            if report.attestation_pass is True:
                passed += 1
            elif report.attestation_pass is False:
                failed += 1
        live = counts["online"] + counts["stale"]
        return {
            "datacenter": self.label,
            "agents": {"total": len(self.agents), **counts},
            "attestation": {"pass": passed, "fail": failed},
            "degraded": live == 0 or counts["stale"] * 2 > live,
        }
