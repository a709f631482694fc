"""Logs of undeployed deployments, kept for a retention window (blocking: call from a
worker thread).

Theory of operation
-------------------
``undeploy`` removes a deployment's containers, and Docker's logs go with them. Just
before that, the agent reads the last :data:`MAX_LINES_PER_SERVICE` lines of each
service (with Docker's timestamps) and :meth:`RetainedLogs.keep` writes them to
``<data_dir>/retained-logs/<sha256(deployment id)[:32]>.json`` (0600, directory 0700):
``{"format", "deployment_id", "stopped_at", "services": {name: [[at, text], ...]}}``.
A ``logs`` request for a deployment the runner no longer knows is answered from there
(:meth:`RetainedLogs.read`), with the same ``tail``/``since``/``service`` filters.

Isolation: a file is only ever answered for the deployment id written *inside* it
(a name collision, a file moved or planted by hand, answers nothing), and the agent
answers only the id the CP asked for; the CP asks only for a tenant's own deployment.

Bounds: each line at most :data:`MAX_LINE_CHARS` characters, each file at most
:data:`MAX_FILE_BYTES` (older lines dropped first), the whole directory at most
``max_total_bytes`` (oldest files dropped first). Files older than ``retention_s``
(by their ``stopped_at``, which :meth:`RetainedLogs.keep` also sets as the file's
mtime, so purging reads no file) are purged on every keep/read and by :meth:`purge`,
which the agent also runs periodically; a read also checks the ``stopped_at`` inside.
``stopped_at`` is wall-clock time (the window must survive an agent restart); the clock
is injected, so tests own it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

from ee.protocol.messages import LogLine

__all__ = [
    "MAX_LINES_PER_SERVICE",
    "RetainedLogs",
    "filter_lines",
    "rfc3339_ns",
    "split_timestamp",
]

MAX_LINES_PER_SERVICE = 1000
MAX_LINE_CHARS = 2000
MAX_FILE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOTAL_BYTES = 64 * 1024 * 1024
_FORMAT = 1
_TS = re.compile(r"\A(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?Z\Z")


def rfc3339_ns(value: str) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 UTC timestamp (``...Z``), else None."""
    match = _TS.match(value)
    if match is None:
        return None
    try:
        whole = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    fraction = (match.group(2) or "").ljust(9, "0")
    return int(whole.timestamp()) * 1_000_000_000 + int(fraction)


def split_timestamp(line: str) -> tuple[str | None, str]:
    """Docker's ``<RFC 3339 nano> <text>`` (``timestamps=True``) as ``(at, text)``."""
    head, sep, rest = line.partition(" ")
    if sep and rfc3339_ns(head) is not None:
        return head, rest
    return None, line


def filter_lines(lines: Sequence[LogLine], *, tail: int, since: str | None) -> list[LogLine]:
    """The last *tail* of *lines* at or after *since* (lines without a time drop out
    when *since* is given)."""
    if since is not None:
        floor = rfc3339_ns(since)
        if floor is None:
            raise ValueError(f"since: {since!r} is not an RFC 3339 UTC timestamp")
        lines = [ln for ln in lines
                 if ln.at is not None and (rfc3339_ns(ln.at) or 0) >= floor]
    return list(lines[-tail:]) if tail > 0 else []


class RetainedLogs:
    """The retained logs directory (see the module docstring)."""

    def __init__(self, directory: Path, *, retention_s: float,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                 wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.retention_s = retention_s
        self.max_total_bytes = max_total_bytes
        self.wall = wall

    def _path(self, deployment_id: str) -> Path:
        return self.directory / (sha256(deployment_id.encode("utf-8")).hexdigest()[:32]
                                 + ".json")

    def keep(self, deployment_id: str, services: Mapping[str, Sequence[LogLine]]) -> None:
        """Retain these lines of *deployment_id* (replacing what was kept before)."""
        if self.retention_s <= 0:
            return
        body: dict[str, Any] = {
            "format": _FORMAT, "deployment_id": deployment_id, "stopped_at": self.wall(),
            "services": {name: [[ln.at, ln.text[:MAX_LINE_CHARS]]
                                for ln in lines[-MAX_LINES_PER_SERVICE:]]
                         for name, lines in services.items()},
        }
        text = json.dumps(body)
        while len(text.encode("utf-8")) > MAX_FILE_BYTES:
            longest = max(body["services"].values(), key=len)
            del longest[: max(1, len(longest) // 4)]
            text = json.dumps(body)
        self.directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        path = self._path(deployment_id)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.utime(tmp, (body["stopped_at"], body["stopped_at"]))
        tmp.replace(path)
        self.purge()

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            return None
        return data

    def read(self, deployment_id: str) -> dict[str, list[LogLine]] | None:
        """The retained lines of *deployment_id* per service, None when none are kept."""
        self.purge()
        data = self._load(self._path(deployment_id))
        # The id inside the file decides, never its name alone.
        if data is None or data.get("deployment_id") != deployment_id:
            return None
        stopped = data.get("stopped_at")
        if not isinstance(stopped, int | float) or self.wall() - stopped >= self.retention_s:
            return None
        services: dict[str, list[LogLine]] = {}
        for name, lines in dict(data.get("services") or {}).items():
            services[str(name)] = [
                LogLine(service=str(name), text=str(text),
                        at=at if isinstance(at, str) and rfc3339_ns(at) is not None else None)
                for at, text in lines]
        return services

    def purge(self) -> int:
        """Drop expired files, then the oldest beyond the size bound; how many went."""
        if not self.directory.is_dir():
            return 0
        now = self.wall()
        kept: list[tuple[float, int, Path]] = []
        removed = 0
        for path in self.directory.glob("*.json"):
            # The file's mtime is its stopped_at (keep sets it): no file is parsed here,
            # so a read costs one file's parse, not the whole directory's.
            try:
                info = path.stat()
            except OSError:
                continue
            if now - info.st_mtime >= self.retention_s:
                path.unlink(missing_ok=True)
                removed += 1
                continue
            kept.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in kept)
        for _, size, path in sorted(kept, key=lambda item: item[0]):
            if total <= self.max_total_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed
