"""`eectl push` and `eectl compose-hash`: an app directory as a version, and its hash.

    eectl compose-hash DIR [--expose-port N] [--expose-service S] [--health-path P]
                           [--env K=V ...] [--secret NAME ...]
    eectl push DIR --app A --version V [the same options]

DIR holds the Compose file (``compose.yaml``, ``compose.yml``, ``docker-compose.yml``
or ``docker-compose.yaml``; exactly one) and, when a service has ``build:``, the build
context: every file of DIR except the Compose file, packed deterministically
(`ee.ctl.tenant.pack_context_bytes`: sorted, no owners, zero times, symlinks refused).

The hash is computed here exactly as the agent computes the hash it binds into its
attested health quotes (``ee.protocol.compose.workload_hash``; the formula is in the
docstring of ``src/ee/protocol/compose.py`` and of `workload_hash`): the compose
document and build context (the *compose hash*), the env names and values, the
exposed port and service, the health path and the names of the secrets the version
receives (never their values). `push` uploads and then requires the CP's
``compose_hash`` to be the one computed here: a CP that hashed something else would
make every later verification fail, so it is an error (exit 1). A CP that still
reports the version-1 hash (compose document and build context only, before env and
the rest were attested) is accepted with a warning, and that hash is printed, since it
is the one its agents bind.

The reading and hashing (`read_workload`) is pure apart from reading DIR; the upload is
one POST.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ee.ctl.client import (
    CtlError,
    Json,
    UsageError,
    add_tenant_options,
    segment,
    tenant_client_from_args,
)
from ee.ctl.tenant import pack_context_bytes
from ee.protocol.compose import (
    BuildContext,
    BuildContextError,
    ComposeError,
    compose_services,
    hash_compose_document,
    validate_build_context,
    validate_compose,
    workload_hash,
)

COMPOSE_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
HASH_HELP = ("The hash covers the Compose document (parsed: comments, formatting and key "
             "order do not count), the build context's files (names, modes, bytes), the env "
             "names and values, --expose-port, --expose-service, --health-path and the "
             "secret names; not secret values. Formula: the docstring of "
             "ee/protocol/compose.py (workload_hash).")


class PushMismatch(CtlError):
    """The CP stored the version under another hash than the one computed here."""


@attrs.frozen
class Workload:
    """An app directory read and checked: what a version upload sends, and its hash."""

    compose_file: str
    compose: str
    doc: dict[str, Any]
    context_tar: bytes | None
    context: BuildContext | None
    expose_port: int
    expose_service: str
    health_path: str
    env: dict[str, str]
    secret_names: tuple[str, ...]

    def hash(self) -> str:
        """The attested hash (``workload_hash``)."""
        return workload_hash(self.doc, self.context, env=self.env,
                             expose_port=self.expose_port,
                             expose_service=self.expose_service,
                             health_path=self.health_path, secret_names=self.secret_names,
                             secret_env={})  # eectl push names file secrets only

    def v1_hash(self) -> str:
        """The version-1 compose hash (compose document and build context only)."""
        return hash_compose_document(self.doc, self.context)

    def version_body(self, version: str) -> Json:
        body: Json = {"version": version, "compose": self.compose,
                      "expose_port": self.expose_port, "expose_service": self.expose_service,
                      "health_path": self.health_path}
        if self.env:
            body["env"] = dict(self.env)
        if self.context_tar is not None:
            body["build_context"] = base64.b64encode(self.context_tar).decode()
        if self.secret_names:
            body["secrets"] = [{"name": n, "as": "file"} for n in self.secret_names]
        return body


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``K=V`` pairs (repeatable ``--env``); a name given twice is an error."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        if name in env:
            raise UsageError(f"--env {name} given twice")
        env[name] = value
    return env


def find_compose(directory: Path) -> Path:
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    found = [directory / n for n in COMPOSE_NAMES if (directory / n).is_file()]
    if not found:
        raise UsageError(f"{directory}: no Compose file ({', '.join(COMPOSE_NAMES)})")
    if len(found) > 1:
        raise UsageError(f"{directory}: both {found[0].name} and {found[1].name}; keep one")
    return found[0]


def _exposed_port(service: Any) -> int | None:
    """The one port a service's ``expose:`` names (``8080`` or ``"8080/tcp"``)."""
    exposed = service.get("expose") if isinstance(service, dict) else None
    if not isinstance(exposed, list) or len(exposed) != 1:
        return None
    text = str(exposed[0]).split("/", 1)[0]
    return int(text) if text.isdigit() else None


def read_workload(directory: Path, *, expose_port: int | None, expose_service: str | None,
                  health_path: str, env: dict[str, str],
                  secret_names: Sequence[str] = ()) -> Workload:
    """Read DIR's Compose file and build context; refuse what the CP would refuse first
    (an unparseable document, a bad context, an unknown service, no port)."""
    compose_file = find_compose(directory)
    try:
        compose = compose_file.read_text()
        doc = validate_compose(compose)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {compose_file}: {exc}") from None
    except ComposeError as exc:
        raise UsageError(f"{compose_file}: {exc}") from None
    services = compose_services(doc)
    service = expose_service or services[0]
    if service not in services:
        raise UsageError(f"--expose-service {service!r} is not a service of "
                         f"{compose_file.name} ({', '.join(services)})")
    port = expose_port if expose_port is not None else _exposed_port(doc["services"][service])
    if port is None:
        raise UsageError(f"give --expose-port: service {service!r} does not `expose:` "
                         "exactly one port")
    if not 1 <= port <= 65535:
        raise UsageError(f"--expose-port {port}: not a port 1..65535")
    tar: bytes | None = None
    context: BuildContext | None = None
    if any(isinstance(s, dict) and "build" in s for s in doc["services"].values()):
        tar = pack_context_bytes(directory, exclude=frozenset({compose_file.name}))
        try:
            context = validate_build_context(tar)
        except BuildContextError as exc:
            raise UsageError(f"{directory} as a build context: {exc}") from None
    names = tuple(secret_names)
    if len(set(names)) != len(names):
        raise UsageError("a --secret is named twice")
    return Workload(compose_file=compose_file.name, compose=compose, doc=doc,
                    context_tar=tar, context=context, expose_port=port,
                    expose_service=service, health_path=health_path, env=env,
                    secret_names=names)


