"""Strict JSON structuring: cattrs converters that refuse to guess.

cattrs' stock converter is forgiving: it turns ``"5"`` into ``5``, ``True`` into ``1``,
``"abc"`` into ``("a", "b", "c")`` and ``1.9`` into ``1``. At a trust boundary (agent
session frames, config files handed to a VM) a value of the wrong JSON type is an
error, so converters built here check the JSON type of every value before they build
anything, and report problems as ``(path, reason)`` pairs that name the offending field
(``snapshot.deployments[0].state``) instead of dumping an exception group.

Wire conventions applied by every converter made here:

- ``bytes`` travel as lowercase hex; a field whose attrs metadata has
  ``{"wire": "base64"}`` travels as standard base64 instead (large blobs: quotes,
  build contexts).
- ``datetime`` travels as an RFC 3339 UTC string (``2024-05-01T12:00:00Z``); an aware
  timestamp is required when structuring.
- ``tuple[X, ...]`` travels as a JSON array, ``Mapping[str, X]`` as a JSON object.
- ``float`` fields accept JSON integers; ``int`` fields do not accept booleans.

Attrs validators report value problems through :class:`FieldValueError` (see
:func:`check`) so the field name survives into the error path. attrs' own validators
(``gt``/``le``, ``max_len``, ``matches_re``, ``in_``, ``instance_of``, ...) fail inside
the class's ``__init__``, after cattrs has structured the fields: :func:`problems`
reads the field and the rule back from their exceptions (the ``Attribute`` in the
arguments, or their fixed message shapes), never echoing the peer's value raw.
"""

from __future__ import annotations

import base64
import binascii
import collections.abc
import math
import re
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, mapping_structure_factory
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

__all__ = [
    "FieldValueError",
    "WireTypeError",
    "attrs_validator_problem",
    "check",
    "describe",
    "first_problem",
    "make_converter",
    "printable",
    "problems",
]

T = TypeVar("T")

_HEX = re.compile(r"\A(?:[0-9a-fA-F]{2})*\Z")


class WireTypeError(TypeError):
    """A JSON value of the wrong type (raised by the strict hooks)."""


