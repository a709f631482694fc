"""The agent session frame envelope.

Each websocket text frame holds one JSON object::

    {"type": "heartbeat", "id": 7, "re": null, "body": {...}}

``id`` marks a request that wants an answer; the answer carries ``re`` equal to that
id. Both are optional non-negative integers (at most 2**53 - 1, so any JSON
implementation keeps them exact). ``body`` is an object; a missing body means ``{}``.
Unknown envelope keys are ignored.

:func:`decode_frame` checks, in order: size (UTF-8 bytes, ``max_bytes`` inclusive),
UTF-8, JSON, envelope shape, and that ``type`` is a known message type. It raises only
:class:`~ee.protocol.errors.FrameTooLarge` or :class:`~ee.protocol.errors.FrameError`
(both :class:`~ee.protocol.errors.AgentProtocolError`), whatever the input. The body
schema is checked separately by :func:`parse_frame`, which needs to know who sent the
frame (see :mod:`ee.protocol.messages`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from ee.protocol.canonical import canonical_json
from ee.protocol.errors import FrameError, FrameTooLarge
from ee.protocol.messages import MESSAGE_TYPES, Message, Sender, body_to_dict, parse_body
from ee.protocol.strict import describe

__all__ = [
    "MAX_FRAME_ID",
    "Frame",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
    "make_frame",
    "parse_frame",
]

MAX_FRAME_ID = 2**53 - 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _valid_id(value: object) -> bool:
    return value is None or (
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FRAME_ID
    )


def _check_type(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {value!r}")


def _check_id(_inst: object, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if not _valid_id(value):
        raise ValueError(f"{attr.name} must be an integer 0..2**53-1 or None, got {value!r}")


@attrs.frozen
class Frame:
    """One decoded frame: envelope fields plus the raw (JSON) body."""

    type: str = attrs.field(validator=_check_type)
    id: int | None = attrs.field(default=None, validator=_check_id)
    re: int | None = attrs.field(default=None, validator=_check_id)
    body: Mapping[str, Any] = attrs.field(factory=dict)


def decode_frame(data: str | bytes, *, max_bytes: int) -> Frame:
    """Parse one websocket message into a :class:`Frame` (see the module docstring)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise FrameTooLarge(len(raw), max_bytes)
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise FrameError("frame is not valid UTF-8 text") from None
    except RecursionError:
        raise FrameError("frame is not JSON: nested too deeply") from None
    except ValueError as exc:  # json's own messages name only the position
        raise FrameError(f"frame is not JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise FrameError(f"frame is not a JSON object, got {type(value).__name__}")
    type_ = value.get("type")
    if not isinstance(type_, str) or not type_:
        raise FrameError(f"frame type missing or not a string: {describe(type_)}")
    if type_ not in MESSAGE_TYPES:
        raise FrameError(f"unknown message type {describe(type_)}")
    for key in ("id", "re"):
        if not _valid_id(value.get(key)):
            raise FrameError(
                f"frame {key} must be an integer 0..2**53-1, got {describe(value.get(key))}"
            )
    body = value.get("body", {})
    if not isinstance(body, dict):
        raise FrameError(f"frame body is not a JSON object, got {describe(body)}")
    return Frame(type=type_, id=value.get("id"), re=value.get("re"), body=body)


def encode_frame(frame: Frame) -> str:
    """The wire text of *frame* (canonical JSON; ``id``/``re`` omitted when None)."""
    envelope: dict[str, Any] = {"type": frame.type, "body": frame.body}
    if frame.id is not None:
        envelope["id"] = frame.id
    if frame.re is not None:
        envelope["re"] = frame.re
    return canonical_json(envelope).decode("utf-8")


def make_frame(msg: Message, *, id: int | None = None, re: int | None = None) -> Frame:
    """Wrap a message body in a frame of its type."""
    return Frame(type=msg.TYPE, id=id, re=re, body=body_to_dict(msg))


def parse_frame(frame: Frame, *, sender: Sender) -> Message:
    """The typed body of *frame*, sent by *sender*; :class:`FrameError` on violations."""
    return parse_body(frame.type, frame.body, sender=sender)


def encode_message(msg: Message, *, id: int | None = None, re: int | None = None) -> str:
    """``encode_frame(make_frame(msg, id=id, re=re))``."""
    return encode_frame(make_frame(msg, id=id, re=re))


def decode_message(data: str | bytes, *, max_bytes: int, sender: Sender) -> tuple[Frame, Message]:
    """Decode a frame and its typed body in one step."""
    frame = decode_frame(data, max_bytes=max_bytes)
    return frame, parse_frame(frame, sender=sender)
