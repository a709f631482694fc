"""Federation benchmark: the master's cost with agents behind dc CPs vs the same agents
direct, end-to-end lag (agent event → master view), replay throughput after an outage.

    PYTHONPATH=src python tools/bench/federation.py --agents 1000 --window 30 --outage 30

Real processes (``ee-cp`` master, two ``ee-cp --role dc``, or one direct CP) and real
websockets; the sim agents run in this process (split evenly over the two dc CPs).

* CPU and RSS: the CP process's utime+stime over ``--window`` seconds once every agent
  has registered (from /proc), and its VmRSS at the end of the window.
* Lag: ``--lag-samples`` new agents join dc-a one at a time; each sample is from the
  agent's ``registered`` to the master's count for dc-a including it (polled every
  20 ms, so samples carry up to 20 ms of polling).
* Replay: the master is killed (-9); for ``--outage`` seconds agents of dc-a leave and
  rejoin (each change a spooled event, coalesced per 50 ms); the master restarts with
  its records deleted; throughput = events applied / time from the master's start to
  its applied sequence reaching the dc's newest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadgen"))

from simagent import SimAgent

from ee.attestation.providers.sim import SimTD

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def load() -> float:
    """The host's 1-minute load average (the machine is shared: every figure carries it)."""
    return round(os.getloadavg()[0], 2)


