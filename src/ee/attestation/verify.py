"""TDX quote verification: signatures, PCK chain, collateral, TCB status.

Theory of operation
-------------------
A quote is trustworthy when an unbroken chain of signatures leads from a trusted root
to the TD report it carries::

    trusted root --signs--> PCK CA --signs--> PCK leaf --signs--> QE report
    QE report.REPORTDATA[0:32] == SHA-256(attestation key || QE auth data)
    attestation key --signs--> header + body (the TD report)

so a verifier checks, per quote: the quote signature (attestation key), the QE report
signature (PCK leaf key), the QE binding digest, and the PCK chain. With collateral it
also checks the CRLs, the TCB info and QE identity signatures and windows, and matches
the platform's SVNs to a TCB level, yielding Intel's status name and advisory ids.

Cost model. Only two ECDSA verifications depend on the individual quote; everything
else depends on the platform (its PCK chain) or the collateral, which change rarely.
So the verifier memoises, keyed by SHA-256 of the exact bytes:

* the PCK chain check (signatures up to the root, CA flags, SGX extension, leaf key);
* the collateral check (chains, signatures, CRL contents, parsed documents);
* the TCB match for a (collateral, platform SVNs, QE report) combination.

Cached entries hold no verdict about time: every call re-evaluates the certificate
and collateral validity windows against the caller's `now` (a few comparisons). The
caches are bounded LRUs guarded by a lock, so one `Verifier` can serve worker threads.

The verifier never reads the clock and performs no I/O; it returns a
`VerificationResult` listing every problem found (`reasons`), not just a bool.

Exception boundary. `Verifier.verify` raises `QuoteFormatError` when the bytes do not
parse, and nothing else: every other outcome, including a failure nobody foresaw, is
a result with reasons (which every policy mode but ``disabled`` refuses). By design:

* `parse_quote` is itself a boundary (any decoder exception -> `QuoteFormatError`);
* certificate decoding is checked structurally before `cryptography` sees the bytes
  (`CertInfo.from_der`: v3, positive serial, no unused signature bits), and the
  cached PCK chain check turns anything a corrupt certificate raises into a
  ``PCK_CERT_INVALID: ...`` reason;
* `_refusing_unexpected` wraps the whole check of a parsed quote: any exception
  becomes a refused result with the reason ``VERIFY_ERROR: <fixed text>`` (the
  exception is logged, its traceback at debug level). A new decoder bug therefore refuses one quote
  instead of escaping into the caller (the CP's registration and re-attestation).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Generic, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ee.attestation._der import CertInfo
from ee.attestation.collateral import (
    Collateral,
    CollateralCheck,
    TcbMatch,
    TrustAnchors,
    Window,
    check_chain,
    check_collateral,
    link_problem,
    match_tcb,
    verify_p256,
)
from ee.attestation.errors import UNEXPECTED, UNEXPECTED_TEXT, describe
from ee.attestation.pck import PckExtension, PckExtensionError, pck_extension_of
from ee.attestation.quote import Quote, parse_quote

log = logging.getLogger(__name__)

INTEL_SGX_ROOT_CA_FINGERPRINT = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

K = TypeVar("K")
V = TypeVar("V")
PCK_CERT_INVALID = "PCK_CERT_INVALID"


class _Lru(Generic[K, V]):
    """A small thread-safe LRU memo."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._size:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def load_intel_root() -> x509.Certificate:
    """The Intel SGX Root CA shipped with the package (public trust anchor)."""
    pem = resources.files("ee.attestation").joinpath("roots/intel-sgx-root-ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if cert.fingerprint(hashes.SHA256()).hex() != INTEL_SGX_ROOT_CA_FINGERPRINT:
        raise RuntimeError("packaged Intel SGX Root CA has an unexpected fingerprint")
    return cert


@attrs.frozen
class _PckChainEntry:
    problems: tuple[str, ...]
    windows: tuple[Window, ...]
    leaf_key: ec.EllipticCurvePublicKey | None
    pck: PckExtension | None
    leaf_serial: int | None
    leaf_issuer: bytes | None
    ca_certs: tuple[CertInfo, ...]
    root_fingerprint: str | None

    @classmethod
    def failed(cls, problem: str) -> _PckChainEntry:
        return cls((problem,), (), None, None, None, None, (), None)


def _revocation(check: CollateralCheck, entry: _PckChainEntry) -> tuple[bool, tuple[str, ...]]:
    """Is the PCK leaf (or its CA) revoked by the collateral's CRLs?"""
    problems: list[str] = []
    revoked = False
    if check.pck_crl is not None and entry.leaf_issuer is not None:
        if check.pck_crl.issuer != entry.leaf_issuer:
            problems.append("PCK CRL is not issued by the PCK certificate's issuer")
        elif entry.leaf_serial is not None and check.pck_crl.revokes(entry.leaf_serial):
            revoked = True
            problems.append("PCK certificate is revoked")
    if check.root_crl is not None:
        for ca in entry.ca_certs:
            if ca.issuer == check.root_crl.issuer and check.root_crl.revokes(ca.cert.serial_number):
                revoked = True
                problems.append("PCK CA certificate is revoked by the root CA CRL")
    return revoked, tuple(problems)


@attrs.frozen
class VerificationResult:
    """What verification found; `ok` when no reason to refuse was found.

    `tcb_status` is Intel's status name when collateral was checked and a TCB level
    matched (non-fatal statuses such as OutOfDate are left for the policy to judge);
    None otherwise.
    """

    quote: Quote
    signature_valid: bool
    qe_report_valid: bool
    qe_binding_valid: bool
    chain_valid: bool
    reasons: tuple[str, ...]
    pck: PckExtension | None = None
    root_fingerprint: str | None = None
    collateral_checked: bool = False
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    tcb_date: int | None = None
    qe_tcb_status: str | None = None
    collateral_issued_at: float | None = None
    collateral_not_before: float | None = None
    collateral_next_update: float | None = None

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def fmspc(self) -> bytes | None:
        return self.pck.fmspc if self.pck is not None else None

    @classmethod
    def refused(cls, quote: Quote, reason: str) -> VerificationResult:
        """A result that proves nothing about *quote*, for *reason*."""
        return cls(quote, False, False, False, False, (reason,))


_Check = Callable[["Verifier", Quote, float, "Collateral | None"], VerificationResult]


def _refusing_unexpected(check: _Check) -> _Check:
    """The boundary around checking a parsed quote: an exception is a refusal."""

    @functools.wraps(check)
    def guarded(
        verifier: Verifier, quote: Quote, now: float, collateral: Collateral | None
    ) -> VerificationResult:
        try:
            return check(verifier, quote, now, collateral)
        except Exception as exc:
            log.info("unexpected error verifying a quote: %s", describe(exc))
            log.debug("its traceback", exc_info=True)
            return VerificationResult.refused(quote, f"{UNEXPECTED}: {UNEXPECTED_TEXT}")

    return guarded


class Verifier:
    """Verifies quotes against a fixed set of trusted roots, with memoisation."""

    def __init__(self, trusted_roots: Iterable[x509.Certificate], *, cache_size: int = 1024):
        self._roots = TrustAnchors(trusted_roots)
        if not self._roots.certs:
            raise ValueError("a Verifier needs at least one trusted root")
        self._chains: _Lru[bytes, _PckChainEntry] = _Lru(cache_size)
        self._collateral: _Lru[bytes, CollateralCheck] = _Lru(max(16, cache_size // 16))
        self._tcb: _Lru[tuple[bytes, ...], TcbMatch] = _Lru(cache_size)
        self._keys: _Lru[bytes, ec.EllipticCurvePublicKey | None] = _Lru(cache_size)
        self._revocations: _Lru[tuple[bytes, bytes], tuple[bool, tuple[str, ...]]] = _Lru(
            cache_size
        )
        self._links: _Lru[tuple[bytes, bytes], str | None] = _Lru(cache_size)

    @classmethod
    def intel(cls, **kwargs: int) -> Verifier:
        """A verifier trusting only the Intel SGX Root CA (production)."""
        return cls([load_intel_root()], **kwargs)

    @property
    def trusted_roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots.certs

    def clear_cache(self) -> None:
        self._chains.clear()
        self._collateral.clear()
        self._tcb.clear()
        self._keys.clear()
        self._links.clear()
        self._revocations.clear()

    def _link(self, cert: CertInfo, issuer: CertInfo) -> str | None:
        return self._links.get_or_compute(
            (cert.der, issuer.der), lambda: link_problem(cert, issuer)
        )

    # -- the cached, time-independent parts -------------------------------------------

    def _check_pck_chain(self, quote: Quote) -> _PckChainEntry:
        """The chain check, total: whatever the certificates' bytes make a decoder raise
        (here or in lazily decoded parts: names, extensions, keys) is a cached
        ``PCK_CERT_INVALID`` problem, so a corrupt chain costs its work only once."""
        try:
            return self._check_pck_chain_unguarded(quote)
        except Exception as exc:
            log.info("corrupt PCK chain: %s", describe(exc))
            log.debug("its traceback", exc_info=True)
            return _PckChainEntry.failed(f"{PCK_CERT_INVALID}: the certificate chain could "
                                         "not be decoded")

    def _check_pck_chain_unguarded(self, quote: Quote) -> _PckChainEntry:
        infos = []
        for i, der in enumerate(quote.signature.pck_chain_der):
            try:
                infos.append(CertInfo.from_der(der))
            except ValueError as exc:
                why = describe(exc, typed=False)
                return _PckChainEntry.failed(f"{PCK_CERT_INVALID}: certificate {i}: {why}")
        chain = check_chain("PCK chain", infos, self._roots, self._link)
        problems = list(chain.problems)
        leaf = infos[0].cert
        key = leaf.public_key()
        leaf_key: ec.EllipticCurvePublicKey | None = None
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            leaf_key = key
        else:
            problems.append("PCK chain: leaf key is not ECDSA P-256")
        pck: PckExtension | None = None
        try:
            pck = pck_extension_of(infos[0])
        except PckExtensionError as exc:
            problems.append(f"PCK chain: {exc}")
        root_fp = hashlib.sha256(chain.certs[-1].der).hexdigest() if chain.certs else None
        return _PckChainEntry(
            problems=tuple(problems),
            windows=chain.windows,
            leaf_key=leaf_key,
            pck=pck,
            leaf_serial=leaf.serial_number,
            leaf_issuer=infos[0].issuer,
            ca_certs=chain.certs[1:-1],
            root_fingerprint=root_fp,
        )

    def _attestation_key(self, raw: bytes) -> ec.EllipticCurvePublicKey | None:
        def load() -> ec.EllipticCurvePublicKey | None:
            try:
                return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
            except ValueError:
                return None

        return self._keys.get_or_compute(raw, load)

    # -- the per-quote part -------------------------------------------------------------

    def verify(
        self,
        quote: Quote | bytes,
        *,
        now: float,
        collateral: Collateral | None = None,
    ) -> VerificationResult:
        """Verify *quote* at unix time *now*, with *collateral* when given.

        Raises `QuoteFormatError` for malformed bytes and nothing else; everything
        else, unforeseen failures included, is reported in the result's `reasons`.
        """
        if not isinstance(quote, Quote):
            quote = parse_quote(quote)
        return self._verify_parsed(quote, now, collateral)

    @_refusing_unexpected
    def _verify_parsed(
        self, quote: Quote, now: float, collateral: Collateral | None
    ) -> VerificationResult:
        sig = quote.signature
        reasons: list[str] = []

        ak = self._attestation_key(sig.attestation_key)
        signature_valid = ak is not None and verify_p256(ak, sig.signature, quote.signed_region)
        if ak is None:
            reasons.append("attestation key is not a P-256 point")
        elif not signature_valid:
            reasons.append("quote signature does not verify with the attestation key")

        binding = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest()
        qe_binding_valid = sig.qe_report.report_data[:32] == binding
        if not qe_binding_valid:
            reasons.append("QE report data does not bind the attestation key and QE auth data")

        chain_key = hashlib.sha256(sig.pck_chain_pem).digest()
        entry = self._chains.get_or_compute(chain_key, lambda: self._check_pck_chain(quote))
        chain_problems = list(entry.problems)
        chain_problems.extend(p for w in entry.windows if (p := w.problem(now)) is not None)
        chain_valid = not chain_problems
        reasons.extend(chain_problems)
        qe_report_valid = entry.leaf_key is not None and verify_p256(
            entry.leaf_key, sig.qe_report_signature, sig.qe_report_raw
        )
        if not qe_report_valid:
            reasons.append("QE report signature does not verify with the PCK key")

        if collateral is None:
            return VerificationResult(
                quote=quote,
                signature_valid=signature_valid,
                qe_report_valid=qe_report_valid,
                qe_binding_valid=qe_binding_valid,
                chain_valid=chain_valid,
                reasons=tuple(reasons),
                pck=entry.pck,
                root_fingerprint=entry.root_fingerprint,
            )

        check = self._collateral.get_or_compute(
            collateral.digest, lambda: check_collateral(collateral, self._roots, self._link)
        )
        reasons.extend(check.problems)
        reasons.extend(check.time_problems(now))
        revoked, revocation_problems = self._revocations.get_or_compute(
            (collateral.digest, chain_key), lambda: _revocation(check, entry)
        )
        reasons.extend(revocation_problems)

        match: TcbMatch | None = None
        if check.tcb_info is not None and check.qe_identity is not None and entry.pck is not None:
            tcb_info, qe_identity, pck = check.tcb_info, check.qe_identity, entry.pck
            report = quote.report
            key = (
                collateral.digest,
                pck.fmspc,
                pck.pce_id,
                pck.cpu_svn,
                bytes(pck.sgx_tcb_components),
                pck.pce_svn.to_bytes(2, "little"),
                report.tee_tcb_svn,
                report.mr_signer_seam,
                report.seam_attributes,
                sig.qe_report_raw[:128],
                sig.qe_report_raw[128:260],
            )
            match = self._tcb.get_or_compute(
                key, lambda: match_tcb(tcb_info, qe_identity, pck, report, sig.qe_report)
            )
            reasons.extend(match.problems)
        tcb_status = "Revoked" if revoked else (match.status if match else None)
        if tcb_status == "Revoked" and not revoked:
            reasons.append("TCB level is Revoked")
        issued = [d.issue_date for d in (check.tcb_info, check.qe_identity) if d is not None]
        return VerificationResult(
            quote=quote,
            signature_valid=signature_valid,
            qe_report_valid=qe_report_valid,
            qe_binding_valid=qe_binding_valid,
            chain_valid=chain_valid,
            reasons=tuple(reasons),
            pck=entry.pck,
            root_fingerprint=entry.root_fingerprint,
            collateral_checked=True,
            tcb_status=tcb_status,
            advisory_ids=match.advisory_ids if match else (),
            tcb_date=match.tcb_date if match else None,
            qe_tcb_status=match.qe_status if match else None,
            collateral_issued_at=min(issued) if issued else None,
            collateral_not_before=check.not_before,
            collateral_next_update=check.next_update,
        )
