from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "loadgen"))


@pytest.fixture(autouse=True)
def _sim_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One sim TD chain per test session, shared by every CP process of a test."""
    path = tmp_path_factory.getbasetemp() / "sim"
    monkeypatch.setenv("EE_SIM_DIR", str(path))
    return path
