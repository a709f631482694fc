"""Attacker's review of federation (issue 15): what a compromised dc CP, or a tenant,
could do with fedrpc and fedview, each pinned by a test that fails without its check.

- A signed frame with an unbounded number (10**400 structures as an int) crashed the
  dc's actor a second later (its metric's float conversion): refused as ``bad_frame``.
- A dc could report any number of agents (all kept in the master's memory): capped.
- A replica the dc reports running on an agent it reports offline (or no longer
  reports) was shown running and billed: shown failed, not billed.
- A dc reporting more running replicas than the intent asks for (or replicas of a
  stopped deployment) billed the tenant for each: billing caps the dc's word.
- A dc's logs answer of another shape 500ed the tenant route: 502 ``bad_response``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ee.cp.billing import _dc_sightings
from ee.cp.errors import ApiError
from ee.federation import master as master_mod
from ee.federation import routes
from ee.federation.master import FederatedDatacenterActor, FederationSettings, MasterFederation
from ee.federation.placement import Outcome, ReportedReplica, shown_replicas
from ee.federation.wire import Ack, WireError, up_frame
from ee.runtime import Registry

from .fedkit import event_log, refused
from .test_refusals import LABEL, _agent, _events, link, rogue_master

BIG = 10**400


def _fed(tmp: Path) -> MasterFederation:
    return MasterFederation(tmp, "c1", FederationSettings(), registry=Registry(),
                            emit=lambda *_: None, metrics=CollectorRegistry())


# ---- numbers in signed frames ---------------------------------------------------------

def test_frames_refuse_unbounded_numbers() -> None:
    hello = {"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
             "snapshot_version": 0, "spool_depth": 0}
    up_frame(hello)
    for field in ("first_unacked", "next_seq", "snapshot_version", "spool_depth"):
        with pytest.raises(WireError) as err:
            up_frame({**hello, field: BIG})
        assert err.value.code == "bad_frame"
    events = _events((1, {"ag-1": _agent()}))
    up_frame(events)
    for bad in ({"last_seq": BIG}, {"sent_at": float("inf")}, {"sent_at": float("nan")},
                {"events": [{**events["events"][0], "at": float("-inf")}]},
                {"events": [{**events["events"][0], "seq": BIG}]}):
        with pytest.raises(WireError):
            up_frame({**events, **bad})


async def test_huge_sequence_is_refused_and_the_dc_actor_lives(tmp_path: Path) -> None:
    """Before: the hello was acked, and the actor's metric tick crashed it (OverflowError)."""
    with trio.fail_after(90):
        async with rogue_master(tmp_path) as (m, home):
            async with event_log(m) as seen, link(home) as (send, recv):
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1,
                            "next_seq": BIG, "snapshot_version": 0, "spool_depth": BIG})
                answer = await recv()
                assert answer["type"] == "refused" and answer["code"] == "bad_frame", answer
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert await recv() == {"type": "ack", "upto": 0}
                await send(_events((1, {"ag-1": _agent()}), last=BIG))
                assert (await recv())["code"] == "bad_frame"
                await trio.sleep(1.5)  # the actor's metric tick ran
                await send(_events((1, {"ag-1": _agent()})))
                assert await recv() == {"type": "ack", "upto": 1}  # not hello_required
                view = (await m.datacenters())[LABEL]
                assert view["applied_seq"] == 1 and view["agents"]["total"] == 1
            assert refused(seen, "bad_frame")


async def test_snapshot_applied_version_bounded(tmp_path: Path) -> None:
    actor = FederatedDatacenterActor(LABEL, _fed(tmp_path))
    assert actor._apply("snapshot_applied", {"version": BIG}) is not None
    assert actor._apply("snapshot_applied", {"version": True}) is not None
    assert actor._apply("snapshot_applied", {"version": 3}) is None
    assert actor.snapshot_version == 3


# ---- how many agents a dc may report --------------------------------------------------

