"""Run deploy/cloudflare/worker.js for real in workerd (npm package ``workerd``).

The binary is found through ``EE_WORKERD`` or in ``~/.cache/easyenclave/workerd``
(``npm install --prefix ~/.cache/easyenclave/workerd workerd``); tests skip with that
command when neither is there.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from cpkit import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "deploy" / "cloudflare" / "worker.js"
INSTALL = "npm install --prefix ~/.cache/easyenclave/workerd workerd"


def workerd_binary() -> str:
    candidates = [os.environ.get("EE_WORKERD"),
                  str(Path.home() / ".cache/easyenclave/workerd/node_modules/.bin/workerd"),
                  shutil.which("workerd")]
    for c in candidates:
        if c and Path(c).exists():
            return c
    pytest.skip(f"workerd is not installed ({INSTALL})")


def capnp(port: int, worker: Path, *, old: str, new: str, old_agents: str, new_agents: str,
          kv_port: int, admin_token: str) -> str:
    def text(name: str, value: str) -> str:
        return f'(name = "{name}", text = "{value}")'

    bindings = ", ".join([
        text("OLD_ORIGIN", old), text("NEW_ORIGIN", new), text("OLD_AGENTS", old_agents),
        text("NEW_AGENTS", new_agents), text("ADMIN_TOKEN", admin_token),
        '(name = "ROLLOUT", kvNamespace = "kv")'])
    return f"""using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = .worker),
    (name = "kv", external = (address = "127.0.0.1:{kv_port}", http = ())),
    (name = "internet", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [(name = "http", address = "127.0.0.1:{port}", http = (), service = "main")],
);
const worker :Workerd.Worker = (
  modules = [(name = "worker.js", esModule = embed "{worker}")],
  compatibilityDate = "2024-09-23",
  bindings = [{bindings}],
  globalOutbound = "internet",
);
"""


@asynccontextmanager
async def running_workerd(tmp: Path, **kw: str | int) -> AsyncIterator[str]:
    binary = workerd_binary()
    port = free_port()
    config = tmp / "workerd.capnp"
    shutil.copy(WORKER, tmp / "worker.js")  # embed paths are relative to the config
    config.write_text(capnp(port, Path("worker.js"), **kw))  # type: ignore[arg-type]
    log = (tmp / "workerd.log").open("wb")
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(functools.partial(
            trio.run_process, [binary, "serve", str(config), "--verbose"], stdout=log,
            stderr=subprocess.STDOUT, check=False))
        url = f"http://127.0.0.1:{port}"
        try:
            with trio.fail_after(30):
                while True:
                    try:
                        async with httpx.AsyncClient() as c:
                            await c.get(url + "/_ee/router/ping")
                        break
                    except httpx.HTTPError:
                        if proc.returncode is not None:
                            raise RuntimeError((tmp / "workerd.log").read_text()) from None
                        await trio.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
            log.close()
