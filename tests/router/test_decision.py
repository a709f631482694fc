"""The pure rollout decision, line by line (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ee.router import decision as d


def cfg(kill: bool = False, **classes: float) -> d.RolloutConfig:
    return d.RolloutConfig.from_json({"kill_switch": kill, "classes": classes})


def test_bucket_is_the_first_8_bytes_of_sha256_big_endian_mod_10000() -> None:
    # sha256(b"agent:vm-1") starts 2d727131082ca9c2; 0x2d727131082ca9c2 % 10000 == 2866
    assert d.bucket("agent:vm-1") == 0x2D727131082CA9C2 % 10_000 == 2866
    assert d.bucket("account:acct-000000000000") == 1877
    assert d.bucket("dc:gcp-a:us-central1") == 5596


@pytest.mark.parametrize(("method", "path", "klass"), [
    ("GET", "/api/v2/apps", "A"), ("HEAD", "/api/v2/health", "A"), ("GET", "/metrics", "A"),
    ("GET", "/api/v2/accounts/me", "A"), ("GET", "/api/v2/deployments/d-1", "A"),
    ("POST", "/api/v2/apps", "B"), ("POST", "/api/v2/apps/x/deployments", "B"),
    ("DELETE", "/api/v2/deployments/d-1", "B"), ("POST", "/api/v2/accounts/me/keys", "B"),
    ("POST", "/api/v2/capacity/launch-orders/claim", "B"),
    ("GET", "/api/v2/agents/connect", "C"),
    ("GET", "/api/v2/agents", "D"), ("POST", "/api/v2/agents/ag-1/drain", "D"),
    ("POST", "/api/v2/accounts", "D"), ("GET", "/api/v2/billing/usage", "D"),
    ("POST", "/api/v2/billing/credits", "D"), ("GET", "/api/v2/admin/tree", "D"),
    ("PUT", "/api/v2/capacity/pools/dc/tiny", "D"), ("GET", "/api/v2/datacenters", "D"),
    ("GET", "/api/v2/capacity/launch-orders", "D"),
    ("GET", "/api/v2/federation/connect", "E"), ("POST", "/api/v2/federation", "E"),
    ("GET", "//api/v2//admin/tree", "D"), ("get", "/api/v2/apps?x=1", "A"),
    ("GET", "/api/v2/federationx", "A"),
])
def test_classes_come_from_the_table(method: str, path: str, klass: str) -> None:
    assert d.classify(method, path) == klass


def test_kill_switch_comes_first_and_no_cohort_means_old() -> None:
    everything = cfg(**dict.fromkeys(d.CLASSES, 100))
    assert d.decide(everything, "A", "account:a").stack == "new"
    killed = cfg(True, **dict.fromkeys(d.CLASSES, 100))
    for klass in d.CLASSES:
        assert d.decide(killed, klass, "account:a") == d.Decision(
            "old", klass, "account:a", None, "kill_switch")
    assert d.decide(everything, "A", None).reason == "no_cohort"
    assert d.decide(everything, "A", "").stack == "old"


@given(st.text(max_size=40), st.integers(0, 10_000), st.integers(0, 10_000))
def test_raising_a_percentage_never_moves_a_key_back(key: str, a: int, b: int) -> None:
    low, high = sorted((a, b))
    before = d.decide(cfg(A=low / 100), "A", key)
    after = d.decide(cfg(A=high / 100), "A", key)
    assert not (before.stack == "new" and after.stack == "old")
    assert d.decide(cfg(A=low / 100), "A", key) == before  # same key, same answer


def test_classes_roll_independently_but_share_the_cohort_bucket() -> None:
    config = cfg(A=50, B=0)
    keys = [f"account:acct-{i}" for i in range(200)]
    assert any(d.decide(config, "A", k).stack == "new" for k in keys)
    assert all(d.decide(config, "B", k).stack == "old" for k in keys)
    both = cfg(A=30, B=30)
    assert all(d.decide(both, "A", k).stack == d.decide(both, "B", k).stack for k in keys)


def test_cohort_keys() -> None:
    h = {"authorization": "Bearer ee_k1234_secret", "x-ee-agent": "vm-7", "x-ee-dc": "dc-1"}
    assert d.cohort_key("A", h, tenant="account:acct-1", client="1.2.3.4") == "account:acct-1"
    # a tenant key that did not resolve: no cohort (the stable stack), never the raw key
    assert d.cohort_key("B", h, tenant=None, client="1.2.3.4") is None
    assert d.cohort_key("C", h, tenant=None, client=None) == "agent:vm-7"
    assert d.cohort_key("E", h, tenant=None, client=None) == "dc:dc-1"
    assert d.cohort_key("C", {"x-ee-agent": "../bad name"}, tenant=None, client=None) is None
    admin = d.cohort_key("D", {"authorization": "Bearer admin-token"}, tenant=None, client="x")
    assert admin is not None and admin.startswith("operator:") and "admin-token" not in admin
    assert d.cohort_key("A", {}, tenant=None, client="1.2.3.4") == "client:1.2.3.4"
    assert d.tenant_key_id("Bearer ee_k1234_sec_ret") == "k1234"
    assert d.tenant_key_id("Bearer xx_k1_s") is None


@pytest.mark.parametrize("doc", [
    [], {"kill_switch": "yes"}, {"classes": {"F": 1}}, {"classes": {"A": 100.5}},
    {"classes": {"A": -1}}, {"classes": {"A": 1.005}}, {"classes": {"A": True}},
    {"classes": {"A": float("nan")}}, {"shadow": {"B": 0.5}}, {"shadow": {"A": 2}},
    {"other": 1}, {"changed_at": []},
])
def test_bad_configs_are_refused(doc: object) -> None:
    with pytest.raises(d.ConfigError):
        d.RolloutConfig.from_json(doc)


def test_config_round_trip_and_stages() -> None:
    doc = {"kill_switch": False, "classes": {"A": 2, "B": 5.5, "C": 0, "D": 0.01, "E": 100},
           "shadow": {"A": 0.1}, "changed_at": {"A": 1.0}}
    assert d.RolloutConfig.from_json(doc).to_json() == doc
    assert d.next_stage(0) == 2 and d.next_stage(3) == 5 and d.next_stage(100) is None
    assert d.previous_stage(2) == 0 and d.previous_stage(30) == 25 and d.previous_stage(0) == 0
