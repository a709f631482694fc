"""`eectl federation`: help texts, the join token's warning, and a closed stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from .ctlkit import eectl, eectl_env, local_http

STATUS = {"role": "master", "listen": "127.0.0.1:8002", "snapshot_version": 3,
          "datacenters": [{"datacenter": f"sim:dc-{i}", "mode": "federated", "connected": True,
                           "sync_lag_s": 0.1, "spool_depth": 0} for i in range(2000)]}


async def test_status_and_desired_help_say_what_they_do(tmp_path: Path) -> None:
    with trio.fail_after(30):
        status = await eectl("federation", "status", "--help", state_dir=tmp_path)
        desired = await eectl("federation", "desired", "--help", state_dir=tmp_path)
    assert status.returncode == 0 and "At a dc CP: its upstream" in " ".join(
        status.stdout.split())  # argparse wraps the description
    assert desired.returncode == 0 and "signs a new snapshot version" in " ".join(
        desired.stdout.split())


async def test_join_token_prints_the_answers_warning(tmp_path: Path) -> None:
    warning = ("datacenter sim:a is enrolled (linked now): joining with this token replaces "
               "its keys")
    answer = {"token": "eej_secret.pin", "expires_in_s": 600, "datacenter": "sim:a",
              "warning": warning}
    with local_http(lambda *_: (200, "application/json", json.dumps(answer).encode())) as url:
        with trio.fail_after(30):
            r = await eectl("federation", "join-token", "--cp", url, "--token", "t",
                            "--datacenter", "sim:a", state_dir=tmp_path)
            del answer["warning"]
            quiet = await eectl("federation", "join-token", "--cp", url, "--token", "t",
                                state_dir=tmp_path)
    assert r.returncode == 0 and r.stdout == "eej_secret.pin\n"  # the token alone on stdout
    assert f"warning: {warning}" in r.err_lines
    assert quiet.returncode == 0 and "warning" not in quiet.stderr


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """`eectl federation status | head -1`: no BrokenPipeError traceback."""
    body = json.dumps(STATUS).encode()
    with local_http(lambda *_: (200, "application/json", body)) as url:
        read, write = os.pipe()
        os.close(read)  # the reader is gone before eectl writes
        try:
            r = subprocess.run([sys.executable, "-m", "ee.ctl.main", "federation", "status",
                                "--cp", url, "--token", "t"], stdout=write,
                               stderr=subprocess.PIPE, text=True, timeout=60,
                               env=eectl_env(tmp_path))
        finally:
            os.close(write)
    assert r.stderr == ""
    assert r.returncode == 1
