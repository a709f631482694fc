"""`eectl federation`: join tokens, the desired state and link status (admin token).

    eectl federation join-token --cp MASTER_URL --token ADMIN [--datacenter LABEL] [--ttl-s S]
    eectl federation issue --cp MASTER_URL --token ADMIN --request IN --out BUNDLE
    eectl federation status --cp URL --token ADMIN
    eectl federation desired --cp MASTER_URL --token ADMIN --policy '{"max_replicas": 3}'

``join-token`` prints a single-use, short-lived token on stdout (nothing else), for
``ee-cp --role dc --upstream MASTER_URL --datacenter LABEL --join-token TOKEN``. The
token (``eej_SECRET.PIN``) carries the master pin the dc checks the answer against.

``issue`` is the offline enrolment's middle step: it takes a dc's request (from
``ee-cp --role dc ... --enroll-request OUT``) to the master over the admin API (a join
token bound to the request's datacenter, then the join with the request's public keys),
and writes the answer as a bundle for ``ee-cp --role dc ... --enroll-bundle BUNDLE
--master-pin PIN``; it prints the pin on stdout. It goes through the running master,
not its data dir, because the master is the only writer of its enrolled dcs (their
pinned certificates and keys, the per-dc actors, the ``federation.joined`` event): a
second writer of ``dcs.json`` would race it and go unseen until a restart. The CA key
stays on the master host; only the dc's route to the master's join URL is avoided.
Exit codes: 0 success, 1 the CP said no or cannot be reached, 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    issue = commands.add_parser(
        "issue", help="sign a dc's offline enrolment request into a bundle (master)",
        description="Enrol a dc from its --enroll-request file through the master's admin "
                    "API; write the bundle for --enroll-bundle and print the master pin.")
    issue.add_argument("--request", required=True, metavar="IN",
                       help="the file `ee-cp --role dc --enroll-request` wrote")
    issue.add_argument("--out", required=True, metavar="BUNDLE", help="where to write it")
    add_cp_options(issue)
    issue.set_defaults(handler=issue_bundle)
    status = commands.add_parser(
        "status", help="this CP's federation status (either role)",
        description="Print this CP's federation status as JSON. At a master: its "
                    "federation listener, the desired-state version and every enrolled dc "
                    "(mode, link, lag, spool). At a dc CP: its upstream, whether linked, the "
                    "spool depth, acknowledged and newest sequence, and the snapshot it "
                    "runs. A standalone CP answers 409 not_federated.")
    add_cp_options(status)
    status.set_defaults(handler=show_status)
    desired = commands.add_parser(
        "desired", help="set the policy in the master's desired state (signed, versioned)",
        description="Replace the policy part of the master's desired state: the master "
                    "signs a new snapshot version and pushes it to every linked dc CP (a dc "
                    "that is down gets it when it links again). Prints the new version.")
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
    if answer.get("warning"):  # e.g. the label is enrolled: joining replaces its keys
        print(f"warning: {answer['warning']}", file=sys.stderr)
    print(f"(single use, expires in {answer['expires_in_s']:.0f} s"
          + (f", datacenter {answer['datacenter']}" if answer.get("datacenter") else "")
          + ")", file=sys.stderr)
    return 0


def issue_bundle(args: argparse.Namespace) -> int:
    from ee.federation import pki
    from ee.federation.dc import EnrolError, bundle_doc, digest, read_request

    try:
        req = read_request(Path(args.request))
    except EnrolError as exc:
        print(f"eectl federation issue: {exc}", file=sys.stderr)
        return 2
    try:
        with client_from_args(args) as client:
            token = client.post("/api/v2/federation/join-tokens",
                                {"datacenter": req.datacenter, "ttl_s": 60})
            answer = client.post("/api/v2/federation/join", pki.join_body(
                token["token"], req.datacenter, req.tls_public_key, req.signing_key))
    except CtlError as exc:
        print(f"eectl federation issue: {exc}", file=sys.stderr)
        return exc.exit_code
    except (pki.PkiError, KeyError, TypeError, AttributeError) as exc:  # a bad token answer
        print(f"eectl federation issue: the master's join token does not check: {exc}",
              file=sys.stderr)
        return 1
    try:  # what the dc will check, checked here first
        pki.check_answer(pin=token["pin"], label=req.datacenter, ca_pem=answer["ca"],
                         master_key_hex=answer["master_key"],
                         cert_pem_text=answer["certificate"],
                         tls_public_pem=req.tls_public_key)
    except (pki.PkiError, KeyError, TypeError) as exc:
        print(f"eectl federation issue: the master's answer does not check: {exc}",
              file=sys.stderr)
        return 1
    out = Path(args.out)
    pki.write_public(out, json.dumps(bundle_doc(answer), indent=1).encode())
    print(token["pin"])
    print(f"(bundle for {answer['datacenter']} in {out}; request sha256 "
          f"{digest(Path(args.request))} - compare with what the dc printed; give the dc "
          "the pin above apart from the bundle: --master-pin)", file=sys.stderr)
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
