"""The tenant REST surface against a real CP with simulated agents: Location headers,
pagination and filters, idempotency keys, unknown fields, RFC 3339 instants, env
write-only, DELETE of apps and versions, the raw build-context upload, log queries and
following (SSE), and the replicas' attestation. Every account-scoped check (cursors,
filters, idempotency keys, staged contexts, attestation) is tried across two tenants."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cpkit import RunningCp, running_cp
from test_tenants import COMPOSE, context, reach_state, tenant, workload_of

from ee.cp import tenants
from ee.cp.tenants import MAX_FOLLOWS_PER_ACCOUNT

RFC3339 = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z\Z")
VERSION = {"version": "1.0", "compose": COMPOSE, "expose_port": 8080, "health_path": "/health"}


def error(r: httpx.Response) -> tuple[int, str, Any]:
    body = r.json()["error"]
    return r.status_code, body["code"], body["details"].get("field")


async def with_app(http: httpx.AsyncClient, name: str = "hello", **version: Any) -> None:
    r = await http.post("/api/v2/apps", json={"name": name})
    assert r.status_code == 201, r.text
    r = await http.post(f"/api/v2/apps/{name}/versions",
                        json={**VERSION, "build_context": context(), **version})
    assert r.status_code == 201, r.text


async def two_tenants(env: RunningCp) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    return await tenant(env, "alice"), await tenant(env, "bob")


async def test_locations_and_rfc3339_instants(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            async with env.client() as admin:
                r = await admin.post("/api/v2/accounts", json={"name": "carol"})
                assert r.status_code == 201
                account = r.json()
                assert r.headers["Location"] == f"/api/v2/accounts/{account['account_id']}"
                assert RFC3339.match(account["created_at"])
                r = await admin.get(r.headers["Location"])
                assert r.status_code == 200 and r.json()["name"] == "carol"
            async with env.client(token=account["api_key"]) as http:
                r = await http.post("/api/v2/apps", json={"name": "hello"})
                assert r.headers["Location"] == "/api/v2/apps/hello"
                assert RFC3339.match(r.json()["created_at"])
                assert RFC3339.match((await http.get("/api/v2/apps")).json()["apps"][0]
                                     ["created_at"])
                r = await http.post("/api/v2/apps/hello/versions",
                                    json={**VERSION, "build_context": context()})
                assert r.headers["Location"] == "/api/v2/apps/hello/versions/1.0"
                got = await http.get(r.headers["Location"])
                assert got.status_code == 200 and RFC3339.match(got.json()["created_at"])
                r = await http.post("/api/v2/apps/hello/deployments", json={"version": "1.0"})
                assert r.status_code == 202
                dep = r.json()["deployment_id"]
                assert r.headers["Location"] == f"/api/v2/deployments/{dep}"
                view = await reach_state(http, dep, "running")
                assert RFC3339.match(view["created_at"])
                r = await http.delete(f"/api/v2/deployments/{dep}")
                assert r.status_code == 202
                assert r.headers["Location"] == f"/api/v2/deployments/{dep}"
                r = await http.post("/api/v2/accounts/me/keys")
                assert r.status_code == 201 and r.headers["Location"] == "/api/v2/accounts/me"
            nursery.cancel_scope.cancel()


async def test_pages_filters_and_cursors_are_per_account(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            await nursery.start(env.agent("vm-2").run)
            alice, bob = await two_tenants(env)
            async with alice, bob:
                for name in ("app-a", "app-b", "app-c"):
                    await with_app(alice, name)
                await with_app(bob, "app-zz")
                r = await alice.get("/api/v2/apps", params={"limit": 2})
                assert [a["name"] for a in r.json()["apps"]] == ["app-a", "app-b"]
                cursor = r.json()["next_cursor"]
                r = await alice.get("/api/v2/apps", params={"limit": 2, "cursor": cursor})
                assert [a["name"] for a in r.json()["apps"]] == ["app-c"]
                assert r.json()["next_cursor"] is None
                # Alice's cursor is not Bob's: refused, never a page of anything.
                r = await bob.get("/api/v2/apps", params={"limit": 2, "cursor": cursor})
                assert error(r) == (400, "bad_cursor", "cursor")
                # ... nor another list's.
                r = await alice.get("/api/v2/apps/app-a/versions", params={"cursor": cursor})
                assert error(r) == (400, "bad_cursor", "cursor")
                r = await alice.get("/api/v2/apps", params={"limit": 0})
                assert error(r) == (400, "bad_request", "limit")

                deps = {}
                for name in ("app-a", "app-b"):
                    r = await alice.post(f"/api/v2/apps/{name}/deployments",
                                         json={"version": "1.0"})
                    assert r.status_code == 202, r.text
                    deps[name] = r.json()["deployment_id"]
                r = await alice.get("/api/v2/deployments", params={"app": "app-b"})
                assert [d["deployment_id"] for d in r.json()["deployments"]] == [deps["app-b"]]
                r = await alice.get("/api/v2/deployments", params={"limit": 1})
                first = r.json()
                assert len(first["deployments"]) == 1 and first["next_cursor"]
                r = await alice.get("/api/v2/deployments",
                                    params={"limit": 1, "cursor": first["next_cursor"]})
                seen = {first["deployments"][0]["deployment_id"],
                        r.json()["deployments"][0]["deployment_id"]}
                assert seen == set(deps.values()) and r.json()["next_cursor"] is None
                # Bob's filter by Alice's app name shows nothing of hers.
                r = await bob.get("/api/v2/deployments", params={"app": "app-a"})
                assert r.status_code == 200 and r.json()["deployments"] == []
                r = await bob.get("/api/v2/deployments")
                assert r.json()["deployments"] == []
                r = await alice.get("/api/v2/deployments", params={"app": "Not/An app"})
                assert error(r) == (400, "bad_request", "app")
            nursery.cancel_scope.cancel()


async def test_idempotency_keys(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            await nursery.start(env.agent("vm-2").run)
            alice, bob = await two_tenants(env)
            async with alice, bob:
                key = {"Idempotency-Key": "create-hello-1"}
                first = await alice.post("/api/v2/apps", json={"name": "hello"}, headers=key)
                again = await alice.post("/api/v2/apps", json={"name": "hello"}, headers=key)
                assert first.status_code == again.status_code == 201
                assert again.json() == first.json()
                assert again.headers["Idempotent-Replayed"] == "true"
                assert again.headers["Location"] == "/api/v2/apps/hello"
                r = await alice.post("/api/v2/apps", json={"name": "other"}, headers=key)
                assert error(r) == (409, "idempotency_conflict", "Idempotency-Key")
                # Bob's key of the same name is his own: his app is created, not replayed.
                r = await bob.post("/api/v2/apps", json={"name": "hello"}, headers=key)
                assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
                assert (await bob.get("/api/v2/apps/hello")).status_code == 200

                body = {**VERSION, "build_context": context()}
                vkey = {"Idempotency-Key": "v1"}
                r1 = await alice.post("/api/v2/apps/hello/versions", json=body, headers=vkey)
                r2 = await alice.post("/api/v2/apps/hello/versions", json=body, headers=vkey)
                assert r1.status_code == r2.status_code == 201 and r1.json() == r2.json()

                dkey = {"Idempotency-Key": "deploy-1"}
                d1 = await alice.post("/api/v2/apps/hello/deployments",
                                      json={"version": "1.0"}, headers=dkey)
                d2 = await alice.post("/api/v2/apps/hello/deployments",
                                      json={"version": "1.0"}, headers=dkey)
                assert d1.status_code == d2.status_code == 202
                assert d1.json() == d2.json()
                listed = (await alice.get("/api/v2/deployments")).json()["deployments"]
                assert [d["deployment_id"] for d in listed] == [d1.json()["deployment_id"]]
                # A refusal is not kept: fixed, the same key runs.
                nkey = {"Idempotency-Key": "deploy-2"}
                r = await alice.post("/api/v2/apps/hello/deployments", json={"version": "2.0"},
                                     headers=nkey)
                assert r.status_code == 404
                await alice.post("/api/v2/apps/hello/versions",
                                 json={**body, "version": "2.0"})
                r = await alice.post("/api/v2/apps/hello/deployments", json={"version": "2.0"},
                                     headers=nkey)
                assert r.status_code == 202 and "Idempotent-Replayed" not in r.headers
                r = await alice.post("/api/v2/apps", json={"name": "x"},
                                     headers={"Idempotency-Key": "has space"})
                assert error(r) == (400, "bad_idempotency_key", "Idempotency-Key")
            nursery.cancel_scope.cancel()


async def test_unknown_body_fields_are_refused_by_name(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, \
                await tenant(env, "alice") as http, env.client() as admin:
            r = await admin.post("/api/v2/accounts", json={"name": "x", "role": "admin"})
            assert error(r) == (400, "unknown_field", "role")
            r = await http.post("/api/v2/apps", json={"name": "hello", "public": True})
            assert error(r) == (400, "unknown_field", "public")
            await with_app(http)
            r = await http.post("/api/v2/apps/hello/versions",
                                json={**VERSION, "version": "2", "privileged": True})
            assert error(r) == (400, "unknown_field", "privileged")
            r = await http.post("/api/v2/apps/hello/preflight",
                                json={"version": "1.0", "replica": 2})
            assert error(r) == (400, "unknown_field", "replica")
            r = await http.post("/api/v2/apps/hello/deployments",
                                json={"version": "1.0", "constraints": {"zone": "x"}})
            assert error(r) == (400, "unknown_field", "constraints.zone")
            r = await http.post("/api/v2/accounts/me/keys", json={"keep_old": True})
            assert error(r) == (400, "unknown_field", "keep_old")
            # Nothing was written by the refusals.
            versions = (await http.get("/api/v2/apps/hello/versions")).json()["versions"]
            assert [v["version"] for v in versions] == ["1.0"]


async def test_env_is_write_only_and_in_the_hash(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, await tenant(env, "alice") as http:
            await with_app(http, env={"TOKEN": "value-one"})
            r = await http.post("/api/v2/apps/hello/versions", json={
                **VERSION, "version": "2.0", "build_context": context(),
                "env": {"TOKEN": "value-two"}})
            assert r.status_code == 201
            for path in ("/api/v2/apps/hello/versions", "/api/v2/apps/hello/versions/1.0",
                         "/api/v2/apps/hello"):
                text = (await http.get(path)).text
                assert "value-one" not in text and "value-two" not in text
            versions = (await http.get("/api/v2/apps/hello/versions")).json()["versions"]
            assert [v["env_names"] for v in versions] == [["TOKEN"], ["TOKEN"]]
            assert all("env" not in v for v in versions)
            one, two = (v["compose_hash"] for v in versions)
            assert one != two
            ctx = base64.b64decode(context())
            assert one == workload_of(COMPOSE, ctx, port=8080, health="/health",
                                      env={"TOKEN": "value-one"})


async def test_delete_apps_and_versions_only_when_not_deployed(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            alice, bob = await two_tenants(env)
            async with alice, bob:
                await with_app(alice)
                r = await alice.put("/api/v2/apps/hello/secrets/db_password",
                                    json={"value": "hunter2"})
                assert r.status_code == 201, r.text
                await alice.post("/api/v2/apps/hello/versions",
                                 json={**VERSION, "version": "2.0", "build_context": context()})
                r = await alice.post("/api/v2/apps/hello/deployments", json={"version": "1.0"})
                dep = r.json()["deployment_id"]
                await reach_state(alice, dep, "running")
                r = await alice.delete("/api/v2/apps/hello/versions/1.0")
                assert error(r)[:2] == (409, "deployed")
                assert r.json()["error"]["details"]["deployments"] == [dep]
                r = await alice.delete("/api/v2/apps/hello")
                assert error(r)[:2] == (409, "deployed")
                # Bob cannot touch Alice's app (nor learn it exists).
                assert (await bob.delete("/api/v2/apps/hello")).status_code == 404
                assert (await bob.delete("/api/v2/apps/hello/versions/2.0")).status_code == 404
                # An unused version goes at once; the deployment runs on.
                assert (await alice.delete("/api/v2/apps/hello/versions/2.0")).status_code == 204
                r = await alice.get("/api/v2/apps/hello/versions/2.0")
                assert r.status_code == 404
                assert (await alice.delete("/api/v2/apps/hello/versions/2.0")).status_code == 404
                await reach_state(alice, dep, "running")
                await alice.delete(f"/api/v2/deployments/{dep}")
                await reach_state(alice, dep, "stopped")
                assert (await alice.delete("/api/v2/apps/hello/versions/1.0")).status_code == 204
                # A version that landed on disk after the app listed its versions (the
                # race of a POST …/versions with the DELETE) goes with the app too.
                key = f"{(await alice.get('/api/v2/accounts/me')).json()['account_id']}.hello"
                env.cp.manifests.write("versions", f"{key}/3.0", {
                    **VERSION, "version": "3.0", "app": key, "compose_hash": "sha256:00"})
                assert (await alice.delete("/api/v2/apps/hello")).status_code == 204
                assert [v for v in env.cp.manifests.load("versions")[0]
                        if v.get("app") == key] == []
                assert (await alice.get("/api/v2/apps/hello")).status_code == 404
                assert (await alice.get(f"/api/v2/deployments/{dep}")).status_code == 404
                # A new app of that name starts empty (nothing of the old one comes back).
                r = await alice.post("/api/v2/apps", json={"name": "hello"})
                assert r.status_code == 201 and r.json()["versions"] == []
                assert r.json()["deployments"] == []
                r = await alice.get("/api/v2/apps/hello/secrets")
                assert r.status_code == 200 and "db_password" not in r.text
            nursery.cancel_scope.cancel()


def gzip_context() -> bytes:
    return base64.b64decode(context())


async def test_raw_gzip_build_context(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            alice, bob = await two_tenants(env)
            async with alice, bob:
                for http in (alice, bob):
                    assert (await http.post("/api/v2/apps", json={"name": "hello"})
                            ).status_code == 201
                raw = gzip_context()
                gz = {"Content-Type": "application/gzip"}
                r = await alice.put("/api/v2/apps/hello/versions/1.0/context", content=raw,
                                    headers=gz)
                assert r.status_code == 201, r.text
                assert r.headers["Location"] == "/api/v2/apps/hello/versions/1.0/context"
                assert r.json()["bytes"] == len(raw)
                # Bob cannot use what Alice staged under the same app and version names.
                r = await bob.post("/api/v2/apps/hello/versions",
                                   json={**VERSION, "build_context_staged": True})
                assert error(r) == (409, "no_staged_context", "build_context_staged")
                r = await alice.post("/api/v2/apps/hello/versions",
                                     json={**VERSION, "build_context_staged": True})
                assert r.status_code == 201, r.text
                staged = r.json()
                assert staged["has_build_context"] is True
                assert staged["compose_hash"] == workload_of(COMPOSE, raw, port=8080,
                                                             health="/health")
                # Taken: a second version cannot take it again.
                r = await alice.post("/api/v2/apps/hello/versions",
                                     json={**VERSION, "version": "1.0",
                                           "build_context_staged": True})
                assert r.status_code == 409
                # Same bytes as JSON base64: the same hash.
                r = await alice.post("/api/v2/apps/hello/versions", json={
                    **VERSION, "version": "1.1", "build_context": context()})
                assert r.json()["compose_hash"] == staged["compose_hash"]
                r = await alice.put("/api/v2/apps/hello/versions/1.0/context", content=raw,
                                    headers=gz)
                assert error(r)[:2] == (409, "conflict")  # versions are immutable
                r = await alice.put("/api/v2/apps/hello/versions/2/context", content=raw,
                                    headers={"Content-Type": "application/json"})
                assert error(r)[:2] == (415, "unsupported_media_type")
                r = await alice.put("/api/v2/apps/hello/versions/2/context",
                                    content=b"not gzip", headers=gz)
                assert error(r) == (400, "bad_request", "body")
                r = await alice.put("/api/v2/apps/hello/versions/bad%20v/context",
                                    content=raw, headers=gz)
                assert error(r) == (400, "bad_request", "version")
                r = await bob.put("/api/v2/apps/nope/versions/2/context", content=raw,
                                  headers=gz)
                assert r.status_code == 404
                r = await alice.post("/api/v2/apps/hello/versions", json={
                    **VERSION, "version": "3", "build_context": context(),
                    "build_context_staged": True})
                assert error(r) == (400, "bad_request", "build_context_staged")


async def test_staging_is_shared_fairly(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One tenant staging up to the CP's limit does not keep another out: the oldest
    of the account holding the most goes; 429 only for the one that holds the most."""
    raw = gzip_context()
    monkeypatch.setattr(tenants, "MAX_STAGED_BYTES", 3 * len(raw))
    gz = {"Content-Type": "application/gzip"}
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            alice, bob = await two_tenants(env)
            async with alice, bob:
                for http in (alice, bob):
                    assert (await http.post("/api/v2/apps", json={"name": "hello"})
                            ).status_code == 201
                for v in ("3.0", "4.0", "5.0"):  # the CP's whole staging, Alice's
                    r = await alice.put(f"/api/v2/apps/hello/versions/{v}/context",
                                        content=raw, headers=gz)
                    assert r.status_code == 201, r.text
                r = await bob.put("/api/v2/apps/hello/versions/1.0/context", content=raw,
                                  headers=gz)
                assert r.status_code == 201, r.text  # was: 429 staging_full
                # Alice's oldest made the room; her others are still there.
                r = await alice.post("/api/v2/apps/hello/versions", json={
                    **VERSION, "version": "3.0", "build_context_staged": True})
                assert error(r)[:2] == (409, "no_staged_context")
                r = await alice.post("/api/v2/apps/hello/versions", json={
                    **VERSION, "version": "5.0", "build_context_staged": True})
                assert r.status_code == 201, r.text
                r = await bob.post("/api/v2/apps/hello/versions", json={
                    **VERSION, "build_context_staged": True})
                assert r.status_code == 201, r.text


