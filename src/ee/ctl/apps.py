"""The tenant's everyday commands, at eectl's top level (tenant API key; see
`ee.ctl.client` for where the CP URL and key come from).

    eectl apps list | create NAME | delete NAME
    eectl status [DEPLOYMENT | --app A]
    eectl update DEPLOYMENT --version V      (PATCH, rolling, health-gated)
    eectl rollback DEPLOYMENT
    eectl scale DEPLOYMENT N
    eectl logs DEPLOYMENT [-f] [--service S] [--since T] [--tail N]
    eectl events [--app A] [--limit N]
    eectl undeploy DEPLOYMENT

(`eectl push` and `eectl compose-hash` are in `ee.ctl.push`, `eectl deploy` in
`ee.ctl.deploy`.) Every command prints a table or a line for people and, with
``--json``, the CP's JSON. The commands that change a deployment wait until it has
settled (``--timeout``, default 600 s; ``--no-wait`` returns at once), drawing progress
on stderr; a failure prints the CP's reason code and message, exit 1; bad usage exits 2.

The views (tables, the settle test, log lines) are pure functions of the CP's JSON;
the loops take their clock and sleep as arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

import attrs
import trio

from ee.ctl._table import cell, short_hash, table
from ee.ctl.client import (
    CpClient,
    CpError,
    CtlError,
    Json,
    UsageError,
    add_tenant_options,
    segment,
    tenant_client_from_args,
)
from ee.ctl.console import event_line, stream_events
from ee.ctl.deploy import (
    FAILED_STATES,
    Progress,
    app_url,
    deployment_errors,
    positive_number,
    replica_state,
    whole_number,
)

DEFAULT_TIMEOUT_S = 600.0
LIVE = frozenset({"pending", "placing", "pulling", "building", "starting", "running"})


def _common(parser: argparse.ArgumentParser, *, wait: bool = False) -> None:
    parser.add_argument("--json", action="store_true", help="print the CP's JSON")
    if wait:
        parser.add_argument("--no-wait", action="store_true",
                            help="return once the CP accepted the change")
        parser.add_argument("--timeout", metavar="S", type=positive_number,
                            default=DEFAULT_TIMEOUT_S,
                            help=f"give up waiting after S seconds (default "
                                 f"{DEFAULT_TIMEOUT_S:g})")
        parser.add_argument("--poll", metavar="S", type=positive_number, default=1.0,
                            help=argparse.SUPPRESS)
    add_tenant_options(parser)


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apps = groups.add_parser("apps", help="list, create and delete your apps",
                             description="Your account's apps.")
    commands = apps.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ls = commands.add_parser("list", help="list apps", description="List your apps.")
    _common(ls)
    ls.set_defaults(handler=apps_list)
    create = commands.add_parser("create", help="create an app",
                                 description="Create app NAME ([a-z0-9][a-z0-9-]{0,62}).")
    create.add_argument("name", metavar="NAME")
    _common(create)
    create.set_defaults(handler=apps_create)
    delete = commands.add_parser(
        "delete", help="delete an app",
        description="Delete app NAME with its versions and secrets (refused while one of "
                    "its deployments runs: undeploy first).")
    delete.add_argument("name", metavar="NAME")
    _common(delete)
    delete.set_defaults(handler=apps_delete)

    status = groups.add_parser(
        "status", help="show a deployment (and its URL), or list deployments",
        description="With DEPLOYMENT: its state, version, replicas and the app's URL. "
                    "Without: your deployments (of --app A only, if given).")
    status.add_argument("deployment_id", metavar="DEPLOYMENT", nargs="?")
    status.add_argument("--app", metavar="A", help="only deployments of app A")
    status.add_argument("--all", action="store_true",
                        help="also list stopped deployments")
    _common(status)
    status.set_defaults(handler=status_command)

    update = groups.add_parser(
        "update", help="roll a deployment to another version",
        description="Move DEPLOYMENT to version V: a rolling update (the new version "
                    "starts before the old stops where there is room, else in place on the "
                    "same agent, named volumes kept), gated on the health path; a failed "
                    "gate rolls back. Waits until every replica runs V.")
    update.add_argument("deployment_id", metavar="DEPLOYMENT")
    update.add_argument("--version", required=True, metavar="V")
    _common(update, wait=True)
    update.set_defaults(handler=update_command)

    rollback = groups.add_parser(
        "rollback", help="return a deployment to its previous version",
        description="Roll DEPLOYMENT back to the version it ran before the last update.")
    rollback.add_argument("deployment_id", metavar="DEPLOYMENT")
    _common(rollback, wait=True)
    rollback.set_defaults(handler=rollback_command)

    scale = groups.add_parser(
        "scale", help="change a deployment's replica count",
        description="Run N replicas of DEPLOYMENT (same version; a replica removed on "
                    "scale-down takes its agent's named volumes with it).")
    scale.add_argument("deployment_id", metavar="DEPLOYMENT")
    scale.add_argument("replicas", metavar="N", type=whole_number)
    _common(scale, wait=True)
    scale.set_defaults(handler=scale_command)

    logs = groups.add_parser(
        "logs", help="print (or follow) a deployment's logs",
        description="The deployment's container output, each line with its time, "
                    "service and agent. -f keeps following (Server-Sent Events) until "
                    "Ctrl-C or the CP ends the stream.")
    logs.add_argument("deployment_id", metavar="DEPLOYMENT")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--service", metavar="S", help="only service S")
    logs.add_argument("--since", metavar="T",
                      help="only lines after T (RFC 3339 time, or a duration like 10m)")
    logs.add_argument("--tail", metavar="N", type=whole_number, default=200,
                      help="at most N recent lines per container (default 200)")
    _common(logs)
    logs.set_defaults(handler=logs_command)

    events = groups.add_parser(
        "events", help="stream your apps' and deployments' events",
        description="Print events about your apps and deployments as they happen "
                    "(placements, failures with their cause, updates) until Ctrl-C.")
    events.add_argument("--app", metavar="A", help="only app A")
    events.add_argument("--limit", metavar="N", type=whole_number,
                        help="stop after N events")
    _common(events)
    events.set_defaults(handler=events_command)

    undeploy = groups.add_parser(
        "undeploy", help="stop a deployment",
        description="Stop DEPLOYMENT's replicas and wait until it is stopped (its "
                    "containers and named volumes are removed; the app and versions stay).")
    undeploy.add_argument("deployment_id", metavar="DEPLOYMENT")
    _common(undeploy, wait=True)
    undeploy.set_defaults(handler=undeploy_command)


# --- pure views --------------------------------------------------------------------


def status_text(deployment: Json) -> str:
    replicas = list(deployment.get("replicas") or [])
    running = sum(replica_state(r) == "running" for r in replicas)
    lines = [
        f"deployment {cell(deployment.get('deployment_id'))}  "
        f"{cell(deployment.get('app'))}@{cell(deployment.get('version'))}  "
        f"{cell(deployment.get('state'))}  "
        f"({running}/{cell(deployment.get('replicas_wanted'))} replicas running)",
        f"url: {cell(app_url(deployment))}",
        f"hash: {cell(deployment.get('compose_hash'))}",
    ]
    if replicas:
        lines.append(table(("AGENT", "STATE", "HASH", "URL", "ERROR"),
                           [(r.get("agent_id"), replica_state(r), short_hash(r.get("compose_hash")),
                             r.get("url"), r.get("error")) for r in replicas]))
    errors = deployment_errors({k: v for k, v in deployment.items() if k != "replicas"})
    lines.extend(f"error: {e}" for e in errors)
    return "\n".join(lines)


def deployments_table(deployments: Iterable[Json]) -> str:
    rows = []
    for d in deployments:
        replicas = list(d.get("replicas") or [])
        running = sum(replica_state(r) == "running" for r in replicas)
        rows.append((d.get("deployment_id"), d.get("app"), d.get("version"), d.get("state"),
                     f"{running}/{cell(d.get('replicas_wanted'))}", d.get("created_at")))
    return table(("DEPLOYMENT", "APP", "VERSION", "STATE", "RUNNING", "CREATED"), rows)


def apps_table(apps: Iterable[Json]) -> str:
    return table(("NAME", "VERSIONS", "DEPLOYMENTS"),
                 [(a.get("name"), len(a.get("versions") or []), len(a.get("deployments") or []))
                  for a in apps])


@attrs.frozen
class Settled:
    """Where a changing deployment stands: done, failed (why), or still moving."""

    done: bool
    failure: str | None = None


def settled(deployment: Json, *, version: str | None = None,
            replicas: int | None = None, stopped: bool = False) -> Settled:
    """Has *deployment* reached what was asked (a version, a replica count, stopped)?
    Done when it runs the wanted version on the wanted number of replicas, each running
    and reporting the deployment's hash; failed when it failed or stopped (or, while a
    version was asked, an update that says it rolled back)."""
    state = str(deployment.get("state") or "")
    if stopped:
        return Settled(state == "stopped")
    if state in FAILED_STATES:
        errors = deployment_errors(deployment)
        return Settled(False, f"deployment is {state}" + (f": {errors[0]}" if errors else ""))
    rollout = deployment.get("rollout") or deployment.get("update")
    if version is not None and isinstance(rollout, Mapping) and \
            rollout.get("state") in ("rolled_back", "failed"):
        return Settled(False, f"the update to {version} {rollout.get('state')}"
                              + (f": {rollout['error']}" if rollout.get("error") else ""))
    if version is not None and deployment.get("version") != version:
        return Settled(False)
    wanted = deployment.get("replicas_wanted")
    if replicas is not None and wanted != replicas:
        return Settled(False)
    live = [r for r in deployment.get("replicas") or [] if replica_state(r) in LIVE]
    expected = deployment.get("compose_hash")
    done = (state == "running" and isinstance(wanted, int) and len(live) == wanted
            and all(replica_state(r) == "running" for r in live)
            and (expected is None or all(r.get("compose_hash") == expected for r in live)))
    return Settled(done)


def _since_ok(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9]+[smhd]|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+"
                             r"(Z|[+-][0-9]{2}:[0-9]{2})", text))


def log_line(entry: Mapping[str, Any]) -> str:
    """``TIME SERVICE AGENT | text`` (the fields a CP gives; ``-`` where none)."""
    return (f"{cell(entry.get('at'))} {cell(entry.get('service'))} "
            f"{cell(entry.get('agent_id'))} | {entry.get('text', '')}")


def log_entries(body: Json) -> list[Json]:
    """A logs answer as ``{"at", "service", "agent_id", "text"}`` entries, whichever
    shape the CP gave: a flat ``lines`` list, or per replica ``lines`` (a list of
    entries or strings, or per service text)."""
    flat = body.get("lines")
    if isinstance(flat, list):
        return [e if isinstance(e, dict) else {"text": str(e)} for e in flat]
    out: list[Json] = []
    for replica in body.get("replicas") or []:
        agent = replica.get("agent_id")
        if replica.get("error"):
            out.append({"agent_id": agent, "service": None,
                        "text": f"(no logs: {replica['error']})"})
        lines = replica.get("lines")
        if isinstance(lines, dict):
            for service, text in lines.items():
                texts = text if isinstance(text, list) else str(text).splitlines()
                out.extend({"agent_id": agent, "service": service, "text": str(t)}
                           for t in texts)
        elif isinstance(lines, list):
            for e in lines:
                out.append({"agent_id": agent, **e} if isinstance(e, dict)
                           else {"agent_id": agent, "text": str(e)})
    return out


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event (multi-line data joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


# --- loops ---------------------------------------------------------------------------


def wait_settled(client: CpClient, deployment_id: str, test: Callable[[Json], Settled], *,
                 timeout: float, poll: float, out: TextIO,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Json:
    """Poll until *test* says done (the view) or failed (CtlError), or TimeoutError."""
    progress = Progress(out, tty=out.isatty())
    deadline = clock() + timeout
    while True:
        deployment = client.get(f"/api/v2/deployments/{segment(deployment_id)}")
        progress.update(deployment)
        verdict = test(deployment)
        if verdict.done:
            return dict(deployment)
        if verdict.failure:
            raise CpError(409, "failed", verdict.failure)
        if clock() >= deadline:
            errors = deployment_errors(deployment)
            raise TimeoutError(
                f"deployment {deployment_id} has not settled after {timeout:g} s (it is "
                f"{cell(deployment.get('state'))} at version {cell(deployment.get('version'))})"
                + (f": {errors[0]}" if errors else ""))
        sleep(poll)


def _fail(command: str, exc: CtlError | TimeoutError) -> int:
    print(f"eectl {command}: {exc}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, CtlError) else 1


def _print(args: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else human)


# --- handlers ----------------------------------------------------------------------


def apps_list(args: argparse.Namespace) -> int:
    try:
        with tenant_client_from_args(args) as client:
            apps = client.paged("/api/v2/apps", "apps")
    except CtlError as exc:
        return _fail("apps list", exc)
    _print(args, {"apps": apps}, apps_table(apps) if apps else "no apps")
    return 0


def apps_create(args: argparse.Namespace) -> int:
    try:
        with tenant_client_from_args(args) as client:
            created = client.post("/api/v2/apps", {"name": args.name})
    except CtlError as exc:
        return _fail("apps create", exc)
    _print(args, created, f"app {args.name} created")
    return 0


def apps_delete(args: argparse.Namespace) -> int:
    try:
        with tenant_client_from_args(args) as client:
            gone = client.delete(f"/api/v2/apps/{segment(args.name)}")
    except CtlError as exc:
        return _fail("apps delete", exc)
    _print(args, gone, f"app {args.name} deleted")
    return 0


def status_command(args: argparse.Namespace) -> int:
    try:
        with tenant_client_from_args(args) as client:
            if args.deployment_id:
                if args.app:
                    raise UsageError("give a DEPLOYMENT or --app, not both")
                view = client.get(f"/api/v2/deployments/{segment(args.deployment_id)}")
                _print(args, view, status_text(view))
                return 0
            params = {"app": args.app} if args.app else {}
            deployments = client.paged("/api/v2/deployments", "deployments", params)
    except CtlError as exc:
        return _fail("status", exc)
    shown = [d for d in deployments if (not args.app or d.get("app") == args.app)
             and (args.all or d.get("state") != "stopped")]
    _print(args, {"deployments": shown},
           deployments_table(shown) if shown else "no deployments")
    return 0


def _change(args: argparse.Namespace, command: str, method: str, path: str, body: Json | None,
            test: Callable[[Json], Settled]) -> int:
    try:
        with tenant_client_from_args(args) as client:
            answer = client.request(method, path, body)
            if args.no_wait:
                _print(args, answer, f"deployment {args.deployment_id}: {command} accepted")
                return 0
            print(f"waiting for deployment {args.deployment_id} (at most {args.timeout:g} s)",
                  file=sys.stderr)
            final = wait_settled(client, args.deployment_id, test, timeout=args.timeout,
                                 poll=args.poll, out=sys.stderr)
    except (CtlError, TimeoutError) as exc:
        return _fail(command, exc)
    human = (f"deployment {args.deployment_id} stopped" if final.get("state") == "stopped"
             else f"deployment {args.deployment_id}: {cell(final.get('app'))}@"
                  f"{cell(final.get('version'))} running on "
                  f"{cell(final.get('replicas_wanted'))} replica(s)\n"
                  f"url: {cell(app_url(final))}")
    _print(args, final, human)
    return 0


def _dep_path(args: argparse.Namespace, tail: str = "") -> str:
    return f"/api/v2/deployments/{segment(args.deployment_id)}{tail}"


def update_command(args: argparse.Namespace) -> int:
    return _change(args, "update", "PATCH", _dep_path(args), {"version": args.version},
                   lambda d: settled(d, version=args.version))


def scale_command(args: argparse.Namespace) -> int:
    return _change(args, "scale", "PATCH", _dep_path(args), {"replicas": args.replicas},
                   lambda d: settled(d, replicas=args.replicas))


def rollback_command(args: argparse.Namespace) -> int:
    target: list[str] = []

    def test(d: Json) -> Settled:
        if not target:  # the first view after the POST names the version rolled back to
            target.append(str(d.get("version")))
        return settled(d, version=target[0])
    return _change(args, "rollback", "POST", _dep_path(args, "/rollback"), {}, test)


def undeploy_command(args: argparse.Namespace) -> int:
    return _change(args, "undeploy", "DELETE", _dep_path(args), None,
                   lambda d: settled(d, stopped=True))


def logs_command(args: argparse.Namespace) -> int:
    params = {"tail": str(args.tail)}
    if args.service:
        params["service"] = args.service
    if args.since:
        if not _since_ok(args.since):
            return _fail("logs", UsageError(
                f"--since {args.since!r}: an RFC 3339 time (2026-01-02T03:04:05Z) or a "
                "duration (30s, 10m, 2h, 1d)"))
        params["since"] = args.since
    try:
        if args.follow:
            return _follow_logs(args, params)
        with tenant_client_from_args(args, timeout=90.0) as client:
            body = client.request("GET", _dep_path(args, "/logs"), params=params)
    except CtlError as exc:
        return _fail("logs", exc)
    entries = log_entries(body)
    if args.service:  # a CP that ignores the filter still gets it applied
        entries = [e for e in entries if e.get("service") in (args.service, None)]
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        for entry in entries:
            print(log_line(entry))
    return 0


def _follow_logs(args: argparse.Namespace, params: dict[str, str]) -> int:
    with tenant_client_from_args(args) as client:
        try:
            for data in sse_data(client.lines(_dep_path(args, "/logs"),
                                              {**params, "follow": "true"})):
                try:
                    entry = json.loads(data)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    print(data if args.json else log_line(entry), flush=True)
        except KeyboardInterrupt:
            return 130
    return 0


def events_command(args: argparse.Namespace) -> int:
    try:
        with tenant_client_from_args(args) as client:
            client.events_path = "/api/v2/events"
            client.events_query = f"app={segment(args.app)}" if args.app else ""
            trio.run(stream_events, client, args.limit,
                     lambda e: print(json.dumps(e) if args.json else event_line(e),
                                     flush=True))
    except CtlError as exc:
        return _fail("events", exc)
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = [
    "Settled",
    "app_url",
    "apps_table",
    "deployments_table",
    "log_entries",
    "log_line",
    "register",
    "settled",
    "sse_data",
    "status_text",
]
