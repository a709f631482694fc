"""Errors of the agent session protocol.

Both ends raise these for input that came from the *peer*: a frame that does not
parse, is too large, names an unknown message type or breaks a message schema. The
session layer turns them into an ``error`` frame and, when repeated, closes the
websocket (1009 for :class:`FrameTooLarge`, 1008 for the rest).
"""

from __future__ import annotations

__all__ = ["AgentProtocolError", "FrameError", "FrameTooLarge"]


class AgentProtocolError(Exception):
    """The peer sent something the agent session protocol does not allow."""


class FrameError(AgentProtocolError):
    """A frame is malformed: not JSON, bad envelope, unknown type or bad body.

    The message names the problem, and for body problems the field path
    (``body.snapshot.seq: expected int, got 'x'``).
    """


class FrameTooLarge(AgentProtocolError):
    """A frame exceeds the size limit (websocket close code 1009)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
