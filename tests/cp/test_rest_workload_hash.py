"""The workload hash, end to end: a real CP, a real agent (sim attestation) and real
Docker agree on a version's hash, which covers its env (names and values), exposed
port and service and health path; an env change is another hash, and both run.

Depends on the agent computing ``ee.protocol.compose.workload_hash`` (the agent side of
issue 20): until it does, the agent reports the plain compose hash, the CP fails the
replica (``hash_problem``) and this test fails on its first deploy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the agent kit

from agent.agentkit import agent_config, eventually, running_agent, running_cp
from agent.test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    settings_for,
)
from ee.protocol.compose import validate_compose, workload_hash

pytestmark = needs_docker


def expected(env: dict[str, str]) -> str:
    return workload_hash(validate_compose(IMAGE_ONLY_COMPOSE), None, env=env,
                         expose_port=8080, expose_service="web", health_path="/health",
                         secret_names=(), secret_env={})


async def test_agent_and_cp_agree_on_the_workload_hash(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with running_cp(tmp_path / "cp") as env, env.client() as admin, \
                running_agent(agent_config(tmp_path / "a0", env.agent_url, vm_name="wh-a0"),
                              workload_settings=settings_for(namespace)) as agent:
            await eventually(lambda: agent.link is not None, 30)
            r = await admin.post("/api/v2/accounts", json={"name": "hash"})
            key = r.json()["api_key"]
            async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{env.cp.http_port}", timeout=30,
                    headers={"Authorization": f"Bearer {key}"}) as http:
                assert (await http.post("/api/v2/apps", json={"name": "wh"})).status_code == 201
                hashes = {}
                for version, value in (("1", "one"), ("2", "two")):
                    r = await http.post("/api/v2/apps/wh/versions", json={
                        "version": version, "compose": IMAGE_ONLY_COMPOSE, "expose_port": 8080,
                        "health_path": "/health", "env": {"GREETING": value}})
                    assert r.status_code == 201, r.text
                    hashes[version] = r.json()["compose_hash"]
                    assert hashes[version] == expected({"GREETING": value})
                assert hashes["1"] != hashes["2"]
                for version in ("1", "2"):
                    r = await http.post("/api/v2/apps/wh/deployments", json={"version": version})
                    assert r.status_code == 202, r.text
                    dep = r.json()["deployment_id"]

                    async def running(dep: str = dep) -> dict[str, Any] | None:
                        view = (await http.get(f"/api/v2/deployments/{dep}")).json()
                        assert view["state"] != "failed" and view["failures"] == 0, str(view)
                        return view if view["state"] == "running" else None

                    try:
                        view = await eventually(running, DOCKER_TIMEOUT)
                        (replica,) = view["replicas"]
                        assert replica["compose_hash"] == view["compose_hash"] == hashes[version]
                    finally:  # nothing left behind, also when it failed
                        r = await http.delete(f"/api/v2/deployments/{dep}")
                        assert r.status_code == 202
                        await eventually(lambda dep=dep: agent.runner.status(dep) is None,
                                         DOCKER_TIMEOUT)
