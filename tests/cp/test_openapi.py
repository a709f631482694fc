"""The served APIs against their OpenAPI documents (``api/openapi/*.yaml``), with schemathesis.

A real CP runs in this test's event loop with one simulated agent; a real agent (HTTP
only, no CP and no workload) in another test. Schemathesis is synchronous (requests),
so it runs in a worker thread and talks to the server over localhost, on kept-alive
connections (a refusal answered before its body was read closes its connection, and
the session opens a new one).

For the CP a scripted scenario first walks every route's happy path and main refusals
(accounts, app, versions, preflight, deploy, conflicts, undeploy, pool targets, launch
orders claimed and reported by a provisioner), so the document is checked against real
objects; then every operation is fuzzed with generated requests,
valid (positive) and invalid (negative) ones, with generated path parameters and with
those of the real objects. Every response must pass:

* ``not_a_server_error``: never a 5xx (a 503 is documented where it can happen);
* ``status_code_conformance``, ``content_type_conformance``,
  ``response_schema_conformance``: the status is documented for the operation, and the
  content type and body are the documented ones;
* ``ignored_auth``: an operation that succeeded with credentials is refused without
  them and with invalid ones.

Failures are collected (deduplicated), not stopped at, and reported together with a
curl command reproducing each. Credentials follow each operation's ``security``.
``POST /api/v2/admin/crash`` (chaos) is exercised only with an unknown name, and the
websockets not at all (OpenAPI cannot describe them). Runs are derandomized
(``EE_OPENAPI_EXPLORE=1`` makes them random); ``EE_OPENAPI_EXAMPLES`` sets the
generated requests per operation and mode (15). Server bugs found here get a
regression test at the end of this file once fixed; while a fix is pending, fuzzing
counts their responses (``KNOWN_BUGS``, empty today) instead of failing on them.
"""

from __future__ import annotations

import base64
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import pytest
import requests
import trio
import yaml
from cpkit import running_cp
from test_tenants import context

from ee.agent.config import AgentConfig
from ee.agent.platform import shared_sim_dir
from ee.agent.server import Agent
from ee.cp import tenants

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import Case, GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402

# A raw build context (PUT .../context) goes as bytes, as application/octet-stream would.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")

log = logging.getLogger(__name__)

SPECS = Path(__file__).resolve().parents[2] / "api" / "openapi"
CP_SPEC = SPECS / "control-plane.yaml"
AGENT_SPEC = SPECS / "agent.yaml"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, ignored_auth]
EXAMPLES = int(os.environ.get("EE_OPENAPI_EXAMPLES", "15"))
EXPLORE = os.environ.get("EE_OPENAPI_EXPLORE") == "1"  # random, not derandomized, runs
# Chaos: scripted only (a crash of an unknown name; an error rate of 0 — a fuzzed rate
# of 1 would answer every later request of the run 500).
NOT_FUZZED = {"POST /api/v2/admin/crash", "POST /api/v2/admin/chaos/errors"}
ROTATE = "POST /api/v2/accounts/me/keys"
COMPOSE = "services:\n  web:\n    build: .\n"


def _not_utf8(body: object) -> bool:
    if not isinstance(body, bytes):
        return False
    try:
        body.decode()
    except UnicodeDecodeError:
        return True
    return False


def _odd_digits(query: Mapping[str, Any] | None) -> bool:
    tail = (query or {}).get("tail")
    return isinstance(tail, str) and tail.isdigit() and not tail.isascii()


# Server bugs the fuzzer found are fixed; add one here (with its regression test below)
# only while a fix is pending.
KNOWN_BUGS: dict[str, Callable[[Case, requests.Response], bool]] = {}


