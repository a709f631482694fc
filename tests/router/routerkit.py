"""Two real CP stacks (in-process, real listeners) sharing their accounts, and an
``ee-router`` in front of them.

The stacks share their durable records the way a real rollout does (one record
store behind both releases): the old stack is started once to create the accounts,
stopped, and its data directory copied for the new one, so both know the same keys
and the same admin token. What one stack does afterwards (apps, deployments, agents)
the other does not see, which lets a test tell which stack served a request.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from cpkit import RunningCp, running_cp

from ee.router.decision import RolloutConfig
from ee.router.server import Router, RouterSettings

ADMIN = "router-admin-token-0123456789"


@attrs.frozen
class Stacks:
    old: RunningCp
    new: RunningCp
    keys: tuple[tuple[str, str], ...]  # (account id, api key)

    def of(self, stack: str) -> RunningCp:
        return self.old if stack == "old" else self.new


@asynccontextmanager
async def two_stacks(tmp: Path, accounts: int = 0, **overrides: Any) -> AsyncIterator[Stacks]:
    a, b = tmp / "old", tmp / "new"
    keys: list[tuple[str, str]] = []
    async with running_cp(a) as cp, cp.client() as admin:
        for i in range(accounts):
            r = await admin.post("/api/v2/accounts", json={"name": f"t{i}"})
            assert r.status_code == 201, r.text
            keys.append((r.json()["account_id"], r.json()["api_key"]))
    shutil.copytree(a, b)
    async with running_cp(a, **overrides) as old, running_cp(b, **overrides) as new:
        yield Stacks(old, new, tuple(keys))


@attrs.define
class RunningRouter:
    router: Router
    url: str
    config_path: Path

    def client(self, token: str | None = None, **kw: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10, **kw)

    def admin(self) -> httpx.AsyncClient:
        return self.client(ADMIN)

    async def set(self, doc: dict[str, Any]) -> None:
        async with self.admin() as c:
            r = await c.put("/_ee/router/config", json=doc)
            assert r.status_code == 200, r.text


def config_doc(**classes: float) -> dict[str, Any]:
    return {"kill_switch": False, "classes": classes, "shadow": {}}


@asynccontextmanager
async def running_router(stacks: Stacks, tmp: Path, doc: dict[str, Any] | None = None,
                         **kw: Any) -> AsyncIterator[RunningRouter]:
    path = tmp / "rollout.json"
    path.write_text(json.dumps(doc or config_doc()))
    kw.setdefault("guard_interval_s", 0)
    settings = RouterSettings(
        listen="127.0.0.1:0", old=stacks.old.http, new=stacks.new.http, config_path=path,
        old_agents=f"ws://127.0.0.1:{stacks.old.cp.plane.bound_port}",
        new_agents=f"ws://127.0.0.1:{stacks.new.cp.plane.bound_port}",
        admin_token=ADMIN, **kw)
    router = Router(settings, RolloutConfig())
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(router.run, shutdown)
        url = bound[0]
        try:
            yield RunningRouter(router, url, path)
        finally:
            shutdown.set()


async def wait_until(check: Callable[[], Awaitable[bool] | bool], poll: float = 0.05) -> None:
    """Poll *check* until it is true (the caller holds a fail_after)."""
    while True:
        value = check()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        await trio.sleep(poll)
