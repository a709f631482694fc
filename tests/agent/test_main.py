"""``ee-agent`` (run as ``python -m ee.agent.main`` until the console script exists)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from ee.agent.main import apply_flags, build_parser, main
from ee.agent.platform import shared_sim_dir

from .agentkit import eventually, free_port, running_cp
from .test_proxy_attacks import Upstream, head, raw

AGENT = [sys.executable, "-m", "ee.agent.main"]


def _flags(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_help_mentions_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--cp", "--listen", "--data-dir", "--vm-name", "--node-size",
                 "--datacenter", "--dev", "--print-config"):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cp", "http://cp:8001"], "--cp must be a ws:// or wss:// URL"),
        (["--listen", "nowhere"], "listen: must be host:port"),
        (["--config", "/definitely/not/here.json"], "file (/definitely/not/here.json): not found"),
        (["--vm-name", ""], "vm_name: must not be empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ee-agent: ") and message in err


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--frobnicate"])
    assert info.value.code == 2


def test_print_config_delegates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cp_url": "ws://cp:8001/api/v2/agents/connect",
                                "node_size": "llm"}))
    assert main(["--print-config", "--config", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"] == "file" and printed["config"]["node_size"] == "llm"
    path.write_text(json.dumps({"node_size": 5}))
    assert main(["--print-config", "--config", str(path)]) == 1
    assert "field node_size" in capsys.readouterr().err


def test_flags_override_the_config(tmp_path: Path) -> None:
    from ee.agent.config import AgentConfig

    base = AgentConfig(cp_url="ws://old:1/api/v2/agents/connect", node_size="tiny")
    config = apply_flags(base, _flags("--cp", "wss://cp.example:8001", "--listen", "1.2.3.4:9",
                                      "--vm-name", "vm-9", "--datacenter", "gcp:us",
                                      "--data-dir", str(tmp_path)))
    assert config.cp_url == "wss://cp.example:8001/api/v2/agents/connect"
    assert (config.listen, config.vm_name, config.datacenter) == ("1.2.3.4:9", "vm-9", "gcp:us")
    assert config.node_size == "tiny" and config.data_dir == str(tmp_path)
    assert config.attestation_provider == "tsm"

    dev = apply_flags(base, _flags("--dev", "--vm-name", "vm-d", "--cp", "ws://cp:1/custom"))
    assert dev.attestation_provider == "sim" and dev.sim_dir == str(shared_sim_dir())
    assert dev.data_dir.endswith("easyenclave/agents/vm-d")
    assert dev.cp_url == "ws://cp:1/custom"


async def test_gives_up_on_an_unreachable_cp_with_exit_3(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"reconnect_max_attempts": 2, "reconnect_backoff_base_s": 0.05,
                                  "reconnect_backoff_max_s": 0.1}))
    argv = [*AGENT, "--config", str(config), "--dev", "--cp", f"ws://127.0.0.1:{free_port()}",
            "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--vm-name", "vm-x"]
    with trio.fail_after(60):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
    assert result.returncode == 3, result.stderr.decode()
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("ee-agent: gave up on the CP: 2 consecutive connection attempts")
    out = result.stdout.decode()
    assert f"control secret created in {tmp_path / 'data' / 'control.secret'}" in out


async def test_runs_against_a_real_cp_and_stops_on_sigterm(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            argv = [*AGENT, "--dev", "--cp", env.agent_url.rsplit("/api/", 1)[0],
                    "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
                    "--vm-name", "vm-main", "--node-size", "standard"]
            process: trio.Process = await nursery.start(partial(
                trio.run_process, argv, check=False, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))

            async def listed() -> bool:
                return any(a["vm_name"] == "vm-main" and a["status"] == "online"
                           for a in await env.agents())

            await eventually(listed, timeout=30)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            assert (tmp_path / "data" / "agent.key").stat().st_mode & 0o077 == 0


async def test_the_real_agent_refuses_proxy_tricks(tmp_path: Path) -> None:
    """The gate is on in the ``ee-agent`` process: the tricks that made its proxy an
    open SSRF relay (``GET @host:port/…``) or a 500 (``GET http://…``) are 400s."""
    argv = [*AGENT, "--dev", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
            "--vm-name", "vm-raw"]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            elsewhere: Upstream = await nursery.start(Upstream().serve)
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                                       stderr=subprocess.DEVNULL)
            try:
                assert process.stdout is not None
                out = b""
                while (found := re.search(rb"http on 127\.0\.0\.1:([0-9]+)", out)) is None:
                    chunk = await process.stdout.receive_some(4096)
                    assert chunk, out
                    out += chunk
                port = int(found.group(1))
                other = f"127.0.0.1:{elsewhere.port}"
                for line, code in ((f"GET @{other}/x HTTP/1.1", "userinfo_in_target"),
                                   (f"GET http://{other}/x HTTP/1.1", "absolute_form"),
                                   (f"CONNECT {other} HTTP/1.1", "connect_refused")):
                    answer = await raw(port, head(line))
                    assert (answer.status, answer.code) == (400, code), line
                assert elsewhere.connections == 0
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                assert process.stdout is not None
                await process.stdout.aclose()
            nursery.cancel_scope.cancel()
