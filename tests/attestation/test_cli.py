"""`eectl trust verify-quote` via subprocess: exit codes and --json output."""

from __future__ import annotations

import hashlib
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


# --- verify-quote --event-log / --runtime-log ----------------------------------------

NOW = "1760000001"


def _sim_files(tmp_path: Path, rtmrs: tuple[bytes, bytes, bytes, bytes]) -> list[str | Path]:
    """A sim quote with these RTMRs, its root and collateral; the verify-quote args."""
    td = SimTD.create(rtmrs=rtmrs)
    (tmp_path / "q.bin").write_bytes(td.quote(bytes(64)))
    (tmp_path / "root.pem").write_bytes(td.root_pem())
    (tmp_path / "c.json").write_text(json.dumps(td.collateral(issued_at=1_760_000_000).to_json()))
    return [
        "trust", "verify-quote", tmp_path / "q.bin", "--collateral", tmp_path / "c.json",
        "--root", tmp_path / "root.pem", "--now", NOW, "--json",
    ]  # fmt: skip


def _ccel() -> tuple[bytes, tuple[bytes, bytes, bytes, bytes]]:
    from ee.attestation.eventlog import ALG_SHA384, encode_log, parse_ccel, replay_rtmrs

    raw = (
        encode_log(
            [(1, 0x80000008, b"fv"), (2, 0x80000003, b"kernel"), (3, 6, b"cmdline"), (3, 6, b"rd")],
            (ALG_SHA384,),
        )
        + b"\xff" * 512
    )
    return raw, replay_rtmrs(parse_ccel(raw))


def test_event_log_replay_matches_the_quote(tmp_path: Path) -> None:
    raw, rtmrs = _ccel()
    (tmp_path / "ccel.bin").write_bytes(raw)
    p = eectl(*_sim_files(tmp_path, rtmrs), "--event-log", tmp_path / "ccel.bin")
    assert p.returncode == 0, p.stdout + p.stderr
    log = json.loads(p.stdout)["event_log"]
    assert log["matches"] is True
    assert [log["rtmr0"], log["rtmr1"], log["rtmr2"]] == [r.hex() for r in rtmrs[:3]]
    assert [e["index"] for e in log["events"]] == [1, 2, 3, 3]
    assert log["events"][1]["digests"]["sha384"] == hashlib.sha384(b"kernel").hexdigest()
    human = eectl(*_sim_files(tmp_path, rtmrs)[:-1], "--event-log", tmp_path / "ccel.bin")
    assert "event log: 4 events, matches the quote" in human.stdout


def test_event_log_that_does_not_replay_to_the_quote_is_refused(tmp_path: Path) -> None:
    raw, rtmrs = _ccel()
    (tmp_path / "ccel.bin").write_bytes(raw)
    other = (rtmrs[0], bytes(48), rtmrs[2], rtmrs[3])  # the quote's RTMR1 differs
    p = eectl(*_sim_files(tmp_path, other), "--event-log", tmp_path / "ccel.bin")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["event_log"]["matches"] is False
    assert doc["verdict"]["accepted"] is False
    assert any(v.startswith("event_log: RTMR1 replays to") for v in doc["verdict"]["violations"])


def test_malformed_event_log_names_the_offset(tmp_path: Path) -> None:
    raw, rtmrs = _ccel()
    (tmp_path / "ccel.bin").write_bytes(raw[:100])
    p = eectl(*_sim_files(tmp_path, rtmrs), "--event-log", tmp_path / "ccel.bin")
    assert p.returncode == 1
    assert "malformed event log: event[0].digests[0].digest at offset 79" in p.stderr
    assert p.stdout == ""


