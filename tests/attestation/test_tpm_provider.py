"""The agent-side `tpm` provider against a real swtpm (tpm2-tools subprocesses)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ee.attestation import tpm as T
from ee.attestation.errors import ProviderError
from ee.attestation.providers.tpm import TpmProvider
from ee.protocol.reportdata import registration_report_data

from . import tpmkit as K

NOW = 4102444800.0  # 2100-01-01, inside the EK certificate's window


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> K.LocalCa:
    d = tmp_path_factory.mktemp("tpmca")
    ca = K.local_ca(d / "ca")
    K.manufacture(ca, d / "tpm")
    return ca


@pytest.fixture
def swtpm(ca: K.LocalCa) -> Iterator[K.SwTpm]:
    with K.running(ca.dir.parent / "tpm") as tpm:
        yield tpm
    assert tpm.proc.poll() is not None


def provider(swtpm: K.SwTpm, ca: K.LocalCa, tmp_path: Path, **kw: object) -> TpmProvider:
    return TpmProvider(swtpm.tcti, tmp_path / "agent", ek_chain=(ca.issuer_der,),
                       event_log=tmp_path / "no-log", **kw)  # type: ignore[arg-type]


def test_get_quote_is_evidence_that_verifies(swtpm: K.SwTpm, ca: K.LocalCa,
                                             tmp_path: Path) -> None:
    p = provider(swtpm, ca, tmp_path)
    nonce, key = b"\x01" * 32, b"\x02" * 32
    blob = p.get_quote(registration_report_data(nonce, key))
    ev = T.TpmEvidence.decode(blob)
    assert ev.event_log == b"" and ev.ek_chain == (ca.issuer_der,)
    result = T.TpmVerifier([ca.root]).verify(
        blob, expected_qualifying_data=T.qualifying_data(nonce, key), now=NOW)
    assert result.ok, result.reasons
    read = K.tpm2(swtpm.tcti, "tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7,8,9", "-o",
                  str(tmp_path / "pcrs"))
    assert read
    assert b"".join(ev.pcr_values) == (tmp_path / "pcrs").read_bytes()
    with pytest.raises(ValueError):
        p.get_quote(b"\x00" * 32)
    # No transient object or session is left loaded in the TPM.
    assert K.tpm2(swtpm.tcti, "tpm2_getcap", "handles-transient") == b""
    assert K.tpm2(swtpm.tcti, "tpm2_getcap", "handles-loaded-session") == b""


def test_event_log_is_read_from_the_configured_file(swtpm: K.SwTpm, ca: K.LocalCa,
                                                    tmp_path: Path) -> None:
    digest = hashlib.sha256(b"measured").digest()
    K.tpm2(swtpm.tcti, "tpm2_pcrextend", f"8:sha256={digest.hex()}")
    (tmp_path / "log").write_bytes(K.event_log([(8, digest)]))
    p = TpmProvider(swtpm.tcti, tmp_path / "agent", ek_chain=(ca.issuer_der,),
                    event_log=tmp_path / "log")
    result = T.TpmVerifier([ca.root]).verify(p.evidence(b"q"), expected_qualifying_data=b"q",
                                             now=NOW)
    assert result.ok, result.reasons
    assert result.pcrs[8] == K.replay([(8, digest)])[8]


def test_ek_recreated_from_the_template_activates(swtpm: K.SwTpm, ca: K.LocalCa,
                                                  tmp_path: Path) -> None:
    """No persistent EK at the configured handle: tpm2_createek makes the same key from
    the endorsement seed, so the certificate's key still decrypts the credential."""
    p = provider(swtpm, ca, tmp_path, ek_handle=0x81010099)
    verifier = T.TpmVerifier([ca.root])
    result = verifier.verify(p.evidence(b"x" * 32), expected_qualifying_data=b"x" * 32, now=NOW)
    assert result.ok, result.reasons
    credential = verifier.credential(result)
    assert credential.matches(p.activate(credential.credential_blob,
                                         credential.encrypted_secret))


def test_ek_certificate_from_a_file(swtpm: K.SwTpm, ca: K.LocalCa, tmp_path: Path) -> None:
    der = provider(swtpm, ca, tmp_path).ek_certificate()
    (tmp_path / "ek.der").write_bytes(der)
    p = provider(swtpm, ca, tmp_path, ek_cert_file=tmp_path / "ek.der", ek_cert_nv=None)
    assert p.ek_certificate() == der
    with pytest.raises(ProviderError, match="EK certificate"):
        provider(swtpm, ca, tmp_path, ek_cert_file=tmp_path / "missing").ek_certificate()


def test_garbage_credential_is_a_provider_error(swtpm: K.SwTpm, ca: K.LocalCa,
                                                tmp_path: Path) -> None:
    p = provider(swtpm, ca, tmp_path)
    with pytest.raises(ProviderError, match="tpm2_activatecredential"):
        p.activate(b"\x00\x04abcd", b"\x00\x02zz")
    assert K.tpm2(swtpm.tcti, "tpm2_getcap", "handles-loaded-session") == b""


def test_unreachable_tpm_is_a_provider_error(tmp_path: Path) -> None:
    p = TpmProvider(f"swtpm:path={tmp_path}/nothing", tmp_path / "agent", timeout_s=10)
    with pytest.raises(ProviderError):
        p.evidence(b"q")
    with pytest.raises(ValueError):
        p.evidence(b"q" * 33)
