"""eectl entry point: argparse with one module per subcommand group.

Each group module exposes ``register(subparsers)``, adding its parser and setting
``handler`` (a function ``(args) -> int`` exit code) on each leaf subcommand. To add a
group (`console`, `deploy`, `capacity`, ...), write its module and list it in GROUPS.
Exit codes: 0 success, 1 the operation ran and said no (e.g. a quote was refused),
2 usage or unreadable input; a closed stdout (``eectl … | head``) ends quietly with 1.
``eectl deploy APP …`` is short for ``eectl deploy run APP …`` (`expand_shorthands`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from ee import __version__
from ee.ctl import (
    agents,
    apps,
    billing,
    capacity,
    console,
    cpbundle,
    cpvm,
    deploy,
    drill,
    federation,
    image,
    push,
    release,
    rollout,
    tenant,
    trust,
)
from ee.ctl import vm as vm_group

GROUPS: tuple[ModuleType, ...] = (push, deploy, apps, trust, console, capacity, agents, release,
                                  tenant, cpbundle, cpvm, image, billing, rollout, drill,
                                  vm_group, federation)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eectl", description="EasyEnclave's command line, for tenants (push, deploy, "
        "status, logs, trust verify-health, …) and operators.",
        epilog="A tenant's first steps: eectl apps create NAME; eectl push DIR --app NAME "
               "--version 1; eectl deploy NAME --version 1. The API key comes from "
               "--key-file, $EE_API_KEY or ~/.config/easyenclave/config.json.")
    parser.add_argument("--version", action="version", version=f"eectl {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for module in GROUPS:
        module.register(groups)
    return parser


def expand_shorthands(argv: Sequence[str]) -> list[str]:
    """``deploy APP …`` → ``deploy run APP …``."""
    out = list(argv)
    if len(out) >= 2 and out[0] == "deploy" and out[1] not in deploy.COMMANDS \
            and not out[1].startswith("-"):
        out.insert(1, "run")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(expand_shorthands(sys.argv[1:] if argv is None else argv))
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_usage(sys.stderr)
            return 2
        code = handler(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is seen below
        return code
    except BrokenPipeError:
        return stdout_closed()


def stdout_closed() -> int:
    """The reader of stdout went away (``eectl … | head``): stop quietly, exit 1.

    stdout is pointed at /dev/null so the interpreter's final flush of what is still
    buffered does not fail again with "Exception ignored … BrokenPipeError"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