def checked_hash(workload: Workload, stored: object) -> tuple[str, str | None]:
    """The hash to print for a version the CP stored as *stored*, and a warning; or
    ``PushMismatch`` when it is neither hash computed here."""
    ours = workload.hash()
    if stored == ours:
        return ours, None
    if stored == workload.v1_hash():
        return str(stored), (
            "this CP reports the version-1 compose hash (Compose file and build context "
            "only; env, port, service, health path and secret names are not attested by "
            "its agents)")
    raise PushMismatch(f"the CP stored the version under {stored!r}, but its hash is {ours} "
                       "(computed here as the agent will); do not deploy it: the attested "
                       "health quotes would not match")


# --- commands ----------------------------------------------------------------------


def _workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR",
                        help="the app directory: Compose file and build context")
    parser.add_argument("--expose-port", type=int, metavar="N",
                        help="the container port the agent proxies to (default: the "
                             "service's single `expose:` port)")
    parser.add_argument("--expose-service", metavar="S",
                        help="the service of that port (default: the first)")
    parser.add_argument("--health-path", default="/", metavar="P",
                        help="path the agent waits on for a 2xx before the replica runs "
                             "(default /)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="environment variable for every service (repeatable; part of "
                             "the hash; not for secrets: see --secret)")
    parser.add_argument("--secret", action="append", default=[], metavar="NAME",
                        help="a secret of the app the version receives as "
                             "/run/secrets/NAME (repeatable; its name is hashed, its value "
                             "is not)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ch = groups.add_parser(
        "compose-hash", help="print the hash an app directory's replicas will attest",
        description="Print the attested hash of the app in DIR, computed as the agent "
                    "does, without talking to anyone. " + HASH_HELP)
    _workload_args(ch)
    ch.set_defaults(handler=compose_hash_command)

    push = groups.add_parser(
        "push", help="upload an app directory as a new version",
        description="Upload DIR (its Compose file and, when a service builds, every other "
                    "file of DIR as the build context) as version V of app A. Prints the "
                    "hash, after checking the CP computed the same one. " + HASH_HELP,
        epilog="example: eectl push ./hello --app hello --version 2 --health-path /health")
    _workload_args(push)
    push.add_argument("--app", required=True, metavar="A", help="the app (eectl apps create)")
    push.add_argument("--version", required=True, metavar="V",
                      help="the new version's name ([A-Za-z0-9][A-Za-z0-9._+-]{0,63})")
    add_tenant_options(push)
    push.set_defaults(handler=push_command)


def _read(args: argparse.Namespace) -> Workload:
    return read_workload(Path(args.directory), expose_port=args.expose_port,
                         expose_service=args.expose_service, health_path=args.health_path,
                         env=parse_env(args.env), secret_names=args.secret)


def _fail(command: str, exc: CtlError) -> int:
    print(f"eectl {command}: {exc}", file=sys.stderr)
    return exc.exit_code


def compose_hash_command(args: argparse.Namespace) -> int:
    try:
        workload = _read(args)
        value = workload.hash()
    except CtlError as exc:
        return _fail("compose-hash", exc)
    except ComposeError as exc:
        return _fail("compose-hash", UsageError(str(exc)))
    if args.json:
        print(json.dumps({"compose_hash": value, "compose_file": workload.compose_file,
                          "expose_port": workload.expose_port,
                          "expose_service": workload.expose_service,
                          "health_path": workload.health_path,
                          "env_names": sorted(workload.env),
                          "secret_names": sorted(workload.secret_names),
                          "build_context_files": 0 if workload.context is None else
                          len(workload.context.members)}))
    else:
        print(value)
    return 0


def push_command(args: argparse.Namespace) -> int:
    try:
        workload = _read(args)
        ours = workload.hash()
        size = len(workload.context_tar or b"")
        print(f"pushing {args.app}@{args.version}: {workload.compose_file}"
              + (f" + build context ({size} bytes)" if size else ""), file=sys.stderr)
        with tenant_client_from_args(args, timeout=120.0) as client:
            created = client.post(f"/api/v2/apps/{segment(args.app)}/versions",
                                  workload.version_body(args.version))
        shown, warning = checked_hash(workload, created.get("compose_hash"))
    except CtlError as exc:
        return _fail("push", exc)
    except ComposeError as exc:
        return _fail("push", UsageError(str(exc)))
    if warning:
        print(f"eectl push: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"app": args.app, "version": args.version, "compose_hash": shown,
                          "workload_hash": ours}))
    else:
        print(f"{args.app}@{args.version}: compose_hash {shown}")
    return 0


__all__ = [
    "COMPOSE_NAMES",
    "PushMismatch",
    "Workload",
    "checked_hash",
    "find_compose",
    "parse_env",
    "read_workload",
    "register",
]
