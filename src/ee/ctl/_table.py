"""Plain-text tables and small value formatters for eectl output (no dependencies)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """One value as table text: ``-`` for nothing, yes/no for booleans."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value)
    return str(value)


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], *,
          indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; trailing blanks trimmed. With
    ``headers=None`` there is no header line."""
    text_rows = [[cell(v) for v in row] for row in rows]
    ncols = len(headers) if headers is not None else max((len(r) for r in text_rows), default=0)
    widths = [len(h) for h in headers] if headers is not None else [0] * ncols
    for row in text_rows:
        for i, value in enumerate(row[: len(widths)]):
            widths[i] = max(widths[i], len(value))
    lines = []
    for row in ([list(headers)] if headers is not None else []) + text_rows:
        padded = [value.ljust(widths[i]) for i, value in enumerate(row[: len(widths)])]
        lines.append((indent + "  ".join(padded)).rstrip())
    return "\n".join(lines)


def records_table(items: Sequence[Mapping[str, Any]], *, preferred: Sequence[str] = ()) -> str:
    """A table of JSON objects whose shape we do not know in advance: scalar fields only,
    *preferred* keys first, then the rest in first-seen order."""
    keys: list[str] = [k for k in preferred if any(k in item for item in items)]
    for item in items:
        for key, value in item.items():
            if key not in keys and not isinstance(value, Mapping | list):
                keys.append(key)
    return table([k.upper() for k in keys], [[item.get(k) for k in keys] for item in items])


def short(value: Any, width: int = 12) -> str:
    """Shorten long ids and hashes: the first *width* characters and an ellipsis."""
    text = cell(value)
    return text if len(text) <= width else text[:width] + "…"


def short_hash(value: Any, width: int = 12) -> str:
    """A digest such as ``sha256:12b5…`` shortened to its first hex characters."""
    text = cell(value)
    return short(text.partition(":")[2] or text, width) if text != "-" else text


__all__ = ["cell", "records_table", "short", "short_hash", "table"]
