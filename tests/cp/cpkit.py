"""Run a real ControlPlane in-process (real listeners on port 0, real websockets)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "loadgen"))

from simagent import SimAgent

from ee.attestation.providers.sim import SimTD
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, CpConfig, prepare


@attrs.define
class RunningCp:
    cp: ControlPlane
    td: SimTD
    token: str
    data_dir: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.cp.http_port}"

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.cp.plane.bound_port}/api/v2/agents/connect"

    def client(self, token: str | None = "admin") -> httpx.AsyncClient:
        headers = {}
        if token == "admin":
            headers["Authorization"] = f"Bearer {self.token}"
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.AsyncClient(base_url=self.http, headers=headers, timeout=10)

    def agent(self, vm_name: str, **kw: Any) -> SimAgent:
        kw.setdefault("td", self.td)
        return SimAgent(url=self.agent_url, vm_name=vm_name, **kw)


def free_port() -> int:
    """A port that was free a moment ago (for restarts that must keep their address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_config(data_dir: Path, **overrides: Any) -> CpConfig:
    overrides.setdefault("listen", "127.0.0.1:0")
    overrides.setdefault("agent_listen", "127.0.0.1:0")
    return CpConfig(data_dir=data_dir, dev=True, **overrides)


@asynccontextmanager
async def running_cp(data_dir: Path, **overrides: Any) -> AsyncIterator[RunningCp]:
    overrides.setdefault("quorum", Quorum(settle_timeout_s=5))
    config = dev_config(data_dir, **overrides)
    boot, _ = prepare(config)
    token = (data_dir / "admin.token").read_text().strip()
    assert boot.sim_dir is not None
    td = SimTD.load(boot.sim_dir)
    cp = ControlPlane(config, boot)
    async with trio.open_nursery() as nursery:
        await nursery.start(cp.run)
        try:
            yield RunningCp(cp, td, token, data_dir)
        finally:
            cp.request_stop()