@attrs.define
class Conformance:
    """Sends cases to one live server and collects what the checks find.

    ``tokens`` maps a security scheme of the document to the credential to send; the
    key rotation operation uses the ``"rotating"`` one (a second tenant), which it
    replaces on every success.
    """

    base_url: str
    spec: Path
    tokens: dict[str, str]
    schema: Any = attrs.field(init=False)
    raw: dict[str, Any] = attrs.field(init=False)
    ops: dict[str, Any] = attrs.field(init=False)
    session: requests.Session = attrs.field(factory=requests.Session)
    failures: dict[tuple[str, str, int], str] = attrs.field(factory=dict)
    known: Counter[str] = attrs.field(factory=Counter)
    sent: int = 0

    def __attrs_post_init__(self) -> None:
        self.schema = schemathesis.openapi.from_path(self.spec)
        self.raw = yaml.safe_load(self.spec.read_text())
        self.ops = {op.label: op for op in (r.ok() for r in self.schema.get_all_operations())}

    def headers(self, label: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        method, path = label.split(" ", 1)
        op = self.raw["paths"][path][method.lower()]
        schemes = [name for req in op.get("security", self.raw.get("security", []))
                   for name in req]
        if label == ROTATE:
            schemes = ["rotating"]
        for name in schemes:
            if name in self.tokens:
                headers["Authorization"] = f"Bearer {self.tokens[name]}"
        return headers

    def send(self, case: Case) -> requests.Response:
        label = case.operation.label
        headers = self.headers(label)
        response: requests.Response = case.call(base_url=self.base_url, session=self.session,
                                                headers=headers, timeout=20)
        self.sent += 1
        log.debug("%s %s -> %d", label, case.path_parameters, response.status_code)
        if label == ROTATE and response.status_code == 201:
            self.tokens["rotating"] = response.json()["api_key"]
        known = [name for name, matches in KNOWN_BUGS.items() if matches(case, response)]
        if known:
            self.known.update(known)
            return response
        try:
            case.validate_response(response, checks=CHECKS, headers=headers, transport_kwargs={
                "base_url": self.base_url, "timeout": 20})
        except (Failure, FailureGroup) as exc:
            self.record(case, response, exc)
        return response

    def record(self, case: Case, response: requests.Response,
               exc: Failure | FailureGroup) -> None:
        for failure in list(exc.exceptions) if isinstance(exc, FailureGroup) else [exc]:
            title = str(getattr(failure, "title", type(failure).__name__))
            key = (case.operation.label, title, response.status_code)
            if key not in self.failures:
                self.failures[key] = (
                    f"{case.operation.label}: {title}\n"
                    f"  {str(getattr(failure, 'message', failure))[:600]}\n"
                    f"  request: {case.as_curl_command()[:600]}\n"
                    f"  response: {response.status_code} "
                    f"{response.headers.get('content-type')} {response.text[:400]}")

    def call(self, label: str, *, path: Mapping[str, str] | None = None, body: Any = None,
             query: Mapping[str, Any] | None = None, expect: int | None = None,
             media_type: str = "application/json", headers: Mapping[str, str] | None = None
             ) -> requests.Response:
        """One scripted request, checked like a generated one."""
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs.update(body=body, media_type=media_type)
        if headers:
            kwargs.update(headers=dict(headers))
        case = self.schema.make_case(operation=self.ops[label], path_parameters=dict(path or {}),
                                     query=dict(query or {}), **kwargs)
        response = self.send(case)
        if expect is not None:
            assert response.status_code == expect, (label, response.status_code, response.text)
        return response

    def fuzz(self, label: str, mode: GenerationMode, examples: int,
             path: Mapping[str, str] | None = None) -> None:
        strategy = self.ops[label].as_strategy(
            generation_mode=mode, path_parameters=dict(path) if path else None)

        @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                             derandomize=not EXPLORE, phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(strategy)
        def run(case: Case) -> None:
            self.send(case)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing there to make invalid

    def fuzz_all(self, real: Mapping[str, str], examples: int) -> None:
        """Every operation, both modes; with the real path parameters too."""
        for label, op in self.ops.items():
            if label in NOT_FUZZED:
                continue
            names = [p.name for p in op.iter_parameters() if p.location == "path"]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                self.fuzz(label, mode, examples)
                if names:
                    self.fuzz(label, mode, examples, path={n: real[n] for n in names})

    def verdict(self) -> None:
        log.info("%d requests; known bugs hit: %s", self.sent, dict(self.known))
        report = "\n".join(self.failures[k] for k in sorted(self.failures))
        assert not self.failures, f"{len(self.failures)} failure(s):\n{report}"


# --- the control plane ----------------------------------------------------------------

def scenario(c: Conformance) -> dict[str, str]:
    """Happy paths and main refusals; returns the real ids for the path parameters."""
    c.call("GET /api/v2/health", expect=200)
    c.call("GET /api/v2/ready", expect=200)
    c.call("GET /metrics", expect=200)
    c.tokens["tenantKey"] = c.call("POST /api/v2/accounts", body={"name": "alice"},
                                   expect=201).json()["api_key"]
    c.tokens["rotating"] = c.call("POST /api/v2/accounts", body={"name": "rot", "kind": "tenant"},
                                  expect=201).json()["api_key"]
    c.tokens["provisionerKey"] = c.call(
        "POST /api/v2/accounts", body={"name": "prov", "kind": "provisioner"},
        expect=201).json()["api_key"]
    c.call("POST /api/v2/accounts", body={"name": "  "}, expect=400)
    c.call("GET /api/v2/accounts/me", expect=200)
    c.call(ROTATE, expect=201)
    c.call(ROTATE, expect=201)

    agents = c.call("GET /api/v2/agents", expect=200).json()["agents"]
    agent = {"agent_id": agents[0]["agent_id"]}
    vm = {"vm_name": agents[0]["vm_name"]}
    names = c.call("GET /api/v2/admin/vm-names", expect=200).json()["vm_names"]
    assert [n["vm_name"] for n in names] == [vm["vm_name"]]
    c.call("POST /api/v2/admin/vm-names/{vm_name}/release", path={"vm_name": "vm-nope"},
           expect=404)
    c.call("POST /api/v2/admin/chaos/errors", body={"rate": 2}, expect=400)
    c.call("POST /api/v2/admin/chaos/errors", body={"rate": 0}, expect=200)
    # Releases: a dev CP pins no release key, so a well-formed release is untrusted.
    c.call("GET /api/v2/admin/releases", expect=200)
    c.call("POST /api/v2/admin/releases", body={"manifest": {}, "signature": "0" * 128,
                                               "node_size": "tiny"}, expect=403)
    c.call("POST /api/v2/admin/releases", body={"manifest": {}, "signature": "x",
                                               "node_size": "tiny"}, expect=400)
    release = {"release_id": "tiny.0000"}
    c.call("DELETE /api/v2/admin/releases/{release_id}", path=release, expect=404)
    c.call("GET /api/v2/agents", query={"status": "online"}, expect=200)
    c.call("GET /api/v2/agents/{agent_id}", path=agent, expect=200)
    c.call("GET /api/v2/agents/{agent_id}", path={"agent_id": "ag-nope"}, expect=404)
    c.call("POST /api/v2/agents/{agent_id}/drain", path=agent, body={"draining": False},
           expect=200)
    c.call("POST /api/v2/agents/{agent_id}/drain", path=agent, body={"draining": "yes"},
           expect=400)
    c.call("GET /api/v2/datacenters", expect=200)
    c.call("GET /api/v2/admin/tree", expect=200)
    c.call("POST /api/v2/admin/crash", body={"name": "no/such-child"}, expect=404)

    app = {"name": "hello"}
    c.call("POST /api/v2/apps", body=app, expect=201)
    c.call("POST /api/v2/apps", body=app, expect=409)
    c.call("POST /api/v2/apps", body={"name": "Hello!"}, expect=400)
    c.call("GET /api/v2/apps", expect=200)
    c.call("GET /api/v2/apps/{name}", path=app, expect=200)
    c.call("GET /api/v2/apps/{name}", path={"name": "nope"}, expect=404)
    version = {"version": "1.0", "compose": COMPOSE, "build_context": context(),
               "expose_port": 8080, "health_path": "/health", "env": {"A": "b"}}
    versions = "POST /api/v2/apps/{name}/versions"
    c.call(versions, path=app, body=version, expect=201)
    c.call(versions, path=app, body=version, expect=409)
    c.call(versions, path=app, expect=201, body={
        "version": "2.0", "compose": "services:\n  web:\n    image: x\n", "expose_port": 80})
    c.call(versions, path=app, body={**version, "version": "3", "compose": "- a list"},
           expect=400)
    c.call(versions, path=app, body={**version, "version": "3", "build_context": "!!"},
           expect=400)
    c.call("GET /api/v2/apps/{name}/versions", path=app, expect=200)
    one = {**app, "version": "1.0"}
    c.call("GET /api/v2/apps/{name}/versions/{version}", path=one, expect=200)
    c.call("GET /api/v2/apps/{name}/versions/{version}", path={**app, "version": "9.9"},
           expect=404)
    staged = {**app, "version": "5"}
    stage = "PUT /api/v2/apps/{name}/versions/{version}/context"
    c.call(stage, path=staged, body=base64.b64decode(context()),
           media_type="application/gzip", expect=201)
    c.call(stage, path=staged, body=b"not a tar.gz", media_type="application/gzip",
           expect=400)
    c.call(versions, path=app, expect=201, body={
        "version": "5", "compose": COMPOSE, "expose_port": 8080, "build_context_staged": True})
    c.call(versions, path=app, expect=409, body={
        "version": "6", "compose": COMPOSE, "expose_port": 8080, "build_context_staged": True})
    c.call(versions, path=app, body={**version, "version": "7", "colour": "blue"}, expect=400)
    c.call("DELETE /api/v2/apps/{name}/versions/{version}", path=staged, expect=204)
    c.call("DELETE /api/v2/apps/{name}/versions/{version}", path=staged, expect=404)
    page = c.call("GET /api/v2/apps/{name}/versions", path=app, query={"limit": 1},
                  expect=200).json()
    c.call("GET /api/v2/apps/{name}/versions", path=app,
           query={"limit": 1, "cursor": page["next_cursor"]}, expect=200)
    c.call("GET /api/v2/apps", query={"cursor": page["next_cursor"]}, expect=400)
    c.call("POST /api/v2/apps", body={"name": "keyed"}, headers={"Idempotency-Key": "k-1"},
           expect=201)
    c.call("POST /api/v2/apps", body={"name": "keyed"}, headers={"Idempotency-Key": "k-1"},
           expect=201)
    c.call("POST /api/v2/apps", body={"name": "other"}, headers={"Idempotency-Key": "k-1"},
           expect=409)
    c.call("DELETE /api/v2/apps/{name}", path={"name": "keyed"}, expect=204)
    c.call("DELETE /api/v2/apps/{name}", path={"name": "keyed"}, expect=404)
    c.call("GET /api/v2/apps", query={"limit": 1}, expect=200)
    secret = {**app, "secret": "db_password"}
    put_secret = "PUT /api/v2/apps/{name}/secrets/{secret}"
    c.call(put_secret, path=secret, body={"value": "v"}, expect=201)
    c.call(put_secret, path={**app, "secret": "Bad"}, body={"value": "v"}, expect=400)
    c.call("GET /api/v2/apps/{name}/secrets", path=app, expect=200)
    c.call("PUT /api/v2/apps/{name}/secret-policy", path=app,
           body={"node_sizes": ["nope"]}, expect=400)
    c.call("PUT /api/v2/apps/{name}/secret-policy", path=app,
           body={"min_attested_replicas": 1}, expect=200)
    c.call("GET /api/v2/apps/{name}/secret-policy", path=app, expect=200)
    c.call("GET /api/v2/apps/{name}/secret-events", path=app, expect=200)
    c.call(versions, path=app, expect=201, body={
        **version, "version": "4", "secrets": [{"name": "db_password", "as": "file"}]})

    placement = {"version": "1.0", "replicas": 1, "constraints": {"gpu": False}}
    preflight = "POST /api/v2/apps/{name}/preflight"
    c.call(preflight, path=app, body=placement, expect=200)
    c.call(preflight, path=app, body={**placement, "constraints": {"colour": "blue"}},
           expect=400)
    c.call(preflight, path=app, body={**placement, "version": "9.9"}, expect=404)
    deploy = "POST /api/v2/apps/{name}/deployments"
    dep = {"deployment_id": c.call(deploy, path=app, body=placement,
                                   expect=202).json()["deployment_id"]}
    c.call(deploy, path=app, body={**placement, "replicas": 2}, expect=409)  # one agent, busy
    c.call("GET /api/v2/deployments", expect=200)
    c.call("GET /api/v2/deployments", query={"app": "hello", "limit": 5}, expect=200)
    c.call("DELETE /api/v2/apps/{name}/versions/{version}", path=one, expect=409)
    c.call("DELETE /api/v2/apps/{name}", path=app, expect=409)
    attestation = "GET /api/v2/deployments/{deployment_id}/attestation"
    c.call(attestation, path=dep, expect=200)
    c.call(attestation, path={"deployment_id": "dep-0"}, expect=404)
    c.call("GET /api/v2/deployments/{deployment_id}", path=dep, expect=200)
    c.call("GET /api/v2/deployments/{deployment_id}", path={"deployment_id": "dep-0"},
           expect=404)
    logs = "GET /api/v2/deployments/{deployment_id}/logs"
    c.call(logs, path=dep, query={"tail": 10}, expect=200)
    c.call(logs, path=dep, query={"tail": 0}, expect=400)
    c.call(logs, path=dep, query={"since": "2026-12-01T00:00:00Z", "service": "web"},
           expect=200)
    c.call(logs, path=dep, query={"since": "yesterday"}, expect=400)
    streamed = c.call(logs, path=dep, query={"follow": "true"}, expect=200)
    assert "event: end" in streamed.text
    c.call("GET /api/v2/agents", query={"status": "gone"}, expect=400)

    pool = {"datacenter": "local:dev", "node_size": "standard"}
    target = "PUT /api/v2/capacity/pools/{datacenter}/{node_size}"
    c.call(target, path=pool, body={"min_warm": 3, "dispatch": True, "reason": "fuzz"},
           expect=200)
    c.call(target, path={**pool, "node_size": "gigantic"},
           body={"min_warm": 1, "dispatch": True, "reason": "x"}, expect=400)
    c.call(target, path=pool, body={"min_warm": 1, "dispatch": True, "reason": "x",
                                    "colour": "blue"}, expect=400)
    c.call("GET /api/v2/capacity/pools", expect=200)
    claim = "POST /api/v2/capacity/launch-orders/claim"
    order = {"order_id": c.call(claim, body=pool, expect=200).json()["order"]["order_id"]}
    c.call(claim, body={"datacenter": "local:dev", "node_size": "tiny"}, expect=204)
    c.call(claim, body={**pool, "count": 2}, expect=400)
    orders = "POST /api/v2/capacity/launch-orders/{order_id}"
    c.call(f"{orders}/provisioning", path=order, body={"vm_name": "vm-p1"}, expect=200)
    c.call(f"{orders}/fulfil", path=order, body={"vm_name": "vm-p1"}, expect=200)
    c.call(f"{orders}/fail", path=order, body={"error": "too late"}, expect=409)
    c.call(f"{orders}/fulfil", path={"order_id": "lo-0"}, body={"vm_name": "v"}, expect=404)
    c.call("GET /api/v2/capacity/launch-orders", expect=200)
    account = {"account_id": c.call("GET /api/v2/accounts/me", expect=200).json()["account_id"]}
    c.call("GET /api/v2/accounts/{account_id}", path=account, expect=200)
    credit = {"amount_minor": 2500, "currency": "USD", "reason": "fuzz",
              "idempotency_key": "fuzz-1"}
    credits = "POST /api/v2/admin/accounts/{account_id}/credits"
    txn = c.call(credits, path=account, body=credit, expect=201).json()["transaction"]
    c.call(credits, path=account, body=credit, expect=200)
    c.call(credits, path=account, body={**credit, "amount_minor": 9}, expect=409)
    c.call(credits, path=account, body={**credit, "amount_minor": -1}, expect=400)
    c.call(credits, path={"account_id": "acct-nope"}, body=credit, expect=404)
    c.call("GET /api/v2/accounts/me/balance", expect=200)
    c.call("GET /api/v2/accounts/me/usage", query={"limit": 10}, expect=200)
    c.call("GET /api/v2/accounts/me/ledger", query={"format": "csv"}, expect=200)
    c.call("GET /api/v2/accounts/me/ledger", query={"limit": 501}, expect=400)
    c.call("POST /api/v2/admin/ledger/{txn_id}/corrections",
           path={"txn_id": str(txn["txn_id"])},
           body={"reason": "fuzz", "idempotency_key": "fix-1"}, expect=201)
    c.call("GET /api/v2/admin/prices", expect=200)
    c.call("PUT /api/v2/admin/prices", body={"vcpu_hour_micro": 40000}, expect=201)
    c.call("GET /api/v2/admin/earnings", expect=200)
    c.call("GET /api/v2/admin/billing", expect=200)
    c.call("GET /api/v2/admin/billing/verify", expect=200)
    c.call("POST /api/v2/billing/payments", body={"event_id": "e", "account_id": "a",
                                                "amount_minor": 1, "currency": "USD"},
           expect=404)
    return {**account, "txn_id": str(txn["txn_id"]), **agent, **vm, **one, **dep, **pool,
            **order, **release, "secret": "db_password", "label": "sim:nowhere"}


def check_cp(base_url: str, admin_token: str, examples: int) -> Conformance:
    c = Conformance(base_url, CP_SPEC, {"adminToken": admin_token})
    real = scenario(c)
    c.fuzz_all(real, examples)
    c.call("DELETE /api/v2/deployments/{deployment_id}", path=real, expect=202)
    c.call("GET /api/v2/deployments/{deployment_id}", path=real, expect=200)
    c.call("GET /api/v2/health", expect=200)  # still up after it all
    return c


async def test_control_plane_conforms_to_its_openapi_document(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Followed logs end after a second (not 15 minutes), so fuzzed follows finish.
    monkeypatch.setattr(tenants, "FOLLOW_MAX_S", 1.0)
    with trio.fail_after(300):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            c = await trio.to_thread.run_sync(check_cp, env.http, env.token, EXAMPLES)
            nursery.cancel_scope.cancel()
    assert c.sent > 300
    c.verdict()


# --- the agent ------------------------------------------------------------------------

def check_agent(base_url: str, secret: str, examples: int) -> Conformance:
    c = Conformance(base_url, AGENT_SPEC, {"agentSecret": secret})
    c.call("GET /.ee/health", expect=200)
    c.call("GET /.ee/health", query={"attest": "true", "nonce": "ab" * 16}, expect=409)
    c.call("GET /.ee/health", query={"attest": "true", "nonce": "zz"}, expect=400)
    c.call("GET /.ee/state-snapshot", expect=200)
    c.call("GET /.ee/logs", expect=200)
    c.call("GET /.ee/logs", query={"deployment_id": "nope"}, expect=404)
    c.call("GET /.ee/logs", query={"tail": 0}, expect=400)
    c.call("GET /.ee/logs", query={"since": "2026-13-01T00:00:00Z"}, expect=400)
    c.call("GET /.ee/logs", query={"since": "2026-12-01T00:00:00.5Z", "service": "web"},
           expect=200)
    c.call("GET /.ee/stats", expect=200)
    c.call("GET /.ee/control/challenge", expect=200)
    c.fuzz_all({}, examples)
    return c


async def test_agent_conforms_to_its_openapi_document(tmp_path: Path) -> None:
    config = AgentConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "agent"),
                         vm_name="vm-openapi", attestation_provider="sim",
                         sim_dir=str(shared_sim_dir()))  # no CP: HTTP only
    agent = Agent(config)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            try:
                c = await trio.to_thread.run_sync(
                    check_agent, f"http://127.0.0.1:{agent.http_port}", agent.secret, EXAMPLES)
            finally:
                agent.request_stop()
    assert c.sent > 50
    c.verdict()


