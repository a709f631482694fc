"""The CP's side of CP envelopes: proving its write key, signing every write.

Theory of operation
-------------------
An agent applies a ``deploy`` or ``undeploy`` only when it can tell which code sent
it (``ee.agent.cptrust``). The CP holds one Ed25519 *write key*, generated when the
process starts and never written anywhere: it exists only in the memory of the CP's
TD, so a quote that binds it says "this measured code holds this key".

- :meth:`EnvelopeProver.prove`, once per agent session, quotes
  REPORTDATA = ``SHA-512("ee/v2/cp-envelope" || cp_nonce || write key)`` with the
  CP's attestation provider (``tsm`` on a real TD, ``sim`` in development; a worker
  thread, under a limiter: quoting is I/O or CPU). The agent chose ``cp_nonce`` for
  this session, so the proof cannot be recorded and replayed to another session.
- :class:`WriteSigner`, one per session, signs each write with the write key over
  ``cp_write_document(type, body, cp_nonce, seq)``, ``seq`` counting 1, 2, ... in the
  order frames leave (the session signs under its send lock), so the agent can refuse
  a write it has already seen.

With ``cp_attestation = "none"`` (a CP outside any TD) there is no prover: ``registered``
carries no proof and writes no envelope; agents with ``cp_envelope = required`` refuse
them (``ENVELOPE_MISSING``), by design.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeAlias

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ee.attestation.providers import QuoteProvider
from ee.protocol.canonical import canonical_json
from ee.protocol.messages import (
    CpEnvelope,
    CpProof,
    Deploy,
    SecretRelease,
    SecretRevoke,
    Undeploy,
    body_to_dict,
)
from ee.protocol.reportdata import cp_envelope_report_data, cp_write_document
from ee.protocol.signing import (
    SignatureError,
    generate_signing_key,
    public_key_bytes,
    read_signed,
    sign_document,
)

__all__ = ["CpAttestation", "EnvelopeProver", "WriteSigner", "make_prover"]

CpAttestation: TypeAlias = Literal["tsm", "sim", "none"]
Write: TypeAlias = Deploy | Undeploy | SecretRelease | SecretRevoke


class WriteSigner:
    """Signs one session's writes (call :meth:`sign` in the order frames are sent)."""

    def __init__(self, key: Ed25519PrivateKey, cp_nonce: bytes) -> None:
        self._key = key
        self.cp_nonce = cp_nonce
        self.seq = 0

    def sign(self, msg: Write) -> Write:
        self.seq += 1
        unsigned = attrs.evolve(msg, envelope=None)
        doc = cp_write_document(msg.TYPE, body_to_dict(unsigned), self.cp_nonce, self.seq)
        return attrs.evolve(unsigned, envelope=CpEnvelope(
            seq=self.seq, signature=sign_document(doc, self._key)))


class EnvelopeProver:
    """The CP's write key and the provider that quotes it (see the module docstring)."""

    def __init__(self, provider: QuoteProvider, *, key: Ed25519PrivateKey | None = None,
                 limiter: trio.CapacityLimiter | None = None,
                 release: CpRelease | None = None) -> None:
        self.provider = provider
        self.release = release
        self._key = key or generate_signing_key()
        self.public_key = public_key_bytes(self._key)
        self.limiter = limiter or trio.CapacityLimiter(2)

    async def prove(self, cp_nonce: bytes) -> CpProof:
        """A fresh quote binding *cp_nonce* and the write key (raises ProviderError)."""
        report_data = cp_envelope_report_data(cp_nonce, self.public_key)
        quote = await trio.to_thread.run_sync(self.provider.get_quote, report_data,
                                              limiter=self.limiter)
        release = self.release
        return CpProof(provider=self.provider.name,  # type: ignore[arg-type]
                       public_key=self.public_key, quote=quote,
                       release_manifest=release.manifest_text if release else None,
                       release_signature=release.signature if release else None)

    def signer(self, cp_nonce: bytes) -> WriteSigner:
        return WriteSigner(self._key, cp_nonce)


@attrs.frozen
class CpRelease:
    """The release this CP runs, as agents are shown it (``ee-cp --release DIR``)."""

    manifest_text: str  # canonical JSON of manifest.json
    signature: bytes  # Ed25519 by a release key
    key_name: str  # the bundle's pinned release key that verified it
    mrtd: str | None  # the release's image MRTD (what agents compare the quote with)


def load_cp_release(directory: str | os.PathLike[str],
                    keys: Sequence[tuple[str, Ed25519PublicKey]]) -> CpRelease:
    """Read DIR/manifest.json + .sig and check the signature under one of the bundle's
    pinned release *keys* (``ValueError`` with the reason: a CP must not show agents a
    release its own bundle would not admit)."""
    path = Path(directory) / "manifest.json"
    if not keys:
        raise ValueError("--release: the bootstrap bundle pins no release key "
                         "(trust.release_keys), so no release can vouch for this CP")
    errors = []
    for name, key in keys:
        try:
            doc = read_signed(path, key)
        except SignatureError as exc:
            errors.append(str(exc))
            continue
        image = doc.get("image")
        measured = image.get("measurements") if isinstance(image, dict) else None
        mrtd = measured.get("mrtd") if isinstance(measured, dict) else None
        return CpRelease(canonical_json(doc).decode(),
                         bytes.fromhex(Path(str(path) + ".sig").read_text().strip()),
                         name, mrtd if isinstance(mrtd, str) else None)
    raise ValueError(f"--release: {path} is not signed by a pinned release key: "
                     f"{errors[0]}")


def make_prover(kind: CpAttestation, *, sim_dir: str | os.PathLike[str] | None = None,
                tsm_root: str | os.PathLike[str] | None = None,
                release: CpRelease | None = None) -> EnvelopeProver | None:
    """The prover for the CP config's ``cp_attestation`` (None for ``none``)."""
    if kind == "none":
        return None
    if kind == "sim":
        from ee.attestation.providers.sim import SimProvider, SimTD, shared_sim_dir

        return EnvelopeProver(SimProvider(SimTD.load_or_create(sim_dir or shared_sim_dir())),
                              release=release)
    if kind == "tsm":
        from ee.attestation.providers.tsm import DEFAULT_TSM_ROOT, TsmProvider

        return EnvelopeProver(TsmProvider(tsm_root or DEFAULT_TSM_ROOT), release=release)
    raise ValueError(f"cp_attestation must be tsm, sim or none, not {kind!r}")
