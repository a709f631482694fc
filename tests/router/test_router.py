"""ee-router in front of two real CP stacks: cohorts, stickiness, kill switch, agents."""

from __future__ import annotations

from pathlib import Path

import trio
from routerkit import (
    Stacks,
    config_doc,
    running_router,
    two_stacks,
    wait_until,
)
from simagent import SimAgent

from ee.router import decision as d


async def apps_on(stacks: Stacks, stack: str, key: str) -> set[str]:
    async with stacks.of(stack).client(token=key) as c:
        r = await c.get("/api/v2/apps")
        assert r.status_code == 200, r.text
        return {a["name"] for a in r.json()["apps"]}


async def test_tenant_writes_follow_the_account_and_never_flip_back(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with two_stacks(tmp_path, accounts=12) as stacks, \
                running_router(stacks, tmp_path) as rr:
            history: dict[str, list[str]] = {acct: [] for acct, _ in stacks.keys}
            for pct in (0, 2, 10, 25, 50, 100):
                await rr.set(config_doc(A=pct, B=pct))
                for acct, key in stacks.keys:
                    async with rr.client(key) as c:
                        name = f"app-{pct}"
                        r = await c.post("/api/v2/apps", json={"name": name})
                        assert r.status_code == 201, r.text
                        stack = r.headers[d.STACK_HEADER]
                        expected = d.decide(d.RolloutConfig.from_json(config_doc(B=pct)),
                                            "B", f"account:{acct}").stack
                        assert stack == expected
                        # a read of the same account lands with its write
                        r = await c.get(f"/api/v2/apps/{name}")
                        assert r.status_code == 200, r.text
                        assert r.headers[d.STACK_HEADER] == stack
                        # the stack's own Date and Server, not a second pair
                        assert len(r.headers.get_list("date")) == 1
                        assert len(r.headers.get_list("server")) == 1
                    # independently: the app exists on that stack only
                    assert name in await apps_on(stacks, stack, key)
                    other = "old" if stack == "new" else "new"
                    assert name not in await apps_on(stacks, other, key)
                    history[acct].append(stack)
            for acct, seen in history.items():
                first_new = seen.index("new")  # at 100 % everybody is on new
                assert all(s == "new" for s in seen[first_new:]), (acct, seen)
                assert seen[0] == "old"
            # one lookup per key, however many requests
            assert rr.router.resolver.lookups == len(stacks.keys)


async def test_kill_switch_acts_on_the_next_request(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with two_stacks(tmp_path, accounts=1) as stacks, \
                running_router(stacks, tmp_path, config_doc(A=100, B=100)) as rr:
            _, key = stacks.keys[0]
            async with rr.client(key) as c:
                r = await c.get("/api/v2/apps")
                assert r.headers[d.STACK_HEADER] == "new"
                await rr.set({**config_doc(A=100, B=100), "kill_switch": True})
                r = await c.get("/api/v2/apps")
                assert r.headers[d.STACK_HEADER] == "old"
                r = await c.post("/api/v2/apps", json={"name": "after-kill"})
                assert r.headers[d.STACK_HEADER] == "old"
            assert "after-kill" in await apps_on(stacks, "old", key)


async def test_config_file_change_is_picked_up_and_bad_files_are_kept_out(
        tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with two_stacks(tmp_path) as stacks, \
                running_router(stacks, tmp_path, poll_interval_s=0.05) as rr:
            rr.config_path.write_text('{"kill_switch": false, "classes": {"A": 100}}')
            with trio.fail_after(5):
                await wait_until(lambda: rr.router.config.points["A"] == 10_000)
            rr.config_path.write_text('{"kill_switch": "yes"}')
            with trio.fail_after(5):
                await wait_until(lambda: rr.router.config_error is not None)
            assert rr.router.config.points["A"] == 10_000  # the last good one stays
            async with rr.client() as c:
                r = await c.get("/api/v2/health")
                assert r.headers[d.STACK_HEADER] == "new"


async def test_admin_endpoint_needs_the_token(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with two_stacks(tmp_path, accounts=1) as stacks, \
                running_router(stacks, tmp_path) as rr:
            doc = {**config_doc(A=100), "kill_switch": False}
            for token in (None, "wrong-token-0123456789", stacks.old.token, stacks.keys[0][1]):
                async with rr.client(token) as c:
                    r = await c.put("/_ee/router/config", json=doc)
                    assert r.status_code == 401, r.text
                    r = await c.get("/_ee/router/config")
                    assert r.status_code == 401, r.text
            assert rr.router.config.points["A"] == 0
            async with rr.admin() as c:
                r = await c.put("/_ee/router/config", json={"classes": {"A": 101}})
                assert r.status_code == 400 and r.json()["error"]["code"] == "bad_config"
                r = await c.put("/_ee/router/config", json={"shadow": {"B": 1}})
                assert r.status_code == 400, r.text
                r = await c.put("/_ee/router/config", content=b"x" * (70 << 10))
                assert r.status_code == 413, r.text
            assert rr.router.config.points["A"] == 0


async def test_agents_are_routed_by_vm_name_and_stay_across_reconnects(
        tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with two_stacks(tmp_path) as stacks, \
                running_router(stacks, tmp_path, config_doc(C=50)) as rr:
            url = rr.url.replace("http://", "ws://") + "/api/v2/agents/connect"
            names = [f"vm-{i}" for i in range(8)]
            config = d.RolloutConfig.from_json(config_doc(C=50))
            want = {n: d.decide(config, "C", f"agent:{n}").stack for n in names}
            assert set(want.values()) == {"old", "new"}  # both stacks get agents

            async def placed() -> dict[str, str]:
                out: dict[str, str] = {}
                for stack in d.STACKS:
                    async with stacks.of(stack).client() as c:
                        for a in (await c.get("/api/v2/agents")).json()["agents"]:
                            if a["status"] == "online":
                                out[a["vm_name"]] = stack
                return out

            async def has(expected: dict[str, str]) -> bool:
                return await placed() == expected

            async def on_old(vm: str) -> bool:
                return (await placed()).get(vm) == "old"

            agents = [SimAgent(url=url, td=stacks.old.td, vm_name=n) for n in names]
            for _round in range(2):  # connect, drop, reconnect (same agents, same keys)
                async with trio.open_nursery() as nursery:
                    for agent in agents:
                        await nursery.start(agent.run)
                        assert agent.registered is not None
                    with trio.fail_after(10):
                        await wait_until(lambda: has(want))
                    nursery.cancel_scope.cancel()
            # without the header the agent goes to the stable stack
            async with trio.open_nursery() as nursery:
                plain = SimAgent(url=url, td=stacks.old.td, vm_name="vm-noheader",
                                 route_header=False)
                await nursery.start(plain.run)
                with trio.fail_after(10):
                    await wait_until(lambda: on_old("vm-noheader"))
                nursery.cancel_scope.cancel()


async def test_a_refused_key_is_answered_by_its_lookup_and_not_forwarded(
        tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with two_stacks(tmp_path, accounts=1) as stacks, \
                running_router(stacks, tmp_path, config_doc(A=100, B=100)) as rr:
            for i in range(3):
                async with rr.client(f"ee_k{i:04d}_not-a-secret") as c:
                    r = await c.post("/api/v2/apps", json={"name": "junk"})
                    assert r.status_code == 401 and r.headers[d.STACK_HEADER] == "old"
                    assert r.json()["error"]["code"] == "unauthenticated"
            assert rr.router.resolver.lookups == 3
            assert rr.router.requests == {}  # nothing was forwarded to either stack
            _, key = stacks.keys[0]
            async with rr.client(key) as c:
                assert (await c.get("/api/v2/apps")).headers[d.STACK_HEADER] == "new"


async def test_the_router_enforces_the_promotion_gate_when_given_a_drill_key(
        tmp_path: Path) -> None:
    import time

    from ee.protocol.signing import generate_signing_key, sign_document

    key = generate_signing_key()
    with trio.fail_after(60):
        async with two_stacks(tmp_path) as stacks, \
                running_router(stacks, tmp_path, config_doc(A=25),
                               drill_pubkey=key.public_key()) as rr, rr.admin() as c:
            r = await c.put("/_ee/router/config", json=config_doc(A=50))
            assert r.status_code == 409 and r.json()["error"]["code"] == "promotion_refused"
            doc = {"drill": "db-wipe", "passed": True, "finished_unix": time.time(),
                   "cp": stacks.new.http + "/"}
            # a drill of another stack, or one dated in the future, is no gate pass
            for other in ({**doc, "cp": stacks.old.http},
                          {**doc, "finished_unix": time.time() + 10 * 86400}):
                signed = {"document": other, "signature": sign_document(other, key).hex()}
                r = await c.put("/_ee/router/config", json={**config_doc(A=50),
                                                            "drill": signed})
                assert r.status_code == 409, r.text
            forged = {"document": doc, "signature": sign_document(
                doc, generate_signing_key()).hex()}
            r = await c.put("/_ee/router/config", json={**config_doc(A=50), "drill": forged})
            assert r.status_code == 409, r.text
            assert rr.router.config.percent("A") == 25
            good = {"document": doc, "signature": sign_document(doc, key).hex()}
            r = await c.put("/_ee/router/config", json={**config_doc(A=50), "drill": good})
            assert r.status_code == 200 and rr.router.config.percent("A") == 50
            r = await c.put("/_ee/router/config", json=config_doc(A=10))  # back: no drill
            assert r.status_code == 200
