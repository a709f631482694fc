"""Trust in the CP's writes: a quote-proven session key and a signature on each write.

Theory of operation
-------------------
The agent cannot tell from the websocket alone *which code* sends it ``deploy`` and
``undeploy``: a ``ws://`` session can be intercepted, and any process that reaches
the agent could claim to be its CP. So where the CP runs in a TD it proves itself:

1. **per session**: the agent puts a fresh random ``cp_nonce`` in ``register``; the CP
   answers ``registered.cp_proof {provider, public_key, quote}`` where the quote is
   the CP's own TD quote with REPORTDATA =
   :func:`~ee.protocol.reportdata.cp_envelope_report_data` ``(cp_nonce, public_key)``.
   The agent checks the quote with the same verifier as the CP (signature, QE report,
   PCK chain to its trust roots: Intel's root, plus the sim root for a dev agent that
   itself attests with ``sim``), refuses a debug TD, checks that REPORTDATA binds *its*
   nonce and the key (a proof recorded on another session binds another nonce), and
   checks the CP's MRTD: it is accepted when it is in ``trusted_cp_mrtds``, or when
   the agent pins release keys (``trusted_release_keys``) and the proof carries the CP's
   release (manifest text + signature) signed by one of them whose
   ``image.measurements.mrtd`` is the quoted MRTD — so a CP upgraded to a new signed
   release is trusted without reconfiguring agents. With neither configured, the MRTD
   pinned at the first accepted proof is required (trust on first use, persisted in
   ``<data_dir>/cp-mrtd.pin`` so a restart keeps the pin). :func:`judge_proof`.
2. **per write**: every ``deploy``/``undeploy`` carries ``envelope {seq, signature}``,
   an Ed25519 signature by the proven key over
   :func:`~ee.protocol.reportdata.cp_write_document` of the type, the body *as
   received on the wire* minus ``envelope``, the session's ``cp_nonce`` and ``seq``;
   ``seq`` must exceed every seq accepted on this session. A write recorded on another
   session fails the signature (its nonce differs); one re-sent on this session fails
   the sequence. :func:`judge_write`.

The config's ``cp_envelope`` says what is demanded:

- ``required`` (the default): no proof, a bad proof, or a write without a valid
  envelope is refused;
- ``optional``: a CP that sends no proof may send unsigned writes; a CP that sends a
  proof is held to it exactly as under ``required`` (a bad proof is worse than none);
- ``disabled``: nothing is checked (a CP outside any TD, by operator choice).

A refusal carries a code the CP sees (``deploy_status failed`` with ``error`` =
``"<CODE>: reason"``, or an ``error`` frame): ``ENVELOPE_MISSING``,
``ENVELOPE_REPLAYED``, ``ENVELOPE_BAD_SIGNATURE``, ``CP_QUOTE_INVALID``,
``CP_MRTD_NOT_ALLOWED``, ``CP_PIN_MISMATCH``. Quote verification is CPU work: the
session runs :meth:`CpTrust.judge_proof` in a worker thread, once per session.

Not covered: TCB status of the CP's platform (the agent has no collateral source; the
chain to Intel's root and the MRTD are checked).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ee.agent.config import AgentConfig
from ee.agent.platform import write_private
from ee.attestation import AttestationError, Verifier, load_intel_root, parse_quote
from ee.protocol.canonical import strict_json_loads
from ee.protocol.messages import WRITE_REFUSAL_CODES, CpEnvelope, CpProof
from ee.protocol.reportdata import cp_envelope_report_data, cp_write_document
from ee.protocol.signing import SignatureError, public_key_from_bytes, verify_document

__all__ = [
    "PIN_FILE",
    "CpTrust",
    "EnvelopeMode",
    "EnvelopeVerdict",
    "ProofVerdict",
    "config_quote_check",
    "cp_quote_verifier",
    "judge_proof",
    "judge_write",
    "release_keys_of",
    "release_vouches",
]

PIN_FILE = "cp-mrtd.pin"

EnvelopeMode = Literal["required", "optional", "disabled"]

#: Verifies a quote's signatures and chain; raises ``AttestationError``/``ValueError``.
QuoteCheck = Callable[[bytes], None]


class CpQuoteRejected(AttestationError):
    """The CP's quote does not verify (signature, chain, debug TD)."""


