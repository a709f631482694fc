"""Shared test helpers.

Every test runs under pytest-trio's trio_mode; tests that wait on time request the
``autojump_clock`` fixture so virtual time passes instantly.
"""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_supervisor_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ee.supervisors")
