"""ee-router CPU per request, and where it goes (py-spy).

Starts a real ``ee-cp --dev`` and a real ``ee-router`` in front of it (as
tools/bench/router.py), drives ``--requests`` tenant reads through the router with
``--concurrency`` in flight, and reads the router process's CPU time (user + system,
/proc/<pid>/stat) before and after: CPU milliseconds per request is the figure that
bounds the router's rate on one core (1,000 req/s needs < 1 ms), and unlike latency
it barely moves with other load on the machine. ``--profile FILE`` also records the
router with py-spy over the run (``--format raw``: collapsed stacks, one per line with
its sample count; ``--top`` prints the heaviest frames by self and total time).

    python tools/bench/router_cpu.py [--requests 5000] [--concurrency 32]
        [--profile /tmp/router.txt --top 25]

Measured (2 shared cores, 3,000 requests, each figure twice): with httpx to the stacks
2.11-2.47 ms/request at 32 in flight, 1.09-1.14 at 4; with the h11 pool
(ee.router.upstream) 0.73-0.81 and 0.64-0.71. Where the rest goes (GIL-holding
samples): Hypercorn's HTTP/1.1 server side about 45 %, Trio's scheduler about 20 %, the
h11 client 13 %, the router's own decision and bookkeeping about 8 %.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router import cp_and_router, stop

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


async def closed_loop(url: str, key: str, requests: int, concurrency: int) -> int:
    errors = 0
    left = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as c:

        async def worker() -> None:
            nonlocal errors, left
            while left > 0:
                left -= 1
                try:
                    r = await c.get("/api/v2/apps")
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return errors


def top(raw: Path, n: int) -> dict[str, list[tuple[str, float]]]:
    """The heaviest frames of a py-spy raw profile: self and total share of samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        samples += k
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    return {"self": [(f, round(v / samples, 4)) for f, v in own.most_common(n)],
            "total": [(f, round(v / samples, 4)) for f, v in total.most_common(n)]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with cp_and_router() as b:
        spy: trio.Process | None = None
        await closed_loop(b.router_url, b.key, 300, args.concurrency)  # warm-up
        try:
            if args.profile:
                spy = await trio.lowlevel.open_process(
                    ["py-spy", "record", "--pid", str(b.router.pid), "--format", "raw",
                     "--rate", "250", "--output", args.profile, "--nonblocking", "--gil"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await trio.sleep(1)
            cpu0, cp0 = cpu_seconds(b.router.pid), cpu_seconds(b.cp.pid)
            t0 = trio.current_time()
            errors = await closed_loop(b.router_url, b.key, args.requests, args.concurrency)
            took = trio.current_time() - t0
            cpu1, cp1 = cpu_seconds(b.router.pid), cpu_seconds(b.cp.pid)
            if spy is not None:
                spy.send_signal(2)  # py-spy writes its profile on SIGINT
                with trio.move_on_after(20):
                    await spy.wait()
        finally:
            if spy is not None:
                await stop(spy)

    def per_request(after: tuple[float, float], before: tuple[float, float],
                    i: int | None = None) -> float:
        spent = sum(after) - sum(before) if i is None else after[i] - before[i]
        return round(1000 * spent / args.requests, 3)

    out: dict[str, Any] = {
        "requests": args.requests, "concurrency": args.concurrency, "errors": errors,
        "router_cpu_ms_per_request": per_request(cpu1, cpu0),
        "router_user_ms_per_request": per_request(cpu1, cpu0, 0),
        "router_system_ms_per_request": per_request(cpu1, cpu0, 1),
        "cp_cpu_ms_per_request": per_request(cp1, cp0),
        "achieved_rps": round(args.requests / took, 1)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--profile", metavar="FILE", help="py-spy raw profile of the router")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    out = trio.run(main_async, args)
    if args.profile and Path(args.profile).exists():
        out["top"] = top(Path(args.profile), args.top)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
