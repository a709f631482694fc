"""`eectl tenant`: account, app and version set-up against a real in-process CP with a
sim agent (the commands run in a worker thread, so the CP keeps serving)."""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import tarfile
from pathlib import Path

import pytest
import trio

from ee.ctl import tenant

from .ctlkit import running_cp


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="eectl")
    tenant.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["tenant", *argv])
    return int(args.handler(args))


def context(tmp: Path) -> Path:
    ctx = tmp / "ctx"
    (ctx / "www").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("FROM ee-busybox:local\nCOPY www /www\n")
    (ctx / "www" / "index.html").write_text("hi\n")
    return ctx


def test_pack_context_is_deterministic_and_refuses_links(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    first = tenant.pack_context(ctx)
    (ctx / "www" / "index.html").touch()  # a new mtime changes nothing
    assert tenant.pack_context(ctx) == first
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(base64.b64decode(first)))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["Dockerfile", "www", "www/index.html"]
    assert {(m.uid, m.gid, m.mtime, m.uname) for m in members} == {(0, 0, 0, "")}
    (ctx / "link").symlink_to("/etc/passwd")
    with pytest.raises(tenant.UsageError, match="link is not a regular file"):
        tenant.pack_context(ctx)


async def test_set_up_an_app_and_wait_until_placeable(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    compose = tmp_path / "compose.yml"
    compose.write_text("services:\n  web:\n    build: .\n")
    key_file = tmp_path / "tenant.key"
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as env, trio.open_nursery() as nursery:
            admin = ("--cp", env.http, "--token", env.token)
            as_tenant = ("--cp", env.http, "--token-file", str(key_file))

            async def eectl(*argv: str) -> int:
                return await trio.to_thread.run_sync(run, *argv)

            assert await eectl("create-account", "acme", "--key-file", str(key_file),
                               *admin) == 0
            assert key_file.stat().st_mode & 0o777 == 0o600
            key = key_file.read_text().strip()
            assert key not in capsys.readouterr().out  # the key goes to the file only
            assert await eectl("create-account", "acme", "--key-file", str(key_file),
                               *admin) == 2  # never overwrites a key file
            assert key_file.read_text().strip() == key

            assert await eectl("create-app", "web", *as_tenant) == 0
            assert await eectl("add-version", "web", "--version", "1", "--compose",
                               str(compose), "--context", str(context(tmp_path)),
                               "--expose-port", "8080", "--health-path", "/health",
                               *as_tenant) == 0
            printed = capsys.readouterr().out
            async with env.client(token=key) as client:
                versions = (await client.get("/api/v2/apps/web/versions")).json()["versions"]
            assert f"web@1: compose_hash {versions[0]['compose_hash']}" in printed

            # A tenant key cannot create accounts: one line, exit 1.
            assert await eectl("create-account", "x", "--key-file",
                               str(tmp_path / "x.key"), *as_tenant) == 1
            assert capsys.readouterr().err.startswith("eectl tenant create-account: ")
            assert not (tmp_path / "x.key").exists()

            # No agent yet: not placeable, after the timeout; then an agent joins.
            assert await eectl("wait-placeable", "web", "--version", "1", "--timeout",
                               "0.1", *as_tenant) == 1
            assert "not placeable" in capsys.readouterr().err
            await nursery.start(env.agent("vm-1").run)
            assert await eectl("wait-placeable", "web", "--version", "1", "--timeout",
                               "30", *as_tenant) == 0
            assert "placeable on 1 agent(s)" in capsys.readouterr().out

            assert await eectl("undeploy", "dep-nope", *as_tenant) == 1
            assert "(404 " in capsys.readouterr().err
            nursery.cancel_scope.cancel()