@attrs.frozen
class ProofVerdict:
    """What the session's ``cp_proof`` established.

    ``accepted`` with ``key`` set: writes must be signed by ``key``; ``accepted``
    without a key: unsigned writes pass (``optional`` and no proof, or ``disabled``).
    Not accepted: every write of the session is refused with ``code``/``reason``.
    """

    accepted: bool
    code: str = ""
    reason: str = ""
    key: bytes | None = None
    mrtd: str | None = None
    pin: str | None = None  # an MRTD to pin now (first accepted proof)

    def __attrs_post_init__(self) -> None:
        if not self.accepted and self.code not in WRITE_REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {self.code!r}")


@attrs.frozen
class EnvelopeVerdict:
    """One write: ``accepted`` or refused with ``code`` and ``reason`` ("CODE: ...")."""

    accepted: bool
    reason: str = ""
    code: str = ""
    mrtd: str | None = None
    pin: str | None = None  # kept for callers that log a new pin; set on the proof

    @classmethod
    def refuse(cls, code: str, type_: str, detail: str) -> EnvelopeVerdict:
        if code not in WRITE_REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        return cls(False, f"{code}: {type_} refused: {detail}", code)


def judge_proof(
    mode: EnvelopeMode,
    cp_nonce: bytes,
    proof: CpProof | None,
    *,
    verify_quote: QuoteCheck | None,
    trusted_mrtds: tuple[str, ...] = (),
    pinned: str | None = None,
    release_keys: tuple[Ed25519PublicKey, ...] = (),
) -> ProofVerdict:
    """Decide what the session's ``cp_proof`` is worth (see the module docstring)."""
    if mode == "disabled":
        return ProofVerdict(True, reason="CP envelope checks disabled")
    if proof is None:
        if mode == "required":
            return ProofVerdict(False, "ENVELOPE_MISSING", "cp_envelope is required and the CP "
                                "sent no proof of its write key (it does not attest itself)")
        return ProofVerdict(True, reason="the CP sent no proof (optional): unsigned writes")
    if verify_quote is None:
        return ProofVerdict(False, "CP_QUOTE_INVALID",
                            "the agent has no trust roots configured for the CP's quote")
    try:
        quote = parse_quote(proof.quote)
        verify_quote(proof.quote)
    except (AttestationError, ValueError) as exc:
        return ProofVerdict(False, "CP_QUOTE_INVALID", f"the CP's quote does not verify: {exc}")
    mrtd = quote.report.mr_td.hex()
    if quote.report.debug:
        return ProofVerdict(False, "CP_QUOTE_INVALID", "the CP runs in a debug TD", mrtd=mrtd)
    if quote.report.report_data != cp_envelope_report_data(cp_nonce, proof.public_key):
        return ProofVerdict(False, "CP_QUOTE_INVALID", "the CP's quote does not bind this "
                            "session's cp_nonce and the CP's write key (a replayed proof?)",
                            mrtd=mrtd)
    if trusted_mrtds or release_keys:
        if mrtd in trusted_mrtds:
            return ProofVerdict(True, reason="CP MRTD trusted", key=proof.public_key,
                                mrtd=mrtd)
        vouched = release_vouches(proof, mrtd, release_keys) if release_keys else (
            "it is not in trusted_cp_mrtds")
        if vouched is None:
            return ProofVerdict(True, reason="CP MRTD vouched for by a pinned release key",
                                key=proof.public_key, mrtd=mrtd)
        return ProofVerdict(False, "CP_MRTD_NOT_ALLOWED",
                            f"CP MRTD {mrtd} is not trusted: {vouched}", mrtd=mrtd)
    if pinned is None:
        return ProofVerdict(True, reason="CP MRTD pinned on first use", key=proof.public_key,
                            mrtd=mrtd, pin=mrtd)
    if mrtd != pinned:
        return ProofVerdict(False, "CP_PIN_MISMATCH",
                            f"CP MRTD {mrtd} differs from the pinned {pinned}", mrtd=mrtd)
    return ProofVerdict(True, reason="CP MRTD matches the pin", key=proof.public_key, mrtd=mrtd)


