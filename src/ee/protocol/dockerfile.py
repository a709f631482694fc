"""Dockerfile checks: no ``ADD`` that makes the builder fetch anything (pure).

Theory of operation
-------------------
The classic builder runs in dockerd, on the VM's own network: ``ADD http://…`` (or a
git ref, or a source spelled through ``ARG``/``ENV`` interpolation) makes dockerd fetch
from wherever the VM can reach, loopback-only services included, and bake the answer
into the image. So every Dockerfile a service builds from is checked (by the CP at
upload and by the agent before it builds) and refused with
``dockerfile_remote_source`` when an ``ADD`` source could be remote.

The check is deliberately cruder than Docker's parser, so that no parser differential
can hide an ``ADD``: parser directives at the top (``# escape=`` picks the continuation
character; ``# syntax=`` would make BuildKit pull a frontend image and is refused);
continuation lines are joined (comment and blank lines inside a continuation dropped,
as Docker does); instructions are matched case-insensitively, ``ONBUILD ADD`` included.
An ``ADD`` is refused when its arguments contain ``://``, ``git@``, a ``.git`` ref,
``$`` (interpolation), ``<<`` (a heredoc), a backslash or the escape character (the
shell-form lexer and JSON both unescape: ``http:\\/\\/`` is ``http://``). Each
*physical* line that starts like an ``ADD`` is checked for the same substrings too, in
case Docker joins lines differently than this parser does.

Build ``RUN`` steps still have the default bridge's network: egress from the VM is the
VM image's firewall's job, not this check's.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ee.protocol.compose import LoadedBuildContext
from ee.protocol.workload_policy import WorkloadPolicyError

__all__ = ["check_build_dockerfiles", "check_dockerfile", "dockerfile_paths"]

CODE = "dockerfile_remote_source"
_DIRECTIVE = re.compile(r"\s*#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*")
_ADD_LINE = re.compile(r"\s*(?:onbuild\s+)?add(?:\s|$)(.*)", re.IGNORECASE)
_REMOTE = ("://", "git@", "$", "<<")
_GIT_REF = re.compile(r"\.git(?:[#\s\"',\]]|$)", re.IGNORECASE)


def dockerfile_paths(doc: Mapping[str, Any]) -> dict[str, str]:
    """The context members each building service reads as its Dockerfile.

    ``doc`` is an upload-stage document the workload policy accepted (relative paths
    inside the context). Without ``dockerfile`` the builder reads ``Dockerfile`` and,
    when that is missing, ``dockerfile``: both are listed. Maps member path to the
    service path that names it (``services.web.build``).
    """
    out: dict[str, str] = {}
    for name, service in dict(doc.get("services") or {}).items():
        build = service.get("build") if isinstance(service, dict) else None
        if build is None:
            continue
        if isinstance(build, str):
            context, dockerfile = build, None
        else:
            context, dockerfile = str(build.get("context", ".")), build.get("dockerfile")
        names = ["Dockerfile", "dockerfile"] if dockerfile is None else [str(dockerfile)]
        for file in names:
            path = posixpath.normpath(posixpath.join(context, file))
            out.setdefault(path, f"services.{name}.build")
    return out


def _logical_lines(lines: list[str], escape: str, start: int) -> Iterator[tuple[int, str]]:
    """(first line number, joined text) of each instruction from ``lines[start:]``."""
    pending: list[str] = []
    first = 0
    for index in range(start, len(lines)):
        line = lines[index]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, inside a continuation too
        if not pending:
            first = index + 1
        body = line.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(line)
        yield first, " ".join(pending)
        pending = []
    if pending:
        yield first, " ".join(pending)


def _refuse(name: str, line: int, message: str) -> WorkloadPolicyError:
    return WorkloadPolicyError(f"{name}:{line}", CODE, message)


def _check_add_args(name: str, line: int, args: str, escape: str | None) -> None:
    bad = [s for s in _REMOTE if s in args]
    if _GIT_REF.search(args):
        bad.append(".git")
    if escape is not None:
        bad += [c for c in {"\\", escape} if c in args]
    if bad:
        raise _refuse(name, line, f"ADD {args.strip()[:200]!r}: {bad[0]!r} could make the "
                      "builder fetch from the network or hide a source; use COPY of "
                      "files in the build context")


def check_dockerfile(data: bytes, name: str = "Dockerfile") -> None:
    """Raise :class:`WorkloadPolicyError` (``dockerfile_remote_source``, path
    ``<name>:<line>``) if the Dockerfile could make the builder fetch a remote source."""
    text = data.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = text.splitlines()
    escape = "\\"
    start = 0
    for index, line in enumerate(lines):
        match = _DIRECTIVE.fullmatch(line)
        if match is None:
            break
        key, value = match.group(1).lower(), match.group(2)
        if key == "escape":
            if value not in ("\\", "`"):
                raise _refuse(name, index + 1, f"escape directive {value!r} is not \\ or `")
            escape = value
        elif key == "syntax":
            raise _refuse(name, index + 1, "the syntax directive would pull a builder "
                          "frontend image")
        start = index + 1
    for number, instruction in _logical_lines(lines, escape, start):
        words = instruction.split(None, 1)
        keyword = words[0].upper()
        rest = words[1] if len(words) > 1 else ""
        if keyword == "ONBUILD":
            words = rest.split(None, 1)
            keyword = words[0].upper() if words else ""
            rest = words[1] if len(words) > 1 else ""
        if keyword == "ADD":
            _check_add_args(name, number, rest, escape)
    for index, line in enumerate(lines):  # no line-joining differential can hide one
        match = _ADD_LINE.match(line)
        if match is not None:
            _check_add_args(name, index + 1, match.group(1), None)


def check_build_dockerfiles(doc: Mapping[str, Any], loaded: LoadedBuildContext | None) -> None:
    """Check every Dockerfile a service of ``doc`` builds from (its bytes must be in
    ``loaded.contents``: load the context with ``keep_paths=set(dockerfile_paths(doc))``).

    A missing Dockerfile is not refused here (the build fails on its own); a symlinked
    or hardlinked one is (refused alike by the CP, which keeps only the Dockerfiles'
    bytes, and by the agent).
    """
    if loaded is None:
        return
    members = {m.path: m for m in loaded.context.members}
    for path, where in dockerfile_paths(doc).items():
        member = members.get(path)
        if member is None or member.kind == "dir":
            continue
        if member.kind != "file":
            raise WorkloadPolicyError(f"{path}:0", CODE,
                                      f"the Dockerfile of {where} is a {member.kind}")
        check_dockerfile(loaded.contents[path], path)