def _labels(spec: Path) -> set[str]:
    schema = schemathesis.openapi.from_path(spec)
    return {r.ok().label for r in schema.get_all_operations()}  # .ok() raises if invalid


def _spec_errors(spec: Path) -> list[str]:
    from openapi_spec_validator import OpenAPIV30SpecValidator

    document = yaml.safe_load(spec.read_text())
    assert document["openapi"].startswith("3.0."), document["openapi"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
            for e in OpenAPIV30SpecValidator(document).iter_errors()]


@pytest.mark.parametrize("spec", [CP_SPEC, AGENT_SPEC], ids=lambda p: p.name)
def test_documents_pass_openapi_spec_validator(spec: Path) -> None:
    """Strict 3.0.3: no 3.1 ``type: [x, "null"]`` (``nullable: true``), no stray keys."""
    errors = _spec_errors(spec)
    assert not errors, "\n".join(errors)


async def test_documents_are_valid_openapi() -> None:
    with trio.fail_after(30):
        cp = await trio.to_thread.run_sync(_labels, CP_SPEC)
        agent = await trio.to_thread.run_sync(_labels, AGENT_SPEC)
    assert {"GET /api/v2/health", "POST /api/v2/apps/{name}/deployments",
            "DELETE /api/v2/deployments/{deployment_id}", "DELETE /api/v2/apps/{name}",
            "GET /api/v2/apps/{name}/versions/{version}",
            "DELETE /api/v2/apps/{name}/versions/{version}",
            "PUT /api/v2/apps/{name}/versions/{version}/context",
            "GET /api/v2/deployments/{deployment_id}/attestation",
            "GET /api/v2/accounts/{account_id}"} <= cp
    assert agent == {"GET /.ee/health", "GET /.ee/state-snapshot", "GET /.ee/logs",
                     "GET /.ee/stats", "GET /.ee/control/challenge"}


