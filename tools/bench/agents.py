"""Agent-plane benchmark: one ``ee-cp`` process against N simulated agents.

For each N: agents held, heartbeat handling p50/p99 (frame read → AgentActor handled,
from the CP's own histogram), CP RSS per agent, CP and loadgen CPU during steady state
(to show the generator is not the bottleneck), and time-to-ready after ``kill -9`` and
restart of the CP (agents reconnect on their own).

    python tools/bench/agents.py --agents 1000 10000 [--heartbeat 10] [--hold 30]
    python tools/bench/agents.py --agents 10000 --soak 600   # RSS slope while held
    python tools/bench/agents.py --agents 10000 --soak 600 --warmup 120 --tracemalloc t.txt

Profiling (figures of a profiled run are not the benchmark's): ``--tracemalloc OUT``
runs the CP under tools/bench/cp_traced.py and writes where its memory lives after the
hold; ``--py-spy DIR`` records the CP with py-spy (PyPI) while the agents join and
again from the restart to readiness (``join.txt``, ``restart.txt``: collapsed stacks).
The sim agents reconnect with the real agent's jittered backoff (tools/loadgen/run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "loadgen"))

from run import cpu_seconds, hold  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
READY_WAIT_S = 240.0  # reported as not ready (inf) beyond this
TICK = os.sysconf("SC_CLK_TCK")
SOAK_EVERY_S = 10.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def buckets_of(metrics: str, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets (upper bound, count) as the CP exported them."""
    out = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', metrics, re.M):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        out.append((le, float(m.group(2))))
    return out


def quantiles(metrics: str, name: str, since: str | None = None
              ) -> tuple[float, float, int]:
    """p50, p99 and count of the observations made after the *since* scrape (the window
    between two scrapes, not since the CP started), interpolated within buckets."""
    buckets = buckets_of(metrics, name)
    if since is not None:
        before = dict(buckets_of(since, name))
        buckets = [(le, n - before.get(le, 0.0)) for le, n in buckets]
    total = buckets[-1][1] if buckets else 0

    def q(p: float) -> float:
        target = p * total
        prev_le, prev_n = 0.0, 0.0
        for le, n in buckets:
            if n >= target:
                if le == float("inf"):
                    return prev_le
                frac = (target - prev_n) / (n - prev_n) if n > prev_n else 0
                return prev_le + frac * (le - prev_le)
            prev_le, prev_n = le, n
        return prev_le

    return q(0.5), q(0.99), int(total)