async def test_agents_per_dc_are_capped(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(master_mod, "MAX_AGENTS_PER_DC", 3)
    actor = FederatedDatacenterActor(LABEL, _fed(tmp_path))
    four = {f"ag-{i}": _agent() for i in range(4)}
    refusal = actor._apply("resync", {"agents": four})
    assert refusal is not None and refusal.code == "too_many_agents"
    assert actor.agents == {}
    assert actor._apply("resync", {"agents": dict(list(four.items())[:3])}) is None
    refusal = actor._apply("agents", {"agents": {"ag-3": _agent()}})
    assert refusal is not None and refusal.code == "too_many_agents"
    assert sorted(actor.agents) == ["ag-0", "ag-1", "ag-2"]
    # One leaves as another comes: still three, applied.
    assert actor._apply("agents", {"agents": {"ag-0": None, "ag-3": _agent()}}) is None
    assert sorted(actor.agents) == ["ag-1", "ag-2", "ag-3"]
    assert actor._apply("agents", {"agents": {"ag-1": _agent()}}) is None  # an update


# ---- what the master shows and bills of a dc's word -----------------------------------

def _outcome(*agents: str) -> Outcome:
    return Outcome("dep-1", "running", {}, len(agents), None, "1", tuple(
        ReportedReplica(a, "running", "1", "h1", node_size="standard") for a in agents))


def test_replica_on_an_offline_agent_is_not_running() -> None:
    views = {"ag-1": {**_agent(), "status": "online"}, "ag-2": {**_agent(), "status": "offline"},
             "ag-4": {**_agent(), "status": "stale"}}
    shown = {r["agent_id"]: r for r in shown_replicas(
        _outcome("ag-1", "ag-2", "ag-3", "ag-4"), {"1": "h1"}, views)}
    assert shown["ag-1"]["state"] == "running" and shown["ag-4"]["state"] == "running"
    for gone in ("ag-2", "ag-3"):  # offline, and no longer reported at all
        assert shown[gone]["state"] == "failed"
        assert shown[gone]["error"].startswith("agent_offline")
    # The tenant asked for "small": a replica the dc reports on "standard" is not its.
    sized = shown_replicas(_outcome("ag-1"), {"1": "h1"}, views, "small")
    assert sized[0]["state"] == "failed"
    assert sized[0]["error"].startswith("node_size_mismatch")
    assert shown_replicas(_outcome("ag-1"), {"1": "h1"}, views, "standard")[0]["state"] \
        == "running"


async def test_master_view_checks_the_dcs_agents(tmp_path: Path) -> None:
    """The view (what billing reads) uses the dc actor's agents as published."""
    fed = _fed(tmp_path)
    actor = FederatedDatacenterActor(LABEL, fed)
    actor._publish_capacity()
    assert actor._apply("resync", {"agents": {"ag-1": _agent(), "ag-2": _agent()}}) is None
    doc = {"app": "acct-1.web", "datacenter": LABEL, "desired": "running", "replicas": 2,
           "version": {"version": "1", "compose_hash": "h1"}, "generation": 0,
           "history": [], "created_at": 0.0}
    fed.desired = attrs_evolve_desired(fed, {"dep-1": doc})
    fed.outcomes["dep-1"] = (LABEL, _outcome("ag-1", "ag-2"))
    view = fed.view("acct-1.web", "dep-1")
    assert view is not None and [r["state"] for r in view["replicas"]] == ["running"] * 2
    assert actor._apply("agents", {"agents": {"ag-2": {**_agent(), "status": "offline"}}}) \
        is None
    view = fed.view("acct-1.web", "dep-1")
    assert view is not None
    assert [r["state"] for r in view["replicas"]] == ["running", "failed"]
    actor.degraded = False  # as when the dc is heard
    actor._publish_capacity()
    view = fed.view("acct-1.web", "dep-1")
    assert view is not None and not view["federated"]["degraded"]
    assert len(_dc_sightings("dep-1", "acct-1", view, {}, set())) == 1
    fed.desired = attrs_evolve_desired(fed, {"dep-1": {**doc, "constraints": {
        "node_size": "gpu-large", "gpu": False, "exclude_agents": []}}})
    view = fed.view("acct-1.web", "dep-1")  # not the size asked for: nothing billed
    assert view is not None and _dc_sightings("dep-1", "acct-1", view, {}, set()) == []


def attrs_evolve_desired(fed: MasterFederation, intents: dict[str, Any]) -> Any:
    import attrs

    return attrs.evolve(fed.desired, desired={**fed.desired.desired, "deployments": intents})


def _dep(n: int, wanted: int, **extra: Any) -> dict[str, Any]:
    return {"desired": "running", "replicas_wanted": wanted, "update": None,
            "federated": {"datacenter": LABEL, "degraded": False},
            "replicas": [{"agent_id": f"ag-{i}", "state": "running", "node_size": "standard"}
                         for i in range(n)], **extra}


def test_billing_caps_the_dcs_word() -> None:
    def billed(dep: dict[str, Any]) -> int:
        return len(_dc_sightings("dep-1", "acct-1", dep, {}, set()))

    assert billed(_dep(1, 1)) == 1
    assert billed(_dep(5, 1)) == 1  # four replicas the tenant never asked for
    assert billed(_dep(5, 2, update={"state": "rolling"})) == 3  # the surge one
    assert billed(_dep(5, 2, update={"state": "done"})) == 2
    assert billed(_dep(2, 2, desired="stopped")) == 0


# ---- a dc's logs answer ---------------------------------------------------------------

async def test_malformed_logs_answer_is_a_502(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    answers: list[dict[str, Any]] = []

    async def deployment_logs(key: str, dep_id: str, args: dict[str, Any]) -> dict[str, Any]:
        return {**answers[-1], "datacenter": LABEL}

    fed.deployment_logs = deployment_logs  # type: ignore[method-assign]
    fed.intent_datacenter = lambda _: LABEL  # type: ignore[method-assign]

    class Cp:
        federation = fed
        deployment_index = {"dep-1": "acct-1.web"}

    async def ask() -> dict[str, Any] | None:
        return await routes.tenant_logs(Cp(), "acct-1", "dep-1", tail=10, since=None,
                                        service=None, follow=False)

    answers.append({"replicas": [{"agent_id": "ag-1", "lines": [{"text": "x"}]}]})
    assert await ask() is not None
    assert await routes.tenant_logs(Cp(), "acct-2", "dep-1", tail=10, since=None,
                                    service=None, follow=False) is None  # not theirs
    for bad in ({"replicas": None}, {"replicas": {"a": 1}}, {"replicas": ["x"]},
                {"replicas": [{"lines": "x"}]}, {"replicas": [{"lines": [1]}]}):
        answers.append(bad)
        with pytest.raises(ApiError) as err:
            await ask()
        assert err.value.status == 502 and err.value.code == "bad_response", bad


# ---- the signed desired state's size --------------------------------------------------

async def test_an_intent_that_would_overflow_the_snapshot_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every intent carries its version spec (a build context may be 16 MiB); one past
    the link's frame cap made the snapshot unreceivable by every dc."""
    from ee.federation.placement import DcCapacity
    from ee.placement import Constraints, Request, place

    monkeypatch.setattr(master_mod, "MAX_SNAPSHOT_BYTES", 20_000)
    fed = _fed(tmp_path)
    fed.enrolled = {LABEL: None}  # type: ignore[dict-item]
    fed.capacity[LABEL] = DcCapacity(LABEL, False, {"standard": 5})
    direct = place(Request(deployment_id=None, replicas=1, constraints=Constraints()), [])
    small = {"version": "1", "compose": "x", "compose_hash": "h1"}
    big = {"version": "2", "compose": "x", "build_context": "A" * 30_000, "compose_hash": "h2"}
    got = await fed.place("acct-1.web", "dep-1", small, 1, Constraints(), direct)
    assert got == {"deployment_id": "dep-1", "datacenter": LABEL}
    version = fed.desired.version
    got = await fed.place("acct-1.web", "dep-2", big, 1, Constraints(), direct)
    assert got is not None and got["error"] == "not_placeable"
    assert got["placement"]["datacenters"] == {LABEL: "SNAPSHOT_FULL"}
    assert fed.desired.version == version and "dep-2" not in fed._intents()
    assert await fed.update("acct-1.web", "dep-1", big, None) == {"error": "snapshot_full"}
    assert fed.desired.version == version
    assert fed._intents()["dep-1"]["version"] == small


# ---- a dc naming another's agents -----------------------------------------------------

async def test_a_dc_cannot_make_another_dcs_agents_present() -> None:
    """``present`` closes open runs of agents not sighted: dc A naming dc B's (degraded)
    agent, or a direct agent away, closed those runs (their gap windows lost)."""
    from ee.actors.app import GetDeployment
    from ee.cp.billing import cp_sightings

    def fed_dep(label: str, degraded: bool, *replicas: tuple[str, str]) -> dict[str, Any]:
        return {**_dep(0, 1), "federated": {"datacenter": label, "degraded": degraded},
                "replicas": [{"agent_id": a, "state": st, "node_size": "standard"}
                             for a, st in replicas]}

    deps = {"dep-a": fed_dep("sim:a", False, ("ag-b", "failed"), ("ag-d", "failed"),
                             ("ag-a", "running")),
            "dep-b": fed_dep("sim:b", True, ("ag-b", "running")),
            "dep-d": {"replicas": [{"agent_id": "ag-d", "state": "running"}]}}

    class Ref:
        def __init__(self, name: str) -> None:
            self.name = name

        async def ask(self, msg: GetDeployment, timeout: float) -> dict[str, Any]:
            return deps[msg.deployment_id]

    class Reg:
        def __contains__(self, name: str) -> bool:
            return True

        def ref(self, name: str) -> Ref:
            return Ref(name)

    async def none() -> list[dict[str, Any]]:
        return []

    index = {"dep-a": "acct-1.web", "dep-b": "acct-2.web", "dep-d": "acct-3.web"}
    sightings, present = await cp_sightings(Reg(), index, none, none, {})
    assert present == {"ag-a"}  # not dc b's agent, not the direct one away
    assert [(s.deployment_id, s.replica_id) for s in sightings] == [("dep-a", "ag-a")]


# ---- a dc's error codes ---------------------------------------------------------------

async def test_a_dcs_error_code_is_one_of_the_known(
        autojump_clock: trio.testing.MockClock) -> None:
    """The tenant's answer carries the dc's code: one it made up (e.g. a billing one)
    becomes ``dc_error``; a known one keeps its status."""
    import json

    from ee.federation.rpc import MasterRpc, RpcError
    from ee.federation.wire import Response

    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    rpc = MasterRpc(lambda f: json.dumps({"id": f.id}), lambda *a: None, timeout_s=10)
    rpc.link_up(LABEL, send)
    for said, status, code in (("payment_required", 502, "dc_error"),
                               ("not_placed_here", 409, "not_placed_here")):
        async with trio.open_nursery() as nursery:
            async def answer(said: str) -> None:
                await trio.testing.wait_all_tasks_blocked()
                rid = json.loads(sent[-1])["id"]
                assert rpc.answered(LABEL, Response("response", LABEL, rid, said, "x"),
                                    100) is None
            nursery.start_soon(answer, said)
            with pytest.raises(RpcError) as err:
                await rpc.ask(LABEL, "logs", deployment_id="dep-1")
        assert (err.value.status, err.value.code) == (status, code)


# ---- billing at a dc CP ---------------------------------------------------------------

async def test_a_dc_does_not_bill_what_it_runs_for_the_master() -> None:
    """The dc's own meter charged its master's intents to the reserved account
    (``federated``): a second ledger's charge, a debt, and after the grace period every
    master deployment at that dc suspended."""
    from ee.actors.app import GetDeployment
    from ee.cp.billing import cp_sightings
    from ee.federation.reconcile import local_key

    running = {"replicas": [{"agent_id": "ag-1", "state": "running"}]}

    class Ref:
        async def ask(self, msg: GetDeployment, timeout: float) -> dict[str, Any]:
            return running

    class Reg:
        def __contains__(self, name: str) -> bool:
            return True

        def ref(self, name: str) -> Ref:
            return Ref()

    async def views() -> list[dict[str, Any]]:
        return [{"agent_id": "ag-1", "status": "online", "datacenter": LABEL,
                 "node_size": "standard", "vm_name": "vm-1"}]

    async def none() -> list[dict[str, Any]]:
        return []

    index = {"dep-m": local_key("acct-1.web"), "dep-own": "acct-2.web"}
    sightings, _ = await cp_sightings(Reg(), index, views, none, {})
    assert [(s.deployment_id, s.account_id) for s in sightings] == [("dep-own", "acct-2")]


# ---- the bytes of an agent's view -----------------------------------------------------

async def test_agent_views_are_bounded(tmp_path: Path) -> None:
    """A dc's agent view kept whatever fields it carried, and any number of deployments:
    at 20,000 agents, gigabytes of the master's memory."""
    actor = FederatedDatacenterActor(LABEL, _fed(tmp_path))
    padded = {**_agent(), "junk": "x" * 100_000}
    assert actor._apply("resync", {"agents": {"ag-1": padded}}) is None
    assert "junk" not in actor.agents["ag-1"]
    assert actor._apply("agents", {"agents": {"ag-2": padded}}) is None
    assert set(actor.agents["ag-2"]) == set(_agent())
    many = {**_agent(), "deployments": {f"dep-{i}": "running" for i in range(33)}}
    refusal = actor._apply("agents", {"agents": {"ag-3": many}})
    assert refusal is not None and refusal.code == "bad_frame"
    assert "ag-3" not in actor.agents


async def test_an_event_that_breaks_apply_is_refused_and_consumed(tmp_path: Path) -> None:
    """Any exception applying a signed event refuses that event (bad_frame) and moves
    on; before, the actor crashed, and — restarted with no sequence — was sent the same
    event again, crashing under the supervisor it shares with every dc's link."""
    actor = FederatedDatacenterActor(LABEL, _fed(tmp_path))
    actor.applied = 0

    def broken(kind: str, data: dict[str, Any]) -> None:
        raise TypeError("object of type 'int' has no len()")

    actor._apply = broken  # type: ignore[method-assign]
    frame = up_frame(_events((1, {"ag-1": _agent()}), (2, {"ag-2": _agent()})))
    out = actor._events(frame, 0.0)  # type: ignore[arg-type]
    codes = [getattr(f, "code", None) for f in out]
    assert codes.count("bad_frame") == 2 and actor.applied == 2
    assert out[-1] == Ack("ack", 2)


async def test_a_rejoin_closes_the_link_of_the_old_keys(tmp_path: Path) -> None:
    """Re-enrolling a dc (its keys leaked, say) ends the link opened with the old ones at
    once; before, it went on delivering frames signed with the old key."""
    from functools import partial

    import trio_websocket

    from ee.federation.dc import enroll

    from .fedkit import join_token

    with trio.fail_after(90):
        async with rogue_master(tmp_path) as (m, home), link(home) as (send, recv):
            await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                        "snapshot_version": 0, "spool_depth": 0})
            assert await recv() == {"type": "ack", "upto": 0}
            token = await join_token(m, LABEL)  # bound: a re-join is allowed
            await trio.to_thread.run_sync(partial(
                enroll, tmp_path / "new-keys", m.http, LABEL, token, dev=True))
            with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(10):
                await send(_events((1, {"ag-1": _agent()})))
                await recv()


