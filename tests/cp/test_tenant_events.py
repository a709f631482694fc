"""The tenant event stream (``GET /api/v2/events``, websocket): only the events of the
caller's own apps and deployments, ``?app=`` narrows to one app, a tenant API key is
required, and a stream whose key is revoked closes.

Real CP (in-process, real listeners), real websockets, simulated agents.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from cpkit import RunningCp, running_cp
from test_sessions import FAST
from test_tenants import reach_state, setup_app

from ee.cp import deployment_routes
from ee.cp.deployment_routes import tenant_event
from ee.cp.events import Event


def ws_url(env: RunningCp, query: str = "") -> str:
    return f"ws://127.0.0.1:{env.cp.http_port}/api/v2/events{query}"


def auth(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


async def key_of(env: RunningCp, name: str) -> tuple[str, str]:
    """(account id, API key) of a new tenant."""
    async with env.client() as admin:
        r = await admin.post("/api/v2/accounts", json={"name": name})
        assert r.status_code == 201, r.text
        return str(r.json()["account_id"]), str(r.json()["api_key"])


async def collect(ws: trio_websocket.WebSocketConnection, quiet: float = 0.5
                  ) -> list[dict[str, Any]]:
    """Every event until the stream is quiet for *quiet* seconds."""
    out: list[dict[str, Any]] = []
    while True:
        with trio.move_on_after(quiet) as idle:
            out.append(json.loads(await ws.get_message()))
        if idle.cancelled_caught:
            return out


async def deploy_running(http: httpx.AsyncClient, app: str) -> str:
    r = await http.post(f"/api/v2/apps/{app}/deployments", json={"version": "1.0"})
    assert r.status_code == 202, r.text
    dep_id = str(r.json()["deployment_id"])
    await reach_state(http, dep_id, "running")
    return dep_id


# ---- the filter itself ------------------------------------------------------------------

def event(kind: str, subject: str, **data: Any) -> Event:
    return Event(1, 0.0, kind, subject, data)


def test_tenant_event_filter() -> None:
    index = {"dep-a": "acct-a.web", "dep-b": "acct-b.web"}.get
    seen = tenant_event(event("deployment.state", "dep-a", state="running"), "acct-a", index)
    assert seen is not None and seen["subject"] == "dep-a"
    assert tenant_event(event("deployment.state", "dep-b"), "acct-a", index) is None
    # Not in the index yet: the app actor's own naming of its app decides.
    assert tenant_event(event("deployment.created", "dep-new", app="acct-a.web"),
                        "acct-a", index) is not None
    assert tenant_event(event("deployment.created", "dep-new", app="acct-b.web"),
                        "acct-a", index) is None
    # The index wins over what the data says.
    assert tenant_event(event("replica.failed", "dep-b", app="acct-a.web"),
                        "acct-a", index) is None
    assert tenant_event(event("app.version", "acct-a.web"), "acct-a", index) is not None
    assert tenant_event(event("app.version", "acct-ab.web"), "acct-a", index) is None
    # A replica's secret release/revocation is about a deployment: the index decides
    # (it was taken for an app key, and reached no one).
    released = event("secret.released", "dep-a", app="acct-a.web", agent_id="ag-1")
    assert tenant_event(released, "acct-a", index) is not None
    assert tenant_event(released, "acct-b", index) is None
    assert tenant_event(event("secret.revoked", "dep-b", app="acct-a.web"), "acct-a",
                        index) is None
    assert tenant_event(event("secret.key_refused", "ag-1"), "acct-a", index) is None
    assert tenant_event(event("billing.suspended", "dep-a"), "acct-a", index) is not None
    # Other kinds never, whatever the subject looks like (a VM named like an app key).
    for kind in ("identity.bound", "agent.status", "registration", "account.created",
                 "billing.resumed"):
        assert tenant_event(event(kind, "acct-a.web", app="acct-a.web"), "acct-a",
                            index) is None
    # ?app= narrows to one app.
    assert tenant_event(event("deployment.state", "dep-a"), "acct-a", index,
                        "other") is None
    # A stray claiming another app under a tenant's deployment id: the name is hidden.
    stray = tenant_event(event("replica.stray", "dep-a", claimed_app="acct-b.web"),
                         "acct-a", index)
    assert stray is not None and stray["data"]["claimed_app"] == "another app"


# ---- end to end ---------------------------------------------------------------------------

async def test_events_of_the_callers_own_apps_only(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env, trio.open_nursery() as nursery:
            for i in range(3):
                await nursery.start(env.agent(f"vm-{i}").run)
            account_a, key_a = await key_of(env, "a")
            account_b, key_b = await key_of(env, "b")
            a, b = env.client(token=key_a), env.client(token=key_b)
            async with a, b, trio_websocket.open_websocket_url(
                    ws_url(env), extra_headers=auth(key_a)) as ws_a, \
                    trio_websocket.open_websocket_url(
                        ws_url(env, "?app=first"), extra_headers=auth(key_a)) as ws_first:
                await setup_app(b, "hello")
                theirs = await deploy_running(b, "hello")
                await setup_app(a, "first")
                await setup_app(a, "second")
                mine = await deploy_running(a, "first")
                other = await deploy_running(a, "second")
                r = await a.delete(f"/api/v2/deployments/{mine}")
                assert r.status_code == 202
                await reach_state(a, mine, "stopped")
                got = await collect(ws_a)
                first_only = await collect(ws_first)
            text = json.dumps(got)
            # Nothing of tenant b's reached tenant a: not its account, app or deployment.
            assert account_b not in text and theirs not in text
            # What a saw is a's own: its apps and deployments, from creation to stop.
            kinds = {(e["kind"], e["subject"]) for e in got}
            assert ("app.created", f"{account_a}.first") in kinds
            assert ("deployment.created", mine) in kinds
            assert ("replica.placed", mine) in kinds
            assert ("deployment.state", other) in kinds
            states = [e["data"]["state"] for e in got
                      if e["kind"] == "deployment.state" and e["subject"] == mine]
            assert states[-1] == "stopped" and "running" in states
            for e in got:
                owner = e["subject"] if e["kind"].startswith("app.") else e["data"]["app"]
                assert owner.startswith(f"{account_a}."), e
            # ?app=first: only that app's events.
            assert first_only and other not in json.dumps(first_only)
            assert any(e["subject"] == mine for e in first_only)
            nursery.cancel_scope.cancel()


async def test_event_streams_are_capped_per_account(tmp_path: Path) -> None:
    """Each stream is a subscriber every event is fanned out to: a tenant may hold
    ``MAX_STREAMS_PER_ACCOUNT``; one more is closed at once (1013), and a closed one
    gives its place back."""
    cap = deployment_routes.MAX_STREAMS_PER_ACCOUNT
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            _, key = await key_of(env, "a")
            _, other = await key_of(env, "b")
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(cap):
                    await stack.enter_async_context(trio_websocket.open_websocket_url(
                        ws_url(env), extra_headers=auth(key)))
                async with trio_websocket.open_websocket_url(
                        ws_url(env), extra_headers=auth(key)) as ws:
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 1013
                # Another tenant is not held back by this one's streams.
                async with trio_websocket.open_websocket_url(
                        ws_url(env), extra_headers=auth(other)) as ws:
                    with trio.move_on_after(0.5) as quiet:
                        await ws.get_message()
                    assert quiet.cancelled_caught  # open, nothing to say
            # Closed: their places are back.
            for _ in range(cap):
                async with trio_websocket.open_websocket_url(
                        ws_url(env), extra_headers=auth(key)) as ws:
                    with trio.move_on_after(0.5) as quiet:
                        await ws.get_message()
                    assert quiet.cancelled_caught


async def test_the_stream_needs_a_live_tenant_key(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployment_routes, "RECHECK_S", 0.2)
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env:
            _, key = await key_of(env, "a")
            for headers, query in (([], ""), (auth(env.token), ""), (auth("ee_kx_nope"), ""),
                                   ([], f"?token={key[:-2]}xx"), (auth(key), "?app=../x")):
                with pytest.raises(trio_websocket.HandshakeError):
                    async with trio_websocket.open_websocket_url(
                            ws_url(env, query), extra_headers=headers) as ws:
                        await ws.get_message()
            # A live key opens it (also as ?token=, for clients without headers) ...
            async with trio_websocket.open_websocket_url(ws_url(env, f"?token={key}")):
                pass
            async with trio_websocket.open_websocket_url(
                    ws_url(env), extra_headers=auth(key)) as ws:
                # ... and a rotated (revoked) key closes it.
                async with env.client(token=key) as http:
                    r = await http.post("/api/v2/accounts/me/keys")
                    assert r.status_code == 201
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.reason.code == 1008
