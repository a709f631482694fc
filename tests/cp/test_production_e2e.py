"""Issue 14's "done" test: a production-mode CP, end to end, with every part at once.

- the CP starts without ``--dev`` from a production bundle (no dev block) signed with an
  offline key and pinned by ``bundle_pubkey``; the bundle pins a test root (the sim PKI
  of this test session) in place of Intel's;
- its collateral comes from a PCCS stand-in on loopback HTTP serving that chain's
  collateral;
- the CP proves its write key with a quote of its own (``cp_attestation: "sim"``: a sim
  TD under the same test root) and signs every deploy/undeploy;
- it grants Cloudflare tunnels at registration through a stand-in of the Cloudflare API;
- a real agent (sim provider, ``cp_envelope: "required"``) registers over a real
  websocket, is admitted with verdict pass under a strict policy, runs the granted
  tunnel (a script standing in for cloudflared), and runs a tenant's deployment placed
  through the CP's HTTP API on the real Docker daemon: the signed deploy was verified
  and accepted by the agent, and so is the undeploy.
- an agent that pins another CP MRTD (``trusted_cp_mrtds``) refuses the same CP's
  deploys; the CP sees ``CP_MRTD_NOT_ALLOWED`` (``agent.write_refused``) and nothing runs.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from cloudflare_standin import CloudflareStandIn
from test_production import FMSPC, production_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.agentkit import agent_config, eventually, running_agent
from agent.test_tunnel import long_running
from agent.test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    busybox_image,  # noqa: F401  (fixture)
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    project_containers,
    settings_for,
)
from attestation.pccs_standin import Standin, running_standin
from ee.agent.config import TunnelConfig
from ee.agent.platform import outbound_address, shared_sim_dir
from ee.attestation.providers.sim import SimTD
from ee.cp.bootstrap import fingerprint
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, CpConfig, prepare

DOMAIN = "agents.example.com"
OTHER_MRTD = "b2" * 48


@attrs.define
class Env:
    cp: ControlPlane
    pccs: Standin
    cf: CloudflareStandIn
    token: str

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.cp.plane.bound_port}/api/v2/agents/connect"

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.cp.http_port}",
                                 headers={"Authorization": f"Bearer {token or self.token}"},
                                 timeout=30)

    def refusals(self, agent_id: str | None) -> list[dict[str, Any]]:
        return [e.data for e in self.cp.events.recent
                if e.kind == "agent.write_refused" and e.subject == agent_id]


@asynccontextmanager
async def production_env(tmp: Path, td: SimTD) -> AsyncIterator[Env]:
    """The non-dev CP: production bundle, PCCS stand-in, sim CP attestation, tunnels."""
    data = production_bundle(tmp, td)
    cf_token = tmp / "cf.token"
    collateral = td.collateral(issued_at=time.time() - 3600)
    with CloudflareStandIn().serving() as cf:
        cf_token.write_text(cf.token + "\n")
        async with running_standin({FMSPC: collateral}) as pccs:
            config = CpConfig(
                data_dir=data, listen="127.0.0.1:0", agent_listen="127.0.0.1:0",
                bundle_pubkey=str(tmp / "offline.pub"), pccs_url=pccs.url,
                pccs_fmspcs=(FMSPC,), quorum=Quorum(settle_timeout_s=1),
                cp_attestation="sim",
                tunnels={"account_id": cf.account_id, "zone_id": cf.zone_id,
                         "api_token_file": str(cf_token), "domain": DOMAIN,
                         "api_base": cf.base, "timeout_s": 5})
            boot, token = prepare(config)
            assert token is None and not boot.dev and boot.environment == "production"
            assert boot.sim_dir is None  # no dev block: no sim root from the bundle
            cp = ControlPlane(config, boot)
            async with trio.open_nursery() as nursery:
                await nursery.start(cp.run)
                try:
                    yield Env(cp, pccs, cf, (data / "admin.token").read_text().strip())
                finally:
                    cp.request_stop()


def _routable_host() -> str:
    """A local address the production CP accepts in an agent's URL (not loopback).

    A production CP refuses agents that announce a loopback URL, so the agents listen
    on the address that routes out of this machine, or on Docker's bridge gateway.
    """
    for probe in ("198.51.100.1", "172.17.0.2"):
        host = outbound_address(probe)
        if not ipaddress.ip_address(host).is_loopback:
            return host
    pytest.skip("no non-loopback local address for the agents to announce")


async def _tenant_app(env: Env) -> str:
    """A tenant account with app ``hello`` v1 (an image-only busybox compose)."""
    async with env.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "prod-tenant"})
        assert r.status_code == 201, r.text
        key: str = r.json()["api_key"]
    async with env.client(key) as tenant:
        r = await tenant.post("/api/v2/apps", json={"name": "hello"})
        assert r.status_code == 201, r.text
        r = await tenant.post("/api/v2/apps/hello/versions", json={
            "version": "1", "compose": IMAGE_ONLY_COMPOSE, "expose_port": 8080,
            "health_path": "/health"})
        assert r.status_code == 201, r.text
    return key


async def _deploy(tenant: httpx.AsyncClient, exclude: list[str]) -> str:
    r = await tenant.post("/api/v2/apps/hello/deployments", json={
        "version": "1", "constraints": {"exclude_agents": exclude}})
    assert r.status_code == 202, r.text
    dep_id: str = r.json()["deployment_id"]
    return dep_id


async def _state(tenant: httpx.AsyncClient, dep_id: str) -> dict[str, Any]:
    r = await tenant.get(f"/api/v2/deployments/{dep_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


@needs_docker
async def test_production_cp_end_to_end(tmp_path: Path, namespace: str) -> None:  # noqa: F811
    td = SimTD.load_or_create(shared_sim_dir())  # the test root, the CP's and agents' TD
    settings = settings_for(namespace)
    (tmp_path / "tun-good").mkdir()
    (tmp_path / "tun-bad").mkdir()
    listen = f"{_routable_host()}:0"
    good_cfg = agent_config(tmp_path / "good", vm_name="vm-good", cp_envelope="required",
                            listen=listen,
                            tunnel=TunnelConfig(command=long_running(tmp_path / "tun-good")))
    bad_cfg = agent_config(tmp_path / "bad", vm_name="vm-bad", cp_envelope="required",
                           listen=listen,
                           trusted_cp_mrtds=(OTHER_MRTD,),
                           tunnel=TunnelConfig(command=long_running(tmp_path / "tun-bad")))
    with trio.fail_after(DOCKER_TIMEOUT * 3):
        async with production_env(tmp_path, td) as env:
            # Exactly the pinned test root; collateral fetched from the PCCS before serving.
            assert [fingerprint(r) for r in env.cp.verifier.trusted_roots] == [
                fingerprint(td.root_cert)]
            assert "/tdx/certification/v4/tcb" in env.pccs.requests
            assert "/tdx/certification/v4/qe/identity" in env.pccs.requests
            assert env.cp.plane.prover is not None  # the CP proves its write key
            key = await _tenant_app(env)

            good_cfg = attrs.evolve(good_cfg, cp_url=env.agent_url)
            bad_cfg = attrs.evolve(bad_cfg, cp_url=env.agent_url)
            async with running_agent(good_cfg, workload_settings=settings) as good, \
                    running_agent(bad_cfg, workload_settings=settings) as bad, \
                    env.client(key) as tenant, env.client() as admin:
                await eventually(lambda: good.registered is not None
                                 and bad.registered is not None and good.link, timeout=30)
                # Admitted with verdict pass under the strict policy.
                views = {a["vm_name"]: a for a in
                         (await admin.get("/api/v2/agents")).json()["agents"]}
                for name in ("vm-good", "vm-bad"):
                    assert views[name]["attestation"]["verdict"] == "pass", views[name]
                    assert views[name]["attestation"]["tcb_status"] == "UpToDate"
                # The good agent accepted the CP's proof (its MRTD is pinned on first use).
                assert good.trust.proof is not None and good.trust.proof.accepted
                assert env.refusals(good.agent_id) == []

                # The tunnel: granted at registration, made at the Cloudflare stand-in,
                # run by the agent's supervision with the granted token.
                assert good.registered is not None and good.registered.tunnel is not None
                hostname = good.registered.tunnel.hostname
                assert hostname == f"{good.agent_id}.{DOMAIN}"
                cf_tunnel = next(t for t in env.cf.tunnels.values()
                                 if t["name"] == f"ee-{good.agent_id}")
                assert good.registered.tunnel.token == cf_tunnel["token"]
                records = {r["name"]: r["content"] for r in env.cf.dns.values()}
                assert records[hostname] == records[f"vm-good.{DOMAIN}"] == (
                    f"{cf_tunnel['id']}.cfargotunnel.com")
                args = await eventually(lambda: (tmp_path / "tun-good" / "args").exists()
                                        and (tmp_path / "tun-good" / "args").read_text())
                assert args.strip() == (f"token={cf_tunnel['token']} "
                                        "args=tunnel --no-autoupdate run")

                # A tenant deploys through the HTTP API: signed deploy, verified, running.
                dep_id = await _deploy(tenant, exclude=[str(bad.agent_id)])
                running = await eventually(
                    lambda: env.refusals(good.agent_id) or _running(tenant, dep_id),
                    timeout=DOCKER_TIMEOUT)
                assert env.refusals(good.agent_id) == []
                assert [r["agent_id"] for r in running["replicas"]] == [good.agent_id]
                project = good.runner.project_name(dep_id)
                assert project_containers(project)
                # The undeploy (signed too) is accepted: the containers go.
                r = await tenant.delete(f"/api/v2/deployments/{dep_id}")
                assert r.status_code == 202, r.text
                await eventually(lambda: _in_state(tenant, dep_id, "stopped"),
                                 timeout=DOCKER_TIMEOUT)
                assert project_containers(project) == []
                assert env.refusals(good.agent_id) == []

                # The agent pinning another CP MRTD refuses this CP's writes.
                assert bad.trust.proof is not None and not bad.trust.proof.accepted
                told = env.refusals(bad.agent_id)
                assert [d["code"] for d in told] == ["CP_MRTD_NOT_ALLOWED"]  # at the proof
                bad_dep = await _deploy(tenant, exclude=[str(good.agent_id)])
                refused = await eventually(lambda: [
                    d for d in env.refusals(bad.agent_id) if d["deployment_id"] == bad_dep],
                    timeout=DOCKER_TIMEOUT)
                assert refused[0]["code"] == "CP_MRTD_NOT_ALLOWED"
                assert refused[0]["reason"].startswith("CP_MRTD_NOT_ALLOWED: deploy refused")
                assert bad.runner.status(bad_dep) is None
                assert project_containers(bad.runner.project_name(bad_dep)) == []
                doc = await _state(tenant, bad_dep)
                assert doc["state"] != "running"
                assert not [r for r in doc["replicas"] if r.get("state") == "running"]
                r = await tenant.delete(f"/api/v2/deployments/{bad_dep}")
                assert r.status_code == 202, r.text


async def _running(tenant: httpx.AsyncClient, dep_id: str) -> dict[str, Any] | None:
    doc = await _state(tenant, dep_id)
    return doc if doc["state"] == "running" and doc["replicas"] else None


async def _in_state(tenant: httpx.AsyncClient, dep_id: str, state: str) -> bool:
    return bool((await _state(tenant, dep_id))["state"] == state)
