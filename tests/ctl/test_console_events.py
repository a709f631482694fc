"""`events N` in `eectl console`: at most N of the recent events, then the next command.

It used to wait for N events with no end, so `printf 'events 40\\n' | eectl console`
never returned on a quiet CP.
"""

from __future__ import annotations

from pathlib import Path

import trio

from ee.ctl.client import CpClient
from ee.ctl.console import stream_events

from .ctlkit import console, running_cp


async def test_events_n_with_fewer_events_stops(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-e").run)
            r = await console(env, "events 40\nhelp events\n", state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            shown = [line for line in lines if line.startswith("#")]
            assert 2 <= len(shown) < 40
            assert lines[:len(shown)] == shown  # the events, then the loop went on
            assert lines[-1].startswith("events [N]  —  stream live events")
            nursery.cancel_scope.cancel()


async def test_stream_events_with_a_limit_ends_when_quiet(tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-q").run)
            client = CpClient(env.http, env.token)
            shown = await stream_events(client, 1000, seen.append, quiet_s=0.5)
            assert shown == len(seen) and 0 < shown <= 20  # the CP's recent backlog
            assert await stream_events(client, 1, seen.append) == 1
            nursery.cancel_scope.cancel()
