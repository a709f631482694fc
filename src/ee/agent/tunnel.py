"""The optional cloudflared tunnel, run as a supervised child process.

Theory of operation
-------------------
With a tunnel grant from the CP (``registered.tunnel``: hostname + token) the agent
runs ``<command> tunnel --no-autoupdate run`` with the token in ``TUNNEL_TOKEN`` (not
on the command line, where ``ps`` would show it); with only ``tunnel.enabled`` in its
config it runs a quick tunnel to its own HTTP port (``<command> tunnel --no-autoupdate
--url http://127.0.0.1:<port>``).

The process is restarted whenever it exits, after :func:`~ee.agent.backoff.backoff_delay`
of the number of consecutive *quick* failures (a run shorter than
``restart_backoff_max_s``; a longer run resets the count). After ``max_restarts``
consecutive quick failures the supervisor gives up and reports ``failed``; the agent
keeps serving (the tunnel is a convenience, the CP session is not). Cancellation stops
the process (Trio terminates, then kills it). :attr:`TunnelSupervisor.status` is what
``GET /.ee/health`` shows.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import subprocess
from collections.abc import Callable
from typing import Any, Literal

import attrs
import trio

from ee.agent.backoff import backoff_delay
from ee.agent.config import TunnelConfig
from ee.protocol.messages import TunnelGrant

__all__ = ["TunnelState", "TunnelStatus", "TunnelSupervisor", "tunnel_command"]

log = logging.getLogger("ee.agent.tunnel")

STOP_GRACE_S = 5.0

TunnelState = Literal["starting", "running", "backoff", "failed", "stopped"]


@attrs.frozen
class TunnelStatus:
    state: TunnelState
    hostname: str | None = None
    restarts: int = 0
    pid: int | None = None
    last_exit: int | None = None
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def tunnel_command(
    command: str, grant: TunnelGrant | None, local_url: str
) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment for one cloudflared run."""
    if grant is not None:
        return [command, "tunnel", "--no-autoupdate", "run"], {"TUNNEL_TOKEN": grant.token}
    return [command, "tunnel", "--no-autoupdate", "--url", local_url], {}


class TunnelSupervisor:
    """Keeps one cloudflared process running (see the module docstring)."""

    def __init__(
        self,
        config: TunnelConfig,
        local_url: str,
        grant: TunnelGrant | None = None,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.local_url = local_url
        self.grant = grant
        self.jitter = jitter
        self.status = TunnelStatus("starting", hostname=grant.hostname if grant else None)
        self._tail: collections.deque[str] = collections.deque(maxlen=20)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        argv, extra_env = tunnel_command(self.config.command, self.grant, self.local_url)
        env = {**os.environ, **extra_env}
        failures = 0
        restarts = 0
        task_status.started()
        try:
            while True:
                started = trio.current_time()
                code, error = await self._run_once(argv, env, restarts)
                ran = trio.current_time() - started
                failures = 1 if ran >= self.config.restart_backoff_max_s else failures + 1
                if failures > self.config.max_restarts:
                    self._set(state="failed", pid=None, last_exit=code, last_error=error)
                    log.error("tunnel: giving up after %d quick failures: %s", failures, error)
                    return
                delay = backoff_delay(
                    failures,
                    self.config.restart_backoff_base_s,
                    self.config.restart_backoff_max_s,
                    self.jitter(),
                )
                self._set(state="backoff", pid=None, last_exit=code, last_error=error)
                log.warning("tunnel: %s; restarting in %.1f s", error, delay)
                await trio.sleep(delay)
                restarts += 1
        finally:
            if self.status.state not in ("failed",):
                self._set(state="stopped", pid=None)

    async def _run_once(
        self, argv: list[str], env: dict[str, str], restarts: int
    ) -> tuple[int | None, str]:
        self._set(state="starting", restarts=restarts)
        self._tail.clear()
        try:
            process = await trio.lowlevel.open_process(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            return None, f"cannot start {argv[0]!r}: {exc}"
        try:
            self._set(state="running", pid=process.pid)
            log.info("tunnel: cloudflared running (pid %d)", process.pid)
            assert process.stderr is not None
            async for chunk in process.stderr:
                for line in bytes(chunk).decode("utf-8", "replace").splitlines():
                    if line.strip():
                        self._tail.append(line)
                        log.debug("cloudflared: %s", line)
            code = await process.wait()
        finally:
            if process.returncode is None:  # cancelled: stop it, politely first
                with trio.CancelScope(shield=True):
                    process.terminate()
                    with trio.move_on_after(STOP_GRACE_S):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
        last = self._tail[-1] if self._tail else "no output"
        return code, f"cloudflared exited with code {code} ({last})"

    def _set(self, **changes: Any) -> None:
        self.status = attrs.evolve(self.status, **changes)
