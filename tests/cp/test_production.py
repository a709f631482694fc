"""A production-mode CP (no --dev): bundle signed offline and pinned by --bundle-pubkey,
attestation root pinned by fingerprint, collateral fetched from a PCCS stand-in on
loopback HTTP. A test root stands in for Intel's (a fresh sim PKI), so the code path
under test is the production one: bundle loading, root pinning, PCCS collateral."""

from __future__ import annotations

import json
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
from simagent import SimAgent
from test_bundle import eectl_cp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attestation.pccs_standin import Standin, running_standin
from ee.attestation.collateral import TrustAnchors
from ee.attestation.providers.sim import SIM_FMSPC, SimTD
from ee.cp.bootstrap import fingerprint
from ee.cp.collateral_refresh import admit_fetched
from ee.cp.readiness import Quorum
from ee.cp.server import ControlPlane, CpConfig, prepare

FMSPC = SIM_FMSPC.hex().upper()


def production_bundle(tmp: Path, root: SimTD, policy: dict[str, Any] | None = None) -> Path:
    """An offline key pair, and DATA_DIR with a production bundle pinning *root*'s CA."""
    root_pem = tmp / "test-root.pem"
    root_pem.write_bytes(root.root_pem())
    (tmp / "policy.json").write_text(json.dumps(policy or {
        "mode": "strict", "allowed_tcb_statuses": ["UpToDate"]}))
    assert eectl_cp("bundle", "keygen", "--out", str(tmp / "offline")) == 0
    data = tmp / "cp"
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp / "offline.key"),
                    "--out", str(data), "--cluster-id", "prod-test", "--root", str(root_pem),
                    "--policy", str(tmp / "policy.json")) == 0
    return data


@attrs.define
class Prod:
    cp: ControlPlane
    pccs: Standin
    token: str

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.cp.plane.bound_port}/api/v2/agents/connect"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.cp.http_port}",
                                 headers={"Authorization": f"Bearer {self.token}"}, timeout=10)

    async def register(self, nursery: trio.Nursery, vm_name: str, td: SimTD) -> SimAgent:
        agent = SimAgent(url=self.agent_url, vm_name=vm_name, td=td)
        await nursery.start(agent.run)
        return agent


@asynccontextmanager
async def production_cp(tmp: Path, td: SimTD, **overrides: Any) -> AsyncIterator[Prod]:
    data = production_bundle(tmp, td)
    collateral = td.collateral(issued_at=time.time() - 3600)
    async with running_standin({FMSPC: collateral}) as pccs:
        config = CpConfig(data_dir=data, listen="127.0.0.1:0", agent_listen="127.0.0.1:0",
                          bundle_pubkey=str(tmp / "offline.pub"), pccs_url=pccs.url,
                          pccs_fmspcs=(FMSPC,), quorum=Quorum(settle_timeout_s=1),
                          **overrides)
        boot, token = prepare(config)
        assert token is None and not boot.dev and boot.environment == "production"
        cp = ControlPlane(config, boot)
        async with trio.open_nursery() as nursery:
            await nursery.start(cp.run)
            try:
                yield Prod(cp, pccs, (data / "admin.token").read_text().strip())
            finally:
                cp.request_stop()


