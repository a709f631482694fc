"""`eectl agents`: VM-name bindings (admin token).

A VM name is bound to the session key it first registered with; a new key for it is
refused (``KEY_CHANGED``) and a name whose signed binding failed verification is held
(``BINDING_INVALID``) until an operator releases it:

    eectl agents names --cp URL --token T
    eectl agents release-name NAME --cp URL --token T

``release-name`` exits 0 when released; 1 when the CP does not know the name, says no
or cannot be reached; 2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys

from ee.ctl.client import CtlError, add_cp_options, client_from_args
from ee.ctl.console import names_table, release_line


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agents = groups.add_parser(
        "agents", help="agents' VM-name bindings: list, release",
        description="VM names and the session keys they are bound to (admin token).")
    commands = agents.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = commands.add_parser(
        "names", help="list VM names with their key and state (bound, held)",
        description="List every bound VM name: its key (sha256), agent id and state; "
                    "'held' names have a binding that failed verification.")
    add_cp_options(names)
    names.set_defaults(handler=list_names)
    release = commands.add_parser(
        "release-name", help="let a new key register under a VM name",
        description="Forget the key VM name NAME is bound to (a rebuilt VM, or a held "
                    "name): the next key to register under NAME owns it.")
    release.add_argument("name", metavar="NAME", help="the VM name")
    add_cp_options(release)
    release.set_defaults(handler=release_name)


def list_names(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            names = client.vm_names()
    except CtlError as exc:
        print(f"eectl agents names: {exc}", file=sys.stderr)
        return exc.exit_code
    print(names_table(names) if names else "no VM names are bound")
    return 0


def release_name(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            answer = client.release_name(args.name)
    except CtlError as exc:
        print(f"eectl agents release-name: {exc}", file=sys.stderr)
        return exc.exit_code
    print(release_line(answer))
    return 0
