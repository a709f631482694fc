"""ee-router in front of two real CP stacks: cohorts, stickiness, kill switch, agents."""

from __future__ import annotations

from pathlib import Path

import trio
from routerkit import HeaderAgent, Stacks, config_doc, running_router, two_stacks

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
