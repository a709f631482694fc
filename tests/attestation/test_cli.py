"""`eectl trust verify-quote` via subprocess: exit codes and --json output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ee.attestation.providers.sim import SimTD

from .conftest import (
    DEBUG,
    OUTDATED,
    OUTDATED_COLLATERAL,
    OUTDATED_NOW,
    SPR_E4,
    UPTODATE,
    UPTODATE_COLLATERAL,
    UPTODATE_NOW,
    WINDOW_END,
)


def eectl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ee.ctl.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_uptodate_quote_accepted_json(samples: Path) -> None:
    p = eectl(
        "trust", "verify-quote", samples / UPTODATE,
        "--collateral", samples / UPTODATE_COLLATERAL,
        "--now", str(UPTODATE_NOW), "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    f = doc["fields"]
    assert f["version"] == 4 and f["tee_type"] == "00000081"
    assert f["fmspc"] == "b0c06f000000"
    assert f["mrtd"].startswith("91eb2b44d141d4ec") and len(f["mrtd"]) == 96
    assert len(f["report_data"]) == 128 and f["debug"] is False
    assert f["td_attributes"] == "0000001000000000" and f["xfam"] == "e702060000000000"
    assert f["tee_tcb_svn"] == "06010300000000000000000000000000"
    for key in ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid"):
        assert len(f[key]) == 96
    assert doc["signature_chain"]["valid"] is True
    assert doc["tcb_status"] == "UpToDate" and doc["advisory_ids"] == []
    assert doc["verdict"] == {"accepted": True, "mode": "strict", "violations": []}


def test_human_output(samples: Path) -> None:
    p = eectl(
        "trust", "verify-quote", samples / UPTODATE,
        "--collateral", samples / UPTODATE_COLLATERAL, "--now", str(UPTODATE_NOW),
    )  # fmt: skip
    assert p.returncode == 0
    assert "tcb_status: UpToDate" in p.stdout and "ACCEPTED" in p.stdout


def test_expired_collateral_refused(samples: Path) -> None:
    p = eectl(
        "trust", "verify-quote", samples / UPTODATE,
        "--collateral", samples / UPTODATE_COLLATERAL, "--now", str(WINDOW_END), "--json",
    )  # fmt: skip
    assert p.returncode == 1
    assert any("expired" in r for r in json.loads(p.stdout)["reasons"])


def test_v5_no_matching_level_refused(samples: Path) -> None:
    p = eectl(
        "trust", "verify-quote", samples / OUTDATED,
        "--collateral", samples / OUTDATED_COLLATERAL, "--now", str(OUTDATED_NOW), "--json",
    )  # fmt: skip
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["fields"]["version"] == 5 and doc["fields"]["body"] == "TDX 1.5"
    assert doc["reasons"] == ["no matching TCB level"]


def test_debug_refused_even_in_warn_mode(samples: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"mode": "warn", "require_collateral": False}))
    p = eectl(
        "trust", "verify-quote", samples / DEBUG, "--policy", policy,
        "--now", str(UPTODATE_NOW), "--json",
    )  # fmt: skip
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["fields"]["debug"] is True
    assert doc["signature_chain"]["valid"] is True
    assert doc["verdict"]["violations"] == ["debug: the TD has the DEBUG attribute set"]


def test_text_trailer_needs_allow_trailer(samples: Path) -> None:
    args = ["trust", "verify-quote", samples / SPR_E4, "--now", str(UPTODATE_NOW), "--json"]
    refused = eectl(*args)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "malformed quote: trailer at offset 4935" in refused.stderr
    read = eectl(*args, "--allow-trailer")
    assert read.returncode == 1  # no collateral: the TCB status is unknown ...
    assert json.loads(read.stdout)["signature_chain"]["valid"] is True  # ... but it verifies


def test_sim_quote_with_sim_root(tmp_path: Path) -> None:
    td = SimTD.load_or_create(tmp_path / "sim")
    (tmp_path / "q.bin").write_bytes(td.quote(bytes(64)))
    (tmp_path / "root.pem").write_bytes(td.root_pem())
    (tmp_path / "c.json").write_text(json.dumps(td.collateral(issued_at=1_760_000_000).to_json()))
    args = ["trust", "verify-quote", tmp_path / "q.bin", "--collateral", tmp_path / "c.json"]
    ok = eectl(*args, "--root", tmp_path / "root.pem", "--now", "1760000001")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = eectl(*args, "--now", "1760000001")  # default root: Intel only
    assert refused.returncode == 1
    assert "not trusted" in refused.stdout


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("missing", 2, "cannot read quote"),
        ("truncated", 1, "malformed quote: body at offset 48"),
        ("bad_collateral", 2, "malformed collateral"),
        ("bad_policy", 2, "policy is not JSON"),
    ],
)
def test_unreadable_or_malformed_files(
    setup: str, code: int, message: str, tmp_path: Path, samples: Path
) -> None:
    quote = samples / UPTODATE
    extra: list[str | Path] = []
    if setup == "missing":
        quote = tmp_path / "missing.bin"
    elif setup == "truncated":
        quote = tmp_path / "t.bin"
        quote.write_bytes((samples / UPTODATE).read_bytes()[:100])
    elif setup == "bad_collateral":
        (tmp_path / "c.json").write_text("{}")
        extra = ["--collateral", tmp_path / "c.json"]
    else:
        (tmp_path / "p.json").write_text("{")
        extra = ["--policy", tmp_path / "p.json"]
    p = eectl("trust", "verify-quote", quote, *extra)
    assert p.returncode == code
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr


def test_usage_errors_exit_2() -> None:
    assert eectl().returncode == 2
    assert eectl("trust").returncode == 2
    assert eectl("trust", "verify-quote").returncode == 2
    assert eectl("nope").returncode == 2


def test_help_everywhere() -> None:
    for args in ([], ["trust"], ["trust", "verify-quote"]):
        p = eectl(*args, "--help")
        assert p.returncode == 0 and "usage: eectl" in p.stdout