def test_staging_evictions_take_from_the_biggest_holder() -> None:
    held = {("a", "x", "1"): (40, 1.0), ("a", "x", "2"): (40, 2.0), ("a", "x", "3"): (40, 3.0)}
    assert tenants._staging_evictions(held, "b", 40, 128) == [("a", "x", "1")]
    assert tenants._staging_evictions(held, "a", 40, 128) == [("a", "x", "1")]
    assert tenants._staging_evictions(held, "b", 8, 128) == []
    # The newcomer alone would hold the most: nothing fair to drop.
    assert tenants._staging_evictions({("a", "x", "1"): (50, 1.0)}, "b", 60, 100) is None
    # Always from whoever holds the most (the newcomer's bytes counted as its own).
    held = {("a", "x", "1"): (30, 1.0), ("a", "x", "2"): (30, 2.0),
            ("c", "y", "1"): (30, 0.5)}
    assert tenants._staging_evictions(held, "b", 40, 100) == [("a", "x", "1")]
    assert tenants._staging_evictions(held, "c", 40, 100) == [("c", "y", "1")]  # its own
    assert tenants._staging_evictions(held, "b", 60, 100) is None  # b would hold the most
    assert tenants._staging_evictions(held, "a", 70, 100) == [("a", "x", "1"),
                                                               ("a", "x", "2")]