def note(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {what}", file=sys.stderr, flush=True)


def _own_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Cp:
    def __init__(self, root: Path, name: str, *args: str) -> None:
        self.data = root / name
        self.name = name
        self.http_port, self.agent_port, self.fed_port = free_port(), free_port(), free_port()
        self.args = list(args)
        self.proc: trio.Process | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.agent_port}/api/v2/agents/connect"

    @property
    def token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    async def start(self, *extra: str) -> None:
        argv = ["ee-cp", "--dev", "--data-dir", str(self.data), "--log-level", "WARNING",
                "--listen", f"127.0.0.1:{self.http_port}",
                "--agent-listen", f"127.0.0.1:{self.agent_port}", *self.args, *extra]
        log = (self.data.parent / f"{self.name}.log").open("ab")
        self.proc = await trio.lowlevel.open_process(argv, stdout=log, stderr=log)
        log.close()
        async with httpx.AsyncClient(timeout=2) as c:
            for _ in range(600):
                try:
                    if (await c.get(f"{self.http}/api/v2/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    await trio.sleep(0.1)
        raise SystemExit(f"{self.name} did not start")

    async def get(self, path: str) -> Any:
        for attempt in range(5):
            try:
                async with httpx.AsyncClient(timeout=30, headers={
                        "Authorization": f"Bearer {self.token}"}) as c:
                    return (await c.get(self.http + path)).json()
            except httpx.HTTPError as exc:
                alive = self.proc is not None and self.proc.poll() is None
                note(f"{self.name}: GET {path} failed ({type(exc).__name__}: {exc}); "
                     f"process {'alive' if alive else 'gone'}; attempt {attempt + 1}/5")
                if attempt == 4:
                    raise
                await trio.sleep(1)
        raise AssertionError("unreachable")

    async def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        with trio.move_on_after(20):
            await self.proc.wait()
            return
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


async def join_token(m: Cp, label: str) -> str:
    async with httpx.AsyncClient(timeout=10, headers={
            "Authorization": f"Bearer {m.token}"}) as c:
        r = await c.post(f"{m.http}/api/v2/federation/join-tokens", json={"datacenter": label})
        return str(r.json()["token"])


async def hold(nursery: trio.Nursery, url: str, label: str, names: list[str],
               td: SimTD, concurrency: int = 100) -> list[SimAgent]:
    agents = [SimAgent(url=url, td=td, vm_name=n, datacenter=label) for n in names]
    limiter = trio.CapacityLimiter(concurrency)

    async def start(agent: SimAgent) -> None:
        async with limiter:
            await nursery.start(agent.run_forever)

    async with trio.open_nursery() as starters:
        for agent in agents:
            starters.start_soon(start, agent)
    return agents


async def measure(pid: int, window: float) -> tuple[float, float]:
    c0, t0 = cpu_s(pid), time.monotonic()
    await trio.sleep(window)
    return (cpu_s(pid) - c0) / (time.monotonic() - t0), rss_mb(pid)


async def until(check: Any, timeout: float, what: str, every: float = 0.2) -> None:
    """Poll *check* (another process's state) until true; a stuck run fails loudly."""
    with trio.move_on_after(timeout):
        while not await check():  # noqa: ASYNC110 (another process)
            await trio.sleep(every)
        return
    raise SystemExit(f"bench: {what} not reached within {timeout:.0f} s")


async def direct_case(root: Path, n: int, window: float) -> dict[str, float]:
    cp = Cp(root, "direct")
    await cp.start()
    td = SimTD.load(Path(os.environ["EE_SIM_DIR"]))
    try:
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            await hold(nursery, cp.agent_url, "sim:direct", [f"d-{i}" for i in range(n)], td)
            joined = time.monotonic() - t0
            note(f"direct: {n} agents registered in {joined:.1f} s")
            assert cp.proc is not None
            load_before = load()
            cpu, rss = await measure(cp.proc.pid, window)
            note(f"direct: cpu {cpu:.3f} cores, rss {rss:.0f} MB")
            nursery.cancel_scope.cancel()
    finally:
        await cp.stop()
    return {"cpu_cores": cpu, "rss_mb": rss, "register_s": joined,
            "load_avg_1m_window": [load_before, load()]}


async def federated_case(root: Path, n: int, window: float, lag_samples: int,
                         outage: float) -> dict[str, Any]:
    m = Cp(root, "master", "--role", "master")
    m.args += ["--federation-listen", f"127.0.0.1:{m.fed_port}"]
    await m.start()
    td = SimTD.load(Path(os.environ["EE_SIM_DIR"]))
    dcs = []
    for label, name in (("sim:dc-a", "dc-a"), ("sim:dc-b", "dc-b")):
        d = Cp(root, name, "--role", "dc", "--upstream", m.http, "--datacenter", label)
        await d.start("--join-token", await join_token(m, label))
        dcs.append((d, label))
    out: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            for d, label in dcs:
                await hold(nursery, d.agent_url, label,
                           [f"{d.name}-{i}" for i in range(n // 2)], td)
            out["register_s"] = time.monotonic() - t0
            note(f"federated: {n} agents registered in {out['register_s']:.1f} s")

            async def total(label: str) -> int:
                view = await m.get("/api/v2/datacenters")
                return next((int(x["agents"]["total"]) for x in view["datacenters"]
                             if x["label"] == label), -1)

            async def all_seen() -> bool:
                return (await total("sim:dc-a") >= n // 2
                        and await total("sim:dc-b") >= n // 2)

            await until(all_seen, 600, "the master seeing every agent")
            note("federated: the master sees every agent")
            assert m.proc is not None
            out["load_avg_1m_window"] = [load()]
            out["master_cpu_cores"], out["master_rss_mb"] = await measure(m.proc.pid, window)
            out["load_avg_1m_window"].append(load())
            note(f"federated: master cpu {out['master_cpu_cores']:.3f} cores, "
                 f"rss {out['master_rss_mb']:.0f} MB")
            assert dcs[0][0].proc is not None
            out["dc_a_rss_mb"] = rss_mb(dcs[0][0].proc.pid)

            lags = []
            a, label_a = dcs[0]
            for i in range(lag_samples):
                before = await total(label_a)
                agent = SimAgent(url=a.agent_url, td=td, vm_name=f"lag-{i}", datacenter=label_a)
                await nursery.start(agent.run_forever)
                t_reg = time.monotonic()
                while await total(label_a) <= before:
                    await trio.sleep(0.02)
                    if time.monotonic() - t_reg > 60:
                        raise SystemExit(f"bench: lag sample {i} not seen in 60 s")
                lags.append(time.monotonic() - t_reg)
            lags.sort()
            out["load_avg_1m_lag"] = load()
            note(f"federated: lag p50 {statistics.median(lags):.3f} s")
            out["lag_p50_s"] = statistics.median(lags)
            out["lag_p99_s"] = lags[min(len(lags) - 1, int(len(lags) * 0.99))]

            # Replay: master down, churn at dc-a, master back without records.
            await m.stop(kill=True)
            note(f"federated: master killed, {outage:.0f} s outage with churn at dc-a")
            churners = [SimAgent(url=a.agent_url, td=td, vm_name=f"churn-{i}",
                                 datacenter=label_a, connect_timeout_s=10,
                                 handshake_timeout_s=10) for i in range(20)]
            churn = {"attempts": 0, "failed": 0}
            assert a.proc is not None
            dc_cpu0, own0 = cpu_s(a.proc.pid), _own_cpu()

            async def churn_once(c: SimAgent, task_status: trio.TaskStatus[None]) -> None:
                # One leave-and-rejoin; a failed attempt is counted, as a fleet would retry.
                churn["attempts"] += 1
                try:
                    await c.run(task_status=task_status)
                except (OSError, trio_websocket.HandshakeError,
                        trio_websocket.ConnectionTimeout, trio_websocket.ConnectionClosed):
                    churn["failed"] += 1
                    task_status.started()

            t_outage = time.monotonic()
            end = t_outage + outage
            next_note = t_outage + 60
            while time.monotonic() < end:
                async with trio.open_nursery() as burst:
                    for c in churners:
                        await burst.start(churn_once, c)
                    await trio.sleep(0.1)
                    burst.cancel_scope.cancel()
                await trio.sleep(0.1)
                if time.monotonic() >= next_note:
                    next_note += 60
                    note(f"federated: outage churn {churn}")
            spent = time.monotonic() - t_outage
            out["outage_churn"] = {**churn, "dc_a_cpu_cores": (cpu_s(a.proc.pid) - dc_cpu0) / spent,
                                   "bench_process_cpu_cores": (_own_cpu() - own0) / spent,
                                   "load_avg_1m_end": load()}
            st = await a.get("/api/v2/federation/status")
            note(f"federated: outage over, dc-a spool depth {st['spool_depth']}, {churn}")
            for f in ("records.sqlite3", "checkpoint.json", "checkpoint.json.sig"):
                (m.data / f).unlink(missing_ok=True)
            t_start = time.monotonic()
            await m.start()
            t_link = None
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                st2 = await a.get("/api/v2/federation/status")
                if t_link is None and st2["connected"]:
                    t_link = time.monotonic()
                if st2["connected"] and st2["spool_depth"] == 0:
                    break
                await trio.sleep(0.01)
            else:
                raise SystemExit("bench: the replay did not finish within 900 s")
            done = time.monotonic()
            assert t_link is not None
            out["load_avg_1m_replay"] = load()
            out["replay_events"] = st["spool_depth"]
            out["replay_master_start_s"] = t_link - t_start
            out["replay_s"] = done - t_link
            out["replay_events_per_s"] = st["spool_depth"] / max(done - t_link, 1e-3)
            nursery.cancel_scope.cancel()
    finally:
        for d, _ in dcs:
            await d.stop()
        await m.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--agents", type=int, default=1000,
                   help="sim agents, split over the two dc CPs (default: %(default)s)")
    p.add_argument("--window", type=float, default=30.0,
                   help="CPU measuring window, s (default: %(default)s)")
    p.add_argument("--lag-samples", type=int, default=50,
                   help="agents that join dc-a one at a time for the lag (default: "
                        "%(default)s)")
    p.add_argument("--outage", type=float, default=30.0,
                   help="master outage, s (default: %(default)s)")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="ee-bench-fed-"))
    os.environ.setdefault("EE_SIM_DIR", str(root / "sim"))
    ok = False
    try:
        note(f"start: {args.agents} agents, window {args.window} s, outage {args.outage} s")
        direct = trio.run(direct_case, root, args.agents, args.window)
        fed = trio.run(federated_case, root, args.agents, args.window, args.lag_samples,
                       args.outage)
        ok = True
    finally:
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            note(f"failed: the CPs' logs are kept in {root}")
    result = {"agents": args.agents, "cpus": os.cpu_count(), "direct": direct, "federated": fed,
              "master_cpu_vs_direct": fed["master_cpu_cores"] / max(direct["cpu_cores"], 1e-9),
              "master_rss_vs_direct": fed["master_rss_mb"] / max(direct["rss_mb"], 1e-9)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
