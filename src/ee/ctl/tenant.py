"""`eectl tenant`: the tenant API's set-up steps as typed commands (for CI and scripts).

    eectl tenant create-account NAME --key-file FILE     (admin token)
    eectl tenant create-app NAME
    eectl tenant add-version APP --version V --compose FILE [--context DIR]
                             --expose-port N [--expose-service S] [--health-path P]
    eectl tenant wait-placeable APP --version V [--replicas N] [--timeout S]
    eectl tenant undeploy ID [--wait] [--timeout S]

Each is one API call (``wait-placeable`` and ``undeploy --wait`` poll one) and prints
one line. ``create-account`` writes the new API key to ``--key-file`` (mode 0600,
never to stdout) so later commands take ``--token-file``. ``add-version`` packs
``--context`` as the base64 tar.gz the API wants: members sorted, owner and times
zeroed, so one directory always gives one compose hash; symlinks and special files
are refused, since the CP would refuse them anyway.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from ee.ctl.client import (
    CpError,
    CtlError,
    Json,
    UsageError,
    add_cp_options,
    client_from_args,
    segment,
)

POLL_S = 1.0


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenant = groups.add_parser(
        "tenant", help="tenant API set-up: account, app, version, undeploy",
        description="The tenant API's set-up steps as typed commands.")
    commands = tenant.add_subparsers(dest="command", metavar="COMMAND", required=True)

    account = commands.add_parser(
        "create-account", help="create a tenant account (admin token)",
        description="Create an account and write its API key (shown once) to --key-file, "
                    "mode 0600. Prints the account id.")
    account.add_argument("name", metavar="NAME")
    account.add_argument("--kind", choices=("tenant", "provisioner"), default="tenant")
    account.add_argument("--key-file", required=True, metavar="FILE",
                         help="where to write the new API key (must not exist)")
    add_cp_options(account)
    account.set_defaults(handler=create_account)

    app = commands.add_parser("create-app", help="create an app",
                              description="Create an app of the tenant's account.")
    app.add_argument("name", metavar="NAME")
    add_cp_options(app)
    app.set_defaults(handler=create_app)

    version = commands.add_parser(
        "add-version", help="upload a compose file and build context as a version",
        description="Upload COMPOSE (and --context DIR packed as a tar.gz) as version V "
                    "of APP. Prints the compose hash.")
    version.add_argument("app", metavar="APP")
    version.add_argument("--version", required=True, metavar="V")
    version.add_argument("--compose", required=True, metavar="FILE",
                         help="the Docker Compose file")
    version.add_argument("--context", metavar="DIR", help="build context directory")
    version.add_argument("--expose-port", required=True, type=int, metavar="N",
                         help="the container port the agent proxies to")
    version.add_argument("--expose-service", metavar="S",
                         help="the service of that port (default: the first)")
    version.add_argument("--health-path", default="/", metavar="P",
                         help="HTTP path the agent waits on before running (default /)")
    add_cp_options(version)
    version.set_defaults(handler=add_version)

    wait = commands.add_parser(
        "wait-placeable", help="wait until a deployment could be placed",
        description="Ask the CP's preflight until it says placeable (exit 0) or the "
                    "timeout passes (exit 1, with the last diagnostics' reasons); a 503 "
                    "while the CP rehydrates counts as not yet.")
    wait.add_argument("app", metavar="APP")
    wait.add_argument("--version", required=True, metavar="V")
    wait.add_argument("--replicas", type=int, default=1, metavar="N")
    wait.add_argument("--timeout", type=float, default=120.0, metavar="S")
    add_cp_options(wait)
    wait.set_defaults(handler=wait_placeable)

    undeploy = commands.add_parser(
        "undeploy", help="stop a deployment",
        description="Undeploy ID; with --wait, until its state is stopped.")
    undeploy.add_argument("deployment_id", metavar="ID")
    undeploy.add_argument("--wait", action="store_true")
    undeploy.add_argument("--timeout", type=float, default=120.0, metavar="S")
    add_cp_options(undeploy)
    undeploy.set_defaults(handler=undeploy_command)


def pack_context_bytes(directory: Path, exclude: frozenset[str] = frozenset()) -> bytes:
    """*directory* as a tar.gz: sorted members, no owners, zero times, modes 0644/0755
    (so one tree always gives one compose hash); top-level names in *exclude* left out.
    Symlinks and special files are refused (the CP would refuse them anyway)."""
    if not directory.is_dir():
        raise UsageError(f"--context {directory}: not a directory")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory).as_posix()
            if rel.split("/", 1)[0] in exclude:
                continue
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise UsageError(f"--context: {rel} is not a regular file or directory")
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def pack_context(directory: Path) -> str:
    """*directory* as a base64 tar.gz (`pack_context_bytes`), as the JSON upload wants."""
    return base64.b64encode(pack_context_bytes(directory)).decode()


def version_body(args: argparse.Namespace) -> Json:
    try:
        compose = Path(args.compose).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --compose {args.compose}: {exc}") from None
    body: Json = {"version": args.version, "compose": compose,
                  "expose_port": args.expose_port, "health_path": args.health_path}
    if args.expose_service:
        body["expose_service"] = args.expose_service
    if args.context:
        body["build_context"] = pack_context(Path(args.context))
    return body


def _fail(command: str, exc: CtlError) -> int:
    print(f"eectl tenant {command}: {exc}", file=sys.stderr)
    return exc.exit_code


def create_account(args: argparse.Namespace) -> int:
    key_file = Path(args.key_file)
    if key_file.exists():
        return _fail("create-account", UsageError(f"{key_file} exists; not overwriting"))
    try:
        with client_from_args(args) as client:
            created = client.post("/api/v2/accounts", {"name": args.name, "kind": args.kind})
    except CtlError as exc:
        return _fail("create-account", exc)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(created["api_key"]) + "\n")
    print(f"account {created.get('account_id')} created; API key in {key_file}")
    return 0


def create_app(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            client.post("/api/v2/apps", {"name": args.name})
    except CtlError as exc:
        return _fail("create-app", exc)
    print(f"app {args.name} created")
    return 0


def add_version(args: argparse.Namespace) -> int:
    try:
        body = version_body(args)
        with client_from_args(args) as client:
            created = client.post(f"/api/v2/apps/{segment(args.app)}/versions", body)
    except CtlError as exc:
        return _fail("add-version", exc)
    print(f"{args.app}@{args.version}: compose_hash {created.get('compose_hash')}")
    return 0


def _poll(step: Callable[[], bool], timeout: float, *,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> bool:
    deadline = clock() + timeout
    while not step():
        if clock() >= deadline:
            return False
        sleep(POLL_S)
    return True


def wait_placeable(args: argparse.Namespace) -> int:
    last: Json = {}
    request = {"version": args.version, "replicas": args.replicas, "constraints": {}}
    try:
        with client_from_args(args) as client:
            def placeable() -> bool:
                nonlocal last
                try:
                    last = client.post(f"/api/v2/apps/{segment(args.app)}/preflight",
                                       request)
                except CpError as exc:
                    if exc.status != 503:  # 503: the CP is still rehydrating; ask again
                        raise
                    last = {}
                return bool(last.get("placeable"))
            ok = _poll(placeable, args.timeout)
    except CtlError as exc:
        return _fail("wait-placeable", exc)
    if ok:
        print(f"{args.app}@{args.version} x{args.replicas}: placeable on "
              f"{len(last.get('candidates') or [])} agent(s)")
        return 0
    reasons = sorted({str(reason) for r in last.get("rejected") or []
                      for reason in r.get("reasons") or []})
    print(f"eectl tenant wait-placeable: not placeable after {args.timeout:g} s "
          f"({', '.join(reasons) or 'no agents'})", file=sys.stderr)
    return 1


def undeploy_command(args: argparse.Namespace) -> int:
    path = f"/api/v2/deployments/{segment(args.deployment_id)}"
    try:
        with client_from_args(args) as client:
            client.request("DELETE", path)
            stopped = not args.wait or _poll(
                lambda: client.get(path).get("state") == "stopped", args.timeout)
    except CtlError as exc:
        return _fail("undeploy", exc)
    if not stopped:
        print(f"eectl tenant undeploy: {args.deployment_id} not stopped after "
              f"{args.timeout:g} s", file=sys.stderr)
        return 1
    print(f"deployment {args.deployment_id} {'stopped' if args.wait else 'stopping'}")
    return 0


__all__ = ["pack_context", "pack_context_bytes", "register", "version_body"]