def release_vouches(proof: CpProof, mrtd: str,
                    keys: tuple[Ed25519PublicKey, ...]) -> str | None:
    """None when the proof's release is signed by one of *keys* and names *mrtd* as its
    image's MRTD; otherwise why not (pure)."""
    if proof.release_manifest is None or proof.release_signature is None:
        return ("it is not in trusted_cp_mrtds and the CP sent no signed release "
                "(run it with --release)")
    try:
        manifest = strict_json_loads(proof.release_manifest)
    except (ValueError, RecursionError):
        return "the CP's release manifest is not JSON"
    if not isinstance(manifest, dict):
        return "the CP's release manifest is not a JSON object"
    for key in keys:
        try:
            verify_document(manifest, proof.release_signature, key)
        except SignatureError:
            continue
        break
    else:
        return "the CP's release is not signed by a pinned release key"
    image = manifest.get("image")
    measured = image.get("measurements") if isinstance(image, dict) else None
    released = measured.get("mrtd") if isinstance(measured, dict) else None
    if released != mrtd:
        return (f"the signed release {manifest.get('version')!r} names MRTD {released!r}, "
                "not the quoted one")
    return None


def judge_write(
    proof: ProofVerdict | None,
    cp_nonce: bytes,
    last_seq: int,
    type_: str,
    body: Mapping[str, Any],
    envelope: CpEnvelope | None,
) -> EnvelopeVerdict:
    """Decide one write under the session's *proof* (None: no session proof judged)."""
    if proof is None:
        return EnvelopeVerdict.refuse("ENVELOPE_MISSING", type_,
                                      "no CP proof was judged on this session")
    if not proof.accepted:
        return EnvelopeVerdict.refuse(proof.code, type_, proof.reason)
    if proof.key is None:
        if envelope is not None:
            return EnvelopeVerdict.refuse("ENVELOPE_BAD_SIGNATURE", type_,
                                          "an envelope, but the CP proved no key this session")
        return EnvelopeVerdict(True, proof.reason)
    if envelope is None:
        return EnvelopeVerdict.refuse("ENVELOPE_MISSING", type_,
                                      "the CP proved its key but sent this write unsigned")
    try:
        verify_document(cp_write_document(type_, body, cp_nonce, envelope.seq),
                        envelope.signature, public_key_from_bytes(proof.key))
    except (SignatureError, ValueError) as exc:
        return EnvelopeVerdict.refuse("ENVELOPE_BAD_SIGNATURE", type_,
                                      f"the envelope does not verify for this session: {exc}")
    if envelope.seq <= last_seq:
        return EnvelopeVerdict.refuse("ENVELOPE_REPLAYED", type_,
                                      f"seq {envelope.seq} is not above {last_seq}")
    return EnvelopeVerdict(True, "signed by the proven CP key", mrtd=proof.mrtd)


def cp_quote_verifier(roots: tuple[x509.Certificate, ...],
                      now: Callable[[], float] = time.time) -> QuoteCheck:
    """A :data:`QuoteCheck` by :class:`~ee.attestation.Verifier` over *roots*.

    *now* is the wall clock certificate validity is judged at (the CP does the same).
    """
    verifier = Verifier(roots)

    def check(quote: bytes) -> None:
        result = verifier.verify(quote, now=now())
        if not result.ok:
            raise CpQuoteRejected("; ".join(result.reasons))

    return check


