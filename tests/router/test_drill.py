"""eectl drill db-wipe against a real ee-cp process with (simulated) agents attached."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import trio
import trio_websocket
from cpkit import dev_config, free_port
from simagent import SimAgent

from ee.attestation.providers.sim import SimTD
from ee.cp.server import prepare
from ee.protocol.signing import (
    generate_signing_key,
    load_public_key,
    read_enveloped,
    save_private_key,
    save_public_key,
)


async def test_db_wipe_drill_passes_and_signs_its_result(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    boot, _ = prepare(dev_config(data))
    assert boot.sim_dir is not None
    td = SimTD.load(boot.sim_dir)
    token = (data / "admin.token").read_text().strip()
    http, plane = free_port(), free_port()
    pid = tmp_path / "cp.pid"
    cmd = shlex.join([sys.executable, "-m", "ee.cp.server", "--dev", "--data-dir", str(data),
                      "--listen", f"127.0.0.1:{http}", "--agent-listen", f"127.0.0.1:{plane}"])
    start = f"{cmd} >>{shlex.quote(str(tmp_path / 'cp.log'))} 2>&1 & echo $! > {pid}"
    stop = f"kill $(cat {pid})"
    key = generate_signing_key()
    save_private_key(tmp_path / "drill.key", key)
    save_public_key(tmp_path / "drill.pub", key.public_key())
    await trio.run_process(start, shell=True)
    try:
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                url = f"ws://127.0.0.1:{plane}/api/v2/agents/connect"
                agents = [SimAgent(url=url, td=td, vm_name=f"drill-vm-{i}") for i in range(2)]
                for agent in agents:
                    while True:  # the CP is still starting
                        try:
                            await nursery.start(agent.run_forever)
                            break
                        except (OSError, trio_websocket.HandshakeError):
                            await trio.sleep(0.2)
                records = data / "records.sqlite3"
                assert records.exists()
                proc = await trio.run_process(
                    [sys.executable, "-m", "ee.ctl.main", "drill", "db-wipe",
                     "--cp", f"http://127.0.0.1:{http}", "--token", token,
                     "--stop-cmd", stop, "--start-cmd", start, "--wipe", str(records),
                     "--sign-key", str(tmp_path / "drill.key"),
                     "--out", str(tmp_path / "result.json"), "--timeout", "60"],
                    capture_stdout=True, capture_stderr=True, check=False)
                out = proc.stdout.decode()
                assert proc.returncode == 0, out + proc.stderr.decode() + \
                    (tmp_path / "cp.log").read_text()[-3000:]
                assert all(a.sessions >= 2 for a in agents)  # re-registered after the wipe
                nursery.cancel_scope.cancel()
        result = read_enveloped(tmp_path / "result.json", load_public_key(tmp_path / "drill.pub"))
        assert result["passed"] is True and result["drill"] == "db-wipe"
        steps = {s["step"]: s for s in result["steps"]}
        assert list(steps) == ["before", "stop", "wipe", "start", "rehydrate", "heartbeat",
                               "deploy"]
        assert all(s["ok"] for s in steps.values())
        assert str(records) in steps["wipe"]["removed"]
        assert set(steps["rehydrate"]["agents_online"]) >= {"drill-vm-0", "drill-vm-1"}
    finally:
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), 15)
            except ProcessLookupError:
                pass


async def test_a_failed_drill_is_signed_as_failed_and_exits_1(tmp_path: Path) -> None:
    key = generate_signing_key()
    save_private_key(tmp_path / "drill.key", key)
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "ee.ctl.main", "drill", "db-wipe",
             "--cp", f"http://127.0.0.1:{free_port()}", "--token", "t", "--stop-cmd", "true",
             "--start-cmd", "true", "--wipe", str(tmp_path / "none"),
             "--sign-key", str(tmp_path / "drill.key"), "--out", str(tmp_path / "r.json")],
            capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 1
    result = read_enveloped(tmp_path / "r.json", key.public_key())
    assert result["passed"] is False
    assert result["steps"][0]["step"] == "before" and not result["steps"][0]["ok"]
