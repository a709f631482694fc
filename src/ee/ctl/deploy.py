"""`eectl deploy`: place an app version on agents and follow it until it runs.

    eectl deploy APP --version V [placement options] [--no-wait] [--json]
                                                        (short for `deploy run`)
    eectl deploy preflight APP --version V [placement options]
    eectl deploy run APP --version V [placement options] [--no-wait] [--json]
    eectl deploy wait-attested DEPLOYMENT_ID [--timeout S]   (also `eectl trust
                                                              wait-attested`)

`run` POSTs the deployment; when nothing fits (409) it prints the CP's preflight
diagnostics — which agents were rejected and why — and exits 1. Otherwise it polls the
deployment and shows each replica moving placing → starting → running on stderr
(redrawn in place on a terminal, one line per transition otherwise) until the
deployment runs (exit 0: the id, state and the app's URL on stdout) or fails (exit 1).
`wait-attested` waits until every replica runs on an agent that is online with a
pass/warn attestation verdict. With a tenant key it reads the deployment's
attestation view (``GET /api/v2/deployments/{id}/attestation``: per replica, the
agent's verdict, TCB status and measurements). Tenant key and CP URL: see
`ee.ctl.client`.

The views (request body, diagnostics, progress lines, attestation table) are pure
functions of the CP's JSON; the loops around them take their clock and sleep as
arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import attrs

from ee.ctl._table import cell, short_hash, table
from ee.ctl.client import (
    CpClient,
    CpError,
    CtlError,
    Json,
    add_tenant_options,
    segment,
    tenant_client_from_args,
)

REPLICA_STEPS = ("placing", "starting", "running")
COMMANDS = ("preflight", "run", "wait-attested")
FAILED_STATES = frozenset({"failed", "stopping", "stopped"})
ATTESTED_VERDICTS = frozenset({"pass", "warn"})


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deploy = groups.add_parser(
        "deploy", help="deploy an app version and follow it",
        description="Deploy an app version to attested agents and follow it. "
                    "`eectl deploy APP --version V` is short for `eectl deploy run APP "
                    "--version V`.")
    commands = deploy.add_subparsers(dest="command", metavar="COMMAND", required=True)

    pre = commands.add_parser(
        "preflight", help="ask where a deployment would go, without deploying",
        description="Print the CP's placement diagnostics: candidates and rejected agents "
                    "with reasons. Exit 0 when placeable, 1 when nothing fits.")
    _placement_args(pre)
    pre.add_argument("--json", action="store_true", help="print the CP's diagnostics JSON")
    add_tenant_options(pre)
    pre.set_defaults(handler=preflight)

    run = commands.add_parser(
        "run", help="deploy and show progress until running",
        description="Create a deployment and follow each replica (placing → starting → "
                    "running). Exit 0 when it runs, 1 when it cannot be placed (the "
                    "diagnostics are printed), fails, or times out.")
    _placement_args(run)
    run.add_argument("--no-wait", action="store_true",
                     help="print the deployment id and return at once")
    run.add_argument("--timeout", metavar="S", type=positive_number, default=900.0,
                     help="give up following after S seconds (default 900)")
    run.add_argument("--poll", metavar="S", type=positive_number, default=1.0,
                     help=argparse.SUPPRESS)
    run.add_argument("--json", action="store_true",
                     help="print the final deployment view as JSON")
    add_tenant_options(run)
    run.set_defaults(handler=run_deploy)

    register_wait_attested(commands)


def register_wait_attested(
        commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``wait-attested`` (under `deploy`, and under `trust`)."""
    wait = commands.add_parser(
        "wait-attested", help="wait until every replica runs on an attested agent",
        description="Wait until every replica of DEPLOYMENT_ID is running on an online "
                    "agent whose attestation verdict is pass or warn, then print them. "
                    "Works with a tenant key (the deployment's attestation view). "
                    "Exit 1 on failure or timeout.")
    wait.add_argument("deployment_id", metavar="ID", help="deployment id")
    wait.add_argument("--timeout", metavar="S", type=positive_number, default=300.0,
                      help="give up after S seconds (default 300)")
    wait.add_argument("--poll", metavar="S", type=positive_number, default=1.0,
                      help=argparse.SUPPRESS)
    wait.add_argument("--json", action="store_true", help="print one JSON object")
    add_tenant_options(wait)
    wait.set_defaults(handler=wait_attested)


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _placement_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", metavar="APP", help="app name")
    parser.add_argument("--version", required=True, metavar="V", help="app version")
    parser.add_argument("--replicas", type=whole_number, default=1, metavar="N",
                        help="number of replicas (default 1)")
    parser.add_argument("--datacenter", metavar="L", help="only agents in datacenter L")
    parser.add_argument("--node-size", metavar="S", help="only agents of node size S")
    parser.add_argument("--gpu", action="store_true", help="needs a GPU node")
    parser.add_argument("--exclude-agent", action="append", default=[], metavar="ID",
                        help="never place on agent ID (repeatable)")


