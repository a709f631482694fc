"""eectl rollout: the pure rules, and the CLI against ee-router and Workers KV."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from kv_standin import KvStandIn
from routerkit import ADMIN, config_doc, running_router, two_stacks

from ee.ctl.rollout import Refused, drill_ok, plan_back, plan_set, plan_step
from ee.protocol.signing import (
    generate_signing_key,
    save_private_key,
    save_public_key,
    sign_document,
    write_enveloped,
)
from ee.router import decision as d

NOW = 1_800_000_000.0


def drill_doc(key: Any, passed: bool = True, at: float = NOW - 60) -> dict[str, Any]:
    doc = {"drill": "db-wipe", "passed": passed, "finished_unix": at, "steps": []}
    return {"document": doc, "signature": sign_document(doc, key).hex()}


def cfg(**kw: Any) -> d.RolloutConfig:
    return d.RolloutConfig.from_json(kw or config_doc())


def test_step_walks_the_stages_and_waits_for_the_soak() -> None:
    key = generate_signing_key()
    config = cfg(classes={}, drill=drill_doc(key))
    seen = []
    now = NOW
    for _ in range(6):
        config = plan_step(config, ["A"], soak_s=600, pubkey=key.public_key(), now=now)
        seen.append(config.percent("A"))
        with pytest.raises(Refused, match="soaked" if config.percent("A") < 100 else "100"):
            plan_step(config, ["A"], soak_s=600, pubkey=key.public_key(), now=now + 599)
        now += 600
    assert seen == [2, 5, 10, 25, 50, 100]
    assert config.percent("B") == 0  # classes roll independently
    with pytest.raises(Refused, match="already at 100"):
        plan_step(config, ["A"], soak_s=0, pubkey=None, now=now)
    config = plan_back(config, ["A"], now=now)
    assert config.percent("A") == 50
    assert plan_back(cfg(classes={"A": 3}), [], now=now).percent("A") == 2


def test_promotion_above_25_needs_a_signed_passed_recent_drill() -> None:
    key, other = generate_signing_key(), generate_signing_key()
    at25 = cfg(classes={"A": 25})
    with pytest.raises(Refused, match="no DB-wipe drill result"):
        plan_step(at25, ["A"], soak_s=0, pubkey=key.public_key(), now=NOW)
    with pytest.raises(Refused, match="above 25"):
        plan_set(at25, "A", 26, pubkey=key.public_key(), now=NOW)
    cases = {
        "not signed by the pinned key": drill_doc(other),
        "did not pass": drill_doc(key, passed=False),
        "older than": drill_doc(key, at=NOW - 8 * 86400),
    }
    for reason, doc in cases.items():
        with pytest.raises(Refused, match=reason):
            plan_step(cfg(classes={"A": 25}, drill=doc), ["A"], soak_s=0,
                      pubkey=key.public_key(), now=NOW)
    tampered = drill_doc(key, passed=False)
    tampered["document"]["passed"] = True
    assert drill_ok(tampered, key.public_key(), NOW, 86400) is not None
    good = cfg(classes={"A": 25}, drill=drill_doc(key))
    assert plan_step(good, ["A"], soak_s=0, pubkey=key.public_key(), now=NOW).percent("A") == 50
    with pytest.raises(Refused, match="no --drill-pubkey"):
        plan_step(good, ["A"], soak_s=0, pubkey=None, now=NOW)
    # up to 25 %, and any step back, need no drill
    assert plan_set(cfg(), "B", 25, pubkey=None, now=NOW).percent("B") == 25
    assert plan_set(cfg(classes={"B": 100}), "B", 50, pubkey=None, now=NOW).percent("B") == 50
    with pytest.raises(Refused, match="kill switch"):
        plan_step(cfg(kill_switch=True), [], soak_s=0, pubkey=None, now=NOW)


async def eectl(*args: str) -> tuple[int, str, str]:
    proc = await trio.run_process([sys.executable, "-m", "ee.ctl.main", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_eectl_rollout_drives_ee_router(tmp_path: Path) -> None:
    token = tmp_path / "router.token"
    token.write_text(ADMIN)
    key = generate_signing_key()
    save_private_key(tmp_path / "drill.key", key)
    save_public_key(tmp_path / "drill.pub", key.public_key())
    with trio.fail_after(120):
        async with two_stacks(tmp_path, accounts=1) as stacks, \
                running_router(stacks, tmp_path) as rr:
            where = ("--router", rr.url, "--token-file", str(token))
            rc, out, err = await eectl("rollout", "step", "A", "B", *where)
            assert rc == 0, err
            assert rr.router.config.percent("A") == 2 and rr.router.config.percent("B") == 2
            rc, out, err = await eectl("rollout", "step", "A", *where)
            assert rc == 1 and "soaked" in err
            for _ in range(3):
                rc, out, err = await eectl("rollout", "step", "A", "--soak", "0", *where)
                assert rc == 0, err
            assert rr.router.config.percent("A") == 25
            rc, out, err = await eectl("rollout", "step", "A", "--soak", "0", "--drill-pubkey",
                                       str(tmp_path / "drill.pub"), *where)
            assert rc == 1 and "above 25" in err and rr.router.config.percent("A") == 25
            doc = {"drill": "db-wipe", "passed": True, "finished_unix": time.time(),
                   "finished_at": "now", "steps": []}
            write_enveloped(tmp_path / "drill.json", doc, key)
            rc, out, err = await eectl("rollout", "record-drill", str(tmp_path / "drill.json"),
                                       "--drill-pubkey", str(tmp_path / "drill.pub"), *where)
            assert rc == 0, err
            rc, out, err = await eectl("rollout", "set", "A", "100", "--drill-pubkey",
                                       str(tmp_path / "drill.pub"), *where)
            assert rc == 0, err
            _, tenant = stacks.keys[0]
            async with rr.client(tenant) as c:
                assert (await c.get("/api/v2/apps")).headers[d.STACK_HEADER] == "new"
                rc, out, err = await eectl("rollout", "kill", *where)
                assert rc == 0, err
                assert (await c.get("/api/v2/apps")).headers[d.STACK_HEADER] == "old"
                rc, out, err = await eectl("rollout", "unkill", *where)
                assert (await c.get("/api/v2/apps")).headers[d.STACK_HEADER] == "new"
            rc, out, err = await eectl("rollout", "back", "A", *where)
            assert rc == 0 and rr.router.config.percent("A") == 50
            rc, out, err = await eectl("rollout", "status", *where)
            assert rc == 0 and "A      50" in out and "db-wipe passed=True" in out, out
            rc, out, err = await eectl("rollout", "shadow-report", *where)
            assert rc == 0 and "compared 0" in out, out
            token.write_text("not-the-token-0123456789")
            rc, out, err = await eectl("rollout", "kill", *where)
            assert rc == 2 and "401" in err
            on_disk = json.loads(rr.config_path.read_text())
            assert on_disk["kill_switch"] is False and on_disk["classes"]["A"] == 50


async def test_eectl_rollout_drives_the_workers_kv_config(tmp_path: Path) -> None:
    (tmp_path / "cf.token").write_text("cf-test-token")
    with KvStandIn().serving() as kv, trio.fail_after(60):
        where = ("--cloudflare", "--cf-api", kv.base, "--cf-account", "acc1",
                 "--cf-namespace", "ns1", "--cf-token-file", str(tmp_path / "cf.token"))
        rc, _out, err = await eectl("rollout", "step", "C", *where)
        assert rc == 0, err
        assert json.loads(kv.values["config"])["classes"]["C"] == 2
        rc, _out, err = await eectl("rollout", "kill", *where)
        assert rc == 0 and json.loads(kv.values["config"])["kill_switch"] is True
        assert ("PUT", "/client/v4/accounts/acc1/storage/kv/namespaces/ns1/values/config") \
            in kv.calls
        (tmp_path / "cf.token").write_text("wrong")
        rc, _, err = await eectl("rollout", "unkill", *where)
        assert rc == 2 and json.loads(kv.values["config"])["kill_switch"] is True


def test_a_drill_must_be_of_the_new_stack_and_not_from_the_future() -> None:
    from ee.router.promotion import promotion_refusal

    key = generate_signing_key()
    pub = key.public_key()

    def signed(**fields: Any) -> dict[str, Any]:
        doc = {"drill": "db-wipe", "passed": True, "finished_unix": NOW - 60,
               "cp": "http://new.example:8080/", "steps": [], **fields}
        return {"document": doc, "signature": sign_document(doc, key).hex()}

    new = "http://new.example:8080"
    assert drill_ok(signed(), pub, NOW, 86400, new) is None
    assert drill_ok(signed(cp="http://new.example:8080"), pub, NOW, 86400, new + "/") is None
    assert "not the new stack" in str(drill_ok(signed(cp="http://old.example:8080"), pub,
                                               NOW, 86400, new))
    assert drill_ok(signed(cp=None), pub, NOW, 86400, new) is not None
    assert "future" in str(drill_ok(signed(finished_unix=NOW + 3600), pub, NOW, 86400, new))
    assert drill_ok(signed(finished_unix=True), pub, NOW, 86400, new) is not None
    before = cfg(classes={"A": 25})
    assert promotion_refusal(before, {"A": 50}, signed(cp="http://old.example:8080"), pub,
                             NOW, new_stack=new) is not None
    assert promotion_refusal(before, {"A": 50}, signed(), pub, NOW, new_stack=new) is None
    # eectl rollout passes --new-stack to the same gate.
    old_drill = cfg(classes={"A": 25}, drill=signed(cp="http://old.example:8080"))
    with pytest.raises(Refused, match="not the new stack"):
        plan_step(old_drill, ["A"], soak_s=0, pubkey=pub, now=NOW, new_stack=new)
    with pytest.raises(Refused, match="not the new stack"):
        plan_set(old_drill, "A", 50, pubkey=pub, now=NOW, new_stack=new)
    assert plan_step(cfg(classes={"A": 25}, drill=signed()), ["A"], soak_s=0, pubkey=pub,
                     now=NOW, new_stack=new).percent("A") == 50
