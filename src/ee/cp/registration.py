"""Registration decisions: nonces and admission (pure; the agent plane does the I/O).

A registration is admitted only when every check passes, and each refusal carries a
reason code the agent and the operator can act on:

==================  ===========================================================
code                meaning
==================  ===========================================================
NONCE_EXPIRED       the challenge's nonce outlived its TTL before ``register``
NONCE_REPLAYED      the quote binds a nonce that was already used
REPORTDATA_MISMATCH the quote binds another nonce or another public key
BAD_QUOTE           the quote does not parse
ATTESTATION_FAILED  signature chain, collateral or measurement policy refused it
BAD_VM_NAME         the VM name is not a host-name-like label (1..63 characters)
UNKNOWN_NODE_SIZE   the node size is not a configured preset
BAD_DATACENTER      the datacenter label does not parse
NODE_MISMATCH       the snapshot's node metadata disagrees with the registration
DRIFT               a known VM came back with another MRTD, node size or datacenter
KEY_CHANGED         a known VM name came back with another session key
==================  ===========================================================

Nonces are single use: ``NonceBook.consume`` succeeds once per nonce and only before
its expiry. Consumed nonces are remembered (for their TTL) by the REPORTDATA they
imply for the key that used them, so a quote replayed onto a new connection is named
a replay rather than a mere mismatch.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from typing import Final

import attrs

from ee.actors.identity import Identity, agent_id_for
from ee.attestation import Collateral, Policy, QuoteFormatError, Verifier, evaluate
from ee.cp.nodes import LabelError, Vocabulary
from ee.protocol.messages import Register
from ee.protocol.reportdata import registration_report_data

NONCE_BYTES: Final = 32
VM_NAME: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


@attrs.frozen
class Refusal:
    code: str
    reasons: tuple[str, ...]


class NonceBook:
    """Outstanding and recently consumed challenge nonces (time is passed in)."""

    def __init__(self, ttl: float, *, remember: int = 100_000) -> None:
        self.ttl = ttl
        self._outstanding: dict[bytes, float] = {}
        self._consumed: OrderedDict[bytes, float] = OrderedDict()
        self._remember = remember

    def issue(self, now: float) -> tuple[bytes, float]:
        """A fresh nonce and its expiry time."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        expires = now + self.ttl
        self._outstanding[nonce] = expires
        return nonce, expires

    def consume(self, nonce: bytes, now: float) -> Refusal | None:
        expires = self._outstanding.pop(nonce, None)
        if expires is None:
            return Refusal("NONCE_REPLAYED", ("the challenge nonce was already used",))
        if now > expires:
            return Refusal("NONCE_EXPIRED",
                           (f"the challenge expired {now - expires:.1f}s before register",))
        return None

    def discard(self, nonce: bytes) -> None:
        self._outstanding.pop(nonce, None)

    def remember_binding(self, report_data: bytes, now: float) -> None:
        self._consumed[report_data] = now + self.ttl
        while len(self._consumed) > self._remember:
            self._consumed.popitem(last=False)

    def was_used(self, report_data: bytes, now: float) -> bool:
        expiry = self._consumed.get(report_data)
        return expiry is not None and now <= expiry

    def prune(self, now: float) -> None:
        for nonce in [n for n, t in self._outstanding.items() if now > t]:
            del self._outstanding[nonce]
        while self._consumed:
            key, expiry = next(iter(self._consumed.items()))
            if now <= expiry:
                break
            del self._consumed[key]

    def __len__(self) -> int:
        return len(self._outstanding)


@attrs.frozen
class Admission:
    identity: Identity | None
    refusal: Refusal | None
    mrtd: str | None = None
    tcb_status: str | None = None
    report_data: bytes | None = None  # what the quote bound (to name replays)