# --- pure views --------------------------------------------------------------------


def placement_request(args: argparse.Namespace) -> Json:
    """API.md's preflight/deployment body from the command line."""
    constraints: Json = {}
    if args.datacenter:
        constraints["datacenter"] = args.datacenter
    if args.node_size:
        constraints["node_size"] = args.node_size
    if args.gpu:
        constraints["gpu"] = True
    if args.exclude_agent:
        constraints["exclude_agents"] = list(args.exclude_agent)
    return {"version": args.version, "replicas": args.replicas, "constraints": constraints}


def diagnostics_of(error: CpError) -> Json | None:
    """The preflight diagnostics inside a 409 (in ``details``, or nested one level)."""
    for candidate in (error.details, *error.details.values()):
        if isinstance(candidate, Mapping) and (
                "rejected" in candidate or "candidates" in candidate):
            return dict(candidate)
    return None


def _reason_text(reason: Any) -> str:
    if isinstance(reason, Mapping):
        message = reason.get("message") or reason.get("reason") or reason.get("detail")
        code = reason.get("code")
        if message and code:
            return f"{message} [{code}]"
        return str(message or code or dict(reason))
    return str(reason)


def diagnostics_text(diag: Json) -> str:
    """Candidates and rejected agents (one row per agent, reasons joined by '; ')."""
    lines = []
    placeable = diag.get("placeable")
    if placeable is not None:
        lines.append(f"placeable: {cell(bool(placeable))}")
    candidates = diag.get("candidates") or []
    names = [c.get("agent_id") if isinstance(c, Mapping) else c for c in candidates]
    lines.append(f"candidates: {', '.join(cell(n) for n in names) if names else 'none'}")
    rejected = diag.get("rejected") or []
    if rejected:
        lines.append(f"rejected ({len(rejected)}):")
        rows = []
        for r in rejected:
            if not isinstance(r, Mapping):
                rows.append((r, "-"))
                continue
            reasons = r.get("reasons") or []
            if not isinstance(reasons, list):
                reasons = [reasons]
            rows.append((r.get("agent_id"), "; ".join(_reason_text(x) for x in reasons)))
        lines.append(table(("AGENT", "REASONS"), rows, indent="  "))
    datacenters = diag.get("datacenters")
    if isinstance(datacenters, Mapping) and datacenters:  # at a master: why no dc takes it
        lines.append("datacenters: " + ", ".join(
            f"{cell(label)} {cell(code)}" for label, code in sorted(datacenters.items())))
    for key, value in diag.items():
        if key not in ("placeable", "candidates", "rejected") and not isinstance(
                value, Mapping | list):
            lines.append(f"{key}: {cell(value)}")
    return "\n".join(lines)


def replica_state(replica: Json) -> str:
    return str(replica.get("state") or "pending")


# A replica's state → the step of placing → starting → running it is in.
_STEP_OF = {"pending": "placing", "placing": "placing", "pulling": "starting",
            "building": "starting", "starting": "starting", "running": "running"}


def _steps(state: str) -> str:
    step = _STEP_OF.get(state)
    if step is None:
        return f"[{state}]"
    label = step if state in (step, "pending") else f"{step}: {state}"
    return " → ".join(f"[{label}]" if s == step else s for s in REPLICA_STEPS)


def progress_lines(deployment: Json, replicas_wanted: int | None = None) -> list[str]:
    """The live view: a header and one line per replica (requested but not yet placed
    replicas show as placing)."""
    replicas = list(deployment.get("replicas") or [])
    wanted = deployment.get("replicas_wanted", replicas_wanted)
    active = [r for r in replicas if replica_state(r) not in ("failed", "stopped")]
    missing = max(0, (wanted if isinstance(wanted, int) else 0) - len(active))
    lines = [f"deployment {cell(deployment.get('deployment_id'))} "
             f"{cell(deployment.get('app'))}@{cell(deployment.get('version'))}: "
             f"{cell(deployment.get('state'))}"]
    for replica in [*replicas, *([{}] * missing)]:
        state = replica_state(replica)
        line = f"  {cell(replica.get('agent_id') or '(unplaced)'):<24} {_steps(state)}"
        if replica.get("error"):
            line += f"  error: {replica['error']}"
        elif replica.get("url") and state == "running":
            line += f"  {replica['url']}"
        lines.append(line)
    return lines


def _by_agent(deployment: Json | None) -> dict[str, Json]:
    return {str(r.get("agent_id")): r for r in (deployment or {}).get("replicas") or []}


