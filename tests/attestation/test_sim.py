"""The sim provider: real-format quotes through the full verifier, and dcap-qvl agrees."""

from __future__ import annotations

import json
from pathlib import Path

import dcap_qvl
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation import Policy, Verifier, evaluate, parse_quote, registration_report_data
from ee.attestation.providers.sim import SIM_FMSPC, SimProvider, SimTD

NOW = 1_760_000_000


def _dcap(td: SimTD, quote: bytes, collateral_json: dict[str, str], now: int) -> object:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(collateral_json))
    root = td.root_cert.public_bytes(Encoding.DER)
    try:
        report = dcap_qvl.verify_with_root_ca(quote, collateral, root, now)
    except ValueError:
        return None
    return report.status, sorted(report.advisory_ids)


def test_round_trip_through_full_verifier(sim: SimTD) -> None:
    report_data = registration_report_data(b"n" * 32, b"k" * 32)
    raw = SimProvider(sim).get_quote(report_data)
    quote = parse_quote(raw)
    assert quote.version == 4 and quote.trailing == 0
    assert quote.report.report_data == report_data
    assert quote.report.mr_td == bytes([0x11]) * 48
    assert quote.report.rtmrs == tuple(bytes([i]) * 48 for i in range(4))
    collateral = sim.collateral(issued_at=NOW - 60)
    result = Verifier([sim.root_cert]).verify(raw, now=NOW, collateral=collateral)
    assert result.ok, result.reasons
    assert result.tcb_status == "UpToDate" and result.fmspc == SIM_FMSPC
    assert result.qe_tcb_status == "UpToDate"
    verdict = evaluate(Policy(), result, now=NOW, expected_report_data=report_data)
    assert verdict.admitted
    assert _dcap(sim, raw, collateral.to_json(), NOW) == ("UpToDate", [])


@pytest.mark.parametrize(
    ("status", "advisories"),
    [
        ("SWHardeningNeeded", ("INTEL-SA-00615",)),
        ("ConfigurationNeeded", ()),
        ("ConfigurationAndSWHardeningNeeded", ("INTEL-SA-00615",)),
        ("OutOfDate", ("INTEL-SA-00828", "INTEL-SA-00837")),
        ("OutOfDateConfigurationNeeded", ("INTEL-SA-00828",)),
    ],
)
def test_tcb_level_matching_statuses(sim: SimTD, status: str, advisories: tuple[str, ...]) -> None:
    raw = sim.quote(bytes(64))
    collateral = sim.collateral(issued_at=NOW - 60, tcb_status=status, advisory_ids=advisories)
    result = Verifier([sim.root_cert]).verify(raw, now=NOW, collateral=collateral)
    assert result.ok, result.reasons  # non-fatal: the policy judges the status
    assert (result.tcb_status, result.advisory_ids) == (status, tuple(sorted(advisories)))
    assert _dcap(sim, raw, collateral.to_json(), NOW) == (status, sorted(advisories))


def test_older_platform_matches_lower_level(sim: SimTD) -> None:
    older = sim.evolve(tee_tcb_svn=bytes([6, 1, 2] + [0] * 13))  # TDX late microcode SVN 2
    # The sim's current level requires TDX component 3 >= 3: the quote falls to the
    # OutOfDate level that every component meets.
    raw = older.quote(bytes(64))
    collateral = sim.collateral(issued_at=NOW - 60)
    result = Verifier([sim.root_cert]).verify(raw, now=NOW, collateral=collateral)
    assert result.ok, result.reasons
    assert result.tcb_status == "OutOfDate"
    assert result.advisory_ids == ("EE-SIM-SA-00001",)
    assert _dcap(sim, raw, collateral.to_json(), NOW) == ("OutOfDate", ["EE-SIM-SA-00001"])


def test_revoked_pck_is_rejected(sim: SimTD) -> None:
    raw = sim.quote(bytes(64))
    collateral = sim.collateral(issued_at=NOW - 60, revoke_pck=True)
    result = Verifier([sim.root_cert]).verify(raw, now=NOW, collateral=collateral)
    assert result.tcb_status == "Revoked"
    assert "PCK certificate is revoked" in result.reasons
    assert _dcap(sim, raw, collateral.to_json(), NOW) is None


def test_sim_root_is_not_trusted_by_production(sim: SimTD) -> None:
    result = Verifier.intel().verify(sim.quote(bytes(64)), now=NOW)
    assert not result.ok and not result.chain_valid
    assert result.signature_valid  # well-formed and self-consistent, just not trusted


def test_collateral_from_another_sim_is_rejected(sim: SimTD) -> None:
    other = SimTD.create()
    result = Verifier([sim.root_cert]).verify(
        sim.quote(bytes(64)), now=NOW, collateral=other.collateral(issued_at=NOW - 60)
    )
    assert not result.ok
    assert any("TCB info issuer chain" in r for r in result.reasons)


def test_expired_sim_collateral(sim: SimTD) -> None:
    collateral = sim.collateral(issued_at=NOW - 100, validity_s=50)
    result = Verifier([sim.root_cert]).verify(sim.quote(bytes(64)), now=NOW, collateral=collateral)
    assert any("expired" in r for r in result.reasons)


def test_warm_cache_still_checks_time(sim: SimTD) -> None:
    verifier = Verifier([sim.root_cert])
    raw = sim.quote(bytes(64))
    collateral = sim.collateral(issued_at=NOW, validity_s=100)
    assert verifier.verify(raw, now=NOW + 50, collateral=collateral).ok
    assert not verifier.verify(raw, now=NOW + 100, collateral=collateral).ok
    assert not verifier.verify(raw, now=NOW - 1, collateral=collateral).ok
    assert verifier.verify(raw, now=NOW, collateral=collateral).ok


def test_load_or_create_persists_one_chain(tmp_path: Path) -> None:
    a = SimTD.load_or_create(tmp_path)
    b = SimTD.load_or_create(tmp_path, mr_td=bytes([7]) * 48)
    assert a.root_pem() == b.root_pem()
    assert (tmp_path / "sim-td.json").stat().st_mode & 0o777 == 0o600
    raw = b.quote(bytes(64))
    assert parse_quote(raw).report.mr_td == bytes([7]) * 48
    collateral = a.collateral(issued_at=NOW)
    from cryptography import x509

    root = x509.load_pem_x509_certificate(a.root_pem())
    assert Verifier([root]).verify(raw, now=NOW, collateral=collateral).ok
    assert SimTD.load_or_create(tmp_path / "other").root_pem() != a.root_pem()


def test_debug_sim_td(sim: SimTD) -> None:
    result = Verifier([sim.root_cert]).verify(sim.evolve(debug=True).quote(bytes(64)), now=NOW)
    assert result.ok and result.quote.report.debug
    assert not evaluate(Policy(mode="disabled"), result, now=NOW).admitted
