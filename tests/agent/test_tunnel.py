"""Tunnel supervision, with tiny shell scripts standing in for cloudflared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from ee.agent.config import TunnelConfig
from ee.agent.tunnel import TunnelSupervisor, tunnel_command
from ee.cp.tunnels import CloudflareSettings, CloudflareTunnels
from ee.protocol.messages import TunnelGrant

from .agentkit import (
    StandInCp,
    agent_config,
    agent_http,
    eventually,
    running_agent,
    running_cp,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cp"))
from cloudflare_standin import CloudflareStandIn


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def crashing(tmp_path: Path) -> str:
    return script(tmp_path, "crashing-cloudflared",
                  f'echo run >> {tmp_path}/runs\necho "boom: cannot reach edge" >&2\nexit 3\n')


def long_running(tmp_path: Path) -> str:
    return script(tmp_path, "fake-cloudflared",
                  f'echo "token=$TUNNEL_TOKEN args=$*" > {tmp_path}/args\n'
                  f"echo $$ > {tmp_path}/pid\nexec sleep 60\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tunnel_command() -> None:
    argv, env = tunnel_command("cf", TunnelGrant(hostname="a.example", token="tok"), "http://x")
    assert argv == ["cf", "tunnel", "--no-autoupdate", "run"] and env == {"TUNNEL_TOKEN": "tok"}
    argv, env = tunnel_command("cf", None, "http://127.0.0.1:9")
    assert argv == ["cf", "tunnel", "--no-autoupdate", "--url", "http://127.0.0.1:9"]
    assert env == {}


async def test_gives_up_after_max_restarts(tmp_path: Path) -> None:
    config = TunnelConfig(enabled=True, command=crashing(tmp_path), restart_backoff_base_s=0.01,
                          restart_backoff_max_s=1.0, max_restarts=3)
    supervisor = TunnelSupervisor(config, "http://127.0.0.1:1", jitter=lambda: 1.0)
    with trio.fail_after(30):
        await supervisor.run()
    status = supervisor.status
    assert status.state == "failed" and status.restarts == 3 and status.pid is None
    assert status.last_exit == 3
    assert status.last_error is not None and "boom: cannot reach edge" in status.last_error
    assert (tmp_path / "runs").read_text().count("run") == 4  # first run + 3 restarts


async def test_missing_command_gives_up(tmp_path: Path) -> None:
    config = TunnelConfig(enabled=True, command=str(tmp_path / "no-such-cloudflared"),
                          restart_backoff_base_s=0.01, restart_backoff_max_s=1.0, max_restarts=2)
    supervisor = TunnelSupervisor(config, "http://127.0.0.1:1")
    with trio.fail_after(30):
        await supervisor.run()
    assert supervisor.status.state == "failed"
    assert supervisor.status.last_error is not None
    assert "cannot start" in supervisor.status.last_error


async def test_long_runs_reset_the_failure_count(tmp_path: Path) -> None:
    flaky = script(tmp_path, "flaky", f"echo run >> {tmp_path}/runs\nsleep 0.3\nexit 1\n")
    config = TunnelConfig(enabled=True, command=flaky, restart_backoff_base_s=0.01,
                          restart_backoff_max_s=0.2, max_restarts=1)
    supervisor = TunnelSupervisor(config, "http://127.0.0.1:1")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await eventually(lambda: supervisor.status.restarts >= 3)
            assert supervisor.status.state != "failed"
            nursery.cancel_scope.cancel()
    assert supervisor.status.state == "stopped"


async def test_cancel_stops_the_process(tmp_path: Path) -> None:
    config = TunnelConfig(enabled=True, command=long_running(tmp_path))
    supervisor = TunnelSupervisor(config, "http://127.0.0.1:1234")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await eventually(lambda: (tmp_path / "pid").exists()
                             and supervisor.status.state == "running")
            pid = int((tmp_path / "pid").read_text())
            assert supervisor.status.pid == pid and _alive(pid)
            assert (tmp_path / "args").read_text().strip() == (
                "token= args=tunnel --no-autoupdate --url http://127.0.0.1:1234")
            nursery.cancel_scope.cancel()
    assert not _alive(pid)
    assert supervisor.status.state == "stopped"


async def test_grant_from_registration_runs_the_tunnel(tmp_path: Path) -> None:
    grant = TunnelGrant(hostname="vm.tunnel.example", token="secret-token")
    command = long_running(tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp(tunnel=grant).run)
            config = agent_config(tmp_path / "agent", peer.url,
                                  tunnel=TunnelConfig(command=command))
            async with running_agent(config) as agent, agent_http(agent, agent.secret) as http:
                await eventually(lambda: (tmp_path / "pid").exists())
                pid = int((tmp_path / "pid").read_text())
                assert (tmp_path / "args").read_text().strip() == (
                    "token=secret-token args=tunnel --no-autoupdate run")
                health = (await http.get("/.ee/health")).json()
                assert health["tunnel"]["state"] == "running"
                assert health["tunnel"]["hostname"] == "vm.tunnel.example"
                assert health["tunnel"]["pid"] == pid
                assert health["cp_connected"] is True
            assert not _alive(pid)  # stopping the agent stops the tunnel
            nursery.cancel_scope.cancel()


async def test_config_enabled_quick_tunnel_points_at_the_agent(tmp_path: Path) -> None:
    config = agent_config(tmp_path / "agent",
                          tunnel=TunnelConfig(enabled=True, command=long_running(tmp_path)))
    with trio.fail_after(30):
        async with running_agent(config) as agent:
            await eventually(lambda: (tmp_path / "args").exists()
                             and (tmp_path / "args").read_text().strip())
            assert (tmp_path / "args").read_text().strip() == (
                f"token= args=tunnel --no-autoupdate --url http://127.0.0.1:{agent.http_port}")


async def test_real_cp_grants_a_cloudflare_tunnel_the_agent_runs(tmp_path: Path) -> None:
    """The CP's plane grants a tunnel through the Cloudflare API (a local stand-in) at
    registration; the agent's supervision runs cloudflared with that token. A failed
    grant never blocks registration (event ``agent.tunnel_failed``) and is retried at
    the agent's next registration."""
    with CloudflareStandIn().serving() as cf, trio.fail_after(60):
        token_file = tmp_path / "cf.token"
        token_file.write_text(cf.token)
        async with running_cp(tmp_path / "cp") as rcp:
            rcp.cp.plane.tunnels = CloudflareTunnels(CloudflareSettings(
                account_id=cf.account_id, zone_id=cf.zone_id, api_token_file=str(token_file),
                domain="agents.example.com", api_base=cf.base, timeout_s=5))
            cf.fail["create_tunnel"] = 500  # the first registration: no tunnel
            tunnel = TunnelConfig(command=long_running(tmp_path))
            config = agent_config(tmp_path / "a", rcp.agent_url, vm_name="vm-tun",
                                  tunnel=tunnel, cp_envelope="disabled")
            async with running_agent(config) as agent:
                await eventually(lambda: agent.registered is not None)
                assert agent.registered is not None and agent.registered.tunnel is None
                failed = [e for e in rcp.cp.events.recent if e.kind == "agent.tunnel_failed"]
                assert failed and "create tunnel: HTTP 500" in failed[0].data["error"]
                assert cf.token not in str(failed[0].data)
                # the next registration retries, and the agent runs what it was granted
                session = rcp.cp.plane.sessions[agent.agent_id]  # type: ignore[index]
                await session.close(1012, "test: reconnect")
                await eventually(lambda: agent.registered is not None
                                 and agent.registered.tunnel is not None)
                assert agent.registered is not None and agent.registered.tunnel is not None
                hostname = agent.registered.tunnel.hostname
                assert hostname == f"{agent.agent_id}.agents.example.com"
                [cf_tunnel] = cf.tunnels.values()
                args = await eventually(lambda: (tmp_path / "args").exists()
                                        and (tmp_path / "args").read_text())
                assert f"token={cf_tunnel['token']} " in args
                assert agent.tunnel is not None and agent.tunnel.status.hostname == hostname
                assert {r["name"] for r in cf.dns.values()} == {
                    hostname, "vm-tun.agents.example.com"}
