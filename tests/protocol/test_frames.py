"""Frame envelope: decoding refuses malformed input with AgentProtocolError only."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ee.protocol import (
    AgentProtocolError,
    Frame,
    FrameError,
    FrameTooLarge,
    decode_frame,
    encode_frame,
)
from ee.protocol.messages import MESSAGE_TYPES

LIMIT = 1 << 16


def test_encode_decode_round_trip() -> None:
    frame = Frame(type="heartbeat", id=1, re=None, body={"seq": 1, "b": [1, "é"]})
    text = encode_frame(frame)
    assert json.loads(text) == {"type": "heartbeat", "id": 1, "body": {"seq": 1, "b": [1, "é"]}}
    assert decode_frame(text, max_bytes=LIMIT) == frame
    assert decode_frame(text.encode(), max_bytes=LIMIT) == frame


def test_missing_body_means_empty_and_extra_envelope_keys_are_ignored() -> None:
    frame = decode_frame('{"type": "snapshot", "id": 4, "x-trace": "abc"}', max_bytes=LIMIT)
    assert frame == Frame(type="snapshot", id=4, body={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "frame is not JSON"),
        ("", "frame is not JSON"),
        ("[1, 2]", "frame is not a JSON object, got list"),
        ('"heartbeat"', "frame is not a JSON object, got str"),
        ('{"body": {}}', "frame type missing or not a string: None"),
        ('{"type": 5}', "frame type missing or not a string: 5"),
        ('{"type": ""}', "frame type missing or not a string: ''"),
        ('{"type": "launch_missiles"}', "unknown message type 'launch_missiles'"),
        ('{"type": "heartbeat", "id": "1"}', "frame id must be an integer"),
        ('{"type": "heartbeat", "id": 1.5}', "frame id must be an integer"),
        ('{"type": "heartbeat", "id": true}', "frame id must be an integer"),
        ('{"type": "heartbeat", "id": -1}', "frame id must be an integer"),
        ('{"type": "heartbeat", "re": 9007199254740992}', "frame re must be an integer"),
        ('{"type": "heartbeat", "body": []}', "frame body is not a JSON object, got []"),
        ('{"type": "heartbeat", "body": null}', "frame body is not a JSON object, got None"),
        ('{"type": "heartbeat", "body": {"x": NaN}}', "frame is not JSON: NaN is not allowed"),
        ("[" * 100_000 + "]" * 100_000, "frame is not JSON"),
    ],
)
def test_malformed_frames_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(text, max_bytes=1 << 20)
    assert str(info.value).startswith(message), str(info.value)


def test_invalid_utf8_and_lone_surrogates() -> None:
    with pytest.raises(FrameError, match="not valid UTF-8"):
        decode_frame(b'{"type": "\xff"}', max_bytes=LIMIT)
    with pytest.raises(FrameError, match="not valid UTF-8"):
        decode_frame('{"type": "\ud800"}', max_bytes=LIMIT)


def _frame_of_size(size: int, text: str = "x") -> str:
    base = encode_frame(Frame(type="error", body={"code": "c", "message": ""}))
    pad = size - len(base.encode())
    assert pad % len(text.encode()) == 0
    frame = encode_frame(
        Frame(type="error", body={"code": "c", "message": text * (pad // len(text.encode()))})
    )
    assert len(frame.encode()) == size
    return frame


@pytest.mark.parametrize("pad_char", ["x", "é"])
def test_size_limit_is_inclusive_and_counts_utf8_bytes(pad_char: str) -> None:
    limit = 1001 if pad_char == "é" else 1000  # the base frame is 49 bytes
    at_limit = _frame_of_size(limit, pad_char)
    assert decode_frame(at_limit, max_bytes=limit).body["message"].startswith(pad_char)
    assert decode_frame(at_limit.encode(), max_bytes=limit).type == "error"
    over = _frame_of_size(limit + 2 if pad_char == "é" else limit + 1, pad_char)
    if pad_char == "é":
        assert len(over) < limit  # fewer characters than the limit, more bytes
    with pytest.raises(FrameTooLarge) as info:
        decode_frame(over, max_bytes=limit)
    assert info.value.size == len(over.encode())
    assert info.value.limit == limit
    with pytest.raises(FrameTooLarge):
        decode_frame(over.encode(), max_bytes=limit)


def test_one_byte_over_the_limit() -> None:
    frame = _frame_of_size(501)
    decode_frame(frame, max_bytes=501)
    with pytest.raises(FrameTooLarge, match="frame of 501 bytes exceeds the limit of 500"):
        decode_frame(frame, max_bytes=500)


def test_frame_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown message type"):
        Frame(type="nope")
    with pytest.raises(ValueError, match="id must be"):
        Frame(type="heartbeat", id=-3)


@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_protocol_errors(text: str) -> None:
    try:
        frame = decode_frame(text, max_bytes=200)
    except AgentProtocolError:
        return
    assert frame.type in MESSAGE_TYPES


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    try:
        frame = decode_frame(data, max_bytes=200)
    except AgentProtocolError:
        return
    assert frame.type in MESSAGE_TYPES


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["heartbeat", "deploy", "bogus", ""]) | _json,
            "id": _json,
            "re": _json,
            "body": _json,
        },
    )
)
def test_arbitrary_envelopes_only_raise_protocol_errors(envelope: dict[str, object]) -> None:
    text = json.dumps(envelope)
    try:
        frame = decode_frame(text, max_bytes=1 << 20)
    except AgentProtocolError:
        return
    assert frame.type == envelope["type"]


def test_hostile_json_yields_frame_errors_with_no_internal_text() -> None:
    """Whatever the JSON, decode_frame raises FrameError with a short message of ours."""
    deep_body = '{"type": "heartbeat", "body": ' + "[" * 950 + "]" * 950 + "}"
    deep_type = '{"type": ' + "[" * 950 + "]" * 950 + "}"
    for text, expected in [
        ("[" * 100_000 + "]" * 100_000, "frame is not JSON: nested too deeply"),
        (deep_body, "frame body is not a JSON object, got an array of 1 items"),
        (deep_type, "frame type missing or not a string: an array of 1 items"),
        ('{"type": "heartbeat", "id": ' + "9" * 5000 + "}", "frame is not JSON"),
        ('{"type": "' + "t" * 500_000 + '"}', "unknown message type 't"),
    ]:
        with pytest.raises(FrameError) as info:
            decode_frame(text, max_bytes=1 << 20)
        message = str(info.value)
        assert message.startswith(expected), message[:200]
        assert len(message) < 200
        assert "recursion" not in message and "Error" not in message


def test_describe_is_short_escaped_and_cheap() -> None:
    from ee.protocol.strict import describe, printable

    assert describe("a\nb") == "'a\\nb'"
    assert len(describe("x" * 10**6)) < 100
    assert describe([[[]]]) == "an array of 1 items"
    assert describe(2**400).startswith("an integer of 401 bits")
    assert printable("ok\n2026 CRITICAL forged\x1b[31m") == "ok\\n2026 CRITICAL forged\\x1b[31m"
    assert printable("é" * 10, 4) == "éééé...(6 more chars)"
