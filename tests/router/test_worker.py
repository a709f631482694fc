"""deploy/cloudflare/worker.js in real workerd: the same decisions as the Python module,
and the Worker fronting two real CP stacks (tenant writes, kill switch, agents)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import trio
from kv_standin import KvStandIn
from routerkit import Stacks, config_doc, two_stacks, wait_until
from simagent import SimAgent
from workerdkit import running_workerd

from ee.router import decision as d

TOKEN = "worker-admin-token-0123456789"
PARITY = {"kill_switch": False, "classes": {"A": 2, "B": 5.5, "C": 10.01, "D": 25, "E": 99.99},
          "shadow": {"A": 0.5}}


def keys(n: int) -> list[str]:
    rng = random.Random(18)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(f"account:acct-{rng.getrandbits(48):012x}")
        elif kind == 1:
            out.append(f"agent:vm-{i}")
        elif kind == 2:
            out.append(f"dc:gcp-a:us-central{i}")
        elif kind == 3:
            out.append("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 12))))
        else:
            out.append(f"key:k{rng.getrandbits(64):016x}")
    return out


def worker_kw(stacks: Stacks | None, kv: KvStandIn) -> dict[str, str | int]:
    if stacks is None:
        return {"old": "http://127.0.0.1:9", "new": "http://127.0.0.1:9",
                "old_agents": "", "new_agents": "", "kv_port": kv.port, "admin_token": TOKEN}
    return {"old": stacks.old.http, "new": stacks.new.http,
            "old_agents": f"ws://127.0.0.1:{stacks.old.cp.plane.bound_port}",
            "new_agents": f"ws://127.0.0.1:{stacks.new.cp.plane.bound_port}",
            "kv_port": kv.port, "admin_token": TOKEN}


async def test_worker_and_python_decide_the_same_for_100k_keys(tmp_path: Path) -> None:
    config = d.RolloutConfig.from_json(PARITY)
    with KvStandIn().serving() as kv, trio.fail_after(300):
        kv.values["config"] = json.dumps(PARITY).encode()
        async with running_workerd(tmp_path, **worker_kw(None, kv)) as url, \
                httpx.AsyncClient(base_url=url, timeout=120,
                                  headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            all_keys = keys(100_000)
            pairs = [[k, key] for key in all_keys for k in d.CLASSES]
            pairs += [["A", None], ["C", ""]]
            mismatches = 0
            news = 0
            for start in range(0, len(pairs), 50_000):
                batch = pairs[start:start + 50_000]
                r = await c.post("/_ee/router/decide", json=batch)
                assert r.status_code == 200, r.text
                for (klass, key), (stack, bucket) in zip(batch, r.json()["decisions"],
                                                         strict=True):
                    mine = d.decide(config, klass, key)
                    mismatches += (mine.stack, mine.bucket) != (stack, bucket)
                    news += stack == "new"
            assert mismatches == 0
            assert 0 < news < len(pairs)
            paths = [(m, p) for m in ("GET", "HEAD", "POST", "PUT", "DELETE") for p in (
                "/api/v2/health", "/api/v2/apps", "/api/v2/apps/x/deployments",
                "/api/v2/agents/connect", "/api/v2/agents", "/api/v2/agents/ag-1/drain",
                "/api/v2/federation/connect", "/api/v2/federation", "/api/v2/federationx",
                "/api/v2/billing/usage", "/api/v2/admin/tree", "/api/v2/accounts",
                "/api/v2/accounts/me", "/api/v2/capacity/pools/dc/tiny",
                "/api/v2/capacity/launch-orders", "/api/v2/capacity/launch-orders/claim",
                "//api/v2//admin/tree", "/", "/metrics", "/api/v2/datacenters")]
            r = await c.post("/_ee/router/classify", json=paths)
            assert r.json()["classes"] == [
                "refused" if d.path_refusal(p) else d.classify(m, p) for m, p in paths]
            # a bad document in KV: everything to the stable stack (kill switch)
            kv.values["config"] = b'{"classes": {"A": 101}}'
            r = await c.post("/_ee/router/decide", json=[["A", all_keys[0]]] * 3)
            assert r.json()["decisions"] == [["old", None]] * 3
            # the batch endpoint needs the token
            async with httpx.AsyncClient(base_url=url) as anon:
                r = await anon.post("/_ee/router/decide", json=[["A", "x"]])
                assert r.status_code == 401


async def test_worker_fronts_two_real_cps(tmp_path: Path) -> None:
    with KvStandIn().serving() as kv, trio.fail_after(180):
        kv.values["config"] = json.dumps(config_doc(A=50, B=50, C=50)).encode()
        config = d.RolloutConfig.from_json(config_doc(A=50, B=50, C=50))
        async with two_stacks(tmp_path, accounts=8) as stacks, \
                running_workerd(tmp_path, **worker_kw(stacks, kv)) as url:
            seen = set()
            for acct, key in stacks.keys:
                async with httpx.AsyncClient(base_url=url, timeout=10, headers={
                        "Authorization": f"Bearer {key}"}) as c:
                    r = await c.post("/api/v2/apps", json={"name": "via-worker"})
                    assert r.status_code == 201, r.text
                    stack = r.headers[d.STACK_HEADER]
                    assert stack == d.decide(config, "B", f"account:{acct}").stack
                    seen.add(stack)
                    async with stacks.of(stack).client(token=key) as direct:
                        names = [a["name"] for a in (await direct.get("/api/v2/apps")).json()[
                            "apps"]]
                        assert names == ["via-worker"]
                    r = await c.get("/api/v2/apps/via-worker")
                    assert r.status_code == 200 and r.headers[d.STACK_HEADER] == stack
            assert seen == {"old", "new"}
            # kill switch through the Cloudflare API stand-in: the next request is on old
            _, key = next((a, k) for a, k in stacks.keys
                          if d.decide(config, "A", f"account:{a}").stack == "new")
            api = f"{kv.base}/accounts/acc1/storage/kv/namespaces/ns1/values/config"
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {kv.token}"}) as cf:
                r = await cf.put(api, content=json.dumps(
                    {**config_doc(A=50, B=50, C=50), "kill_switch": True}))
                assert r.status_code == 200, r.text
            async with httpx.AsyncClient(base_url=url, timeout=10, headers={
                    "Authorization": f"Bearer {key}"}) as c:
                r = await c.get("/api/v2/apps")
                assert r.headers[d.STACK_HEADER] == "old"
            kv.values["config"] = json.dumps(config_doc(C=50)).encode()
            # agents through the Worker's websocket pass-through, by vm_name
            ws = url.replace("http://", "ws://") + "/api/v2/agents/connect"
            names = [f"wvm-{i}" for i in range(6)]
            want = {n: d.decide(config, "C", f"agent:{n}").stack for n in names}

            async def placed() -> bool:
                got = {}
                for stack in d.STACKS:
                    async with stacks.of(stack).client() as c:
                        for a in (await c.get("/api/v2/agents")).json()["agents"]:
                            got[a["vm_name"]] = stack
                return got == want

            async with trio.open_nursery() as nursery:
                for n in names:
                    agent = SimAgent(url=ws, td=stacks.old.td, vm_name=n)
                    await nursery.start(agent.run)
                    assert agent.registered is not None
                with trio.fail_after(10):
                    await wait_until(placed)
                nursery.cancel_scope.cancel()


async def test_worker_refuses_the_paths_python_refuses_and_forwards_the_rest_verbatim(
        tmp_path: Path) -> None:
    from test_paths import BAD_PATHS, GOOD_PATHS, check_paths, recording_upstream

    with KvStandIn().serving() as kv, trio.fail_after(60):
        kv.values["config"] = json.dumps(PARITY).encode()
        async with recording_upstream() as (upstream, seen), running_workerd(tmp_path, **{
                **worker_kw(None, kv), "old": upstream, "new": upstream}) as url:
            assert all(d.path_refusal(path) is not None for path in BAD_PATHS)
            await check_paths(url, seen)
            async with httpx.AsyncClient(base_url=url, timeout=30, headers={
                    "Authorization": f"Bearer {TOKEN}"}) as c:
                # the classify parity endpoint agrees with Python on what is refused
                paths = [["POST", p] for p in BAD_PATHS + GOOD_PATHS]
                r = await c.post("/_ee/router/classify", json=paths)
                assert r.json()["classes"] == [
                    "refused" if d.path_refusal(p) else d.classify(m, p) for m, p in paths]
                for body in (b"not json", b'[["A", "\\ud800"]]', b'{"a": 1}', b'[["Z", "k"]]'):
                    r = await c.post("/_ee/router/decide", content=body)
                    assert r.status_code == 400, (body, r.text)


async def test_worker_refuses_null_config_fields_like_python(tmp_path: Path) -> None:
    docs = [{"kill_switch": None}, {"classes": None}, {"classes": {"A": None}},
            {"shadow": None}, {"shadow": {"A": None}}]
    with KvStandIn().serving() as kv, trio.fail_after(60):
        async with running_workerd(tmp_path, **worker_kw(None, kv)) as url, \
                httpx.AsyncClient(base_url=url, timeout=30,
                                  headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            key = next(k for k in keys(1000)
                       if d.decide(d.RolloutConfig.from_json(config_doc(A=100)), "A", k).stack
                       == "new")
            for doc in docs:
                with pytest.raises(d.ConfigError):
                    d.RolloutConfig.from_json({**config_doc(A=100), **doc})
                # refused: the Worker falls back to the kill switch (everything old)
                kv.values["config"] = json.dumps({**config_doc(A=100), **doc}).encode()
                r = await c.post("/_ee/router/decide", json=[["A", key]])
                assert r.json()["decisions"] == [["old", None]], doc
            kv.values["config"] = json.dumps(config_doc(A=100)).encode()
            r = await c.post("/_ee/router/decide", json=[["A", key]])
            assert r.json()["decisions"][0][0] == "new"
