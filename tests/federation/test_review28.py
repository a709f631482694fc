"""Review 28 (attacker review of fedtrust): a dc that stops between admitting a carried
release and writing down that it came from the master must still let the master
withdraw it; a master intent with a malformed ``generation`` that the dc's closed policy
refuses must not take the dc's link loop down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.cp.releases import check_admission
from ee.federation.trust import DATACENTER_CLOSED
from ee.federation.wire import Snapshot, seal

from .test_fedtrust import COMPOSE, Held, _dc, _spooled, body, manifest
from .test_refusals import LABEL, enrolled_home


async def test_a_stop_after_admitting_a_carried_release_keeps_it_the_masters(
        tmp_path: Path) -> None:
    home, master_key = await enrolled_home(tmp_path)
    ours = Ed25519PrivateKey.generate()
    good = body(manifest(), ours)
    ident = check_admission(good, [("rel", ours.public_key())]).ident
    events: list[tuple[str, str, Any]] = []
    held = Held()  # the dc CP's kept releases (on disk: they survive the stop)

    def snap(version: int, releases: list[dict[str, Any]]) -> str:
        return seal(Snapshot("snapshot", version, 0.0, {"policy": {}, "releases": releases}),
                    master_key)

    class Stops(Held):
        async def admit(self, release: Any) -> bool:
            await super().admit(release)  # kept on disk, then the process stops
            raise KeyboardInterrupt  # (power, kill -9) before anything else is written

    fed = _dc(home, events, held, ours)
    try:
        stops = Stops()
        stops.releases = held.releases
        fed.release_hooks = attrs.evolve(fed.release_hooks, admit=stops.admit)
        with pytest.raises(KeyboardInterrupt):
            await fed.offer_snapshot(snap(1, [good]))
        assert ident in held.releases  # admitted before the stop
        fed.close()
        # Restarted: the master offers the same version again, then withdraws it.
        fed = _dc(home, events, held, ours)
        assert await fed.offer_snapshot(snap(1, [good])) is None
        assert fed.from_master == {ident}
        assert await fed.offer_snapshot(snap(2, [])) is None
        assert ident not in held.releases  # not left trusted here for ever
    finally:
        fed.close()


@pytest.mark.parametrize("generation", ["7x", [1], {"a": 1}, 1.5e300, True, -3])
async def test_a_malformed_generation_of_a_closed_intent_is_no_crash(
        tmp_path: Path, generation: object) -> None:
    home, master_key = await enrolled_home(tmp_path)
    events: list[tuple[str, str, Any]] = []
    version = {"version": "1", "compose_hash": "ab", "compose": COMPOSE,
               "expose_port": 80, "health_path": "/"}
    intent = {"app": "acct.web", "datacenter": LABEL, "replicas": 1, "desired": "running",
              "version": version, "constraints": {}, "generation": generation}
    text = seal(Snapshot("snapshot", 1, 0.0, {"policy": {"accept_deployments": False},
                                              "deployments": {"dep-new": intent}}),
                master_key)
    fed = _dc(home, events, Held(), Ed25519PrivateKey.generate())
    try:
        assert await fed.offer_snapshot(text) is None
        [said] = _spooled(home, "placement")  # the master still learns it is refused
        assert said["deployment_id"] == "dep-new"
        assert said["reasons"] == {DATACENTER_CLOSED: 1} and said["generation"] == 0
    finally:
        fed.close()


async def test_a_withdrawal_reaches_the_dcs_while_the_master_holds_too_many(
        tmp_path: Path) -> None:
    from ee.federation.trust import MAX_RELEASES

    from .test_fedtrust import _master

    events: list[tuple[str, str, Any]] = []
    fed = _master(tmp_path, events)
    key = Ed25519PrivateKey.generate()
    bodies = sorted((body(manifest(f"{i:02x}" * 48), key) for i in range(MAX_RELEASES + 2)),
                    key=lambda b: b["manifest"]["image"]["measurements"]["rtmr1"])
    carried = bodies[:MAX_RELEASES]
    assert await fed.set_releases(carried) is not None
    assert await fed.set_releases(bodies) is None  # too many: not carried (an event)
    # The master's operator withdraws a carried release (65 others stay admitted, still
    # too many to carry): the dcs must stop trusting it all the same.
    withdrawn = carried[0]
    snap = await fed.set_releases(bodies[1:])
    assert snap is not None and snap.version == 2
    assert snap.desired["releases"] == carried[1:]  # what was carried, less the withdrawn
    assert await fed.set_releases(bodies[1:]) is None  # no new version for the same set
    assert withdrawn not in fed.desired.desired["releases"]


async def test_a_link_drop_while_admitting_a_carried_release_keeps_it_the_masters(
        tmp_path: Path) -> None:
    import trio.lowlevel

    home, master_key = await enrolled_home(tmp_path)
    ours = Ed25519PrivateKey.generate()
    good = body(manifest(), ours)
    ident = check_admission(good, [("rel", ours.public_key())]).ident
    held = Held()

    def snap(version: int, releases: list[dict[str, Any]]) -> str:
        return seal(Snapshot("snapshot", version, 0.0, {"policy": {}, "releases": releases}),
                    master_key)

    fed = _dc(home, [], held, ours)
    try:
        with trio.CancelScope() as link:  # the uplink's nursery, cancelled by a drop
            async def admit(release: Any) -> bool:
                await held.admit(release)
                link.cancel()
                await trio.lowlevel.checkpoint()  # the next checkpoint of the apply
                return True

            fed.release_hooks = attrs.evolve(fed.release_hooks, admit=admit)
            await fed.offer_snapshot(snap(1, [good]))
        assert link.cancelled_caught and ident in held.releases
        # Reconnected, same process: the master offers the version again, then withdraws.
        fed.release_hooks = attrs.evolve(fed.release_hooks, admit=held.admit)
        assert await fed.offer_snapshot(snap(1, [good])) is None
        assert await fed.offer_snapshot(snap(2, [])) is None
        assert ident not in held.releases
    finally:
        fed.close()
