"""Trust in CP writes: the proof and write decisions (pure), the pin, and real sessions.

The integration tests run the real CP (its agent plane signs writes with a sim
``EnvelopeProver``) and a real agent over real websockets; each attack is refused by
the agent with a reason code the CP sees (an ``agent.write_refused`` event, and the
``deploy_status`` its AgentActor receives).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from ee.agent.cptrust import (
    PIN_FILE,
    CpTrust,
    ProofVerdict,
    cp_quote_verifier,
    judge_proof,
    judge_write,
)
from ee.agent.platform import shared_sim_dir
from ee.attestation.providers.sim import SimProvider, SimTD
from ee.cp.envelope import EnvelopeProver, WriteSigner, make_prover
from ee.cp.events import Event
from ee.protocol.messages import CpProof, Deploy, Undeploy, body_to_dict
from ee.protocol.reportdata import cp_envelope_report_data
from ee.protocol.signing import generate_signing_key, public_key_bytes

from .agentkit import agent_config, eventually, running_agent, running_cp

MRTD_A = bytes([0xA1]) * 48
MRTD_B = bytes([0xB2]) * 48
NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def td() -> SimTD:
    return SimTD.create(mr_td=MRTD_A)


def _deploy(dep: str = "d1") -> Deploy:
    return Deploy(deployment_id=dep, app="a", version="1", compose="services: {}\n",
                  expose_port=8080, health_path="/")


def _proof(td: SimTD, nonce: bytes = NONCE, key: bytes | None = None,
           bound_key: bytes | None = None) -> CpProof:
    key = key or public_key_bytes(generate_signing_key())
    quote = td.quote(cp_envelope_report_data(nonce, bound_key or key))
    return CpProof(provider="sim", public_key=key, quote=quote)


def _judge(td: SimTD, proof: CpProof | None, mode: str = "required",
           **kw: Any) -> ProofVerdict:
    return judge_proof(mode, NONCE, proof,  # type: ignore[arg-type]
                       verify_quote=cp_quote_verifier((td.root_cert,)), **kw)


# ---- the proof (once per session) ------------------------------------------------------


def test_proof_accepted_and_pinned_on_first_use(td: SimTD) -> None:
    proof = _proof(td)
    verdict = _judge(td, proof)
    assert verdict.accepted and verdict.key == proof.public_key
    assert verdict.pin == MRTD_A.hex() and verdict.mrtd == MRTD_A.hex()
    again = _judge(td, proof, pinned=MRTD_A.hex())
    assert again.accepted and again.pin is None


def test_missing_proof_by_mode(td: SimTD) -> None:
    refused = _judge(td, None, "required")
    assert not refused.accepted and refused.code == "ENVELOPE_MISSING"
    optional = _judge(td, None, "optional")
    assert optional.accepted and optional.key is None
    assert _judge(td, None, "disabled").accepted


def test_foreign_cp_quote_is_refused(td: SimTD) -> None:
    """A quote that does not chain to the agent's roots (another sim 'platform')."""
    foreign = SimTD.create(mr_td=MRTD_A)
    verdict = _judge(td, _proof(foreign))
    assert not verdict.accepted and verdict.code == "CP_QUOTE_INVALID"
    assert "does not verify" in verdict.reason


def test_no_roots_refuses_a_proof(td: SimTD) -> None:
    verdict = judge_proof("required", NONCE, _proof(td), verify_quote=None)
    assert not verdict.accepted and verdict.code == "CP_QUOTE_INVALID"


def test_proof_for_another_nonce_or_key_is_refused(td: SimTD) -> None:
    """A proof recorded on another session (its nonce) or for another key."""
    replayed = _judge(td, _proof(td, nonce=bytes(32)))
    assert not replayed.accepted and replayed.code == "CP_QUOTE_INVALID"
    assert "cp_nonce" in replayed.reason
    other_key = _judge(td, _proof(td, bound_key=public_key_bytes(generate_signing_key())))
    assert not other_key.accepted and other_key.code == "CP_QUOTE_INVALID"


def test_debug_cp_is_refused(td: SimTD) -> None:
    verdict = _judge(td, _proof(td.evolve(debug=True)))
    assert not verdict.accepted and verdict.code == "CP_QUOTE_INVALID"
    assert "debug" in verdict.reason


