"""Hold N simulated agents against a CP: ``python tools/loadgen/run.py --cp ws://… -n 1000``.

Each agent is one websocket and two small tasks (reader, heartbeat); registration quotes
come from the sim TD at $EE_SIM_DIR (the same chain the dev CP trusts). They reconnect
with the real agent's jittered backoff (``ee.agent.backoff``, its default base and cap).
Prints progress and the loadgen's own CPU use so a run can show the generator was not
the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simagent import SimAgent

from ee.agent.config import AgentConfig
from ee.attestation.providers.sim import SimTD, shared_sim_dir

#: The real agent's reconnect backoff (base, cap), which the sim agents use here.
AGENT_BACKOFF: tuple[float, float] = (
    attrs.fields(AgentConfig).reconnect_backoff_base_s.default,
    attrs.fields(AgentConfig).reconnect_backoff_max_s.default)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def hold(url: str, n: int, *, prefix: str, concurrency: int, datacenters: int,
               hold_s: float | None, reconnect_base_s: float = AGENT_BACKOFF[0],
               reconnect_cap_s: float = AGENT_BACKOFF[1],
               task_status: trio.TaskStatus[list[SimAgent]] = trio.TASK_STATUS_IGNORED) -> None:
    td = SimTD.load(shared_sim_dir())
    agents = [SimAgent(url=url, td=td, vm_name=f"{prefix}-{i:05d}",
                       datacenter=f"load:z{i % datacenters}",
                       reconnect_base_s=reconnect_base_s, reconnect_cap_s=reconnect_cap_s)
              for i in range(n)]
    limiter = trio.CapacityLimiter(concurrency)
    async with trio.open_nursery() as nursery:

        async def start(agent: SimAgent) -> None:
            async with limiter:
                await nursery.start(agent.run_forever)

        async with trio.open_nursery() as starters:
            for agent in agents:
                starters.start_soon(start, agent)
        task_status.started(agents)
        if hold_s is not None:
            await trio.sleep(hold_s)
            nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cp", required=True,
                   help="agent plane URL, ws://HOST:PORT/api/v2/agents/connect")
    p.add_argument("-n", type=int, default=1000, help="agents to hold")
    p.add_argument("--prefix", default="load")
    p.add_argument("--concurrency", type=int, default=200, help="registrations in flight")
    p.add_argument("--datacenters", type=int, default=4)
    p.add_argument("--hold", type=float, default=60.0, help="seconds to hold after all joined")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def run() -> None:
        t0, c0 = time.perf_counter(), cpu_seconds()
        async with trio.open_nursery() as nursery:
            agents = await nursery.start(lambda task_status: hold(
                args.cp, args.n, prefix=args.prefix, concurrency=args.concurrency,
                datacenters=args.datacenters, hold_s=args.hold, task_status=task_status))
            joined = sum(1 for a in agents if a.registered)
            print(f"loadgen: {joined}/{args.n} registered in {time.perf_counter() - t0:.1f}s "
                  f"(loadgen cpu {cpu_seconds() - c0:.1f}s)", flush=True)
        print(f"loadgen: done; cpu {cpu_seconds() - c0:.1f}s over "
              f"{time.perf_counter() - t0:.1f}s wall, pid {os.getpid()}")

    trio.run(run)


if __name__ == "__main__":
    main()
