"""Policy decision table."""

from __future__ import annotations

import pytest

from ee.attestation import (
    Measurements,
    Policy,
    PolicyFormatError,
    Verifier,
    evaluate,
    registration_report_data,
)
from ee.attestation.providers.sim import SimTD
from ee.attestation.verify import VerificationResult

NOW = 1_760_000_000
GOOD = "aa" * 48
OTHER = "bb" * 48
NONCE, KEY = b"N" * 32, b"K" * 32
BOUND = registration_report_data(NONCE, KEY)


@pytest.fixture(scope="module")
def results(sim: SimTD) -> dict[str, VerificationResult]:
    verifier = Verifier([sim.root_cert])
    good = sim.evolve(mr_td=bytes.fromhex(GOOD))
    fresh = sim.collateral(issued_at=NOW - 60)
    return {
        "ok": verifier.verify(good.quote(BOUND), now=NOW, collateral=fresh),
        "unbound": verifier.verify(good.quote(bytes(64)), now=NOW, collateral=fresh),
        "other_mrtd": verifier.verify(
            sim.evolve(mr_td=bytes.fromhex(OTHER)).quote(BOUND), now=NOW, collateral=fresh
        ),
        "debug": verifier.verify(good.evolve(debug=True).quote(BOUND), now=NOW, collateral=fresh),
        "outofdate": verifier.verify(
            good.quote(BOUND),
            now=NOW,
            collateral=sim.collateral(issued_at=NOW - 60, tcb_status="OutOfDate"),
        ),
        "old_collateral": verifier.verify(
            good.quote(BOUND), now=NOW, collateral=sim.collateral(issued_at=NOW - 10 * 86400)
        ),
        "no_collateral": verifier.verify(good.quote(BOUND), now=NOW),
        "untrusted": Verifier([SimTD.create().root_cert]).verify(
            good.quote(BOUND), now=NOW, collateral=fresh
        ),
    }


BASE = {"measurements": Measurements(mrtd=[GOOD]), "max_collateral_age_s": 86400}

# case, mode, expected admitted, expected rules
TABLE = [
    ("ok", "strict", True, []),
    ("ok", "warn", True, []),
    ("ok", "disabled", True, []),
    ("other_mrtd", "strict", False, ["mrtd"]),
    ("other_mrtd", "warn", True, ["mrtd"]),
    ("other_mrtd", "disabled", True, []),
    ("outofdate", "strict", False, ["tcb_status"]),
    ("outofdate", "warn", True, ["tcb_status"]),
    ("old_collateral", "strict", False, ["collateral_age"]),
    ("old_collateral", "warn", True, ["collateral_age"]),
    ("no_collateral", "strict", False, ["tcb_status"]),
    ("no_collateral", "warn", True, ["tcb_status"]),
    ("unbound", "strict", False, ["report_data"]),
    ("unbound", "warn", False, ["report_data"]),
    ("unbound", "disabled", True, []),
    ("debug", "strict", False, ["debug"]),
    ("debug", "warn", False, ["debug"]),
    ("debug", "disabled", False, ["debug"]),
    ("untrusted", "strict", False, ["verification"]),
    ("untrusted", "warn", False, ["verification"]),
    ("untrusted", "disabled", True, []),
]


@pytest.mark.parametrize(("case", "mode", "admitted", "rules"), TABLE)
def test_decision_table(
    results: dict[str, VerificationResult], case: str, mode: str, admitted: bool, rules: list[str]
) -> None:
    policy = Policy(mode=mode, **BASE)  # type: ignore[arg-type]
    verdict = evaluate(policy, results[case], now=NOW, expected_report_data=BOUND)
    assert verdict.admitted is admitted
    assert sorted({v.rule for v in verdict.violations}) == rules
    assert verdict.mode == mode


def test_warn_lists_every_broken_rule(results: dict[str, VerificationResult]) -> None:
    policy = Policy(
        mode="warn",
        measurements=Measurements(mrtd=[OTHER], rtmr0=[OTHER]),
        allowed_tcb_statuses=frozenset({"UpToDate"}),
        max_collateral_age_s=1,
    )
    verdict = evaluate(policy, results["outofdate"], now=NOW)
    assert verdict.admitted
    assert [v.rule for v in verdict.violations] == ["mrtd", "rtmr0", "tcb_status", "collateral_age"]


def test_node_size_allowlist_replaces_global(results: dict[str, VerificationResult]) -> None:
    policy = Policy(
        measurements=Measurements(mrtd=[OTHER]),
        node_sizes={"llm": Measurements(mrtd=[GOOD])},
    )
    assert evaluate(policy, results["ok"], now=NOW, node_size="llm").admitted
    refused = evaluate(policy, results["ok"], now=NOW, node_size="tiny")
    assert [v.rule for v in refused.violations] == ["mrtd"]
    assert not evaluate(policy, results["ok"], now=NOW).admitted


def test_rtmr_allowlists(results: dict[str, VerificationResult], sim: SimTD) -> None:
    rtmr2 = sim.rtmrs[2].hex()
    assert evaluate(
        Policy(measurements=Measurements(rtmr2=[rtmr2])), results["ok"], now=NOW
    ).admitted
    verdict = evaluate(Policy(measurements=Measurements(rtmr3=[GOOD])), results["ok"], now=NOW)
    assert [v.rule for v in verdict.violations] == ["rtmr3"]


def test_allowed_statuses(results: dict[str, VerificationResult]) -> None:
    lenient = Policy(allowed_tcb_statuses=frozenset({"UpToDate", "OutOfDate"}))
    assert evaluate(lenient, results["outofdate"], now=NOW).admitted


def test_policy_from_json() -> None:
    policy = Policy.from_json(
        {
            "mode": "warn",
            "mrtd": [GOOD.upper()],
            "node_sizes": {"llm": {"rtmr1": [OTHER]}},
            "allowed_tcb_statuses": ["UpToDate"],
            "max_collateral_age_s": 3600,
        }
    )
    assert policy.mode == "warn"
    assert policy.measurements.mrtd == frozenset({GOOD})
    assert policy.node_sizes["llm"].rtmr1 == frozenset({OTHER})
    assert policy.max_collateral_age_s == 3600
    for bad in (
        {"mode": "lenient"},
        {"mrtd": ["abc"]},
        {"allowed_tcb_statuses": ["Fine"]},
        {"unknown": 1},
        {"node_sizes": {"x": {"mrseam": []}}},
        "[1]",
        "not json",
    ):
        with pytest.raises(PolicyFormatError):
            Policy.from_json(bad)  # type: ignore[arg-type]


def test_registration_report_data_binding() -> None:
    import hashlib

    assert hashlib.sha512(b"ee/v2/register" + NONCE + KEY).digest() == BOUND
    assert len(BOUND) == 64
