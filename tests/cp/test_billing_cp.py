"""Billing through a real CP: the routes and their refusals, the signed payment webhook,
metering a real deployment, and a CP restart with its history store wiped."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from cpkit import RunningCp, free_port, running_cp
from test_sessions import FAST, wait_until
from test_tenants import reach_state, setup_app, tenant

from ee.cp.billing_routes import ledger_csv, sign_payment, tenant_entry
from ee.cp.store import ledger
from pgkit import pg_server  # noqa: F401  (fixture)

SECRET = b"whsec-test-secret-of-at-least-32-bytes"
QUIET = {"billing": {"interval_s": 3600.0}}  # the tests tick the meter themselves


async def admin_post(env: RunningCp, path: str, body: Any) -> httpx.Response:
    async with env.client() as admin:
        return await admin.post(path, json=body)


async def ledger_summary(env: RunningCp) -> dict[str, int]:
    assert env.cp.accounts is not None
    result: dict[str, int] = await env.cp.accounts._call(ledger.summary)
    return result


async def test_credits_balance_ledger_and_their_refusals(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **QUIET) as env:
            http = await tenant(env, "alice")
            prov = await admin_post(env, "/api/v2/accounts",
                                    {"name": "p", "kind": "provisioner"})
            good = {"amount_minor": 2500, "currency": "USD", "reason": "welcome",
                    "idempotency_key": "welcome-1"}
            async with http:
                account = (await http.get("/api/v2/accounts/me")).json()["account_id"]
                credits = f"/api/v2/admin/accounts/{account}/credits"
                r = await http.get("/api/v2/accounts/me/balance")
                assert r.json()["balance_minor"] == 0 and r.json()["currency"] == "USD"
                # Tenants cannot credit themselves.
                assert (await http.post(credits, json=good)).status_code == 403
                for bad in ({**good, "amount_minor": -5}, {**good, "amount_minor": 0},
                            {**good, "amount_minor": 2.5}, {**good, "amount_minor": "9"},
                            {**good, "amount_minor": True}, {**good, "currency": "EUR"},
                            {**good, "reason": ""}, {**good, "idempotency_key": "a b"},
                            {**good, "extra": 1}, {k: v for k, v in good.items()
                                                   if k != "reason"}):
                    r = await admin_post(env, credits, bad)
                    assert r.status_code == 400, (bad, r.text)
                    assert r.json()["error"]["code"] == "bad_request"
                r = await admin_post(env, "/api/v2/admin/accounts/acct-nope/credits", good)
                assert r.status_code == 404
                r = await admin_post(env, f"/api/v2/admin/accounts/"
                                     f"{prov.json()['account_id']}/credits", good)
                assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_tenant"
                assert (await ledger_summary(env))["transactions"] == 0  # nothing written

                first = await admin_post(env, credits, good)
                assert first.status_code == 201, first.text
                again = await admin_post(env, credits, good)
                assert again.status_code == 200
                assert again.json()["transaction"] == first.json()["transaction"]
                clash = await admin_post(env, credits, {**good, "amount_minor": 9})
                assert clash.status_code == 409
                assert clash.json()["error"]["code"] == "idempotency_conflict"
                assert (await http.get("/api/v2/accounts/me")).json()["balance"] == 2500
                r = await http.get("/api/v2/accounts/me/balance")
                assert r.json() == {"account_id": account, "balance_minor": 2500,
                                    "currency": "USD", "low_balance": False,
                                    "suspended": False}
                assert env.cp.accounts is not None
                audit = await env.cp.accounts.audit(actor="admin", target=account)
                assert [a.action for a in audit] == ["billing.credit"]

                # A suspended account places nothing (402); the hold lifted, it may again.
                from ee.cp.store import ledger as ledger_sql
                assert (await http.post("/api/v2/apps", json={"name": "paid"})
                        ).status_code == 201
                await env.cp.accounts._call(
                    lambda conn: ledger_sql.set_hold(conn, account, 1, 2))
                r = await http.post("/api/v2/apps/paid/deployments",
                                    json={"version": "1", "replicas": 1})
                assert r.status_code == 402 and r.json()["error"]["code"] == "payment_required"
                await env.cp.accounts._call(lambda conn: ledger_sql.clear_hold(conn, account))
                r = await http.post("/api/v2/apps/paid/deployments",
                                    json={"version": "1", "replicas": 1})
                assert r.status_code == 404  # past the hold: the version does not exist

                # A correction is a new transaction referencing the first.
                txn = first.json()["transaction"]["txn_id"]
                r = await admin_post(env, f"/api/v2/admin/ledger/{txn}/corrections",
                                     {"reason": "wrong account", "idempotency_key": "fix"})
                assert r.status_code == 201 and r.json()["transaction"]["corrects"] == txn
                assert (await admin_post(env, "/api/v2/admin/ledger/999999/corrections", {
                    "reason": "x", "idempotency_key": "y"})).status_code == 404
                # Once: the same key again is the same correction, another key is refused.
                r = await admin_post(env, f"/api/v2/admin/ledger/{txn}/corrections",
                                     {"reason": "wrong account", "idempotency_key": "fix"})
                assert r.status_code == 200 and r.json()["transaction"]["corrects"] == txn
                r = await admin_post(env, f"/api/v2/admin/ledger/{txn}/corrections",
                                     {"reason": "again", "idempotency_key": "fix-2"})
                assert r.status_code == 409, r.text
                assert r.json()["error"]["code"] == "already_corrected"
                # A key the schema accepts fits behind its prefix; a longer one is a
                # clear 400 (not a 404 for the transaction, not a 500).
                r = await admin_post(env, f"/api/v2/admin/ledger/{txn}/corrections",
                                     {"reason": "x", "idempotency_key": "k" * 190})
                assert r.status_code == 400 and "1..180" in r.text, r.text
                long_key = {**good, "idempotency_key": "L" * 180, "amount_minor": 1}
                r = await admin_post(env, credits, long_key)
                assert r.status_code == 201, r.text
                correction = f"/api/v2/admin/ledger/{r.json()['transaction']['txn_id']}" \
                    "/corrections"
                r = await admin_post(env, correction, {"reason": "x",
                                                       "idempotency_key": "C" * 180})
                assert r.status_code == 201, r.text
                for key in ("L" * 181, "L" * 200):
                    r = await admin_post(env, credits, {**long_key, "idempotency_key": key})
                    assert r.status_code == 400 and "1..180" in r.text, r.text
                r = await http.get("/api/v2/accounts/me/ledger", params={"limit": 3})
                page = r.json()
                assert [e["amount_minor"] for e in page["entries"]] == [-1, 1, -2500]
                r = await http.get("/api/v2/accounts/me/ledger",
                                   params={"before": page["next_before"]})
                assert [e["amount_minor"] for e in r.json()["entries"]] == [2500]
                # The tenant sees no platform-wide ids (they count everyone's entries).
                for entry in page["entries"] + r.json()["entries"]:
                    assert set(entry) == {"at", "kind", "amount_minor", "currency", "memo",
                                          "idempotency_key"}, entry
                r = await http.get("/api/v2/accounts/me/ledger", params={"format": "csv"})
                assert r.headers["content-type"].startswith("text/csv")
                lines = r.text.splitlines()
                assert lines[0] == "at,kind,amount_minor,currency,memo,idempotency_key"
                assert len(lines) == 5 and ",-2500," in lines[3]
                for params in ({"limit": 501}, {"limit": 0}, {"limit": "x"},
                               {"before": "-1"}, {"format": "xml"}):
                    r = await http.get("/api/v2/accounts/me/ledger", params=params)
                    assert r.status_code == 400, params
                    r = await http.get("/api/v2/accounts/me/usage", params=params)
                    assert r.status_code in (200, 400)
                assert (await http.get("/api/v2/accounts/me/usage",
                                       params={"limit": 501})).status_code == 400
            async with env.client() as admin:
                r = await admin.get("/api/v2/admin/billing/verify")
                assert r.json()["ok"] is True, r.text
                prices = (await admin.get("/api/v2/admin/prices")).json()
                assert prices["current"]["version"] == 1
                assert prices["current"]["vcpu_hour_micro"] == 40_000
                r = await admin.put("/api/v2/admin/prices", json={
                    **{k: v for k, v in prices["current"].items() if k != "version"},
                    "gpu_hour_micro": 600_000})
                assert r.status_code == 201 and r.json()["version"] == 2
                r = await admin.put("/api/v2/admin/prices", json={"vcpu_hour_micro": 0.04})
                assert r.status_code == 400
                assert (await admin.get("/api/v2/admin/earnings")).status_code == 200
                overview = (await admin.get("/api/v2/admin/billing")).json()
            from ee.ctl.billing import billing_overview

            text = billing_overview(overview)
            assert account in text and "no charge pass yet" in text
            assert "suspended accounts: none" in text
            cli = await trio.run_process(
                [sys.executable, "-m", "ee.ctl.main", "billing", "verify", "--cp", env.http,
                 "--token", env.token], capture_stdout=True, check=False)
            assert cli.returncode == 0 and b"every invariant holds" in cli.stdout
            cli = await trio.run_process(
                [sys.executable, "-m", "ee.ctl.main", "billing", "verify", "--cp", env.http,
                 "--token", "wrong"], capture_stdout=True, capture_stderr=True, check=False)
            assert cli.returncode == 1 and b"403" in cli.stderr


def signed(body: dict[str, Any], at: float, secret: bytes = SECRET) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    return {"content": raw, "headers": {"EE-Signature": sign_payment(secret, raw, int(at)),
                                        "Content-Type": "application/json"}}


async def test_payment_webhook_needs_a_fresh_valid_signature(tmp_path: Path) -> None:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", billing={
                "interval_s": 3600.0, "webhook_secret_file": str(secret_file)}) as env:
            http = await tenant(env, "bob")
            url = "/api/v2/billing/payments"
            async with env.client(token=None) as anyone, http:
                account = (await http.get("/api/v2/accounts/me")).json()["account_id"]
                body = {"event_id": "evt_1", "account_id": account, "amount_minor": 1000,
                        "currency": "USD"}
                forged = await anyone.post(url, **signed(body, time.time(), b"guess"))
                assert forged.status_code == 401
                assert forged.json()["error"]["code"] == "bad_signature"
                unsigned = await anyone.post(url, json=body)
                assert unsigned.status_code == 401
                stale = await anyone.post(url, **signed(body, time.time() - 3600))
                assert stale.json()["error"]["code"] == "stale_signature"
                # A signed body altered in flight:
                ok = signed(body, time.time())
                tampered = {**ok, "content": ok["content"].replace(b"1000", b"9000")}
                assert (await anyone.post(url, **tampered)).status_code == 401
                assert (await ledger_summary(env))["transactions"] == 0
                first = await anyone.post(url, **ok)
                assert first.status_code == 201, first.text
                replay = await anyone.post(url, **ok)
                assert replay.status_code == 200
                assert replay.json()["transaction"]["txn_id"] == \
                    first.json()["transaction"]["txn_id"]
                r = await anyone.post(url, **signed({**body, "event_id": "evt_2",
                                                     "account_id": "acct-nope"}, time.time()))
                assert r.status_code == 404
                r = await anyone.post(url, **signed({**body, "amount_minor": -1},
                                                    time.time()))
                assert r.status_code == 400
                assert (await http.get("/api/v2/accounts/me/balance")).json()[
                    "balance_minor"] == 1000


def test_the_tenant_ledger_leaves_out_global_ids_and_usage_keys() -> None:
    row = {"entry_id": 9912, "txn_id": 4410, "at": "t", "kind": "charge", "memo": "d r w",
           "idempotency_key": "usage:77123", "corrects": None, "amount_minor": -3,
           "currency": "USD"}
    assert tenant_entry(row) == {"at": "t", "kind": "charge", "amount_minor": -3,
                                 "currency": "USD", "memo": "d r w",
                                 "idempotency_key": None}
    credit = {**row, "kind": "credit", "idempotency_key": "credit:welcome-1"}
    assert tenant_entry(credit)["idempotency_key"] == "credit:welcome-1"
    text = ledger_csv([tenant_entry(row), tenant_entry({**row, "corrects": 4410})])
    assert "9912" not in text and "4410" not in text and "77123" not in text


async def test_a_webhook_secret_cut_short_after_start_is_503_and_writes_nothing(
        tmp_path: Path) -> None:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET)
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", billing={
                "interval_s": 3600.0, "webhook_secret_file": str(secret_file)}) as env:
            http = await tenant(env, "carol")
            async with env.client(token=None) as anyone, http:
                account = (await http.get("/api/v2/accounts/me")).json()["account_id"]
                body = {"event_id": "evt_1", "account_id": account, "amount_minor": 1000,
                        "currency": "USD"}
                for content in (b"", b"\n", b"x"):
                    secret_file.write_bytes(content)  # anyone can HMAC with this
                    r = await anyone.post("/api/v2/billing/payments",
                                          **signed(body, time.time(), content.strip()))
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "webhook_misconfigured"
                secret_file.unlink()
                r = await anyone.post("/api/v2/billing/payments",
                                      **signed(body, time.time(), b""))
                assert r.status_code == 503
                assert (await ledger_summary(env))["transactions"] == 0


async def test_webhook_is_off_unless_configured(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", **QUIET) as env, env.client(None) as anyone:
            r = await anyone.post("/api/v2/billing/payments",
                                  **signed({"event_id": "e"}, time.time()))
            assert r.status_code == 404


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_real_deployment_is_metered_across_a_restart_with_history_wiped(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    database = None
    if backend == "postgresql":
        database = request.getfixturevalue("pg_server").new_database()
    data = tmp_path / "cp"
    listen = f"127.0.0.1:{free_port()}"
    base = (int(time.time()) // 60 + 10) * 60  # a minute boundary ahead: fake wall time
    offset = [0.0]

    def wall() -> float:
        return base + offset[0]

    def fake_wall(env: RunningCp) -> None:
        env.cp.billing.deps = attrs.evolve(env.cp.billing.deps, wall=wall)

    async def usage(http: httpx.AsyncClient) -> list[tuple[str, str, str]]:
        rows = (await http.get("/api/v2/accounts/me/usage")).json()["usage"]
        return sorted((u["deployment_id"], u["replica_id"], u["window_start"])
                      for u in rows)

    with trio.fail_after(120):
        async with trio.open_nursery() as agents_nursery:
            async with running_cp(data, agent_listen=listen, database=database,
                                  **FAST, **QUIET) as env:
                fake_wall(env)
                agent = env.agent("vm-1", node_size="llm", gpu=True, vcpus=16,
                                  memory_mb=131072)
                await agents_nursery.start(agent.run_forever)
                http = await tenant(env, "t")
                key = str(http.headers["Authorization"]).split(" ", 1)[1]
                async with http:
                    await setup_app(http)
                    r = await http.post("/api/v2/apps/hello/deployments",
                                        json={"version": "1.0", "replicas": 1})
                    dep_id = r.json()["deployment_id"]
                    await reach_state(http, dep_id, "running")
                    for minute in range(3):
                        offset[0] = minute * 60 + 5
                        await env.cp.billing.tick()
                    charged = await usage(http)
                    assert [w[0] for w in charged] == [dep_id, dep_id]  # windows 0 and 1
                    balance = (await http.get("/api/v2/accounts/me/balance")).json()
                    assert balance["balance_minor"] < 0
            (data / "records.sqlite3").unlink()  # history wiped: the ledger is not history
            async with running_cp(data, agent_listen=listen, database=database,
                                  **FAST, **QUIET) as env:
                fake_wall(env)
                async with env.client(token=key) as http:
                    assert await usage(http) == charged
                    assert (await http.get("/api/v2/accounts/me/balance")).json() == balance

                    async def back() -> bool:
                        r = await http.get(f"/api/v2/deployments/{dep_id}")
                        return r.status_code == 200 and r.json()["state"] == "running"

                    await wait_until(back, "adopted")
                    offset[0] = 5 * 60 + 5  # the CP was away for minutes 3 and 4
                    await env.cp.billing.tick()
                    await env.cp.billing.tick()  # twice: nothing more
                    after = await usage(http)
                    assert len(after) == 5 and len(set(after)) == 5  # windows 0..4, once
                    r = await http.delete(f"/api/v2/deployments/{dep_id}")
                    assert r.status_code == 202
                    await reach_state(http, dep_id, "stopped")
                    offset[0] = 9 * 60
                    await env.cp.billing.tick()
                    # Stopped: closed, and charged through the minute it was last seen in.
                    assert len(await usage(http)) == 6
                async with env.client() as admin:
                    r = await admin.get("/api/v2/admin/billing/verify")
                    assert r.json()["ok"], r.text
                    earnings = (await admin.get("/api/v2/admin/earnings")).json()
                    assert earnings["platform"][0]["balance_minor"] > 0
            agents_nursery.cancel_scope.cancel()
