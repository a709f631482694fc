"""Pure parts of the CP: lifecycle table, vocabulary, readiness, nonces, bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ee.actors.lifecycle import (
    TRANSITIONS,
    AgentState,
    IllegalTransition,
    api_status,
    status_for_age,
    transition,
)
from ee.cp import bootstrap
from ee.cp.nodes import LabelError, Vocabulary
from ee.cp.readiness import Quorum, assess
from ee.cp.registration import NonceBook

S = AgentState


def test_lifecycle_table_allows_exactly_its_transitions() -> None:
    for a in S:
        for b in S:
            if a is b or (a, b) in TRANSITIONS:
                assert transition(a, b) is b
            else:
                with pytest.raises(IllegalTransition):
                    transition(a, b)
    # Spot checks of what must never happen.
    for bad in [(S.OFFLINE, S.READY), (S.CONNECTING, S.READY), (S.QUARANTINED, S.READY),
                (S.OFFLINE, S.QUARANTINED)]:
        assert bad not in TRANSITIONS


def test_status_for_age_and_api_status() -> None:
    assert status_for_age(S.READY, 5, 30, 60) is S.READY
    assert status_for_age(S.READY, 30, 30, 60) is S.STALE
    assert status_for_age(S.STALE, 60, 30, 60) is S.OFFLINE
    assert status_for_age(S.STALE, 1, 30, 60) is S.READY
    assert status_for_age(S.QUARANTINED, 1000, 30, 60) is S.QUARANTINED
    assert [api_status(s) for s in S] == [
        "offline", "online", "online", "stale", "offline", "quarantined"]


def test_vocabulary_labels_and_sizes() -> None:
    v = Vocabulary()
    assert v.normalise_label(" Google:US-Central1 ") == "gcp:us-central1"
    assert v.normalise_label("bm:chicago-h100") == "baremetal:chicago-h100"
    for bad in ("no-colon", ":zone", "cloud:", "gcp:us central", "gcp:zone:extra"):
        with pytest.raises(LabelError):
            v.normalise_label(bad)
    assert v.size("llm") is not None and v.size("llm").gpu  # type: ignore[union-attr]
    assert v.size("huge") is None
    custom = Vocabulary.from_config({"node_sizes": [{"name": "gpu-xl", "vcpus": 64,
                                                     "memory_mb": 512000, "gpu": True}]})
    assert list(custom.sizes) == ["gpu-xl"]
    with pytest.raises(ValueError, match="node_sizes"):
        Vocabulary.from_config({"node_sizes": [{"name": "x"}]})


def test_readiness_decisions() -> None:
    q = Quorum(quorum_fraction=0.5, settle_timeout_s=60)
    expected = {f"a{i}" for i in range(10)}
    assert not assess(q, {"a1", "a2"}, expected, 1).ready
    assert assess(q, {f"a{i}" for i in range(5)}, expected, 1).ready
    assert not assess(q, {f"x{i}" for i in range(9)}, expected, 1).ready  # strangers don't count
    assert assess(q, set(), expected, 60).ready
    assert assess(q, set(), set(), 0).ready  # no checkpoint: nothing to wait for
    assert not assess(Quorum(quorum_count=3), {"a", "b"}, set(), 1).ready
    assert assess(Quorum(quorum_count=3), {"a", "b", "c"}, set(), 1).ready


def test_nonces_are_single_use_and_expire() -> None:
    book = NonceBook(ttl=10)
    nonce, expires = book.issue(100.0)
    assert expires == 110.0
    assert book.consume(nonce, 105.0) is None
    refusal = book.consume(nonce, 105.0)
    assert refusal is not None and refusal.code == "NONCE_REPLAYED"
    late, _ = book.issue(100.0)
    refusal = book.consume(late, 110.5)
    assert refusal is not None and refusal.code == "NONCE_EXPIRED"
    book.remember_binding(b"rd", 100.0)
    assert book.was_used(b"rd", 109.0) and not book.was_used(b"rd", 111.0)
    book.issue(100.0)
    book.prune(200.0)
    assert len(book) == 0


def test_bootstrap_refuses_missing_unsigned_and_tampered(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("EE_SIM_DIR", str(tmp_path / "sim"))
    data = tmp_path / "cp"
    with pytest.raises(bootstrap.BootstrapError, match="no bootstrap bundle"):
        bootstrap.load(data)
    token = bootstrap.create_dev(data)
    boot = bootstrap.load(data)
    assert boot.admin_token_ok(token) and not boot.admin_token_ok(token + "x")
    assert boot.dev and len(boot.roots) == 1
    assert (data / "admin.token").stat().st_mode & 0o777 == 0o600

    sig = data / "bootstrap.json.sig"
    saved = sig.read_bytes()
    sig.unlink()
    with pytest.raises(bootstrap.BootstrapError, match="refused"):
        bootstrap.load(data)
    sig.write_bytes(saved)

    doc = json.loads((data / "bootstrap.json").read_text())
    doc["admin_token_sha256"] = "0" * 64
    (data / "bootstrap.json").write_text(json.dumps(doc))
    with pytest.raises(bootstrap.BootstrapError, match="refused"):
        bootstrap.load(data)


def test_deployment_table_and_derivation() -> None:
    from ee.actors.deployment import (
        TRANSITIONS as DT,
    )
    from ee.actors.deployment import (
        IllegalDeploymentTransition,
        derive,
    )
    from ee.actors.deployment import (
        transition as dtransition,
    )

    states = ["pending", "placing", "starting", "running", "failed", "stopping", "stopped"]
    for a in states:
        for b in states:
            if a == b or (a, b) in DT:
                assert dtransition(a, b) == b
            else:
                with pytest.raises(IllegalDeploymentTransition):
                    dtransition(a, b)
    for bad in [("stopped", "running"), ("pending", "running"), ("stopping", "running"),
                ("pending", "stopped")]:
        assert bad not in DT
    assert derive("running", 2, [], gave_up=False) == "placing"
    assert derive("running", 2, ["running"], gave_up=False) == "placing"
    assert derive("running", 2, ["running", "starting"], gave_up=False) == "starting"
    assert derive("running", 2, ["running", "running"], gave_up=False) == "running"
    assert derive("running", 1, [], gave_up=True) == "failed"
    assert derive("stopped", 1, ["running"], gave_up=False) == "stopping"
    assert derive("stopped", 1, [], gave_up=False) == "stopped"


GOOD_URLS = {
    "http://10.0.0.5:8080": "http://10.0.0.5:8080",
    "HTTPS://Agent-1.Example.COM/": "https://agent-1.example.com",
    "http://[::1]:8000/api/": "http://[::1]:8000/api",
    "https://abc.trycloudflare.com": "https://abc.trycloudflare.com",
}
BAD_URLS = [
    "", "10.0.0.5:8080", "ftp://x", "file:///etc/passwd", "javascript:alert(1)",
    "http://user:pw@x", "http://x@y", "http://x:0", "http://x:65536", "http://x:",
    "http://x:+1", "http://x/?q", "http://x/#f", "http://x/?", "http://x/a/../b",
    "http://x/./b", "http://x/a%2e%2e/b", "http://x\\@y", "http:// x", "http://x/\n",
    "http://é.example", "http://ex_ample.com", "http://-x.example", "http://x-.example",
    "http://1.2.3", "http://999.1.1.1", "http://[zz]", "http://[::1", "http://[fe80::1%25e]",
    "http:x", "http:/x", "http://" + "a" * 60 + "." + "b" * 70 + ".com",
    "http://" + ".".join(["abcdefghij"] * 50),
    "http://[1::2]x", "http://[::1]x:80", "http://[::1]]",
]


def test_agent_urls_allowlist() -> None:
    from ee.cp.registration import MAX_URL, agent_url

    for url, normal in GOOD_URLS.items():
        assert agent_url(url) == normal
        assert agent_url(normal) == normal
    for url in [*BAD_URLS, "http://x.example/" + "a" * MAX_URL]:
        with pytest.raises(ValueError):
            agent_url(url)
            pytest.fail(f"accepted {url!r}")


def test_agent_urls_outside_dev_need_reachable_ip_literals() -> None:
    from ee.cp.registration import agent_url

    for url in ("http://127.0.0.1:8000", "http://169.254.169.254", "http://[::1]",
                "http://[fe80::1]", "http://0.0.0.0", "http://[::ffff:127.0.0.1]",
                "http://[::ffff:169.254.169.254]", "http://224.0.0.1", "http://240.0.0.1"):
        assert agent_url(url)  # dev mode (the default) accepts them
        with pytest.raises(ValueError, match="not an address another machine can reach"):
            agent_url(url, routable_only=True)
    # Datacenter agents have private addresses; those, and DNS names, are fine.
    for url in ("http://10.0.0.5", "http://192.168.1.2", "http://[fd00::1]",
                "http://100.64.0.1", "http://203.0.113.0.example.com", "https://8.8.8.8:443",
                "http://[2606:4700::1111]", "https://agent.example.com"):
        assert agent_url(url, routable_only=True)


def test_vm_names_have_one_spelling() -> None:
    from ee.cp.registration import VM_NAME

    for good in ("vm-1", "a", "vm_1", "node.dc1", "a" * 63, "0vm"):
        assert VM_NAME.match(good), good
    for bad in ("VM-1", "Vm-1", "vm-1.", "vm..1", ".vm", "a" * 64, "", "-vm", "vm 1",
                "vm-1\n", "vm/1"):
        assert not VM_NAME.match(bad), bad


def test_binding_decisions_and_manifest_names() -> None:
    from ee.actors.identity import Binding
    from ee.cp.manifests import ManifestStore, ident_of
    from ee.cp.registration import check_binding

    key, other = b"k" * 32, b"o" * 32
    bound = Binding("vm-1", key, 1.0)
    assert check_binding(None, "vm-1", key) is None
    assert check_binding(bound, "vm-1", key) is None
    refusal = check_binding(bound, "vm-1", other)
    assert refusal is not None and refusal.code == "KEY_CHANGED"
    held = Binding("vm-1", None, 0.0, problem="bad signature")
    for k in (key, other):
        refusal = check_binding(held, "vm-1", k)
        assert refusal is not None and refusal.code == "BINDING_INVALID"
        assert "bad signature" in refusal.reasons[0]
    assert Binding.from_spec(bound.to_spec()) == bound
    for spec in ({}, {"vm_name": "v", "public_key": "zz" * 32, "bound_at": 1},
                 {"vm_name": "v", "public_key": "ab", "bound_at": 1},
                 {"vm_name": "v", "public_key": "ab" * 32, "bound_at": True}):
        with pytest.raises(ValueError):
            Binding.from_spec(spec)

    store = ManifestStore(Path("/nonexistent"), None)  # type: ignore[arg-type]
    for name in ("vm-1", "a.b_c-d", "x" * 63):
        assert ident_of(store.path("bindings", name)) == name
    assert ident_of("/m/vm-1-000000000000.json") is None  # the digest does not match
    assert ident_of("/m/odd.json") is None
    assert ident_of(store.path("bindings", "has space")) is None
