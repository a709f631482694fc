"""The provisioner against a real CP (in process, real HTTP): launch orders claimed,
launched with their bootstrap token, fulfilled (the pool's warm count goes up when the
VM's agent registers), retried then failed, expired (the VM is deleted), and VMs that
powered themselves off reaped. The launcher here records calls and, for a "booting"
VM, runs a simulated agent with the order's token — the cloud is the only stand-in."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from ee.capacity import PoolSettings
from ee.capacity.provisioner import (
    BadGrant,
    LaunchFailed,
    LaunchRequest,
    NameTaken,
    Provisioner,
    ProvisionerSettings,
    ReportAnswer,
    classify_report,
    grant_mismatch,
    parse_grant,
    pools_from_text,
    retry_delay,
    supervised,
    vm_name_for,
)
from ee.vm.domain import Labels
from ee.vm.errors import VmError
from ee.vm.host import DomainInfo
from ee.vm.launcher import LibvirtLauncher

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cp"))
sys.path.insert(0, str(ROOT / "tools" / "loadgen"))

from cpkit import RunningCp, running_cp  # noqa: E402
from test_sessions import FAST, wait_until  # noqa: E402

POOL = ("local:dev", "standard")


@pytest.fixture(autouse=True)
def _sim_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EE_SIM_DIR", str(tmp_path_factory.getbasetemp() / "sim"))


class Cloud:
    """A launcher that records; ``boot`` says whether a launched VM's agent comes up."""

    def __init__(self, env: RunningCp, nursery: trio.Nursery, *, fail: int = 0,
                 delay: float = 0.0) -> None:
        self.env, self.nursery = env, nursery
        self.fail, self.delay = fail, delay
        self.launched_requests: list[LaunchRequest] = []
        self.destroyed: list[str] = []
        self.vms: dict[str, str] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    async def launch(self, request: LaunchRequest) -> None:
        self.launched_requests.append(request)
        await trio.sleep(self.delay)
        if len(self.launched_requests) <= self.fail:
            self.vms[request.vm_name] = "shutoff"  # a partial VM a failed attempt left
            raise LaunchFailed("quota exceeded")
        self.vms[request.vm_name] = "running"
        agent = self.env.agent(request.vm_name, bootstrap_token=request.bootstrap_token,
                               node_size=request.node_size)
        scope = trio.CancelScope()
        self.scopes[request.vm_name] = scope

        async def boot() -> None:
            with scope:
                await agent.run_forever()

        self.nursery.start_soon(boot)

    async def destroy(self, vm_name: str) -> None:
        self.destroyed.append(vm_name)
        self.vms.pop(vm_name, None)
        if vm_name in self.scopes:
            self.scopes.pop(vm_name).cancel()
        await trio.lowlevel.checkpoint()

    async def launched(self) -> Mapping[str, str]:
        await trio.lowlevel.checkpoint()
        return dict(self.vms)


def fast_pools(env: RunningCp, **kw: Any) -> None:
    """Pool settings that run in test time (orders open at once; short TTLs when given)."""
    env.cp.pools.deps = attrs.evolve(
        env.cp.pools.deps, settings=PoolSettings(reconcile_interval_s=0.2, **kw))


async def provisioner_key(env: RunningCp) -> str:
    async with env.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": "prov", "kind": "provisioner"})
        key: str = r.json()["api_key"]
        r = await admin.put(f"/api/v2/capacity/pools/{POOL[0]}/{POOL[1]}",
                            json={"min_warm": 1, "dispatch": True, "reason": "test"})
        assert r.status_code == 200, r.text
    return key


async def pool(env: RunningCp) -> dict[str, Any]:
    async with env.client() as admin:
        pools = (await admin.get("/api/v2/capacity/pools")).json()["pools"]
    return dict(next(p for p in pools if (p["datacenter"], p["node_size"]) == POOL))


async def orders(env: RunningCp) -> list[dict[str, Any]]:
    async with env.client() as admin:
        return list((await admin.get("/api/v2/capacity/launch-orders")).json()["orders"])


SETTINGS = ProvisionerSettings(pools=(POOL,), max_vms=1, max_attempts=2, backoff_base_s=0.1,
                               backoff_max_s=0.2, poll_interval_s=0.2)


