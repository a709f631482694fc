"""The CP's side of envelopes: the write key's proof, per-session signing in wire order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from ee.agent.cptrust import ProofVerdict, cp_quote_verifier, judge_proof, judge_write
from ee.attestation import parse_quote
from ee.attestation.errors import ProviderError
from ee.attestation.providers.sim import SimTD
from ee.cp.agent_plane import Session
from ee.cp.envelope import EnvelopeProver, make_prover
from ee.protocol import decode_message
from ee.protocol.messages import Deploy, SnapshotRequest, Undeploy
from ee.protocol.reportdata import cp_envelope_report_data

NONCE = bytes(range(16, 48))


class _Wire:
    """Stands in for the websocket under ``Session.send``: records frames, yields."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.send_lock = trio.Lock()  # as ee.cp.plane_ws.PlaneSocket

    async def send_locked(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        await trio.sleep(0.001 * (len(self.frames) % 3))  # interleave the senders
        self.frames.append(text)


def _deploy(dep: str) -> Deploy:
    return Deploy(deployment_id=dep, app="a", version="1", compose="services: {}\n",
                  expose_port=8080, health_path="/")


async def test_sim_proof_binds_the_nonce_and_key_and_verifies(tmp_path: Path) -> None:
    prover = make_prover("sim", sim_dir=tmp_path / "sim")
    assert prover is not None
    proof = await prover.prove(NONCE)
    assert proof.provider == "sim" and proof.public_key == prover.public_key
    report = parse_quote(proof.quote).report
    assert report.report_data == cp_envelope_report_data(NONCE, prover.public_key)
    root = SimTD.load(tmp_path / "sim").root_cert
    verdict = judge_proof("required", NONCE, proof, verify_quote=cp_quote_verifier((root,)))
    assert verdict.accepted and verdict.key == prover.public_key


def test_make_prover_kinds(tmp_path: Path) -> None:
    assert make_prover("none") is None
    assert isinstance(make_prover("tsm", tsm_root=tmp_path), EnvelopeProver)
    with pytest.raises(ValueError, match="cp_attestation"):
        make_prover("sgx")  # type: ignore[arg-type]


async def test_tsm_prover_without_tsm_raises_provider_error(tmp_path: Path) -> None:
    prover = make_prover("tsm", tsm_root=tmp_path / "no-tsm")
    assert prover is not None
    with trio.fail_after(20), pytest.raises(ProviderError):
        await prover.prove(NONCE)


async def test_session_signs_writes_in_wire_order_and_nothing_else(tmp_path: Path) -> None:
    """Many tasks sending at once: seq follows the order frames leave, so the agent
    (which demands a growing seq) accepts every one; requests are not signed."""
    prover = make_prover("sim", sim_dir=tmp_path / "sim")
    assert prover is not None
    wire = _Wire()
    session = Session(wire, 1 << 20)  # type: ignore[arg-type]
    session.signer = prover.signer(NONCE)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                msg = _deploy(f"d{i}") if i % 2 else Undeploy(deployment_id=f"d{i}")
                nursery.start_soon(session.send, msg)
            nursery.start_soon(session.send, SnapshotRequest())
    proof = ProofVerdict(True, key=prover.public_key)
    last = 0
    seqs = []
    for text in wire.frames:
        frame, msg = decode_message(text, max_bytes=1 << 20, sender="cp")
        if isinstance(msg, SnapshotRequest):
            assert "envelope" not in json.loads(text)["body"]
            continue
        assert isinstance(msg, Deploy | Undeploy)
        verdict = judge_write(proof, NONCE, last, frame.type, frame.body, msg.envelope)
        assert verdict.accepted, verdict.reason
        assert msg.envelope is not None
        last = msg.envelope.seq
        seqs.append(last)
    assert seqs == list(range(1, 31))
