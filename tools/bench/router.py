"""ee-router overhead: the same requests direct to a CP and through the router.

Starts a real ``ee-cp --dev`` and a real ``ee-router`` (old = new = that CP, class A at
50 %, so both branches of the decision run) as processes, then drives each target
open-loop at ``--rate`` requests/s for ``--seconds`` (requests leave on schedule
whether or not earlier ones answered, so queueing shows up as latency), alternating
direct and routed rounds. Requests are ``GET /api/v2/apps`` with a tenant API key
(the router resolves the key's account once, then serves it from its cache).
Prints p50/p99 of each, the added p50/p99 and the achieved rates as JSON.
Goal: p99 added < 2 ms at 1,000 req/s.

    python tools/bench/router.py [--rate 1000] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_up(url: str, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                async with httpx.AsyncClient() as c:
                    if (await c.get(url)).status_code < 500:
                        return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.2)


async def drive(url: str, key: str, rate: float, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10,
                                 headers={"Authorization": f"Bearer {key}"}) as c:

        async def one() -> None:
            nonlocal errors
            t0 = trio.current_time()
            try:
                r = await c.get("/api/v2/apps")
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
                return
            latencies.append(trio.current_time() - t0)

        start = trio.current_time()
        n = int(rate * seconds)
        async with trio.open_nursery() as nursery:
            for i in range(n):
                await trio.sleep_until(start + i / rate)
                nursery.start_soon(one)
        took = trio.current_time() - start
    latencies.sort()
    return {"p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "achieved_rps": len(latencies) / took, "errors": errors}


@attrs.frozen
class Bench:
    cp: trio.Process
    router: trio.Process
    cp_url: str
    router_url: str
    key: str  # a tenant API key


@asynccontextmanager
async def cp_and_router() -> AsyncIterator[Bench]:
    """A real ``ee-cp --dev`` with one tenant, and a real ``ee-router`` (old = new = that
    CP, class A at 50 %) in front of it; both stopped on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cp"
        cp_port, plane, router_port = free_port(), free_port(), free_port()
        cp_url = f"http://127.0.0.1:{cp_port}"
        router_url = f"http://127.0.0.1:{router_port}"
        logs = (Path(tmp) / "cp.log").open("wb")
        procs: list[trio.Process] = []
        try:
            procs.append(await trio.lowlevel.open_process(
                [sys.executable, "-m", "ee.cp.server", "--dev", "--data-dir", str(data),
                 "--listen", f"127.0.0.1:{cp_port}", "--agent-listen", f"127.0.0.1:{plane}",
                 "--log-level", "WARNING"], stdout=logs, stderr=subprocess.STDOUT))
            await wait_up(cp_url + "/api/v2/health")
            token = (data / "admin.token").read_text().strip()
            async with httpx.AsyncClient(base_url=cp_url,
                                         headers={"Authorization": f"Bearer {token}"}) as c:
                key = (await c.post("/api/v2/accounts", json={"name": "bench"})).json()[
                    "api_key"]
            config = Path(tmp) / "rollout.json"
            config.write_text(json.dumps({"classes": {"A": 50}}))
            procs.append(await trio.lowlevel.open_process(
                [sys.executable, "-m", "ee.router.server", "--listen",
                 f"127.0.0.1:{router_port}", "--old", cp_url, "--new", cp_url, "--config",
                 str(config), "--log-level", "WARNING"], stdout=logs, stderr=subprocess.STDOUT))
            await wait_up(router_url + "/api/v2/health")
            yield Bench(procs[0], procs[1], cp_url, router_url, key)
        finally:
            for proc in reversed(procs):
                await stop(proc)
            logs.close()


async def stop(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with cp_and_router() as b:
        await drive(b.cp_url, b.key, min(args.rate, 200), 2)  # warm-up
        await drive(b.router_url, b.key, min(args.rate, 200), 2)
        rounds: dict[str, list[dict[str, float]]] = {"direct": [], "router": []}
        for _ in range(args.rounds):
            rounds["direct"].append(await drive(b.cp_url, b.key, args.rate, args.seconds))
            rounds["router"].append(await drive(b.router_url, b.key, args.rate,
                                                args.seconds))

    def med(side: str, field: str) -> float:
        return statistics.median(r[field] for r in rounds[side])

    return {"rate": args.rate, "seconds": args.seconds, "rounds": args.rounds,
            "direct": {f: med("direct", f) for f in ("p50_ms", "p99_ms", "achieved_rps")},
            "router": {f: med("router", f) for f in ("p50_ms", "p99_ms", "achieved_rps")},
            "added_p50_ms": med("router", "p50_ms") - med("direct", "p50_ms"),
            "added_p99_ms": med("router", "p99_ms") - med("direct", "p99_ms"),
            "errors": sum(r["errors"] for side in rounds.values() for r in side)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    result = trio.run(main_async, p.parse_args())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
