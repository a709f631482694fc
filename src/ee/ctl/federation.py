"""`eectl federation`: join tokens, the desired state and link status (admin token).

    eectl federation join-token --cp MASTER_URL --token ADMIN [--datacenter LABEL] [--ttl-s S]
    eectl federation status --cp URL --token ADMIN
    eectl federation desired --cp MASTER_URL --token ADMIN --policy '{"max_replicas": 3}'

``join-token`` prints a single-use, short-lived token on stdout (nothing else), for
``ee-cp --role dc --upstream MASTER_URL --datacenter LABEL --join-token TOKEN``.
Exit codes: 0 success, 1 the CP said no or cannot be reached, 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys

from ee.ctl.client import CtlError, add_cp_options, client_from_args


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fed = groups.add_parser(
        "federation", help="master/dc federation: join tokens, desired state, status",
        description="Federation of datacenter CPs under a master CP (admin token).")
    commands = fed.add_subparsers(dest="command", metavar="COMMAND", required=True)
    token = commands.add_parser(
        "join-token", help="issue a single-use join token for a dc CP (master)",
        description="Print a single-use, short-lived token a dc CP trades (once) for its "
                    "mTLS certificate from the cluster CA and the master's signing key.")
    token.add_argument("--datacenter", metavar="LABEL",
                       help="bind the token to this datacenter label")
    token.add_argument("--ttl-s", type=float, metavar="SECONDS",
                       help="lifetime (default: the master's, 600 s)")
    add_cp_options(token)
    token.set_defaults(handler=join_token)
    status = commands.add_parser("status", help="this CP's federation status (either role)")
    add_cp_options(status)
    status.set_defaults(handler=show_status)
    desired = commands.add_parser(
        "desired", help="set the policy in the master's desired state (signed, versioned)")
    desired.add_argument("--policy", required=True, metavar="JSON",
                         help="a JSON object pushed to every dc CP")
    add_cp_options(desired)
    desired.set_defaults(handler=set_desired)


def join_token(args: argparse.Namespace) -> int:
    body: dict[str, object] = {}
    if args.datacenter:
        body["datacenter"] = args.datacenter
    if args.ttl_s is not None:
        body["ttl_s"] = args.ttl_s
    try:
        with client_from_args(args) as client:
            answer = client.post("/api/v2/federation/join-tokens", body)
    except CtlError as exc:
        print(f"eectl federation join-token: {exc}", file=sys.stderr)
        return exc.exit_code
    print(answer["token"])
    print(f"(single use, expires in {answer['expires_in_s']:.0f} s"
          + (f", datacenter {answer['datacenter']}" if answer.get("datacenter") else "")
          + ")", file=sys.stderr)
    return 0


def show_status(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            answer = client.get("/api/v2/federation/status")
    except CtlError as exc:
        print(f"eectl federation status: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(answer, indent=2, sort_keys=True))
    return 0


def set_desired(args: argparse.Namespace) -> int:
    try:
        policy = json.loads(args.policy)
    except ValueError as exc:
        print(f"eectl federation desired: --policy is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(policy, dict):
        print("eectl federation desired: --policy must be a JSON object", file=sys.stderr)
        return 2
    try:
        with client_from_args(args) as client:
            answer = client.request("PUT", "/api/v2/federation/desired", {"policy": policy})
    except CtlError as exc:
        print(f"eectl federation desired: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"desired state version {answer['version']}")
    return 0