async def test_each_dc_is_sent_only_its_own_intents(tmp_path: Path) -> None:
    """The snapshot a dc's link carries names only the deployments placed in that dc: a
    compromised dc reads no other dc's tenants' compose, build context or env values."""
    from ee.federation.wire import Snapshot, open_envelope

    fed = _fed(tmp_path)
    secret = {"version": "1", "compose": "services: {}", "env": {"TOKEN": "dc-b-only"}}
    fed.desired = Snapshot("snapshot", 7, 0.0, {"policy": {"p": 1}, "deployments": {
        "dep-a": {"app": "t.web", "datacenter": LABEL, "version": {"version": "1"}},
        "dep-b": {"app": "u.db", "datacenter": "sim:dc-b", "version": secret}}})
    master_key = fed.key.public_key()
    for_a = open_envelope(fed.snapshot_frame(LABEL), master_key)  # signed as sent
    assert for_a["version"] == 7 and for_a["desired"]["policy"] == {"p": 1}
    assert set(for_a["desired"]["deployments"]) == {"dep-a"}
    assert "dc-b-only" not in fed.snapshot_frame(LABEL)
    assert set(open_envelope(fed.snapshot_frame("sim:dc-b"), master_key)["desired"][
        "deployments"]) == {"dep-b"}
    assert set(open_envelope(fed.snapshot_frame(), master_key)["desired"][
        "deployments"]) == {"dep-a", "dep-b"}  # the admin route's: whole
