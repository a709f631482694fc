"""The workload boundary at the CP: policy 400s naming the compose path, reserved env
names, build contexts validated off the event loop, per-account quotas."""

from __future__ import annotations

import base64
import gzip
import io
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from cpkit import RunningCp, running_cp
from test_tenants import COMPOSE, context, tenant

import ee.cp.tenants as tenants_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))
from test_workload_policy import REFUSED


def _events(env: RunningCp, kind: str) -> list[Any]:
    return [e for e in env.cp.events.recent if e.kind == kind]


async def test_every_refused_compose_feature_is_a_400_naming_the_path(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http:
                assert (await http.post("/api/v2/apps", json={"name": "a"})).status_code == 201
                for name, text, path, code in REFUSED:
                    r = await http.post("/api/v2/apps/a/versions", json={
                        "version": "1", "compose": text, "expose_port": 80})
                    assert r.status_code == 400, (name, r.text)
                    error = r.json()["error"]
                    assert error["code"] == "workload_policy", (name, error)
                    assert error["details"] == {"field": "compose", "path": path,
                                                "reason": code}, name
                    assert path in error["message"]
                refused = _events(env, "app.version_refused")
                assert len(refused) == len(REFUSED)
                assert refused[0].data["reason"] == REFUSED[0][3]
                # Nothing was stored: the app has no versions.
                r = await http.get("/api/v2/apps/a/versions")
                assert r.json()["versions"] == []
                ok = await http.post("/api/v2/apps/a/versions", json={
                    "version": "1", "compose": COMPOSE, "build_context": context(),
                    "expose_port": 80})
                assert ok.status_code == 201, ok.text


@pytest.mark.parametrize(
    ("env", "path", "reason"),
    [
        ({"PYTHONPATH": "context"}, "env.PYTHONPATH", "reserved_env_name"),
        ({"LD_PRELOAD": "/x"}, "env.LD_PRELOAD", "reserved_env_name"),
        ({"DOCKER_HOST": "tcp://evil:2375"}, "env.DOCKER_HOST", "reserved_env_name"),
        ({"COMPOSE_PROJECT_NAME": "victim"}, "env.COMPOSE_PROJECT_NAME", "reserved_env_name"),
        ({"PATH": "context"}, "env.PATH", "reserved_env_name"),
        ({"BAD-NAME": "x"}, "env.BAD-NAME", "bad_env_name"),
        ({"A": "x\u0000"}, "env.A", "bad_env_value"),
    ],
)
async def test_reserved_and_bad_env_names_are_400(
    tmp_path: Path, env: dict[str, str], path: str, reason: str
) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as cp_env:
            http = await tenant(cp_env, "t")
            async with http:
                await http.post("/api/v2/apps", json={"name": "a"})
                r = await http.post("/api/v2/apps/a/versions", json={
                    "version": "1", "compose": COMPOSE, "expose_port": 80, "env": env})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["code"] == "workload_policy"
                assert r.json()["error"]["details"] == {"field": "env", "path": path,
                                                        "reason": reason}


async def _health_answers_while_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, upload: dict[str, Any]
) -> None:
    """Hold ``tenants.<name>`` mid-call in its worker thread during an upload: /health
    must answer meanwhile (were the work on the event loop, it could not: fail_after),
    then the upload completes with 201."""
    entered = threading.Event()
    release = threading.Event()
    real = getattr(tenants_module, name)

    def held(*args: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(tenants_module, name, held)
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http, trio.open_nursery() as nursery:
                await http.post("/api/v2/apps", json={"name": "a"})
                result: dict[str, int] = {}

                async def send() -> None:
                    r = await http.post("/api/v2/apps/a/versions", json=upload)
                    result["status"] = r.status_code

                nursery.start_soon(send)
                await trio.to_thread.run_sync(entered.wait)
                async with env.client(token=None) as anon:
                    health = await anon.get("/api/v2/health")
                assert health.status_code == 200
                assert "status" not in result  # the upload is still being validated
                release.set()
            assert result["status"] == 201


async def test_build_context_is_validated_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _health_answers_while_held(tmp_path, monkeypatch, "_check_context", {
        "version": "1", "compose": COMPOSE, "build_context": context(), "expose_port": 80})


async def test_a_decompression_bomb_is_refused(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 250 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = base64.b64encode(gzip.compress(raw.getvalue(), compresslevel=9)).decode()
    del raw
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http:
                await http.post("/api/v2/apps", json={"name": "a"})
                r = await http.post("/api/v2/apps/a/versions", json={
                    "version": "1", "compose": COMPOSE, "build_context": bomb,
                    "expose_port": 80})
                assert r.status_code == 400, r.text
                assert "expands more than" in r.json()["error"]["message"]
                assert r.json()["error"]["details"]["field"] == "build_context"


async def test_per_account_quotas(tmp_path: Path) -> None:
    body = {"compose": COMPOSE, "expose_port": 80}
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", tenant_max_versions=3,
                              tenant_max_stored_bytes=4000) as env:
            http = await tenant(env, "t")
            other = await tenant(env, "u")
            async with http, other:
                for app in ("a", "b"):
                    await http.post("/api/v2/apps", json={"name": app})
                for app, version in (("a", "1"), ("a", "2"), ("b", "1")):
                    r = await http.post(f"/api/v2/apps/{app}/versions",
                                        json={**body, "version": version})
                    assert r.status_code == 201, r.text
                r = await http.post("/api/v2/apps/b/versions", json={**body, "version": "2"})
                assert r.status_code == 403, r.text
                assert r.json()["error"]["code"] == "quota_exceeded"
                assert r.json()["error"]["details"]["quota"] == "versions"
                # Another account has its own quota; bytes count too.
                await other.post("/api/v2/apps", json={"name": "a"})
                big = COMPOSE + "# " + "x" * 5000 + "\n"
                r = await other.post("/api/v2/apps/a/versions",
                                     json={**body, "compose": big, "version": "1"})
                assert r.status_code == 403, r.text
                assert r.json()["error"]["details"]["quota"] == "stored_bytes"
                r = await other.post("/api/v2/apps/a/versions", json={**body, "version": "1"})
                assert r.status_code == 201, r.text


async def test_health_path_the_agent_would_refuse_is_a_400(tmp_path: Path) -> None:
    """One shared check (``check_health_path``): what the agent's DeploySpec refuses
    (space, '#', CR/LF, tab) the CP refuses at upload."""
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http:
                await http.post("/api/v2/apps", json={"name": "a"})
                for bad in ("/a b", "/a#b", "/a\r\nHost: x", "/a\tb", "health"):
                    r = await http.post("/api/v2/apps/a/versions", json={
                        "version": "1", "compose": COMPOSE, "expose_port": 80,
                        "health_path": bad})
                    assert r.status_code == 400, (bad, r.text)
                    assert r.json()["error"]["details"] == {"field": "health_path"}, bad


async def test_compose_is_validated_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YAML parse and policy run in the worker thread too."""
    await _health_answers_while_held(tmp_path, monkeypatch, "_version_fields", {
        "version": "1", "compose": COMPOSE, "expose_port": 80})


async def test_a_pathological_compose_is_refused_by_the_yaml_bound(tmp_path: Path) -> None:
    """A 1 MB flow list (~30 s of pure-Python parsing) is refused by the YAML bound."""
    pad = "services:\n  web: {image: x}\nx-pad: [" + ",".join(["1"] * 500_000) + "]\n"
    block = "services:\n  web: {image: x}\nx-pad:\n" + "- 1\n" * 25_000
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http:
                await http.post("/api/v2/apps", json={"name": "a"})
                for text in (pad, block):
                    r = await http.post("/api/v2/apps/a/versions", json={
                        "version": "1", "compose": text, "expose_port": 80})
                    assert r.status_code == 400, r.text
                    error = r.json()["error"]
                    assert error["details"] == {"field": "compose"}
                    assert "too many YAML nodes" in error["message"]


def _context_with(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


async def test_a_dockerfile_add_of_a_url_is_a_400(tmp_path: Path) -> None:
    """dockerd's classic builder fetches ``ADD http://…`` from the VM's network
    (loopback-only services too): refused at upload, naming the Dockerfile and line."""
    compose = "services:\n  web:\n    build: {context: app, dockerfile: Dockerfile.web}\n"
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env:
            http = await tenant(env, "t")
            async with http:
                await http.post("/api/v2/apps", json={"name": "a"})
                bad = _context_with({"app/Dockerfile.web": b"FROM ee-busybox:local\n"
                                     b"ADD http://127.0.0.1:18777/secret /stolen\n"})
                r = await http.post("/api/v2/apps/a/versions", json={
                    "version": "1", "compose": compose, "build_context": bad,
                    "expose_port": 80})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["details"] == {
                    "field": "build_context", "path": "app/Dockerfile.web:2",
                    "reason": "dockerfile_remote_source"}
                assert _events(env, "app.version_refused")[-1].data["reason"] == (
                    "dockerfile_remote_source")
                good = _context_with({"app/Dockerfile.web": b"FROM ee-busybox:local\n"
                                      b"COPY . /srv\n"})
                r = await http.post("/api/v2/apps/a/versions", json={
                    "version": "1", "compose": compose, "build_context": good,
                    "expose_port": 80})
                assert r.status_code == 201, r.text
