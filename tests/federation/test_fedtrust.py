"""What the master's signed snapshot carries besides intents: its admitted releases (each
dc admits only those its own bundle's release keys signed, and withdraws only those it
got from the master) and a strictly checked policy (``accept_deployments``, applied at
the dc). Pure decisions, then a dc's apply path in process (ee.federation.trust)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from ee.actors.directory import AgentDirectory
from ee.cp.releases import AdmittedRelease, check_admission
from ee.federation.dc import DcFederation
from ee.federation.master import FederationSettings
from ee.federation.reconcile import LocalApps
from ee.federation.trust import (
    DATACENTER_CLOSED,
    MAX_POLICY_BYTES,
    MAX_RELEASES,
    FederationPolicy,
    PolicyError,
    ReleaseHooks,
    carried_error,
    carried_releases,
    check_carried,
    closed_intents,
    desired_policy,
    read_policy,
    release_sync,
)
from ee.federation.wire import Snapshot, seal
from ee.protocol.signing import sign_document
from ee.runtime import Registry

from .test_refusals import LABEL, enrolled_home

SIZES = ("tiny", "standard", "llm")
COMPOSE = "services:\n  web:\n    image: nginx\n"


def manifest(rtmr1: str = "a1" * 48, name: str = "easyenclave") -> dict[str, Any]:
    return {"name": name, "version": "2.0.0", "git_commit": "c" * 40,
            "image": {"measurements": {"rtmr1": rtmr1, "rtmr2": "b2" * 48,
                                       "pcr4": "e" * 64, "pcr9": "f" * 64}}}


def body(doc: dict[str, Any], key: Ed25519PrivateKey, node_size: str = "standard"
         ) -> dict[str, Any]:
    return {"manifest": doc, "signature": sign_document(doc, key).hex(),
            "node_size": node_size}


# ---- policy -------------------------------------------------------------------------


def test_policy_is_strict_at_the_master_and_lenient_to_a_newer_master_at_the_dc() -> None:
    assert desired_policy({"policy": {}}) == FederationPolicy(accept_deployments=True)
    assert desired_policy({"policy": {"accept_deployments": False}}).accept_deployments \
        is False
    for doc, field in (({}, "policy"),  # PUT {}: no silent reset
                       ({"policy": {"max_replicas": 3}}, "policy.max_replicas"),
                       ({"policy": {"accept_deployments": "no"}},
                        "policy.accept_deployments"),
                       ({"policy": {"accept_deployments": 1}}, "policy.accept_deployments"),
                       ({"policy": [], }, "policy"),
                       ({"policy": {}, "extra": 1}, "extra"),
                       ({"policy": {"x" * 10: "y" * MAX_POLICY_BYTES}}, "policy")):
        with pytest.raises(PolicyError) as refused:
            desired_policy(doc)
        assert refused.value.field == field, doc
    # The dc skips a field it does not know (a newer master's), never a known one's type.
    assert read_policy({"later": 1, "accept_deployments": False}, strict=False) \
        == FederationPolicy(False)
    with pytest.raises(PolicyError):
        read_policy({"accept_deployments": "false"}, strict=False)


def test_closed_intents() -> None:
    def doc(dc: str, desired: str = "running") -> dict[str, Any]:
        return {"datacenter": dc, "desired": desired}

    desired = {"deployments": {"new": doc(LABEL), "runs": doc(LABEL), "other": doc("x"),
                               "stopped": doc(LABEL, "stopped")}}
    closed = FederationPolicy(accept_deployments=False)
    assert closed_intents(desired, LABEL, closed, {"runs"}, frozenset()) == {"new"}
    # Open again: what it refused stays refused while it names this dc; new ones run.
    assert closed_intents(desired, LABEL, FederationPolicy(), {"runs"},
                          frozenset({"new", "gone"})) == {"new"}
    assert closed_intents(desired, LABEL, FederationPolicy(), set(), frozenset()) == set()


# ---- releases -----------------------------------------------------------------------


def test_carried_releases_are_checked_with_the_dc_keys() -> None:
    ours, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pinned = [("rel", ours.public_key())]
    good, untrusted = body(manifest(), ours), body(manifest("cc" * 48), rogue)
    unknown_size = body(manifest("dd" * 48), ours, node_size="huge")
    offered, refused = check_carried([good, untrusted, unknown_size, "junk"], pinned, SIZES)
    assert [r.body for r in offered.values()] == [good]
    assert [r.code for r in refused] == ["release_untrusted", "bad_release", "bad_release"]
    assert "not a node size" in refused[1].reason
    # A dc that pins no key admits nothing the master carries.
    offered, refused = check_carried([good], [], SIZES)
    assert offered == {} and refused[0].code == "release_untrusted"
    assert check_carried(None, pinned, SIZES) == ({}, [])
    offered, refused = check_carried([good] * (MAX_RELEASES + 1), pinned, SIZES)
    assert offered == {} and refused[0].code == "too_many_releases"
    assert carried_error([good] * (MAX_RELEASES + 1)) is not None
    assert carried_error([good]) is None


def test_release_sync_withdraws_only_what_came_from_the_master() -> None:
    key = Ed25519PrivateKey.generate()
    pinned = [("rel", key.public_key())]
    a, b, local = (check_admission(body(manifest(r * 48), key), pinned)
                   for r in ("a1", "b1", "c1"))
    first = release_sync({a.ident: a, local.ident: local}, {local.ident}, frozenset())
    assert first.admit == (a,) and first.withdraw == ()
    assert first.from_master == {a.ident}  # the local one stays the operator's
    then = release_sync({b.ident: b}, {a.ident, local.ident}, first.from_master)
    assert then.admit == (b,) and then.withdraw == (a.ident,)
    assert then.from_master == {b.ident}
    # Withdrawn here by hand meanwhile: nothing to withdraw, and it is no longer held.
    gone = release_sync({}, {local.ident}, frozenset({b.ident}))
    assert gone.withdraw == () and gone.from_master == frozenset()
    assert carried_releases([b, a]) == [dict(r.body) for r in sorted(
        (a, b), key=lambda r: r.ident)]


# ---- a dc's apply path (in process) -------------------------------------------------


class Held:
    """The dc CP's admitted releases as ``ControlPlane.admit_release`` keeps them."""

    def __init__(self) -> None:
        self.releases: dict[str, AdmittedRelease] = {}

    async def admit(self, release: AdmittedRelease) -> bool:
        if release.ident in self.releases:
            return False
        self.releases[release.ident] = release
        return True

    async def withdraw(self, ident: str) -> AdmittedRelease | None:
        return self.releases.pop(ident, None)


