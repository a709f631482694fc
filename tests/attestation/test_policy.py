"""Policy decision table."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ee.attestation import (
    Collateral,
    Measurements,
    Policy,
    PolicyFormatError,
    Quote,
    Verifier,
    evaluate,
    load_intel_root,
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


# --- providers and the vTPM (PCR4/PCR9) rules ---------------------------------------

PCR_A = "11" * 32
PCR_B = "22" * 32
PCRS = {4: bytes.fromhex(PCR_A), 9: bytes.fromhex(PCR_B)}


def test_sim_quote_is_provider_sim_and_refused_by_a_tdx_only_policy(
    results: dict[str, VerificationResult],
) -> None:
    from ee.attestation.policy import quote_provider

    assert quote_provider(results["ok"]) == "sim"  # chain ends at the sim root, not Intel's
    for mode in ("strict", "warn", "disabled"):
        verdict = evaluate(
            Policy(mode=mode, measurements=Measurements(providers=["tdx"])),  # type: ignore[arg-type]
            results["ok"],
            now=NOW,
            expected_report_data=BOUND,
        )
        assert not verdict.admitted, mode
        assert [v.rule for v in verdict.violations] == ["provider"]
    # a node size may accept what the global policy does not
    policy = Policy(
        measurements=Measurements(providers=["tdx"]),
        node_sizes={"dev": Measurements(providers=["sim"])},
        max_collateral_age_s=86400,
    )
    assert evaluate(policy, results["ok"], now=NOW, node_size="dev").admitted
    assert not evaluate(policy, results["ok"], now=NOW, node_size="prod").admitted


TPM_TABLE = [
    # policy document, node size, pcrs, kwargs, admitted, rules
    ({}, None, PCRS, {}, False, ["provider"]),  # default providers: tdx, sim
    ({"providers": ["tdx"]}, None, PCRS, {}, False, ["provider"]),
    ({"providers": ["tdx"], "mode": "disabled"}, None, PCRS, {}, False, ["provider"]),
    ({"providers": ["tdx"], "mode": "warn"}, None, PCRS, {}, False, ["provider"]),
    ({"providers": ["tpm"]}, None, PCRS, {}, True, []),
    ({"providers": ["tpm"], "pcr4": [PCR_A], "pcr9": [PCR_B]}, None, PCRS, {}, True, []),
    ({"providers": ["tpm"], "pcr4": [PCR_B]}, None, PCRS, {}, False, ["pcr4"]),
    ({"providers": ["tpm"], "mode": "warn", "pcr9": [PCR_A]}, None, PCRS, {}, True, ["pcr9"]),
    ({"providers": ["tpm"], "pcr9": [PCR_B]}, None, {4: PCRS[4]}, {}, False, ["pcr9"]),
    ({"providers": ["tpm"], "pcr4": [PCR_A]}, None, {4: b"\x11" * 48}, {}, False, ["pcr4"]),
    (
        {"providers": ["tpm"]},
        None,
        PCRS,
        {"verification_reasons": ["TPM quote signature invalid"]},
        False,
        ["verification"],
    ),
    (
        {"providers": ["tpm"], "mode": "warn"},
        None,
        PCRS,
        {"report_data_ok": False},
        False,
        ["report_data"],
    ),
    # node size entries replace the global lists and providers
    (
        {"providers": ["tdx"], "node_sizes": {"small": {"providers": ["tpm"], "pcr4": [PCR_A]}}},
        "small",
        PCRS,
        {},
        True,
        [],
    ),
    (
        {"providers": ["tpm"], "pcr4": [PCR_A], "node_sizes": {"small": {"pcr4": [PCR_B]}}},
        "small",
        PCRS,
        {},
        False,
        ["pcr4"],
    ),
    (
        {"providers": ["tpm"], "node_sizes": {"llm": {"providers": ["tdx"]}}},
        "llm",
        PCRS,
        {},
        False,
        ["provider"],
    ),
]


@pytest.mark.parametrize(("doc", "size", "pcrs", "kwargs", "admitted", "rules"), TPM_TABLE)
def test_evaluate_tpm_table(
    doc: dict[str, object],
    size: str | None,
    pcrs: dict[int, bytes],
    kwargs: dict[str, object],
    admitted: bool,
    rules: list[str],
) -> None:
    from ee.attestation.policy import evaluate_tpm

    verdict = evaluate_tpm(Policy.from_json(doc), size, pcrs, **kwargs)  # type: ignore[arg-type]
    assert verdict.admitted is admitted
    assert [v.rule for v in verdict.violations] == rules
    assert verdict.tcb_status is None


def test_tpm_accepting_policy_does_not_accept_a_tdx_policy_size(
    results: dict[str, VerificationResult],
) -> None:
    # a policy accepting only tpm refuses TDX-quote evidence (sim here) too
    policy = Policy.from_json({"providers": ["tpm"]})
    assert "provider" in {v.rule for v in evaluate(policy, results["ok"], now=NOW).violations}


def test_policy_from_json_pcrs_and_providers() -> None:
    policy = Policy.from_json(
        {
            "providers": ["tdx", "tpm"],
            "pcr4": [PCR_A.upper()],
            "node_sizes": {"small": {"rtmr1": [GOOD], "pcr9": [PCR_B], "providers": ["tpm"]}},
        }
    )
    assert policy.measurements.providers == frozenset({"tdx", "tpm"})
    assert policy.measurements.pcr4 == frozenset({PCR_A})
    assert policy.node_sizes["small"].providers == frozenset({"tpm"})
    assert policy.node_sizes["small"].to_json() == {
        "rtmr1": [GOOD],
        "pcr9": [PCR_B],
        "providers": ["tpm"],
    }
    for bad in (
        {"providers": ["sgx"]},
        {"providers": []},
        {"providers": "tdx"},
        {"pcr4": [GOOD]},  # 48 bytes is not a SHA-256 PCR
        {"rtmr1": [PCR_A]},  # 32 bytes is not an RTMR
        {"node_sizes": {"x": {"pcr7": []}}},
        {"node_sizes": {"x": {"providers": ["tdx", 1]}}},
    ):
        with pytest.raises(PolicyFormatError):
            Policy.from_json(bad)  # type: ignore[arg-type]


def test_intel_rooted_quote_is_provider_tdx(
    sample_quote: Callable[[str], Quote], sample_collateral: Callable[[str], Collateral]
) -> None:
    from tests.attestation.conftest import UPTODATE, UPTODATE_COLLATERAL, UPTODATE_NOW

    from ee.attestation.policy import quote_provider

    result = Verifier([load_intel_root()]).verify(
        sample_quote(UPTODATE), now=UPTODATE_NOW, collateral=sample_collateral(UPTODATE_COLLATERAL)
    )
    assert quote_provider(result) == "tdx"
    tdx_only = Policy(measurements=Measurements(providers=["tdx"]))
    assert "provider" not in {
        v.rule for v in evaluate(tdx_only, result, now=UPTODATE_NOW).violations
    }
    sim_only = Policy(measurements=Measurements(providers=["sim"]))
    assert "provider" in {v.rule for v in evaluate(sim_only, result, now=UPTODATE_NOW).violations}


def test_event_log_rule(results: dict[str, VerificationResult]) -> None:
    base = {"max_collateral_age_s": 86400}
    lax = Policy(**base)  # type: ignore[arg-type]
    required = Policy.from_json({"require_event_log": True, **base})
    assert required.require_event_log
    ok = results["ok"]
    assert evaluate(lax, ok, now=NOW).admitted  # no log, not required
    assert evaluate(required, ok, now=NOW, event_log=[]).admitted  # a log that replays
    missing = evaluate(required, ok, now=NOW)
    assert not missing.admitted and [v.rule for v in missing.violations] == ["event_log"]
    lying = ["event_log: RTMR1 replays to aa.., the quote has bb.."]
    for policy in (lax, required):
        verdict = evaluate(policy, ok, now=NOW, event_log=lying)
        assert not verdict.admitted and verdict.reasons == (f"event_log: {lying[0]}",)
    warn = Policy(mode="warn", require_event_log=True, **base)  # type: ignore[arg-type]
    assert evaluate(warn, ok, now=NOW, event_log=lying).admitted
    with pytest.raises(PolicyFormatError):
        Policy.from_json({"require_event_log": "yes"})
