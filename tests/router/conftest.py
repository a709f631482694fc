from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "cp"))
sys.path.insert(0, str(HERE.parents[1] / "tools" / "loadgen"))
sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def _sim_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One sim TD chain per test session (shared by test CPs and agents), never ~/."""
    path = tmp_path_factory.getbasetemp() / "sim"
    monkeypatch.setenv("EE_SIM_DIR", str(path))
    return path
