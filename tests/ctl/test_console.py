"""`eectl console` as a real subprocess against a real in-process CP with sim agents:
scripted (stdin is a pipe) and interactive (a real pty, prompt_toolkit)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
from pathlib import Path
from typing import Any

import trio

from ee.ctl.client import CpClient
from ee.ctl.console import Console, agents_table, event_line, tree_table

from .ctlkit import column, console, eectl, eectl_env, running_cp, tenant_app

COMMANDS = ("help", "agents", "agent", "apps", "deployments", "datacenters", "pools", "orders",
            "billing", "tree",
            "events", "drain", "undrain", "crash", "names", "release-name", "quit")


async def test_help_unknown_command_and_script_exit_status(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            r = await console(env, "help\n\n# a comment\nfrobnicate now\nhelp tree\n",
                              state_dir=tmp_path)
            lines = r.stdout.splitlines()
            assert lines[0] == "commands:"
            listed = [line.split()[0] for line in lines[1:len(COMMANDS) + 1]]
            assert listed == list(COMMANDS)
            assert "stream live events" in r.stdout
            # The loop went on after the unknown command.
            assert lines[-1].startswith("tree  —  the CP's supervision tree")
            assert r.err_lines == ["error: unknown command 'frobnicate'; type 'help' for "
                                   "the list"]
            assert r.returncode == 1  # a script with a failed command says so
            assert "ee>" not in r.stdout  # no prompt decoration when not on a terminal

            ok = await console(env, "help\nquit\nagents\n", state_dir=tmp_path)
            assert ok.returncode == 0 and ok.stderr == ""
            assert "AGENT" not in ok.stdout  # nothing runs after quit


async def test_agents_agent_datacenters_and_tree(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            a = await nursery.start(env.agent("vm-alpha").run)
            await nursery.start(env.agent("vm-beta", node_size="tiny").run)
            r = await console(env, f"agents\nagent {a.agent_id[:8]}\nagent vm-alpha\n"
                                   "datacenters\ntree\ndeployments\n", state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            out = r.stdout
            assert column(out, "vm-alpha", "STATUS") == "online"
            assert column(out, "vm-beta", "SIZE") == "tiny"
            assert column(out, "vm-alpha", "ATTEST") == "pass"
            assert column(out, "vm-alpha", "DRAINING") == "no"
            # `agent` resolves an id prefix and a vm name to the same agent.
            assert out.count(f"       agent_id: {a.agent_id}") == 2
            assert "attestation: pass (provider sim" in out
            assert column(out, "local:dev", "ONLINE") == "2"
            assert "├─ agent-plane" in out and "RESTARTS" in out and "MAILBOX" in out
            assert column(out, "agent-plane", "RESTARTS") == "0"
            assert column(out, f"agent/{a.agent_id}", "MAILBOX") == "0"
            assert "no deployments on any agent" in out
            nursery.cancel_scope.cancel()


async def test_drain_and_undrain_flip_draining(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            a = await nursery.start(env.agent("vm-d").run)
            r = await console(env, "drain vm-d\nagents\n", state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert f"{a.agent_id} (vm-d): draining yes" in r.stdout
            assert column(r.stdout, "vm-d", "DRAINING") == "yes"
            async with env.client() as admin:
                view = (await admin.get(f"/api/v2/agents/{a.agent_id}")).json()
                assert view["draining"] is True
            r = await console(env, f"undrain {a.agent_id[:6]}\n", state_dir=tmp_path)
            assert r.returncode == 0 and "draining no" in r.stdout
            async with env.client() as admin:
                view = (await admin.get(f"/api/v2/agents/{a.agent_id}")).json()
                assert view["draining"] is False
            r = await console(env, "drain ag-nope\n", state_dir=tmp_path)
            assert r.returncode == 1
            assert r.err_lines == ["error: no agent 'ag-nope' (404 not_found)"]
            nursery.cancel_scope.cancel()


async def test_crash_asks_to_confirm_then_tree_shows_the_restart(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            a = await nursery.start(env.agent("vm-c").run)
            name = f"agent/{a.agent_id}"
            # Wrong confirmation: nothing happens.
            r = await console(env, f"crash {name}\n{name}-typo\ntree\n", state_dir=tmp_path)
            assert "type the name again to confirm" in r.stdout
            assert r.err_lines == [f"error: not confirmed; {name} was not crashed"]
            assert column(r.stdout, name, "RESTARTS") == "0"
            # Confirmed: the supervisor restarts it, and the tree shows it.
            r = await console(env, f"crash {name}\n{name}\ntree\nagent vm-c\n",
                              state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert f"crashed {name}; its supervisor restarted it (restarts 1)" in r.stdout
            assert column(r.stdout, name, "RESTARTS") == "1"
            assert "ChaosCrash" in r.stdout
            assert "         status: online" in r.stdout  # rebuilt from the live session
            # Unknown actor: one line from the CP.
            r = await console(env, "crash agent/ag-nope\nagent/ag-nope\n", state_dir=tmp_path)
            assert r.returncode == 1 and len(r.err_lines) == 1
            assert "404 not_found" in r.stderr
            nursery.cancel_scope.cancel()


async def test_release_name_asks_to_confirm_and_eectl_agents_releases(
        tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            async with trio.open_nursery() as nursery:
                old = await nursery.start(env.agent("vm-r").run)
                await nursery.start(env.agent("vm-s").run)
                nursery.cancel_scope.cancel()
            rebuilt = await _register(env.agent("vm-r"))
            assert rebuilt.rejected is not None and rebuilt.rejected.code == "KEY_CHANGED"
            r = await console(env, "names\nrelease-name vm-r\nvm-x\nnames\n",
                              state_dir=tmp_path)
            assert column(r.stdout, "vm-r", "STATE") == "bound"
            assert column(r.stdout, "vm-r", "AGENT") == old.agent_id
            assert r.err_lines == ["error: not confirmed; vm-r was not released"]
            assert r.stdout.count("vm-r ") == 2  # still listed after the refusal
            r = await console(env, "release-name vm-r\nvm-r\nnames\n", state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert "released vm-r (was bound, key " in r.stdout
            assert "vm-r " not in r.stdout.split("to register owns it", 1)[1]
            assert (await _register(rebuilt)).registered is not None

            typed = ("--cp", env.http, "--token", env.token)
            r = await eectl("agents", "release-name", "vm-nobody", *typed, state_dir=tmp_path)
            assert r.returncode == 1
            assert r.err_lines == ["eectl agents release-name: no bound VM name 'vm-nobody' "
                                   "(404 not_found)"]
            r = await eectl("agents", "release-name", "vm-s", *typed, state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("released vm-s (was bound")
            r = await eectl("agents", "names", *typed, state_dir=tmp_path)
            assert r.returncode == 0 and column(r.stdout, "vm-r", "STATE") == "bound"
            assert "vm-s" not in r.stdout
            r = await eectl("agents", "names", "--cp", env.http, "--token", "nope",
                            state_dir=tmp_path)
            assert r.returncode == 1 and "403 forbidden" in r.stderr


async def _register(agent: Any) -> Any:
    agent.rejected = agent.registered = None
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        nursery.cancel_scope.cancel()
    return agent


async def test_events_shows_agent_connected(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            a = await nursery.start(env.agent("vm-e").run)
            r = await console(env, "events 4\nhelp events\n", state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert len(lines) == 5  # four events, then the loop went on
            assert any(f"agent.connected {a.agent_id} vm_name=vm-e" in line
                       for line in lines[:4])
            assert any("identity.bound vm-e" in line for line in lines[:4])
            assert lines[0].startswith("#1 ")
            # The name is bound right before admission, then the registration is recorded.
            assert [line.split()[2] for line in lines[:2]] == ["identity.bound", "registration"]
            nursery.cancel_scope.cancel()


async def test_bad_token_and_unreachable_cp_are_one_line(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            r = await console(env, "agents\ntree\nevents 1\nhelp\n", token="not-the-token",
                              state_dir=tmp_path)
            assert r.returncode == 1
            refused = "error: the token is not the admin token (403 forbidden)"
            assert r.err_lines[:2] == [refused, refused]
            assert r.err_lines[2:] == ["error: the events stream needs the admin token "
                                       "(403 forbidden)"]
            assert r.stdout.startswith("commands:")  # still looping
            r = await eectl("console", "--cp", env.http, stdin="agents\n", state_dir=tmp_path)
            assert r.err_lines == ["error: this route needs 'Authorization: Bearer <admin "
                                   "token>' (401 unauthenticated)"]
            token_file = tmp_path / "admin.token"
            token_file.write_text(env.token + "\n")
            r = await eectl("console", "--cp", env.http, "--token-file", str(token_file),
                            stdin="datacenters\ntree\n", state_dir=tmp_path)
            assert r.returncode == 0 and "no datacenters" in r.stdout and "agent-plane" in r.stdout
            r = await eectl("console", "--token-file", str(tmp_path / "missing"),
                            state_dir=tmp_path)
            assert r.returncode == 2 and len(r.err_lines) == 1
            assert r.stderr.startswith("eectl console: cannot read token file")
        # The CP is gone now: every command says so in one line.
        r = await eectl("console", stdin="agents\nevents 1\n", state_dir=tmp_path,
                        EE_CP_URL=env.http, EE_TOKEN=env.token)
        assert r.returncode == 1 and len(r.err_lines) == 2
        assert all(line.startswith("error: cannot reach the CP at ") for line in r.err_lines)


async def test_apps_and_deployments_for_the_operator(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-w").run)
            key = await tenant_app(env, "shop")
            async with env.client(token=key) as tenant:
                r = await tenant.post("/api/v2/apps/shop/deployments",
                                      json={"version": "1", "replicas": 1, "constraints": {}})
                assert r.status_code == 202, r.text
                dep = r.json()["deployment_id"]
            with trio.fail_after(10):
                while True:
                    r = await console(env, "deployments\napps\n", state_dir=tmp_path)
                    if "running" in r.stdout:
                        break
                    await trio.sleep(0.1)
            assert r.returncode == 0, r.stderr
            assert column(r.stdout, dep, "STATE") == "running"
            assert column(r.stdout, dep, "VM") == "vm-w"
            assert column(r.stdout, "shop", "REPLICAS") == "1/1"
            # A tenant key cannot read the tree, so `apps` lists its own apps.
            r = await console(env, "apps\n", token=key, state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert column(r.stdout, "shop", "NAME") == "shop"
            nursery.cancel_scope.cancel()


# --- a real terminal ---------------------------------------------------------------


async def _read_until(stream: trio.lowlevel.FdStream, buf: bytearray, needle: bytes) -> None:
    with trio.move_on_after(8):
        while needle not in buf:
            try:
                chunk = await stream.receive_some(4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF before {needle!r}; got {bytes(buf)[-800:]!r}")
            buf += chunk
        return
    raise AssertionError(f"no {needle!r} in time; got {bytes(buf)[-800:]!r}")


async def test_interactive_prompt_completion_and_history(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            agent = await nursery.start(env.agent("vm-t").run)
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ee.ctl.main", "console", "--cp", env.http,
                 "--token", env.token],
                stdin=slave, stdout=slave, stderr=slave,
                env=eectl_env(tmp_path / "state", TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1"))
            os.close(slave)
            stream = trio.lowlevel.FdStream(master)
            buf = bytearray()
            try:
                await _read_until(stream, buf, b"ee>")
                assert b"EasyEnclave CP at " + env.http.encode() in buf
                # Tab completes a command name: "he" + Tab runs `help`.
                del buf[:]
                await stream.send_all(b"he\t")
                await _read_until(stream, buf, b"lp")
                await stream.send_all(b"\r")
                await _read_until(stream, buf, b"crash NAME")
                assert b"commands:" in buf
                # Argument completion: agent ids from the last listing.
                await _read_until(stream, buf, b"ee>")
                del buf[:]
                await stream.send_all(b"agents\r")
                await _read_until(stream, buf, b"vm-t")
                await _read_until(stream, buf, b"ee>")
                del buf[:]
                await stream.send_all(b"agent ag-\t")
                await _read_until(stream, buf, agent.agent_id[3:].encode())
                await stream.send_all(b"\r")
                await _read_until(stream, buf, b"vm_name: vm-t")
                # Streaming events end with Ctrl-D (EOF) and the console goes on.
                await _read_until(stream, buf, b"ee>")
                del buf[:]
                await stream.send_all(b"events\r")
                await _read_until(stream, buf, b"agent.connected")
                await stream.send_all(b"\x04")
                del buf[:]
                await _read_until(stream, buf, b"ee>")
                await stream.send_all(b"quit\r")
                await process.wait()
                assert process.returncode == 0
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    await stream.aclose()
            history = (tmp_path / "state" / "easyenclave" / "console_history").read_text()
            assert "+help" in history and "+agents" in history
            nursery.cancel_scope.cancel()


# --- pure parts ----------------------------------------------------------------------


def _console() -> Console:
    return Console(CpClient("http://127.0.0.1:9"), agent_ids=["ag-aaa1", "ag-aaa2", "ag-bbb"],
                   actor_names=["cp", "agents", "agent/ag-aaa1"])


def test_completions() -> None:
    c = _console()
    assert list(c.completions("")) == [(n, 0) for n in sorted(c.commands)]
    assert list(c.completions("d")) == [("datacenters", -1), ("deployments", -1),
                                        ("drain", -1)]
    assert list(c.completions("drain ag-a")) == [("ag-aaa1", -4), ("ag-aaa2", -4)]
    assert list(c.completions("agent ")) == [("ag-aaa1", 0), ("ag-aaa2", 0), ("ag-bbb", 0)]
    assert list(c.completions("crash agent/")) == [("agent/ag-aaa1", -6)]
    assert list(c.completions("help tr")) == [("tree", -2)]
    assert list(c.completions("agents x")) == []
    assert list(c.completions("drain ag-bbb ")) == []


def test_agent_prefix_resolution() -> None:
    c = _console()
    c.vm_names = {"ag-aaa1": "vm-1", "ag-aaa2": "vm-2", "ag-bbb": "vm-3"}
    assert c.resolve_agent("ag-b") == "ag-bbb"
    assert c.resolve_agent("vm-2") == "ag-aaa2"
    assert c.resolve_agent("ag-zzz") == "ag-zzz"  # the CP decides
    try:
        c.resolve_agent("ag-a")
    except Exception as exc:
        assert "matches 2 agents" in str(exc)
    else:
        raise AssertionError("an ambiguous prefix must not resolve")


def test_views() -> None:
    tree = {"name": "cp", "kind": "supervisor", "state": "running", "restarts": 0,
            "strategy": "one_for_one", "children": [
                {"name": "agents", "kind": "supervisor", "state": "running", "restarts": 2,
                 "strategy": "one_for_one", "children": [
                     {"name": "agent/ag-1", "kind": "actor", "state": "running",
                      "restarts": 1, "mailbox_depth": 3, "last_error": "Boom()"}]},
                {"name": "http", "kind": "worker", "state": "running", "restarts": 0}]}
    assert tree_table(tree).splitlines() == [
        "NAME              KIND                      STATE    RESTARTS  MAILBOX  LAST ERROR",
        "cp                supervisor (one_for_one)  running  0         -        -",
        "├─ agents         supervisor (one_for_one)  running  2         -        -",
        "│  └─ agent/ag-1  actor                     running  1         3        Boom()",
        "└─ http           worker                    running  0         -        -",
    ]
    assert agents_table([{"agent_id": "ag-1", "vm_name": "vm", "status": "stale",
                          "draining": True, "attestation": {"verdict": "warn"}}]
                        ).splitlines()[1].split() == ["ag-1", "vm", "-", "-", "stale", "warn",
                                                      "yes", "-", "-"]
    assert event_line({"seq": 7, "at": "2026-01-02T03:04:05Z", "kind": "agent.status",
                       "subject": "ag-1", "data": {"from": "ready", "to": "stale",
                                                   "x": None}}) == (
        "#7 03:04:05 agent.status ag-1 from=ready to=stale")
