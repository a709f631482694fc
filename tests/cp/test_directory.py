"""The agent directory: indexes follow the records, the placement shortlist chooses
what placement over every agent chooses, and the change feed nudges only the apps a
change concerns, once per pass."""

from __future__ import annotations

import random

import pytest

from ee.actors.directory import AgentDirectory, AgentRecord, Nudges
from ee.actors.identity import Identity
from ee.actors.lifecycle import AgentState
from ee.cp.readiness import Quorum, Tally, assess
from ee.placement import Constraints, Request, place
from ee.protocol.messages import DeploymentSnapshot


def ident(i: int, *, dc: int = 3, gpu: bool = False, verdict: str = "pass") -> Identity:
    return Identity(agent_id=f"ag-{i:05d}", vm_name=f"vm-{i:05d}",
                    node_size="large" if i % 4 == 0 else "standard",
                    datacenter=f"z{i % dc}", gpu=gpu, public_key=b"k" * 32, provider="sim",
                    mrtd="00", tcb_status=None, verdict=verdict, violations=(),
                    verified_at=0.0)


def snap(dep: str, app: str = "app-a", state: str = "running") -> DeploymentSnapshot:
    return DeploymentSnapshot(deployment_id=dep, app=app, version="v1", state=state,
                              compose_hash=None)


def rec(i: int, state: AgentState = AgentState.READY, *deps: DeploymentSnapshot,
        draining: bool = False, **kw: object) -> AgentRecord:
    return AgentRecord(f"ag-{i:05d}", ident(i, **kw), state,  # type: ignore[arg-type]
                       draining=draining, deployments=deps)


def test_indexes_follow_every_change() -> None:
    d = AgentDirectory()
    d.put(rec(1))
    d.put(rec(2, AgentState.READY, snap("dep-1")))
    assert set(d.listing("dep-1")) == {"ag-00002"}
    assert d.listed("dep-1") and not d.listed("dep-2")
    # The replica moves: the old listing is gone, the new one is there.
    d.put(rec(2))
    d.put(rec(1, AgentState.READY, snap("dep-1")))
    assert set(d.listing("dep-1")) == {"ag-00001"}
    assert d.pool_members("z1", "standard") == {"ag-00001"}
    assert d.datacenter_counts("z2")["counts"]["online"] == 1
    d.put(rec(2, AgentState.QUARANTINED))
    assert d.datacenter_counts("z2") == {
        "counts": {"online": 0, "stale": 0, "offline": 0, "quarantined": 1},
        "pass": 0, "fail": 1, "total": 1}
    assert d.status_counts()["quarantined"] == 1
    # Unchanged records are not writes.
    writes = d.writes
    d.put(rec(2, AgentState.QUARANTINED))
    assert d.writes == writes


def test_view_is_the_api_shape() -> None:
    d = AgentDirectory()
    d.put(rec(7, AgentState.QUARANTINED, snap("dep-9")))
    view = d.view("ag-00007", now=5.0)
    assert view is not None
    assert view["status"] == "quarantined" and view["attestation"]["verdict"] == "fail"
    assert view["deployment"][0]["deployment_id"] == "dep-9"
    assert view["health"] == {"status": "unknown", "detail": ""}
    assert d.view("ag-nope", now=5.0) is None


@pytest.mark.parametrize("seed", range(6))
def test_shortlist_chooses_what_placement_over_every_agent_chooses(seed: int) -> None:
    rng = random.Random(seed)
    d = AgentDirectory()
    states = [AgentState.READY] * 6 + [AgentState.STALE, AgentState.OFFLINE,
                                       AgentState.QUARANTINED]
    for i in range(400):
        deps = (snap(f"dep-{rng.randrange(30)}"),) if rng.random() < 0.3 else ()
        d.put(AgentRecord(f"ag-{i:05d}", ident(i, gpu=rng.random() < 0.2,
                                               verdict=rng.choice(["pass", "warn", "x"])),
                          rng.choice(states), draining=rng.random() < 0.1, deployments=deps))
    holds = {f"ag-{rng.randrange(400):05d}": rng.choice(["rsv-1", "dep-3", "rsv-2"])
             for _ in range(20)}
    for _ in range(60):
        constraints = Constraints(
            datacenter=rng.choice([None, "z0", "z1"]),
            node_size=rng.choice([None, "standard", "large"]),
            gpu=rng.random() < 0.2,
            exclude_agents=frozenset(f"ag-{rng.randrange(400):05d}"
                                     for _ in range(rng.randrange(4))))
        request = Request(deployment_id=rng.choice([None, "dep-3", "dep-40"]),
                          replicas=rng.randint(1, 12), constraints=constraints,
                          reservation=rng.choice([None, "rsv-1"]))
        full = place(request, d.infos(holds))
        fast = d.place(request, holds)
        assert fast.chosen == full.chosen
        assert fast.placeable == full.placeable
        if not full.placeable:
            assert fast == full  # diagnostics over every agent when it cannot place


def test_free_buckets_drop_busy_draining_and_unattested_agents() -> None:
    d = AgentDirectory()
    d.put(rec(1))
    request = Request(deployment_id="dep-x", replicas=1, constraints=Constraints())
    assert d.place(request, {}).chosen == ("ag-00001",)
    for changed in (rec(1, AgentState.READY, snap("dep-y")), rec(1, draining=True),
                    rec(1, verdict="fail"), rec(1, AgentState.STALE)):
        d.put(changed)
        assert d.shortlist(request, {}) == [] or not d.place(request, {}).placeable
        d.put(rec(1))
        assert d.place(request, {}).chosen == ("ag-00001",)


def test_nudges_reach_only_the_apps_concerned_once_per_pass() -> None:
    sent: list[str] = []
    nudges = Nudges(lambda app: sent.append(app) is None)
    d = AgentDirectory()
    d.subscribe(nudges.changed)
    nudges.own("app-a", ["dep-a"])
    nudges.own("app-b", ["dep-b"])
    nudges.watch("app-b", ["ag-00002"], hungry=False)
    nudges.watch("app-c", [], hungry=True)
    d.put(rec(1, AgentState.READY, snap("dep-a")))  # lists app-a's deployment; free? no
    assert sent == ["app-a"]
    d.put(rec(1, AgentState.STALE, snap("dep-a")))  # app-a's nudge is still queued
    assert sent == ["app-a"]
    nudges.taken("app-a")
    d.put(rec(1, AgentState.READY, snap("dep-a", state="starting")))
    assert sent == ["app-a", "app-a"]  # status changed: a nudge again
    nudges.taken("app-a")
    d.put(rec(1, AgentState.READY, snap("dep-a", state="running")))
    assert sent == ["app-a", "app-a"]  # progress only: the ReplicaReport carries it
    d.put(rec(2))  # watched by app-b; free, so the hungry app-c hears of it too
    assert sent[2:] == ["app-b", "app-c"]
    d.put(rec(3, AgentState.STALE))  # nobody cares
    assert sent[4:] == []
    nudges.paused = True
    nudges.taken("app-b")
    d.put(rec(2, AgentState.STALE))
    assert sent[4:] == []


def test_tally_decides_like_assess() -> None:
    rng = random.Random(3)
    expected = {f"a{i}" for i in range(20)}
    tally = Tally(expected)
    seen: set[str] = set()
    q = Quorum(quorum_fraction=0.5)
    for _ in range(40):
        agent = rng.choice([f"a{i}" for i in range(30)])
        tally.see(agent)
        tally.see(agent)
        seen.add(agent)
        assert tally.assess(q, 1.0) == assess(q, seen, expected, 1.0)