def transitions(before: Json | None, after: Json) -> list[str]:
    """One line per change between two polls (for logs and pipes)."""
    out = []
    if before is None or before.get("state") != after.get("state"):
        arrow = f"{cell(before.get('state'))} -> " if before is not None else ""
        out.append(f"deployment {cell(after.get('deployment_id'))}: {arrow}"
                   f"{cell(after.get('state'))}")
    old = _by_agent(before)
    for agent_id, replica in _by_agent(after).items():
        state = replica_state(replica)
        previous = old.get(agent_id)
        if previous is not None and replica_state(previous) == state:
            continue
        arrow = f"{replica_state(previous)} -> " if previous is not None else ""
        line = f"replica on {agent_id}: {arrow}{state}"
        if replica.get("error"):
            line += f" ({replica['error']})"
        out.append(line)
    return out


def deployment_errors(deployment: Json) -> list[str]:
    errors: list[str] = []
    for key in ("error", "errors", "reason"):
        value = deployment.get(key)
        if isinstance(value, list):
            errors.extend(_reason_text(v) for v in value)
        elif value:
            errors.append(_reason_text(value))
    for i, replica in enumerate(deployment.get("replicas") or []):
        if replica.get("error"):
            errors.append(f"replica {i + 1} ({cell(replica.get('agent_id'))}): "
                          f"{_reason_text(replica['error'])}")
    return errors


@attrs.frozen
class AttestedCheck:
    done: bool
    failure: str | None
    rows: list[tuple[Any, ...]]


def attested_check(deployment: Json, agents: Mapping[str, Json | None]) -> AttestedCheck:
    """Does every live replica (not failed or stopped; at least the wanted number) run on
    an online agent with a pass/warn verdict? A failed or stopping deployment is a
    failure; anything else may still come right, so the caller keeps waiting."""
    state = str(deployment.get("state") or "")
    failure = f"deployment is {state}" if state in FAILED_STATES else None
    replicas = list(deployment.get("replicas") or [])
    wanted = deployment.get("replicas_wanted")
    rows = []
    live = ok_count = 0
    for replica in replicas:
        agent_id = replica.get("agent_id")
        agent = agents.get(str(agent_id)) if agent_id else None
        att = (agent or {}).get("attestation") or {}
        verdict, status = att.get("verdict"), (agent or {}).get("status")
        ok = (replica_state(replica) == "running" and status == "online"
              and verdict in ATTESTED_VERDICTS)
        if replica_state(replica) not in ("failed", "stopped", "stopping"):
            live += 1
            ok_count += ok
        rows.append((agent_id, (agent or {}).get("vm_name"), replica_state(replica), status,
                     verdict, att.get("tcb_status"), short_hash(replica.get("compose_hash")),
                     "yes" if ok else "no"))
    enough = live >= (wanted if isinstance(wanted, int) else 1)
    done = failure is None and enough and ok_count == live
    return AttestedCheck(done, failure, rows)


ATTESTED_HEADERS = ("AGENT", "VM", "STATE", "STATUS", "VERDICT", "TCB",
                    "COMPOSE", "OK")


# --- progress display --------------------------------------------------------------


@attrs.define
class Progress:
    """Redraws the replica lines in place on a terminal; prints transitions otherwise."""

    out: TextIO
    tty: bool
    replicas_wanted: int | None = None
    drawn: int = 0
    last: Json | None = None

    def update(self, deployment: Json) -> None:
        if self.tty:
            lines = progress_lines(deployment, self.replicas_wanted)
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            for line in lines:
                self.out.write("\x1b[2K" + line + "\n")
            self.drawn = len(lines)
        else:
            for line in transitions(self.last, deployment):
                self.out.write(line + "\n")
        self.out.flush()
        self.last = deployment


def follow(client: CpClient, deployment_id: str, progress: Progress, *, timeout: float,
           poll: float, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> Json:
    """Poll the deployment until it is running or failed; TimeoutError after *timeout*."""
    deadline = clock() + timeout
    while True:
        deployment = client.deployment(deployment_id)
        progress.update(deployment)
        state = deployment.get("state")
        if state == "running" or state in FAILED_STATES:
            return deployment
        if clock() >= deadline:
            raise TimeoutError(f"deployment {deployment_id} is still {cell(state)} "
                               f"after {timeout:g} s")
        sleep(poll)


# --- handlers ----------------------------------------------------------------------


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"eectl deploy {command}: {message}", file=sys.stderr)
    return code


def preflight(args: argparse.Namespace) -> int:
    try:
        with tenant_client_from_args(args) as client:
            diag = client.preflight(args.app, placement_request(args))
    except CtlError as exc:
        return _fail("preflight", str(exc), exc.exit_code)
    print(json.dumps(diag, indent=2) if args.json else diagnostics_text(diag))
    return 0 if diag.get("placeable") else 1