async def test_logs_queries_follow_and_attestation(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            alice, bob = await two_tenants(env)
            async with alice, bob:
                await with_app(alice)
                r = await alice.post("/api/v2/apps/hello/deployments", json={"version": "1.0"})
                dep = r.json()["deployment_id"]
                view = await reach_state(alice, dep, "running")
                logs = f"/api/v2/deployments/{dep}/logs"
                for params, field in [({"since": "yesterday"}, "since"),
                                      ({"since": "2026-12-01T07:00:00"}, "since"),
                                      ({"service": "../etc"}, "service"),
                                      ({"follow": "yes"}, "follow"),
                                      ({"tail": "0"}, "tail")]:
                    assert error(await alice.get(logs, params=params)) == (
                        400, "bad_request", field), params
                r = await alice.get(logs, params={"since": "2026-12-01T08:00:00+01:00",
                                                  "service": "web", "tail": 5})
                assert r.status_code == 200 and r.json()["deployment_id"] == dep
                r = await alice.get(logs, params={"follow": "true"},
                                    headers={"Last-Event-ID": "not a time"})
                assert error(r) == (400, "bad_request", "Last-Event-ID")
                assert (await bob.get(logs)).status_code == 404
                assert (await bob.get(logs, params={"follow": "true"})).status_code == 404

                # Attestation: Alice sees her replica's agent as the CP verified it.
                att = await alice.get(f"/api/v2/deployments/{dep}/attestation")
                assert att.status_code == 200, att.text
                doc = att.json()
                assert doc["attested"] is True and doc["compose_hash"] == view["compose_hash"]
                (replica,) = doc["replicas"]
                assert replica["attested"] is True
                assert replica["attestation"]["verdict"] in ("pass", "warn")
                assert replica["attestation"]["provider"] == "sim"
                assert re.fullmatch(r"[0-9a-f]{64,}", replica["attestation"]["mrtd"])
                assert RFC3339.match(replica["attestation"]["verified_at"])
                r = await bob.get(f"/api/v2/deployments/{dep}/attestation")
                assert r.status_code == 404

                # Follow: an event stream that does not hold up other requests and ends
                # (with a reason) when the deployment stops.
                got: list[str] = []
                async with alice.stream("GET", logs, params={"follow": "true"}) as stream:
                    assert stream.status_code == 200
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    assert (await alice.get("/api/v2/apps")).status_code == 200
                    assert (await alice.delete(f"/api/v2/deployments/{dep}")).status_code == 202
                    async for text in stream.aiter_text():
                        got.append(text)
                assert got and "event: end" in "".join(got)
                assert '"reason": "stopped"' in "".join(got)
            nursery.cancel_scope.cancel()


async def test_follow_streams_are_capped_per_account(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            alice, bob = await two_tenants(env)
            async with alice, bob:
                await with_app(alice)
                r = await alice.post("/api/v2/apps/hello/deployments", json={"version": "1.0"})
                dep = r.json()["deployment_id"]
                logs = f"/api/v2/deployments/{dep}/logs"
                opened: list[Any] = []
                for _ in range(MAX_FOLLOWS_PER_ACCOUNT):
                    ctx = alice.stream("GET", logs, params={"follow": "true"})
                    stream = await ctx.__aenter__()
                    assert stream.status_code == 200
                    opened.append(ctx)
                r = await alice.get(logs, params={"follow": "true"})
                assert error(r)[:2] == (429, "too_many_streams")
                assert r.headers["Retry-After"]
                for ctx in opened:
                    await ctx.__aexit__(None, None, None)
            nursery.cancel_scope.cancel()


async def test_large_bodies_in_flight_are_capped_per_caller(tmp_path: Path) -> None:
    """Each authenticated request may hold ``max_request_bytes`` of body: a tenant with
    many slow (or chunked) uploads open at once would fill the CP's memory. Large
    bodies take a slot of their caller before a byte is read; none free is a 429."""
    size = 4 << 20
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            alice, bob = await two_tenants(env)
            async with alice, bob:
                await with_app(alice)
                go, both = trio.Event(), trio.Event()
                answers: list[int] = []
                put = "/api/v2/apps/hello/versions/9.{}/context"

                async def stalled(i: int, chunked: bool) -> None:
                    async def body() -> Any:
                        yield b"\0" * 1024
                        await go.wait()
                        yield b"\0" * (size - 1024)

                    headers = {"Content-Type": "application/gzip"}
                    if not chunked:
                        headers["Content-Length"] = str(size)
                    r = await alice.put(put.format(i), content=body(), headers=headers)
                    answers.append(r.status_code)
                    if len(answers) == 2:
                        both.set()

                nursery.start_soon(stalled, 1, False)
                nursery.start_soon(stalled, 2, True)
                await trio.sleep(1)  # both are being read (slowly) now
                r = await alice.put(put.format(3), content=b"\0" * size,
                                    headers={"Content-Type": "application/gzip"})
                assert error(r)[:2] == (429, "too_many_uploads")
                assert r.headers["Retry-After"]
                # Small bodies, and other tenants, are not held back.
                assert (await alice.get("/api/v2/apps/hello")).status_code == 200
                r = await bob.post("/api/v2/apps", json={"name": "b"})
                assert r.status_code == 201
                go.set()
                await both.wait()
                assert answers == [400, 400]  # read whole, then refused: not a tar.gz
                # Their slots are back; so are those of uploads the client gave up on.
                for i in range(3):
                    sock = await trio.open_tcp_stream("127.0.0.1", env.cp.http_port)
                    await sock.send_all(
                        f"PUT {put.format(i)} HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: {alice.headers['Authorization']}\r\n"
                        f"Content-Type: application/gzip\r\nContent-Length: {size}\r\n"
                        "\r\n".encode() + b"\0" * 4096)
                    await trio.sleep(0.3)
                    await sock.aclose()
                await trio.sleep(0.3)
                r = await alice.put(put.format(3), content=b"\0" * size,
                                    headers={"Content-Type": "application/gzip"})
                assert error(r)[:2] == (400, "bad_request")
            nursery.cancel_scope.cancel()
