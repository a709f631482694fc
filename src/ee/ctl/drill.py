"""`eectl drill db-wipe`: prove a CP survives losing its record store, and sign the proof.

    eectl drill db-wipe --cp URL --token-file F --stop-cmd CMD --start-cmd CMD
                        --wipe PATH [--wipe PATH …] --sign-key KEY --out RESULT
                        [--timeout SECONDS]

Steps, each timed and recorded; the first failure ends the drill (``passed: false``):

1. ``before``: the CP answers ``/api/v2/health``; the online agents (by vm_name) and
   ``ee_heartbeats_total`` are noted.
2. ``stop``: run ``--stop-cmd``; wait until the CP no longer answers.
3. ``wipe``: delete every ``--wipe`` file (with SQLite's ``-wal``/``-shm`` companions).
   The records (history) store is the one the design says may be wiped; a file outside
   the CP's data directory is the operator's responsibility.
4. ``start``: run ``--start-cmd``; wait until ``/api/v2/health`` answers.
5. ``rehydrate``: wait for ``/api/v2/ready`` and for every agent online before to be
   online again (re-registered).
6. ``heartbeat``: ``ee_heartbeats_total`` grows after the restart.
7. ``deploy``: a drill account, app and version; preflight is placeable; a deployment
   reaches ``running``; then it is removed.

The result (``{"drill": "db-wipe", "passed", "cp", "steps": […], "finished_unix", …}``)
is written with ``ee.protocol.signing.write_enveloped`` under ``--sign-key`` (Ed25519),
for ``eectl rollout record-drill``. Exit 0 when the drill passed, 1 when it ran and
failed, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ee.protocol.signing import KeyFileError, load_private_key, write_enveloped
from ee.router.guardrails import parse_prometheus, total

DRILL_COMPOSE = "services:\n  web:\n    image: ee-busybox:local\n"


class StepFailed(Exception):
    pass


@attrs.define
class Drill:
    cp: str
    token: str
    stop_cmd: str
    start_cmd: str
    wipe: list[Path]
    timeout_s: float = 180.0
    steps: list[dict[str, Any]] = attrs.field(factory=list)
    vm_names: list[str] = attrs.field(factory=list)
    heartbeats: float = 0.0

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.cp.rstrip("/"), timeout=10, headers={
            "Authorization": f"Bearer {token or self.token}"})

    async def wait(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        deadline = trio.current_time() + self.timeout_s
        while not await check():
            if trio.current_time() > deadline:
                raise StepFailed(f"{what}: not within {self.timeout_s:g} s")
            await trio.sleep(0.25)

    async def answers(self) -> bool:
        try:
            async with self.client() as c:
                return (await c.get("/api/v2/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def online(self) -> set[str]:
        async with self.client() as c:
            r = await c.get("/api/v2/agents", params={"status": "online"})
            if r.status_code != 200:
                raise StepFailed(f"GET /api/v2/agents: {r.status_code}")
            return {a["vm_name"] for a in r.json()["agents"]}

    async def heartbeat_total(self) -> float:
        async with self.client() as c:
            r = await c.get("/metrics", headers={"Connection": "close"})
            return total(parse_prometheus(r.text), "ee_heartbeats_total")

    async def run_cmd(self, cmd: str) -> None:
        proc = await trio.run_process(cmd, shell=True, check=False, capture_stdout=True,
                                      capture_stderr=True)
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise StepFailed(f"{cmd!r} exited {proc.returncode}: {tail[0]}")

    # -- the steps -------------------------------------------------------------------

    async def before(self) -> dict[str, Any]:
        if not await self.answers():
            raise StepFailed(f"the CP at {self.cp} does not answer")
        self.vm_names = sorted(await self.online())
        self.heartbeats = await self.heartbeat_total()
        return {"agents_online": self.vm_names}

    async def stop(self) -> dict[str, Any]:
        await self.run_cmd(self.stop_cmd)
        await self.wait("the CP to stop", lambda: _not(self.answers()))
        return {}

    async def wipe_files(self) -> dict[str, Any]:
        removed = []
        for path in self.wipe:
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
                if p.exists():
                    p.unlink()
                    removed.append(str(p))
        if not removed:
            raise StepFailed("no --wipe file existed: nothing was wiped")
        return {"removed": removed}

    async def start(self) -> dict[str, Any]:
        await self.run_cmd(self.start_cmd)
        await self.wait("the CP to answer", self.answers)
        return {}

    async def rehydrate(self) -> dict[str, Any]:
        async def ready() -> bool:
            async with self.client() as c:
                return (await c.get("/api/v2/ready")).status_code == 200

        await self.wait("/api/v2/ready", ready)
        want = set(self.vm_names)

        async def back() -> bool:
            return want <= await self.online()

        await self.wait(f"{len(want)} agents to re-register", back)
        return {"agents_online": sorted(await self.online())}

    async def heartbeat(self) -> dict[str, Any]:
        first = await self.heartbeat_total()

        async def grows() -> bool:
            return await self.heartbeat_total() > first

        if self.vm_names:
            await self.wait("heartbeats after the restart", grows)
        return {"heartbeats_total": await self.heartbeat_total()}

    async def deploy(self) -> dict[str, Any]:
        name = "drill-" + secrets.token_hex(3)
        async with self.client() as admin:
            r = await admin.post("/api/v2/accounts", json={"name": name})
            _expect(r, 201, "create the drill account")
            key = r.json()["api_key"]
        async with self.client(key) as c:
            _expect(await c.post("/api/v2/apps", json={"name": name}), 201, "create the app")
            _expect(await c.post(f"/api/v2/apps/{name}/versions", json={
                "version": "1", "compose": DRILL_COMPOSE, "expose_port": 80}), 201,
                "add a version")
            body = {"version": "1", "replicas": 1, "constraints": {}}
            r = await c.post(f"/api/v2/apps/{name}/preflight", json=body)
            _expect(r, 200, "preflight")
            if not r.json().get("placeable"):
                raise StepFailed(f"preflight: not placeable: {r.json().get('rejected')}")
            r = await c.post(f"/api/v2/apps/{name}/deployments", json=body)
            _expect(r, 202, "deploy")
            dep = r.json()["deployment_id"]

            async def running() -> bool:
                state = (await c.get(f"/api/v2/deployments/{dep}")).json().get("state")
                if state == "failed":
                    raise StepFailed(f"deployment {dep} failed")
                return bool(state == "running")

            await self.wait(f"deployment {dep} to run", running)
            await c.delete(f"/api/v2/deployments/{dep}")
        return {"app": name, "deployment_id": dep}

    async def run(self) -> dict[str, Any]:
        started = time.time()
        passed = True
        plan: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("before", self.before), ("stop", self.stop), ("wipe", self.wipe_files),
            ("start", self.start), ("rehydrate", self.rehydrate),
            ("heartbeat", self.heartbeat), ("deploy", self.deploy)]
        for name, step in plan:
            t0 = trio.current_time()
            try:
                detail = await step()
                ok, error = True, None
            except (StepFailed, httpx.HTTPError, KeyError, ValueError) as exc:
                detail, ok, error = {}, False, f"{type(exc).__name__}: {exc}" \
                    if not isinstance(exc, StepFailed) else str(exc)
            self.steps.append({"step": name, "ok": ok, "seconds": round(
                trio.current_time() - t0, 3), "error": error, **detail})
            print(f"{name:<10} {'ok' if ok else 'FAILED'}  {error or ''}", flush=True)
            if not ok:
                passed = False
                break
        finished = time.time()
        return {"drill": "db-wipe", "passed": passed, "cp": self.cp,
                "started_at": _rfc3339(started), "finished_at": _rfc3339(finished),
                "finished_unix": finished, "steps": self.steps}


async def _not(aw: Awaitable[bool]) -> bool:
    return not await aw


def _expect(r: httpx.Response, status: int, what: str) -> None:
    if r.status_code != status:
        raise StepFailed(f"{what}: {r.status_code} {r.text[:200]}")


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def db_wipe_command(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.sign_key)
        token = args.token or Path(args.token_file).read_text().strip()
    except (KeyFileError, OSError, TypeError) as exc:
        print(f"eectl drill: {exc}", file=sys.stderr)
        return 2
    drill = Drill(args.cp, token, args.stop_cmd, args.start_cmd,
                  [Path(p) for p in args.wipe], timeout_s=args.timeout)
    result = trio.run(drill.run)
    write_enveloped(args.out, result, key)
    print(f"db-wipe drill {'passed' if result['passed'] else 'FAILED'}; signed result in "
          f"{args.out}")
    return 0 if result["passed"] else 1


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drill = groups.add_parser("drill", help="operational drills (DB wipe)",
                              description="Drills whose signed results gate rollouts.")
    commands = drill.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "db-wipe", help="wipe a CP's record store, restart it, check it recovers",
        description="Stop the CP, delete its record store, start it, and check that agents "
                    "re-register, it becomes ready, heartbeats flow and a deployment runs. "
                    "Writes a signed result for `eectl rollout record-drill`.")
    p.add_argument("--cp", required=True, metavar="URL", help="the CP under drill")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", metavar="T", help="its admin token")
    tok.add_argument("--token-file", metavar="FILE", help="its admin token, from a file")
    p.add_argument("--stop-cmd", required=True, metavar="CMD", help="shell command that stops it")
    p.add_argument("--start-cmd", required=True, metavar="CMD",
                   help="shell command that starts it again (returns once launched)")
    p.add_argument("--wipe", action="append", required=True, metavar="PATH",
                   help="record store file to delete while it is stopped "
                        "(e.g. DATA_DIR/records.sqlite3); repeatable")
    p.add_argument("--sign-key", required=True, metavar="KEY", help="Ed25519 private key")
    p.add_argument("--out", required=True, metavar="RESULT", help="signed result file")
    p.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                   help="per step (default 180)")
    p.set_defaults(handler=db_wipe_command)
