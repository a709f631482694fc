"""Trust in CP writes: the envelope decision (pure) and the persisted MRTD pin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ee.agent.cptrust import PIN_FILE, CpTrust, judge_envelope
from ee.attestation.providers.sim import SimTD
from ee.protocol.messages import CpEnvelope, Deploy, Undeploy, body_to_dict
from ee.protocol.reportdata import cp_envelope_report_data

MRTD_A = bytes([0xA1]) * 48
MRTD_B = bytes([0xB2]) * 48


@pytest.fixture(scope="module")
def chain() -> SimTD:
    return SimTD.create()


def _deploy() -> Deploy:
    return Deploy(deployment_id="d1", app="a", version="1", compose="services: {}\n",
                  expose_port=8080, health_path="/")


def _sealed(td: SimTD, msg: Deploy | Undeploy, mrtd: bytes) -> tuple[dict[str, Any], CpEnvelope]:
    """The wire body of *msg* with an envelope quoted by a CP whose MRTD is *mrtd*."""
    body = body_to_dict(msg)
    quote = td.evolve(mr_td=mrtd).quote(cp_envelope_report_data(msg.TYPE, body))
    envelope = CpEnvelope(provider="sim", quote=quote)
    return {**body, "envelope": body_to_dict(envelope)}, envelope  # type: ignore[arg-type]


def test_modes_without_an_envelope() -> None:
    body = body_to_dict(_deploy())
    assert judge_envelope("disabled", "deploy", body, None).accepted
    assert judge_envelope("optional", "deploy", body, None).accepted
    verdict = judge_envelope("required", "deploy", body, None)
    assert not verdict.accepted and "cp_envelope is required" in verdict.reason


def test_trusted_list(chain: SimTD) -> None:
    body, envelope = _sealed(chain, _deploy(), MRTD_A)
    ok = judge_envelope("required", "deploy", body, envelope, trusted_mrtds=(MRTD_A.hex(),))
    assert ok.accepted and ok.mrtd == MRTD_A.hex() and ok.pin is None
    bad = judge_envelope("required", "deploy", body, envelope, trusted_mrtds=(MRTD_B.hex(),))
    assert not bad.accepted and "not in trusted_cp_mrtds" in bad.reason
    # `optional` still refuses an envelope that is present and wrong
    assert not judge_envelope("optional", "deploy", body, envelope,
                              trusted_mrtds=(MRTD_B.hex(),)).accepted
    assert judge_envelope("disabled", "deploy", body, envelope,
                          trusted_mrtds=(MRTD_B.hex(),)).accepted


def test_envelope_binds_type_and_body(chain: SimTD) -> None:
    body, envelope = _sealed(chain, _deploy(), MRTD_A)
    tampered = {**body, "expose_port": 9090}
    verdict = judge_envelope("required", "deploy", tampered, envelope)
    assert not verdict.accepted and "REPORTDATA does not bind" in verdict.reason
    verdict = judge_envelope("required", "undeploy", body, envelope)
    assert not verdict.accepted and "REPORTDATA" in verdict.reason


def test_garbage_quote_is_refused() -> None:
    body = body_to_dict(_deploy())
    verdict = judge_envelope("optional", "deploy", body,
                             CpEnvelope(provider="sim", quote=b"not a quote"))
    assert not verdict.accepted and "invalid" in verdict.reason


def test_pin_on_first_use_is_persisted(tmp_path: Path, chain: SimTD) -> None:
    trust = CpTrust("required", tmp_path)
    body, envelope = _sealed(chain, _deploy(), MRTD_A)
    first = trust.check("deploy", body, envelope)
    assert first.accepted and first.pin == MRTD_A.hex()
    assert (tmp_path / PIN_FILE).read_text().strip() == MRTD_A.hex()
    assert (tmp_path / PIN_FILE).stat().st_mode & 0o077 == 0

    again = CpTrust("required", tmp_path)  # a restarted agent keeps the pin
    undeploy_body, undeploy_env = _sealed(chain, Undeploy(deployment_id="d1"), MRTD_A)
    assert again.check("undeploy", undeploy_body, undeploy_env).accepted
    other_body, other_env = _sealed(chain, _deploy(), MRTD_B)
    verdict = again.check("deploy", other_body, other_env)
    assert not verdict.accepted and "differs from the pinned" in verdict.reason
