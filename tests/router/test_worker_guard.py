"""Guardrails where the config lives in the Worker: ``eectl rollout guard`` (its pass,
``guard_pass``) reads the config through the Cloudflare API stand-in, scrapes both real
stacks' /metrics, and writes the step-back there; the Worker in workerd routes by it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from kv_standin import KvStandIn
from routerkit import config_doc, two_stacks
from test_worker import worker_kw
from workerdkit import running_workerd

from ee.ctl.main import main as eectl
from ee.ctl.rollout import CloudflareBackend, guard_pass
from ee.router import decision as d
from ee.router.guard import Guard

VALUE = "/client/v4/accounts/acc1/storage/kv/namespaces/ns1/values/config"


async def test_injected_5xx_behind_the_worker_steps_back_through_the_cloudflare_api(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.rate = 1.0  # real time, plus the jumps below over the windows
    doc = {**config_doc(A=25, B=25, C=10),
           "guardrails": {"error_rate": {"window_s": 300, "threshold": 0.01}}}
    events: list[dict[str, Any]] = []
    with KvStandIn().serving() as kv, trio.fail_after(180 + 301):
        kv.values["config"] = json.dumps(doc).encode()
        backend = CloudflareBackend(kv.base, "acc1", "ns1", kv.token)
        async with two_stacks(tmp_path, accounts=32) as stacks, \
                running_workerd(tmp_path, **worker_kw(stacks, kv)) as url, \
                httpx.AsyncClient() as scraper:
            guard = Guard({"old": stacks.old.http + "/metrics",
                           "new": stacks.new.http + "/metrics"}, scraper)
            async with stacks.new.client() as c:
                r = await c.post("/api/v2/admin/chaos/errors", json={"rate": 0.5})
                assert r.status_code == 200, r.text

            # the accounts the Worker sends to the new stack (hashing is by account id,
            # random per run): traffic goes on until at least one of their requests met
            # an injected 5xx (rate 0.5: three requests alone missed it 1 time in 8)
            config = d.RolloutConfig.from_json(doc)
            assert any(d.decide(config, "A", f"account:{a}").stack == "new"
                       for a, _ in stacks.keys), "no account routed to the new stack"

            async def traffic() -> dict[str, int]:
                seen = {"old": 0, "new": 0, "new_5xx": 0, "old_5xx": 0}
                for _ in range(40):
                    for _, key in stacks.keys:
                        async with httpx.AsyncClient(base_url=url, timeout=10, headers={
                                "Authorization": f"Bearer {key}"}) as c:
                            r = await c.get("/api/v2/apps")
                            stack = r.headers[d.STACK_HEADER]
                            seen[stack] += 1
                            seen[f"{stack}_5xx"] += r.status_code >= 500
                    if seen["new"] >= 3 and seen["new_5xx"] >= 1:
                        break
                return seen

            assert await guard_pass(backend, guard, events.append) is None  # the base
            seen = await traffic()
            assert seen["new"] >= 3 and seen["new_5xx"] >= 1 and seen["old_5xx"] == 0
            assert await guard_pass(backend, guard, events.append) is None
            assert "error_rate" in guard.evaluator.since  # breaching, window not over
            mock_clock.jump(200)
            await traffic()
            assert await guard_pass(backend, guard, events.append) is None
            mock_clock.jump(101)
            await traffic()
            puts = sum(1 for m, p in kv.calls if m == "PUT")
            assert puts == 0
            fired = await guard_pass(backend, guard, events.append)
            assert fired is not None and fired.trigger == "error_rate", guard.evaluator
            # written through the Cloudflare API, once
            assert [c for c in kv.calls if c[0] == "PUT"] == [("PUT", VALUE)]
            stored = json.loads(kv.values["config"])
            assert stored["classes"]["A"] == 10 and stored["classes"]["B"] == 10
            assert stored["classes"]["C"] == 10  # C is not concerned by 5xx
            assert stored["guardrails"] == doc["guardrails"]
            assert set(stored["changed_at"]) == {"A", "B"}
            event = events[-1]
            assert event["kind"] == "rollout.step_back" and event["trigger"] == "error_rate"
            assert event["classes"]["A"] == {"from": 25.0, "to": 10.0}
            assert event["value"] > event["limit"] >= 0.01
            # the Worker routes by the stepped-back config at once (it reads KV per request)
            stepped = d.RolloutConfig.from_json(stored)
            for acct, key in stacks.keys:
                async with httpx.AsyncClient(base_url=url, timeout=10, headers={
                        "Authorization": f"Bearer {key}"}) as c:
                    r = await c.get("/api/v2/apps")
                    assert r.headers[d.STACK_HEADER] == \
                        d.decide(stepped, "A", f"account:{acct}").stack


async def test_a_dead_new_stack_breaches_error_rate_with_no_traffic_at_all(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """A new stack that answers nothing, not even /metrics, is not unobserved: each
    failed scrape counts as one of its answers, a 5xx."""
    mock_clock.rate = 1.0
    doc = {**config_doc(A=5), "guardrails": {"error_rate": {"window_s": 60}}}
    with KvStandIn().serving() as kv, trio.fail_after(120 + 61):
        kv.values["config"] = json.dumps(doc).encode()
        backend = CloudflareBackend(kv.base, "acc1", "ns1", kv.token)
        async with two_stacks(tmp_path) as stacks, httpx.AsyncClient() as scraper:
            guard = Guard({"old": stacks.old.http + "/metrics",
                           "new": "http://127.0.0.1:9/metrics"}, scraper)
            events: list[dict[str, Any]] = []
            assert await guard_pass(backend, guard, events.append) is None
            assert await guard_pass(backend, guard, events.append) is None
            mock_clock.jump(61)
            fired = await guard_pass(backend, guard, events.append)
            assert fired is not None and fired.trigger == "error_rate"
            assert json.loads(kv.values["config"])["classes"]["A"] == 2


async def test_eectl_rollout_guard_runs_the_loop_against_the_api(tmp_path: Path) -> None:
    """The CLI: ``eectl rollout guard --cloudflare`` (two passes, real stacks, no breach:
    nothing written; a bad --interval is a usage error)."""
    with KvStandIn().serving() as kv, trio.fail_after(120):
        kv.values["config"] = json.dumps(config_doc(A=5)).encode()
        token = tmp_path / "cf.token"
        token.write_text(kv.token)
        async with two_stacks(tmp_path) as stacks:
            base = ["rollout", "guard", "--cloudflare", "--cf-api", kv.base, "--cf-account",
                    "acc1", "--cf-namespace", "ns1", "--cf-token-file", str(token),
                    "--old-metrics", stacks.old.http + "/metrics",
                    "--new-metrics", stacks.new.http + "/metrics"]
            rc = await trio.to_thread.run_sync(
                eectl, [*base, "--interval", "0.2", "--passes", "2"])
            assert rc == 0
            assert [m for m, _ in kv.calls] == ["GET", "GET"]
            rc = await trio.to_thread.run_sync(eectl, [*base, "--interval", "0"])
            assert rc == 2