def test_runtime_log_replays_to_rtmr3(tmp_path: Path) -> None:
    from ee.attestation.eventlog import RuntimeEvent, replay_runtime

    ev = RuntimeEvent(
        type="deploy",
        app="web",
        version="v1",
        deployment_id="d1",
        compose_hash="sha256:" + "0f" * 32,
    )
    (tmp_path / "rt.jsonl").write_bytes(ev.canonical() + b"\n")
    good = (bytes(48), bytes(48), bytes(48), replay_runtime([ev]))
    p = eectl(*_sim_files(tmp_path, good), "--runtime-log", tmp_path / "rt.jsonl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["runtime_log"]["events"][0]["app"] == "web"
    bad = eectl(*_sim_files(tmp_path, (bytes(48),) * 4), "--runtime-log", tmp_path / "rt.jsonl")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["runtime_log"]["matches"] is False
    (tmp_path / "rt.jsonl").write_bytes(b"{}\n")
    broken = eectl(*_sim_files(tmp_path, good), "--runtime-log", tmp_path / "rt.jsonl")
    assert broken.returncode == 1 and "line 1" in broken.stderr


# --- measure ---------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.skip("no /boot/vmlinuz-*")
    d = tmp_path / "image"
    d.mkdir()
    (d / "vmlinuz").write_bytes(kernels[-1].read_bytes())
    (d / "initrd.img").write_bytes(b"an initrd")
    (d / "cmdline").write_text("console=ttyS0 root=/dev/vda\n")
    return d


def test_measure_json_is_the_prediction(image: Path) -> None:
    from ee.attestation.measure import predict

    p = eectl("trust", "measure", "--image", image, "--memory", "2", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    want = predict(
        (image / "vmlinuz").read_bytes(), b"an initrd", "console=ttyS0 root=/dev/vda",
        memory=2 << 30,
    )  # fmt: skip
    for key in ("rtmr1", "rtmr2", "pcr4", "pcr9"):
        assert doc[key] == getattr(want, key).hex()
    assert doc["mrtd"] is None and doc["cmdline"] == "console=ttyS0 root=/dev/vda"
    human = eectl("trust", "measure", "--image", image)
    assert human.returncode == 0 and f"rtmr1: {want.rtmr1.hex()}" in human.stdout


def test_measure_with_firmware_predicts_mrtd(image: Path) -> None:
    fw = Path("/usr/share/ovmf/OVMF.fd")
    if not fw.is_file():
        pytest.skip("no TDVF-capable OVMF.fd")
    p = eectl("trust", "measure", "--image", image, "--firmware", fw, "--json")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["mrtd"]) == 96
    no_tdvf = eectl("trust", "measure", "--image", image, "--firmware", image / "cmdline")
    assert no_tdvf.returncode == 2 and "GUIDed table" in no_tdvf.stderr


def test_measure_writes_a_policy_entry(image: Path, tmp_path: Path) -> None:
    from ee.attestation.policy import Policy

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"mode": "warn", "node_sizes": {"big": {"rtmr1": ["aa" * 48]}}}))
    args = ["trust", "measure", "--image", image, "--policy-out", policy, "--node-size", "small"]
    assert eectl(*args, "--memory", "2").returncode == 0
    assert eectl(*args, "--memory", "2.5").returncode == 0  # another memory size: added
    loaded = Policy.from_json(policy.read_text())
    assert loaded.mode == "warn" and loaded.node_sizes["big"].rtmr1 == {"aa" * 48}
    small = loaded.node_sizes["small"]
    assert len(small.rtmr1) == 2 and len(small.pcr4) == 2  # kernel digest moves with memory
    assert len(small.rtmr2) == 1 and len(small.pcr9) == 1  # cmdline/initrd do not
    measured = json.loads(eectl("trust", "measure", "--image", image, "--json").stdout)
    assert measured["rtmr1"] in small.rtmr1 and measured["pcr9"] in small.pcr9

    before = '{"mode": "lenient"}'
    policy.write_text(before)
    bad = eectl(*args)
    assert bad.returncode == 2 and "mode must be one of" in bad.stderr
    assert policy.read_text() == before  # nothing written
    assert eectl("trust", "measure", "--image", image, "--policy-out", policy).returncode == 2


def test_measure_refusals(image: Path) -> None:
    (image / "initrd.img").unlink()
    p = eectl("trust", "measure", "--image", image)
    assert p.returncode == 2 and "cannot read initrd" in p.stderr
    (image / "initrd.img").write_bytes(b"x")
    (image / "vmlinuz").write_bytes(b"not a kernel")
    p = eectl("trust", "measure", "--image", image)
    assert p.returncode == 2 and "too short" in p.stderr
    p = eectl("trust", "measure", "--image", image, "--memory", "0")
    assert p.returncode == 2 and "GiB" in p.stderr
