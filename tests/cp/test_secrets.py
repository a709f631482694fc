"""Tenant secrets at the CP: routes, bad input, sealing at rest, durability, and the
pure release decision (`judge_replica`). End to end (real agents, Docker) lives in
tests/agent/test_secrets_e2e.py."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from cpkit import running_cp
from test_tenants import COMPOSE, context, tenant

from ee.cp.secrets import ReleasePolicy, judge_replica

VALUE = "pw-" + secrets.token_hex(16)


async def _app(http: Any, name: str = "vault") -> None:
    r = await http.post("/api/v2/apps", json={"name": name})
    assert r.status_code == 201, r.text


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_secret_routes_never_show_values_and_refuse_bad_input(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, \
                await tenant(env, "t1") as http, await tenant(env, "t2") as other:
                await _app(http)
                r = await http.put("/api/v2/apps/vault/secrets/db_password",
                                   json={"value": VALUE})
                assert r.status_code == 201, r.text
                assert r.json()["version"] == 1 and VALUE not in r.text
                r = await http.put("/api/v2/apps/vault/secrets/db_password",
                                   json={"value": VALUE + "2"})
                assert r.json()["version"] == 2
                r = await http.get("/api/v2/apps/vault/secrets")
                assert r.status_code == 200
                assert [(s["name"], s["version"]) for s in r.json()["secrets"]] == [
                    ("db_password", 2)]
                assert VALUE not in r.text
                # Another tenant sees no app there.
                r = await other.get("/api/v2/apps/vault/secrets")
                assert r.status_code == 404
                r = await other.put("/api/v2/apps/vault/secrets/x", json={"value": "v"})
                assert r.status_code == 404
                # Bad input: 4xx with a reason code, never a 500.
                for bad in ("Upper", "-lead", "a" * 64, "x%2Fy", "..", "a b"):
                    r = await http.put(f"/api/v2/apps/vault/secrets/{bad}", json={"value": "v"})
                    assert r.status_code in (400, 404, 405), (bad, r.text)
                    if r.status_code == 400:
                        assert r.json()["error"]["code"] == "bad_secret_name"
                r = await http.put("/api/v2/apps/vault/secrets/big",
                                   json={"value": "x" * (64 * 1024 + 1)})
                assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
                r = await http.put("/api/v2/apps/vault/secrets/big", json={"value": 5})
                assert r.status_code == 400
                r = await http.put("/api/v2/apps/vault/secrets/big",
                                   json={"value": "v", "extra": 1})
                assert r.status_code == 400
                r = await http.put("/api/v2/apps/vault/secret-policy",
                                   json={"node_sizes": ["no-such-size"]})
                assert r.status_code == 400
                assert r.json()["error"]["code"] == "unknown_node_size"
                r = await http.put("/api/v2/apps/vault/secret-policy",
                                   json={"min_attested_replicas": 0})
                assert r.status_code == 400
                r = await http.put("/api/v2/apps/vault/secret-policy",
                                   json={"datacenters": ["not a label!"]})
                assert r.status_code == 400
                r = await http.put("/api/v2/apps/vault/secret-policy",
                                   json={"tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
                                         "min_attested_replicas": 2})
                assert r.status_code == 200, r.text
                r = await http.get("/api/v2/apps/vault/secret-policy")
                assert r.json()["min_attested_replicas"] == 2
                # A version's secrets list is checked at upload.
                base = {"compose": COMPOSE, "build_context": context(), "expose_port": 80}
                for entry, code in (({"name": "Bad!"}, "bad_secret_name"),
                                    ({"name": "ok", "as": "env", "env": "X"}, "unsupported"),
                                    ({"name": "ok", "as": "disk"}, "bad_request"),
                                    ("ok", "bad_request")):
                    r = await http.post("/api/v2/apps/vault/versions",
                                        json={**base, "version": "1", "secrets": [entry]})
                    assert r.status_code == 400, (entry, r.text)
                    assert r.json()["error"]["code"] == code
                r = await http.post("/api/v2/apps/vault/versions", json={
                    **base, "version": "1", "secrets": [{"name": "db_password"}]})
                assert r.status_code == 201, r.text
                assert r.json()["secrets"] == [
                    {"name": "db_password", "as": "file", "on_rotate": "none"}]
                r = await http.delete("/api/v2/apps/vault/secrets/db_password")
                assert r.status_code == 200
                r = await http.delete("/api/v2/apps/vault/secrets/db_password")
                assert r.status_code == 404
                r = await http.get("/api/v2/apps/vault/secret-events")
                actions = [e["action"] for e in r.json()["events"]]
                assert actions.count("updated") == 2 and "deleted" in actions
                assert VALUE not in r.text


async def test_secrets_are_sealed_at_rest_and_survive_a_history_wipe(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    with trio.fail_after(90):
        async with running_cp(data) as env, await tenant(env, "t1") as http:
                await _app(http)
                r = await http.put("/api/v2/apps/vault/secrets/api_key", json={"value": VALUE})
                assert r.status_code == 201
                key = next(iter(env.cp.registry.names("app/"))).removeprefix("app/")
                assert (await env.cp.secret_vault.open(key, "api_key")) == (1, VALUE.encode())
                token = http.headers["Authorization"]
        # Sealed: no file of the CP's data dir holds the value (nor its hex).
        assert _files_containing(data, VALUE.encode()) == []
        assert _files_containing(data, VALUE.encode().hex().encode()) == []
        wrap = data / "secrets-wrap.key"
        assert stat.S_IMODE(wrap.stat().st_mode) == 0o600
        # Wipe the history store: secrets are durable business state.
        for path in data.glob("records.sqlite3*"):
            path.unlink()
        async with running_cp(data) as env, \
                env.client(token=token.removeprefix("Bearer ")) as http:
                r = await http.get("/api/v2/apps/vault/secrets")
                assert r.status_code == 200, r.text
                assert [s["name"] for s in r.json()["secrets"]] == ["api_key"]
                assert (await env.cp.secret_vault.open(key, "api_key")) == (1, VALUE.encode())
        # Without the wrapping key, the database alone opens nothing.
        os.replace(wrap, data / "moved.key")
        async with running_cp(data) as env:
            with pytest.raises(Exception, match="does not open"):
                await env.cp.secret_vault.open(key, "api_key")


# ---- the pure decision ----------------------------------------------------------------

HASH = "sha256:" + "ab" * 32


def _agent(**changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "agent_id": "ag-1", "status": "online", "node_size": "standard",
        "datacenter": "dev:local",
        "attestation": {"verdict": "pass", "tcb_status": "UpToDate", "quarantine_reasons": []},
        "deployment": [{"deployment_id": "dep-1", "compose_hash": HASH}]}
    view.update(changes)
    return view


def _judge(policy: ReleasePolicy | None = None, replica: dict[str, Any] | None = None,
           **agent: Any) -> str | None:
    refusal = judge_replica(policy or ReleasePolicy(), deployment_id="dep-1",
                            expected_hash=HASH,
                            replica=replica or {"state": "running", "compose_hash": HASH},
                            agent=_agent(**agent))
    return None if refusal is None else refusal.code


def test_judge_replica_table() -> None:
    assert _judge() is None
    assert _judge(status="quarantined") == "AGENT_QUARANTINED"
    assert _judge(status="stale") == "AGENT_NOT_ONLINE"
    assert _judge(attestation={"verdict": "warn", "tcb_status": "UpToDate"}) == "VERDICT"
    assert _judge(ReleasePolicy(verdicts=("pass", "warn")),
                  attestation={"verdict": "warn", "tcb_status": "UpToDate"}) is None
    assert _judge(attestation={"verdict": "pass", "tcb_status": "OutOfDate"}) == "TCB_STATUS"
    assert _judge(ReleasePolicy(node_sizes=("llm",))) == "NODE_SIZE"
    assert _judge(ReleasePolicy(datacenters=("gcp:x",))) == "DATACENTER"
    assert _judge(replica={"state": "starting", "compose_hash": HASH}) == "NOT_RUNNING"
    assert _judge(replica={"state": "running", "compose_hash": "sha256:" + "cd" * 32}
                  ) == "COMPOSE_HASH"
    assert _judge(deployment=[{"deployment_id": "dep-1",
                               "compose_hash": "sha256:" + "cd" * 32}]) == "COMPOSE_HASH"
    assert _judge(deployment=[]) == "COMPOSE_HASH"
    refusal = judge_replica(ReleasePolicy(), deployment_id="dep-1", expected_hash=HASH,
                            replica={"state": "running", "compose_hash": HASH}, agent=None)
    assert refusal is not None and refusal.code == "AGENT_UNKNOWN"
