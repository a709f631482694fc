"""Actor runtime benchmarks: tell/ask throughput, memory per idle actor, restart latency.

Run: ``python tools/bench/actors.py [--quick]``. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc

import attrs
import trio

from ee.runtime import Actor, Registry, handler
from ee.supervisors import NO_BACKOFF, Restart, Supervisor, actor_spec


@attrs.frozen
class Ping:
    n: int


@attrs.frozen
class Crash:
    pass


class Echo(Actor):
    def __init__(self) -> None:
        self.count = 0

    @handler(Ping)
    async def on_ping(self, msg: Ping) -> int:
        self.count += 1
        return msg.n

    @handler(Crash)
    async def on_crash(self, _: Crash) -> None:
        raise RuntimeError("bench crash")


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def throughput(n_actors: int, messages: int) -> tuple[float, float]:
    registry = Registry()
    sup = Supervisor("bench", [actor_spec(registry, f"echo/{i}", Echo, mailbox_size=1024)
                               for i in range(n_actors)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        refs = [registry.ref(n) for n in registry.names()]
        # tell: one sender per actor pushes its share, then an ask flushes each mailbox.
        per = max(1, messages // n_actors)
        t0 = time.perf_counter()

        async def sender(ref: object) -> None:
            for i in range(per):
                await ref.tell(Ping(i))  # type: ignore[attr-defined]
            await ref.ask(Ping(-1))  # type: ignore[attr-defined]

        async with trio.open_nursery() as senders:
            for ref in refs:
                senders.start_soon(sender, ref)
        tell_rate = per * n_actors / (time.perf_counter() - t0)

        t0 = time.perf_counter()

        async def asker(ref: object) -> None:
            for i in range(per):
                await ref.ask(Ping(i))  # type: ignore[attr-defined]

        async with trio.open_nursery() as askers:
            for ref in refs:
                askers.start_soon(asker, ref)
        ask_rate = per * n_actors / (time.perf_counter() - t0)
        sup.request_stop()
    return tell_rate, ask_rate


async def idle_memory(n_actors: int) -> tuple[float, float]:
    gc.collect()
    tracemalloc.start()
    before_rss = rss_kib()
    before_py, _ = tracemalloc.get_traced_memory()
    registry = Registry()
    sup = Supervisor("idle", [])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for i in range(n_actors):
            await sup.start_child(actor_spec(registry, f"idle/{i}", Echo, mailbox_size=64,
                                             restart=Restart.TRANSIENT))
        gc.collect()
        after_py, _ = tracemalloc.get_traced_memory()
        after_rss = rss_kib()
        sup.request_stop()
    tracemalloc.stop()
    return (after_py - before_py) / n_actors / 1024, (after_rss - before_rss) / n_actors


async def restart_latency(rounds: int) -> tuple[float, float]:
    registry = Registry()
    sup = Supervisor("r", [actor_spec(registry, "victim", Echo)], backoff=NO_BACKOFF,
                     max_restarts=rounds + 1, period=3600)
    samples = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        ref = registry.ref("victim")
        for _ in range(rounds):
            t0 = time.perf_counter()
            await ref.tell(Crash())
            await ref.ask(Ping(0))  # answered by the next incarnation
            samples.append(time.perf_counter() - t0)
        sup.request_stop()
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def main(quick: bool) -> None:
    scale = 10 if quick else 1
    for n in (1, 1000):
        tell, ask = await throughput(n, 200_000 // scale)
        print(f"throughput  actors={n:>5}  tell={tell:>10,.0f} msg/s  ask={ask:>10,.0f} msg/s  "
              f"ask/tell={ask / tell:.2f}")
    n_idle = 10_000 // scale
    py_kib, rss = await idle_memory(n_idle)
    print(f"memory      idle actors={n_idle}  python heap={py_kib:.2f} KiB/actor  "
          f"rss={rss:.2f} KiB/actor")
    p50, p99 = await restart_latency(2000 // scale)
    print(f"restart     crash->answered by new incarnation  p50={p50:.0f} us  p99={p99:.0f} us")


if __name__ == "__main__":
    import logging

    logging.getLogger("ee.supervisors").setLevel(logging.CRITICAL)  # crashes are on purpose
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work (smoke run)")
    args = parser.parse_args()
    trio.run(main, args.quick)
