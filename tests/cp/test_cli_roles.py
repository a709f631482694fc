"""`ee-cp` usage errors: a flag of another role, and a listener address already taken.

Both used to be silent or loud in the wrong way: `--datacenter` without `--role dc`
started a standalone CP, and a taken port ended in a 60-line exception-group traceback
(rc 1). Now each is one line on stderr and exit 2.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ee.cp.server import ROLE_FLAGS, CpConfig, build_parser, misplaced_flag, start_failure
from ee.supervisors import StartFailed

CP = [sys.executable, "-m", "ee.cp.server"]
VALUES = {"degraded_after_s": "5", "federation_ask_timeout_s": "5", "federation_stats_s": "5",
          "federation_listen": "127.0.0.1:0", "federation_advertise": "127.0.0.1:9",
          "upstream": "http://x", "datacenter": "sim:x"}


def run(args: list[str], data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CP, "--dev", "--data-dir", str(data), *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


@pytest.mark.parametrize(("needs", "flag"), [(role, flag) for role, flags in ROLE_FLAGS.items()
                                             for flag in flags])
def test_each_role_flag_needs_its_role(needs: str, flag: str) -> None:
    option = "--" + flag.replace("_", "-")
    value = VALUES.get(flag, "abc")
    for role in ("standalone", "master", "dc"):
        args = build_parser().parse_args(["--role", role, option, value])
        expected = None if role == needs else f"{option} needs --role {needs}"
        assert misplaced_flag(args, role) == expected, (role, option)
    assert misplaced_flag(build_parser().parse_args([]), "standalone") is None


@pytest.mark.parametrize(("args", "message"), [
    (["--datacenter", "sim:x", "--join-token", "abc"], "ee-cp: --datacenter needs --role dc"),
    (["--role", "master", "--upstream", "http://x"], "ee-cp: --upstream needs --role dc"),
    (["--role", "dc", "--upstream", "http://x", "--datacenter", "sim:x",
      "--federation-listen", "127.0.0.1:0"], "ee-cp: --federation-listen needs --role master"),
    (["--enroll-bundle", "b.json"], "ee-cp: --enroll-bundle needs --role dc"),
])
def test_a_flag_of_another_role_is_a_usage_error(tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    r = run(args, tmp_path / "cp")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == message
    assert not (tmp_path / "cp").exists()  # refused before anything was written


@pytest.mark.parametrize("flag", ["--listen", "--agent-listen", "--federation-listen"])
def test_a_taken_port_is_one_line(tmp_path: Path, flag: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        addresses = {"--listen": "127.0.0.1:0", "--agent-listen": "127.0.0.1:0",
                     "--federation-listen": "127.0.0.1:0", flag: taken}
        r = run(["--role", "master", "--log-level", "WARNING",
                 *[part for item in addresses.items() for part in item]], tmp_path / "cp")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == f"ee-cp: {flag} {taken}: address already in use"


def test_a_port_lost_after_the_check_is_named_too() -> None:
    """The race: the port was free when checked, taken when the tree bound it."""
    config = CpConfig(data_dir=Path("/nonexistent"), role="master",
                      federation_listen="0.0.0.0:8002")
    busy = OSError(98, "Address already in use")
    federation = StartFailed("cp", "federation", StartFailed(
        "federation", "listener", ExceptionGroup("nursery", [busy])))
    assert start_failure(federation, config) == \
        "--federation-listen 0.0.0.0:8002: address already in use"
    http = ExceptionGroup("nursery", [StartFailed("cp", "http", ExceptionGroup(
        "nursery", [ExceptionGroup("nursery", [busy])]))])
    assert start_failure(http, config) == "--listen 127.0.0.1:8000: address already in use"
    plane = StartFailed("cp", "agent-plane", ExceptionGroup("nursery", [busy]))
    assert start_failure(plane, config) == \
        "--agent-listen 127.0.0.1:8001: address already in use"
    other = StartFailed("cp", "records", OSError(28, "No space left on device"))
    assert start_failure(other, config) is None  # not a listener: the traceback stays


def test_the_federation_start_up_line_names_host_and_port(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CP, "--dev", "--data-dir", str(tmp_path / "cp"), "--role", "master",
         "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0",
         "--federation-listen", "127.0.0.1:0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert re.fullmatch(r"ee-cp: federation \(mTLS\) on 127\.0\.0\.1:[1-9]\d*\n", line), line