def test_mrtd_allowlist_and_pin(td: SimTD) -> None:
    proof = _proof(td)
    allowed = _judge(td, proof, trusted_mrtds=(MRTD_A.hex(),))
    assert allowed.accepted and allowed.pin is None  # an allowlist never pins
    not_allowed = _judge(td, proof, trusted_mrtds=(MRTD_B.hex(),))
    assert not not_allowed.accepted and not_allowed.code == "CP_MRTD_NOT_ALLOWED"
    mismatch = _judge(td, proof, pinned=MRTD_B.hex())
    assert not mismatch.accepted and mismatch.code == "CP_PIN_MISMATCH"


def test_optional_holds_a_cp_that_sends_a_proof_to_it(td: SimTD) -> None:
    foreign = SimTD.create(mr_td=MRTD_A)
    verdict = _judge(td, _proof(foreign), "optional")
    assert not verdict.accepted and verdict.code == "CP_QUOTE_INVALID"


# ---- each write ------------------------------------------------------------------------


def _signed(signer: WriteSigner, msg: Deploy | Undeploy) -> tuple[dict[str, Any], Any]:
    signed = signer.sign(msg)
    return body_to_dict(signed), signed.envelope


def test_signed_writes_and_their_refusals(td: SimTD) -> None:
    key = generate_signing_key()
    proof = ProofVerdict(True, key=public_key_bytes(key), mrtd=MRTD_A.hex())
    signer = WriteSigner(key, NONCE)
    body, envelope = _signed(signer, _deploy())
    assert envelope.seq == 1
    assert judge_write(proof, NONCE, 0, "deploy", body, envelope).accepted
    # the same write again on this session: replayed
    replay = judge_write(proof, NONCE, 1, "deploy", body, envelope)
    assert not replay.accepted and replay.code == "ENVELOPE_REPLAYED"
    assert replay.reason.startswith("ENVELOPE_REPLAYED: deploy refused")
    # on another session (another nonce): the signature does not verify
    other = judge_write(proof, bytes(32), 0, "deploy", body, envelope)
    assert not other.accepted and other.code == "ENVELOPE_BAD_SIGNATURE"
    # a body changed after signing
    tampered = judge_write(proof, NONCE, 0, "deploy", body | {"app": "evil"}, envelope)
    assert not tampered.accepted and tampered.code == "ENVELOPE_BAD_SIGNATURE"
    # a signature for another type
    as_undeploy = judge_write(proof, NONCE, 0, "undeploy", body, envelope)
    assert as_undeploy.code == "ENVELOPE_BAD_SIGNATURE"
    # signed by another key
    forged, forged_env = _signed(WriteSigner(generate_signing_key(), NONCE), _deploy())
    assert judge_write(proof, NONCE, 0, "deploy", forged, forged_env).code == \
        "ENVELOPE_BAD_SIGNATURE"
    # unsigned under a proven key
    missing = judge_write(proof, NONCE, 0, "deploy", body_to_dict(_deploy()), None)
    assert not missing.accepted and missing.code == "ENVELOPE_MISSING"


def test_writes_under_a_refused_or_absent_proof() -> None:
    refused = ProofVerdict(False, "CP_PIN_MISMATCH", "CP MRTD x differs from the pinned y")
    verdict = judge_write(refused, NONCE, 0, "undeploy", {"deployment_id": "d"}, None)
    assert not verdict.accepted and verdict.code == "CP_PIN_MISMATCH"
    assert judge_write(None, NONCE, 0, "undeploy", {"deployment_id": "d"}, None).code == \
        "ENVELOPE_MISSING"
    unsigned_ok = ProofVerdict(True, reason="optional")
    assert judge_write(unsigned_ok, NONCE, 0, "undeploy", {"deployment_id": "d"}, None).accepted


