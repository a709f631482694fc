"""Stopped intents shed their workload, so the capped signed desired state does not fill
up with deployments that no longer run (a full one refuses new dc placements for all)."""

from __future__ import annotations

import json

from ee.federation.placement import intent, slimmed
from ee.federation.reconcile import read_intent
from ee.placement import Constraints

LABEL = "sim:dc-a"
BIG = {"version": "1", "compose_hash": "ab" * 32, "compose": "services: {}\n" * 1000,
       "context": "x" * 200_000, "env": {"TOKEN": "secret-value"}, "expose_port": 8080,
       "health_path": "/health"}


def test_a_stopped_intent_keeps_only_what_its_view_and_stop_need() -> None:
    doc = intent("acct.web", BIG, 2, Constraints(), LABEL)
    assert slimmed(doc) is None  # running: untouched
    stopped = {**doc, "desired": "stopped"}
    slim = slimmed(stopped)
    assert slim is not None
    assert slim["version"] == {"version": "1", "compose_hash": "ab" * 32, "compose": "",
                               "expose_port": 8080, "health_path": "/health"}
    assert len(json.dumps(slim)) < len(json.dumps(stopped)) // 100
    assert "secret-value" not in json.dumps(slim)
    assert {k: v for k, v in slim.items() if k != "version"} == \
        {k: v for k, v in stopped.items() if k != "version"}
    assert slimmed(slim) is None  # once
    # the dc still reads it, as a stop
    got = read_intent("dep-1", slim, LABEL)
    assert got is not None and not got.running
