"""Run ``ee-cp`` under tracemalloc; SIGUSR1 writes where its live memory was allocated.

    python tools/bench/cp_traced.py OUT.txt [--from-signal] -- <ee.cp.server arguments>

The report groups live allocations by the first frames *inside the project or its
websocket stack* (so "per agent" costs can be read as bytes per connection), biggest
first. SIGUSR2 keeps a baseline snapshot; a later SIGUSR1 then also writes the growth
since that baseline (``Snapshot.compare_to``), by line and by traceback, biggest first,
which is how a soak finds what it keeps. With ``--from-signal`` tracing starts only at
the first SIGUSR2 (the next one takes the baseline), so 10,000 agents join at full
speed; only what is allocated after it is seen. tools/bench/agents.py --tracemalloc uses it;
tracing slows the CP, so time and latency figures of a traced run mean nothing.
"""

from __future__ import annotations

import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12
TOP = 40


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__),
         tracemalloc.Filter(False, __file__)])


def _frames(tb: tracemalloc.Traceback, limit: int) -> list[str]:
    return ["        " + f for f in tb.format(limit=limit, most_recent_first=True)
            if f.strip().startswith("File")]


def report(out: Path, baseline: tracemalloc.Snapshot | None) -> None:
    snapshot = _snapshot()
    lines = []
    if baseline is not None:
        for key, title in (("lineno", "by line"), ("traceback", "by traceback")):
            diff = snapshot.compare_to(baseline, key)
            grew = sum(d.size_diff for d in diff)
            lines.append(f"==== growth since the baseline {title}: net {grew / 1024:+.1f} KiB "
                         f"({sum(d.count_diff for d in diff):+d} blocks)")
            for d in diff[:TOP]:
                lines.append(f"{d.size_diff / 1024:+10.1f} KiB {d.count_diff:+8d} blocks "
                             f"(now {d.size / 1024:.1f} KiB {d.count} blocks)")
                lines.extend(_frames(d.traceback, FRAMES if key == "traceback" else 1))
    for key, title in (("lineno", "by line"), ("traceback", "by traceback")):
        stats = snapshot.statistics(key)
        total = sum(s.size for s in stats)
        lines.append(f"==== {title}: total {total / 1024:.0f} KiB")
        for stat in stats[:TOP]:
            lines.append(f"{stat.size / 1024:10.1f} KiB {stat.count:8d} blocks")
            lines.extend(_frames(stat.traceback, FRAMES if key == "traceback" else 1))
    partial = out.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.rename(out)  # whole, or not there


def main() -> None:
    out = Path(sys.argv[1])
    rest = sys.argv[sys.argv.index("--") + 1:]
    if "--from-signal" not in sys.argv[:sys.argv.index("--")]:
        tracemalloc.start(FRAMES)
    baseline: list[tracemalloc.Snapshot] = []

    def on_report(_sig: int, _frame: FrameType | None) -> None:
        report(out, baseline[-1] if baseline else None)

    def on_baseline(_sig: int, _frame: FrameType | None) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
            out.with_suffix(".tracing").touch()
            return
        baseline[:] = [_snapshot()]
        out.with_suffix(".baseline").touch()  # tells the bench the baseline is taken

    signal.signal(signal.SIGUSR1, on_report)
    signal.signal(signal.SIGUSR2, on_baseline)
    from ee.cp.server import main as cp_main

    sys.exit(cp_main(rest))


if __name__ == "__main__":
    main()