class FieldValueError(ValueError):
    """A field value that fails validation; *field* is the attribute name."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def describe(value: object, limit: int = 40) -> str:
    """A short, escaped repr of *value* for error messages and logs (long values cut).

    Safe for any decoded JSON a peer sent: strings and bytes are cut *before* they are
    repr'd (a 1 MB string costs nothing), containers are named by size instead of being
    printed (no deep recursion), and the result is one line of printable text (a
    ``\\n`` in a peer's string cannot start a forged log line).
    """
    if isinstance(value, str | bytes):
        text = repr(value[:limit])
        if len(value) > limit:
            text += f"...({len(value)} chars)" if isinstance(value, str) else (
                f"...({len(value)} bytes)")
    elif isinstance(value, dict | list | tuple) and not value:
        text = repr(value)
    elif isinstance(value, dict):
        text = f"an object of {len(value)} keys"
    elif isinstance(value, list | tuple):
        text = f"an array of {len(value)} items"
    elif value is None or isinstance(value, bool | float):
        text = repr(value)
    elif isinstance(value, int):
        text = repr(value) if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit + 30 else text[: limit + 27] + "..."


def lower_hex(value: object, length: int | None = None) -> bool:
    """*value* is a string of lower-case hex digits (exactly *length* of them, if given):
    digests, pins and ids as they travel, with no case or format to normalise."""
    return (isinstance(value, str) and (length is None or len(value) == length)
            and all(c in "0123456789abcdef" for c in value))


def check(
    predicate: Callable[[Any], bool], reason: str
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: raise :class:`FieldValueError` unless ``predicate(value)``.

    ``None`` values are passed through untouched (optional fields).
    """

    def validator(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not predicate(value):
            raise FieldValueError(attribute.name, f"{reason}, got {describe(value)}")

    return validator


def printable(text: str, limit: int = 200) -> str:
    """*text* as one printable line of at most about *limit* characters, for logs.

    Control characters (``\\n``, ``\\r``, escape sequences) and other unprintable
    code points come out as Python escapes, so a peer's string can neither start a
    forged log line nor grow the log by more than *limit*; the cut names what it cut.
    """
    cut = text[:limit]
    out = cut if cut.isprintable() else repr(cut)[1:-1]
    if len(text) > limit:
        out += f"...({len(text) - limit} more chars)"
    return out


def _wrong(expected: str, value: object) -> WireTypeError:
    return WireTypeError(f"expected {expected}, got {describe(value)}")


def _structure_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise _wrong("string", value)
    return value


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong("int", value)
    return value


def _structure_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong("number", value)
    if not math.isfinite(value):
        raise _wrong("finite number", value)
    return float(value)


def _structure_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong("boolean", value)
    return value


def _structure_hex(value: Any, _: Any) -> bytes:
    if not isinstance(value, str) or not _HEX.match(value):
        raise _wrong("hex string", value)
    return bytes.fromhex(value)


def _structure_b64(value: Any, _: Any) -> bytes:
    if not isinstance(value, str):
        raise _wrong("base64 string", value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _wrong("base64 string", value) from None


def _unstructure_b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _structure_datetime(value: Any, _: Any) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    raise _wrong("RFC 3339 timestamp with offset", value)


def _unstructure_datetime(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("naive datetime on the wire; use an aware UTC datetime")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _is_literal(tp: Any) -> bool:
    return get_origin(tp) is Literal


def _is_homogenous_tuple(tp: Any) -> bool:
    args = get_args(tp)
    return get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_mapping(tp: Any) -> bool:
    return get_origin(tp) in (dict, collections.abc.Mapping, typing.Mapping)


def _optional(tp: Any) -> bool:
    return type(None) in get_args(tp)


def make_converter(*, forbid_extra_keys: bool) -> cattrs.Converter:
    """A strict JSON converter (see the module docstring for its conventions).

    With ``forbid_extra_keys`` an unknown key in any object is an error (config
    files, where a typo must not pass silently); without it unknown keys are ignored
    (wire messages, for forward compatibility).
    """
    conv = cattrs.Converter(
        detailed_validation=True,
        forbid_extra_keys=forbid_extra_keys,
        unstruct_collection_overrides={collections.abc.Sequence: list},
    )
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(bytes, _structure_hex)
    conv.register_unstructure_hook(bytes, bytes.hex)
    conv.register_structure_hook(datetime, _structure_datetime)
    conv.register_unstructure_hook(datetime, _unstructure_datetime)

    def literal_factory(tp: Any) -> Callable[[Any, Any], Any]:
        allowed = get_args(tp)
        expected = "one of " + ", ".join(repr(a) for a in allowed)

        def structure_literal(value: Any, _: Any) -> Any:
            for candidate in allowed:
                if type(value) is type(candidate) and value == candidate:
                    return candidate
            raise _wrong(expected, value)

        return structure_literal

    def tuple_factory(tp: Any) -> Callable[[Any, Any], Any]:
        inner = homogenous_tuple_structure_factory(tp, conv)

        def structure_tuple(value: Any, _: Any) -> Any:
            if not isinstance(value, list):
                raise _wrong("array", value)
            return inner(value, tp)

        return structure_tuple

    def mapping_factory(tp: Any) -> Callable[[Any, Any], Any]:
        # Not ``conv.gen_structure_mapping``: that also registers its (lenient) result
        # as *the* hook for ``tp``, so every class built afterwards would skip the type
        # check below (``'str' object has no attribute 'items'`` instead of a refusal).
        inner = mapping_structure_factory(tp, conv, dict, detailed_validation=True)

        def structure_mapping(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise _wrong("object", value)
            return inner(value, tp)

        return structure_mapping

    def attrs_structure_factory(cl: Any) -> Callable[[Any, Any], Any]:
        attrs.resolve_types(cl)
        overrides: dict[str, Any] = {}
        for a in attrs.fields(cl):
            if a.metadata.get("wire") == "base64":
                hook: Callable[[Any, Any], bytes | None] = _structure_b64
                if _optional(a.type):
                    hook = _none_or(_structure_b64)
                overrides[a.name] = override(struct_hook=hook)
        inner = make_dict_structure_fn(cl, conv, **overrides)

        def structure_attrs(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise _wrong("object", value)
            return inner(value, cl)

        return structure_attrs

    def attrs_unstructure_factory(cl: Any) -> Callable[[Any], Any]:
        attrs.resolve_types(cl)
        overrides: dict[str, Any] = {
            a.name: override(unstruct_hook=_none_or_unstructure(_unstructure_b64))
            for a in attrs.fields(cl)
            if a.metadata.get("wire") == "base64"
        }
        return make_dict_unstructure_fn(cl, conv, **overrides)

    conv.register_structure_hook_factory(_is_literal, literal_factory)
    conv.register_structure_hook_factory(_is_homogenous_tuple, tuple_factory)
    conv.register_structure_hook_factory(_is_mapping, mapping_factory)
    conv.register_structure_hook_factory(attrs.has, attrs_structure_factory)
    conv.register_unstructure_hook_factory(attrs.has, attrs_unstructure_factory)
    return conv


def _none_or(hook: Callable[[Any, Any], T]) -> Callable[[Any, Any], T | None]:
    def structure(value: Any, tp: Any) -> T | None:
        return None if value is None else hook(value, tp)

    return structure


def _none_or_unstructure(hook: Callable[[bytes], str]) -> Callable[[bytes | None], str | None]:
    def unstructure(value: bytes | None) -> str | None:
        return None if value is None else hook(value)

    return unstructure


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# The message shapes of attrs' validators that raise with the message only (attrs 23+).
_ATTRS_BOUND = re.compile(
    r"\A'(?P<field>\w+)' must be (?P<rule>[<>]=?|==|!=) (?P<bound>[^:]{1,40}): ")
_ATTRS_LENGTH = re.compile(r"\ALength of '(?P<field>\w+)' must be (?P<rule>[<>]=) (?P<bound>\d+): "
                           r"(?P<got>\d+)\Z")


def attrs_validator_problem(exc: BaseException) -> tuple[str, str] | None:
    """``(field, reason)`` of an attrs validator's exception, or None for any other.

    The reason states the rule and describes the value (cut, escaped: :func:`describe`),
    never the library's text, which repr()s the whole value.
    """
    if not isinstance(exc, ValueError | TypeError):
        return None
    args = exc.args
    if len(args) >= 2 and isinstance(args[1], attrs.Attribute):
        name = args[1].name
        rule, value = (args[2], args[3]) if len(args) >= 4 else (None, None)
        if isinstance(rule, re.Pattern):
            return name, f"must match {describe(rule.pattern, 80)}, got {describe(value)}"
        if isinstance(exc, TypeError) and isinstance(rule, type | tuple):
            kinds = rule if isinstance(rule, tuple) else (rule,)
            expected = " or ".join(k.__name__ for k in kinds if isinstance(k, type))
            return name, f"expected {expected}, got {describe(value)}"
        if isinstance(rule, collections.abc.Collection) and not isinstance(rule, str | bytes):
            options = printable(", ".join(sorted(map(str, rule))), 120)
            return name, f"must be one of {options}, got {describe(value)}"
        return name, f"invalid value, got {describe(value)}" if len(args) >= 4 \
            else "invalid value"
    text = str(args[0]) if len(args) == 1 and isinstance(args[0], str) else ""
    bound = _ATTRS_BOUND.match(text)
    if bound:
        return bound["field"], f"must be {bound['rule']} {bound['bound']}"
    length = _ATTRS_LENGTH.match(text)
    if length:
        return length["field"], (f"length must be {length['rule']} {length['bound']}, "
                                 f"got {length['got']}")
    return None


def problems(exc: BaseException, path: str = "") -> list[tuple[str, str]]:
    """Flatten a structuring failure into ``(field path, reason)`` pairs.

    Paths join attribute names with ``.`` and list indices as ``[i]``; the empty path
    is the root object.
    """
    found: list[tuple[str, str]] = []
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            found.extend(problems(sub, _join(path, note.name)))
        for sub in without:
            found.extend(problems(sub, path))
    elif isinstance(exc, IterableValidationError):
        with_notes_i, without = exc.group_exceptions()
        for sub, inote in with_notes_i:
            found.extend(problems(sub, f"{path}[{inote.index!r}]"))
        for sub in without:
            found.extend(problems(sub, path))
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            found.append((_join(path, key), "unknown field"))
    elif isinstance(exc, FieldValueError):
        found.append((_join(path, exc.field), exc.reason))
    elif isinstance(exc, KeyError):
        found.append((path, "required field missing"))
    elif isinstance(exc, WireTypeError):
        found.append((path, str(exc)))
    elif (named := attrs_validator_problem(exc)) is not None:
        found.append((_join(path, named[0]), named[1]))
    else:
        # Anything else is not ours to word (a library's ``AttributeError``, a
        # ``RecursionError``): its text describes our internals, not the input, and a
        # reason may be shown to a peer. The path still names the field.
        found.append((path, "invalid value"))
    return found


def first_problem(exc: BaseException, path: str = "") -> tuple[str, str]:
    """The first ``(field path, reason)`` of :func:`problems` (there is always one)."""
    return problems(exc, path)[0]
