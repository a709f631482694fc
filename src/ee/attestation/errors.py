"""Attestation exceptions: each one says whose fault it is.

`QuoteFormatError` and `CollateralFormatError` blame the bytes a peer (or a file) gave
us; `AttestationRejected` carries the reasons a well-formed quote was refused;
`ProviderError` is the local platform failing to produce a quote; `ItaError` is the
Intel Trust Authority exchange failing.
"""

from __future__ import annotations

from collections.abc import Iterable


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
