"""Real ``ee-cp`` processes for federation tests: a master, dc CPs, sim agents."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "loadgen"))

from simagent import SimAgent

from ee.attestation.providers.sim import SimTD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class CpProc:
    name: str
    data_dir: Path
    args: list[str]
    http_port: int = attrs.field(factory=free_port)
    agent_port: int = attrs.field(factory=free_port)
    fed_port: int = attrs.field(factory=free_port)
    proc: trio.Process | None = None
    log: Path | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.agent_port}/api/v2/agents/connect"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http, timeout=10,
                                 headers={"Authorization": f"Bearer {self.token}"})

    async def start(self, *extra: str) -> None:
        self.log = self.data_dir.parent / f"{self.name}.log"
        argv = ["ee-cp", "--dev", "--data-dir", str(self.data_dir),
                "--listen", f"127.0.0.1:{self.http_port}",
                "--agent-listen", f"127.0.0.1:{self.agent_port}", "--log-level", "INFO",
                *self.args, *extra]
        out = self.log.open("ab")
        self.proc = await trio.lowlevel.open_process(argv, stdout=out, stderr=out,
                                                     env=dict(os.environ))
        out.close()
        async with httpx.AsyncClient(timeout=2) as c:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
                try:
                    r = await c.get(f"{self.http}/api/v2/health")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)
        raise AssertionError(f"{self.name} did not start: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def wait(self) -> None:
        assert self.proc is not None
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            await self.proc.wait()
            return
        self.kill9()
        await self.proc.wait()

    async def get(self, path: str) -> Any:
        async with self.client() as c:
            r = await c.get(path)
            assert r.status_code == 200, r.text
            return r.json()

    async def datacenters(self) -> dict[str, dict[str, Any]]:
        doc = await self.get("/api/v2/datacenters")
        return {d["label"]: d for d in doc["datacenters"]}


def master(tmp: Path, *extra: str) -> CpProc:
    cp = CpProc("master", tmp / "master", [])
    cp.args = ["--role", "master", "--federation-listen", f"127.0.0.1:{cp.fed_port}", *extra]
    return cp


async def join_token(m: CpProc, datacenter: str | None = None) -> str:
    async with m.client() as c:
        r = await c.post("/api/v2/federation/join-tokens",
                         json={"datacenter": datacenter} if datacenter else {})
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


def dc(tmp: Path, m: CpProc, label: str, name: str) -> CpProc:
    return CpProc(name, tmp / name, ["--role", "dc", "--upstream", m.http,
                                     "--datacenter", label])


def sim_td() -> SimTD:
    return SimTD.load(Path(os.environ["EE_SIM_DIR"]))


def agent(cp: CpProc, vm_name: str, datacenter: str, td: SimTD, **kw: Any) -> SimAgent:
    return SimAgent(url=cp.agent_url, vm_name=vm_name, datacenter=datacenter, td=td, **kw)


async def eventually(check: Callable[[], Any], timeout: float = 20.0,
                     what: str = "condition") -> Any:
    """Poll the async *check* until it returns a truthy value."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


@asynccontextmanager
async def event_log(cp: CpProc) -> AsyncIterator[list[dict[str, Any]]]:
    """Every event the CP emits while the block runs (the admin events websocket)."""
    seen: list[dict[str, Any]] = []
    url = f"ws://127.0.0.1:{cp.http_port}/api/v2/admin/events?token={cp.token}"
    async with trio.open_nursery() as nursery, \
            trio_websocket.open_websocket_url(url) as ws:

        async def pump() -> None:
            try:
                while True:
                    seen.append(json.loads(await ws.get_message()))
            except trio_websocket.ConnectionClosed:
                return

        nursery.start_soon(pump)
        await trio.sleep(0.2)
        try:
            yield seen
        finally:
            nursery.cancel_scope.cancel()


def refused(events: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("kind") == "federation.refused"
            and (e.get("data") or {}).get("code") == code]


def counts(views: list[dict[str, Any]]) -> dict[str, int]:
    """Agents by status, from a CP's own agent views (the truth a master must match)."""
    c = Counter(v["status"] for v in views)
    return {s: c.get(s, 0) for s in ("online", "stale", "offline", "quarantined")}


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@asynccontextmanager
async def cp_here(config: Any) -> AsyncIterator[Any]:
    """A ControlPlane of *config* (a ``CpConfig``) run in this process, stopped after."""
    from ee.cp.server import ControlPlane, prepare

    boot, _ = prepare(config)
    cp = ControlPlane(config, boot)
    async with trio.open_nursery() as nursery:
        await nursery.start(cp.run)
        try:
            yield cp
        finally:
            cp.request_stop()