def roots_for(attestation_provider: str, sim_dir: str | None) -> tuple[x509.Certificate, ...]:
    """The roots a CP's quote must chain to: Intel's, plus the sim root for a dev agent.

    An agent that itself attests with ``sim`` is a development agent on the sim
    "hardware" of its host (``sim_dir``), which a dev CP shares: it trusts that root
    for the CP's quote too. A ``tsm`` agent trusts Intel's root only.
    """
    roots = [load_intel_root()]
    if attestation_provider == "sim" and sim_dir is not None:
        from ee.attestation.providers.sim import SimTD

        roots.append(SimTD.load_or_create(sim_dir).root_cert)
    return tuple(roots)


def config_quote_check(config: AgentConfig) -> QuoteCheck:
    """The CP-quote check an agent config implies (:func:`roots_for`; file I/O)."""
    sim_dir = None
    if config.attestation_provider == "sim":
        sim_dir = config.sim_dir or str(Path(config.data_dir) / "sim")
    return cp_quote_verifier(roots_for(config.attestation_provider, sim_dir))


def release_keys_of(config: AgentConfig) -> tuple[Ed25519PublicKey, ...]:
    """The release keys an agent config pins (validated hex)."""
    return tuple(public_key_from_bytes(bytes.fromhex(k)) for k in config.trusted_release_keys)


class CpTrust:
    """The agent's CP-trust state: the persisted pin and the live session's proof.

    :meth:`judge_proof` (worker thread) then :meth:`open_session` once per session;
    :meth:`check` per write, from the session's reader (one at a time);
    :meth:`close_session` when the session ends.
    """

    def __init__(
        self,
        mode: EnvelopeMode,
        data_dir: Path,
        trusted_mrtds: tuple[str, ...] = (),
        verify_quote: QuoteCheck | None = None,
        release_keys: tuple[Ed25519PublicKey, ...] = (),
    ) -> None:
        self.mode = mode
        self.pin_path = data_dir / PIN_FILE
        self.trusted_mrtds = trusted_mrtds
        self.release_keys = release_keys
        self.verify_quote = verify_quote
        self.proof: ProofVerdict | None = None
        self.cp_nonce = b""
        self.last_seq = 0

    @classmethod
    def from_config(cls, config: AgentConfig) -> CpTrust:
        """From an :class:`~ee.agent.config.AgentConfig` (its roots, MRTDs and mode)."""
        return cls(config.cp_envelope, Path(config.data_dir), tuple(config.trusted_cp_mrtds),
                   config_quote_check(config), release_keys_of(config))

    @property
    def pinned(self) -> str | None:
        try:
            return self.pin_path.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None

    def judge_proof(self, cp_nonce: bytes, proof: CpProof | None) -> ProofVerdict:
        """Judge a session's proof and persist a first-use pin (blocking: a thread)."""
        verdict = judge_proof(self.mode, cp_nonce, proof, verify_quote=self.verify_quote,
                              trusted_mrtds=self.trusted_mrtds, pinned=self.pinned,
                              release_keys=self.release_keys)
        if verdict.pin is not None and not write_private(
            self.pin_path, (verdict.pin + "\n").encode("ascii")
        ):
            # Pinned meanwhile (another process on this data dir): judge against it.
            return self.judge_proof(cp_nonce, proof)
        return verdict

    def open_session(self, cp_nonce: bytes, verdict: ProofVerdict) -> None:
        self.cp_nonce = cp_nonce
        self.proof = verdict
        self.last_seq = 0

    def close_session(self) -> None:
        self.proof = None
        self.cp_nonce = b""
        self.last_seq = 0

    def check(
        self, type_: str, body: Mapping[str, Any], envelope: CpEnvelope | None
    ) -> EnvelopeVerdict:
        """Judge one write of the live session; an accepted seq is consumed."""
        if self.mode == "disabled":
            return EnvelopeVerdict(True, "CP envelope checks disabled")
        verdict = judge_write(self.proof, self.cp_nonce, self.last_seq, type_, body, envelope)
        if verdict.accepted and envelope is not None:
            self.last_seq = envelope.seq
        return verdict