async def test_an_order_is_fulfilled_and_its_vm_joins_the_pool(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as vms:
            fast_pools(env)
            key = await provisioner_key(env)
            assert (await pool(env))["warm"] == 0
            cloud = Cloud(env, vms)
            async with httpx.AsyncClient(base_url=env.http, timeout=10, headers={
                    "Authorization": f"Bearer {key}"}) as client, trio.open_nursery() as n:
                prov = await n.start(Provisioner(client, cloud, SETTINGS, say=print).run)

                async def warm() -> dict[str, Any] | None:
                    p = await pool(env)
                    return p if p["warm"] == 1 else None

                await wait_until(warm, "the new VM's agent warm in the pool")
                prov.request_stop()
            (request,) = cloud.launched_requests
            (order,) = await orders(env)
            assert order["state"] == "fulfilled" and order["vm_name"] == request.vm_name
            assert request.vm_name == vm_name_for(order["order_id"])
            assert request.bootstrap_token.startswith("eebt1.")
            assert prov.counters.fulfilled == 1 and cloud.destroyed == []
            vms.cancel_scope.cancel()


async def test_failed_launches_retry_then_the_order_fails(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as vms:
            fast_pools(env)
            key = await provisioner_key(env)
            cloud = Cloud(env, vms, fail=99)
            async with httpx.AsyncClient(base_url=env.http, timeout=10, headers={
                    "Authorization": f"Bearer {key}"}) as client, trio.open_nursery() as n:
                prov = await n.start(Provisioner(client, cloud, SETTINGS, say=print).run)

                async def failed() -> list[dict[str, Any]] | None:
                    found = [o for o in await orders(env) if o["state"] == "failed"]
                    return found or None

                (order, *_) = await wait_until(failed, "the order reported failed")
                prov.request_stop()
            first = [r for r in cloud.launched_requests if r.order_id == order["order_id"]]
            assert len(first) == 2  # max_attempts
            assert "attempt 2/2: quota exceeded" in order["error"]
            assert cloud.destroyed.count(first[0].vm_name) == 2  # each failed attempt's leftovers
            vms.cancel_scope.cancel()


async def test_a_vm_whose_order_expired_is_deleted(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as vms:
            fast_pools(env, provision_ttl_s=0.5)
            key = await provisioner_key(env)
            cloud = Cloud(env, vms, delay=2.0)  # slower than the provisioning window
            async with httpx.AsyncClient(base_url=env.http, timeout=10, headers={
                    "Authorization": f"Bearer {key}"}) as client, trio.open_nursery() as n:
                prov = await n.start(Provisioner(client, cloud, SETTINGS, say=print).run)
                await wait_until(lambda: prov.counters.gone >= 1, "the fulfil refused")
                prov.request_stop()
            name = cloud.launched_requests[0].vm_name
            assert name in cloud.destroyed and name not in cloud.vms
            first = next(o for o in await orders(env)
                         if o["order_id"] == cloud.launched_requests[0].order_id)
            assert first["state"] == "failed"  # provisioning timed out at the CP
            vms.cancel_scope.cancel()


class Gone:
    """A launcher whose VMs powered off (their agents could not reach the CP)."""

    def __init__(self) -> None:
        self.vms = {"ee-lo-1": "shutoff", "ee-lo-2": "running"}
        self.destroyed: list[str] = []

    async def launch(self, request: LaunchRequest) -> None:
        raise AssertionError("nothing to launch")

    async def destroy(self, vm_name: str) -> None:
        self.destroyed.append(vm_name)
        self.vms.pop(vm_name)
        await trio.lowlevel.checkpoint()

    async def launched(self) -> Mapping[str, str]:
        await trio.lowlevel.checkpoint()
        return dict(self.vms)


async def test_powered_off_vms_are_reaped_and_the_loop_is_supervised() -> None:
    def no_cp(request: httpx.Request) -> httpx.Response:
        return httpx.Response(204)

    cloud = Gone()
    async with httpx.AsyncClient(base_url="http://cp.invalid",
                                 transport=httpx.MockTransport(no_cp)) as client:
        prov = Provisioner(client, cloud, SETTINGS, say=print)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                sup = supervised(prov)
                await n.start(sup.run)
                await wait_until(lambda: cloud.destroyed, "the powered-off VM reaped")
                sup.request_stop()
    assert cloud.destroyed == ["ee-lo-1"] and prov.counters.reaped == 1


def test_pure_decisions() -> None:
    assert vm_name_for("lo-0001AB").startswith("ee-lo-0001ab-")
    assert vm_name_for("lo:x/y").startswith("ee-lo-x-y-")
    assert len(vm_name_for("lo-" + "a" * 100)) <= 63
    assert classify_report(200) is ReportAnswer.OK
    for gone in (403, 404, 409):
        assert classify_report(gone) is ReportAnswer.GONE
    for retry in (None, 500, 502, 429):
        assert classify_report(retry) is ReportAnswer.RETRY
    s = ProvisionerSettings(pools=(POOL,), backoff_base_s=1, backoff_max_s=8)
    assert [retry_delay(a, s, 1.0) for a in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert retry_delay(3, s, 0.0) == 2
    assert pools_from_text(["local:dev/tiny", "gcp:us-central1/llm"]) == (
        ("local:dev", "tiny"), ("gcp:us-central1", "llm"))
    with pytest.raises(ValueError):
        pools_from_text(["tiny"])
    with pytest.raises(ValueError):
        ProvisionerSettings(pools=(POOL,), max_attempts=0)


def test_vm_names_are_distinct_for_distinct_order_ids() -> None:
    ids = ["lo-A", "lo-a", "lo:a", "lo_a", "lo.a", "lo--a", "-lo-a",
           "lo-" + "a" * 70 + "1", "lo-" + "a" * 70 + "2", "...", ":::"]
    names = [vm_name_for(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), name
    assert vm_name_for("lo-A") == vm_name_for("lo-A")  # a retry reuses the name


GOOD = {"order": {"order_id": "lo-0001", "datacenter": POOL[0], "node_size": POOL[1],
                  "state": "claimed"}, "bootstrap_token": "eebt1.abc"}


def test_parse_grant_is_strict() -> None:
    grant = parse_grant(GOOD)
    assert (grant.order_id, grant.datacenter, grant.node_size) == ("lo-0001", *POOL)
    bad: list[object] = [
        [], "x", None, {}, {"order": GOOD["order"]},
        {"order": GOOD["order"], "bootstrap_token": ""},
        {"order": GOOD["order"], "bootstrap_token": 5},
        {"order": [], "bootstrap_token": "eebt1.abc"},
        {**GOOD, "order": {**GOOD["order"], "order_id": "../../accounts"}},
        {**GOOD, "order": {**GOOD["order"], "order_id": "a" * 81}},
        {**GOOD, "order": {**GOOD["order"], "order_id": 7}},
        {**GOOD, "order": {**GOOD["order"], "datacenter": None}},
        {**GOOD, "order": {**GOOD["order"], "node_size": "a b"}},
    ]
    for body in bad:
        with pytest.raises(BadGrant):
            parse_grant(body)
    assert grant_mismatch(grant, *POOL) is None
    assert grant_mismatch(grant, POOL[0], "llm") is not None
    assert grant_mismatch(grant, "gcp:x", POOL[1]) is not None


class Recorder:
    """A launcher that records and never gets a VM up (launch fails as told)."""

    def __init__(self, error: LaunchFailed | None = None) -> None:
        self.error = error
        self.launched_requests: list[LaunchRequest] = []
        self.destroyed: list[str] = []

    async def launch(self, request: LaunchRequest) -> None:
        self.launched_requests.append(request)
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error

    async def destroy(self, vm_name: str) -> None:
        self.destroyed.append(vm_name)
        await trio.lowlevel.checkpoint()

    async def launched(self) -> Mapping[str, str]:
        await trio.lowlevel.checkpoint()
        return {}


def fake_cp(answers: list[httpx.Response], posts: list[tuple[str, Any]]
            ) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        posts.append((request.url.path, body))
        if request.url.path.endswith("/claim"):
            return answers.pop(0) if answers else httpx.Response(204)
        return httpx.Response(200, json={})
    return httpx.MockTransport(handle)


async def test_malformed_claim_answers_claim_nothing_and_stop_nothing() -> None:
    answers = [httpx.Response(200, text="<html>hi</html>"), httpx.Response(200, json=[]),
               httpx.Response(200, json={"order": GOOD["order"]}),
               httpx.Response(200, json={**GOOD, "order": {**GOOD["order"],
                                                           "order_id": "x/../y"}})]
    posts: list[tuple[str, Any]] = []
    said: list[str] = []
    cloud = Recorder()
    async with httpx.AsyncClient(base_url="http://cp.invalid",
                                 transport=fake_cp(answers, posts)) as client:
        prov = Provisioner(client, cloud, SETTINGS, say=said.append)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for _ in range(4):
                    await prov.claim_all(n)
    assert cloud.launched_requests == [] and prov.counters.claimed == 0
    assert [p for p, _ in posts if not p.endswith("/claim")] == []
    assert sum("malformed answer" in line for line in said) == 4


async def test_an_order_of_another_pool_is_failed_not_launched() -> None:
    other = {**GOOD, "order": {**GOOD["order"], "datacenter": "gcp:us-central1",
                               "node_size": "llm"}}
    posts: list[tuple[str, Any]] = []
    cloud = Recorder()
    async with httpx.AsyncClient(base_url="http://cp.invalid",
                                 transport=fake_cp([httpx.Response(200, json=other)],
                                                   posts)) as client:
        prov = Provisioner(client, cloud, SETTINGS, say=print)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                await prov.claim_all(n)
    assert cloud.launched_requests == []
    (fail,) = [(p, b) for p, b in posts if p.endswith("/fail")]
    assert fail[0] == "/api/v2/capacity/launch-orders/lo-0001/fail"
    assert "gcp:us-central1/llm" in fail[1]["error"]


async def test_a_taken_name_fails_the_order_and_the_vm_is_left_alone() -> None:
    posts: list[tuple[str, Any]] = []
    cloud = Recorder(NameTaken("a VM named ee-x exists and is not ours"))
    async with httpx.AsyncClient(base_url="http://cp.invalid",
                                 transport=fake_cp([httpx.Response(200, json=GOOD)],
                                                   posts)) as client:
        prov = Provisioner(client, cloud, SETTINGS, say=print)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                await prov.claim_all(n)
    assert len(cloud.launched_requests) == 1 and cloud.destroyed == []  # no retry either
    (fail,) = [b for p, b in posts if p.endswith("/fail")]
    assert "not ours" in fail["error"]


# ---- LibvirtLauncher against a stand-in libvirt host ----------------------------------


class FakeHost:
    def __init__(self, domains: dict[str, DomainInfo | None]) -> None:
        self.domains = domains

    def __enter__(self) -> FakeHost:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def info(self, name: str) -> DomainInfo | None:
        if name in self.domains and self.domains[name] is None:
            raise VmError(f"domain {name} exists but is not an EasyEnclave VM")
        return self.domains.get(name)


def libvirt_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     domains: dict[str, DomainInfo | None]) -> tuple[LibvirtLauncher,
                                                                     list[str], list[str]]:
    import ee.vm.launcher as mod
    deleted: list[str] = []
    created: list[str] = []
    monkeypatch.setattr(mod, "VmHost", lambda uri: FakeHost(domains))
    monkeypatch.setattr(mod, "delete_vm", lambda name, host, root: deleted.append(name))
    monkeypatch.setattr(mod, "create_vm",
                        lambda req, host, sim_chain: created.append(req.name))
    launcher = LibvirtLauncher(uri="test:///", image=tmp_path / "img", root_dir=tmp_path,
                               cp="ws://cp.invalid:1")
    return launcher, deleted, created


def domain(name: str, order_id: str | None) -> DomainInfo:
    return DomainInfo(name, "running", Labels(order_id=order_id))


async def test_libvirt_destroy_deletes_only_the_orders_own_vm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = vm_name_for("lo-1")
    operator = vm_name_for("foo")  # `eectl vm create` under the name of order foo
    collided = vm_name_for("lo-2")  # a domain there labelled with another order's id
    foreign = vm_name_for("lo-3")  # not an EasyEnclave VM at all
    launcher, deleted, _ = libvirt_launcher(tmp_path, monkeypatch, {
        ours: domain(ours, "lo-1"), operator: domain(operator, None),
        collided: domain(collided, "lo-9"), foreign: None})
    for name in (operator, collided, foreign, vm_name_for("nothing-there")):
        await launcher.destroy(name)
    assert deleted == []
    await launcher.destroy(ours)
    assert deleted == [ours]


async def test_libvirt_launch_onto_a_taken_name_fails_without_touching_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = vm_name_for("lo-1")
    for other in (domain(name, None), domain(name, "lo-9"), None):
        launcher, deleted, created = libvirt_launcher(tmp_path, monkeypatch, {name: other})
        request = LaunchRequest(order_id="lo-1", vm_name=name, datacenter="local:dev",
                                node_size="tiny", bootstrap_token="eebt1.x")
        with pytest.raises(NameTaken):
            await launcher.launch(request)
        assert created == [] and deleted == []
    launcher, deleted, created = libvirt_launcher(tmp_path, monkeypatch, {})
    await launcher.launch(request)
    assert created == [name]
