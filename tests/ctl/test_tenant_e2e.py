"""The tenant's path with eectl against a real CP and a real agent (sim attestation, real
Docker): push computes the hash the agent will bind, deploy prints the URL, the app
answers there, logs show its output, verify-health accepts the agent for the pushed
hash, undeploy stops it and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from agent.agentkit import agent_config, eventually, running_agent, running_cp
from agent.test_workload import (
    DOCKER_TIMEOUT,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    settings_for,
)

from .ctlkit import Result, eectl
from .test_tenant_commands import app_dir


@needs_docker
async def test_push_deploy_verify_undeploy(tmp_path: Path, namespace: str  # noqa: F811
                                           ) -> None:
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with running_cp(tmp_path / "cp") as env:
            config = agent_config(tmp_path / "agent", env.agent_url)
            async with running_agent(config, workload_settings=settings_for(namespace)):
                await eventually(lambda: _online(env), timeout=30)
                cp = f"http://127.0.0.1:{env.cp.http_port}"
                async with httpx.AsyncClient(base_url=cp, timeout=10, headers={
                        "Authorization": f"Bearer {env.token}"}) as admin:
                    r = await admin.post("/api/v2/accounts", json={"name": "acme"})
                    assert r.status_code == 201, r.text
                key_file = tmp_path / "tenant.key"
                key_file.write_text(r.json()["api_key"] + "\n")

                async def run(*argv: str) -> Result:
                    return await eectl(*argv, state_dir=tmp_path, EE_CP=cp,
                                       EE_CONFIG=str(tmp_path / "none.json"),
                                       EE_API_KEY=key_file.read_text().strip())

                assert (await run("apps", "create", "hello")).returncode == 0
                d = app_dir(tmp_path)
                r = await run("push", str(d), "--app", "hello", "--version", "1",
                              "--health-path", "/health", "--env", "GREETING=hi", "--json")
                assert r.returncode == 0, r.stderr
                pushed = json.loads(r.stdout)["compose_hash"]
                local = (await run("compose-hash", str(d), "--health-path", "/health",
                                   "--env", "GREETING=hi")).stdout.strip()
                assert pushed == local or "version-1 compose hash" in r.stderr

                r = await run("deploy", "hello", "--version", "1", "--timeout",
                              str(DOCKER_TIMEOUT), "--poll", "0.2", "--json")
                assert r.returncode == 0, r.stderr
                view = json.loads(r.stdout)
                [replica] = view["replicas"]
                # The agent computed, from what it received, the hash eectl printed.
                assert replica["compose_hash"] == pushed == view["compose_hash"]
                url = replica["url"]
                async with httpx.AsyncClient(timeout=10) as http:
                    page = await http.get(url + "/")
                assert page.text == "<h1>hello</h1>\n"
                r = await run("status", view["deployment_id"])
                assert f"\nurl: {url}\n" in r.stdout

                r = await run("trust", "verify-health", url, "--expect-hash", pushed,
                              "--root", "dev", "--json")
                assert r.returncode == 0, r.stdout + r.stderr
                assert json.loads(r.stdout)["compose_hash"] == pushed

                # The health checks and our GET, as busybox httpd -v logged them.
                r = await run("logs", view["deployment_id"], "--tail", "50", "--service",
                              "web")
                assert r.returncode == 0, r.stderr
                lines = r.stdout.splitlines()
                assert any(line.endswith(": response:200") for line in lines), lines
                assert all(f" web {replica['agent_id']} | " in line for line in lines)
                r = await run("logs", view["deployment_id"], "--service", "db")
                assert (r.returncode, r.stdout) == (0, "")

                r = await run("undeploy", view["deployment_id"], "--poll", "0.2",
                              "--timeout", str(DOCKER_TIMEOUT))
                assert r.returncode == 0, r.stderr
                assert r.stdout == f"deployment {view['deployment_id']} stopped\n"


async def _online(env: object) -> bool:
    agents = await env.agents()  # type: ignore[attr-defined]
    return any(a.get("status") == "online" for a in agents)
