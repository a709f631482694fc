"""Quick start: run a dev CP and one dev agent, deploy examples/hello, print the URL.

Everything lives under ``.ee-dev/`` (CP data dir, agent data dir, sim attestation chain,
logs, the tenant key), so a second run reuses it: the same admin token, the same agent
id, and the running workload is adopted rather than redeployed.

The CP's and the agent's pids are kept in ``.ee-dev/quickstart.pids`` while they run;
``--stop`` (from any terminal, e.g. after ``--detach``) stops the processes named there
with SIGTERM (SIGKILL after a grace period). A pid is only signalled while its command
line is still that ee-cp/ee-agent with this state folder, so a pid reused by another
process is never touched.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello"


def fail(message: str) -> None:
    print(f"quickstart: {message}", file=sys.stderr)
    sys.exit(1)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def ensure_docker() -> None:
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        fail("dockerd is not running (start it, or run quickstart as root to start it)")
    print("quickstart: starting dockerd (log: /tmp/dockerd.log)")
    subprocess.Popen(["setsid", "dockerd"], stdout=open("/tmp/dockerd.log", "ab"),  # noqa: SIM115
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    for _ in range(60):
        if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            return
        time.sleep(1)
    fail("dockerd did not start; see /tmp/dockerd.log")


def wait_for(what: str, check, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.3)
    fail(f"timed out waiting for {what}")


def build_context() -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(HELLO.rglob("*")):
            rel = path.relative_to(HELLO)
            if rel.parts[0] in ("README.md", "docker-compose.yml"):
                continue
            tar.add(path, arcname=str(rel), recursive=False)
    return base64.b64encode(buf.getvalue()).decode()


PIDS_FILE = "quickstart.pids"
STOP_GRACE_S = 20.0


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def ours(pid: int, program: str, state: Path) -> bool:
    """Is *pid* still the *program* (ee-cp / ee-agent) this state folder started?"""
    cmd = _cmdline(pid)
    data_dirs = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--data-dir"]
    return (any(Path(a).name == program for a in cmd[:2])
            and any(Path(d).resolve().parent == state.resolve() for d in data_dirs))


def write_pids(state: Path, procs: dict[str, int]) -> None:
    (state / PIDS_FILE).write_text(json.dumps(procs) + "\n")


def stop(state: Path) -> int:
    """Stop the CP and agent a quick start left running; 0 also when none was running."""
    path = state / PIDS_FILE
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"quickstart: nothing to stop (no {path})")
        return 0
    except ValueError:
        fail(f"{path} is not a pid file; stop the processes by hand")
    alive = {name: int(pid) for name, pid in recorded.items()
             if ours(int(pid), name, state)}
    for name, pid in sorted(alive.items(), key=lambda item: item[0] != "ee-agent"):
        print(f"quickstart: stopping {name} (pid {pid})")
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while alive and time.monotonic() < deadline:
        alive = {n: p for n, p in alive.items() if ours(p, n, state)}
        time.sleep(0.2)
    for name, pid in alive.items():
        print(f"quickstart: {name} (pid {pid}) ignored SIGTERM; killing it")
        os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    print("quickstart: stopped (the workload's containers keep running and are adopted "
          "by the next quick start)")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(ROOT / ".ee-dev"), help="state folder (.ee-dev)")
    p.add_argument("--cp-port", type=int, default=8000)
    p.add_argument("--agent-plane-port", type=int, default=8001)
    p.add_argument("--agent-port", type=int, default=8080)
    p.add_argument("--detach", action="store_true",
                   help="leave the CP and agent running and return")
    p.add_argument("--stop", action="store_true",
                   help="stop the CP and agent a quick start (e.g. --detach) left running")
    args = p.parse_args()
    if args.stop:
        sys.exit(stop(Path(args.dir)))

    for port in (args.cp_port, args.agent_plane_port, args.agent_port):
        if not port_free(port):
            fail(f"port {port} is in use (another quick start running? `tools/quickstart "
                 "--stop` stops it; or pick other ports with --cp-port/--agent-plane-port/"
                 "--agent-port)")
    if shutil.which("ee-cp") is None or shutil.which("ee-agent") is None:
        fail("ee-cp/ee-agent are not on PATH: run `pip install -e .` first")
    ensure_docker()
    subprocess.run([str(ROOT / "tools/images/build_busybox.sh")], check=True)

    state = Path(args.dir)
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EE_SIM_DIR": str(state / "sim")}
    cp_url = f"http://127.0.0.1:{args.cp_port}"
    procs: list[subprocess.Popen[bytes]] = []

    def stop_all(*_: object) -> None:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    cp = subprocess.Popen(
        ["ee-cp", "--dev", "--data-dir", str(state / "cp"),
         "--listen", f"127.0.0.1:{args.cp_port}",
         "--agent-listen", f"127.0.0.1:{args.agent_plane_port}"],
        env=env, stdout=open(state / "cp.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True)
    procs.append(cp)
    write_pids(state, {"ee-cp": cp.pid})
    try:
        wait_for("the CP", lambda: cp.poll() is None and httpx.get(
            f"{cp_url}/api/v2/health", timeout=2).status_code == 200)
        if cp.poll() is not None:
            fail(f"ee-cp exited; see {state / 'cp.log'}")
        admin_token = (state / "cp" / "admin.token").read_text().strip()
        admin = httpx.Client(base_url=cp_url, timeout=30,
                             headers={"Authorization": f"Bearer {admin_token}"})
        agent = subprocess.Popen(
            ["ee-agent", "--dev", "--cp", f"ws://127.0.0.1:{args.agent_plane_port}",
             "--listen", f"127.0.0.1:{args.agent_port}", "--data-dir", str(state / "agent"),
             "--vm-name", "dev-agent-1"],
            env=env, stdout=open(state / "agent.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(agent)
        write_pids(state, {"ee-cp": cp.pid, "ee-agent": agent.pid})
        wait_for("the agent to register", lambda: agent.poll() is None and any(
            a["status"] == "online" for a in admin.get("/api/v2/agents").json()["agents"]))
        if agent.poll() is not None:
            fail(f"ee-agent exited; see {state / 'agent.log'}")

        key_file = state / "tenant.key"
        if key_file.exists():
            key = key_file.read_text().strip()
        else:
            r = admin.post("/api/v2/accounts", json={"name": "quickstart"})
            r.raise_for_status()
            key = r.json()["api_key"]
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
        tenant = httpx.Client(base_url=cp_url, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
        r = tenant.post("/api/v2/apps", json={"name": "hello"})
        if r.status_code not in (201, 409):
            fail(f"create app: {r.text}")
        compose = (HELLO / "docker-compose.yml").read_text()
        r = tenant.post("/api/v2/apps/hello/versions", json={
            "version": "1", "compose": compose, "build_context": build_context(),
            "expose_port": 8080, "health_path": "/health"})
        if r.status_code not in (201, 409):
            fail(f"upload version: {r.text}")
        running = [d for d in tenant.get("/api/v2/deployments").json()["deployments"]
                   if d["state"] in ("running", "starting", "placing", "pending")]
        if running:
            dep_id = running[0]["deployment_id"]
        else:
            r = tenant.post("/api/v2/apps/hello/deployments",
                            json={"version": "1", "replicas": 1})
            if r.status_code != 202:
                fail(f"deploy: {r.text}")
            dep_id = r.json()["deployment_id"]
        dep = wait_for("examples/hello to run", lambda: (
            lambda d: d if d["state"] == "running" else None)(
                tenant.get(f"/api/v2/deployments/{dep_id}").json()), timeout=300)
        url = f"http://127.0.0.1:{args.agent_port}/"
        page = wait_for("the agent's proxy", lambda: (
            lambda r: r.text if r.status_code == 200 else None)(httpx.get(url, timeout=5)))
        assert "Hello from EasyEnclave" in page
        print(json.dumps({"deployment": dep_id, "compose_hash": dep["compose_hash"],
                          "replicas": dep["replicas"]}, indent=2))
        verify = (f"EE_SIM_DIR={state / 'sim'} eectl trust verify-health {url} "
                  f"--expect-hash {dep['compose_hash']} --root dev")
        print(f"""
EasyEnclave is running.
  app URL (through the agent's proxy): {url}
  control plane:                        {cp_url}
  admin token:                          {admin_token}
  tenant API key:                       {key}   (also in {key_file})
  console:                              eectl console --cp {cp_url} --token {admin_token}
  attested health:                      {url}.ee/health?attest=true&nonce={"00" * 16}
  verify it yourself:                   {verify}
  logs:                                 {state / 'cp.log'}, {state / 'agent.log'}
""", flush=True)
        if args.detach:
            procs.clear()
            print("Detached: `tools/quickstart --stop` stops the CP and the agent.")
            return
        print("Ctrl-C stops the CP and the agent (the workload keeps running and is "
              "adopted next time).", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(proc.poll() is None for proc in procs):
            time.sleep(1)
        fail("the CP or the agent exited; see the logs in " + str(state))
    except KeyboardInterrupt:
        print("\nquickstart: stopping")
    finally:
        if procs:
            stop_all()
            (state / PIDS_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
