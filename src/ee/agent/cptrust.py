"""Trust in the CP's writes: the ``envelope`` quote on ``deploy`` and ``undeploy``.

Theory of operation
-------------------
Writes from the CP already travel on the authenticated session. Where the CP itself
runs in a TD it attaches its own quote (``envelope``), whose REPORTDATA is
:func:`~ee.protocol.reportdata.cp_envelope_report_data` of the message type and the
body *as received on the wire* minus ``envelope``; the agent then knows which code
sent the write. What the agent does with it is the config's ``cp_envelope``:

- ``disabled``: envelopes are ignored;
- ``optional``: a write without one is accepted; one that carries an envelope must
  carry a valid one (a bad envelope is worse than none);
- ``required``: a write without a valid envelope is refused.

An envelope is valid when the quote parses, its REPORTDATA is the binding above, and
its MRTD is trusted: listed in ``trusted_cp_mrtds`` or, with an empty list, equal to
the MRTD pinned at the first valid envelope (trust on first use, persisted in
``<data_dir>/cp-mrtd.pin`` so a restart keeps the pin). The decision is the pure
function :func:`judge_envelope`; :class:`CpTrust` adds the pin file.

Not covered yet: the quote's signature chain is only checked when a ``verify_quote``
hook is given (the agent config names no attestation roots for the CP), and the
envelope carries no agent nonce, so a recorded write could be replayed on the same
session. Both are contract gaps noted for the CP side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from ee.agent.platform import write_private
from ee.attestation import AttestationError, parse_quote
from ee.protocol.messages import CpEnvelope
from ee.protocol.reportdata import cp_envelope_report_data

__all__ = ["PIN_FILE", "CpTrust", "EnvelopeMode", "EnvelopeVerdict", "judge_envelope"]

PIN_FILE = "cp-mrtd.pin"

EnvelopeMode = Literal["required", "optional", "disabled"]


@attrs.frozen
class EnvelopeVerdict:
    """``accepted`` or not, why not, the envelope's MRTD, and an MRTD to pin now."""

    accepted: bool
    reason: str = ""
    mrtd: str | None = None
    pin: str | None = None


def judge_envelope(
    mode: EnvelopeMode,
    type_: str,
    body: Mapping[str, Any],
    envelope: CpEnvelope | None,
    *,
    trusted_mrtds: tuple[str, ...] = (),
    pinned: str | None = None,
    verify_quote: Callable[[bytes], None] | None = None,
) -> EnvelopeVerdict:
    """Decide whether a CP write may be applied (see the module docstring)."""
    if mode == "disabled":
        return EnvelopeVerdict(True, "envelope checks disabled")
    if envelope is None:
        if mode == "required":
            return EnvelopeVerdict(
                False, f"{type_} refused: cp_envelope is required and the CP sent no envelope"
            )
        return EnvelopeVerdict(True, "no envelope (optional)")
    try:
        quote = parse_quote(envelope.quote)
        if verify_quote is not None:
            verify_quote(envelope.quote)
    except (AttestationError, ValueError) as exc:
        return EnvelopeVerdict(False, f"{type_} refused: CP envelope quote is invalid: {exc}")
    mrtd = quote.report.mr_td.hex()
    expected = cp_envelope_report_data(type_, body)
    if quote.report.report_data != expected:
        return EnvelopeVerdict(
            False,
            f"{type_} refused: CP envelope REPORTDATA does not bind this {type_} message",
            mrtd,
        )
    if trusted_mrtds:
        if mrtd not in trusted_mrtds:
            return EnvelopeVerdict(
                False, f"{type_} refused: CP MRTD {mrtd} is not in trusted_cp_mrtds", mrtd
            )
        return EnvelopeVerdict(True, "CP MRTD trusted", mrtd)
    if pinned is None:
        return EnvelopeVerdict(True, "CP MRTD pinned on first use", mrtd, pin=mrtd)
    if mrtd != pinned:
        return EnvelopeVerdict(
            False, f"{type_} refused: CP MRTD {mrtd} differs from the pinned {pinned}", mrtd
        )
    return EnvelopeVerdict(True, "CP MRTD matches the pin", mrtd)


class CpTrust:
    """:func:`judge_envelope` with the agent's config and its persisted pin."""

    def __init__(
        self,
        mode: EnvelopeMode,
        data_dir: Path,
        trusted_mrtds: tuple[str, ...] = (),
        verify_quote: Callable[[bytes], None] | None = None,
    ) -> None:
        self.mode = mode
        self.pin_path = data_dir / PIN_FILE
        self.trusted_mrtds = trusted_mrtds
        self.verify_quote = verify_quote

    @property
    def pinned(self) -> str | None:
        try:
            return self.pin_path.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None

    def check(
        self, type_: str, body: Mapping[str, Any], envelope: CpEnvelope | None
    ) -> EnvelopeVerdict:
        verdict = judge_envelope(
            self.mode,
            type_,
            body,
            envelope,
            trusted_mrtds=self.trusted_mrtds,
            pinned=self.pinned,
            verify_quote=self.verify_quote,
        )
        if verdict.pin is not None and not write_private(
            self.pin_path, (verdict.pin + "\n").encode("ascii")
        ):
            # Another write pinned first (cannot happen on one session, but be exact).
            return self.check(type_, body, envelope)
        return verdict
