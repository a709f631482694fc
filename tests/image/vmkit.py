"""Boot a built image under QEMU for tests, and a real ``ee-cp --dev`` for it to join."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from ee.image.qemu import VmSpec, choose_accel, qemu_command, swtpm_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_spec(image: Path, serial: Path, *, root: Path | None = None, extra_cmdline: str = "",
            **kw: object) -> VmSpec:
    cmdline = (image / "cmdline").read_text().strip()
    return VmSpec(kernel=image / "vmlinuz", initrd=image / "initrd.img",
                  root=root or image / "root.img",
                  cmdline=f"{cmdline} {extra_cmdline}".strip(), serial_log=serial,
                  accel=choose_accel(), **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(argv: list[str], log: Path,
                  env: dict[str, str] | None = None) -> AsyncIterator[trio.Process]:
    """A process for the duration of the block; terminated (then killed) afterwards."""
    with log.open("ab") as out:
        proc = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT,
                                                env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def booted(spec: VmSpec, log: Path) -> AsyncIterator[trio.Process]:
    async with running(qemu_command(spec), log) as proc:
        yield proc


@asynccontextmanager
async def cp_server(tmp: Path, args: list[str], env: dict[str, str],
                    token: Path) -> AsyncIterator[tuple[str, int, str, dict[str, str]]]:
    """A real ``ee-cp`` (*args* after the listeners) on loopback, healthy: (http base,
    agent-plane port, admin token read from *token*, env). Its log is ``tmp/cp.log``."""
    port, plane = free_port(), free_port()
    argv = [sys.executable, "-m", "ee.cp.server", *args,
            "--listen", f"127.0.0.1:{port}", "--agent-listen", f"127.0.0.1:{plane}"]
    base = f"http://127.0.0.1:{port}"
    async with running(argv, tmp / "cp.log", env) as proc:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            with trio.fail_after(60):
                while True:
                    assert proc.returncode is None, (tmp / "cp.log").read_text()[-2000:]
                    try:
                        if (await client.get("/api/v2/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.5)
        yield base, plane, (await trio.Path(token).read_text()).strip(), env


@asynccontextmanager
async def dev_cp(tmp: Path) -> AsyncIterator[tuple[str, int, str, dict[str, str]]]:
    """A real ``ee-cp --dev`` on loopback: (http base, agent-plane port, token, env)."""
    env = {**os.environ, "EE_SIM_DIR": str(tmp / "sim")}
    async with cp_server(tmp, ["--dev", "--data-dir", str(tmp / "cp")], env,
                         tmp / "cp" / "admin.token") as cp:
        yield cp


@asynccontextmanager
async def production_cp(tmp: Path, data: Path,
                        bundle_pubkey: Path) -> AsyncIterator[tuple[str, int, str, dict[str, str]]]:
    """A real production ``ee-cp`` (no --dev) from the signed bundle in *data*."""
    async with cp_server(tmp, ["--data-dir", str(data), "--bundle-pubkey", str(bundle_pubkey)],
                         dict(os.environ), data / "admin.token") as cp:
        yield cp


@asynccontextmanager
async def swtpm(state: Path, sock: Path, log: Path) -> AsyncIterator[trio.Process]:
    """swtpm serving the TPM in *state* to one QEMU on *sock* (gone when QEMU is)."""
    await trio.Path(sock).unlink(missing_ok=True)
    async with running(swtpm_command(state, sock, log), log.with_suffix(".out")) as proc:
        with trio.fail_after(20):
            while not await trio.Path(sock).exists():
                assert proc.returncode is None, f"swtpm exited: see {log}"
                await trio.sleep(0.05)
        yield proc
