"""The end-to-end path with real processes: ``ee-cp``, three ``ee-agent``, dockerd.

A tenant deploys 2 replicas of examples/hello on different agents; both answer through
their agents' proxies; ``kill -9`` of the CP, its record store deleted, restart → ready,
both replicas listed running with the same ids and no container restarted; one agent
killed → its replica re-placed on the spare agent; undeploy → containers gone.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    subprocess.run(["docker", "info"], capture_output=True).returncode != 0,
    reason="needs a running dockerd (tools/test starts one)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(what: str, check: Callable[[], T | None], timeout: float = 90.0) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.TransportError, KeyError, json.JSONDecodeError) as exc:
            value, last = None, exc
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def hello_version() -> dict[str, Any]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(HELLO / "Dockerfile", arcname="Dockerfile")
        tar.add(HELLO / "www", arcname="www")
    return {"version": "1", "compose": (HELLO / "docker-compose.yml").read_text(),
            "build_context": base64.b64encode(buf.getvalue()).decode(),
            "expose_port": 8080, "health_path": "/health"}


def containers(dep_id: str) -> dict[str, str]:
    """Container id -> StartedAt of every container of this deployment (any agent)."""
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"name={dep_id}"],
                         capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for cid in ids:
        started = subprocess.run(["docker", "inspect", "-f", "{{.State.StartedAt}}", cid],
                                 capture_output=True, text=True, check=True).stdout.strip()
        out[cid] = started
    return out


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "EE_SIM_DIR": str(tmp / "sim")}
        self.cp_port, self.plane_port = free_port(), free_port()
        self.cp: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        (tmp / "cp.json").write_text(json.dumps({
            "heartbeat_interval_s": 0.5, "stale_after_s": 2, "offline_after_s": 4,
            "checkpoint_interval_s": 1,
            "quorum": {"quorum_fraction": 1.0, "settle_timeout_s": 60}}))
        (tmp / "agent.json").write_text(json.dumps({
            "reconnect_backoff_base_s": 0.2, "reconnect_backoff_max_s": 1.0}))

    @property
    def cp_url(self) -> str:
        return f"http://127.0.0.1:{self.cp_port}"

    def start_cp(self) -> None:
        self.cp = subprocess.Popen(
            [sys.executable, "-m", "ee.cp.server", "--dev", "--config",
             str(self.tmp / "cp.json"), "--data-dir", str(self.tmp / "cp"),
             "--listen", f"127.0.0.1:{self.cp_port}",
             "--agent-listen", f"127.0.0.1:{self.plane_port}"],
            env=self.env, stdout=open(self.tmp / "cp.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
        wait("CP health", lambda: httpx.get(f"{self.cp_url}/api/v2/health").status_code == 200)

    def start_agent(self, name: str) -> int:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ee.agent.main", "--dev", "--config",
             str(self.tmp / "agent.json"), "--cp", f"ws://127.0.0.1:{self.plane_port}",
             "--listen", f"127.0.0.1:{port}", "--data-dir", str(self.tmp / name),
             "--vm-name", name],
            env=self.env, stdout=open(self.tmp / f"{name}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
        self.agents[name] = (proc, port)
        return port

    def stop(self) -> None:
        procs = [p for p, _ in self.agents.values()] + ([self.cp] if self.cp else [])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop()
        for dep in (tmp_path / "deployments").read_text().split() if \
                (tmp_path / "deployments").exists() else []:
            ids = list(containers(dep))
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


def test_deploy_restart_cp_lose_agent_undeploy(procs: Procs, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "tools/images/build_busybox.sh")], check=True,
                   capture_output=True)
    procs.start_cp()
    token = (tmp_path / "cp" / "admin.token").read_text().strip()
    admin = httpx.Client(base_url=procs.cp_url, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})
    for name in ("vm-a", "vm-b"):
        procs.start_agent(name)
    wait("two agents online", lambda: len([
        a for a in admin.get("/api/v2/agents").json()["agents"]
        if a["status"] == "online"]) == 2)

    key = admin.post("/api/v2/accounts", json={"name": "e2e"}).json()["api_key"]
    tenant = httpx.Client(base_url=procs.cp_url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
    assert tenant.post("/api/v2/apps", json={"name": "hello"}).status_code == 201
    r = tenant.post("/api/v2/apps/hello/versions", json=hello_version())
    assert r.status_code == 201, r.text
    r = tenant.post("/api/v2/apps/hello/deployments", json={"version": "1", "replicas": 2})
    assert r.status_code == 202, r.text
    dep_id = r.json()["deployment_id"]
    (tmp_path / "deployments").write_text(dep_id)

    def dep() -> dict[str, Any]:
        return dict(tenant.get(f"/api/v2/deployments/{dep_id}").json())

    d = wait("2 replicas running", lambda: (lambda d: d if d["state"] == "running" and
                                            len(d["replicas"]) == 2 else None)(dep()),
             timeout=180)
    replica_agents = sorted(r["agent_id"] for r in d["replicas"])
    assert len(set(replica_agents)) == 2
    for replica in d["replicas"]:
        page = httpx.get(replica["url"] + "/", timeout=10)
        assert page.status_code == 200 and "Hello from EasyEnclave" in page.text
        assert replica["compose_hash"] == d["compose_hash"]
    before = containers(dep_id)
    assert len(before) == 2

    # kill -9 the CP, delete its record store, restart it.
    assert procs.cp is not None
    procs.cp.send_signal(signal.SIGKILL)
    procs.cp.wait()
    (tmp_path / "cp" / "records.sqlite3").unlink()
    procs.start_cp()
    wait("ready", lambda: httpx.get(f"{procs.cp_url}/api/v2/ready").status_code == 200)
    d = wait("replicas listed running again", lambda: (
        lambda d: d if d["state"] == "running" and len(d["replicas"]) == 2 else None)(dep()))
    assert sorted(r["agent_id"] for r in d["replicas"]) == replica_agents
    assert containers(dep_id) == before  # same containers, same StartedAt: adopted

    # A spare agent joins; one replica's agent dies; its replica moves to the spare.
    procs.start_agent("vm-c")
    wait("spare online", lambda: len([
        a for a in admin.get("/api/v2/agents").json()["agents"]
        if a["status"] == "online"]) == 3)
    views = {a["agent_id"]: a["vm_name"] for a in admin.get("/api/v2/agents").json()["agents"]}
    victim = views[replica_agents[0]]
    proc, _ = procs.agents[victim]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    spare_id = next(a for a, n in views.items() if n == "vm-c")
    d = wait("replica re-placed on the spare", lambda: (
        lambda d: d if d["state"] == "running" and spare_id in
        {r["agent_id"] for r in d["replicas"]} and replica_agents[0] not in
        {r["agent_id"] for r in d["replicas"]} else None)(dep()), timeout=180)
    for replica in d["replicas"]:
        assert httpx.get(replica["url"] + "/", timeout=10).status_code == 200

    # Undeploy: every live agent's container goes.
    assert len(containers(dep_id)) == 3  # the dead agent's container lingers on this host
    assert tenant.delete(f"/api/v2/deployments/{dep_id}").status_code == 202
    wait("stopped", lambda: dep()["state"] == "stopped", timeout=120)
    left = set(containers(dep_id))
    # Only the killed agent's container remains: its "VM" died, so nobody undeployed it
    # (on real hardware it dies with the VM); the two live agents' containers are gone.
    assert len(left) == 1 and left <= set(before)
