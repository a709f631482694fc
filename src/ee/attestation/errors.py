"""Attestation exceptions: each one says whose fault it is.

`QuoteFormatError` and `CollateralFormatError` blame the bytes a peer (or a file) gave
us; `AttestationRejected` carries the reasons a well-formed quote was refused;
`ProviderError` is the local platform failing to produce a quote; `ItaError` is the
Intel Trust Authority exchange failing.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

UNEXPECTED = "VERIFY_ERROR"  # reason prefix of a failure no specific check named
# What a peer is told of such a failure: the exception's type and text stay in the log
# (they are library internals, and may quote the peer's bytes back).
UNEXPECTED_TEXT = "the quote could not be checked (the verifier logged why)"
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


class AttestationError(Exception):
    """Base class of every error raised by `ee.attestation`."""


class QuoteFormatError(AttestationError):
    """The quote bytes are truncated or malformed at *field* (byte *offset*)."""

    def __init__(self, field: str, offset: int, message: str) -> None:
        self.field = field
        self.offset = offset
        self.message = message
        super().__init__(f"malformed quote: {field} at offset {offset}: {message}")


class CollateralFormatError(AttestationError):
    """The collateral document is malformed at *field*."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"malformed collateral: {field}: {message}")


class PolicyFormatError(AttestationError):
    """A measurement policy document is malformed."""


class AttestationRejected(AttestationError):
    """A quote was refused; *reasons* lists every rule it broke."""

    def __init__(self, reasons: Iterable[str]) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        super().__init__("attestation rejected: " + "; ".join(self.reasons))


class ProviderError(AttestationError):
    """The local attestation provider could not produce a quote."""


class ItaError(AttestationError):
    """The Intel Trust Authority appraisal failed or returned an untrustworthy token."""


def describe(exc: BaseException, *, typed: bool = True, limit: int = 160) -> str:
    """``<type>: <text>`` of *exc* (just the text unless *typed*) on one printable line
    of at most *limit* characters (the text may quote attacker bytes; it ends up in a
    refusal sent to the peer)."""
    text = _UNPRINTABLE.sub(" ", str(exc)).strip()
    line = text if not typed else f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def quote_format_boundary(decode: Callable[P, R]) -> Callable[P, R]:
    """Decorate a decoder of untrusted quote bytes: it raises `QuoteFormatError` only.

    Whatever the decoder raises besides (struct, int parsing, a library), the caller
    sees the typed error, with the exception named in its message
    (``VERIFY_ERROR: <fixed text>``); the exception and its traceback are logged.
    """

    @functools.wraps(decode)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return decode(*args, **kwargs)
        except QuoteFormatError:
            raise
        except Exception as exc:
            log.info("unexpected error decoding a quote: %s", describe(exc))
            log.debug("its traceback", exc_info=True)
            raise QuoteFormatError("quote", 0, f"{UNEXPECTED}: {UNEXPECTED_TEXT}") from exc

    return guarded
