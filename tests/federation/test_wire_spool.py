"""The pure decisions of the link and the dc's durable spool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ee.federation.spool import Spool
from ee.federation.wire import (
    SeqVerdict,
    WireError,
    foreign_agents,
    judge_sequence,
    judge_snapshot,
    open_envelope,
    seal,
    up_frame,
)
from ee.protocol.signing import generate_signing_key


def test_judge_sequence_and_snapshot() -> None:
    assert judge_sequence(4, 5) is SeqVerdict.APPLY
    assert judge_sequence(4, 4) is SeqVerdict.REPLAYED
    assert judge_sequence(4, 1) is SeqVerdict.REPLAYED
    assert judge_sequence(4, 6) is SeqVerdict.GAP
    assert judge_snapshot(3, 4) and not judge_snapshot(3, 3) and not judge_snapshot(3, 2)


def test_envelopes_and_frames_refuse_what_they_cannot_trust() -> None:
    key, other = generate_signing_key(), generate_signing_key()
    hello = {"type": "hello", "dc": "x:y", "first_unacked": 1, "next_seq": 1,
             "snapshot_version": 0, "spool_depth": 0}
    assert open_envelope(seal(hello, key), key.public_key()) == hello
    for text, code in ((seal(hello, other), "bad_signature"), ("[]", "bad_frame"),
                       ("{", "bad_frame"), ('{"body": {}, "sig": "zz"}', "bad_signature")):
        with pytest.raises(WireError) as err:
            open_envelope(text, key.public_key())
        assert err.value.code == code
    for body in ({**hello, "first_unacked": -1}, {**hello, "type": "nope"},
                 {**hello, "extra": 1}, {"type": "events", "dc": "x:y"}):
        with pytest.raises(WireError) as err:
            up_frame(body)
        assert err.value.code == "bad_frame"


def test_agent_views_are_checked() -> None:
    good = {"status": "online", "verdict": "pass", "datacenter": "x:y", "node_size": "s",
            "free": True, "deployments": {"d1": "running"}}
    assert foreign_agents("x:y", {"agents": {"a": good, "b": None}}) == []
    assert foreign_agents("x:y", {"agents": {"a": {**good, "datacenter": "x:z"}}}) == ["a"]
    for bad in ({**good, "status": "great"}, {**good, "free": "yes"}, {**good, "verdict": 1},
                {**good, "deployments": {"d": 5}}, {**good, "mrtd": "ZZ"}, "online"):
        with pytest.raises(WireError):
            foreign_agents("x:y", {"agents": {"a": bad}})


CHILD = """
import sys
from pathlib import Path
from ee.federation.spool import Spool
s = Spool(Path(sys.argv[1]))
for i in range(50):
    s.append("agents", 0.0, {"i": i})
print("written", flush=True)
sys.stdin.read()
"""


def test_spool_survives_kill9_and_never_reuses_sequences(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    spool = Spool(path)
    try:
        assert spool.bounds() == (1, 51, 50)
        assert [e["data"]["i"] for e in spool.read(1, 100)] == list(range(50))
        assert spool.ack(50) == 50 and spool.bounds() == (51, 51, 0)
        spool.close()
        spool = Spool(path)
        assert spool.append("agents", 0.0, {}) == 51  # acked and deleted: never reused
        assert spool.bounds() == (51, 52, 1)
    finally:
        spool.close()


def test_a_read_stays_under_its_byte_budget_and_never_returns_nothing(tmp_path: Path) -> None:
    """Many large events are cut into several frames (one frame of them all would pass
    the link's message cap and fail the link on every retry); one event larger than the
    budget still goes alone."""
    spool = Spool(tmp_path / "spool.sqlite3")
    try:
        for i in range(10):
            spool.append("placement", 0.0, {"i": i, "pad": "x" * 1000})
        spool.append("resync", 0.0, {"pad": "y" * 5000})
        first = spool.read(1, 1000, 3500)
        assert [e["data"]["i"] for e in first] == [0, 1, 2]
        assert len(spool.read(1, 1000)) == 11  # no budget: the count alone
        big = spool.read(11, 1000, 3500)
        assert [e["kind"] for e in big] == ["resync"]
    finally:
        spool.close()