async def test_production_cp_admits_the_pinned_root_and_refuses_another(
        tmp_path: Path) -> None:
    td = SimTD.create()  # the test root standing in for Intel's
    other = SimTD.create()  # a chain under another root
    with trio.fail_after(60):
        async with production_cp(tmp_path, td) as env, trio.open_nursery() as nursery:
            # Exactly the pinned root is trusted: not Intel's, not the dev sim root.
            assert [fingerprint(r) for r in env.cp.verifier.trusted_roots] == [
                fingerprint(td.root_cert)]
            # Collateral was fetched from the PCCS at start, before agents were served.
            assert "/tdx/certification/v4/tcb" in env.pccs.requests
            good = await env.register(nursery, "vm-good", td)
            assert good.registered is not None and good.rejected is None
            evil = await env.register(nursery, "vm-evil", other)
            assert evil.registered is None and evil.rejected is not None
            assert evil.rejected.code == "ATTESTATION_FAILED"
            reasons = evil.rejected.reasons
            assert any("chain root" in r and "is not trusted" in r for r in reasons), reasons
            async with env.client() as http:
                agents = (await http.get("/api/v2/agents")).json()["agents"]
                metrics = (await http.get("/metrics")).text
            assert [(a["vm_name"], a["attestation"]["tcb_status"]) for a in agents] == [
                ("vm-good", "UpToDate")]
            assert f'ee_collateral_age_seconds{{fmspc="{FMSPC}"}}' in metrics
            assert f'ee_collateral_fetches_total{{fmspc="{FMSPC}"}} 1.0' in metrics

            # The PCCS fails: the cached copy keeps serving, the failure is counted.
            env.pccs.mode = "fail"
            assert env.cp.refresher is not None
            assert not await env.cp.refresher.refresh(SIM_FMSPC)
            again = await env.register(nursery, "vm-good-2", td)
            assert again.registered is not None
            async with env.client() as http:
                metrics = (await http.get("/metrics")).text
            assert (f'ee_collateral_fetch_failures_total{{fmspc="{FMSPC}",kind="http"}} 1.0'
                    in metrics)
            assert any(e.kind == "collateral.fetch_failed" for e in env.cp.events.recent)
            nursery.cancel_scope.cancel()


async def test_production_cp_without_collateral_refuses(tmp_path: Path) -> None:
    """A PCCS that never answered leaves no collateral: the default policy refuses."""
    td = SimTD.create()
    data = production_bundle(tmp_path, td)
    with trio.fail_after(60):
        async with running_standin({FMSPC: td.collateral(issued_at=time.time())},
                                   mode="fail") as pccs:
            config = CpConfig(data_dir=data, listen="127.0.0.1:0", agent_listen="127.0.0.1:0",
                              bundle_pubkey=str(tmp_path / "offline.pub"), pccs_url=pccs.url,
                              pccs_fmspcs=(FMSPC,), quorum=Quorum(settle_timeout_s=1))
            boot, _ = prepare(config)
            cp = ControlPlane(config, boot)
            async with trio.open_nursery() as nursery:
                await nursery.start(cp.run)
                agent = SimAgent(url=f"ws://127.0.0.1:{cp.plane.bound_port}"
                                     "/api/v2/agents/connect", vm_name="vm-1", td=td)
                await nursery.start(agent.run)
                assert agent.rejected is not None
                assert any("no collateral" in r for r in agent.rejected.reasons)
                cp.request_stop()


async def test_stale_collateral_warn_admits_with_a_violation(tmp_path: Path) -> None:
    """Stale policy warn: collateral past its next update (PCCS down) still admits, and
    the agent carries a collateral_stale violation; strict refuses it as expired."""
    td = SimTD.create()
    for stale, admitted in (("warn", True), ("strict", False)):
        tmp = tmp_path / stale
        tmp.mkdir()
        with trio.fail_after(60):
            async with production_cp(tmp, td, collateral_stale=stale) as env, \
                    trio.open_nursery() as nursery:
                assert env.cp.refresher is not None
                # The cached copy runs out (its next update is moved into the past).
                issued = time.time() - 2 * 86400
                env.cp.refresher.cache[SIM_FMSPC] = admit_fetched(
                    SIM_FMSPC, td.collateral(issued_at=issued, validity_s=86400),
                    TrustAnchors([td.root_cert]), now=issued + 60)
                agent = await env.register(nursery, "vm-1", td)
                assert (agent.registered is not None) == admitted, agent.rejected
                if admitted:
                    async with env.client() as http:
                        (view,) = (await http.get("/api/v2/agents")).json()["agents"]
                    assert view["attestation"]["verdict"] == "warn"
                    assert any("collateral_stale" in v
                               for v in view["attestation"]["violations"])
                else:
                    assert agent.rejected is not None
                    assert any("expired" in r for r in agent.rejected.reasons)
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fmspc", ["nothex", "EE00"])
def test_bad_fmspc_config_is_refused(tmp_path: Path, fmspc: str) -> None:
    import argparse

    from ee.cp.server import build_parser

    args: argparse.Namespace = build_parser().parse_args([
        "--data-dir", str(tmp_path), "--pccs-url", "http://127.0.0.1:1",
        "--pccs-fmspc", fmspc])
    with pytest.raises(ValueError, match="FMSPC"):
        CpConfig.from_sources(args)