def run_deploy(args: argparse.Namespace, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    request = placement_request(args)
    try:
        with tenant_client_from_args(args) as client:
            try:
                created = client.create_deployment(args.app, request)
            except CpError as exc:
                diag = diagnostics_of(exc) if exc.status == 409 else None
                if diag is None:
                    raise
                print(f"cannot place {args.app}@{args.version} "
                      f"(replicas {args.replicas}): {exc.message}", file=out)
                print(diagnostics_text(diag), file=out)
                return 1
            deployment_id = str(created.get("deployment_id") or "")
            if not deployment_id:
                raise CpError(502, "bad_response", "the CP returned no deployment_id")
            if args.no_wait:
                print(json.dumps(created) if args.json else deployment_id, file=out)
                return 0
            print(f"deployment {deployment_id}: following (at most {args.timeout:g} s)",
                  file=err)
            progress = Progress(err, tty=err.isatty(), replicas_wanted=args.replicas)
            try:
                final = follow(client, deployment_id, progress, timeout=args.timeout,
                               poll=args.poll)
            except TimeoutError as exc:
                for error in deployment_errors(progress.last or {}):
                    print(f"  {error}", file=err)
                return _fail("run", f"{exc} (it keeps going: `eectl status {deployment_id}`)")
    except CtlError as exc:
        return _fail("run", str(exc), exc.exit_code)
    if args.json:
        print(json.dumps(final, indent=2), file=out)
    if final.get("state") == "running":
        if not args.json:
            print(f"deployment {deployment_id} is running", file=out)
            print(f"url: {cell(app_url(final))}", file=out)
        return 0
    print(f"deployment {deployment_id} {cell(final.get('state'))}", file=err)
    for error in deployment_errors(final) or ["(the CP gave no error detail)"]:
        print(f"  {error}", file=err)
    return 1


def app_url(deployment: Json) -> str | None:
    """Where the app answers: the deployment's ``url``, else a running replica's."""
    url = deployment.get("url")
    if isinstance(url, str) and url:
        return url
    for replica in deployment.get("replicas") or []:
        if replica_state(replica) == "running" and replica.get("url"):
            return str(replica["url"])
    return None


def agents_from_attestation(view: Json) -> dict[str, Json | None]:
    """The tenant attestation view (per replica: ``agent_id``, ``verdict``,
    ``tcb_status``, ``agent_status``/``status``, ``vm_name``, ``measurements``; or these
    under ``attestation``) as the agent views `attested_check` reads."""
    agents: dict[str, Json | None] = {}
    for replica in view.get("replicas") or []:
        if not isinstance(replica, Mapping) or not replica.get("agent_id"):
            continue
        att = replica.get("attestation")
        att = att if isinstance(att, Mapping) else replica
        # A view without agent status lists attested agents only: count them online.
        status = replica.get("agent_status", att.get("agent_status", "online"))
        agents[str(replica["agent_id"])] = {
            "status": status if isinstance(status, str) else None,
            "vm_name": replica.get("vm_name"),
            "attestation": {"verdict": att.get("verdict"),
                            "tcb_status": att.get("tcb_status")}}
    return agents


def wait_attested(args: argparse.Namespace, out: TextIO | None = None, *,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> int:
    out = out or sys.stdout
    path = f"/api/v2/deployments/{segment(args.deployment_id)}/attestation"
    try:
        with tenant_client_from_args(args) as tenant:
            deadline = clock() + args.timeout
            while True:
                deployment = tenant.deployment(args.deployment_id)
                agents = agents_from_attestation(tenant.get(path))
                check = attested_check(deployment, agents)
                if check.done or check.failure or clock() >= deadline:
                    break
                sleep(args.poll)
    except CtlError as exc:
        return _fail("wait-attested", str(exc), exc.exit_code)
    if args.json:
        print(json.dumps({"deployment_id": args.deployment_id, "attested": check.done,
                          "failure": check.failure,
                          "replicas": [dict(zip((h.lower() for h in ATTESTED_HEADERS), row,
                                                strict=True)) for row in check.rows]},
                         indent=2), file=out)
    else:
        print(table(ATTESTED_HEADERS, check.rows) if check.rows else "no replicas placed",
              file=out)
    if check.done and args.json:
        return 0
    if check.done:
        print(f"deployment {args.deployment_id}: every replica runs on an attested agent",
              file=out)
        return 0
    reason = check.failure or (
        f"not every replica runs on an attested agent after {args.timeout:g} s")
    return _fail("wait-attested", reason)


__all__ = [
    "COMMANDS",
    "AttestedCheck",
    "Progress",
    "agents_from_attestation",
    "app_url",
    "attested_check",
    "deployment_errors",
    "diagnostics_of",
    "diagnostics_text",
    "follow",
    "placement_request",
    "positive_number",
    "progress_lines",
    "register",
    "register_wait_attested",
    "transitions",
    "whole_number",
]