class Cp:
    def __init__(self, data: Path, env: dict[str, str], heartbeat: float,
                 tracemalloc: Path | None = None, trace_from_signal: bool = False) -> None:
        self.data = data
        self.trace_from_signal = trace_from_signal  # cp_traced.py --from-signal
        self.env = env
        self.tracemalloc = tracemalloc
        self.http_port = free_port()
        self.agent_port = free_port()
        config = data.parent / "cp.json"
        config.write_text(json.dumps({"heartbeat_interval_s": heartbeat,
                                      "stale_after_s": heartbeat * 3,
                                      "offline_after_s": heartbeat * 9,
                                      "checkpoint_interval_s": 5,
                                      "quorum": {"quorum_fraction": 0.95,
                                                 "settle_timeout_s": 600}}))
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.agent_port}/api/v2/agents/connect"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, spy: Path | None = None) -> float:
        """Start the CP and wait for its HTTP health; with *spy*, record its start-up
        (process start to health) there with py-spy."""
        t0 = time.perf_counter()
        runner = (["-m", "ee.cp.server"] if self.tracemalloc is None else
                  [str(ROOT / "tools" / "bench" / "cp_traced.py"), str(self.tracemalloc),
                   *(["--from-signal"] if self.trace_from_signal else []), "--"])
        self.proc = subprocess.Popen(
            [sys.executable, *runner, "--dev", "--config", str(self.config),
             "--data-dir", str(self.data), "--listen", f"127.0.0.1:{self.http_port}",
             "--agent-listen", f"127.0.0.1:{self.agent_port}", "--log-level", "WARNING"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spying = None
        if spy is not None:
            time.sleep(0.3)  # py-spy needs the interpreter up
            spying = py_spy(self.proc.pid, spy)
        while True:
            try:
                httpx.get(f"{self.http}/api/v2/health", timeout=1)
                stop_py_spy(spying)
                return t0
            except httpx.TransportError:
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def wait_http(cp: Cp, path: str, ok: int = 200) -> None:
    async with httpx.AsyncClient(base_url=cp.http, timeout=30) as client:
        while True:
            try:
                if (await client.get(path)).status_code == ok:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)


def py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw",
                             "--rate", "100", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in KiB per minute."""
    mt = sum(t for t, _ in samples) / len(samples)
    mv = sum(v for _, v in samples) / len(samples)
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 0.0 if var == 0 else sum((t - mt) * (v - mv) for t, v in samples) / var * 60


async def _signal_and_wait(pid: int, sig: int, path: Path) -> None:
    """Send *sig* to the traced CP and wait until it has written *path*."""
    await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
    os.kill(pid, sig)
    for _ in range(2400):  # a snapshot takes a while at 10,000 agents
        if await trio.to_thread.run_sync(path.exists):
            return
        await trio.sleep(0.5)
    raise RuntimeError(f"the traced CP wrote no {path}")


async def soak(pid: int, soak_s: float, n: int, every_s: float = SOAK_EVERY_S,
               warmup_s: float = 0.0, tracemalloc: Path | None = None) -> None:
    """Sample the CP's RSS every *every_s* while the agents heartbeat; print the slope,
    over the whole soak and after *warmup_s* (caches and the allocator's arenas fill
    first; the figure after the warm-up is the one that says whether memory is kept).
    With *tracemalloc* (a CP run by ``cp_traced.py --from-signal``), start tracing now,
    take a baseline snapshot at the end of the warm-up (every agent has heartbeated since
    tracing began, so what a heartbeat replaces is in both) and print the top growth
    since it at the end."""
    samples: list[tuple[float, float]] = []
    t0, c0 = time.perf_counter(), proc_cpu(pid)
    baseline_at: float | None = None
    if tracemalloc is not None:  # start tracing (cp_traced.py --from-signal)
        await _signal_and_wait(pid, signal.SIGUSR2, tracemalloc.with_suffix(".tracing"))
    while True:
        elapsed = time.perf_counter() - t0
        if tracemalloc is not None and baseline_at is None and elapsed >= warmup_s:
            await _signal_and_wait(pid, signal.SIGUSR2, tracemalloc.with_suffix(".baseline"))
            baseline_at = elapsed = time.perf_counter() - t0
        samples.append((elapsed, float(rss_kib(pid))))
        if elapsed >= soak_s:
            break
        await trio.sleep(min(every_s, soak_s - elapsed))
    first, last = samples[0][1], samples[-1][1]
    print(f"    soak {soak_s:.0f}s at {n} agents: {len(samples)} RSS samples every "
          f"{every_s:.0f}s, first {first / 1024:.1f} MiB, last {last / 1024:.1f} MiB, "
          f"min {min(v for _, v in samples) / 1024:.1f} MiB, max "
          f"{max(v for _, v in samples) / 1024:.1f} MiB; least-squares slope "
          f"{slope_per_min(samples):+.1f} KiB/min; CP CPU "
          f"{(proc_cpu(pid) - c0) / (time.perf_counter() - t0) * 100:.0f}% of one core; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    halves = samples[: len(samples) // 2 + 1], samples[len(samples) // 2:]
    print(f"    slope of the first half {slope_per_min(halves[0]):+.1f} KiB/min, of the "
          f"second {slope_per_min(halves[1]):+.1f} KiB/min; RSS MiB every {every_s:.0f}s: "
          + " ".join(f"{v / 1024:.1f}" for _, v in samples), flush=True)
    warm = [(t, v) for t, v in samples if t >= (baseline_at or warmup_s)]
    if warmup_s and len(warm) >= 3:
        print(f"    after a {warmup_s:.0f}s warm-up: {len(warm)} samples, slope "
              f"{slope_per_min(warm):+.1f} KiB/min, {warm[0][1] / 1024:.1f} -> "
              f"{warm[-1][1] / 1024:.1f} MiB", flush=True)
    if tracemalloc is not None:
        await _signal_and_wait(pid, signal.SIGUSR1, tracemalloc)
        report = (await trio.to_thread.run_sync(tracemalloc.read_text)).splitlines()
        print(f"    tracemalloc ({tracemalloc}), top growth since the warm-up:")
        shown, section = 0, 0
        for line in report:
            if line.startswith("===="):
                section += 1
                if section > 2:
                    break
                shown = 0
            elif not line.lstrip().startswith("File "):
                shown += 1  # an entry; its frames follow it
            if shown <= 10:
                print("      " + line)


async def bench(n: int, heartbeat: float, hold_s: float, tracemalloc: Path | None = None,
                spy: Path | None = None, soak_s: float = 0.0, warmup_s: float = 0.0) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ee-bench-"))
    env = {**os.environ, "EE_SIM_DIR": str(tmp / "sim")}
    os.environ["EE_SIM_DIR"] = env["EE_SIM_DIR"]
    # A soak traces from its start only (the join runs untraced, at full speed).
    cp = Cp(tmp / "cp", env, heartbeat, tracemalloc, trace_from_signal=soak_s > 0)
    cp.start()
    assert cp.proc is not None
    base_rss = rss_kib(cp.proc.pid)
    async with trio.open_nursery() as nursery:
        spying = py_spy(cp.proc.pid, spy / "join.txt") if spy else None
        t0, lg_join0 = time.perf_counter(), cpu_seconds()
        agents = await nursery.start(lambda task_status: hold(
            cp.url, n, prefix="bench", concurrency=256, datacenters=4, hold_s=None,
            task_status=task_status))
        joined = sum(1 for a in agents if a.registered)
        join_s = time.perf_counter() - t0
        lg_join = cpu_seconds() - lg_join0
        load_join = os.getloadavg()[0]
        stop_py_spy(spying)
        await trio.sleep(heartbeat * 2)  # settle: every agent heartbeats at least once
        before = await _metrics(cp)
        c_cp0, c_lg0, w0 = proc_cpu(cp.proc.pid), cpu_seconds(), time.perf_counter()
        load0 = os.getloadavg()[0]
        await trio.sleep(hold_s)
        after = await _metrics(cp)
        wall = time.perf_counter() - w0
        cp_cpu_s = proc_cpu(cp.proc.pid) - c_cp0
        cp_cpu = cp_cpu_s / wall * 100
        load = (load0 + os.getloadavg()[0]) / 2
        lg_cpu = (cpu_seconds() - c_lg0) / wall * 100
        rss = rss_kib(cp.proc.pid)
        p50, p99, count = quantiles(after, "ee_heartbeat_handling_seconds", since=before)
        first_bucket = buckets_of(after, "ee_heartbeat_handling_seconds")[0][0]
        print(f"    (held: CP RSS {rss / 1024:.0f} MiB = {(rss - base_rss) / n:.1f} KiB/agent; "
              f"heartbeat p99 {p99 * 1000:.2f} ms; "
              f"{'now the soak' if soak_s else 'now kill -9 and restart'})", flush=True)
        if soak_s:
            await soak(cp.proc.pid, soak_s, n, warmup_s=warmup_s, tracemalloc=tracemalloc)
            nursery.cancel_scope.cancel()
            # A traced CP takes minutes to stop with 10,000 sockets; nothing to keep.
            if tracemalloc is not None:
                cp.kill()
            else:
                cp.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if tracemalloc is not None:
            cp.proc.send_signal(signal.SIGUSR1)
            for _ in range(1200):  # the report takes a while at 10,000 agents
                if await trio.to_thread.run_sync(tracemalloc.exists):
                    break
                await trio.sleep(0.5)
        await trio.sleep(6)  # let a checkpoint with all agents land
        cp.kill()
        cp.tracemalloc = None
        # In a thread: the sim agents (this process) keep their own timers meanwhile;
        # a blocked loop would fire every expired backoff at once when it returns.
        lg_restart0 = cpu_seconds()
        t_restart = await trio.to_thread.run_sync(
            cp.start, spy / "startup.txt" if spy else None)
        up_s = time.perf_counter() - t_restart  # process start to HTTP health
        spying = py_spy(cp.proc.pid, spy / "restart.txt") if spy else None

        async def progress() -> None:
            while True:
                await trio.sleep(2 if time.perf_counter() - t_restart < 40 else 5)
                print(f"    ... {time.perf_counter() - t_restart:.0f}s after the restart: "
                      f"{sum(a.ws is not None for a in agents)} sim agents connected, "
                      f"{sum(a.sessions > 1 for a in agents)} registered again", flush=True)

        nursery.start_soon(progress)
        ready_s = float("inf")
        with trio.move_on_after(READY_WAIT_S):
            await wait_http(cp, "/api/v2/ready")
            ready_s = time.perf_counter() - t_restart
        stop_py_spy(spying)
        lg_restart = cpu_seconds() - lg_restart0
        cp_restart = proc_cpu(cp.proc.pid)  # the new CP's CPU, start to ready
        nursery.cancel_scope.cancel()
    cp.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # the CP's records and manifests, the sim TD
    print(f"agents={n:>6}  held={joined}  join={join_s:.1f}s ({joined / join_s:.0f}/s; "
          f"loadgen CPU {lg_join / join_s * 100:.0f}% of one core; load {load_join:.1f})  "
          f"heartbeats handled in window={count} ({count / hold_s:.0f}/s)")
    if count:
        print(f"    heartbeat handling in the window p50={p50 * 1000:.3f} ms  "
              f"p99={p99 * 1000:.3f} ms (goal p99 < 50 ms; interpolated within the "
              f"histogram's buckets, the first up to {first_bucket * 1000:.2f} ms)")
    else:
        print("    heartbeat handling: no heartbeat in the window (hold longer than the "
              "heartbeat interval)")
    print(f"    CP RSS {rss / 1024:.0f} MiB  = {(rss - base_rss) / n:.1f} KiB/agent over "
          f"an idle CP of {base_rss / 1024:.0f} MiB (goal <= 30 KiB/agent)")
    per_beat = f"{cp_cpu_s / count * 1000:.3f} ms" if count else "n/a (none handled)"
    print(f"    steady-state CPU: CP {cp_cpu:.0f}%  loadgen {lg_cpu:.0f}% of one core; "
          f"CP CPU per heartbeat {per_beat}; host load average "
          f"{load:.1f} on {os.cpu_count()} cores (shared machine)")
    print(f"    time-to-ready after kill -9 + restart: {ready_s:.1f}s "
          f"(quorum 95% of checkpointed agents; the CP answered health after {up_s:.1f}s; "
          f"load {os.getloadavg()[0]:.1f})")
    print(f"    CPU from the restart to ready: CP {cp_restart:.1f}s, loadgen {lg_restart:.1f}s "
          f"({(cp_restart + lg_restart) / min(ready_s, READY_WAIT_S) * 100:.0f}% of one "
          f"core together, on a {os.cpu_count()}-core host shared with others)")


async def _metrics(cp: Cp) -> str:
    async with httpx.AsyncClient(timeout=60) as client:
        return (await client.get(f"{cp.http}/metrics")).text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[1000, 10000], metavar="N",
                   help="agent counts to run, one CP run each (default: %(default)s)")
    p.add_argument("--heartbeat", type=float, default=10.0, metavar="SECONDS",
                   help="the CP's heartbeat interval (stale after 3x, offline after 9x; "
                        "default: %(default)s)")
    p.add_argument("--hold", type=float, default=30.0, metavar="SECONDS",
                   help="steady-state window measured once every agent is held and has "
                        "heartbeated (default: %(default)s)")
    p.add_argument("--tracemalloc", type=Path, help="write the CP's memory profile here")
    p.add_argument("--py-spy", type=Path, help="directory for py-spy profiles of the CP")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                   help="after the hold, sample the CP's RSS every 10 s for SECONDS while "
                        "the agents heartbeat and report its least-squares slope (KiB/min); "
                        "no restart is measured")
    p.add_argument("--warmup", type=float, default=120.0, metavar="SECONDS",
                   help="with --soak: also report the slope from this point on (with "
                        "--tracemalloc: the baseline snapshot is taken here and the top "
                        "growth since it printed at the end)")
    args = p.parse_args()
    if args.tracemalloc is not None:
        args.tracemalloc.unlink(missing_ok=True)
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"open files limit {hard}")
    for n in args.agents:
        trio.run(bench, n, args.heartbeat, args.hold, args.tracemalloc, args.py_spy, args.soak,
                 args.warmup)


if __name__ == "__main__":
    main()
