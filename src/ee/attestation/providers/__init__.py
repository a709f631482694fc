"""Attestation providers: where an agent's quotes come from (`tsm` on TDX, `sim` in dev)."""

from __future__ import annotations

from typing import Protocol

from ee.attestation.providers.sim import SimProvider, SimTD
from ee.attestation.providers.tsm import TsmProvider


class QuoteProvider(Protocol):
    """Produces a quote over 64 bytes of REPORTDATA (blocking: run it in a thread)."""

    name: str

    def get_quote(self, report_data: bytes) -> bytes: ...


__all__ = ["QuoteProvider", "SimProvider", "SimTD", "TsmProvider"]
