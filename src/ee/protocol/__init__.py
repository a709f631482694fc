"""The agent session protocol and signing, shared by the CP and the agent.

Re-exported here on purpose: the frame envelope (:mod:`ee.protocol.frames`), message
bodies (:mod:`ee.protocol.messages`), errors, Ed25519 signing of canonical JSON
(:mod:`ee.protocol.signing`) and REPORTDATA bindings (:mod:`ee.protocol.reportdata`).
Import message classes from :mod:`ee.protocol.messages`.
"""

from ee.protocol.canonical import canonical_json
from ee.protocol.errors import AgentProtocolError, FrameError, FrameTooLarge
from ee.protocol.frames import (
    Frame,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
    make_frame,
    parse_frame,
)
from ee.protocol.messages import Message, Sender, body_to_dict, parse_body
from ee.protocol.reportdata import (
    cp_envelope_report_data,
    health_report_data,
    registration_report_data,
)
from ee.protocol.signing import (
    KeyFileError,
    SignatureError,
    SignedDocument,
    read_signed,
    sign_document,
    verify_document,
    write_signed,
)

__all__ = [
    "AgentProtocolError",
    "Frame",
    "FrameError",
    "FrameTooLarge",
    "KeyFileError",
    "Message",
    "Sender",
    "SignatureError",
    "SignedDocument",
    "body_to_dict",
    "canonical_json",
    "cp_envelope_report_data",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
    "health_report_data",
    "make_frame",
    "parse_body",
    "parse_frame",
    "read_signed",
    "registration_report_data",
    "sign_document",
    "verify_document",
    "write_signed",
]