def _dc(home: Path, events: list[tuple[str, str, Any]], held: Held, key: Ed25519PrivateKey,
        index: dict[str, str] | None = None, created: list[str] | None = None
        ) -> DcFederation:
    async def create_app(app_key: str, _spec: dict[str, Any]) -> dict[str, Any] | None:
        return None

    fed = DcFederation(home, LABEL, FederationSettings(), directory=AgentDirectory(),
                       emit=lambda k, s, d: events.append((k, s, d)),
                       metrics=CollectorRegistry(),
                       local=LocalApps(create_app, Registry(), index if index is not None
                                       else {}))
    fed.release_hooks = ReleaseHooks([("rel", key.public_key())], SIZES,
                                     lambda: held.releases, held.admit, held.withdraw)
    return fed


def _spooled(home: Path, kind: str) -> list[dict[str, Any]]:
    with sqlite3.connect(home / "federation" / "spool.sqlite3") as db:
        rows = db.execute("SELECT kind, data FROM events ORDER BY seq").fetchall()
    return [json.loads(data) for k, data in rows if k == kind]


async def test_dc_applies_carried_releases_with_its_own_keys(tmp_path: Path) -> None:
    home, master_key = await enrolled_home(tmp_path)
    ours, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pinned = [("rel", ours.public_key())]
    events: list[tuple[str, str, Any]] = []
    held = Held()
    local = check_admission(body(manifest("c1" * 48), ours), pinned)
    await held.admit(local)  # the dc's operator admitted it here
    good = body(manifest(), ours)
    untrusted = body(manifest("dd" * 48), rogue)  # the master pins rogue; this dc does not

    def snap(version: int, releases: list[dict[str, Any]]) -> str:
        return seal(Snapshot("snapshot", version, 0.0, {"policy": {}, "releases": releases}),
                    master_key)

    fed = _dc(home, events, held, ours)
    try:
        assert await fed.offer_snapshot(snap(1, [good, untrusted, dict(local.body)])) is None
        ident = check_admission(good, pinned).ident
        assert set(held.releases) == {ident, local.ident}
        refusals = [d for k, _, d in events if k == "federation.refused"]
        assert [d["code"] for d in refusals] == ["release_untrusted"]
        assert "dd" * 4 not in json.dumps(list(held.releases))
        assert fed.snapshot.version == 1  # the rest of the snapshot applied
        assert fed.from_master == {ident}
        # Restarted, the dc still knows which releases came from the master.
        fed.close()
        fed = _dc(home, events, held, ours)
        assert fed.from_master == {ident}
        # The master no longer carries either: only the one it gave is withdrawn.
        assert await fed.offer_snapshot(snap(2, [])) is None
        assert set(held.releases) == {local.ident}
        applied = [d for k, _, d in events if k == "federation.releases_applied"]
        assert applied[-1] == {"admitted": [], "withdrawn": [ident], "refused": 0}
    finally:
        fed.close()


