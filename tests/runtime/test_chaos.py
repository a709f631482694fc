"""Chaos: a tree of 200 actors crashed at random every few virtual milliseconds for
ten virtual minutes keeps answering asks, loses no acknowledged update, and ends with
the same registry."""

from __future__ import annotations

import random

import trio
from actorkit import Add, Counter, Get, Source

from ee.runtime import ActorCrashed, ActorDead, AskTimeout, Registry
from ee.supervisors import Backoff, Supervisor, actor_spec

GROUPS = 4
PER_GROUP = 50
VIRTUAL_SECONDS = 600.0


async def test_random_crashes_under_load(autojump_clock: trio.abc.Clock) -> None:
    rng = random.Random(20261129)
    registry = Registry()
    sources: dict[str, Source] = {}
    groups = []
    for g in range(GROUPS):
        specs = []
        for i in range(PER_GROUP):
            name = f"group{g}/actor{i}"
            sources[name] = Source()
            specs.append(actor_spec(registry, name, lambda s=sources[name]: Counter(s)))
        # Generous intensity: the drill crashes far more often than production would.
        groups.append(Supervisor(f"group{g}", specs, max_restarts=10_000, period=1.0,
                                 backoff=Backoff(base=0.001, maximum=0.05, jitter=0.5),
                                 rng=random.Random(g)))
    root = Supervisor("root", [g.as_child() for g in groups], max_restarts=3, period=60.0)

    acked: dict[str, int] = dict.fromkeys(sources, 0)
    stats = {"crashes": 0, "answered": 0, "crashed_asks": 0, "timeouts": 0}

    async def chaos() -> None:
        while trio.current_time() < VIRTUAL_SECONDS:
            await trio.sleep(rng.uniform(0.002, 0.010))
            if root.crash(rng.choice(names)):
                stats["crashes"] += 1

    async def client(seed: int) -> None:
        local = random.Random(seed)
        while trio.current_time() < VIRTUAL_SECONDS:
            name = local.choice(names)
            try:
                await registry.ref(name).ask(Add(1), timeout=1.0)
            except ActorCrashed:
                stats["crashed_asks"] += 1
            except AskTimeout:
                stats["timeouts"] += 1
            else:
                acked[name] += 1
                stats["answered"] += 1
            await trio.sleep(local.uniform(0.005, 0.05))

    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        names = registry.names()
        assert len(names) == GROUPS * PER_GROUP
        async with trio.open_nursery() as load:
            load.start_soon(chaos)
            for seed in range(8):
                load.start_soon(client, seed)
        await trio.sleep(1)  # let the last restarts land
        # Nothing acknowledged was lost: every actor rebuilt its total from its source.
        for name in names:
            assert await registry.ref(name).ask(Get(), timeout=5) == acked[name], name
        assert registry.names() == names
        assert root.running
        restarts = sum(n.restarts for n in root.snapshot().walk() if n.kind == "actor")
        assert restarts == stats["crashes"]
        root.request_stop()

    assert stats["crashes"] > 50_000
    assert stats["answered"] > 50_000
    assert stats["timeouts"] == 0
    assert len(registry) == 0
    for name in names:
        try:
            registry.ref(name)
        except ActorDead:
            continue
        raise AssertionError(f"{name} still registered")
