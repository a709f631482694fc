"""TDX attestation: quote parsing and verification, measurement policy, providers, ITA.

Everything here is synchronous and pure except the providers (file I/O) and the ITA
client (HTTP): callers on the event loop run verification in a worker thread.
"""

from ee.attestation.collateral import TCB_STATUSES, Collateral
from ee.attestation.errors import (
    AttestationError,
    AttestationRejected,
    CollateralFormatError,
    ItaError,
    PolicyFormatError,
    ProviderError,
    QuoteFormatError,
)
from ee.attestation.pck import PckExtension
from ee.attestation.policy import (
    REGISTER_DOMAIN,
    Measurements,
    Policy,
    Verdict,
    Violation,
    evaluate,
)
from ee.attestation.quote import QeReport, Quote, QuoteHeader, QuoteSignature, TdReport, parse_quote
from ee.attestation.verify import VerificationResult, Verifier, load_intel_root
from ee.protocol.reportdata import registration_report_data  # the one definition

__all__ = [
    "REGISTER_DOMAIN",
    "TCB_STATUSES",
    "AttestationError",
    "AttestationRejected",
    "Collateral",
    "CollateralFormatError",
    "ItaError",
    "Measurements",
    "PckExtension",
    "Policy",
    "PolicyFormatError",
    "ProviderError",
    "QeReport",
    "Quote",
    "QuoteFormatError",
    "QuoteHeader",
    "QuoteSignature",
    "TdReport",
    "Verdict",
    "VerificationResult",
    "Verifier",
    "Violation",
    "evaluate",
    "load_intel_root",
    "parse_quote",
    "registration_report_data",
]
