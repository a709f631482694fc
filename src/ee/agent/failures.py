"""Why a deploy failed, in the shape the tenant sees (pure: no I/O, no Trio).

A deploy runs in phases (``pull``, ``build``, ``start``, ``health``; ``secrets`` when
its environment waits for released secrets). When one fails, the deployment's status
carries a :class:`FailureReport`: ``phase`` (where), ``exit_code`` (the Compose
command's, a failed ``RUN`` step's when the build output names it, or the exited
container's), ``log_tail`` (the last :data:`MAX_TAIL_LINES` lines of the failing step's
output or the container's logs, each cut to :data:`MAX_LINE_CHARS`) and a one-line
human ``error`` naming the phase, the exit code and the last line. A phase that runs
out of its time ends with ``phase: "timeout"`` and an error naming the phase.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

__all__ = [
    "MASK",
    "MAX_LINE_CHARS",
    "MAX_TAIL_LINES",
    "FailureReport",
    "build_exit_code",
    "container_exited",
    "health_failed",
    "mask_report",
    "mask_text",
    "mask_values",
    "step_failed",
    "step_timed_out",
    "tail_lines",
]

MAX_TAIL_LINES = 20
MAX_LINE_CHARS = 500
MASK = "[masked]"
MIN_SECRET_CHARS = 4
MIN_ENV_CHARS = 8
MIN_PARTIAL_CHARS = 6

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: a failed RUN step, classic builder and BuildKit
_RUN_EXIT = (
    re.compile(r"returned a non-zero code: (\d{1,3})\b"),
    re.compile(r"did not complete successfully: exit code: (\d{1,3})\b"),
)


@attrs.frozen
class FailureReport:
    """What a failed deployment reports besides ``state: failed``."""

    error: str
    phase: str | None = None
    exit_code: int | None = None
    log_tail: tuple[str, ...] = ()


def tail_lines(text: str, limit: int = MAX_TAIL_LINES) -> tuple[str, ...]:
    """The last *limit* non-blank lines of *text*: colours and control characters
    gone (a progress bar's carriage returns keep their last frame), each at most
    :data:`MAX_LINE_CHARS` characters (cut in the middle, ``…`` marks it)."""
    lines = []
    for raw in _ANSI.sub("", text).split("\n"):
        line = _CONTROL.sub("", raw.rsplit("\r", 1)[-1]).rstrip()
        if line.strip():
            lines.append(line)
    return tuple(_cut(line) for line in (lines[-limit:] if limit > 0 else []))


def _cut(line: str) -> str:
    """*line*, cut in the middle to :data:`MAX_LINE_CHARS` when longer."""
    if len(line) <= MAX_LINE_CHARS:
        return line
    half = (MAX_LINE_CHARS - 1) // 2
    return line[:half] + "…" + line[-(MAX_LINE_CHARS - 1 - half):]


def _last(lines: tuple[str, ...]) -> str:
    return lines[-1].strip()[:300] if lines else "no output"


def build_exit_code(output: str) -> int | None:
    """The exit code of the failed ``RUN`` step named in build output, if any."""
    found = None
    for pattern in _RUN_EXIT:
        for match in pattern.finditer(output):
            found = int(match.group(1))
    return found


def step_failed(phase: str, code: int, output: str, subject: str = "") -> FailureReport:
    """A Compose command of *phase* exited with *code* (``build``: the RUN step's);
    *subject* says what it worked on (``pull``: the images)."""
    tail = tail_lines(output)
    exit_code = (build_exit_code(output) if phase == "build" else None)
    exit_code = code if exit_code is None else exit_code
    what = f" ({subject})" if subject else ""
    return FailureReport(error=f"{phase} failed{what} (exit code {exit_code}): {_last(tail)}",
                         phase=phase, exit_code=exit_code, log_tail=tail)


def step_timed_out(phase: str, timeout: float, output: str) -> FailureReport:
    """*phase* did not finish within *timeout* seconds (its output so far as the tail)."""
    tail = tail_lines(output)
    return FailureReport(
        error=f"{phase} did not finish within {timeout:g} s (timeout); last output: "
              f"{_last(tail)}",
        phase="timeout", log_tail=tail)


def container_exited(service: str, exit_code: int | None, logs: str,
                     detail: str = "") -> FailureReport:
    """The exposed service's container stopped (at start or while health was polled)."""
    tail = tail_lines(logs)
    extra = f", {detail}" if detail else ""
    return FailureReport(
        error=f"start failed: service {service!r} exited (exit code {exit_code}{extra}): "
              f"{_last(tail)}",
        phase="start", exit_code=exit_code, log_tail=tail)


def health_failed(what: str, timeout: float, last: str, answered: bool,
                  logs: str) -> FailureReport:
    """No 2xx from the health check within *timeout*: phase ``health`` when the workload
    answered (a wrong path, a 500), ``timeout`` when it never answered at all."""
    tail = tail_lines(logs)
    error = f"{what} did not answer 2xx within {timeout:g} s (last: {last})"
    if answered:
        return FailureReport(error=f"health failed: {error}", phase="health", log_tail=tail)
    return FailureReport(error=f"health did not finish (timeout): {error}", phase="timeout",
                         log_tail=tail)


def mask_values(secrets: Iterable[str], env: Iterable[str]) -> tuple[str, ...]:
    """The strings :func:`mask_text` hides: each secret value (and each line of a
    multi-line one) of at least :data:`MIN_SECRET_CHARS`, each env value (and line) of
    at least :data:`MIN_ENV_CHARS`; longest first, so a value containing another is
    masked whole."""
    found: set[str] = set()
    for values, least in ((secrets, MIN_SECRET_CHARS), (env, MIN_ENV_CHARS)):
        for value in values:
            for candidate in (value, value.strip(), *value.splitlines(),
                              *(line.strip() for line in value.splitlines())):
                if len(candidate) >= least:
                    found.add(candidate)
    return tuple(sorted(found, key=lambda v: (-len(v), v)))


def _prefix_at_end(piece: str, value: str) -> int:
    """Where a proper prefix of *value* (at least :data:`MIN_PARTIAL_CHARS`) ends
    *piece*, the longest such; -1 when none."""
    head = value[:MIN_PARTIAL_CHARS]
    at = piece.find(head, max(0, len(piece) - len(value) + 1))
    while at != -1:
        if value.startswith(piece[at:]):
            return at
        at = piece.find(head, at + 1)
    return -1


def _suffix_at_start(piece: str, value: str) -> int:
    """The length of the longest proper suffix of *value* (at least
    :data:`MIN_PARTIAL_CHARS`) that starts *piece*; -1 when none."""
    tail = value[-MIN_PARTIAL_CHARS:]
    limit = min(len(piece), len(value) - 1)
    at = piece.rfind(tail, 0, limit)
    while at != -1:
        end = at + len(tail)
        if value.endswith(piece[:end]):
            return end
        at = piece.rfind(tail, 0, end - 1)
    return -1


def _mask_edges(piece: str, values: Sequence[str]) -> str:
    for value in values:
        if len(value) <= MIN_PARTIAL_CHARS:
            continue
        at = _prefix_at_end(piece, value)
        if at != -1:
            piece = piece[:at] + MASK
        end = _suffix_at_start(piece, value)
        if end != -1:
            piece = MASK + piece[end:]
    return piece


def mask_text(text: str, values: Sequence[str], *, cut: bool = True) -> str:
    """*text* with each of *values* (from :func:`mask_values`) replaced by :data:`MASK`;
    with *cut* (text that may have been cut: a failure's tail and error) also a value's
    prefix at the end / suffix at the start of the text or of a piece cut at ``…``."""
    if not values or not text:
        return text
    for value in values:
        text = text.replace(value, MASK)
    if not cut:
        return text
    return "…".join(_mask_edges(piece, values) for piece in text.split("…"))


def mask_report(error: str | None, log_tail: Sequence[str], values: Sequence[str]
                ) -> tuple[str | None, tuple[str, ...]]:
    """``error`` and ``log_tail`` with *values* masked (:func:`mask_text`)."""
    # A mask can be longer than what it hides: the lines are cut again, so the report
    # still fits deploy_status (20 lines of at most MAX_LINE_CHARS).
    return (None if error is None else mask_text(error, values),
            tuple(_cut(mask_text(line, values)) for line in log_tail))
