"""The tenant's top-level eectl commands as real subprocesses against a real in-process
CP with sim agents (tests/cp/cpkit.py), configured the way a tenant would (a config file
naming the CP and a key file), plus the pure parts: reading an app directory, the hash
check after a push, the settle test, log and SSE parsing, key resolution.

Routes that other work adds (PATCH/rollback of a deployment, the tenant events stream,
DELETE of an app, log following) are exercised when the CP under test has them; on a CP
without them the test checks that eectl reports the CP's refusal in one line instead.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from ee.ctl import client as ctl_client
from ee.ctl.apps import log_entries, settled, sse_data
from ee.ctl.client import UsageError
from ee.ctl.deploy import agents_from_attestation, attested_check
from ee.ctl.main import expand_shorthands
from ee.ctl.push import PushMismatch, checked_hash, parse_env, read_workload
from ee.protocol.compose import compose_hash

from .ctlkit import Result, column, eectl, local_http, running_cp

COMPOSE = """\
services:
  web:
    build: .
    init: true
    expose: ["8080"]
    command: ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
"""


def app_dir(root: Path, greeting: str = "hello") -> Path:
    d = root / "hello"
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "docker-compose.yml").write_text(COMPOSE)
    (d / "Dockerfile").write_text("FROM ee-busybox:local\nCOPY www /www\n")
    (d / "www" / "index.html").write_text(f"<h1>{greeting}</h1>\n")
    (d / "www" / "health").write_text("ok\n")
    return d


def _json(r: Result) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


async def test_tenant_flow_from_a_config_file(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            await nursery.start(env.agent("vm-1").run)
            await nursery.start(env.agent("vm-2").run)
            async with env.client() as admin:
                r = await admin.post("/api/v2/accounts", json={"name": "acme"})
                key = r.json()["api_key"]
            conf = tmp_path / "conf"
            conf.mkdir()
            (conf / "tenant.key").write_text(key + "\n")
            (conf / "config.json").write_text(json.dumps({"cp": env.http,
                                                          "key_file": "tenant.key"}))
            cfg = {"EE_CONFIG": str(conf / "config.json")}

            async def run(*argv: str, **extra: str) -> Result:
                return await eectl(*argv, state_dir=tmp_path, **{**cfg, **extra})

            r = await run("apps", "create", "hello")
            assert (r.returncode, r.stdout) == (0, "app hello created\n"), r.stderr
            r = await run("apps", "create", "hello")
            assert r.returncode == 1
            assert r.stderr == "eectl apps create: app 'hello' already exists (409 conflict)\n"
            r = await run("apps", "list")
            assert column(r.stdout, "hello", "VERSIONS") == "0"
            assert [x["name"] for x in _json(await run("apps", "list", "--json"))["apps"]] == [
                "hello"]

            # push: the hash computed here is the one the CP stored.
            d = app_dir(tmp_path)
            r = await run("push", str(d), "--app", "hello", "--version", "1",
                          "--health-path", "/health", "--env", "GREETING=hi")
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("hello@1: compose_hash sha256:")
            printed = r.stdout.split()[-1]
            async with env.client(token=key) as tenant:
                [version] = (await tenant.get("/api/v2/apps/hello/versions")).json()["versions"]
            assert version["compose_hash"] == printed
            assert version["expose_port"] == 8080 and version["health_path"] == "/health"
            local = (await run("compose-hash", str(d), "--health-path", "/health",
                               "--env", "GREETING=hi")).stdout.strip()
            if "version-1 compose hash" in r.stderr:  # a CP from before workload_hash
                assert printed != local
            else:
                assert printed == local and r.stderr.startswith("pushing hello@1: ")
            r = await run("push", str(d), "--app", "hello", "--version", "1")
            assert r.returncode == 1 and "(409 conflict)" in r.stderr
            r = await run("push", str(d), "--app", "nope", "--version", "1")
            assert r.returncode == 1 and r.stderr.endswith("(404 not_found)\n")

            # deploy (short for `deploy run`): progress on stderr, the result on stdout.
            r = await run("deploy", "hello", "--version", "1", "--poll", "0.1")
            assert r.returncode == 0, r.stderr
            dep = r.stdout.split()[1]
            assert r.stdout.splitlines()[0] == f"deployment {dep} is running"
            assert "following" in r.stderr

            view = _json(await run("status", dep, "--json"))
            assert (view["state"], view["version"], view["app"]) == ("running", "1", "hello")
            r = await run("status", dep)
            assert r.stdout.startswith(f"deployment {dep}  hello@1  running  (1/1 replicas "
                                       "running)\nurl: ")
            [replica] = view["replicas"]
            assert column(r.stdout, replica["agent_id"], "STATE") == "running"
            r = await run("status", "--app", "hello")
            assert column(r.stdout, dep, "STATE") == "running"
            assert (await run("status", "--app", "other")).stdout == "no deployments\n"
            r = await run("status", "dep-nope")
            assert r.returncode == 1
            assert r.stderr == "eectl status: no deployment 'dep-nope' (404 not_found)\n"

            r = await run("logs", dep)
            assert r.returncode == 0, r.stderr
            r = await run("logs", dep, "--since", "yesterday")
            assert r.returncode == 2 and "--since 'yesterday'" in r.stderr

            await _update_scale_rollback(run, dep, d, tmp_path)
            await _events(run)

            r = await run("undeploy", dep, "--poll", "0.1")
            assert r.returncode == 0, r.stderr
            assert r.stdout == f"deployment {dep} stopped\n"
            assert (await run("status")).stdout == "no deployments\n"
            assert dep in (await run("status", "--all")).stdout

            r = await run("apps", "delete", "hello")
            if r.returncode == 1 and "(405 " in r.stderr:  # a CP without DELETE of apps
                assert "DELETE is not allowed on /api/v2/apps/hello" in r.stderr
            else:
                assert (r.returncode, r.stdout) == (0, "app hello deleted\n"), r.stderr

            # Keys: $EE_API_KEY over the config file; none at all is a usage error.
            r = await run("apps", "list", EE_API_KEY="wrong")
            assert r.returncode == 1 and "(401 " in r.stderr
            r = await eectl("apps", "list", "--cp", env.http, state_dir=tmp_path,
                            EE_CONFIG=str(tmp_path / "none.json"))
            assert r.returncode == 2 and r.stderr.startswith("eectl apps list: no API key")
            (conf / "bad.json").write_text('{"cp": "x", "key": "inline"}')
            r = await eectl("apps", "list", state_dir=tmp_path,
                            EE_CONFIG=str(conf / "bad.json"))
            assert r.returncode == 2 and "must be {\"cp\": URL, \"key_file\": PATH}" in r.stderr
            nursery.cancel_scope.cancel()


async def _update_scale_rollback(run: Any, dep: str, d: Path, tmp: Path) -> None:
    (d / "www" / "index.html").write_text("<h1>v2</h1>\n")
    r = await run("push", str(d), "--app", "hello", "--version", "2", "--health-path",
                  "/health")
    assert r.returncode == 0, r.stderr
    r = await run("update", dep, "--version", "2", "--poll", "0.1", "--timeout", "60")
    if r.returncode == 1 and "(405 " in r.stderr:  # a CP without PATCH
        assert r.stderr.startswith("eectl update: PATCH is not allowed on ")
        r = await run("rollback", dep)
        assert r.returncode == 1 and "(404 " in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"deployment {dep}: hello@2 running on 1 replica(s)\n")
    r = await run("scale", dep, "2", "--poll", "0.1", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert "hello@2 running on 2 replica(s)" in r.stdout
    view = json.loads((await run("status", dep, "--json")).stdout)
    assert len([x for x in view["replicas"] if x["state"] == "running"]) == 2
    r = await run("rollback", dep, "--poll", "0.1", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert "hello@1 running on 2 replica(s)" in r.stdout
    r = await run("scale", dep, "1", "--poll", "0.1", "--timeout", "60")
    assert r.returncode == 0, r.stderr


async def _events(run: Any) -> None:
    with trio.fail_after(30):
        r = await run("events", "--app", "hello", "--limit", "1", "--json")
    if r.returncode == 1 and ("(404 " in r.stderr or "(500 internal_server_error)" in r.stderr):
        # A CP without the tenant stream (before its merge the CP's 404 handler fails on
        # a websocket scope: 500; reported).
        return
    assert r.returncode == 0, r.stderr
    event = json.loads(r.stdout)
    assert {"seq", "kind", "subject"} <= set(event)


# --- a CP that hashes something else ---------------------------------------------------


def fake_cp(stored_hash: str) -> Any:
    """A stand-in CP that accepts any version upload and says it stored *stored_hash*."""
    data = json.dumps({"version": "1", "compose_hash": stored_hash}).encode()
    return local_http(lambda _m, _p, _b: (201, "application/json", data))


async def test_push_refuses_a_cp_that_stored_another_hash(tmp_path: Path) -> None:
    d = app_dir(tmp_path)
    with trio.fail_after(60):
        r = await eectl("compose-hash", str(d), state_dir=tmp_path)
        ours = r.stdout.strip()
        with fake_cp("sha256:" + "0" * 64) as url:
            r = await eectl("push", str(d), "--app", "a", "--version", "1", "--cp", url,
                            "--key", "k", state_dir=tmp_path)
        assert r.returncode == 1
        assert r.stderr.splitlines()[-1].startswith(
            f"eectl push: the CP stored the version under 'sha256:{'0' * 64}', but its "
            f"hash is {ours}")
        with fake_cp(ours) as url:
            r = await eectl("push", str(d), "--app", "a", "--version", "1", "--cp", url,
                            "--key", "k", "--json", state_dir=tmp_path)
        assert r.returncode == 0 and json.loads(r.stdout)["compose_hash"] == ours


# --- pure parts ------------------------------------------------------------------------


def test_read_workload_and_its_hash(tmp_path: Path) -> None:
    d = app_dir(tmp_path)
    w = read_workload(d, expose_port=None, expose_service=None, health_path="/health",
                      env={"A": "1"})
    assert (w.compose_file, w.expose_port, w.expose_service) == ("docker-compose.yml", 8080,
                                                                 "web")
    assert w.context_tar is not None
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(w.context_tar))) as tar:
        assert tar.getnames() == ["Dockerfile", "www", "www/health", "www/index.html"]
    assert w.v1_hash() == compose_hash(COMPOSE, w.context_tar)  # the agent's v1 formula
    body = w.version_body("1")
    assert base64.b64decode(body["build_context"]) == w.context_tar
    assert body["env"] == {"A": "1"} and "secrets" not in body

    # Everything the workload runs with changes the hash; formatting does not.
    def h(**kw: Any) -> str:
        args: dict[str, Any] = {"expose_port": None, "expose_service": None,
                                "health_path": "/health", "env": {"A": "1"}}
        return read_workload(d, **{**args, **kw}).hash()
    base = h()
    assert base == w.hash() and base.startswith("sha256:")
    others = {h(env={"A": "2"}), h(env={}), h(expose_port=8081), h(health_path="/"),
              h(secret_names=["db"])}
    assert len(others) == 5 and base not in others
    (d / "docker-compose.yml").write_text("# a comment\n" + COMPOSE.replace('"8080"', "'8080'"))
    assert h() == base
    (d / "www" / "index.html").write_text("changed\n")
    assert h() != base

    with pytest.raises(UsageError, match=r"both compose\.yaml and docker-compose\.yml"):
        (d / "compose.yaml").write_text(COMPOSE)
        read_workload(d, expose_port=None, expose_service=None, health_path="/", env={})
    (d / "compose.yaml").unlink()
    with pytest.raises(UsageError, match="--expose-service 'db' is not a service"):
        read_workload(d, expose_port=1, expose_service="db", health_path="/", env={})
    (d / "docker-compose.yml").write_text("services:\n  web:\n    image: x\n")
    with pytest.raises(UsageError, match="give --expose-port"):
        read_workload(d, expose_port=None, expose_service=None, health_path="/", env={})
    no_build = read_workload(d, expose_port=80, expose_service=None, health_path="/", env={})
    assert no_build.context_tar is None and "build_context" not in no_build.version_body("1")
    (d / "docker-compose.yml").write_text("services: [1\n")
    with pytest.raises(UsageError, match=r"docker-compose\.yml: "):
        read_workload(d, expose_port=80, expose_service=None, health_path="/", env={})
    with pytest.raises(UsageError, match="no Compose file"):
        read_workload(tmp_path / "hello" / "www", expose_port=80, expose_service=None,
                      health_path="/", env={})

    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in (["A"], ["=1"], ["A=1", "A=2"]):
        with pytest.raises(UsageError):
            parse_env(bad)


def test_checked_hash(tmp_path: Path) -> None:
    w = read_workload(app_dir(tmp_path), expose_port=None, expose_service=None,
                      health_path="/", env={})
    assert checked_hash(w, w.hash()) == (w.hash(), None)
    shown, warning = checked_hash(w, w.v1_hash())
    assert shown == w.v1_hash() and warning is not None and "version-1" in warning
    for other in ("sha256:" + "0" * 64, None, 7):
        with pytest.raises(PushMismatch):
            checked_hash(w, other)


def test_settled() -> None:
    def dep(state: str, version: str = "2", wanted: int = 1, *replicas: tuple[str, str]
            ) -> dict[str, Any]:
        return {"state": state, "version": version, "replicas_wanted": wanted,
                "compose_hash": "h2", "replicas": [{"state": s, "compose_hash": h}
                                                   for s, h in replicas]}
    assert settled(dep("running", "2", 1, ("running", "h2")), version="2").done
    assert not settled(dep("running", "1", 1, ("running", "h1")), version="2").done
    # The old replica still runs beside the new one (surge): not yet.
    assert not settled(dep("running", "2", 1, ("running", "h2"), ("running", "h1")),
                       version="2").done
    assert not settled(dep("running", "2", 1, ("starting", "h2")), version="2").done
    assert settled(dep("running", "2", 1, ("running", "h2"), ("stopped", "h1")),
                   version="2").done
    failed = settled({**dep("failed"), "error": "health check failed"}, version="2")
    assert not failed.done and failed.failure == "deployment is failed: health check failed"
    back = settled({**dep("running", "1"), "rollout": {"state": "rolled_back",
                                                        "error": "gate"}}, version="2")
    assert back.failure == "the update to 2 rolled_back: gate"
    assert not settled(dep("running", "2", 1, ("running", "h2")), replicas=2).done
    assert settled(dep("running", "2", 2, ("running", "h2"), ("running", "h2")),
                   replicas=2).done
    assert settled({"state": "stopped"}, stopped=True).done
    assert not settled({"state": "stopping"}, stopped=True).done


def test_log_and_sse_parsing() -> None:
    flat = {"lines": [{"at": "t", "service": "web", "agent_id": "ag", "text": "hi"}, "raw"]}
    assert log_entries(flat) == [flat["lines"][0], {"text": "raw"}]
    legacy = {"replicas": [{"agent_id": "ag-1", "lines": {"web": "a\nb", "db": ["c"]}},
                           {"agent_id": "ag-2", "error": "gone"}]}
    assert [(e["agent_id"], e["service"], e["text"]) for e in log_entries(legacy)] == [
        ("ag-1", "web", "a"), ("ag-1", "web", "b"), ("ag-1", "db", "c"),
        ("ag-2", None, "(no logs: gone)")]
    stream = ["event: log", "data: {\"text\": 1}", "", ": keep-alive", "", "data: a",
              "data: b", "", "data: tail"]
    assert list(sse_data(stream)) == ['{"text": 1}', "a\nb", "tail"]


def test_attestation_view_and_shorthand() -> None:
    view = {"replicas": [{"agent_id": "ag-1", "verdict": "pass", "tcb_status": "UpToDate",
                          "measurements": {"mrtd": "00"}},
                         {"agent_id": "ag-2", "attestation": {"verdict": "fail"},
                          "agent_status": "online"}, {"nope": 1}]}
    agents = agents_from_attestation(view)
    assert set(agents) == {"ag-1", "ag-2"}
    deployment = {"state": "running", "replicas_wanted": 2,
                  "replicas": [{"agent_id": "ag-1", "state": "running"},
                               {"agent_id": "ag-2", "state": "running"}]}
    check = attested_check(deployment, agents)
    assert not check.done and [r[-1] for r in check.rows] == ["yes", "no"]
    assert expand_shorthands(["deploy", "hello", "--version", "1"]) == [
        "deploy", "run", "hello", "--version", "1"]
    for argv in (["deploy", "run", "x"], ["deploy", "preflight", "x"], ["deploy", "--help"],
                 ["status", "hello"]):
        assert expand_shorthands(argv) == argv


def test_config_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EE_CP", "EE_CP_URL", "EE_API_KEY", "EE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    ns = argparse.Namespace(cp=None, token=None, token_file=None)
    assert ctl_client.resolve_tenant(ns) == (ctl_client.DEFAULT_CP_URL, None)
    conf = tmp_path / "easyenclave"
    conf.mkdir()
    (conf / "k").write_text("from-file\n")
    (conf / "config.json").write_text('{"cp": "https://cp.example", "key_file": "k"}')
    assert ctl_client.resolve_tenant(ns) == ("https://cp.example", "from-file")
    monkeypatch.setenv("EE_API_KEY", "from-env")
    monkeypatch.setenv("EE_CP", "http://env:1")
    assert ctl_client.resolve_tenant(ns) == ("http://env:1", "from-env")
    ns = argparse.Namespace(cp="http://flag:2", token="from-flag", token_file=None)
    assert ctl_client.resolve_tenant(ns) == ("http://flag:2", "from-flag")
    (conf / "config.json").write_text('{"cp": "https://cp.example", "key_file": "gone"}')
    monkeypatch.delenv("EE_API_KEY")
    with pytest.raises(UsageError, match="cannot read the config's key_file"):
        ctl_client.resolve_tenant(argparse.Namespace(cp=None, token=None, token_file=None))
    (conf / "config.json").write_text("[")
    with pytest.raises(UsageError, match="is not JSON"):
        ctl_client.load_config()


async def test_logs_follow_and_errors_from_a_stand_in_cp(tmp_path: Path) -> None:
    """`logs -f` reads Server-Sent Events (each a JSON line) until the stream ends; an
    error answer is one line with the CP's reason code."""
    seen: list[str] = []
    stream = (b'event: log\ndata: {"at": "2026-01-01T00:00:00Z", "service": "web", '
              b'"agent_id": "ag-1", "text": "hello"}\n\n: keep-alive\n\n'
              b'data: {"at": "2026-01-01T00:00:01Z", "service": "web", "agent_id": "ag-1", '
              b'"text": "again"}\n\n')

    def respond(method: str, path: str, _body: bytes) -> tuple[int, str, bytes]:
        seen.append(f"{method} {path}")
        if path.startswith("/api/v2/deployments/dep-1/logs"):
            return 200, "text/event-stream", stream
        error = {"error": {"code": "not_found", "message": "no deployment 'dep-2'",
                           "details": {}}}
        return 404, "application/json", json.dumps(error).encode()

    with trio.fail_after(60), local_http(respond) as url:
        cp = ("--cp", url, "--key", "k")
        r = await eectl("logs", "dep-1", "-f", "--service", "web", "--since", "10m", *cp,
                        state_dir=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            "2026-01-01T00:00:00Z web ag-1 | hello", "2026-01-01T00:00:01Z web ag-1 | again"]
        assert seen[0] == ("GET /api/v2/deployments/dep-1/logs?tail=200&service=web&"
                           "since=10m&follow=true")
        r = await eectl("logs", "dep-2", "-f", *cp, state_dir=tmp_path)
        assert (r.returncode, r.stderr) == (1, "eectl logs: no deployment 'dep-2' "
                                                "(404 not_found)\n")


async def test_listings_follow_next_cursor(tmp_path: Path) -> None:
    pages = {"": {"deployments": [{"deployment_id": "dep-1", "app": "a", "state": "running",
                                   "version": "1", "replicas_wanted": 1, "replicas": []}],
                  "next_cursor": "c2"},
             "c2": {"deployments": [{"deployment_id": "dep-2", "app": "b", "state": "failed",
                                     "version": "3", "replicas_wanted": 2, "replicas": []}],
                    "next_cursor": None}}
    asked: list[str] = []

    def respond(_method: str, path: str, _body: bytes) -> tuple[int, str, bytes]:
        asked.append(path)
        cursor = path.partition("cursor=")[2]
        return 200, "application/json", json.dumps(pages[cursor]).encode()

    with trio.fail_after(30), local_http(respond) as url:
        r = await eectl("status", "--cp", url, "--key", "k", state_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert column(r.stdout, "dep-1", "STATE") == "running"
    assert column(r.stdout, "dep-2", "RUNNING") == "0/2"
    assert asked == ["/api/v2/deployments", "/api/v2/deployments?cursor=c2"]


async def test_events_from_a_stand_in_stream(tmp_path: Path) -> None:
    """`eectl events` opens the tenant stream with the key, prints each event, and
    stops after --limit; a refusal is one line."""
    seen: list[tuple[str, str | None]] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        seen.append((request.path, headers.get("authorization")))
        if headers.get("authorization") != "Bearer k":
            await request.reject(401, body=json.dumps({"error": {
                "code": "unauthenticated", "message": "bad key", "details": {}}}).encode())
            return
        ws = await request.accept()
        for seq in (1, 2, 3):
            await ws.send_message(json.dumps({
                "seq": seq, "at": f"2026-01-01T00:00:0{seq}Z", "kind": "deployment.placed",
                "subject": "dep-1", "data": {"app": "hello"}}))
        await trio.sleep(30)  # eectl hangs up after --limit

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, handler,
                                         "127.0.0.1", 0, None)
            url = f"http://127.0.0.1:{server.port}"
            r = await eectl("events", "--app", "hello", "--limit", "2", "--cp", url, "--key",
                            "k", state_dir=tmp_path)
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines() == [
                "#1 00:00:01 deployment.placed dep-1 app=hello",
                "#2 00:00:02 deployment.placed dep-1 app=hello"]
            assert seen == [("/api/v2/events?app=hello", "Bearer k")]
            r = await eectl("events", "--json", "--limit", "1", "--cp", url, "--key", "k",
                            state_dir=tmp_path)
            assert json.loads(r.stdout)["seq"] == 1
            r = await eectl("events", "--cp", url, "--key", "wrong", state_dir=tmp_path)
            assert (r.returncode, r.stderr) == (1, "eectl events: bad key (401 "
                                                   "unauthenticated)\n")
            nursery.cancel_scope.cancel()
