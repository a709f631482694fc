"""Shadow reads and guardrail step-backs on two real CP stacks behind ee-router."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing
from routerkit import config_doc, running_router, two_stacks, wait_until

from ee.router import decision as d


async def test_shadow_compares_reads_and_never_writes_to_the_shadow_stack(
        tmp_path: Path) -> None:
    with trio.fail_after(90):
        doc = {**config_doc(), "shadow": {"A": 1.0}}
        async with two_stacks(tmp_path, accounts=3) as stacks, \
                running_router(stacks, tmp_path, doc) as rr:
            for _, key in stacks.keys:
                async with rr.client(key) as c:
                    r = await c.post("/api/v2/apps", json={"name": "shadowed"})
                    assert r.status_code == 201 and r.headers[d.STACK_HEADER] == "old"
                    r = await c.post("/api/v2/apps/shadowed/versions", json={
                        "version": "1", "compose": "services:\n  web:\n    image: x\n",
                        "expose_port": 80})
                    assert r.status_code == 201, r.text
                    for path in ("/api/v2/apps", "/api/v2/apps/shadowed", "/api/v2/health"):
                        r = await c.get(path)
                        assert r.status_code == 200 and r.headers[d.STACK_HEADER] == "old"
            async with rr.admin() as c:
                async def compared() -> bool:
                    return bool((await c.get("/_ee/router/shadow")).json()["compared"] >= 9)

                with trio.fail_after(10):
                    await wait_until(compared)
                report = (await c.get("/_ee/router/shadow")).json()
            assert report["compared"] == 9  # only the reads were mirrored
            diffs = {(x["path"], x["served_status"], x["shadow_status"])
                     for x in report["recent_diffs"]}
            # the app exists on old only: the shadow sees 404 there, and an empty list
            assert ("/api/v2/apps/shadowed", 200, 404) in diffs
            assert report["status_diffs"] == 3
            assert report["shape_diffs"] == 6  # the list has one app on old, none on new
            assert not any(x["path"] == "/api/v2/health" for x in report["recent_diffs"])
            # nothing was written on the shadow stack
            for _, key in stacks.keys:
                async with stacks.new.client(token=key) as c:
                    assert (await c.get("/api/v2/apps")).json()["apps"] == []


async def test_injected_5xx_on_new_steps_the_rollout_back(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.rate = 1.0  # real time, plus the jumps below over the windows
    with trio.fail_after(120 + 301):  # the deadline runs on the same (jumped) clock
        doc = {**config_doc(A=25, B=25, C=10),
               "guardrails": {"error_rate": {"window_s": 300, "threshold": 0.01}}}
        async with two_stacks(tmp_path, accounts=16) as stacks, \
                running_router(stacks, tmp_path, doc) as rr:
            async with stacks.new.client() as c:
                r = await c.post("/api/v2/admin/chaos/errors", json={"rate": 1.0})
                assert r.status_code == 200, r.text

            async def traffic() -> dict[str, int]:
                seen = {"old": 0, "new": 0, "5xx": 0}
                for _, key in stacks.keys:
                    async with rr.client(key) as c:
                        r = await c.get("/api/v2/apps")
                        seen[r.headers[d.STACK_HEADER]] += 1
                        seen["5xx"] += r.status_code >= 500
                return seen

            seen = await traffic()
            assert seen["new"] >= 1 and seen["5xx"] == seen["new"]
            assert await rr.router.guard_once() is None  # breaching, window not over
            assert "error_rate" in rr.router.evaluator.since
            mock_clock.jump(200)
            await traffic()
            assert await rr.router.guard_once() is None
            mock_clock.jump(101)
            await traffic()
            fired = await rr.router.guard_once()
            assert fired is not None and fired.trigger == "error_rate"
            assert rr.router.config.percent("A") == 10 and rr.router.config.percent("B") == 10
            assert rr.router.config.percent("C") == 10  # C is not concerned by 5xx
            event = rr.router.events[-1]
            assert event["kind"] == "rollout.step_back"
            assert event["classes"]["A"] == {"from": 25.0, "to": 10.0}
            assert event["value"] > event["limit"] >= 0.01
            on_disk = json.loads(rr.config_path.read_text())
            assert on_disk["classes"]["A"] == 10 and on_disk["guardrails"]
            async with rr.admin() as c:
                events = (await c.get("/_ee/router/events")).json()["events"]
                assert events[-1]["trigger"] == "error_rate"


async def test_a_healthy_new_stack_is_not_stepped_back(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.rate = 1.0
    with trio.fail_after(120 + 3 * 400):
        async with two_stacks(tmp_path, accounts=16) as stacks, \
                running_router(stacks, tmp_path, config_doc(A=50)) as rr:
            for _ in range(3):
                for _, key in stacks.keys:
                    async with rr.client(key) as c:
                        assert (await c.get("/api/v2/apps")).status_code == 200
                assert await rr.router.guard_once() is None
                mock_clock.jump(400)
            assert rr.router.config.percent("A") == 50
