"""Shared fixtures: the real TDX quotes in ../shared/tdx (override: EE_TDX_SAMPLES)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ee.attestation.collateral import Collateral
from ee.attestation.providers.sim import SimTD
from ee.attestation.quote import Quote, parse_quote

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = Path(os.environ.get("EE_TDX_SAMPLES", REPO_ROOT.parent / "shared" / "tdx"))

UPTODATE = "dcap-qvl-tdx_quote.bin"
UPTODATE_COLLATERAL = "dcap-qvl-tdx_quote_collateral.json"
UPTODATE_NOW = 1750329148
OUTDATED = "dcap-qvl-tdx_quote_outdated.bin"
OUTDATED_COLLATERAL = "dcap-qvl-tdx_quote_outdated_collateral.json"
OUTDATED_NOW = 1772323200
SPR_E4 = "go-tdx-guest-tdx_prod_quote_SPR_E4.bin"
DEBUG = "trustee-tdx_quote_4-debug.bin"
ALL_QUOTES = (UPTODATE, OUTDATED, SPR_E4, DEBUG)
# go-tdx-guest appends a text note after the quote; the parser refuses non-zero
# trailers unless told otherwise, which only the tests of this one file do.
TRAILER_SAMPLES = frozenset({SPR_E4})

# The sample collateral's window: the latest issue date (QE identity) and the earliest
# next update (the PCK CRL).
WINDOW_START = 1750329147  # 2025-06-19T10:32:27Z
WINDOW_END = 1752919235  # 2025-07-19T10:00:35Z


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / UPTODATE).is_file():
        pytest.skip(
            f"real TDX sample quotes not found in {SAMPLES} "
            "(expected ../shared/tdx beside the repo; set EE_TDX_SAMPLES to override)"
        )
    return SAMPLES


@pytest.fixture(scope="session")
def sample_bytes(samples: Path) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        return (samples / name).read_bytes()

    return read


@pytest.fixture(scope="session")
def sample_quote(sample_bytes: Callable[[str], bytes]) -> Callable[[str], Quote]:
    """The parsed sample (its text trailer allowed where it has one)."""

    def parse(name: str) -> Quote:
        return parse_quote(sample_bytes(name), allow_trailer=name in TRAILER_SAMPLES)

    return parse


@pytest.fixture(scope="session")
def sample_collateral(samples: Path) -> Callable[[str], Collateral]:
    def read(name: str) -> Collateral:
        return Collateral.from_json((samples / name).read_text())

    return read


@pytest.fixture(scope="session")
def sim() -> SimTD:
    """One sim PKI per test session (key generation is the slow part)."""
    return SimTD.create(mr_td=bytes([0x11]) * 48, rtmrs=tuple(bytes([i]) * 48 for i in range(4)))
