"""The soak, small: heartbeats keep nothing.

Issue 17's soak holds 10,000 agents for ten minutes and reads the CP's RSS slope. RSS
mixes what the code keeps with what the allocator and SQLite do (caches filling, arenas
fragmenting), so this test asks the part that is ours directly: with a real in-process CP
and sim agents heartbeating over real websockets, the blocks allocated by ``ee`` code and
still live after thousands of heartbeats (``tracemalloc`` snapshots before and after,
traces with any ``ee`` frame) must not grow with the heartbeats. Anything kept per
heartbeat (a list of Beats, a label per sequence number, an event per beat, a dict
entry per frame) keeps at least one block each and fails it.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest
import trio
from cpkit import RunningCp, running_cp
from test_sessions import wait_until

import ee

AGENTS = 40
SETTINGS = {"heartbeat_interval_s": 0.1, "stale_after_s": 10.0, "offline_after_s": 30.0}
WARM = 1000  # heartbeats with tracing on before the baseline (first-touch caches)
MEASURED = 4000  # heartbeats between the two snapshots
FRAMES = 20  # deep enough that a heartbeat's allocations reach an ee frame
EE = str(Path(ee.__file__).resolve().parent / "*")


def _heartbeats(env: RunningCp) -> int:
    value = env.cp.metrics.registry.get_sample_value("ee_heartbeats_total")
    return int(value or 0)


async def _until_heartbeats(env: RunningCp, n: int) -> None:
    await wait_until(lambda: _heartbeats(env) >= n, f"{n} heartbeats", poll=0.02)


def _ours() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, EE,
                                                                         all_frames=True)])


@pytest.mark.slow
async def test_heartbeats_keep_no_memory(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with running_cp(tmp_path / "cp", **SETTINGS) as env, \
                trio.open_nursery() as nursery:
            for i in range(AGENTS):
                await nursery.start(env.agent(f"soak-{i:03d}").run_forever)
            await wait_until(lambda: env.cp.directory.status_counts()["online"] == AGENTS,
                             "every agent online")
            tracemalloc.start(FRAMES)
            try:
                await _until_heartbeats(env, _heartbeats(env) + WARM)
                before, n0 = _ours(), _heartbeats(env)
                await _until_heartbeats(env, n0 + MEASURED)
                after, beats = _ours(), _heartbeats(env) - n0
            finally:
                tracemalloc.stop()
            nursery.cancel_scope.cancel()
    growth = after.compare_to(before, "traceback")
    kept = sum(d.count_diff for d in growth)
    top = "\n".join(f"{d.count_diff:+d} blocks {d.size_diff:+d} B at "
                    + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                  for f in list(d.traceback)[::-1][:6])
                    for d in sorted(growth, key=lambda d: -d.count_diff)[:12])
    # A structure kept per heartbeat grows by >= 1 block each (>= `beats`; a list of
    # (agent id, time) tuples appended in ``_beat_inline`` kept 6,232 over 4,006). What
    # is live anyway is per agent, not per heartbeat: frames in flight at the snapshot
    # (their JSON being decoded), ~300 blocks for 40 agents.
    assert kept < beats / 4, f"{kept} blocks kept over {beats} heartbeats:\n{top}"
