"""``ee-agent``: run an agent, or print its resolved config.

``ee-agent [--config FILE] [--cp URL] [--listen HOST:PORT] [--data-dir DIR]
[--vm-name NAME] [--node-size SIZE] [--datacenter LABEL] [--dev]`` resolves the config
chain (``ee.agent.config``), applies the flags over it and runs the agent until
SIGTERM/SIGINT (a second signal cancels at once). ``ee-agent --print-config ...`` is
:func:`ee.agent.config.print_config_main`.

Exit status: 0 after a requested stop; 1 when the config or the host is unusable (one
line on stderr says why); 2 for usage errors; 3 when the agent gave up on its CP
(reconnect attempts exhausted or unreachable too long) after its terminal action.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from ee.agent.config import (
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    ConfigError,
    ResolvedConfig,
    print_config_main,
    resolve_config,
)
from ee.agent.platform import shared_sim_dir
from ee.agent.session import Terminated
from ee.protocol.strict import FieldValueError

__all__ = ["EXIT_CONFIG", "EXIT_TERMINATED", "apply_flags", "build_parser", "main"]

log = logging.getLogger("ee.agent.main")

EXIT_CONFIG = 1
EXIT_TERMINATED = 3
CONNECT_PATH = "/api/v2/agents/connect"
DEFAULT_DATA_DIR = AgentConfig().data_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ee-agent",
        description=(
            "Run an EasyEnclave agent: attest to the control plane over a websocket "
            "session, run the workloads it deploys with Docker Compose, and serve "
            "health/attestation and a proxy to the workload on its HTTP port. Flags "
            "override the resolved config (file, config drive, kernel cmdline)."
        ),
        epilog=(
            "Print the resolved config instead: ee-agent --print-config [--cmdline FILE] "
            "[--config-drive FILE] [--config FILE]. Several agents can share a host with "
            "distinct --listen, --data-dir and --vm-name. Exit: 0 stopped, 1 config or "
            "host problem, 2 usage, 3 gave up on the CP."
        ),
    )
    p.add_argument("--print-config", action="store_true",
                   help="resolve the config chain, print it as JSON and exit")
    p.add_argument("--config", metavar="FILE",
                   help=f"config file (default {DEFAULT_CONFIG_PATH} when it exists)")
    p.add_argument("--cp", metavar="URL",
                   help="CP agent-plane URL, ws://HOST:PORT or wss://HOST:PORT (the path "
                        f"defaults to {CONNECT_PATH})")
    p.add_argument("--listen", metavar="HOST:PORT", help="agent HTTP port (default 0.0.0.0:8080)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="session key, control secret, workloads (default "
                        f"{DEFAULT_DATA_DIR}; with --dev ~/.local/share/easyenclave/agents/"
                        "VM_NAME)")
    p.add_argument("--vm-name", metavar="NAME", help="VM name (default: the host name)")
    p.add_argument("--node-size", metavar="SIZE", help="node size preset (default standard)")
    p.add_argument("--datacenter", metavar="LABEL", help="datacenter label (default local:dev)")
    p.add_argument("--dev", action="store_true",
                   help="development: the sim attestation provider with the sim chain shared "
                        "with a dev CP on this host ($EE_SIM_DIR or "
                        "~/.local/share/easyenclave/sim)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _cp_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"--cp must be a ws:// or wss:// URL, got {value!r}")
    if parts.path in ("", "/"):
        return parts._replace(path=CONNECT_PATH).geturl()
    return value


def apply_flags(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """The config with the command-line flags applied (ValueError on a bad value)."""
    changes: dict[str, Any] = {}
    if args.cp is not None:
        changes["cp_url"] = _cp_url(args.cp)
    for flag in ("listen", "data_dir", "vm_name", "node_size", "datacenter"):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = value
    if args.dev:
        changes["attestation_provider"] = "sim"
        if config.sim_dir is None:
            changes["sim_dir"] = str(shared_sim_dir())
        if args.data_dir is None and config.data_dir == DEFAULT_DATA_DIR:
            name = args.vm_name or config.vm_name or os.uname().nodename
            changes["data_dir"] = str(
                Path.home() / ".local/share/easyenclave/agents" / name)
    try:
        return attrs.evolve(config, **changes)
    except FieldValueError as exc:
        raise ValueError(str(exc)) from None


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"ee-agent: {message}", file=sys.stderr)
    return code


async def _serve(agent: Any) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_agent(task_status: trio.TaskStatus[Any]) -> None:
                try:
                    await agent.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()  # the signal watcher too

            await nursery.start(run_agent)
            print(f"ee-agent: {agent.vm_name} http on {agent.config.listen.rsplit(':', 1)[0]}:"
                  f"{agent.http_port}, CP {agent.config.cp_url or '(none: HTTP only)'}",
                  flush=True)
            print(f"ee-agent: control secret {'created' if agent.secret_created else 'kept'} in "
                  f"{agent.secret_path}", flush=True)
            nursery.start_soon(_on_signals, signals, agent, nursery.cancel_scope)


async def _on_signals(signals: Any, agent: Any, scope: trio.CancelScope) -> None:
    async for signum in signals:
        if agent.stopping:
            log.warning("second signal: cancelling")
            scope.cancel()
            return
        log.info("signal %s: stopping", signal.Signals(signum).name)
        agent.request_stop()


def _first_oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_oserror(inner)
            if found is not None:
                return found
    return None


def _first_terminated(exc: BaseException) -> Terminated | None:
    if isinstance(exc, Terminated):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_terminated(inner)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if "--print-config" in args_list:
        return print_config_main(args_list)
    args = build_parser().parse_args(args_list)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolved: ResolvedConfig = resolve_config(config_path=args.config)
        config = apply_flags(resolved.config, args)
    except ConfigError as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(str(exc))
    if config.cp_url is None:
        log.warning("no CP URL (--cp or cp_url in the config): serving HTTP only")

    from ee.agent.server import Agent

    try:
        agent = Agent(config)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot start in data dir {config.data_dir}: {exc}")
    except Exception as exc:  # attestation provider setup and the like
        return _fail(f"cannot start: {type(exc).__name__}: {exc}")
    try:
        trio.run(_serve, agent)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        terminated = _first_terminated(exc)
        if terminated is not None:
            return _fail(f"gave up on the CP: {terminated}", EXIT_TERMINATED)
        oserror = _first_oserror(exc)
        if oserror is not None:
            if oserror.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                return _fail(f"cannot listen on {config.listen}: {oserror.strerror}")
            return _fail(f"stopped on an OS error: {oserror}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