@attrs.frozen
class Judge:
    """Everything registration needs to decide, as one value (safe to share across threads)."""

    cluster_id: str
    vocabulary: Vocabulary
    verifier: Verifier
    policy: Policy
    collateral: Collateral | None

    def admit(self, msg: Register, nonce: bytes, *, now: float,
              known: Identity | None = None) -> Admission:
        """Decide on *msg*, answering the challenge *nonce*, at unix time *now*.

        *known* is the identity this VM name had before (drift check). CPU-heavy:
        call from a worker thread.
        """
        if not VM_NAME.match(msg.vm_name):
            return Admission(None, Refusal("BAD_VM_NAME", (
                "vm_name must match [A-Za-z0-9][A-Za-z0-9._-]{0,62}",)))
        size = self.vocabulary.size(msg.node_size)
        if size is None:
            known_sizes = ", ".join(sorted(self.vocabulary.sizes))
            return Admission(None, Refusal("UNKNOWN_NODE_SIZE", (
                f"node size {msg.node_size!r} is not one of: {known_sizes}",)))
        try:
            datacenter = self.vocabulary.normalise_label(msg.datacenter)
            snap_dc = self.vocabulary.normalise_label(msg.snapshot.node.datacenter)
        except LabelError as exc:
            return Admission(None, Refusal("BAD_DATACENTER", (str(exc),)))
        if msg.snapshot.node.node_size != msg.node_size or snap_dc != datacenter:
            return Admission(None, Refusal("NODE_MISMATCH", (
                "snapshot.node disagrees with the registration's node_size/datacenter",)))
        if size.gpu != msg.snapshot.node.gpu:
            return Admission(None, Refusal("NODE_MISMATCH", (
                f"node size {size.name} has gpu={size.gpu} but the node reports "
                f"gpu={msg.snapshot.node.gpu}",)))
        expected = registration_report_data(nonce, msg.public_key)
        try:
            result = self.verifier.verify(msg.attestation.quote, now=now,
                                          collateral=self.collateral)
        except QuoteFormatError as exc:
            return Admission(None, Refusal("BAD_QUOTE", (str(exc),)))
        report = result.quote.report
        mrtd = report.mr_td.hex()
        if report.report_data != expected:
            return Admission(None, Refusal("REPORTDATA_MISMATCH", (
                "the quote's REPORTDATA does not bind this challenge's nonce and the "
                "registration's public key",)), mrtd=mrtd, tcb_status=result.tcb_status,
                report_data=report.report_data)
        verdict = evaluate(self.policy, result, now=now, node_size=msg.node_size,
                           expected_report_data=expected)
        if not verdict.admitted:
            return Admission(None, Refusal("ATTESTATION_FAILED", verdict.reasons),
                             mrtd=mrtd, tcb_status=result.tcb_status)
        if known is not None:
            drift = []
            if known.mrtd != mrtd:
                drift.append(f"MRTD changed from {known.mrtd} to {mrtd}")
            if known.node_size != msg.node_size:
                drift.append(f"node size changed from {known.node_size} to {msg.node_size}")
            if known.datacenter != datacenter:
                drift.append(f"datacenter changed from {known.datacenter} to {datacenter}")
            if drift:
                return Admission(None, Refusal("DRIFT", tuple(drift)), mrtd=mrtd,
                                 tcb_status=result.tcb_status)
            if known.public_key != msg.public_key:
                # Same name, same measurements, another key: another VM claiming this
                # one's identity (agents keep their key across restarts).
                return Admission(None, Refusal("KEY_CHANGED", (
                    f"VM {msg.vm_name!r} registered before with another session key",)),
                    mrtd=mrtd, tcb_status=result.tcb_status)
        identity = Identity(
            agent_id=agent_id_for(self.cluster_id, msg.vm_name),
            vm_name=msg.vm_name,
            node_size=msg.node_size,
            datacenter=datacenter,
            gpu=size.gpu,
            public_key=msg.public_key,
            provider=msg.attestation.provider,
            mrtd=mrtd,
            tcb_status=verdict.tcb_status,
            verdict="warn" if verdict.violations else "pass",
            violations=verdict.reasons,
            verified_at=now,
            url=msg.url,
        )
        return Admission(identity, None, mrtd=mrtd, tcb_status=verdict.tcb_status)

    def reattest(self, quote: bytes, nonce: bytes, identity: Identity, *,
                 now: float) -> Refusal | None:
        """Check a periodic re-attestation quote; None when it passes."""
        try:
            result = self.verifier.verify(quote, now=now, collateral=self.collateral)
        except QuoteFormatError as exc:
            return Refusal("BAD_QUOTE", (str(exc),))
        expected = registration_report_data(nonce, identity.public_key)
        verdict = evaluate(self.policy, result, now=now, node_size=identity.node_size,
                           expected_report_data=expected)
        if not verdict.admitted:
            return Refusal("ATTESTATION_FAILED", verdict.reasons)
        if result.quote.report.mr_td.hex() != identity.mrtd:
            return Refusal("DRIFT", ("MRTD changed since registration",))
        return None
