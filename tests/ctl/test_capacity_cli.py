"""`eectl capacity verify-clouds` and the console's `pools`/`orders`, against a real CP."""

from __future__ import annotations

from pathlib import Path

import trio

from .ctlkit import console, eectl, running_cp


async def test_verify_clouds_and_console_pools(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as cp:
            r = await eectl("capacity", "verify-clouds", "--cp", cp.http, "--token", cp.token,
                            state_dir=tmp_path)
            assert r.returncode == 0 and "no capacity pools" in r.stdout
            async with cp.client() as admin:
                ok = await admin.put("/api/v2/capacity/pools/local:dev/tiny",
                                     json={"min_warm": 0, "dispatch": False, "reason": "t"})
                assert ok.status_code == 200, ok.text
                r = await eectl("capacity", "verify-clouds", "--cp", cp.http,
                                "--token", cp.token, state_dir=tmp_path)
                assert r.returncode == 0 and "local:dev" in r.stdout and "ok" in r.stdout
                short = await admin.put("/api/v2/capacity/pools/local:dev/standard",
                                        json={"min_warm": 2, "dispatch": True, "reason": "t"})
                assert short.status_code == 200, short.text
            r = await eectl("capacity", "verify-clouds", "--cp", cp.http, "--token", cp.token,
                            state_dir=tmp_path)
            assert r.returncode == 1
            assert "SHORT" in r.stdout and "local:dev/standard (2)" in r.stderr
            r = await eectl("capacity", "verify-clouds", "--cp", cp.http, "--token", "nope",
                            state_dir=tmp_path)
            assert r.returncode == 1 and len(r.err_lines) == 1

            result = await console(cp, "pools\norders\n", state_dir=tmp_path)
            assert result.returncode == 0, result.stderr
            assert "SHORTFALL" in result.stdout and "standard" in result.stdout
            assert "open" in result.stdout  # dispatch opened orders for the shortfall