# --- regressions: server bugs the fuzzer found (each was a 500 or a hang) ------------

def _hostile(name: str, route: str, body: bytes, reason: str) -> Any:
    return pytest.param(route, body, id=name)


@pytest.mark.parametrize(("route", "body"), [
    _hostile("not-utf8", "POST /api/v2/accounts", b"\xff\xfe{",
             "request.get_json(force=True, silent=True) raises UnicodeDecodeError: a 500"),
    _hostile("deep-json", "POST /api/v2/accounts", b"[" * 100_000,
             "json.loads raises RecursionError (silent=True catches only ValueError): a 500"),
    _hostile("surrogate-name", "POST /api/v2/accounts", b'{"name": "\\ud800"}',
             "a lone surrogate reaches SQLite: UnicodeEncodeError in create_account: a 500"),
    _hostile("deep-yaml", "POST /api/v2/apps/a/versions",
             b'{"version": "1", "expose_port": 80, "compose": "' + b"[" * 3000 + b'"}',
             "yaml.safe_load raises RecursionError in validate_compose: a 500"),
    _hostile("huge-int-yaml", "POST /api/v2/apps/a/versions",
             b'{"version": "1", "expose_port": 80, "compose": "services: {web: {}}\\nx: '
             + b"9" * 5000 + b'"}',
             "an integer of over 4300 digits: ValueError in validate_compose: a 500"),
])
async def test_hostile_input_is_a_400(tmp_path: Path, route: str, body: bytes) -> None:
    method, path = route.split(" ", 1)
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, env.client() as admin:
            r = await admin.post("/api/v2/accounts", json={"name": "t"})
            async with env.client(token=r.json()["api_key"]) as tenant:
                assert (await tenant.post("/api/v2/apps", json={"name": "a"})).status_code == 201
                http = tenant if "/apps" in path else admin
                r = await http.request(method, path, content=body,
                                       headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text


async def test_tail_of_non_ascii_digits_is_a_400(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            async with env.client() as admin:
                r = await admin.post("/api/v2/accounts", json={"name": "t"})
                key = r.json()["api_key"]
            async with env.client(token=key) as http:
                await http.post("/api/v2/apps", json={"name": "a"})
                await http.post("/api/v2/apps/a/versions", json={
                    "version": "1", "compose": COMPOSE, "expose_port": 80})
                r = await http.post("/api/v2/apps/a/deployments", json={"version": "1"})
                dep = r.json()["deployment_id"]
                r = await http.get(f"/api/v2/deployments/{dep}/logs", params={"tail": "²"})
            nursery.cancel_scope.cancel()
            assert r.status_code == 400, r.text


def _after_refusals(base_url: str, rounds: int) -> int:
    """Rounds until a request on a kept-alive connection, after a refused POST on it, got
    no answer (``rounds`` when none hung)."""
    for done in range(rounds):
        with requests.Session() as session:
            session.post(f"{base_url}/api/v2/apps", data=b'{"name": "x"}', timeout=2)
            try:
                session.get(f"{base_url}/api/v2/health", timeout=2)
            except requests.Timeout:
                return done
    return rounds


async def test_keep_alive_after_a_refused_request(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            rounds = await trio.to_thread.run_sync(_after_refusals, env.http, 100)
    assert rounds == 100, f"round {rounds + 1}: no answer after a refused POST"
