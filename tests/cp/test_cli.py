"""`ee-cp` as a real process: flags, refusals, dev bootstrap reuse, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cpkit import free_port

CP = [sys.executable, "-m", "ee.cp.server"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CP + args, capture_output=True, text=True, timeout=60, env=env)


def test_help_and_refusals(tmp_path: Path) -> None:
    env = {**os.environ, "EE_SIM_DIR": str(tmp_path / "sim")}
    r = run(["--help"], env)
    assert r.returncode == 0 and "--agent-listen" in r.stdout
    r = run(["--data-dir", str(tmp_path / "none")], env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no bootstrap bundle" in r.stderr
    r = run(["--data-dir", str(tmp_path / "x"), "--role", "dc"], env)
    assert r.returncode == 2 and "--role dc needs --upstream" in r.stderr
    r = run(["--data-dir", str(tmp_path / "x"), "--listen", "nonsense"], env)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def start(data: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int, str]:
    port = free_port()
    proc = subprocess.Popen(
        [*CP, "--dev", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}",
         "--agent-listen", f"127.0.0.1:{free_port()}", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    token_line = next(line for line in lines if "admin token" in line)
    return proc, port, token_line


def test_dev_start_reuses_bundle_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "EE_SIM_DIR": str(tmp_path / "sim")}
    data = tmp_path / "cp"
    proc, port, line = start(data, env)
    try:
        token = (data / "admin.token").read_text().strip()
        assert token in line and "new" in line
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v2/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        cluster = r.json()["cluster_id"]
        r = httpx.get(f"http://127.0.0.1:{port}/api/v2/agents",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"agents": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    bundle = json.loads((data / "bootstrap.json").read_text())

    proc, port, line = start(data, env)
    try:
        assert token in line and "new" not in line
        assert json.loads((data / "bootstrap.json").read_text()) == bundle
        assert bundle["cluster_id"] == cluster
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0

    # Tampering is refused with a one-line reason.
    bundle["trust"]["policy"]["mode"] = "disabled"
    (data / "bootstrap.json").write_text(json.dumps(bundle))
    r = run(["--data-dir", str(data)], env)
    assert r.returncode == 2 and "bootstrap bundle refused" in r.stderr


def test_production_bundle_start_and_refusals(tmp_path: Path) -> None:
    """Without --dev: a dev bundle, a production bundle without its pinned key, one
    signed by another key, an unsigned or a tampered one: exit 2, one line each; a good
    production bundle starts."""
    from test_bundle import eectl_cp

    env = {**os.environ, "EE_SIM_DIR": str(tmp_path / "sim")}
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "other")) == 0
    data = tmp_path / "prod"
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(data), "--cluster-id", "prod-cli") == 0
    pub = ["--bundle-pubkey", str(tmp_path / "offline.pub")]

    def refused(args: list[str], text: str) -> None:
        r = run(args, env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and text in r.stderr, r.stderr

    dev_cp = start(tmp_path / "dev", env)[0]  # makes a dev data dir
    dev_cp.send_signal(signal.SIGTERM)
    assert dev_cp.wait(timeout=20) == 0
    refused(["--data-dir", str(tmp_path / "dev")], "is a dev bundle")
    refused(["--data-dir", str(data)], "--bundle-pubkey")
    refused(["--data-dir", str(data), "--bundle-pubkey", str(tmp_path / "other.pub")],
            "bad signature")
    refused(["--data-dir", str(data), "--bundle-pubkey", str(tmp_path / "nope.pub")],
            "unreadable")

    port = free_port()
    proc = subprocess.Popen(
        [*CP, "--data-dir", str(data), *pub, "--listen", f"127.0.0.1:{port}",
         "--agent-listen", f"127.0.0.1:{free_port()}", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v2/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert r.json()["cluster_id"] == "prod-cli"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0

    sig = data / "bootstrap.json.sig"
    saved = sig.read_text()
    sig.unlink()
    refused(["--data-dir", str(data), *pub], "signature missing")
    sig.write_text(saved)
    doc = json.loads((data / "bootstrap.json").read_text())
    doc["trust"]["policy"]["mode"] = "disabled"
    (data / "bootstrap.json").write_text(json.dumps(doc))
    refused(["--data-dir", str(data), *pub], "bad signature")
