"""`eectl deploy` as a real subprocess against a real in-process CP with sim agents
(tenant account, app and version made through the API), plus its pure views."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import trio

from ee.ctl.client import CpError
from ee.ctl.deploy import (
    Progress,
    attested_check,
    diagnostics_of,
    diagnostics_text,
    placement_request,
    progress_lines,
    transitions,
)
from ee.ctl.main import build_parser

from .ctlkit import column, eectl, running_cp, tenant_app


async def test_preflight_and_unplaceable_run_print_diagnostics(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            a = await nursery.start(env.agent("vm-1").run)
            b = await nursery.start(env.agent("vm-2").run)
            key = await tenant_app(env)
            cp = ("--cp", env.http, "--token", key)
            r = await eectl("deploy", "preflight", "web", "--version", "1", "--replicas", "2",
                            *cp, state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert "placeable: yes" in r.stdout
            assert a.agent_id in r.stdout and b.agent_id in r.stdout

            r = await eectl("deploy", "preflight", "web", "--version", "1", "--node-size",
                            "llm", *cp, state_dir=tmp_path)
            assert r.returncode == 1
            assert "placeable: no" in r.stdout and "candidates: none" in r.stdout
            assert column(r.stdout, a.agent_id, "REASONS") == "NODE_SIZE_MISMATCH"

            # `run` where nothing fits: the 409's diagnostics, exit 1, nothing deployed.
            r = await eectl("deploy", "run", "web", "--version", "1", "--replicas", "2",
                            "--gpu", "--exclude-agent", b.agent_id, *cp, state_dir=tmp_path)
            assert r.returncode == 1, r.stderr
            assert r.stdout.startswith("cannot place web@1 (replicas 2): ")
            assert "rejected (2):" in r.stdout
            assert column(r.stdout, a.agent_id, "REASONS") == "NO_GPU"
            assert column(r.stdout, b.agent_id, "REASONS") == "NO_GPU;"
            assert f"{b.agent_id}  NO_GPU; EXCLUDED" in r.stdout
            async with env.client(token=key) as tenant:
                assert (await tenant.get("/api/v2/deployments")).json()["deployments"] == []

            # Errors the CP gives for bad input are one line.
            r = await eectl("deploy", "run", "web", "--version", "9", *cp, state_dir=tmp_path)
            assert r.returncode == 1
            assert r.stderr == "eectl deploy run: no version '9' (404 not_found)\n"
            nursery.cancel_scope.cancel()


async def test_run_follows_to_running_then_wait_attested(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            a = await nursery.start(env.agent("vm-1").run)
            b = await nursery.start(env.agent("vm-2").run)
            key = await tenant_app(env)
            cp = ("--cp", env.http, "--token", key)
            r = await eectl("deploy", "run", "web", "--version", "1", "--replicas", "2",
                            "--poll", "0.1", *cp, state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            # stdout: the result (id, state, URL); stderr: the progress.
            lines = r.stdout.splitlines()
            dep = lines[0].split()[1]
            assert lines == [f"deployment {dep} is running", "url: -"]  # sim agents: no URL
            progress = r.err_lines
            assert progress[0] == f"deployment {dep}: following (at most 900 s)"
            assert progress[1].startswith(f"deployment {dep}: ")
            assert f"replica on {a.agent_id}: " in r.stderr
            assert f"replica on {b.agent_id}: " in r.stderr
            assert "\x1b[" not in r.stderr  # no cursor control when not on a terminal

            r = await eectl("deploy", "wait-attested", dep, "--timeout", "10", *cp,
                            state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert column(r.stdout, "vm-1", "VERDICT") == "pass"
            assert column(r.stdout, "vm-2", "STATUS") == "online"
            assert column(r.stdout, "vm-2", "OK") == "yes"
            assert r.stdout.endswith("every replica runs on an attested agent\n")
            r = await eectl("deploy", "wait-attested", dep, "--json", *cp,
                            state_dir=tmp_path)
            doc = json.loads(r.stdout)
            assert r.returncode == 0 and doc["attested"] is True and doc["failure"] is None
            assert sorted(x["vm"] for x in doc["replicas"]) == ["vm-1", "vm-2"]
            r = await eectl("deploy", "preflight", "web", "--version", "1", "--json", *cp,
                            state_dir=tmp_path)
            assert r.returncode == 1 and json.loads(r.stdout)["placeable"] is False  # full

            # `trust wait-attested` is the same command (the tenant attestation view).
            r = await eectl("trust", "wait-attested", dep, "--timeout", "10", *cp,
                            state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert column(r.stdout, a.agent_id, "VERDICT") == "pass"
            assert r.stdout.endswith("every replica runs on an attested agent\n")
            r = await eectl("deploy", "wait-attested", "dep-nope", *cp, state_dir=tmp_path)
            assert r.returncode == 1
            assert r.stderr == ("eectl deploy wait-attested: no deployment 'dep-nope' "
                                "(404 not_found)\n")

            await nursery.start(env.agent("vm-3").run)  # one deployment per agent: a free one
            r = await eectl("deploy", "run", "web", "--version", "1", "--no-wait", *cp,
                            state_dir=tmp_path)
            assert r.returncode == 0 and r.stdout.startswith("dep-")
            nursery.cancel_scope.cancel()


async def test_run_reports_a_failed_deployment(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            for i in range(3):  # the CP tries three agents before it gives up
                await nursery.start(env.agent(f"vm-{i}", fail_deploys=True).run)
            key = await tenant_app(env)
            r = await eectl("deploy", "run", "web", "--version", "1", "--poll", "0.1",
                            "--timeout", "30", "--cp", env.http, "--token", key,
                            state_dir=tmp_path)
            assert r.returncode == 1, r.stderr
            assert r.stdout == ""
            assert " failed\n" in r.stderr
            assert "replicas failed on 3 agents" in r.stderr
            nursery.cancel_scope.cancel()


async def test_unreachable_cp_and_bad_usage(tmp_path: Path) -> None:
    with trio.fail_after(30):
        r = await eectl("deploy", "run", "web", "--version", "1", "--cp", "http://127.0.0.1:9",
                        "--key", "k", state_dir=tmp_path)
        assert r.returncode == 1 and len(r.err_lines) == 1
        assert r.stderr.startswith("eectl deploy run: cannot reach the CP at http://127.0.0.1:9: ")
        r = await eectl("deploy", "run", "web", "--version", "1", "--replicas", "0",
                        state_dir=tmp_path)
        assert r.returncode == 2 and "must be >= 1" in r.stderr
        r = await eectl("deploy", "preflight", "web", "--version", "1", "--cp", "ftp://x",
                        state_dir=tmp_path)
        assert r.returncode == 2
        assert r.stderr == "eectl deploy preflight: --cp must be an http(s) URL, not 'ftp://x'\n"


# --- pure views ----------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["deploy", "run", *argv])


def test_placement_request() -> None:
    assert placement_request(_args("web", "--version", "2")) == {
        "version": "2", "replicas": 1, "constraints": {}}
    assert placement_request(_args("web", "--version", "2", "--replicas", "3",
                                   "--datacenter", "gcp:x", "--node-size", "llm", "--gpu",
                                   "--exclude-agent", "ag-1", "--exclude-agent", "ag-2")) == {
        "version": "2", "replicas": 3,
        "constraints": {"datacenter": "gcp:x", "node_size": "llm", "gpu": True,
                        "exclude_agents": ["ag-1", "ag-2"]}}


def test_diagnostics() -> None:
    placement = {"placeable": False, "candidates": [{"agent_id": "ag-1", "rank": 1}],
                 "rejected": [{"agent_id": "ag-2", "reasons": ["DRAINING", "NO_GPU"]},
                              {"agent_id": "ag-3", "reasons": [{"code": "STALE",
                                                                "message": "no heartbeat"}]}],
                 "chosen": ["ag-1"], "shortfall": 1}
    error = CpError(409, "not_placeable", "no placement", placement)
    assert diagnostics_of(error) == placement
    assert diagnostics_of(CpError(409, "x", "y", {"preflight": placement})) == placement
    assert diagnostics_of(CpError(409, "conflict", "exists")) is None
    assert diagnostics_text(placement).splitlines() == [
        "placeable: no",
        "candidates: ag-1",
        "rejected (2):",
        "  AGENT  REASONS",
        "  ag-2   DRAINING; NO_GPU",
        "  ag-3   no heartbeat [STALE]",
        "shortfall: 1",
    ]
    # at a master: why no federated datacenter takes it, or the one it would go to
    at_master = {**placement, "datacenters": {"sim:dc-b": "DATACENTER_DEGRADED",
                                              "sim:dc-a": "NO_CAPACITY"}}
    assert "datacenters: sim:dc-a NO_CAPACITY, sim:dc-b DATACENTER_DEGRADED" in \
        diagnostics_text(at_master).splitlines()
    assert "datacenter: sim:dc-a" in diagnostics_text(
        {**placement, "placeable": True, "datacenter": "sim:dc-a"}).splitlines()


DEP = {"deployment_id": "dep-1", "app": "web", "version": "1", "state": "starting",
       "replicas_wanted": 3,
       "replicas": [{"agent_id": "ag-1", "state": "running", "url": "http://a"},
                    {"agent_id": "ag-2", "state": "pulling"}]}


def test_progress_lines_and_transitions() -> None:
    assert progress_lines(DEP) == [
        "deployment dep-1 web@1: starting",
        "  ag-1                     placing → starting → [running]  http://a",
        "  ag-2                     placing → [starting: pulling] → running",
        "  (unplaced)               [placing] → starting → running",
    ]
    before = {**DEP, "state": "placing", "replicas": [{"agent_id": "ag-1", "state": "starting"}]}
    assert transitions(before, DEP) == [
        "deployment dep-1: placing -> starting",
        "replica on ag-1: starting -> running",
        "replica on ag-2: pulling",
    ]
    failed = {**DEP, "state": "failed",
              "replicas": [{"agent_id": "ag-1", "state": "failed", "error": "boom"}]}
    assert transitions(DEP, failed)[1] == "replica on ag-1: running -> failed (boom)"
    assert transitions(DEP, DEP) == []


def test_progress_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress.update(DEP)
    progress.update({**DEP, "state": "running"})
    text = out.getvalue()
    assert text.count("\x1b[4F") == 1  # moved up over the 4 lines drawn before
    assert text.endswith("\x1b[2K  (unplaced)               [placing] → starting → running\n")


def test_attested_check() -> None:
    agents = {"ag-1": {"vm_name": "vm-1", "status": "online",
                       "attestation": {"verdict": "pass", "tcb_status": "UpToDate"}},
              "ag-2": {"vm_name": "vm-2", "status": "stale",
                       "attestation": {"verdict": "warn"}}}
    dep = {"state": "running", "replicas_wanted": 2,
           "replicas": [{"agent_id": "ag-1", "state": "running"},
                        {"agent_id": "ag-2", "state": "running"}]}
    check = attested_check(dep, agents)
    assert not check.done and check.failure is None  # ag-2 is stale: keep waiting
    assert [row[-1] for row in check.rows] == ["yes", "no"]
    agents["ag-2"] = {**agents["ag-2"], "status": "online"}
    assert attested_check(dep, agents).done  # a warn verdict is good enough
    # A replica that failed and was moved does not count; too few live ones do.
    moved = {**dep, "replicas": [*dep["replicas"], {"agent_id": "ag-3", "state": "failed"}]}
    assert attested_check(moved, agents).done
    assert not attested_check({**dep, "replicas": dep["replicas"][:1]}, agents).done
    assert attested_check({**dep, "state": "failed"}, agents).failure == "deployment is failed"
    assert not attested_check({"state": "placing", "replicas": []}, {}).done
