"""Run ``ee-cp`` under tracemalloc; SIGUSR1 writes where its live memory was allocated.

    python tools/bench/cp_traced.py OUT.txt -- <ee.cp.server arguments>

The report groups live allocations by the first frames *inside the project or its
websocket stack* (so "per agent" costs can be read as bytes per connection), biggest
first. tools/bench/agents.py --tracemalloc uses it; tracing slows the CP, so time and
latency figures of a traced run mean nothing.
"""

from __future__ import annotations

import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12


def report(out: Path) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    lines = []
    for key, title in (("lineno", "by line"), ("traceback", "by traceback")):
        stats = snapshot.statistics(key)
        total = sum(s.size for s in stats)
        lines.append(f"==== {title}: total {total / 1024:.0f} KiB")
        for stat in stats[:40]:
            lines.append(f"{stat.size / 1024:10.1f} KiB {stat.count:8d} blocks")
            frames = stat.traceback.format(limit=FRAMES if key == "traceback" else 1,
                                           most_recent_first=True)
            lines.extend("        " + f for f in frames if f.strip().startswith("File"))
    partial = out.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.rename(out)  # whole, or not there


def main() -> None:
    out = Path(sys.argv[1])
    rest = sys.argv[sys.argv.index("--") + 1:]
    tracemalloc.start(FRAMES)

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        report(out)

    signal.signal(signal.SIGUSR1, on_signal)
    from ee.cp.server import main as cp_main

    sys.exit(cp_main(rest))


if __name__ == "__main__":
    main()
