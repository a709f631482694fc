"""The master's history of a dc-placed deployment shows a rollback made by the dc's own
health gate (the update to 2 failed its health checks there; the dc runs 1 again), as a
direct deployment's history does; a dc's timestamp that is not a UTC timestamp adds
nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from ee.federation.master import FederatedDatacenterActor, gate_rollback_eras
from ee.federation.placement import Outcome, ReportedReplica

from .test_refusals import LABEL, _agent
from .test_review_fed import _fed, attrs_evolve_desired

ROLLED_BACK = {"state": "rolled_back", "reason": "update", "from_version": "1",
               "to_version": "2", "started_at": "2026-12-01T10:00:00Z",
               "finished_at": "2026-12-01T10:05:00Z", "error": "health gate: 0 of 1 healthy"}


def _doc() -> dict[str, Any]:
    return {"app": "acct-1.web", "datacenter": LABEL, "desired": "running", "replicas": 1,
            "version": {"version": "2", "compose_hash": "h2"},
            "previous": {"version": "1", "compose_hash": "h1"}, "previous_version": "1",
            "change": "update", "generation": 1, "created_at": 0.0,
            "history": [{"version": "1", "from": 0.0, "to": 3600.0},
                        {"version": "2", "from": 3600.0, "to": None}]}


def _rolled_back(update: dict[str, Any] | None) -> Outcome:
    return Outcome("dep-1", "running", {}, 1, None, "1",
                   (ReportedReplica("ag-1", "running", "1", "h1", node_size="standard"),),
                   update=update, generation=1)


async def test_a_health_gate_rollback_at_the_dc_is_in_the_masters_history(
        tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    actor = FederatedDatacenterActor(LABEL, fed)
    actor._publish_capacity()
    assert actor._apply("resync", {"agents": {"ag-1": _agent()}}) is None
    fed.desired = attrs_evolve_desired(fed, {"dep-1": _doc()})
    fed.outcomes["dep-1"] = (LABEL, _rolled_back(ROLLED_BACK))
    view = fed.view("acct-1.web", "dep-1")
    assert view is not None
    assert (view["version"], view["previous_version"]) == ("1", "2")
    assert view["update"]["state"] == "rolled_back"
    assert view["history"] == [
        {"version": "1", "from": "1970-01-01T00:00:00Z", "to": "1970-01-01T01:00:00Z"},
        {"version": "2", "from": "1970-01-01T01:00:00Z", "to": "2026-12-01T10:05:00Z"},
        {"version": "1", "from": "2026-12-01T10:05:00Z", "to": None}]
    # While the dc has not applied the change yet, nothing is derived.
    fed.outcomes["dep-1"] = (LABEL, attrs.evolve(_rolled_back(ROLLED_BACK), generation=0))
    view = fed.view("acct-1.web", "dep-1")
    assert view is not None and [e["version"] for e in view["history"]] == ["1", "2"]


def test_only_a_utc_timestamp_of_the_dc_enters_the_history() -> None:
    eras = [{"version": "1", "from": "2026-12-01T09:00:00Z", "to": None}]
    for bad in ("yesterday", "2026-12-01T10:05:00+02:00", "2026-12-01T10:05:00Z\nforged",
                None, 5):
        assert gate_rollback_eras(eras, "0", {**ROLLED_BACK, "finished_at": bad}) == eras
    assert gate_rollback_eras(eras, "0", None) == eras
    assert gate_rollback_eras([], "0", ROLLED_BACK) == []
    assert gate_rollback_eras(eras, "1", ROLLED_BACK) == eras  # already on it
