"""Run ``eectl`` as a real subprocess against a real in-process CP (tests/cp/cpkit.py).

The CP runs in the test's Trio loop, so the subprocess is awaited with
``trio.run_process``: the CP keeps serving while the test waits for eectl.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cp"))

from cpkit import RunningCp, running_cp

COMPOSE = "services:\n  web:\n    image: nginx\n"


@attrs.frozen
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.splitlines()


def eectl_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment without the operator's EE_* settings; history under *state_dir*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EE_") or k == "EE_SIM_DIR"}
    env["XDG_STATE_HOME"] = str(state_dir)
    env.update(extra)
    return env


async def eectl(*args: str, stdin: str = "", state_dir: Path, **env: str) -> Result:
    proc = await trio.run_process(
        [sys.executable, "-m", "ee.ctl.main", *args], stdin=stdin.encode(),
        capture_stdout=True, capture_stderr=True, check=False,
        env=eectl_env(state_dir, **env))
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


async def console(cp: RunningCp, script: str, *, state_dir: Path,
                  token: str | None = None) -> Result:
    return await eectl("console", "--cp", cp.http, "--token", token or cp.token,
                       stdin=script, state_dir=state_dir)


async def tenant_app(cp: RunningCp, app: str = "web", version: str = "1") -> str:
    """A tenant account with *app* at *version*; returns the tenant's API key."""
    async with cp.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "tenant"})
        assert r.status_code == 201, r.text
        key = str(r.json()["api_key"])
    async with cp.client(token=key) as tenant:
        r = await tenant.post("/api/v2/apps", json={"name": app})
        assert r.status_code == 201, r.text
        r = await tenant.post(f"/api/v2/apps/{app}/versions",
                              json={"version": version, "compose": COMPOSE, "expose_port": 80})
        assert r.status_code == 201, r.text
    return key


def column(table_text: str, row_key: str, header: str) -> str:
    """The cell under *header* in the first row containing *row_key*."""
    lines = table_text.splitlines()
    pattern = re.compile(rf"(^|  ){re.escape(header)}(  |$)")
    head = next(i for i, line in enumerate(lines) if pattern.search(line))
    match = pattern.search(lines[head])
    assert match is not None
    start = match.start() + len(match.group(1))
    row = next(line for line in lines[head + 1:] if row_key in line)
    return row[start:].split()[0]


# (method, path with query, request body) -> (status, content type, response body)
Responder = Callable[[str, str, bytes], tuple[int, str, bytes]]


@contextmanager
def local_http(respond: Responder) -> Iterator[str]:
    """A tiny HTTP server on loopback answering every request with *respond*'s answer
    (a stand-in for a CP or an agent that says something chosen); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, content_type, data = respond(self.command, self.path, body)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


__all__ = ["COMPOSE", "Result", "RunningCp", "column", "console", "eectl", "eectl_env",
           "local_http", "running_cp", "tenant_app"]
