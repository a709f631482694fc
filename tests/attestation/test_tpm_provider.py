"""The agent-side `tpm` provider against a real swtpm (tpm2-tools subprocesses)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import attrs
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.attestation import policy
from ee.attestation import tpm as T
from ee.attestation.errors import ProviderError
from ee.attestation.providers.tpm import TpmProvider
from ee.protocol import messages
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


# --- through the real session: registration, credential round trip, re-attestation -----


@asynccontextmanager
async def tpm_cp(data_dir: Path, ca: K.LocalCa, providers: list[str],
                 monkeypatch: pytest.MonkeyPatch,
                 **settings: Any) -> AsyncIterator[Any]:
    from tests.cp.cpkit import RunningCp, dev_config

    from ee.cp.server import ControlPlane, prepare

    monkeypatch.setenv("EE_SIM_DIR", str(data_dir.parent / "sim"))
    config = dev_config(data_dir, **settings)
    boot, _ = prepare(config)
    doc = {"providers": providers, "require_collateral": False}
    boot = attrs.evolve(boot, ek_roots=(ca.root,), policy=policy.Policy.from_json(doc))
    cp = ControlPlane(config, boot)
    async with trio.open_nursery() as nursery:
        await nursery.start(cp.run)
        try:
            yield RunningCp(cp, None, (data_dir / "admin.token").read_text().strip(), data_dir)
        finally:
            cp.request_stop()


class _Quoter(Protocol):
    def get_quote(self, report_data: bytes) -> bytes: ...


async def _register(url: str, vm_name: str, quoter: _Quoter, activator: TpmProvider | None,
                    *, key: Any = None, tamper: bool = False) -> object:
    """Challenge -> register (tpm evidence) -> [credential -> activation] -> answer."""
    from simagent import SimAgent

    from ee.protocol import decode_message, encode_message

    agent = SimAgent(url=url, vm_name=vm_name, td=None, quote_for=lambda n, k: b"unused")
    if key is not None:
        agent = attrs.evolve(agent, key=key)
    async with trio_websocket.open_websocket_url(url) as ws:
        _, challenge = decode_message(await ws.get_message(), max_bytes=1 << 20, sender="cp")
        assert isinstance(challenge, messages.Challenge)
        evidence = await trio.to_thread.run_sync(
            quoter.get_quote, registration_report_data(challenge.nonce, agent.public_key))
        register = attrs.evolve(agent.register_message(challenge.nonce),
                                attestation=messages.Attestation(provider="tpm", quote=evidence))
        await ws.send_message(encode_message(register))
        _, answer = decode_message(await ws.get_message(), max_bytes=1 << 20, sender="cp")
        if not isinstance(answer, messages.CredentialChallenge):  # type: ignore[attr-defined]
            return answer
        try:
            assert activator is not None
            secret = await trio.to_thread.run_sync(
                activator.activate, answer.credential_blob, answer.encrypted_secret)
        except ProviderError:
            secret = bytes(32)
        if tamper:
            secret = bytes([secret[0] ^ 1]) + secret[1:]
        await ws.send_message(encode_message(
            messages.CredentialAnswer(secret=secret)))  # type: ignore[attr-defined]
        _, final = decode_message(await ws.get_message(), max_bytes=1 << 20, sender="cp")
        return final


@pytest.fixture
def two_tpms(tmp_path: Path) -> Iterator[tuple[K.LocalCa, TpmProvider, TpmProvider]]:
    ca = K.local_ca(tmp_path / "ca")
    K.manufacture(ca, tmp_path / "a")
    K.manufacture(ca, tmp_path / "b")
    with K.running(tmp_path / "a") as a, K.running(tmp_path / "b") as b:
        yield ca, *(TpmProvider(t.tcti, tmp_path / f"agent-{n}", ek_chain=(ca.issuer_der,),
                                event_log=None) for n, t in (("a", a), ("b", b)))


async def test_cp_admits_a_tpm_agent_only_after_activation(
        tmp_path: Path, two_tpms: tuple[K.LocalCa, TpmProvider, TpmProvider],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ca, a, b = two_tpms
    with trio.fail_after(90):
        async with tpm_cp(tmp_path / "cp", ca, ["tdx", "sim", "tpm"], monkeypatch) as env:
            url = env.agent_url
            assert isinstance(await _register(url, "vm-ok", a, a), messages.Registered)

            class Chimera:  # B's AK and quote, A's (public) EK certificate
                def get_quote(self, rd: bytes) -> bytes:
                    ev = T.TpmEvidence.decode(b.get_quote(rd))
                    return attrs.evolve(ev, ek_cert=a.ek_certificate()).encode()

            for answer in (await _register(url, "vm-chimera", Chimera(), b),
                           await _register(url, "vm-wrong", a, a, tamper=True)):
                assert isinstance(answer, messages.Rejected), answer
                assert answer.code == "CREDENTIAL_FAILED", answer

            class Junk:
                def get_quote(self, rd: bytes) -> bytes:
                    return T.EVIDENCE_MAGIC + b"\x01"

            junk = await _register(url, "vm-junk", Junk(), None)
            assert isinstance(junk, messages.Rejected) and junk.code == "BAD_QUOTE", junk

            captured: list[bytes] = []

            class Capture:
                def get_quote(self, rd: bytes) -> bytes:
                    captured.append(a.get_quote(rd))
                    return captured[-1]

            class Replay:
                def get_quote(self, rd: bytes) -> bytes:
                    return captured[0]

            key = Ed25519PrivateKey.generate()
            first = await _register(url, "vm-r", Capture(), a, key=key)
            assert isinstance(first, messages.Registered), first
            replayed = await _register(url, "vm-r2", Replay(), a, key=key)
            assert isinstance(replayed, messages.Rejected), replayed
            assert replayed.code == "NONCE_REPLAYED", replayed


async def test_tdx_only_policy_refuses_tpm_evidence(
        tmp_path: Path, two_tpms: tuple[K.LocalCa, TpmProvider, TpmProvider],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ca, a, _ = two_tpms
    with trio.fail_after(60):
        async with tpm_cp(tmp_path / "cp", ca, ["tdx"], monkeypatch) as env:
            answer = await _register(env.agent_url, "vm-t", a, a)
            assert isinstance(answer, messages.Rejected), answer
            assert answer.code == "ATTESTATION_FAILED"
            assert any(r.startswith("provider") for r in answer.reasons), answer.reasons


async def test_tpm_agent_registers_and_reattests(
        tmp_path: Path, swtpm: K.SwTpm, ca: K.LocalCa, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real agent (config -> QuoteSource -> session handshake) on swtpm: admitted,
    then kept admitted by passing re-attestations (verified_at moves)."""
    from tests.agent.agentkit import agent_config, eventually, running_agent

    (tmp_path / "chain.pem").write_bytes(ca.issuer_pem)
    with trio.fail_after(90):
        async with tpm_cp(tmp_path / "cp", ca, ["tpm"], monkeypatch, attest_interval_s=0.5,
                          heartbeat_interval_s=0.2) as env:
            config = agent_config(tmp_path / "agent", env.agent_url,
                                  attestation_provider="tpm", tpm_tcti=swtpm.tcti,
                                  tpm_ek_chain=str(tmp_path / "chain.pem"),
                                  tpm_event_log=str(tmp_path / "no-log"))
            async with running_agent(config):
                async def view(moved_from: object = None) -> dict[str, Any] | None:
                    async with env.client() as http:
                        agents = (await http.get("/api/v2/agents")).json()["agents"]
                    for a in agents:
                        if (a["vm_name"] == config.vm_name and a["status"] == "online"
                                and a["attestation"]["verified_at"] != moved_from):
                            return a  # type: ignore[no-any-return]
                    return None

                entry = await eventually(view, timeout=30)
                attestation = entry["attestation"]
                assert attestation["provider"] == "tpm" and attestation["mrtd"].startswith("tpm:")
                again = await eventually(lambda: view(attestation["verified_at"]), timeout=30)
                assert not again["attestation"]["quarantine_reasons"]