def test_cptrust_consumes_seq_and_persists_the_pin(tmp_path: Path, td: SimTD) -> None:
    trust = CpTrust("required", tmp_path, verify_quote=cp_quote_verifier((td.root_cert,)))
    key = generate_signing_key()
    proof = _proof(td, key=public_key_bytes(key))
    verdict = trust.judge_proof(NONCE, proof)
    assert verdict.accepted and (tmp_path / PIN_FILE).read_text().strip() == MRTD_A.hex()
    trust.open_session(NONCE, verdict)
    signer = WriteSigner(key, NONCE)
    first = signer.sign(_deploy("d1"))
    second = signer.sign(_deploy("d2"))
    assert trust.check("deploy", body_to_dict(second), second.envelope).accepted
    # seq 1 arrives after seq 2: refused (the CP sends in seq order)
    assert trust.check("deploy", body_to_dict(first), first.envelope).code == \
        "ENVELOPE_REPLAYED"
    trust.close_session()
    assert trust.check("deploy", body_to_dict(second), second.envelope).code == \
        "ENVELOPE_MISSING"
    # a restarted agent (new CpTrust, same data dir) keeps the pin
    other = td.evolve(mr_td=MRTD_B)
    again = CpTrust("required", tmp_path, verify_quote=cp_quote_verifier((td.root_cert,)))
    assert again.judge_proof(NONCE, _proof(other)).code == "CP_PIN_MISMATCH"


# ---- real CP, real agent, real websockets ----------------------------------------------


def _refusals(events: list[Event], agent_id: str) -> list[str]:
    return [e.data["code"] for e in events
            if e.kind == "agent.write_refused" and e.subject == agent_id]


async def _session_of(rcp: Any, agent: Any) -> Any:
    await eventually(lambda: agent.agent_id in rcp.cp.plane.sessions and agent.link)
    return rcp.cp.plane.sessions[agent.agent_id]


def _shared_prover(**measurements: object) -> EnvelopeProver:
    return EnvelopeProver(SimProvider(SimTD.load_or_create(shared_sim_dir(), **measurements)))


BAD_COMPOSE = "services:\n  web:\n    image: ee-busybox:local\n    privileged: true\n"


class _Recording:
    """The session's socket, recording every frame the session sends."""

    def __init__(self, ws: Any, sent: list[str]) -> None:
        self._ws, self._sent = ws, sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def send_locked(self, text: str) -> None:
        self._sent.append(text)
        await self._ws.send_locked(text)


async def test_real_cp_signed_writes_accepted_and_replays_refused(tmp_path: Path) -> None:
    """A signed deploy passes the envelope (then the workload policy refuses its compose,
    so nothing runs); the recorded frame re-sent on the session is ENVELOPE_REPLAYED,
    and on the next session ENVELOPE_BAD_SIGNATURE; both reach the CP."""
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as rcp:
            rcp.cp.plane.prover = _shared_prover()
            async with running_agent(agent_config(tmp_path / "a", rcp.agent_url)) as agent:
                session = await _session_of(rcp, agent)
                assert agent.trust.proof is not None and agent.trust.proof.accepted
                sent: list[str] = []
                real_send = session.ws.send_message
                session.ws = _Recording(session.ws, sent)  # type: ignore[assignment]
                deploy = attrs.evolve(_deploy("dep-ok"), compose=BAD_COMPOSE)
                await session.send(deploy)
                status = await eventually(lambda: agent.runner.status("dep-ok") or
                                          _refusals(rcp.cp.events.recent, agent.agent_id))
                assert not isinstance(status, list), f"refused: {status}"  # envelope passed
                recorded = next(t for t in sent if '"deploy"' in t)
                assert '"envelope"' in recorded
                await real_send(recorded)  # the recorded frame, again
                codes = await eventually(lambda: _refusals(rcp.cp.events.recent,
                                                           agent.agent_id))
                assert codes == ["ENVELOPE_REPLAYED"]
                # next session: the recorded frame is signed for another cp_nonce
                await session.close(1012, "test: reconnect")
                new = await eventually(lambda: (s := rcp.cp.plane.sessions.get(agent.agent_id))
                                       is not None and s is not session and agent.link and s)
                await new.ws.send_message(recorded)
                codes = await eventually(lambda: _refusals(rcp.cp.events.recent,
                                                           agent.agent_id)[1:])
                assert codes == ["ENVELOPE_BAD_SIGNATURE"]


