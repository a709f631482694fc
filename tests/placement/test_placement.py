"""Placement, tested directly: a pure function of (request, agents)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ee.placement import (
    MAX_EXCLUDED_AGENTS,
    MAX_REPLICAS,
    AgentInfo,
    Constraints,
    ConstraintsError,
    Placement,
    PlacementImpossible,
    Reason,
    Rejection,
    Request,
    place,
)

R = Reason


def agent(agent_id: str = "a1", **kw: Any) -> AgentInfo:
    """A healthy, free, attested, online standard node in dc-a, unless told otherwise."""
    values: dict[str, Any] = {
        "datacenter": "dc-a",
        "node_size": "standard",
        "gpu": False,
        "status": "online",
        "attested": True,
        "draining": False,
        "deployments": (),
    }
    values.update(kw)
    return AgentInfo(agent_id=agent_id, **values)


def request(replicas: int = 1, deployment_id: str | None = "dep-1", **kw: Any) -> Request:
    reservation = kw.pop("reservation", None)
    return Request(deployment_id, replicas, Constraints(**kw), reservation)


# -- eligibility: one rule at a time ------------------------------------------------


@pytest.mark.parametrize(
    ("agent_kw", "request_kw", "expected"),
    [
        pytest.param({}, {}, (), id="eligible"),
        pytest.param({"status": "offline"}, {}, (R.OFFLINE,), id="offline"),
        pytest.param({"status": "stale"}, {}, (R.STALE,), id="stale"),
        pytest.param({"status": "quarantined"}, {}, (R.QUARANTINED,), id="quarantined"),
        pytest.param({"attested": False}, {}, (R.NOT_ATTESTED,), id="not-attested"),
        pytest.param({"draining": True}, {}, (R.DRAINING,), id="draining"),
        pytest.param({}, {"node_size": "llm"}, (R.NODE_SIZE_MISMATCH,), id="node-size"),
        pytest.param({}, {"node_size": "standard"}, (), id="node-size-ok"),
        pytest.param({}, {"datacenter": "dc-b"}, (R.DATACENTER_NOT_ALLOWED,), id="dc"),
        pytest.param({}, {"datacenter": "dc-a"}, (), id="dc-ok"),
        pytest.param({}, {"gpu": True}, (R.NO_GPU,), id="no-gpu"),
        pytest.param({"gpu": True}, {"gpu": True}, (), id="gpu-ok"),
        pytest.param({"gpu": True}, {}, (), id="gpu-node-for-cpu-workload"),
        pytest.param({}, {"exclude_agents": frozenset({"a1"})}, (R.EXCLUDED,), id="excluded"),
        pytest.param({}, {"exclude_agents": frozenset({"a2"})}, (), id="other-excluded"),
        pytest.param({"deployments": ("dep-9",)}, {}, (R.BUSY,), id="busy"),
        pytest.param({"deployments": ("dep-1",)}, {}, (), id="existing-replica"),
        pytest.param({"deployments": ("dep-1", "dep-9")}, {}, (R.BUSY,), id="replica-and-other"),
        pytest.param({"reserved_for": "res-9"}, {}, (R.RESERVED,), id="reserved"),
        pytest.param({"reserved_for": "res-1"}, {"reservation": "res-1"}, (), id="our-res"),
        pytest.param({"reserved_for": "dep-1"}, {}, (), id="held-for-our-deployment"),
    ],
)
def test_decision_table(
    agent_kw: dict[str, Any], request_kw: dict[str, Any], expected: tuple[Reason, ...]
) -> None:
    result = place(request(**request_kw), [agent(**agent_kw)])
    if expected:
        assert result.rejected == (Rejection("a1", expected),)
        assert result.candidates == ()
        assert not result.placeable
        assert result.shortfall == 1
    else:
        assert result.rejected == ()
        assert result.chosen == ("a1",)
        assert result.placeable


def test_new_deployment_preflight_treats_any_workload_as_busy() -> None:
    result = place(request(deployment_id=None), [agent(deployments=("dep-1",))])
    assert result.rejected == (Rejection("a1", (R.BUSY,)),)


def test_reservation_without_deployment_id_is_still_honoured() -> None:
    req = request(deployment_id=None, reservation="res-1")
    assert place(req, [agent(reserved_for="res-1")]).chosen == ("a1",)
    assert place(req, [agent(reserved_for="res-2")]).rejected[0].reasons == (R.RESERVED,)


def test_every_reason_is_collected_in_the_fixed_order() -> None:
    worst = agent(
        status="stale",
        attested=False,
        draining=True,
        node_size="tiny",
        datacenter="dc-z",
        gpu=False,
        deployments=("other",),
        reserved_for="someone-else",
    )
    req = request(node_size="llm", datacenter="dc-a", gpu=True, exclude_agents=frozenset({"a1"}))
    (rejection,) = place(req, [worst]).rejected
    assert rejection.reasons == (
        R.STALE,
        R.NOT_ATTESTED,
        R.DRAINING,
        R.NODE_SIZE_MISMATCH,
        R.DATACENTER_NOT_ALLOWED,
        R.NO_GPU,
        R.EXCLUDED,
        R.BUSY,
        R.RESERVED,
    )
    assert list(Reason) == [
        R.OFFLINE, R.STALE, R.QUARANTINED, R.NOT_ATTESTED, R.DRAINING,
        R.NODE_SIZE_MISMATCH, R.DATACENTER_NOT_ALLOWED, R.NO_GPU, R.EXCLUDED, R.BUSY,
        R.RESERVED,
    ]  # fmt: skip


def test_rejected_are_sorted_by_agent_id() -> None:
    agents = [agent(i, status="offline") for i in ("c", "a", "b")]
    assert [r.agent_id for r in place(request(), agents).rejected] == ["a", "b", "c"]


# -- ranking ------------------------------------------------------------------------


def test_existing_replicas_are_kept_before_anything_else() -> None:
    agents = [
        agent("a", reserved_for="dep-1"),
        agent("b"),
        agent("z", deployments=("dep-1",), gpu=True),  # even a GPU node, rule 1 wins
        agent("y", deployments=("dep-1",), datacenter="dc-a"),
    ]
    result = place(request(replicas=3), agents)
    assert result.chosen == ("y", "z", "a")
    assert [c.existing_replica for c in result.candidates] == [True, True, False, False]


def test_reserved_agents_come_before_free_ones() -> None:
    agents = [agent("a"), agent("b", reserved_for="res-1"), agent("c", reserved_for="dep-1")]
    result = place(request(replicas=2, reservation="res-1"), agents)
    assert result.chosen == ("b", "c")
    assert [c.reserved for c in result.candidates] == [True, True, False]


def test_cpu_workload_prefers_nodes_without_gpu() -> None:
    agents = [agent("a", gpu=True), agent("b", gpu=False), agent("c", gpu=True)]
    result = place(request(replicas=2), agents)
    assert result.chosen == ("b", "a")
    assert [c.spare_gpu for c in result.candidates] == [False, True, True]


def test_gpu_workload_only_sees_gpu_nodes() -> None:
    agents = [agent("a", gpu=False), agent("b", gpu=True)]
    result = place(request(replicas=2, gpu=True), agents)
    assert result.chosen == ("b",)
    assert result.shortfall == 1
    assert result.rejected == (Rejection("a", (R.NO_GPU,)),)


def test_replicas_spread_round_robin_over_datacenters_by_name() -> None:
    agents = [
        agent("a1", datacenter="dc-a"),
        agent("a2", datacenter="dc-a"),
        agent("a3", datacenter="dc-a"),
        agent("b1", datacenter="dc-b"),
        agent("c1", datacenter="dc-c"),
        agent("c2", datacenter="dc-c"),
    ]
    result = place(request(replicas=4), agents)
    assert result.chosen == ("a1", "b1", "c1", "a2")
    assert [c.agent_id for c in result.candidates] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert [c.spread_round for c in result.candidates] == [0, 0, 0, 1, 1, 2]
    assert [c.rank for c in result.candidates] == [1, 2, 3, 4, 5, 6]


def test_spread_counts_replicas_already_in_a_datacenter() -> None:
    agents = [
        agent("a1", datacenter="dc-a", deployments=("dep-1",)),
        agent("a2", datacenter="dc-a", deployments=("dep-1",)),
        agent("a3", datacenter="dc-a"),
        agent("b1", datacenter="dc-b"),
        agent("b2", datacenter="dc-b"),
        agent("b3", datacenter="dc-b"),
    ]
    result = place(request(replicas=5), agents)
    # dc-b catches up with dc-a's two existing replicas before dc-a gets another.
    assert result.chosen == ("a1", "a2", "b1", "b2", "a3")


def test_shortfall_counts_missing_replicas_and_chosen_takes_what_fits() -> None:
    agents = [agent("a"), agent("b", draining=True), agent("c")]
    result = place(request(replicas=5), agents)
    assert (result.placeable, result.chosen, result.shortfall) == (False, ("a", "c"), 3)
    empty = place(request(replicas=2), [])
    assert (empty.placeable, empty.chosen, empty.shortfall) == (False, (), 2)
    exact = place(request(replicas=2), agents)
    assert (exact.placeable, exact.chosen, exact.shortfall) == (True, ("a", "c"), 0)


def test_require_raises_placement_impossible_with_the_diagnostics() -> None:
    result = place(request(replicas=2), [agent("a")])
    with pytest.raises(PlacementImpossible) as info:
        result.require()
    assert info.value.placement is result
    assert place(request(), [agent("a")]).require() == ("a",)


def test_to_dict_is_the_preflight_shape() -> None:
    result = place(request(replicas=2), [agent("a"), agent("b", status="offline")])
    assert result.to_dict() == {
        "placeable": False,
        "candidates": [
            {
                "agent_id": "a",
                "rank": 1,
                "datacenter": "dc-a",
                "existing_replica": False,
                "reserved": False,
                "spare_gpu": False,
                "spread_round": 0,
            }
        ],
        "rejected": [{"agent_id": "b", "reasons": ["OFFLINE"]}],
        "chosen": ["a"],
        "shortfall": 1,
    }
    reasons = result.to_dict()["rejected"][0]["reasons"]  # type: ignore[index]
    assert type(reasons[0]) is str


def test_duplicate_agent_ids_are_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        place(request(), [agent("a"), agent("a", datacenter="dc-b")])


# -- values validate themselves -----------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"agent_id": ""},
        {"status": "ready"},
        {"gpu": 1},
        {"deployments": ["dep-1"]},
        {"deployments": ("",)},
        {"reserved_for": ""},
    ],
)
def test_agent_info_validates(bad: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        agent(**bad)


@pytest.mark.parametrize("replicas", [0, -1, MAX_REPLICAS + 1, True, 1.0])
def test_request_validates_replicas(replicas: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        Request("dep-1", replicas, Constraints())


def test_constraints_validate_when_built_by_hand() -> None:
    with pytest.raises(TypeError):
        Constraints(exclude_agents=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Constraints(datacenter="")


# -- Constraints.from_json ----------------------------------------------------------


def test_from_json_parses_a_full_object() -> None:
    obj = {"datacenter": "dc-a", "node_size": "llm", "gpu": True, "exclude_agents": ["x", "x"]}
    assert Constraints.from_json(obj) == Constraints("dc-a", "llm", True, frozenset({"x"}))
    assert Constraints.from_json({}) == Constraints()
    assert Constraints.from_json(None) == Constraints()
    assert Constraints.from_json({"datacenter": None, "node_size": None}) == Constraints()


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        pytest.param([], "", id="not-an-object"),
        pytest.param("dc-a", "", id="string"),
        pytest.param({"region": "x"}, "region", id="unknown-key"),
        pytest.param({"gpu": True, "zzz": 1, "aaa": 2}, "aaa", id="first-unknown-key"),
        pytest.param({"datacenter": 3}, "datacenter", id="dc-type"),
        pytest.param({"datacenter": ""}, "datacenter", id="dc-empty"),
        pytest.param({"node_size": ["llm"]}, "node_size", id="size-type"),
        pytest.param({"gpu": "yes"}, "gpu", id="gpu-string"),
        pytest.param({"gpu": 1}, "gpu", id="gpu-int"),
        pytest.param({"gpu": None}, "gpu", id="gpu-null"),
        pytest.param({"exclude_agents": "a1"}, "exclude_agents", id="exclude-string"),
        pytest.param({"exclude_agents": ["a1", 2]}, "exclude_agents", id="exclude-item"),
        pytest.param({"exclude_agents": [""]}, "exclude_agents", id="exclude-empty-id"),
        pytest.param({"exclude_agents": None}, "exclude_agents", id="exclude-null"),
        pytest.param(
            {"exclude_agents": ["a"] * (MAX_EXCLUDED_AGENTS + 1)}, "exclude_agents", id="big"
        ),
    ],
)
def test_from_json_rejects_bad_input(obj: object, field: str) -> None:
    with pytest.raises(ConstraintsError) as info:
        Constraints.from_json(obj)
    assert info.value.field == field
    assert info.value.reason
    assert isinstance(info.value, ValueError)


# -- properties ---------------------------------------------------------------------

DCS = ("dc-a", "dc-b", "dc-c")


@st.composite
def agent_sets(draw: st.DrawFn) -> list[AgentInfo]:
    ids = draw(st.lists(st.sampled_from([f"ag{i:02}" for i in range(24)]), unique=True))
    return [
        AgentInfo(
            agent_id=i,
            datacenter=draw(st.sampled_from(DCS)),
            node_size=draw(st.sampled_from(("standard", "llm"))),
            gpu=draw(st.booleans()),
            status=draw(st.sampled_from(("online", "online", "online", "stale", "offline"))),
            attested=draw(st.sampled_from((True, True, True, False))),
            draining=draw(st.sampled_from((False, False, False, True))),
            deployments=draw(st.sampled_from(((), (), ("dep-1",), ("dep-2",)))),
            reserved_for=draw(st.sampled_from((None, None, "res-1", "res-2", "dep-1"))),
        )
        for i in ids
    ]


requests = st.builds(
    Request,
    deployment_id=st.sampled_from((None, "dep-1")),
    replicas=st.integers(1, 8),
    constraints=st.builds(
        Constraints,
        datacenter=st.sampled_from((None, *DCS)),
        node_size=st.sampled_from((None, "standard", "llm")),
        gpu=st.booleans(),
        exclude_agents=st.frozensets(st.sampled_from(["ag00", "ag01", "ag02", "zz"])),
    ),
    reservation=st.sampled_from((None, "res-1")),
)


def reference_ranking(req: Request, eligible: Sequence[AgentInfo]) -> list[str]:
    """The ranking rules written the slow, obvious way: greedily take the best next."""
    counts: dict[str, int] = {}
    left = list(eligible)
    order = []
    while left:
        best = min(
            left,
            key=lambda a: (
                req.deployment_id not in a.deployments,
                a.reserved_for is None,
                a.gpu and not req.constraints.gpu,
                counts.get(a.datacenter, 0),
                a.datacenter,
                a.agent_id,
            ),
        )
        left.remove(best)
        counts[best.datacenter] = counts.get(best.datacenter, 0) + 1
        order.append(best.agent_id)
    return order


@settings(max_examples=200, deadline=None)
@given(req=requests, agents=agent_sets(), data=st.data())
def test_same_agents_in_any_order_give_the_same_placement(
    req: Request, agents: list[AgentInfo], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(agents))
    first = place(req, agents)
    assert place(req, shuffled) == first
    assert place(req, iter(shuffled)).to_dict() == first.to_dict()


@settings(max_examples=300, deadline=None)
@given(req=requests, agents=agent_sets())
def test_placement_invariants(req: Request, agents: list[AgentInfo]) -> None:
    result = place(req, agents)
    by_id = {a.agent_id: a for a in agents}
    candidate_ids = [c.agent_id for c in result.candidates]
    rejected_ids = [r.agent_id for r in result.rejected]

    # Every agent is either a candidate or rejected, never both.
    assert sorted(candidate_ids + rejected_ids) == sorted(by_id)
    assert rejected_ids == sorted(rejected_ids)
    # Reasons: non-empty, no repeats, in the fixed order.
    order = list(Reason)
    for rejection in result.rejected:
        indices = [order.index(r) for r in rejection.reasons]
        assert indices and indices == sorted(set(indices))
    # Chosen: distinct, the top of the ranking, as many as fit.
    assert len(set(result.chosen)) == len(result.chosen)
    assert result.chosen == tuple(candidate_ids[: req.replicas])
    assert len(result.chosen) == min(req.replicas, len(candidate_ids))
    assert result.shortfall == req.replicas - len(result.chosen) >= 0
    assert result.placeable is (result.shortfall == 0)
    assert [c.rank for c in result.candidates] == list(range(1, len(candidate_ids) + 1))
    # GPU safety, and the other hard constraints, hold for every candidate.
    c = req.constraints
    for agent_id in candidate_ids:
        a = by_id[agent_id]
        assert a.gpu or not c.gpu
        assert a.status == "online" and a.attested and not a.draining
        assert c.datacenter in (None, a.datacenter) and c.node_size in (None, a.node_size)
        assert agent_id not in c.exclude_agents
        assert set(a.deployments) <= {req.deployment_id}
        assert a.reserved_for in (None, req.reservation, req.deployment_id)
    # The ranking is exactly the documented rules.
    assert candidate_ids == reference_ranking(req, [by_id[i] for i in candidate_ids])
    keys = [
        (not x.existing_replica, not x.reserved, x.spare_gpu, x.spread_round, x.datacenter)
        for x in result.candidates
    ]
    assert keys == sorted(keys)


@settings(max_examples=100, deadline=None)
@given(req=requests, agents=agent_sets())
def test_existing_replicas_are_never_moved_while_they_stay_eligible(
    req: Request, agents: list[AgentInfo]
) -> None:
    result = place(req, agents)
    existing = [c.agent_id for c in result.candidates if c.existing_replica]
    assert result.chosen[: len(existing)] == tuple(existing[: req.replicas])


@settings(max_examples=100, deadline=None)
@given(
    dcs=st.lists(st.sampled_from(DCS), min_size=1),
    replicas=st.integers(1, 8),
)
def test_free_equal_agents_spread_evenly(dcs: list[str], replicas: int) -> None:
    agents = [agent(f"ag{i:02}", datacenter=dc) for i, dc in enumerate(dcs)]
    result = place(Request("dep-1", replicas, Constraints()), agents)
    per_dc = {dc: sum(by == dc for by in dcs) for dc in set(dcs)}
    counts = {dc: 0 for dc in per_dc}
    for chosen in result.chosen:
        counts[next(a.datacenter for a in agents if a.agent_id == chosen)] += 1
    # No datacenter gets a second replica while another with room has fewer.
    for dc, n in counts.items():
        for other, m in counts.items():
            if m < per_dc[other]:
                assert n <= m + 1, (dc, other, counts)


def test_placement_is_a_frozen_value() -> None:
    result = place(request(), [agent()])
    assert isinstance(result, Placement)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.placeable = False  # type: ignore[misc]


# -- why a deployment cannot be placed (its ``error``) ------------------------------


def test_why_with_no_agents_at_all() -> None:
    p = place(request(2), [])
    assert not p.placeable and p.reason_counts() == {}
    assert p.why() == "no agents connected"


def test_why_counts_each_reason_in_reason_order() -> None:
    p = place(request(3), [
        agent("a1"),
        agent("a2", status="offline", deployments=("dep-9",)),
        agent("a3", deployments=("dep-9",)),
        agent("a4", draining=True, attested=False),
    ])
    assert p.shortfall == 2
    assert p.reason_counts() == {"OFFLINE": 1, "NOT_ATTESTED": 1, "DRAINING": 1, "BUSY": 2}
    assert p.why() == ("1 candidate, 3 agents rejected "
                       "(OFFLINE: 1, NOT_ATTESTED: 1, DRAINING: 1, BUSY: 2)")


def test_why_without_rejections() -> None:
    p = place(request(3), [agent("a1"), agent("a2")])
    assert p.why() == "2 candidates"
    assert place(request(1), [agent("a1", status="stale")]).why() == \
        "0 candidates, 1 agent rejected (STALE: 1)"
