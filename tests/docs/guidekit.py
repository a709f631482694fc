"""Reading the guides' fenced blocks, and a live dev CP + agent to run them against.

A guide's ```sh blocks are commands, run in order in one bash process (so variables
set by one block are there for the next), with ``set -euo pipefail``. A ```text block
right after a ```sh block is what that block must print: each of its lines must match
one line of the block's output, in order, with ``…`` standing for any text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import httpx

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MARK = "@@ee-guide-block"
T = TypeVar("T")


@attrs.frozen
class Block:
    index: int
    command: str
    expected: tuple[str, ...]
    line: int


def blocks(markdown: str, lang: str = "sh") -> list[Block]:
    """The guide's *lang* blocks, each with the ```text block that follows it."""
    out: list[Block] = []
    fences = list(FENCE.finditer(markdown))
    for i, fence in enumerate(fences):
        if fence.group(1) != lang:
            continue
        expected: tuple[str, ...] = ()
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        if nxt is not None and nxt.group(1) == "text" and \
                not markdown[fence.end():nxt.start()].strip():
            expected = tuple(line for line in nxt.group(2).splitlines() if line.strip())
        out.append(Block(len(out), fence.group(2), expected,
                         markdown[:fence.start()].count("\n") + 1))
    return out


def script(guide: list[Block]) -> str:
    parts = ["set -euo pipefail"]
    for block in guide:
        parts += [f"echo '{MARK} {block.index}'", block.command]
    return "\n".join(parts) + "\n"


def split_output(stdout: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    current = -1
    for line in stdout.splitlines():
        if line.startswith(MARK + " "):
            current = int(line.split()[-1])
            out[current] = []
        elif current >= 0:
            out[current].append(line)
    return out


def pattern(expected_line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in expected_line.split("…")) + r"\Z")


def unmatched(expected: tuple[str, ...], output: list[str]) -> str | None:
    """The first expected line with no match (in order) in *output*, or None."""
    lines = iter(output)
    for want in expected:
        rx = pattern(want)
        if not any(rx.match(line) for line in lines):
            return want
    return None


# --- a live dev control plane and agent ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.TransportError, KeyError, ValueError) as exc:
            value, last = None, exc
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


class LiveCluster:
    """``ee-cp --dev`` and one ``ee-agent --dev`` as real processes on free loopback
    ports with data under *tmp*; ``stop`` ends them and removes every container,
    network and image of the deployments the agent ran."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "EE_SIM_DIR": str(tmp / "sim")}
        self.cp_port, self.plane_port, self.agent_port = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        (tmp / "agent.json").write_text(json.dumps(
            {"reconnect_backoff_base_s": 0.2, "reconnect_backoff_max_s": 1.0}))

    @property
    def cp_url(self) -> str:
        return f"http://127.0.0.1:{self.cp_port}"

    @property
    def admin_token(self) -> str:
        return (self.tmp / "cp" / "admin.token").read_text().strip()

    def _spawn(self, name: str, *argv: str) -> None:
        with (self.tmp / f"{name}.log").open("ab") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", *argv], env=self.env, stdout=log,
                stderr=subprocess.STDOUT))

    def start(self) -> None:
        self._spawn("cp", "ee.cp.server", "--dev", "--data-dir", str(self.tmp / "cp"),
                    "--listen", f"127.0.0.1:{self.cp_port}",
                    "--agent-listen", f"127.0.0.1:{self.plane_port}")
        wait("the CP", lambda: httpx.get(f"{self.cp_url}/api/v2/ready").status_code == 200)
        self._spawn("agent", "ee.agent.main", "--dev", "--config",
                    str(self.tmp / "agent.json"), "--cp", f"ws://127.0.0.1:{self.plane_port}",
                    "--listen", f"127.0.0.1:{self.agent_port}",
                    "--data-dir", str(self.tmp / "agent"), "--vm-name", "guide-1")
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        wait("the agent online", lambda: any(
            a["status"] == "online" for a in httpx.get(
                f"{self.cp_url}/api/v2/agents", headers=headers).json()["agents"]))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        workloads = self.tmp / "agent" / "workloads"
        for dep in (p.name for p in workloads.iterdir()) if workloads.is_dir() else []:
            remove_docker_leftovers(dep)


def remove_docker_leftovers(deployment_id: str) -> None:
    def ids(*cmd: str) -> list[str]:
        return subprocess.run(list(cmd), capture_output=True, text=True).stdout.split()

    containers = ids("docker", "ps", "-aq", "--filter", f"name={deployment_id}")
    if containers:
        subprocess.run(["docker", "rm", "-f", *containers], capture_output=True)
    networks = [n for n in ids("docker", "network", "ls", "--format", "{{.Name}}")
                if deployment_id in n]
    if networks:
        subprocess.run(["docker", "network", "rm", *networks], capture_output=True)
    images = [i for i in ids("docker", "images", "--format", "{{.Repository}}:{{.Tag}}")
              if deployment_id in i]
    if images:
        subprocess.run(["docker", "rmi", "-f", *images], capture_output=True)