@pytest.mark.parametrize(("setup", "code"), [
    ("none", "ENVELOPE_MISSING"),
    ("quote_fails", "ENVELOPE_MISSING"),
    ("foreign", "CP_QUOTE_INVALID"),
    ("replayed_proof", "CP_QUOTE_INVALID"),
    ("not_allowed", "CP_MRTD_NOT_ALLOWED"),
    ("pin_mismatch", "CP_PIN_MISMATCH"),
])
async def test_real_cp_untrusted_writes_refused_with_reason_at_cp(
    tmp_path: Path, setup: str, code: str,
) -> None:
    """A CP that proves nothing, a foreign CP, a replayed proof, an MRTD off the
    allowlist, an MRTD other than the pinned one: the agent tells the CP at once, and
    refuses every deploy/undeploy with the code; the AgentActor sees the failure."""
    changes: dict[str, Any] = {}
    if setup == "not_allowed":
        changes["trusted_cp_mrtds"] = (MRTD_B.hex(),)
    if setup == "pin_mismatch":
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / PIN_FILE).write_text(MRTD_B.hex() + "\n")
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as rcp:
            prover = _shared_prover()
            if setup == "foreign":
                prover = EnvelopeProver(SimProvider(SimTD.create()))
            if setup == "replayed_proof":
                recorded = await prover.prove(secrets.token_bytes(32))

                async def replay(_nonce: bytes) -> CpProof:
                    return recorded

                prover.prove = replay  # type: ignore[method-assign]
            if setup == "quote_fails":  # cp_attestation tsm on a host without TDX
                prover = make_prover("tsm", tsm_root=tmp_path / "no-tsm")  # type: ignore[assignment]
            rcp.cp.plane.prover = None if setup == "none" else prover
            config = agent_config(tmp_path / "a", rcp.agent_url, **changes)
            async with running_agent(config) as agent:
                session = await _session_of(rcp, agent)
                # told at once, when the proof is judged
                assert await eventually(lambda: _refusals(rcp.cp.events.recent,
                                                          agent.agent_id)) == [code]
                await session.send(_deploy("dep-1"))
                await session.send(Undeploy(deployment_id="dep-1"))
                codes = await eventually(lambda: _refusals(rcp.cp.events.recent,
                                                           agent.agent_id)[2:] and
                                         _refusals(rcp.cp.events.recent, agent.agent_id))
                assert codes == [code, code, code]
                assert agent.runner.status("dep-1") is None  # nothing ran
                event = next(e for e in rcp.cp.events.recent
                             if e.kind == "agent.write_refused" and
                             e.data.get("deployment_id") == "dep-1")
                assert event.data["reason"].startswith(f"{code}: deploy refused")
                if setup == "quote_fails":  # admitted all the same, and the CP says why
                    failed = [e for e in rcp.cp.events.recent
                              if e.kind == "cp.envelope_proof_failed"]
                    assert failed and "ProviderError" in failed[0].data["error"]


# ---- release keys: a signed release vouches for the CP's MRTD -----------------------


def _release(mrtd: bytes | None, key: Any, **extra: Any) -> tuple[str, bytes]:
    """(manifest text, signature): a release whose image names *mrtd*."""
    from ee.protocol.canonical import canonical_json
    from ee.protocol.signing import sign_document

    doc = {"name": "easyenclave", "version": "2.1.0", "git_commit": "c" * 40,
           "image": {"root_hash": "d" * 64,
                     "measurements": {"mrtd": mrtd.hex() if mrtd else None}}, **extra}
    return canonical_json(doc).decode(), sign_document(doc, key)


def _released_proof(td: SimTD, manifest: str, signature: bytes) -> CpProof:
    return attrs.evolve(_proof(td), release_manifest=manifest, release_signature=signature)