async def test_a_closed_dc_refuses_new_intents_and_keeps_running_ones(tmp_path: Path
                                                                      ) -> None:
    home, master_key = await enrolled_home(tmp_path)
    events: list[tuple[str, str, Any]] = []
    version = {"version": "1", "compose_hash": "ab", "compose": COMPOSE,
               "expose_port": 80, "health_path": "/"}

    def intent(generation: int = 0) -> dict[str, Any]:
        return {"app": "acct.web", "datacenter": LABEL, "replicas": 1, "desired": "running",
                "version": version, "constraints": {}, "generation": generation}

    def snap(n: int, accept: bool, deployments: dict[str, Any]) -> str:
        return seal(Snapshot("snapshot", n, 0.0, {
            "policy": {"accept_deployments": accept}, "deployments": deployments}),
            master_key)

    index = {"dep-runs": "federated.acct.web"}  # placed before the dc was closed
    fed = _dc(home, events, Held(), Ed25519PrivateKey.generate(), index)
    try:
        assert await fed.offer_snapshot(snap(1, False, {"dep-runs": intent(),
                                                        "dep-new": intent(3)})) is None
        assert set(fed.snapshot.desired["deployments"]) == {"dep-runs"}
        [said] = _spooled(home, "placement")
        assert said["deployment_id"] == "dep-new" and said["outcome"] == "unsatisfiable"
        assert said["reasons"] == {DATACENTER_CLOSED: 1} and said["generation"] == 3
        assert fed.status()["desired"]["deployments"].keys() == {"dep-runs"}
        # Restarted: still refused (and not reported twice).
        fed.close()
        fed = _dc(home, events, Held(), Ed25519PrivateKey.generate(), index)
        assert set(fed.snapshot.desired["deployments"]) == {"dep-runs"}
        assert await fed.offer_snapshot(snap(2, True, {"dep-runs": intent(),
                                                       "dep-new": intent(3),
                                                       "dep-later": intent()})) is None
        assert set(fed.snapshot.desired["deployments"]) == {"dep-runs", "dep-later"}
        assert len(_spooled(home, "placement")) == 1
        # Moved away by the master: forgotten, so the same id may come back one day.
        assert await fed.offer_snapshot(snap(3, True, {"dep-runs": intent()})) is None
        assert fed.closed == frozenset()
    finally:
        fed.close()


# ---- the master's side: a new version per change, the snapshot's size cap ----------


def _master(tmp: Path, events: list[tuple[str, str, Any]]) -> Any:
    from ee.federation.master import MasterFederation

    return MasterFederation(tmp, "c1", FederationSettings(), registry=Registry(),
                            emit=lambda k, s, d: events.append((k, s, d)),
                            metrics=CollectorRegistry())


def real_body(key: Ed25519PrivateKey, artifacts: int) -> dict[str, Any]:
    """A release body as `eectl release build --image` makes it (*artifacts* files)."""
    from ee.ctl.release import FileFacts, image_entry, make_manifest

    measured = {"image": "img", "cmdline": "console=ttyS0", "memory_bytes": 4 << 30,
                "kernel_patched": True, "mrtd": None, "rtmr1": "a1" * 48,
                "rtmr2": "b2" * 48, "pcr4": "e" * 64, "pcr9": "f" * 64,
                "events": {"rtmr1": [], "rtmr2": []}}
    doc = make_manifest(name="easyenclave", version="2.0.0", commit="c" * 40,
                        source_date_epoch=1,
                        artifacts={f"dist/file-{i}.whl": FileFacts("0" * 64, 1)
                                   for i in range(artifacts)},
                        image=image_entry({"root_hash": "d" * 64}, measured))
    return body(doc, key)


async def test_master_carries_releases_within_the_snapshot_cap(tmp_path: Path) -> None:
    from ee.federation.master import MAX_SNAPSHOT_BYTES, SNAPSHOT_FULL
    from ee.federation.placement import intent
    from ee.placement import Constraints

    events: list[tuple[str, str, Any]] = []
    fed = _master(tmp_path, events)
    key = Ed25519PrivateKey.generate()
    bodies = [real_body(key, 20)]
    snap = await fed.set_releases(bodies)
    assert snap is not None and snap.version == 1 and snap.desired["releases"] == bodies
    assert await fed.set_releases(bodies) is None  # unchanged: no new version
    # Kept signed: a restarted master carries the same.
    assert _master(tmp_path, events).desired.desired["releases"] == bodies
    # Intents fill the snapshot: a release that would push it over the cap is not
    # carried (an event; the dcs keep the version they run) ...
    filler = "x" * (MAX_SNAPSHOT_BYTES - len(json.dumps(bodies)) - 4000)
    big = {"version": "1", "compose": filler}
    doc = intent("t.web", big, 1, Constraints(), LABEL, created_at=0.0)
    assert await fed._fits("dep-1", doc)
    await fed._set_intent("dep-1", doc)
    assert await fed.set_releases([*bodies, real_body(key, 40)]) is None
    assert fed.desired.version == 2
    assert [d["code"] for k, _, d in events if k == "federation.refused"] == [SNAPSHOT_FULL]
    # ... and a withdrawal (smaller) still goes down.
    assert (await fed.set_releases([])) is not None and fed.desired.version == 3
    # The carried releases count against the intents' budget too: an intent that fits
    # beside no release does not fit beside them.
    grown = {**doc, "version": {**big, "compose": "y" * (MAX_SNAPSHOT_BYTES - 2500)}}
    assert len(json.dumps(bodies)) > 2500
    assert await fed._fits("dep-1", grown)
    await fed._set_intent("dep-1", {**doc, "version": {"version": "1"}})
    assert await fed.set_releases(bodies) is not None
    assert not await fed._fits("dep-1", grown)