def test_a_pinned_release_vouches_for_the_cp_mrtd(td: SimTD) -> None:
    key, other = generate_signing_key(), generate_signing_key()
    pinned = (key.public_key(),)
    good = _released_proof(td, *_release(MRTD_A, key))
    verdict = _judge(td, good, release_keys=pinned)
    assert verdict.accepted and verdict.pin is None  # no trust-on-first-use pin
    assert "release" in verdict.reason
    refusals = {
        "unpinned signer": _released_proof(td, *_release(MRTD_A, other)),
        "another MRTD": _released_proof(td, *_release(MRTD_B, key)),
        "no MRTD": _released_proof(td, *_release(None, key)),
        "no release": _proof(td),
    }
    text, sig = _release(MRTD_A, key)
    refusals["tampered"] = _released_proof(td, text.replace("2.1.0", "2.1.1"), sig)
    refusals["not JSON"] = _released_proof(td, "{", sig)
    for what, proof in refusals.items():
        refused = _judge(td, proof, release_keys=pinned)
        assert not refused.accepted and refused.code == "CP_MRTD_NOT_ALLOWED", what
    assert "--release" in _judge(td, _proof(td), release_keys=pinned).reason
    # An explicit MRTD allowlist still admits on its own; a pin file is not consulted.
    assert _judge(td, _proof(td), release_keys=pinned, trusted_mrtds=(MRTD_A.hex(),)).accepted
    assert not _judge(td, _proof(td), release_keys=pinned, pinned=MRTD_A.hex()).accepted


def test_the_cp_loads_only_a_release_its_bundle_pins(tmp_path: Path) -> None:
    from ee.cp.envelope import load_cp_release
    from ee.protocol.signing import write_signed

    key, other = generate_signing_key(), generate_signing_key()
    doc = {"name": "easyenclave", "version": "2.1.0",
           "image": {"measurements": {"mrtd": MRTD_A.hex()}}}
    write_signed(tmp_path / "manifest.json", doc, key)
    release = load_cp_release(tmp_path, [("other", other.public_key()),
                                         ("rel", key.public_key())])
    assert (release.key_name, release.mrtd) == ("rel", MRTD_A.hex())
    with pytest.raises(ValueError, match="pins no release key"):
        load_cp_release(tmp_path, [])
    with pytest.raises(ValueError, match="not signed by a pinned release key"):
        load_cp_release(tmp_path, [("other", other.public_key())])


def test_ee_cp_refuses_a_release_its_dev_bundle_cannot_vouch_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ee.cp.server import main as ee_cp
    from ee.protocol.signing import write_signed

    (tmp_path / "rel").mkdir()
    write_signed(tmp_path / "rel" / "manifest.json", {"name": "x"}, generate_signing_key())
    assert ee_cp(["--dev", "--data-dir", str(tmp_path / "cp"), "--release",
                  str(tmp_path / "rel")]) == 2
    assert "pins no release key" in capsys.readouterr().err


@pytest.mark.parametrize("signer_pinned", [True, False])
async def test_real_agent_trusts_a_cp_by_its_signed_release(
        tmp_path: Path, signer_pinned: bool) -> None:
    """An agent pinning release keys (no MRTD list, no pin file) accepts the CP's signed
    writes when the CP shows a release signed by a pinned key naming its MRTD, and
    refuses them, telling the CP, when the signer is not pinned."""
    from ee.cp.envelope import CpRelease
    from ee.protocol.signing import public_key_bytes

    key, other = generate_signing_key(), generate_signing_key()
    sim = SimTD.load_or_create(shared_sim_dir())
    text, signature = _release(sim.mr_td, key)
    pinned = key if signer_pinned else other
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp") as rcp:
            rcp.cp.plane.prover = EnvelopeProver(
                SimProvider(sim), release=CpRelease(text, signature, "rel", sim.mr_td.hex()))
            config = agent_config(tmp_path / "a", rcp.agent_url,
                                  trusted_release_keys=(public_key_bytes(pinned).hex(),))
            async with running_agent(config) as agent:
                session = await _session_of(rcp, agent)
                assert agent.trust.proof is not None
                assert agent.trust.proof.accepted == signer_pinned
                deploy = attrs.evolve(_deploy("dep-rel"), compose=BAD_COMPOSE)
                await session.send(deploy)
                if signer_pinned:
                    await eventually(lambda: agent.runner.status("dep-rel"))
                    assert _refusals(rcp.cp.events.recent, agent.agent_id) == []
                else:
                    codes = await eventually(lambda: _refusals(rcp.cp.events.recent,
                                                               agent.agent_id))
                    assert codes[0] == "CP_MRTD_NOT_ALLOWED"
                assert not (tmp_path / "a" / PIN_FILE).exists()
